"""peft's and timm's habits on PromptModel: from_pretrained, merge_and_unload, reset_classifier, pretrained_cfg."""

from __future__ import annotations

import copy

import pytest
import torch

import promptvit
from promptvit.methods.base import TunerLayer, get_method
from tests.conftest import build_tiny, tiny_input


def tuned(method: str, kind: str = "vit_token", **options) -> promptvit.PromptModel:
    model = promptvit.wrap(build_tiny(kind), method, **{**get_method(method).test_options, **options})
    with torch.no_grad():
        for _, parameter in model.tuned_named_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval()


@pytest.mark.parametrize(
    ("method", "kind"),
    [("lora", "vit_token"), ("bias", "vit_token"), ("norm", "resnet"), ("full", "vit_avg")],
)
def test_merge_and_unload_gives_a_plain_timm_model_computing_the_same_logits(method, kind):
    model = tuned(method, kind)
    images = tiny_input(kind, batch=3)
    with torch.no_grad():
        expected = model(images)
        plain = model.merge_and_unload()
        assert not any(isinstance(m, TunerLayer) for m in plain.modules())
        assert type(plain).__module__.startswith("timm.")
        assert (plain.eval()(images) - expected).abs().max() <= 1e-5
    assert isinstance(
        model.backbone, torch.nn.Identity
    )  # the PromptModel gave its backbone away, as unload()


def test_merged_lora_weights_equal_peft_merge_and_unload_of_the_exported_adapter(tmp_path):
    from peft import PeftModel

    model = tuned("lora", targets=["q", "k", "v"], rank=3)
    model.save_peft_adapter(tmp_path / "peft")
    base = copy.deepcopy(model).unload()
    reference = PeftModel.from_pretrained(base, str(tmp_path / "peft")).merge_and_unload().state_dict()
    ours = model.merge_and_unload().state_dict()
    assert ours.keys() == reference.keys()
    for name, tensor in ours.items():
        assert torch.allclose(tensor, reference[name], atol=1e-6), name


@pytest.mark.parametrize(
    ("method", "why"), [("vpt", "it adds tensors of its own"), ("adapter", "do not fold")]
)
def test_merge_and_unload_refuses_methods_that_do_not_merge_and_changes_nothing(method, why):
    model = tuned(method)
    images = tiny_input("vit_token")
    with torch.no_grad():
        before = model(images)
    with pytest.raises(
        promptvit.ConfigError, match=f"method '{method}' cannot be merged into the backbone: .*{why}"
    ):
        model.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(model(images), before)


@pytest.mark.parametrize("method", ["linear", "mlp", "lora"])
def test_reset_classifier_gives_a_new_trainable_head_and_keeps_the_rest(method):
    model = tuned(method)
    before = {n: p.detach().clone() for n, p in model.tuned_named_parameters() if "head" not in n}
    images = tiny_input("vit_token")
    with torch.no_grad(), model.disable_adapter():
        untouched = model(images)
    model.reset_classifier(5)
    assert model.num_classes == 5 and model(images).shape == (2, 5)
    head = model.get_classifier()
    assert head.out_features == 5 and all(p.requires_grad for p in head.parameters())
    after = dict(model.tuned_named_parameters())
    assert all(torch.equal(after[n], t) for n, t in before.items())  # the method's tensors are kept
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(images), untouched)  # the pre-wrap head still comes back
    with pytest.raises(promptvit.ConfigError, match="num_classes must be >= 1"):
        model.reset_classifier(0)


def test_pretrained_cfg_passes_through_and_from_pretrained_loads(tmp_path):
    model = tuned("vpt")
    assert model.pretrained_cfg is model.backbone.pretrained_cfg and model.default_cfg is model.pretrained_cfg
    assert model.pretrained_cfg["architecture"] == "vit_tiny_patch16_224"
    model.save_pretrained(tmp_path / "run" / "artifact")
    images = tiny_input("vit_token")
    with torch.no_grad():
        for where in (tmp_path / "run" / "artifact", tmp_path / "run", str(tmp_path / "run")):
            assert torch.equal(promptvit.PromptModel.from_pretrained(where).eval()(images), model(images))
