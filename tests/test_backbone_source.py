"""How a backbone was built, read from the model: every family's build options rebuild the same network, and
the weights' origin is told apart from weights changed in place."""

from __future__ import annotations

import pytest
import timm
import torch

import promptvit
from promptvit.backbones import BackboneError, adapter_for, backbone_source, create_backbone
from promptvit.backbones.generic import GenericAdapter
from tests.families import FAMILY_BUILDS, MEDICAL_BUILDS

#: builds whose options timm takes as Python objects (an MLP class, an activation): they cannot be written in
#: an artifact, so their record says the base cannot be rebuilt and loading needs base_model=
NOT_RECORDABLE = {"virchow2"}
BUILDS = {**FAMILY_BUILDS, **MEDICAL_BUILDS}


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_build_options_read_off_the_model_rebuild_the_same_network(name):
    architecture, options, size = BUILDS[name]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(architecture, num_classes=3, **options).eval()
    adapter = adapter_for(model)
    # the generic adapter (and its subclasses) reads a model's build options from timm's own record, which
    # timm releases before get_model_args do not keep: a non-default build then cannot be rebuilt, and says so
    unrecorded = isinstance(adapter, GenericAdapter) and not hasattr(timm.models, "get_model_args")
    if name in NOT_RECORDABLE or unrecorded:
        with pytest.raises(BackboneError, match="differs from the model"):
            adapter.build_options(architecture)
        return
    inferred = adapter.build_options(architecture)
    assert inferred["num_classes"] == 3
    rebuilt = timm.create_model(architecture, **inferred).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict: the same tensors, names and shapes
    # Options that shape no tensor (pooling, rotary reference grid, dynamic size) show in the forward.
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))
    assert adapter.rebuild_mismatch(architecture, inferred) is None


def test_a_wrong_option_is_named_with_what_differs():
    architecture, options, _ = FAMILY_BUILDS["vit_token"]
    model = timm.create_model(architecture, **options)
    problem = adapter_for(model).rebuild_mismatch(architecture, {**options, "depth": 3})
    assert (
        "timm.create_model('vit_tiny_patch16_224'" in problem
        and "blocks.2.attn.proj.weight: absent vs (32, 32)" in problem
    )
    problem = adapter_for(model).rebuild_mismatch(architecture, {**options, "dynamic_img_size": True})
    assert "dynamic_img_size: False vs True" in problem  # shapes agree: the geometry tells
    problem = adapter_for(model).rebuild_mismatch(architecture, {**options, "no_such_option": 1})
    assert "fails" in problem and "no_such_option" in problem


def test_create_backbone_records_its_build_and_a_later_change_of_weights_is_noticed():
    architecture, options, _ = FAMILY_BUILDS["vit_token"]
    model = create_backbone(architecture, init_seed=4, num_classes=2, **options)
    record = backbone_source(model)
    assert record["origin"] == "random" and record["init_seed"] == 4
    assert record["kwargs"] == {**options, "num_classes": 2} and "problem" not in record
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.add_(1.0)  # e.g. trained in place before wrapping
    record = backbone_source(model)
    assert record["origin"] == "unknown" and "changed after promptvit.create_backbone" in record["problem"]
    with pytest.warns(UserWarning, match="cannot be rebuilt from the artifact"):
        promptvit.wrap(model, "linear").save_pretrained(pytest.importorskip("tempfile").mkdtemp())


def test_a_model_without_a_timm_config_is_unknown():
    architecture, options, _ = FAMILY_BUILDS["vit_token"]
    model = timm.create_model(architecture, **options)
    del model.pretrained_cfg
    record = backbone_source(model)
    assert record["origin"] == "unknown" and "no timm pretrained_cfg" in record["problem"]
