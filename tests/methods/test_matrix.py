"""Every registered method x every tiny backbone gets the same checks (timm/peft-style test matrix)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import promptvit
from promptvit.artifact import ArtifactError
from promptvit.backbones.vit import supports_selected_rows as supports_selected_tokens
from tests.conftest import (
    TINY_BACKBONES,
    build_tiny,
    logits_and_grads,
    original_head_ids,
    raw_names,
    tiny_input,
)

CASES = [(m, k) for m in promptvit.available_methods() for k in sorted(TINY_BACKBONES)]


def _wrapped(method: str, kind: str):
    cls = promptvit.get_method(method)
    base = build_tiny(kind)
    if promptvit.geometry_of(base).kind not in cls.supported_kinds:
        pytest.skip(f"{method} does not support {kind}")
    return promptvit.wrap(base, method, num_classes=4, **cls.test_options)


@pytest.mark.parametrize("method,kind", CASES)
def test_trainable_set_matches_formula(method: str, kind: str) -> None:
    cls = promptvit.get_method(method)
    base = build_tiny(kind, num_classes=4)
    if promptvit.geometry_of(base).kind not in cls.supported_kinds:
        pytest.skip(f"{method} does not support {kind}")
    original = {id(p) for p in base.parameters()}
    model = promptvit.wrap(base, method, **cls.test_options)
    head = model.get_classifier()
    assert all(p.requires_grad for p in head.parameters())
    summary = model.parameter_summary()
    assert summary["head"] == head.in_features * 4 + 4
    expected = cls.expected_num_parameters(model.config, model.geometry)
    if expected is not None:
        assert summary["method"] == expected
    # Trainable = head + the backbone parameters the method names + parameters the method created.
    named = {id(p) for p in model.method.backbone_parameters_to_tune(model.backbone)} - original_head_ids(model)
    head_ids = {id(p) for p in head.parameters()}
    for name, p in model.named_parameters():
        is_new = id(p) not in original and id(p) not in head_ids
        assert p.requires_grad == (id(p) in head_ids or id(p) in named or is_new), name


@pytest.mark.parametrize("method,kind", CASES)
def test_step_changes_only_tuned_parameters(method: str, kind: str) -> None:
    model = _wrapped(method, kind)
    model.train()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}  # state-dict names, as `changed`
    optimizer = torch.optim.SGD([p for _, p in model.tuned_named_parameters()], lr=0.5)
    loss = torch.nn.functional.cross_entropy(model(tiny_input(kind, batch=4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # Besides tuned parameters, only buffers of modules the method put in train mode (BatchNorm) may move.
    training_buffers = {
        f"{name}.{b}" if name else b
        for name, module in model.named_modules()
        if module.training
        for b, _ in module.named_buffers(recurse=False)
    }
    assert changed - tuned <= training_buffers, changed - tuned - training_buffers
    assert changed & tuned, "the step changed no tuned parameter"
    head = raw_names(model, model.get_classifier().parameters())
    assert changed & head
    if model.parameter_summary()["method"] > 0:
        assert (changed & tuned) - head, "method parameters did not move"


def _train_a_little(model, kind: str) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for _, p in model.tuned_named_parameters()], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(
            model(tiny_input(kind, batch=4)), torch.tensor([0, 1, 2, 3])
        ).backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("method,kind", CASES)
def test_save_load_round_trip_is_exact(method: str, kind: str, tmp_path) -> None:
    model = _wrapped(method, kind)
    _train_a_little(model, kind)
    x = tiny_input(kind)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "artifact")
    saved = set(model.tuned_state_dict())
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "artifact" / "adapter_model.safetensors")) == saved
    loaded = promptvit.load(tmp_path / "artifact", base_model=build_tiny(kind)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("method,kind", CASES)
def test_load_rebuilds_backbone_from_local_weights(method: str, kind: str, tmp_path) -> None:
    arch, options, _ = TINY_BACKBONES[kind]
    weights = tmp_path / "base.safetensors"
    save_file(build_tiny(kind).state_dict(), str(weights))
    base = promptvit.create_backbone(arch, weights=weights, num_classes=3, **options)
    cls = promptvit.get_method(method)
    if promptvit.geometry_of(base).kind not in cls.supported_kinds:
        pytest.skip(f"{method} does not support {kind}")
    model = promptvit.wrap(base, method, num_classes=4, **cls.test_options)
    _train_a_little(model, kind)
    model.save_pretrained(tmp_path / "artifact")
    loaded = promptvit.load(tmp_path / "artifact").eval()  # no base given: rebuilt from the recorded file
    x = tiny_input(kind)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("method,kind", CASES)
def test_wrong_backbone_is_refused(method: str, kind: str, tmp_path) -> None:
    model = _wrapped(method, kind)
    model.save_pretrained(tmp_path / "artifact")
    other_kind = "vit_avg" if kind == "vit_token" else "vit_token"
    with pytest.raises(ArtifactError, match="geometry"):
        promptvit.load(tmp_path / "artifact", base_model=build_tiny(other_kind))
    with pytest.raises(ArtifactError, match="other backbone weights"):
        promptvit.load(tmp_path / "artifact", base_model=build_tiny(kind, seed=123))


@pytest.mark.parametrize("method,kind", CASES)
def test_identity_at_init_reproduces_timm(method: str, kind: str) -> None:
    cls = promptvit.get_method(method)
    if not getattr(cls, "identity_at_init", False):
        pytest.skip(f"{method} changes the forward at initialisation")
    base = build_tiny(kind, num_classes=4)
    if promptvit.geometry_of(base).kind not in cls.supported_kinds:
        pytest.skip(f"{method} does not support {kind}")
    reference = copy.deepcopy(base)
    model = promptvit.wrap(base, method, **cls.test_options).eval()
    x = tiny_input(kind)
    with torch.no_grad():
        expected = reference(x)
        with model.all_token_outputs():
            assert torch.equal(model(x), expected)
        # the class-token readout computes the same function with fewer rows: equal up to float rounding
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", promptvit.available_methods())
def test_class_token_readout_gives_the_logits_and_gradients_of_the_full_forward(method: str) -> None:
    """The logits path runs the last block for the class-token row only; float64 pins the maths exactly."""
    cls = promptvit.get_method(method)
    if "vit" not in cls.supported_kinds:
        pytest.skip(f"{method} does not support ViTs")
    model = promptvit.wrap(build_tiny("vit_token"), method, num_classes=4, **cls.test_options).double().eval()
    with torch.no_grad():  # every tuned tensor away from its initial value, so that it shapes the logits
        for _, p in model.tuned_named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = tiny_input("vit_token").double()
    rows_at_norm = []
    model.backbone.norm.register_forward_pre_hook(lambda m, args: rows_at_norm.append(args[0].shape[1]))
    fast, fast_grads = logits_and_grads(model, x)
    with model.all_token_outputs():
        full, full_grads = logits_and_grads(model, x)
    last = model.backbone.blocks[-1]
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in last.modules() if m is not last)
    if supports_selected_tokens(last) and not hooked:
        assert rows_at_norm[0] == 1, f"{method}: the last block computed rows the head does not read"
    assert rows_at_norm[-1] > 1
    torch.testing.assert_close(fast, full, rtol=1e-12, atol=1e-12)
    for (name, _), fast_grad, full_grad in zip(
        model.tuned_named_parameters(), fast_grads, full_grads, strict=True
    ):
        torch.testing.assert_close(fast_grad, full_grad, rtol=1e-12, atol=1e-12, msg=f"{method}: {name}")


def test_class_token_readout_stands_aside_for_average_pooling_and_hooks() -> None:
    x = tiny_input("vit_token")
    model = promptvit.wrap(build_tiny("vit_token"), "linear", num_classes=4).eval()
    rows_at_norm = []
    model.backbone.norm.register_forward_pre_hook(lambda m, args: rows_at_norm.append(args[0].shape[1]))
    with torch.no_grad():
        model(x)
        handle = model.backbone.blocks[-1].mlp.register_forward_hook(lambda m, args, out: None)
        with model.all_token_outputs():  # code that hooks into the last block itself asks for every row
            model(x)
        handle.remove()
        model.backbone.reset_classifier(4, global_pool="avg")
        model(x)
        avg = promptvit.wrap(build_tiny("vit_avg"), "linear", num_classes=4).eval()
        avg.backbone.norm.register_forward_pre_hook(lambda m, args: rows_at_norm.append(args[0].shape[1]))
        avg(tiny_input("vit_avg"))
    n_token, n_avg = (promptvit.geometry_of(build_tiny(k)).num_tokens for k in ("vit_token", "vit_avg"))
    assert rows_at_norm == [1, n_token, n_token, n_avg]


@pytest.mark.parametrize("method,kind", CASES)
def test_deepcopy_is_independent(method: str, kind: str) -> None:
    """Copies (used for best-epoch snapshots) must not share tuned tensors or hooks with the original."""
    model = _wrapped(method, kind).eval()
    clone = copy.deepcopy(model)
    x = tiny_input(kind)
    with torch.no_grad():
        for _, p in model.tuned_named_parameters():
            p.add_(torch.randn_like(p))
        assert not torch.equal(model(x), clone(x))


@pytest.mark.parametrize("method,kind", CASES)
def test_disable_adapter_gives_timms_output_and_comes_back(method: str, kind: str) -> None:
    """Inside ``disable_adapter()`` the model is timm's own pre-wrap backbone, bit for bit; outside, the method."""
    cls = promptvit.get_method(method)
    base = build_tiny(kind)
    if promptvit.geometry_of(base).kind not in cls.supported_kinds:
        pytest.skip(f"{method} does not support {kind}")
    reference = copy.deepcopy(base)
    model = promptvit.wrap(base, method, num_classes=4, **cls.test_options)
    _train_a_little(model, kind)
    x = tiny_input(kind)
    with torch.no_grad():
        tuned = model(x)
        with model.disable_adapter():
            assert torch.equal(model.backbone(x), reference(x))
            assert torch.equal(model(x), reference(x))
        assert torch.equal(model(x), tuned)


@pytest.mark.parametrize("method,kind", CASES)
def test_unload_gives_back_the_original_backbone(method: str, kind: str) -> None:
    cls = promptvit.get_method(method)
    base = build_tiny(kind)
    if promptvit.geometry_of(base).kind not in cls.supported_kinds:
        pytest.skip(f"{method} does not support {kind}")
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    flags = {name: p.requires_grad for name, p in base.named_parameters()}
    reference = copy.deepcopy(base)
    model = promptvit.wrap(base, method, num_classes=4, **cls.test_options)
    _train_a_little(model, kind)
    if method == "lora":
        model.merge()  # unload must also undo a merge exactly
    unloaded = model.unload()
    assert unloaded is base
    after = unloaded.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert {name: p.requires_grad for name, p in unloaded.named_parameters()} == flags
    x = tiny_input(kind)
    with torch.no_grad():
        assert torch.equal(unloaded(x), reference(x))
    promptvit.wrap(unloaded, method, num_classes=4, **cls.test_options)  # free to be wrapped again


def test_wrapping_the_same_backbone_twice_is_refused() -> None:
    base = build_tiny("vit_token")
    first = promptvit.wrap(base, "vpt", num_classes=4, prompt_length=2).eval()
    x = tiny_input("vit_token")
    with torch.no_grad():
        expected = first(x)
    with pytest.raises(promptvit.ConfigError, match="already wrapped"):
        promptvit.wrap(base, "lora", num_classes=4)
    with torch.no_grad():
        assert torch.equal(first(x), expected)


@pytest.mark.parametrize("method,kind", CASES)
def test_serving_equals_per_task_inference(method: str, kind: str) -> None:
    """Every method is served (batched through its declared changes, or per task) with its own logits."""
    from promptvit.serving import MultiTaskModel

    model = _wrapped(method, kind).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # tuned tensors away from their initial values, so that each one shapes the logits
        for _, p in model.tuned_named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    plain = promptvit.wrap(build_tiny(kind), "linear", num_classes=3).eval()
    served = MultiTaskModel(build_tiny(kind), [model, plain], names=["task", "plain"])
    # a method that tunes backbone weights in place runs in a forward of its own; every other one shares
    in_place = model.method.trains_backbone or any(True for _ in model.method.backbone_parameters_to_tune(model.backbone))
    assert served.grouped_tasks == (["task"] if in_place else [])
    x = tiny_input(kind, batch=3)
    out = served(x)
    with torch.no_grad():
        torch.testing.assert_close(out["task"], model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["plain"], plain(x), rtol=1e-5, atol=1e-5)


def test_a_deep_copy_disables_and_unloads_its_own_backbone() -> None:
    base = build_tiny("vit_token")
    reference = copy.deepcopy(base)
    model = promptvit.wrap(base, "bias", num_classes=4)
    _train_a_little(model, "vit_token")
    clone = copy.deepcopy(model)
    x = tiny_input("vit_token")
    with torch.no_grad():
        tuned = model(x)
        with clone.disable_adapter():
            assert torch.equal(clone(x), reference(x))
            assert torch.equal(model(x), tuned)  # the original keeps its method and weights
        unloaded = clone.unload()
        assert unloaded is not base and torch.equal(unloaded(x), reference(x))
        assert torch.equal(model(x), tuned)
