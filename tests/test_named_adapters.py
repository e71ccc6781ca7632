"""Several named adapters on one backbone (peft's vocabulary) and mixed batches, on every family's builds.

A mixed batch (``adapter_names=[...]``, one adapter per sample) must give each sample what its adapter
computes alone (within 1e-5: per-sample selection inside one forward sums in another order); switching,
deleting and disabling adapters must be exact.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import promptvit
from promptvit.artifact import ArtifactError
from promptvit.backbones import adapter_for, registered_adapters
from promptvit.methods.base import ConfigError
from tests.families import FAMILY_BUILDS, build, family_input

METHODS = promptvit.available_methods()
#: one tiny build per registered family (the first its adapter lists that this timm can make)
FAMILIES = sorted(
    next(name for name in adapter.tiny_builds if name in FAMILY_BUILDS)
    for adapter in dict.fromkeys(registered_adapters().values())
    if any(name in FAMILY_BUILDS for name in adapter.tiny_builds)
)


@functools.cache
def _base(name: str) -> torch.nn.Module:
    model = build(FAMILY_BUILDS, name, num_classes=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LayerScale near 1 (timm starts some at 1e-5, which would hide the blocks' maths)
        for parameter_name, p in model.named_parameters():
            if parameter_name.rpartition(".")[2] in ("gamma", "gamma_1", "gamma_2"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    return model


def _fresh(name: str) -> torch.nn.Module:
    return copy.deepcopy(_base(name))


def _wraps(method: str, name: str) -> bool:
    return promptvit.get_method(method).supports(adapter_for(_base(name)))


def _options(method: str, name: str) -> dict:
    options = dict(promptvit.get_method(method).test_options)
    if "cnn_input_size" in options:  # prompts sized for the images this build sees
        size = FAMILY_BUILDS[name][2]
        options["cnn_input_size"] = [size, size]
    return options


@torch.no_grad()
def _perturb(model: promptvit.PromptModel, adapter: str, seed: int) -> None:
    """Move every tuned tensor of ``adapter`` away from its (often zero) initial value."""
    generator = torch.Generator().manual_seed(seed)
    active = model.active_adapter
    model.set_adapter(adapter)  # its in-place tensors are in the backbone while it is active
    for _, p in model.tuned_named_parameters():
        p.add_(0.2 * torch.randn(p.shape, generator=generator))
    model.set_adapter(active)


def _alone(model: promptvit.PromptModel, adapter: str, x: torch.Tensor) -> torch.Tensor:
    active = model.active_adapter
    model.set_adapter(adapter)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.set_adapter(active)


def _check_mixed(model: promptvit.PromptModel, names: list[str], x: torch.Tensor) -> None:
    with torch.no_grad():
        mixed = model.forward_adapters(x, names)
    for adapter in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == adapter]
        torch.testing.assert_close(
            mixed[adapter], _alone(model, adapter, x[rows]), rtol=1e-5, atol=1e-5, msg=adapter
        )


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_equals_each_adapter_alone(method: str, name: str) -> None:
    """Two adapters of one method (one layer, two entries) and a linear probe share a batch."""
    if not _wraps(method, name):
        pytest.skip(f"{method} does not wrap {name}")
    options = _options(method, name)
    model = promptvit.wrap(_fresh(name), method, num_classes=4, adapter_name="a", **options)
    model.add_adapter("b", method, num_classes=4, **options)
    model.add_adapter("probe", "linear", num_classes=4)
    for seed, adapter in enumerate(("a", "b", "probe")):
        _perturb(model, adapter, seed)
    model.eval()
    _check_mixed(model, ["a", "b", "probe", "a", "b"], family_input(FAMILY_BUILDS, name, batch=5))


def test_mixed_batch_pins_an_adapter_to_its_own_samples() -> None:
    """A change of one adapter's tensors moves its samples' logits and nobody else's."""
    model = promptvit.wrap(_fresh("vit_token"), "lora", num_classes=4, rank=2, adapter_name="a")
    model.add_adapter("b", "vpt", num_classes=4, prompt_length=2)
    model.add_adapter("c", "lora", num_classes=4, rank=2)
    for seed, adapter in enumerate("abc"):
        _perturb(model, adapter, seed)
    model.eval()
    x = family_input(FAMILY_BUILDS, "vit_token", batch=3)
    names = ["a", "b", "c"]
    with torch.no_grad():
        before = model(x, adapter_names=names)
        for _, p in model.tuned_named_parameters("c"):
            if "lora" in _:
                p.add_(1.0)
        after = model(x, adapter_names=names)
    assert torch.equal(before[:2], after[:2]) and not torch.allclose(before[2], after[2], atol=1e-3)


# adapters of different methods on one backbone: every one of them in one mixed batch
MIXTURE = [
    ("lora", {"rank": 2}),
    ("vpt", {"prompt_length": 2}),
    ("vpt", {"prompt_length": 2, "deep": False}),
    ("ept", {"prompt_length": 3}),
    ("ept", {"prompt_length": 2, "way": "multi_cat", "layers": [1]}),
    ("ept", {"way": "add"}),
    ("ept", {"way": "multiply"}),
    ("ap", {"layer": 1}),
    ("ap", {"layer": 0, "variant": "product"}),
    ("ap", {"layer": 1, "variant": "concat", "prompt_length": 2}),
    ("adapter", {"reduction": 4}),
    ("vp", {}),
    ("vp", {"mode": "pad", "pad_size": 2}),
    ("linear", {}),
    ("mlp", {}),
    ("bias", {}),
    ("norm", {}),
    ("da_vpt", {"prompt_length": 2, "num_proxy_prompts": 2, "bias_set": "kv"}),
]


@pytest.mark.parametrize("name", [n for n in FAMILIES if adapter_for(_base(n)).kind == "vit"])
def test_adapters_of_different_methods_share_a_mixed_batch(name: str) -> None:
    model = promptvit.wrap(_fresh(name), "linear", num_classes=4, adapter_name="first")
    names = ["first"]
    for i, (method, options) in enumerate(MIXTURE):
        model.add_adapter(f"{method}_{i}", method, num_classes=4, **options)
        names.append(f"{method}_{i}")
    for seed, adapter in enumerate(names):
        _perturb(model, adapter, seed)
    model.eval()
    rows = names + names[::-1]
    x = family_input(FAMILY_BUILDS, name, batch=len(rows))
    _check_mixed(model, rows, x)
    with torch.no_grad():  # forward stacks the rows when the class counts agree
        stacked = model(x, adapter_names=rows)
        grouped = model.forward_adapters(x, rows)
    for adapter in names:
        positions = [i for i, n in enumerate(rows) if n == adapter]
        assert torch.equal(stacked[positions], grouped[adapter])


# ---------------------------------------------------------------------- switching, deleting, disabling


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_set_delete_and_disable_adapter_are_exact(method: str, name: str) -> None:
    """Adding, using and deleting another adapter leaves the first one's logits bit for bit; inside
    disable_adapter() the backbone is timm's own, whatever adapters are attached."""
    if not _wraps(method, name):
        pytest.skip(f"{method} does not wrap {name}")
    options = _options(method, name)
    base = _fresh(name)
    reference = copy.deepcopy(base)
    x = family_input(FAMILY_BUILDS, name, batch=2)
    model = promptvit.wrap(
        base, "bias", num_classes=4, adapter_name="first"
    )  # tunes backbone weights in place
    _perturb(model, "first", 0)
    model.eval()
    with torch.no_grad():
        first = model(x)
        state = {key: t.clone() for key, t in model.state_dict().items()}
    model.add_adapter("other", method, num_classes=5, **options)
    _perturb(model, "other", 1)
    model.set_adapter("other")
    with torch.no_grad():
        other = model(x)
        assert other.shape == (2, 5)
        with model.disable_adapter():
            assert torch.equal(model(x), reference(x))
        assert torch.equal(model(x), other)
        model.set_adapter("first")
        assert torch.equal(model(x), first)
        model.set_adapter("other")
        assert torch.equal(model(x), other)
        model.delete_adapter("other")
        assert model.active_adapter == "first" and list(model.adapters) == ["first"]
        assert torch.equal(model(x), first)
        assert model.state_dict().keys() == state.keys()  # every layer, hook and switch of "other" is gone
        assert all(torch.equal(t, state[key]) for key, t in model.state_dict().items())
    assert torch.equal(model.unload()(x), reference(x))


def test_only_the_active_adapter_is_tuned_and_trained() -> None:
    model = promptvit.wrap(_fresh("vit_token"), "vpt", num_classes=4, prompt_length=2)
    model.add_adapter("lora", "lora", num_classes=3, rank=2)
    tuned = {id(p) for _, p in model.tuned_named_parameters()}
    assert tuned == {id(p) for p in model.parameters() if p.requires_grad}
    assert model.num_classes == 4 and model.get_classifier().out_features == 4
    model.set_adapter("lora")
    assert model.num_classes == 3 and model.get_classifier().out_features == 3
    assert {id(p) for _, p in model.tuned_named_parameters()} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    assert not tuned & {id(p) for p in model.parameters() if p.requires_grad}
    model.train()
    with pytest.raises(ValueError, match="inference"):
        model(family_input(FAMILY_BUILDS, "vit_token"), adapter_names=["default", "lora"])


def test_adapter_names_are_checked() -> None:
    model = promptvit.wrap(_fresh("vit_token"), "linear", num_classes=4).eval()
    x = family_input(FAMILY_BUILDS, "vit_token")
    with pytest.raises(ConfigError, match="no adapter named 'nope'"):
        model(x, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="2 images"):
        model(x, adapter_names=["default"])
    with pytest.raises(ConfigError, match="Python identifier"):
        model.add_adapter("my task", "linear")
    with pytest.raises(ConfigError, match="already"):
        model.add_adapter("default", "linear")
    with pytest.raises(ConfigError, match="only adapter"):
        model.delete_adapter("default")
    model.add_adapter("wide", "linear", num_classes=7)
    with pytest.raises(ConfigError, match="different numbers of classes"):
        model(x, adapter_names=["default", "wide"])
    assert {k: v.shape for k, v in model.forward_adapters(x, ["default", "wide"]).items()} == {
        "default": (1, 4),
        "wide": (1, 7),
    }


def test_a_deep_copy_keeps_its_own_adapters() -> None:
    model = promptvit.wrap(_fresh("vit_token"), "vpt", num_classes=4, prompt_length=2)
    model.add_adapter("lora", "lora", num_classes=4, rank=2)
    _perturb(model, "lora", 0)
    model.eval()
    x = family_input(FAMILY_BUILDS, "vit_token")
    clone = copy.deepcopy(model)
    clone.delete_adapter("lora")
    with torch.no_grad():
        assert list(model.adapters) == ["default", "lora"]
        model.set_adapter("lora")
        assert torch.equal(model(x), _alone(copy.deepcopy(model), "lora", x))
        clone.set_adapter("default")
        model.set_adapter("default")
        assert torch.equal(clone(x), model(x))


# ---------------------------------------------------------------------- artifacts of named adapters


def test_save_and_load_adapters_by_name(tmp_path) -> None:
    model = promptvit.wrap(_fresh("vit_token"), "ept", num_classes=4, prompt_length=3)
    model.add_adapter("lora", "lora", num_classes=3, rank=2)
    model.add_adapter("bias", "bias", num_classes=2)
    for seed, adapter in enumerate(model.adapters):
        _perturb(model, adapter, seed)
    model.eval()
    x = family_input(FAMILY_BUILDS, "vit_token")
    expected = {adapter: _alone(model, adapter, x) for adapter in model.adapters}
    model.save_pretrained(tmp_path / "all", selected_adapters=["default", "lora", "bias"])
    model.set_adapter("bias")
    model.save_pretrained(tmp_path / "active")  # the active adapter only
    # each saved adapter is an artifact of its own: promptvit.load reads it, its keys are a lone method's
    for adapter, folder in [
        ("default", "all"),
        ("lora", "all/lora"),
        ("bias", "all/bias"),
        ("bias", "active"),
    ]:
        loaded = promptvit.load(tmp_path / folder, base_model=_fresh("vit_token")).eval()
        assert set(loaded.tuned_state_dict()) == set(model.tuned_state_dict(adapter))
        with torch.no_grad():
            assert torch.equal(loaded(x), expected[adapter]), folder
    # and load_adapter puts them side by side on one backbone again
    again = promptvit.load(tmp_path / "all", base_model=_fresh("vit_token"))
    again.load_adapter(tmp_path / "all" / "lora", adapter_name="lora")
    again.load_adapter(tmp_path / "active", adapter_name="bias")
    again.eval()
    for adapter in ("default", "lora", "bias"):
        assert torch.equal(_alone(again, adapter, x), expected[adapter]), adapter
    _check_mixed(
        again, ["bias", "lora", "default", "bias"], family_input(FAMILY_BUILDS, "vit_token", batch=4)
    )
    other_weights = promptvit.wrap(build(FAMILY_BUILDS, "vit_token", seed=5), "linear")
    with pytest.raises(ArtifactError, match="other backbone weights"):
        other_weights.load_adapter(tmp_path / "all" / "lora", adapter_name="lora")
    assert list(other_weights.adapters) == ["default"]


def test_mixed_lora_batch_equals_pefts_mixed_batch() -> None:
    """Two LoRA adapters (other ranks and parts) with their own heads, one mixed batch: peft's own
    ``adapter_names`` forward on the same factors (our per-part LoRA as peft's block-structured one, as the
    export writes it) is the reference."""
    peft = pytest.importorskip("peft")
    base = _fresh("vit_token")
    plain = copy.deepcopy(base)
    model = promptvit.wrap(base, "lora", num_classes=4, adapter_name="first", rank=2, alpha=3.0)
    model.add_adapter("second", "lora", num_classes=4, rank=3, alpha=5.0, targets=["q", "k", "v"])
    for seed, adapter in enumerate(("first", "second")):
        _perturb(model, adapter, seed)
    model.eval()
    plain.reset_classifier(4)
    reference = None
    for adapter, (rank, alpha, parts) in {"first": (2, 3.0, 2), "second": (3, 5.0, 3)}.items():
        config = peft.LoraConfig(
            r=parts * rank, lora_alpha=parts * alpha, target_modules=["qkv"], modules_to_save=["head"]
        )
        if reference is None:
            reference = peft.get_peft_model(plain, config, adapter_name=adapter)
        else:
            reference.add_adapter(adapter, config)
    timm_model = reference.base_model.model
    with torch.no_grad():
        for block, ours in zip(timm_model.blocks, model.backbone.blocks, strict=True):
            for adapter in ("first", "second"):
                factors = ours.attn.qkv.lora[adapter]
                block.attn.qkv.lora_A[adapter].weight.copy_(
                    factors.lora_A.reshape(-1, factors.lora_A.shape[-1])
                )
                block.attn.qkv.lora_B[adapter].weight.copy_(factors.stacked_lora_B())
        for adapter in ("first", "second"):
            timm_model.head.modules_to_save[adapter].load_state_dict(
                model.backbone.head.heads[adapter].state_dict()
            )
    reference.eval()
    names = ["first", "second", "second", "first", "second"]
    x = family_input(FAMILY_BUILDS, "vit_token", batch=5)
    with torch.no_grad():
        expected = reference(x, adapter_names=names)
        torch.testing.assert_close(model(x, adapter_names=names), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(expected[0], reference(x[:1], adapter_names=["second"])[0], atol=1e-3)
