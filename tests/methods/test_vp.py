"""VP: the additive token prompt (EPT's baseline) and Bahng et al.'s pixel padding prompt."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

import promptvit
from tests.conftest import build_tiny, tiny_input, without_readout

VITS = ["vit_token", "vit_avg"]


def vit_b16(num_classes: int = 100) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", num_classes=num_classes)


def _randomise(model: promptvit.PromptModel) -> None:
    with torch.no_grad():
        for p in model.method.parameters():
            p.copy_(torch.randn_like(p))


def test_counts() -> None:
    token = promptvit.wrap(vit_b16(), "vp")
    assert token.parameter_summary()["method"] == 197 * 768 == 151_296
    pad = promptvit.wrap(vit_b16(), "vp", mode="pad", pad_size=30)
    assert pad.parameter_summary()["method"] == 2 * 3 * 30 * 224 + 2 * 3 * 30 * (224 - 60) == 69_840
    tiny = promptvit.wrap(build_tiny("resnet"), "vp", mode="pad", pad_size=3, cnn_input_size=[32, 40])
    assert tiny.parameter_summary()["method"] == 2 * 3 * 3 * 40 + 2 * 3 * 3 * (32 - 6)
    cls = promptvit.get_method("vp")
    for model in (token, pad, tiny):
        assert (
            cls.expected_num_parameters(model.config, model.geometry) == model.parameter_summary()["method"]
        )


@pytest.mark.parametrize(
    "kind,options",
    [
        ("vit_token", {}),
        ("vit_avg", {}),
        ("vit_token", {"mode": "pad", "pad_size": 3}),
        ("resnet", {"mode": "pad", "pad_size": 3, "cnn_input_size": [32, 32]}),
    ],
)
def test_zero_prompt_reproduces_timm(kind: str, options: dict) -> None:
    base = build_tiny(kind, num_classes=4)
    reference = copy.deepcopy(base)
    model = without_readout(promptvit.wrap(base, "vp", **options)).eval()
    x = tiny_input(kind)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("kind", VITS)
def test_token_prompt_is_added_to_every_token_after_position_embedding(kind: str) -> None:
    base = build_tiny(kind, num_classes=4)
    vit = copy.deepcopy(base)
    model = without_readout(promptvit.wrap(base, "vp", init="normal")).eval()
    prompt = model.method.prompt
    assert prompt.shape == (model.geometry.num_tokens, model.geometry.embed_dim)
    assert prompt.abs().sum() > 0
    x = tiny_input(kind)
    with torch.no_grad():
        t = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))) + prompt
        expected = vit.forward_head(vit.norm(vit.blocks(t)))
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize(
    "kind,stem,options",
    [
        ("vit_token", "patch_embed", {"pad_size": 3}),
        ("resnet", "conv1", {"pad_size": 5, "cnn_input_size": [32, 32]}),
    ],
)
def test_pad_prompt_only_touches_border_pixels(kind: str, stem: str, options: dict) -> None:
    model = promptvit.wrap(build_tiny(kind), "vp", mode="pad", **options).eval()
    _randomise(model)
    seen = {}
    model.backbone.get_submodule(stem).register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    x = tiny_input(kind)
    with torch.no_grad():
        model(x)
    added = seen["x"] - x
    pad = options["pad_size"]
    border = torch.ones_like(added, dtype=torch.bool)
    border[:, :, pad:-pad, pad:-pad] = False
    assert torch.equal(added[~border], torch.zeros_like(added[~border]))
    assert (added[border] != 0).all()
    torch.testing.assert_close(added[0], model.method.frame())


def _train_step(model: promptvit.PromptModel, kind: str) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for _, p in model.tuned_named_parameters()], lr=0.5)
    loss = torch.nn.functional.cross_entropy(model(tiny_input(kind, batch=4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize("kind", VITS)
def test_token_mode_trains_saves_and_copies(kind: str, tmp_path) -> None:
    """The matrix runs pad mode; this covers token mode's trainable set, artifact and deepcopy."""
    model = promptvit.wrap(build_tiny(kind), "vp", num_classes=4)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    _train_step(model, kind)
    changed = {n for n, t in model.state_dict().items() if not torch.equal(before[n], t)}
    assert "adapters.default.prompt" in changed  # the method of the adapter "default" ("method.prompt" saved)
    assert changed <= {n for n, p in model.named_parameters() if p.requires_grad}
    x = tiny_input(kind)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "artifact")
    loaded = promptvit.load(tmp_path / "artifact", base_model=build_tiny(kind)).eval()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        model.method.prompt.add_(1.0)
        assert torch.equal(clone(x), expected)
        assert not torch.equal(model(x), expected)


def test_token_mode_on_cnn_is_refused() -> None:
    with pytest.raises(promptvit.ConfigError, match="mode='pad'"):
        promptvit.wrap(build_tiny("resnet"), "vp")


def test_pad_larger_than_half_the_image_is_refused() -> None:
    with pytest.raises(promptvit.ConfigError, match="pad_size=8 .* 16x16 .* < 8"):
        promptvit.wrap(build_tiny("vit_token"), "vp", mode="pad", pad_size=8)
    promptvit.wrap(build_tiny("vit_token"), "vp", mode="pad", pad_size=7)


def test_wrong_input_size_names_the_expected_size() -> None:
    model = promptvit.wrap(build_tiny("resnet"), "vp", mode="pad", pad_size=2, cnn_input_size=[32, 32])
    with pytest.raises(ValueError, match="32x32"):
        model(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(mode="frame"), "mode"),
        (dict(init="uniform"), "init"),
        (dict(pad_size=0, mode="pad"), "pad_size"),
        (dict(cnn_input_size=[32]), "cnn_input_size"),
    ],
)
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(promptvit.ConfigError, match=message):
        promptvit.wrap(build_tiny("vit_token"), "vp", **options)
