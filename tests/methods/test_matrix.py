"""The method matrix: every registered method on every tiny build of every registered backbone family.

The pairs come from the registries (tests/families.py: the methods' registry times the family adapters'
``tiny_builds``) and whether a pair must wrap or be refused from the method's own ``supports()``: a supported
pair passes every check below, a refused one raises a one-line ``ConfigError`` that names the method and the
backbone. Float tolerances are the method's own ``rounding`` declaration. Each check is a function of
(method, build name), so a method or family registered later gets all of them with no edit here
(``test_a_new_method_and_family_get_the_whole_matrix`` proves it).
"""

from __future__ import annotations

import copy
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import promptvit
from promptvit.artifact import ArtifactError
from promptvit.backbones import unregister_adapter
from promptvit.methods.base import ConfigError
from promptvit.serving import MultiTaskModel
from tests.conftest import logits_and_grads, original_head_ids, raw_names
from tests.families import (
    build_tiny,
    family_adapter,
    family_builds,
    method_cases,
    method_options,
    representatives,
    tiny_input,
    visible_build,
)

SUPPORTED, REFUSED = method_cases()


def _wrap(method: str, name: str, base: torch.nn.Module | None = None) -> promptvit.PromptModel:
    base = visible_build(name) if base is None else base
    return promptvit.wrap(base, method, num_classes=4, **method_options(method, name))


def _train_a_little(model: promptvit.PromptModel, name: str, steps: int = 2) -> None:
    model.train()
    optimizer = torch.optim.SGD([p for _, p in model.tuned_named_parameters()], lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(tiny_input(name, batch=4)), torch.tensor([0, 1, 2, 3])).backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def _perturb(model: promptvit.PromptModel, scale: float = 0.3, seed: int = 0) -> None:
    """Every tuned tensor away from its (often zero) initial value, so that each one shapes the logits."""
    generator = torch.Generator().manual_seed(seed)
    for _, p in model.tuned_named_parameters():
        p.add_(scale * torch.randn(p.shape, generator=generator))


def _head_ids(model: promptvit.PromptModel) -> set[int]:
    return {id(p) for m in [model.get_classifier(), *model.extra_heads()] for p in m.parameters()}


def standard_vit(name: str) -> bool:
    """Whether the build is timm's standard ViT: standard pre-norm blocks (two LayerNorms, fused qkv with or
    without bias, two-layer MLP) and nothing else but the patch embedding, prefix and position tokens, the
    final norm and the head, counted from its parameters."""
    adapter = family_adapter(name)
    if adapter.kind != "vit":
        return False
    g = adapter.geometry()
    head = {id(p) for m in adapter.classifier_modules() for p in m.parameters()}
    body = sum(p.numel() for p in adapter.model.parameters() if id(p) not in head)
    d = g.embed_dim
    embed = 3 * g.patch_size[0] * g.patch_size[1] * d + d + (g.num_prefix_tokens + g.pos_embed_len) * d
    blocks = [sum(p.numel() for p in block.parameters()) for block in adapter.blocks]
    return blocks == [g.vit_block_parameters()] * g.depth and body == embed + sum(blocks) + 2 * d


# ---------------------------------------------------------------------- the checks, one pair at a time


def check_refused(method: str, name: str) -> None:
    """A method that declares it does not support the family is refused with one line naming both."""
    with pytest.raises(ConfigError) as refusal:
        _wrap(method, name)
    message = str(refusal.value)
    architecture = type(family_adapter(name).model).__name__
    assert f"'{method}'" in message and architecture in message and "\n" not in message, message
    note = family_adapter(name).kind_note
    assert not note or note in message, message


def check_tuned_set_and_step(method: str, name: str) -> None:
    """Tuned = the heads, the backbone parameters the method names and the ones it created (with the paper's
    count where the method has one); one step changes tuned tensors only, the method's among them."""
    cls = promptvit.get_method(method)
    base = visible_build(name)
    original = {id(p) for p in base.parameters()}
    model = _wrap(method, name, base)
    named = {id(p) for p in model.method.backbone_parameters_to_tune(model.backbone)} - original_head_ids(model)
    heads = _head_ids(model)
    for parameter_name, p in model.named_parameters():
        is_new = id(p) not in original and id(p) not in heads
        assert p.requires_grad == (id(p) in heads or id(p) in named or is_new), parameter_name
    summary = model.parameter_summary()
    head = model.get_classifier()
    assert summary["head"] == sum(p.numel() for m in [head, *model.extra_heads()] for p in m.parameters())
    expected = cls.expected_num_parameters(model.config, model.geometry)
    if expected is not None and (not cls.counts_standard_blocks or standard_vit(name)):
        assert summary["method"] == expected

    model.train()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    tuned = {n for n, p in model.named_parameters() if p.requires_grad}  # state-dict names, as `changed`
    # besides tuned parameters, only buffers of modules the method puts in train mode (BatchNorm) may move
    training_buffers = {
        f"{module_name}.{b}" if module_name else b
        for module_name, module in model.named_modules()
        if module.training
        for b, _ in module.named_buffers(recurse=False)
    }
    _train_a_little(model, name, steps=1)
    changed = {n for n, t in model.state_dict().items() if not torch.equal(before[n], t)}
    assert changed - tuned <= training_buffers, changed - tuned - training_buffers
    head_names = raw_names(model, head.parameters())
    assert changed & head_names, "the step did not move the head"
    if summary["method"] > 0:
        assert (changed & tuned) - head_names, "method parameters did not move"


def check_identity_at_init(method: str, name: str) -> None:
    """A method that declares ``identity_at_init`` computes timm's own forward when freshly wrapped (within its
    declared rounding); the class-token readout computes it with fewer rows, equal up to float rounding."""
    at_init = promptvit.get_method(method).rounding.at_init
    base = visible_build(name)
    base.reset_classifier(4)
    reference = copy.deepcopy(base)
    model = promptvit.wrap(base, method, **method_options(method, name)).eval()
    x = tiny_input(name, batch=4)
    with torch.no_grad():
        expected = reference(x)
        with model.all_token_outputs():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=at_init)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=max(at_init, 1e-6))


def check_artifact_round_trip(method: str, name: str, tmp_path) -> None:
    """save_pretrained then load gives the same logits bit for bit, on a given base and on one rebuilt from the
    recorded weights file; other weights and another geometry are refused."""
    weights = tmp_path / "base.safetensors"
    save_file(visible_build(name).state_dict(), str(weights))
    arch, options, _ = family_builds()[name]
    base = promptvit.create_backbone(arch, weights=weights, num_classes=3, **options)
    model = _wrap(method, name, base)
    _train_a_little(model, name)
    x = tiny_input(name)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "artifact")
    saved = load_file(tmp_path / "artifact" / "adapter_model.safetensors")
    assert set(saved) == set(model.tuned_state_dict())
    for loaded in (
        promptvit.load(tmp_path / "artifact", base_model=visible_build(name)),
        promptvit.load(tmp_path / "artifact"),  # no base given: rebuilt from the recorded weights file
    ):
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), expected)
    with pytest.raises(ArtifactError, match="other backbone weights"):
        promptvit.load(tmp_path / "artifact", base_model=visible_build(name, seed=1))
    geometry = family_adapter(name).geometry()
    other = next(n for n in sorted(family_builds()) if family_adapter(n).geometry() != geometry)
    with pytest.raises(ArtifactError, match="another backbone geometry"):
        promptvit.load(tmp_path / "artifact", base_model=visible_build(other))


def check_disable_and_unload(method: str, name: str) -> None:
    """Inside ``disable_adapter()`` the model is the pre-wrap backbone bit for bit, and the method after it;
    ``unload()`` (after a merge where the method merges) gives back that backbone, free to be wrapped again."""
    cls = promptvit.get_method(method)
    base = visible_build(name)
    before = {key: t.clone() for key, t in base.state_dict().items()}
    flags = {key: p.requires_grad for key, p in base.named_parameters()}
    reference = copy.deepcopy(base)
    model = _wrap(method, name, base)
    _train_a_little(model, name)
    x = tiny_input(name)
    with torch.no_grad():
        tuned = model(x)
        with model.disable_adapter():
            assert torch.equal(model.backbone(x), reference(x))
            assert torch.equal(model(x), reference(x))
        assert torch.equal(model(x), tuned)
    if cls.merges():
        model.merge()  # unload must also undo a merge exactly
    unloaded = model.unload()
    assert unloaded is base
    after = unloaded.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)
    assert {key: p.requires_grad for key, p in unloaded.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(unloaded(x), reference(x))
    _wrap(method, name, unloaded)


def check_deepcopy(method: str, name: str) -> None:
    """Copies (best-epoch snapshots) share no tuned tensor, layer or hook with the original."""
    model = _wrap(method, name).eval()
    clone = copy.deepcopy(model)
    x = tiny_input(name)
    with torch.no_grad():
        _perturb(model, scale=1.0)
        assert not torch.equal(model(x), clone(x))


def check_serving(method: str, name: str) -> None:
    """Served beside a linear probe on one backbone, the method gives its own logits (within its declared
    mixed-batch rounding); one that tunes backbone weights in place runs in a forward of its own."""
    model = _wrap(method, name).eval()
    _perturb(model)
    plain = promptvit.wrap(visible_build(name), "linear", num_classes=3).eval()
    served = MultiTaskModel(visible_build(name), [model, plain], names=["task", "plain"])
    in_place = model.method.trains_backbone or any(True for _ in model.method.backbone_parameters_to_tune(model.backbone))
    assert served.grouped_tasks == (["task"] if in_place else [])
    x = tiny_input(name, batch=3)
    tolerance = promptvit.get_method(method).rounding.mixed_batch
    with torch.no_grad():
        out = served(x)
        torch.testing.assert_close(out["task"], model(x), rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(out["plain"], plain(x), rtol=tolerance, atol=tolerance)


def check_cached_prefix(method: str, name: str) -> None:
    """Where the frozen prefix can be cached (``cache_cut() > 0``), resuming from it gives the forward's logits
    within the method's declared rounding."""
    model = _wrap(method, name).eval()
    _perturb(model, scale=0.1)
    cut = model.cache_cut()
    assert 0 <= cut <= model.geometry.depth
    assert cut <= model.method.tuned_from_block()  # nothing the method tunes is cached
    if cut == 0:
        return
    x = tiny_input(name)
    tolerance = promptvit.get_method(method).rounding.cached
    with torch.no_grad():
        resumed = model.forward_from_block(model.forward_prefix(x, cut), cut)
        torch.testing.assert_close(resumed, model(x), rtol=0, atol=tolerance)


def check_merge(method: str, name: str) -> None:
    """A merged method gives its unmerged logits within its declared rounding; unmerge restores them exactly."""
    model = _wrap(method, name).eval()
    x = tiny_input(name)
    with torch.no_grad():
        initial = model(x)
        for parameter_name, p in model.tuned_named_parameters():
            if not parameter_name.startswith("head"):  # the head stays: only the method can move the logits
                p.add_(0.1 * torch.randn_like(p))
        unmerged = model(x)
        model.merge()
        merged = model(x)
        model.unmerge()
        assert torch.equal(model(x), unmerged)
    assert not torch.allclose(unmerged, initial, atol=1e-4), "the method's update does not reach the logits"
    tolerance = promptvit.get_method(method).rounding.merged
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=tolerance)


def check_class_token_readout(method: str, name: str) -> None:
    """The logits path runs the last block for the class-token row only where the head reads nothing else; in
    float64 its logits and gradients are the full forward's."""
    model = _wrap(method, name).double().eval()
    with torch.no_grad():  # every tuned tensor away from its initial value, so that it shapes the logits
        for _, p in model.tuned_named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = tiny_input(name).double()
    rows_at_norm = []
    model.adapter.final_norm.register_forward_pre_hook(lambda m, args: rows_at_norm.append(args[0].shape[1]))
    fast, fast_grads = logits_and_grads(model, x)
    with model.all_token_outputs():
        full, full_grads = logits_and_grads(model, x)
    assert rows_at_norm[-1] > 1
    torch.testing.assert_close(fast, full, rtol=1e-12, atol=1e-12)
    for (parameter_name, _), fast_grad, full_grad in zip(
        model.tuned_named_parameters(), fast_grads, full_grads, strict=True
    ):
        torch.testing.assert_close(fast_grad, full_grad, rtol=1e-12, atol=1e-12, msg=parameter_name)


def reads_class_token(name: str) -> bool:
    adapter = family_adapter(name)
    return adapter.kind == "vit" and adapter.reads_class_token_only()


#: every check, with which pairs it applies to (from the method's and the family's declarations)
CHECKS: list[tuple[Callable, Callable[[str, str], bool]]] = [
    (check_tuned_set_and_step, lambda method, name: True),
    (check_identity_at_init, lambda method, name: promptvit.get_method(method).identity_at_init),
    (check_artifact_round_trip, lambda method, name: True),
    (check_disable_and_unload, lambda method, name: True),
    (check_deepcopy, lambda method, name: True),
    (check_serving, lambda method, name: True),
    (check_cached_prefix, lambda method, name: True),
    (check_merge, lambda method, name: promptvit.get_method(method).merges()),
    (check_class_token_readout, lambda method, name: reads_class_token(name)),
]


def cases(check: Callable) -> list[tuple[str, str]]:
    """The supported pairs ``check`` applies to."""
    applies = next(rule for fn, rule in CHECKS if fn is check)
    return [(method, name) for method, name in SUPPORTED if applies(method, name)]


def run_checks(method: str, name: str, tmp_path) -> list[str]:
    """Every check that applies to the pair (the refusal alone for a refused pair); the names of those run."""
    if not promptvit.get_method(method).supports(family_adapter(name)):
        check_refused(method, name)
        return [check_refused.__name__]
    ran = []
    for check, applies in CHECKS:
        if applies(method, name):
            if check is check_artifact_round_trip:
                folder = tmp_path / f"{method}-{name}"
                folder.mkdir()
                check(method, name, folder)
            else:
                check(method, name)
            ran.append(check.__name__)
    return ran


# ---------------------------------------------------------------------- the matrix


def test_the_matrix_covers_every_method_and_family() -> None:
    methods = {method for method, _ in SUPPORTED + REFUSED}
    builds = {name for _, name in SUPPORTED + REFUSED}
    assert methods == set(promptvit.available_methods()) and builds == set(family_builds())
    assert {type(family_adapter(name)) for name in builds} == {
        adapter for adapter in promptvit.backbones.registered_adapters().values() if set(adapter.tiny_builds) & builds
    }


@pytest.mark.parametrize("method,name", REFUSED)
def test_refused_pairs_say_why(method: str, name: str) -> None:
    check_refused(method, name)


@pytest.mark.parametrize("method,name", cases(check_tuned_set_and_step))
def test_tuned_set_and_step(method: str, name: str) -> None:
    check_tuned_set_and_step(method, name)


@pytest.mark.parametrize("method,name", cases(check_identity_at_init))
def test_identity_at_init_reproduces_timm(method: str, name: str) -> None:
    check_identity_at_init(method, name)


@pytest.mark.parametrize("method,name", cases(check_artifact_round_trip))
def test_artifact_round_trip_is_exact(method: str, name: str, tmp_path) -> None:
    check_artifact_round_trip(method, name, tmp_path)


@pytest.mark.parametrize("method,name", cases(check_disable_and_unload))
def test_disable_adapter_and_unload_give_timms_backbone(method: str, name: str) -> None:
    check_disable_and_unload(method, name)


@pytest.mark.parametrize("method,name", cases(check_deepcopy))
def test_deepcopy_is_independent(method: str, name: str) -> None:
    check_deepcopy(method, name)


@pytest.mark.parametrize("method,name", cases(check_serving))
def test_serving_equals_per_task_inference(method: str, name: str) -> None:
    check_serving(method, name)


@pytest.mark.parametrize("method,name", cases(check_cached_prefix))
def test_forward_from_the_cached_prefix_equals_the_forward(method: str, name: str) -> None:
    check_cached_prefix(method, name)


@pytest.mark.parametrize("method,name", cases(check_merge))
def test_merged_equals_unmerged(method: str, name: str) -> None:
    check_merge(method, name)


@pytest.mark.parametrize("method,name", cases(check_class_token_readout))
def test_class_token_readout_gives_the_logits_and_gradients_of_the_full_forward(method: str, name: str) -> None:
    check_class_token_readout(method, name)


# ---------------------------------------------------------------------- single cases


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
        avg = promptvit.wrap(build_tiny("vit_avg_no_cls"), "linear", num_classes=4).eval()
        avg.backbone.norm.register_forward_pre_hook(lambda m, args: rows_at_norm.append(args[0].shape[1]))
        avg(tiny_input("vit_avg_no_cls"))
    n_token, n_avg = (promptvit.geometry_of(build_tiny(k)).num_tokens for k in ("vit_token", "vit_avg_no_cls"))
    assert rows_at_norm == [1, n_token, n_token, n_avg]


def test_the_class_token_readout_computes_one_row_in_the_last_block() -> None:
    """Where the last block can compute selected rows and nothing hooks into it, the head's row is all it runs."""
    for method in promptvit.available_methods():
        if not promptvit.get_method(method).supports(family_adapter("vit_token")):
            continue
        model = _wrap(method, "vit_token").eval()
        rows_at_norm = []
        model.adapter.final_norm.register_forward_pre_hook(lambda m, args, rows=rows_at_norm: rows.append(args[0].shape[1]))
        with torch.no_grad():
            model(tiny_input("vit_token"))
        last = len(model.adapter.blocks) - 1
        block = model.adapter.blocks[last]
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in block.modules() if m is not block)
        if model.adapter.supports_selected_rows(last) and not hooked:
            assert rows_at_norm == [1], f"{method}: the last block computed rows the head does not read"


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


# ---------------------------------------------------------------------- a new method and family join by themselves

_NEW_METHOD = '''
"""A method of its own: the biases of the last block (or stage) are tuned."""

import dataclasses

from promptvit.backbones import adapter_for
from promptvit.methods import Method, MethodConfig, register_method


@dataclasses.dataclass
class LastBiasConfig(MethodConfig):
    pass


@register_method
class LastBias(Method):
    name = "test_last_bias"
    config_class = LastBiasConfig
    supported_kinds = ("vit", "cnn")
    identity_at_init = True

    def backbone_parameters_to_tune(self, backbone):
        adapter = adapter_for(backbone)
        last = adapter.blocks[-1:] if adapter.kind == "vit" else adapter.stages[-1:]
        return (p for module in last for n, p in module.named_parameters() if n.endswith("bias"))
'''

_NEW_FAMILY = '''
"""A family of its own: timm's RegNet, seen as its stem convolution and stages s1..s4."""

from timm.models.regnet import RegNet

from promptvit.backbones import register_adapter
from promptvit.backbones.cnn import CNNAdapter


@register_adapter(RegNet)
class TestRegNetAdapter(CNNAdapter):
    family = "TestRegNet"
    tiny_builds = {"test_regnet": ("regnetx_002", {}, 32)}

    def input_module(self):
        return self.model.stem.conv

    @property
    def stages(self):
        return [self.model.s1, self.model.s2, self.model.s3, self.model.s4]
'''


def _install(tmp_path, package: str, files: dict[str, str], monkeypatch) -> list:
    """Write ``files`` as a package in ``tmp_path`` and import each module (registering what it declares)."""
    import importlib

    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    for module, text in files.items():
        (tmp_path / package / f"{module}.py").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    return [importlib.import_module(f"{package}.{module}") for module in files]


def _forget(package: str) -> None:
    for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[module]


def test_a_new_method_and_family_get_the_whole_matrix(tmp_path, monkeypatch) -> None:
    """One file for a method, one for a family, each registered through the public API: the matrix's pairs
    (collected from the registries as above) include them, and every check runs and passes on them. The new
    method is paired with every build; its checks run here on one build per family (``representatives()``),
    the new family's on every method."""
    from timm.models.regnet import RegNet

    assert RegNet not in promptvit.backbones.registered_adapters(), "pick a timm class no family registers"
    _install(tmp_path, "new_entries", {"last_bias": _NEW_METHOD, "regnet_family": _NEW_FAMILY}, monkeypatch)
    try:
        supported, refused = method_cases()
        assert {n for m, n in supported if m == "test_last_bias"} == set(family_builds())
        assert {m for m, n in supported if n == "test_regnet"} >= {"test_last_bias", "linear", "bias", "ap"}
        assert ("vpt", "test_regnet") in refused  # VPT declares it needs token models: refused, not skipped
        assert type(family_adapter("test_regnet")).family == "TestRegNet"
        new = [
            (m, n)
            for m, n in supported + refused
            if n == "test_regnet" or (m == "test_last_bias" and n in representatives())
        ]
        ran = set()
        for method, name in new:
            ran.update(run_checks(method, name, tmp_path))
        # every check that applies to one of the new pairs ran (merging is LoRA's, which needs blocks)
        applies = {check.__name__ for check, rule in CHECKS if any(rule(m, n) for m, n in new if (m, n) in supported)}
        assert ran == applies | {check_refused.__name__} and len(applies) == len(CHECKS) - 1
    finally:
        promptvit.methods.unregister_method("test_last_bias")
        unregister_adapter(RegNet)
        _forget("new_entries")
    assert "test_last_bias" not in promptvit.available_methods()
    assert "test_regnet" not in family_builds()


_BROKEN_METHODS = {
    # claims to compute timm's forward at init, but shifts the patch embedding's output
    "check_identity_at_init": '''
import dataclasses

from promptvit.methods import MethodConfig, register_method
from promptvit.methods.linear import Linear


@dataclasses.dataclass
class ShiftConfig(MethodConfig):
    pass


@register_method
class Shift(Linear):
    name = "test_broken"
    config_class = ShiftConfig

    def attach(self, backbone):
        from promptvit.backbones import adapter_for

        self.injections.hook(adapter_for(backbone).input_module(), lambda m, args, out: out + 0.5)
''',
    # changes a frozen backbone weight behind the ledger's back: disable and unload cannot give it back
    "check_disable_and_unload": '''
import dataclasses

import torch

from promptvit.methods import MethodConfig, register_method
from promptvit.methods.linear import Linear


@dataclasses.dataclass
class ScribbleConfig(MethodConfig):
    pass


@register_method
class Scribble(Linear):
    name = "test_broken"
    config_class = ScribbleConfig
    identity_at_init = False

    def attach(self, backbone):
        with torch.no_grad():
            next(backbone.parameters()).mul_(1.5)
''',
    # declares support for every backbone but refuses CNNs when attached
    "check_tuned_set_and_step": '''
import dataclasses

from promptvit.methods import ConfigError, MethodConfig, register_method
from promptvit.methods.linear import Linear


@dataclasses.dataclass
class PickyConfig(MethodConfig):
    pass


@register_method
class Picky(Linear):
    name = "test_broken"
    config_class = PickyConfig

    def attach(self, backbone):
        if self.geometry.kind == "cnn":
            raise ConfigError("test_broken: no CNNs after all")
''',
}


@pytest.mark.parametrize("failing_check", sorted(_BROKEN_METHODS))
def test_the_matrix_catches_a_method_that_breaks_the_contract(failing_check: str, tmp_path, monkeypatch) -> None:
    """Each broken method joins the matrix the same way, and the check it breaks fails on it."""
    _install(tmp_path, "broken_entries", {"broken": _BROKEN_METHODS[failing_check]}, monkeypatch)
    try:
        assert ("test_broken", "resnet") in method_cases()[0]
        # the refusal that its declaration does not announce is an error of a supported pair
        name, error = ("resnet", ConfigError) if failing_check == "check_tuned_set_and_step" else ("vit_token", AssertionError)
        with pytest.raises(error):
            globals()[failing_check]("test_broken", name)
    finally:
        promptvit.methods.unregister_method("test_broken")
        _forget("broken_entries")
