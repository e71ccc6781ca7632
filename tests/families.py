"""The one table of tiny builds: every registered backbone family's ``tiny_builds``, plus medical-backbone shapes.

``FAMILY_BUILDS`` is collected from the family adapters' ``tiny_builds`` (name -> (timm architecture, build
options, input size)), so a new family (one adapter module with its builds) joins every test that loops over
it. ``MEDICAL_BUILDS`` keeps the architecture options of the pathology and ophthalmology backbones people
wrap, at tiny widths and depths; they are no family of their own (each is a build of a registered family).

``build_tiny(name)`` makes a build, ``tiny_input(name)`` a batch of its images; ``method_cases()`` pairs every
registered method with every build and says, from the method's own ``supports()``, whether it must wrap or
be refused.
"""

from __future__ import annotations

import copy
import functools

import timm
import torch
from timm.layers import SwiGLUPacked

import promptvit
from promptvit.backbones import BackboneAdapter, adapter_for, create_backbone, registered_adapters

Build = tuple[str, dict, int]  # timm architecture, build options, input size


def family_adapters() -> list[type[BackboneAdapter]]:
    """Every registered family adapter class, once, in registration order."""
    return list(dict.fromkeys(registered_adapters().values()))


def family_builds() -> dict[str, Build]:
    """The tiny builds of every family registered now, that this timm release can make (older ones lack some
    architectures: DINOv3, RoPE ViTs)."""
    return {
        name: build
        for adapter in family_adapters()
        for name, build in adapter.tiny_builds.items()
        if timm.is_model(build[0])
    }


FAMILY_BUILDS: dict[str, Build] = family_builds()

_VIT = dict(embed_dim=32, depth=2, num_heads=2)

_MEDICAL: dict[str, Build] = {
    # RETFound: ViT-L/16, global average pooling (fc_norm), no class-token readout
    "retfound": ("vit_large_patch16_224", dict(img_size=16, patch_size=4, global_pool="avg", **_VIT), 16),
    # UNI: ViT-L/16, LayerScale, dynamic image size
    "uni": (
        "vit_large_patch16_224",
        dict(img_size=16, patch_size=4, init_values=1e-5, dynamic_img_size=True, **_VIT),
        16,
    ),
    # Virchow2: ViT-H/14, SwiGLU (packed) MLP with SiLU, LayerScale, 4 register tokens
    "virchow2": (
        "vit_huge_patch14_224",
        dict(
            img_size=28,
            patch_size=7,
            init_values=1e-5,
            mlp_ratio=5.3375,
            mlp_layer=SwiGLUPacked,
            act_layer=torch.nn.SiLU,
            reg_tokens=4,
            **_VIT,
        ),
        28,
    ),
    # DINOv2 with registers: LayerScale, 4 register tokens, patch 14
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, patch_size=7, **_VIT), 28),
    # DINOv3: timm Eva with rotary positions, 4 registers, LayerScale, dynamic image size, average pooling
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=16, patch_size=4, **_VIT), 16),
}

MEDICAL_BUILDS = {name: spec for name, spec in _MEDICAL.items() if timm.is_model(spec[0])}


def present(*names: str) -> list[str]:
    """The names among ``names`` whose tiny build this timm version can make."""
    return [name for name in names if name in FAMILY_BUILDS]


def _table(name: str, table: dict[str, Build] | None) -> dict[str, Build]:
    """``table``, or the builds of the families registered now (``FAMILY_BUILDS`` plus any registered later)."""
    if table is not None:
        return table
    return FAMILY_BUILDS if name in FAMILY_BUILDS else family_builds()


def build_tiny(
    name: str, num_classes: int = 3, seed: int = 0, table: dict[str, Build] | None = None
) -> torch.nn.Module:
    """A tiny random-init backbone (default: a family build); the same seed gives the same weights."""
    arch, options, _ = _table(name, table)[name]
    torch.manual_seed(seed)
    return create_backbone(arch, num_classes=num_classes, init_seed=seed, **options).eval()


def tiny_input(name: str, batch: int = 2, seed: int = 1, table: dict[str, Build] | None = None) -> torch.Tensor:
    """A batch of random images of the size the build ``name`` takes."""
    size = _table(name, table)[name][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def representatives() -> list[str]:
    """One build per registered family: the first of its ``tiny_builds`` this timm version can make. Tests use
    it where a check is about the family's code path rather than a build's options (say so in the test)."""
    builds = family_builds()
    return [
        next(name for name in adapter.tiny_builds if name in builds)
        for adapter in family_adapters()
        if any(name in builds for name in adapter.tiny_builds)
    ]


def make_blocks_visible(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """O(1) values for the scales that start (near) zero and hide what a block's attention and MLP do.

    LayerScale starts at 1e-5 (DINOv2/v3, UNI, Virchow2, RoPE ViT) and residual post-norms at 0 (SwinV2) or
    1e-6 (res-post-norm ViTs in older timm): every block is then (nearly) the identity, and random-init tests
    that follow a block's maths, or a prompt's gradient through the blocks, need them visible.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, p in model.named_parameters():
            post_norm = parameter_name.endswith(("norm1.weight", "norm2.weight")) and p.abs().max() < 1e-3
            if post_norm or parameter_name.rpartition(".")[2] in ("gamma", "gamma_1", "gamma_2"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    return model


# ---------------------------------------------------------------------- the method x build matrix


@functools.cache
def _visible_base(name: str, seed: int, table_key: str) -> torch.nn.Module:
    table = MEDICAL_BUILDS if table_key == "medical" else None
    return make_blocks_visible(build_tiny(name, seed=seed, table=table), seed)


def visible_build(name: str, seed: int = 0, medical: bool = False) -> torch.nn.Module:
    """A fresh copy of the build ``name`` with its blocks' maths visible (``make_blocks_visible``); the build
    itself is made once per process (timm's random init is the slow part)."""
    return copy.deepcopy(_visible_base(name, seed, "medical" if medical else "family"))


def family_adapter(name: str, medical: bool = False) -> BackboneAdapter:
    """The family adapter of the build ``name``."""
    return adapter_for(_visible_base(name, 0, "medical" if medical else "family"))


def supports(method: str, name: str, medical: bool = False) -> bool:
    """Whether ``method`` declares (``Method.supports``) that it attaches to the family of build ``name``."""
    return promptvit.get_method(method).supports(family_adapter(name, medical))


def method_options(method: str, name: str) -> dict:
    """The method's ``test_options`` (small prompts, low ranks) for build ``name``: an image-sized prompt (AP
    and VP on a CNN) is sized for the images the build takes."""
    options = dict(promptvit.get_method(method).test_options)
    if "cnn_input_size" in options:
        size = _table(name, None)[name][2]
        options["cnn_input_size"] = [size, size]
    return options


def method_cases(
    builds: list[str] | None = None, medical: bool = False
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(method, build) for every registered method on every build (default: every family's builds), split in
    the pairs the method declares it supports (they must wrap and pass the checks) and the ones it refuses (the
    wrap must raise a ConfigError that says why)."""
    names = builds if builds is not None else sorted(family_builds())
    pairs = [(method, name) for method in promptvit.available_methods() for name in names]
    supported = [pair for pair in pairs if supports(*pair, medical=medical)]
    return supported, [pair for pair in pairs if pair not in supported]
