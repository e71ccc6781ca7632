"""Every timm model: the generic adapter, the MLPs timm builds, the layouts of timm's fused projections, and
the families that keep their own position maths (VisionTransformerRelPos, NaFlexVit).

The method matrix (tests/methods/test_matrix.py) runs every method on the tiny builds of every family, the generic
adapter's included; this file pins what it cannot see: the refusals, which modules are tuned, and the maths
against references written out here.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp, SwiGLU, SwiGLUPacked
from torch import nn

import promptvit
from promptvit.backbones import BackboneError, adapter_for, create_backbone
from promptvit.backbones.generic import GenericAdapter
from promptvit.layers.adapter import ParallelAdapterMlp
from promptvit.layers.lora import FusedLoRALinear
from promptvit.methods.base import ConfigError
from tests.families import FAMILY_BUILDS, build_tiny, present, tiny_input

METHODS = promptvit.available_methods()


def _step(model: promptvit.PromptModel, x: torch.Tensor) -> set[str]:
    """One SGD step on random targets; the names of the tuned tensors it moved."""
    before = {n: p.detach().clone() for n, p in model.tuned_named_parameters()}
    model.train()
    optimizer = torch.optim.SGD([p for _, p in model.tuned_named_parameters()], lr=0.5)
    F.cross_entropy(model(x), torch.arange(x.shape[0]) % 4).backward()
    optimizer.step()
    model.eval()
    return {n for n, p in model.tuned_named_parameters() if not torch.equal(before[n], p)}


# ---------------------------------------------------------------------- every MLP timm builds, in a ViT

#: timm MLP -> the hidden width promptvit reads for mlp_ratio 2 at width 32 (GLUs pack value and gate in fc1)
MLPS = {"Mlp": (Mlp, 64), "GluMlp": (GluMlp, 32), "SwiGLU": (SwiGLU, 64), "SwiGLUPacked": (SwiGLUPacked, 32)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mlp", sorted(MLPS))
def test_every_mlp_timm_builds_runs_every_vit_method(mlp: str, method: str) -> None:
    """timm's SwiGLU (AIMv2) has fc1_x and fc1_g, no fc1: it used to stop every method with an AttributeError."""
    layer, hidden = MLPS[mlp]
    base = create_backbone(
        "vit_tiny_patch16_224", num_classes=3, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
        mlp_ratio=2, mlp_layer=layer,
    )
    model = promptvit.wrap(base, method, num_classes=4, **promptvit.get_method(method).test_options)
    assert model.geometry.mlp_hidden == hidden
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    moved = _step(model, x)
    head = f"backbone.{model.head_name}."
    if model.parameter_summary()["method"]:
        assert any(not n.startswith(head) for n in moved), f"{method} on a {mlp} ViT: no method tensor moved"
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_norm_tuning_tunes_rms_norms() -> None:
    """AIMv2 normalises with timm's RmsNorm (weight only): norm tuning tunes exactly those weights."""
    if "vit_aimv2" not in FAMILY_BUILDS:
        pytest.skip("this timm has no AIMv2")
    base = build_tiny("vit_aimv2")
    rms = {f"backbone.{n}.weight" for n, m in base.named_modules() if type(m).__name__ == "RmsNorm"}
    model = promptvit.wrap(base, "norm", num_classes=4)
    tuned = {n for n, _ in model.tuned_named_parameters() if not n.startswith(f"backbone.{model.head_name}.")}
    assert rms and tuned == rms


# ---------------------------------------------------------------------- the generic adapter


def test_a_torchvision_model_is_refused_as_one() -> None:
    torchvision = pytest.importorskip("torchvision")
    with pytest.raises(BackboneError, match=r"ResNet: it is a torchvision model \(torchvision\.models\.resnet\)"):
        promptvit.wrap(torchvision.models.resnet18(weights=None), "linear", num_classes=3)


def _densenet() -> nn.Module:
    return build_tiny("densenet")


def test_generic_stages_are_feature_info_and_partial_tunes_from_the_kth_last_one_on() -> None:
    """DenseNet's feature_info skips its transitions and last dense block (the final norm stands for it):
    tuning the last two stages tunes dense block 3 and everything after it up to the head."""
    model = _densenet()
    adapter = adapter_for(model)
    assert type(adapter) is GenericAdapter
    names = {id(m): n for n, m in model.named_modules()}
    assert [names[id(s)] for s in adapter.stages] == [i["module"] for i in model.feature_info]
    assert adapter.geometry().depth == len(model.feature_info)
    order = [n for n, _ in model.named_parameters()]
    wrapped = promptvit.wrap(model, "partial", num_classes=4, num_blocks=2)
    tuned = {n.removeprefix("backbone.") for n, _ in wrapped.tuned_named_parameters()}
    first = order.index(next(n for n in order if n.startswith("features.denseblock3.")))
    assert tuned == set(order[first:]), "from denseblock3 on, head included"
    assert any(n.startswith("features.transition3.") for n in tuned)
    assert any(n.startswith("features.denseblock4.") for n in tuned)


def test_mobilenetv3_heads_read_the_width_of_its_conv_head() -> None:
    """MobileNetV3's conv_head widens its last stage (num_features 288 -> 1024 here): an MLP head reads 1024."""
    base = create_backbone("mobilenetv3_small_050", num_classes=3).eval()
    width = base.get_classifier().in_features
    assert base.num_features != width
    model = promptvit.wrap(base, "mlp", num_classes=4)
    assert model.geometry.embed_dim == width
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_a_conv_classifier_is_cached_and_gets_a_conv_mlp_head() -> None:
    """DLA's classifier is a 1x1 convolution on (B, C, 1, 1): the cached pre-logit path reshapes for it, and an
    MLP head is made of 1x1 convolutions."""
    base = create_backbone("dla46x_c", num_classes=3).eval()
    assert isinstance(base.get_classifier(), nn.Conv2d)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = promptvit.wrap(copy.deepcopy(base), "linear", num_classes=4).eval()
    cut = model.cache_cut()
    assert cut == model.geometry.depth > 0
    with torch.no_grad():
        torch.testing.assert_close(model.forward_from_block(model.forward_prefix(x, cut), cut), model(x))
    mlp = promptvit.wrap(copy.deepcopy(base), "mlp", num_classes=4).eval()
    head = mlp.adapter_head()
    assert [type(m) for m in head if isinstance(m, (nn.Linear, nn.Conv2d))] == [nn.Conv2d] * 3
    assert _step(mlp, x)


class TwoBranchNet(nn.Module):
    """A model that keeps timm's contract with one head per branch, averaged (as CrossVit does), and a
    feature_info stage the forward never calls: the generic adapter must not cache or fit its head on the
    concatenated pre-logit features, and must refuse an activation prompt at that stage."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.branches = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)])
        self.num_classes = num_classes
        self.head = nn.ModuleList([nn.Linear(8, num_classes), nn.Linear(8, num_classes)])
        self.feature_info = [dict(module="stem", num_chs=8, reduction=2), dict(module="branches", num_chs=16)]
        self.pretrained_cfg = {"classifier": ["head.0", "head.1"], "input_size": (3, 16, 16)}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.ModuleList([nn.Linear(8, num_classes), nn.Linear(8, num_classes)])

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        return [branch(x) for branch in self.branches]

    def forward_head(self, xs: list[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        pooled = [x.mean((2, 3)) for x in xs]
        if pre_logits:
            return torch.cat(pooled, dim=1)
        return torch.stack([head(p) for head, p in zip(self.head, pooled, strict=True)]).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def test_heads_that_do_not_read_the_pre_logit_features_are_neither_cached_nor_fitted_on_them() -> None:
    base = TwoBranchNet()
    adapter = adapter_for(base)
    assert type(adapter) is GenericAdapter and not adapter.head_reads_pre_logits()
    model = promptvit.wrap(copy.deepcopy(base), "linear", num_classes=4)
    assert model.cache_cut() == 0
    heads = [model.adapter_head(), *model.extra_heads()]  # one per branch
    assert len(heads) == 2
    assert {id(p) for h in heads for p in h.parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.warns(UserWarning, match="L-BFGS cannot fit it on them; it is trained by the run's optimiser"):
        fallback = promptvit.wrap(copy.deepcopy(base), "linear", num_classes=4)  # solver lbfgs by default
    assert fallback.config.solver == "sgd" and not fallback.method.fits_head_to_convergence()
    with pytest.raises(ConfigError, match=r"stage 1 \(ModuleList\) of TwoBranchNet never runs in forward_features"):
        promptvit.wrap(copy.deepcopy(base), "ap", num_classes=4, layer=1)
    ap = promptvit.wrap(copy.deepcopy(base), "ap", num_classes=4, layer=0)  # the stem runs once on the images
    assert _step(ap, torch.randn(4, 3, 16, 16))


def test_heads_on_more_than_the_pre_logit_features_run_mixed_batches_one_adapter_at_a_time() -> None:
    """Branch heads cannot be applied to shared pre-logit features: each adapter's samples of a mixed batch run
    the whole forward, and get what the adapter computes alone."""
    model = promptvit.wrap(TwoBranchNet(), "linear", num_classes=4, adapter_name="a", solver="sgd")
    model.add_adapter("b", "bias", num_classes=4)
    model.add_adapter("c", "linear", num_classes=4, solver="sgd")
    with torch.no_grad():
        for seed, name in enumerate("abc"):
            model.set_adapter(name)
            generator = torch.Generator().manual_seed(seed)
            for _, p in model.tuned_named_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    model.eval()
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    names = ["a", "b", "c", "b", "a"]
    alone = {}
    with torch.no_grad():
        for name in "abc":
            model.set_adapter(name)
            alone[name] = model(x)
        mixed = model(x, adapter_names=names)
        every = model.forward_every_adapter(x)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-6)
    for name in "abc":
        torch.testing.assert_close(every[name], alone[name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(alone["a"], alone["c"])


def _repvit() -> nn.Module:
    """RepViT's head module holds a NormLinear per head; its reset_classifier builds a new head module, without
    the distillation head unless asked for one."""
    return create_backbone("repvit_m1", embed_dim=(8, 16, 24, 32), depth=(1, 1, 1, 1), num_classes=3).eval()


@pytest.mark.parametrize("name", ["deit_distilled", "two_branch", "repvit"])
def test_unload_puts_back_every_module_reset_classifier_replaced(name: str) -> None:
    """timm's reset_classifier builds more than the classifier anew (a distilled ViT's second head, every
    branch head, RepViT's whole head module): the adapter gets a new head in every classifier slot, and
    disable_adapter and unload put all of the backbone's own back."""
    bases = {"two_branch": lambda: TwoBranchNet().eval(), "repvit": _repvit}
    base = bases[name]() if name in bases else build_tiny(name)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    size = 16 if name in FAMILY_BUILDS else 32
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(x)
    model = promptvit.wrap(base, "linear", num_classes=5, solver="sgd").eval()
    heads = [model.adapter_head(), *model.extra_heads()]
    assert len(heads) == 2 and all(h.out_features == 5 for h in heads)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        with model.disable_adapter():
            assert torch.equal(model(x), expected)
    unloaded = model.unload()
    after = unloaded.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


class BrokenReset(TwoBranchNet):
    """timm 1.0.9's PVTv2: reset_classifier sets num_classes, then reads an attribute the model never set."""

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.ModuleList([nn.Linear(self.embed_dim, num_classes)] * 2)


def test_a_reset_classifier_that_fails_inside_timm_is_one_line_and_leaves_the_model_as_it_was() -> None:
    base = BrokenReset().eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(BackboneError, match=r"BrokenReset.reset_classifier\(4\) fails in timm .*AttributeError.*"
                       r"keep the model's own head \(num_classes=None\)"):
        promptvit.wrap(base, "linear", num_classes=4, solver="sgd")
    assert base.num_classes == 3 and base.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())
    model = promptvit.wrap(base, "linear", solver="sgd")  # its own head
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_token_methods_on_the_generic_adapter_name_the_family_adapter_it_lacks() -> None:
    with pytest.raises(ConfigError, match="TwoBranchNet has no family adapter.*needs a TwoBranchNet family adapter"):
        promptvit.wrap(TwoBranchNet(), "vpt", num_classes=4)


# ---------------------------------------------------------------------- timm's fused-projection layouts


def _rows(part: int, heads: int, head_dim: int, num_heads: int) -> list[int]:
    """Output rows of q (0), k (1) or v (2): [q | k | v], or head by head [q_h | k_h | v_h] (head_first)."""
    if not heads:
        return list(range(part * num_heads * head_dim, (part + 1) * num_heads * head_dim))
    return [h * 3 * head_dim + part * head_dim + j for h in range(num_heads) for j in range(head_dim)]


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1x1"])
@pytest.mark.parametrize("head_first", [False, True], ids=["qkv", "head_first"])
def test_lora_updates_exactly_the_rows_of_its_parts(conv: bool, head_first: bool) -> None:
    num_heads, head_dim, width = 2, 4, 6
    out = 3 * num_heads * head_dim
    torch.manual_seed(0)
    base = nn.Conv2d(width, out, 1) if conv else nn.Linear(width, out)
    layer = FusedLoRALinear(copy.deepcopy(base), heads=num_heads if head_first else 0)
    factors = layer.add_adapter("default", [0, 2], rank=2, alpha=4.0)
    with torch.no_grad():
        factors.lora_B.normal_()
    x = torch.randn(2, width, 3, 3) if conv else torch.randn(2, 5, width)
    weight = base.weight.detach().reshape(out, width).clone()
    for i, part in enumerate((0, 2)):  # W_p += (alpha / r) B_p A_p on exactly the rows of part p
        weight[_rows(part, head_first, head_dim, num_heads)] += 2.0 * factors.lora_B[i].detach() @ factors.lora_A[i].detach()
    channels_last = x.movedim(1, -1) if conv else x
    expected = F.linear(channels_last, weight, base.bias.detach())
    expected = expected.movedim(-1, 1) if conv else expected
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
        layer.merge("default")
        torch.testing.assert_close(layer(x), expected)
        layer.unmerge("default")
    assert torch.equal(layer.base_layer.weight, base.weight)


def test_the_adapter_runs_beside_a_1x1_conv_mlp_on_every_position() -> None:
    mlp = timm.layers.ConvMlp(8, 16)
    layer = ParallelAdapterMlp(mlp)
    bottleneck = layer.add_adapter("default", dim=8, bottleneck=2, scale=0.5)
    with torch.no_grad():
        bottleneck.up.weight.normal_()
    x = torch.randn(2, 8, 3, 3)
    at_each_position = bottleneck(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), mlp(x) + 0.5 * at_each_position)


@pytest.mark.parametrize("name", present("maxvit", "coatnet"))
def test_maxxvit_lora_merged_equals_unmerged(name: str) -> None:
    """MaxViT's channels-last linear qkv and CoAtNet's 1x1-conv qkv, both head_first: LoRA reaches the logits,
    and its merged weights compute what its low-rank path computes."""
    model = promptvit.wrap(build_tiny(name), "lora", num_classes=4, rank=2).eval()
    assert all(layer.heads for layer in model.method._lora_layers)
    x = tiny_input(name)
    with torch.no_grad():
        initial = model(x)
        for n, p in model.tuned_named_parameters():
            if "lora_" in n:
                p.add_(0.3 * torch.randn_like(p))
        unmerged = model(x)
        model.merge()
        merged = model(x)
    assert not torch.allclose(unmerged, initial, atol=1e-4)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


def test_parallel_maxvit_attention_is_refused_by_lora_with_the_reason() -> None:
    if not timm.is_model("maxvit_tiny_pm_256"):
        pytest.skip("this timm has no parallel MaxViT")
    base = create_backbone(
        "maxvit_tiny_pm_256", embed_dim=(16, 32), depths=(1, 1), block_type=("PM",) * 2, stem_width=(8, 8),
        transformer_dim_head=4, transformer_window_size=(2, 2), transformer_grid_size=(2, 2), img_size=32,
    )
    with pytest.raises(ConfigError, match="runs a window and a grid attention side by side"):
        promptvit.wrap(copy.deepcopy(base), "lora", num_classes=4)
    adapter = promptvit.wrap(base, "adapter", num_classes=4)  # its MLP takes a parallel adapter all the same
    assert _step(adapter, torch.randn(4, 3, 32, 32))


# ---------------------------------------------------------------------- VisionTransformerRelPos


@pytest.mark.parametrize("name", present("vit_relpos", "vit_srelpos"))
def test_relpos_prompts_get_zero_bias_and_patches_keep_theirs(name: str, monkeypatch) -> None:
    plain = build_tiny(name)
    with torch.no_grad():  # a bias table away from its zero init, so that a shifted bias shows
        for n, p in plain.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_()
    prompted = promptvit.wrap(copy.deepcopy(plain), "vpt", prompt_length=3, deep=True).eval()
    masks: list[torch.Tensor] = []
    original = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return original(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    x = tiny_input(name)
    with torch.no_grad():
        plain(x)
        without = list(masks)
        masks.clear()
        with prompted.all_token_outputs():
            prompted(x)
    prefix = plain.num_prefix_tokens
    n = plain.patch_embed.num_patches + prefix
    kept = torch.tensor([*range(prefix), *range(prefix + 3, n + 3)])  # prefix, then the patches after 3 prompts
    assert len(masks) == len(without) == len(plain.blocks)
    for bias, bias_plain in zip(masks, without, strict=True):
        assert bias.shape[-1] == n + 3 and bias_plain.abs().sum() > 0
        assert torch.equal(bias[..., kept[:, None], kept], bias_plain)
        prompts = slice(prefix, prefix + 3)
        assert not bias[..., prompts, :].any() and not bias[..., :, prompts].any()


# ---------------------------------------------------------------------- NaFlexVit


@pytest.mark.parametrize("name", present("naflexvit_siglip", "naflexvit_gap", "naflexvit_rope"))
@pytest.mark.parametrize("method", ["vpt", "lora"])
def test_naflex_runs_images_of_another_size_and_refuses_patch_batches(name: str, method: str) -> None:
    """NaFlexVit resamples its positions to each grid: the wrapped model runs images of a size it was not built
    for (the disabled model is timm's forward on them), and refuses timm's pre-patchified NaFlex dict with a
    one-line reason instead of a traceback."""
    from timm.models.naflexvit import batch_patchify

    base = build_tiny(name)
    with torch.no_grad():  # LayerScale at 1 instead of 1e-5, so that the blocks' attention shows
        for n, p in base.named_parameters():
            if n.endswith(("ls1.gamma", "ls2.gamma", "gamma_1", "gamma_2")):
                p.fill_(1.0)
    x = torch.randn(2, 3, 24, 20, generator=torch.Generator().manual_seed(0))  # not the 16x16 it was built for
    with torch.no_grad():
        expected = base(x)
    model = promptvit.wrap(base, method, **promptvit.get_method(method).test_options).eval()
    with torch.no_grad():
        for _, p in model.tuned_named_parameters():
            p.add_(0.3 * torch.randn_like(p))
        tuned = model(x)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), expected)
    assert tuned.shape == expected.shape and not torch.allclose(tuned, expected, atol=1e-4)
    patches, _ = batch_patchify(x, model.adapter.patch_size)
    with pytest.raises(ValueError, match="one \\(batch, channels, height, width\\) tensor, not a dict"):
        model({"patches": patches})


def test_lbfgs_fits_a_conv_classifier_as_the_linear_map_it_is(tmp_path) -> None:
    """linear's default solver fits DLA's 1x1-conv head on the pre-logit features: scikit-learn-style logistic
    regression on those features gives the same weights."""
    from torch.utils.data import TensorDataset

    from promptvit.train import TrainConfig, fit
    from promptvit.train.probe import extract_features, fit_logistic

    model = promptvit.wrap(create_backbone("dla46x_c", num_classes=3), "linear", l2_grid=[1.0])
    assert model.method.fits_head_to_convergence()
    images = torch.randn(18, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(18) % 3
    train = TensorDataset(images, labels)
    fit(model, train, None, config=TrainConfig(epochs=2, device="cpu", progress=False), run_dir=tmp_path,
        class_names=["a", "b", "c"], multilabel=False)
    features, targets = extract_features(model, train, batch_size=64, device=torch.device("cpu"))
    weight, bias = fit_logistic(features, targets, 3, 1.0)
    head = model.get_classifier()
    torch.testing.assert_close(head.weight.double().reshape(3, -1), weight, rtol=0, atol=1e-4)
    # softmax ignores a shift of every bias (its mean never moves: the fit starts from timm's random conv bias)
    centred = head.bias.double() - head.bias.double().mean()
    torch.testing.assert_close(centred, bias - bias.mean(), rtol=0, atol=1e-4)
    with torch.no_grad():  # and the model's probabilities are that regression's
        torch.testing.assert_close(
            model.eval()(images).double().softmax(-1), (features @ weight.T + bias).softmax(-1), rtol=0, atol=1e-4
        )


def test_parameters_on_meta_builds_what_a_meta_device_build_cannot() -> None:
    """timm < 1.0.10's constructors read tensor values (drop-path rates from torch.linspace): a build on the meta
    device fails there, one with only the parameters on meta does not, and registers no parameter memory."""
    from promptvit.backbones.base import parameters_on_meta

    class ReadsValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            rates = [float(x.item()) for x in torch.linspace(0, 0.1, 3)]
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in rates)
            self.scale = nn.Parameter(torch.ones(4) * rates[-1])

    with pytest.raises(RuntimeError, match="meta"), torch.device("meta"):
        ReadsValues()
    with parameters_on_meta():
        model = ReadsValues()
    assert all(p.is_meta for p in model.parameters()) and len(list(model.parameters())) == 7
    assert not nn.Linear(2, 2).weight.is_meta  # put back after the block
