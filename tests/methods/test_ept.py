"""EPT: the SDPA fast path against the materialised prompted softmax, layer selection, counts, errors."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.vision_transformer import Attention
from torch.nn.attention import SDPBackend, sdpa_kernel

import promptvit
from promptvit.backbones.vit import timm_attention_parts
from promptvit.layers import prompted_attention
from promptvit.layers.prompted_attention import (
    WAYS,
    PromptedAttention,
    prompted_sdpa,
    reference_prompted_attention,
)
from promptvit.methods.ept import EPTConfig
from tests.conftest import TINY_BACKBONES, build_tiny, tiny_input, without_readout

CAT_WAYS = ("pure_cat", "multi_cat")
ALL_WAYS = ("pure_cat", "multi_cat", "add", "multiply")


def _qkv(batch: int = 2, heads: int = 3, n: int = 7, dim: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64) * 2 for _ in range(3)]


def _learned(way: str, n: int, d_p: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Non-trivial learned tensors (far from the zero/small init) so that every term matters."""
    g = torch.Generator().manual_seed(seed)
    shape = {"add": (n, n), "multiply": (n, 1)}.get(way, (n, d_p))
    name = {"add": "logit_bias", "multiply": "temperature"}.get(way, "prompt")
    scale = 0.3 if way == "multiply" else 1.5
    return {name: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)}


def _cases() -> list[tuple[str, int]]:
    return [(way, d_p) for way in CAT_WAYS for d_p in (1, 5, 37)] + [("add", 0), ("multiply", 0)]


@pytest.mark.parametrize("way,d_p", [("pure_cat", 5), ("multi_cat", 5), ("add", 0), ("multiply", 0)])
def test_fast_path_keeps_a_family_logit_bias(way: str, d_p: int) -> None:
    """Beit's relative position bias: part of the logits u, not of the prompt columns; gradients reach it."""
    q, k, v = _qkv()
    learned = _learned(way, q.shape[-2], d_p)
    bias = torch.randn(1, q.shape[1], q.shape[2], q.shape[2], generator=torch.Generator().manual_seed(3), dtype=q.dtype)
    results = []
    for fn in (prompted_sdpa, reference_prompted_attention):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias, *learned.values())]
        out = fn(*leaves[:3], way=way, attn_bias=leaves[3], **dict(zip(learned, leaves[4:], strict=True)))
        grads = torch.autograd.grad((out * out.detach().cos()).sum(), leaves)
        results.append((out, grads))
    (fast, fast_grads), (ref, ref_grads) = results
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    for a, b in zip(fast_grads, ref_grads, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    # the bias matters: without it the reference differs
    assert not torch.allclose(ref, reference_prompted_attention(q, k, v, way=way, **learned), atol=1e-3)
    # EPT's definition: softmax over [P, u + b] with the prompt columns dropped
    if way == "pure_cat":
        logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias
        prompt = learned["prompt"].expand(*logits.shape[:-1], d_p)
        expected = torch.cat([prompt, logits], -1).softmax(-1)[..., d_p:] @ v
        torch.testing.assert_close(ref, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("way,d_p", _cases())
def test_fast_path_matches_reference_forward_and_gradients(way: str, d_p: int) -> None:
    q, k, v = _qkv()
    learned = _learned(way, q.shape[-2], d_p)
    results = []
    for fn in (prompted_sdpa, reference_prompted_attention):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, *learned.values())]
        out = fn(*leaves[:3], way=way, **dict(zip(learned, leaves[3:], strict=True)))
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
        grads = torch.autograd.grad((out * weight).sum(), leaves)
        results.append((out, grads))
    (fast, fast_grads), (ref, ref_grads) = results
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    for name, a, b in zip(["q", "k", "v", *learned], fast_grads, ref_grads, strict=True):
        assert b.abs().max() > 0, f"reference gradient w.r.t. {name} is zero; the check would be vacuous"
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=f"gradient w.r.t. {name}")


@pytest.mark.parametrize("way", ALL_WAYS)
def test_layer_matches_reference_through_timm_projections(way: str) -> None:
    """The injected layer = frozen qkv -> reference EPT softmax -> frozen proj; grads w.r.t. input and prompt."""
    model = promptvit.wrap(build_tiny("vit_token", num_classes=4), "ept", way=way, prompt_length=5).double()
    layer = model.backbone.blocks[1].attn
    assert isinstance(layer, PromptedAttention)
    param_name, param = next(iter(layer.prompts["default"].named_parameters()))
    with torch.no_grad():
        param.normal_(0, 0.3 if way == "multiply" else 1.5, generator=torch.Generator().manual_seed(3))
    base = layer.base_layer
    x = torch.randn(2, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def reference(x: torch.Tensor) -> torch.Tensor:
        q, k, v = base.qkv(x).reshape(2, 5, 3, base.num_heads, base.head_dim).permute(2, 0, 3, 1, 4)
        out = reference_prompted_attention(q, k, v, way=way, **{param_name: param})
        return base.proj(out.transpose(1, 2).reshape(2, 5, 32))

    outputs = []
    for fn in (layer, reference):
        leaf = x.clone().requires_grad_(True)
        out = fn(leaf)
        grads = torch.autograd.grad((out * out.detach().sin()).sum(), [leaf, param])
        outputs.append((out, grads))
    (a, (ax, ap)), (b, (bx, bp)) = outputs
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(ax, bx, rtol=0, atol=1e-11)
    torch.testing.assert_close(ap, bp, rtol=0, atol=1e-11)


@pytest.mark.parametrize("way", CAT_WAYS)
@pytest.mark.parametrize("d_p", [1, 5, 37])
def test_concat_is_a_sigmoid_gate_on_plain_attention(way: str, d_p: int) -> None:
    """softmax([P; u])[d_p:] V == sigmoid(LSE_j u_ij - LSE_k P'_ik) * softmax(u_i) V (P' = alpha P for multi)."""
    q, k, v = _qkv()
    prompt = _learned(way, q.shape[-2], d_p)["prompt"].detach()
    u = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    p = prompt if way == "pure_cat" else (u.amax(-1, keepdim=True) - u.amin(-1, keepdim=True)) * prompt
    gate = torch.sigmoid(u.logsumexp(-1) - p.logsumexp(-1)).unsqueeze(-1)
    gated = gate * (u.softmax(-1) @ v)
    torch.testing.assert_close(reference_prompted_attention(q, k, v, way=way, prompt=prompt), gated)
    torch.testing.assert_close(prompted_sdpa(q, k, v, way=way, prompt=prompt), gated)
    assert ((gate >= 0) & (gate <= 1)).all()
    assert not torch.allclose(gated, u.softmax(-1) @ v, atol=1e-3), "the prompt should change the output"


@pytest.mark.parametrize("kind", ["vit_token", "vit_avg"])
def test_add_and_multiply_are_identity_at_init(kind: str) -> None:
    base = build_tiny(kind, num_classes=4)
    reference = copy.deepcopy(base)
    x = tiny_input(kind)
    with torch.no_grad():
        expected = reference(x)
        # multiply: q * (1 + 0) is bitwise q, and the SDPA call is the very call timm makes: exact.
        multiply = without_readout(promptvit.wrap(copy.deepcopy(base), "ept", way="multiply")).eval()
        assert torch.equal(multiply(x), expected)
        # add: a zero float mask cannot change the maths, but SDPA may pick another kernel (or summation
        # order) with a mask than without one, so equality holds up to float32 rounding only.
        add = promptvit.wrap(copy.deepcopy(base), "ept", way="add").eval()
        torch.testing.assert_close(add(x), expected, rtol=0, atol=1e-6)
        # while the concatenating ways change the forward from the start
        pure = promptvit.wrap(copy.deepcopy(base), "ept", prompt_length=3).eval()
        assert not torch.allclose(pure(x), expected, atol=1e-6)


def test_shallow_prompts_only_block_zero() -> None:
    base = build_tiny("vit_avg", num_classes=4)
    original = [block.attn for block in base.blocks]
    model = promptvit.wrap(base, "ept", layers=[0], prompt_length=3).eval()
    blocks = model.backbone.blocks
    assert isinstance(blocks[0].attn, PromptedAttention) and blocks[0].attn.base_layer is original[0]
    assert all(blocks[i].attn is original[i] and type(original[i]) is Attention for i in (1, 2))
    tuned = {n for n, _ in model.tuned_named_parameters() if not n.startswith("backbone.head.")}
    assert tuned == {"backbone.blocks.0.attn.prompt"}
    # functionally: block 0's attention differs from its frozen original, the others compute timm's output
    seen = {}
    hooks = [
        b.attn.register_forward_hook(lambda m, i, o, j=j: seen.__setitem__(j, (i[0], o)))
        for j, b in enumerate(blocks)
    ]
    with torch.no_grad():
        model(tiny_input("vit_avg"))
        assert not torch.allclose(original[0](seen[0][0]), seen[0][1], atol=1e-6)
        for j in (1, 2):
            assert torch.equal(original[j](seen[j][0]), seen[j][1])
    for hook in hooks:
        hook.remove()


def test_frozen_weights_keep_their_names_under_a_prefix() -> None:
    base = build_tiny("vit_token", num_classes=4)
    before = base.state_dict()
    model = promptvit.wrap(base, "ept", prompt_length=3)
    after = model.backbone.state_dict()
    renamed = {
        n.replace(".attn.base_layer.", ".attn.").replace("head.base_layer.", "head."): t
        for n, t in after.items()
        if ".prompts." not in n and ".heads." not in n  # the adapter's prompts and head
    }
    assert renamed.keys() == before.keys()
    assert all(torch.equal(renamed[n], before[n]) for n in before)


@pytest.mark.parametrize("layers", [[1, 2], [0, 1], [2], [2, 0]])
def test_any_layer_set_gets_prompts_only_there(layers: list[int]) -> None:
    model = promptvit.wrap(build_tiny("vit_avg", num_classes=4), "ept", layers=layers, prompt_length=3)
    prompted = {i for i, b in enumerate(model.backbone.blocks) if isinstance(b.attn, PromptedAttention)}
    assert prompted == set(layers)
    names = {n for n, _ in model.tuned_named_parameters() if not n.startswith("backbone.head.")}
    assert names == {f"backbone.blocks.{i}.attn.prompt" for i in layers}
    assert model.parameter_summary()["method"] == len(layers) * 16 * 3  # vit_avg: 16 tokens, no CLS


@pytest.mark.parametrize(
    "layers,match",
    [
        ([3], r"out of range.*3 blocks"),
        ([-1], "out of range"),
        ([], "at least one"),
        ([0, 0], "duplicate"),
        (["a"], "ints"),
    ],
)
def test_bad_layer_indices_are_refused(layers: list, match: str) -> None:
    with pytest.raises(promptvit.ConfigError, match=match):
        promptvit.wrap(build_tiny("vit_avg", num_classes=4), "ept", layers=layers)


def test_bad_options_are_refused() -> None:
    with pytest.raises(promptvit.ConfigError, match="way"):
        promptvit.wrap(build_tiny("vit_token"), "ept", way="concat")
    with pytest.raises(promptvit.ConfigError, match="prompt_length"):
        EPTConfig(prompt_length=0)
    with pytest.raises(promptvit.ConfigError, match="relative_length"):
        EPTConfig(relative_length=0.0)
    with pytest.raises(promptvit.ConfigError, match="gives prompt length 0"):
        promptvit.wrap(build_tiny("vit_token"), "ept", relative_length=0.01)  # 0.01 * 32 / 4 -> 0


def _vit_b16_meta() -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", num_classes=5)


def test_parameter_count_at_vit_b16() -> None:
    cls = promptvit.get_method("ept")
    model = promptvit.wrap(_vit_b16_meta(), "ept")
    assert model.parameter_summary()["method"] == 12 * 197 * 100 == 236_400
    assert cls.expected_num_parameters(model.config, model.geometry) == 236_400
    geometry = model.geometry
    # relative length: d_p = round(relative * 768 / 196); relative 1 -> 4 (paper Sec. 4.3)
    for relative, d_p in [(1, 4), (5, 20), (25.5, 100), (0.2, 1)]:
        config = EPTConfig(relative_length=relative, prompt_length=7)  # prompt_length is overridden
        assert cls.expected_num_parameters(config, geometry) == 12 * 197 * d_p
    relative = promptvit.wrap(_vit_b16_meta(), "ept", relative_length=5.0)
    assert relative.parameter_summary()["method"] == 12 * 197 * 20
    assert relative.backbone.blocks[0].attn.prompts["default"].prompt.shape == (197, 20)
    shallow = promptvit.wrap(_vit_b16_meta(), "ept", layers=[0])
    assert shallow.parameter_summary()["method"] == 197 * 100
    for way, per_layer in [("add", 197 * 197), ("multiply", 197)]:
        model = promptvit.wrap(_vit_b16_meta(), "ept", way=way)
        assert model.parameter_summary()["method"] == 12 * per_layer
        assert cls.expected_num_parameters(model.config, model.geometry) == 12 * per_layer


def test_wrong_input_size_gives_a_clear_error() -> None:
    arch, options, _ = TINY_BACKBONES["vit_token"]
    base = promptvit.create_backbone(arch, num_classes=4, dynamic_img_size=True, **options)
    model = promptvit.wrap(base, "ept", prompt_length=3).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16))  # the size it was built for: 1 CLS + 2x2 patches
        with pytest.raises(ValueError, match=r"expects 5 tokens but received 10.*\(16, 16\)"):
            model(torch.randn(1, 3, 24, 24))  # 1 CLS + 3x3 patches
        with pytest.raises(ValueError, match="expects 5 tokens but received 7"):
            model.backbone.blocks[0].attn(torch.randn(1, 7, 32))


@pytest.mark.parametrize("way", ALL_WAYS)
def test_sdpa_is_used_with_one_padded_key(monkeypatch: pytest.MonkeyPatch, way: str) -> None:
    calls = []
    real = prompted_attention.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, **kwargs):
        calls.append((q.shape, k.shape, None if attn_mask is None else attn_mask.shape, dropout_p))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(prompted_attention, "scaled_dot_product_attention", spy)
    model = promptvit.wrap(build_tiny("vit_avg", num_classes=4), "ept", way=way, prompt_length=37)
    for block in model.backbone.blocks:
        block.attn.base_layer.attn_drop.p = 0.25
    model.eval()
    with torch.no_grad():
        model(tiny_input("vit_avg"))
    assert len(calls) == 3  # one per prompted block
    n = 16
    for q_shape, k_shape, mask_shape, dropout_p in calls:
        assert dropout_p == 0.0
        if way in CAT_WAYS:  # one extra key whatever d_p is, two extra head channels, no mask
            assert k_shape[-2:] == (n + 1, 8 + 2) and q_shape[-1] == 8 + 2 and mask_shape is None
        else:
            assert k_shape[-2] == n and (mask_shape is None) == (way == "multiply")
    calls.clear()
    model.train()
    model(tiny_input("vit_avg")).sum().backward()
    assert [c[3] for c in calls] == [0.25] * 3  # timm-style attention dropout, only in training


def test_multi_cat_alpha_is_not_detached() -> None:
    """With the prompt fixed, the gradient w.r.t. k differs from a detached-alpha version."""
    q, k, v = _qkv()
    prompt = _learned("multi_cat", 7, 5)["prompt"].detach()
    k = k.requires_grad_(True)
    (grad,) = torch.autograd.grad(prompted_sdpa(q, k, v, way="multi_cat", prompt=prompt).sum(), [k])
    u = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    alpha = (u.amax(-1, keepdim=True) - u.amin(-1, keepdim=True)).detach()
    p = (alpha * prompt).logsumexp(-1)
    detached = (torch.sigmoid(u.logsumexp(-1) - p).unsqueeze(-1) * (u.softmax(-1) @ v)).sum()
    (grad_detached,) = torch.autograd.grad(detached, [k])
    assert not torch.allclose(grad, grad_detached, atol=1e-6)


@pytest.mark.parametrize("way", WAYS)
def test_attention_weights_reproduce_the_layer_output(way: str) -> None:
    """The analysis view (attention matrix, patch-wise scale) is the same maths as the forward."""
    model = promptvit.wrap(build_tiny("vit_token"), "ept", prompt_length=3, way=way).eval()
    layer = model.backbone.blocks[0].attn
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_()
        x = model.backbone.norm_pre(
            model.backbone._pos_embed(model.backbone.patch_embed(tiny_input("vit_token")))
        )
        x = model.backbone.blocks[0].norm1(x)
        q, k, v = timm_attention_parts(layer.base_layer).heads(x)
        weights = layer.attention_weights(x)
        expected = reference_prompted_attention(q, k, v, way=way, **layer.prompts["default"].learned())
        torch.testing.assert_close(weights @ v, expected, rtol=1e-5, atol=1e-6)
        scale = layer.token_scale(x)
        if way == "pure_cat":
            logits = (q @ k.transpose(-2, -1)) * layer.base_layer.scale
            gate = torch.sigmoid(logits.logsumexp(-1) - layer.prompts["default"].prompt.logsumexp(-1))
            torch.testing.assert_close(scale, gate, rtol=1e-5, atol=1e-6)
        elif way in ("add", "multiply"):
            torch.testing.assert_close(scale, torch.ones_like(scale))


def _reference_sdpa(q, k, v, *, dropout_p: float = 0.0, **learned):
    assert dropout_p == 0.0
    return reference_prompted_attention(q, k, v, **learned)


@pytest.mark.parametrize("way", ["pure_cat", "multi_cat", "multiply"])
def test_training_and_inference_run_under_a_flash_only_backend(monkeypatch: pytest.MonkeyPatch, way: str) -> None:
    """No float mask that requires grad: CPU flash attention accepts EPT; outputs and grads = the reference."""
    model = promptvit.wrap(build_tiny("vit_avg", num_classes=4), "ept", way=way, prompt_length=5)
    with torch.no_grad():
        for block in model.backbone.blocks:
            param = next(iter(block.attn.prompts["default"].parameters()))
            param.normal_(0, 0.3 if way == "multiply" else 1.5, generator=torch.Generator().manual_seed(3))
    x = tiny_input("vit_avg")

    def run() -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        model.train()
        leaf = x.clone().requires_grad_(True)
        out = model(leaf)
        tuned = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad((out * out.detach().cos()).sum(), [leaf, *tuned])
        with torch.no_grad():
            inference = model.eval()(x)
        return out, list(grads), inference

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = run()
    monkeypatch.setattr(prompted_attention, "prompted_sdpa", _reference_sdpa)
    reference = run()
    torch.testing.assert_close(flash[0], reference[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(flash[2], reference[2], rtol=1e-4, atol=1e-5)
    for a, b in zip(flash[1], reference[1], strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_prompt_lse_keeps_its_per_token_values_in_bf16() -> None:
    """d_p = 100, N(0, 0.02) prompts: rounded to bf16 the 197 LSEs collapse to 2 values; hi + lo keeps them."""
    prompt = torch.randn(197, 100, generator=torch.Generator().manual_seed(0)) * 0.02
    lse = torch.logsumexp(prompt, dim=-1)
    assert lse.bfloat16().unique().numel() <= 2
    channels = prompted_attention.lse_channels(lse, 0.125, torch.bfloat16)
    assert channels.dtype == torch.bfloat16
    recovered = 0.125 * channels.float().sum(-1)
    torch.testing.assert_close(recovered, lse, rtol=0, atol=5e-5)
    assert recovered.unique().numel() > 50
    assert (prompted_attention.lse_channels(lse, 0.125, torch.float32)[..., 1] == 0).all()


@pytest.mark.parametrize("way", CAT_WAYS)
def test_bf16_autocast_keeps_the_prompt_dependent_part(way: str) -> None:
    """Under bf16 autocast (flash kernel, as on a GPU) the gate sigmoid(LSE u - LSE P) per token = float64.

    With v = 1 the output IS the gate. Output rounding (half a bf16 step, ~2e-3 here) differs from sample to
    sample and head to head; the prompt's part is the same for every sample and head, so the per-token mean
    error over 16 (sample, head) pairs isolates it. Casting LSE(P) to bf16 shifts it by ~0.01, which moves
    that mean by ~3e-3; kept in float32 it stays under 1e-3.
    """
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(4, 4, 197, 64, generator=g).bfloat16() for _ in range(2))
    v = torch.ones(4, 4, 197, 64, dtype=torch.bfloat16)
    prompt = torch.randn(197, 100, generator=g) * 0.02
    reference = reference_prompted_attention(q.double(), k.double(), v.double(), way=way, prompt=prompt.double())
    with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = prompted_sdpa(q, k, v, way=way, prompt=prompt)
    assert out.dtype == torch.bfloat16
    error = out.double()[..., 0] - reference[..., 0]
    assert error.abs().max() < 4e-3  # one bf16 step at the gate's magnitude
    assert error.mean(dim=(0, 1)).abs().max() < 1e-3
