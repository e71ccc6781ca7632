"""Create timm backbones (hub name or local weights) and answer geometry questions about them."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class BackboneError(ValueError):
    """A backbone cannot be built, loaded or matched."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What methods need to know about a backbone, independent of its weights.

    For ViTs ``depth`` counts transformer blocks; for CNNs it counts stages.
    """

    kind: str  # "vit" or "cnn"
    architecture: str
    embed_dim: int  # ViT width; CNN feature width before the head
    depth: int
    num_heads: int = 0
    num_prefix_tokens: int = 0
    num_patches: int = 0
    img_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    mlp_hidden: int = 0
    qkv_bias: bool = True
    global_pool: str = ""
    dynamic_img_size: bool = False
    class_token: bool = True
    pos_embed_len: int = 0  # rows of the learned position embedding (CLS row included unless no_embed_class)

    @property
    def num_tokens(self) -> int:
        """Tokens a ViT block sees without prompts: prefix (CLS, registers) plus patches."""
        return self.num_prefix_tokens + self.num_patches

    def vit_block_parameters(self) -> int:
        """Parameters of one standard pre-norm timm ViT block (two LayerNorms, qkv, proj, two-layer MLP)."""
        d, h = self.embed_dim, self.mlp_hidden
        return 4 * d + 3 * d * d + (3 * d if self.qkv_bias else 0) + d * d + d + d * h + h + h * d + d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        data = dict(data)
        data["img_size"] = tuple(data["img_size"])
        data["patch_size"] = tuple(data["patch_size"])
        return cls(**data)


def is_vit(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def geometry_of(model: nn.Module) -> Geometry:
    """Describe a timm ViT (any depth/width/patch/size, class token or pooled) or a timm CNN."""
    if is_vit(model):
        block = model.blocks[0]
        return Geometry(
            kind="vit",
            architecture=type(model).__name__,
            embed_dim=model.embed_dim,
            depth=len(model.blocks),
            num_heads=block.attn.num_heads,
            num_prefix_tokens=model.num_prefix_tokens,
            num_patches=model.patch_embed.num_patches,
            img_size=tuple(model.patch_embed.img_size),
            patch_size=tuple(model.patch_embed.patch_size),
            mlp_hidden=block.mlp.fc1.out_features,
            qkv_bias=block.attn.qkv.bias is not None,
            global_pool=model.global_pool,
            dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
            class_token=model.cls_token is not None,
            pos_embed_len=model.pos_embed.shape[1] if model.pos_embed is not None else 0,
        )
    stages = cnn_stages(model)
    input_size = (
        model.pretrained_cfg.get("input_size", (3, 224, 224))
        if hasattr(model, "pretrained_cfg")
        else (3, 224, 224)
    )
    return Geometry(
        kind="cnn",
        architecture=type(model).__name__,
        embed_dim=model.num_features,
        depth=len(stages),
        img_size=tuple(input_size[1:]),
        patch_size=(1, 1),
        global_pool=str(getattr(model, "global_pool", "")),
    )


def cnn_stages(model: nn.Module) -> list[nn.Module]:
    """The sequence of stages of a timm CNN: ResNet ``layer1..4`` or EfficientNet-style ``blocks``."""
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        return [getattr(model, f"layer{i}") for i in range(1, 5)]
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential):
        return list(blocks)
    raise BackboneError(
        f"unsupported backbone {type(model).__name__}: promptvit handles timm VisionTransformer, "
        "ResNet-style (layer1..layer4) and EfficientNet-style (blocks) models"
    )


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the classifier module (``head``, ``fc``, ``classifier``...)."""
    name = (
        getattr(model, "pretrained_cfg", {}).get("classifier") if hasattr(model, "pretrained_cfg") else None
    )
    modules = dict(model.named_modules())
    if name in modules:
        return name
    target = model.get_classifier()
    for module_name, module in modules.items():
        if module is target and module_name:
            return module_name
    raise BackboneError(f"cannot find the classifier module of {type(model).__name__}")


def set_classifier(model: nn.Module, module: nn.Module) -> None:
    """Replace the classifier module in place."""
    parent_name, _, child = classifier_name(model).rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def weights_fingerprint(tensors: dict[str, torch.Tensor], samples_per_tensor: int = 4096) -> str:
    """Short hash of tensor names, shapes and (a strided sample of) values.

    It tells two backbones' weights apart at a cost that stays small for ViT-B-sized models.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        if tensor.device.type != "meta" and tensor.numel():
            flat = tensor.reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            digest.update(flat[::step].to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    init_seed: int = 0,
    allow_pickle: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a timm model by name; weights from the hub (``pretrained``) or a local file.

    ``weights`` may be a ``.safetensors`` file or a PyTorch checkpoint (read with ``weights_only=True``);
    a classifier whose shape differs from the requested head is dropped. Random initialisation uses
    ``init_seed`` (without touching the global RNG), so a random-init backbone can be rebuilt exactly.
    """
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = timm.create_model(name, pretrained=pretrained and weights is None, **kwargs)
    except RuntimeError as error:  # timm raises RuntimeError for unknown names
        raise BackboneError(f"cannot build timm model '{name}': {error}") from error
    except TypeError as error:  # a build option the architecture does not take
        raise BackboneError(
            f"cannot build timm model '{name}' with options {sorted(kwargs)}: {error}; check the option names"
        ) from error
    except OSError as error:  # hub unreachable or file missing on the hub
        raise BackboneError(
            f"cannot download pretrained weights for '{name}' ({error}). Offline? Pass a local weights file "
            "(safetensors or .pth) with the timm architecture name, e.g. "
            f"`--backbone {name.split('.')[0]} --weights path/to/weights.safetensors`."
        ) from error
    if weights is not None:
        load_weights(model, weights, allow_pickle=allow_pickle)
    # How this model was built, so that a saved artifact can rebuild the same backbone.
    model.promptvit_source = {
        "name": name,
        "pretrained": bool(pretrained or weights is not None),
        "weights": str(Path(weights).resolve()) if weights is not None else None,
        "init_seed": init_seed,
        # num_classes stays: at random init it changes how the RNG is consumed, hence the body's weights.
        "kwargs": dict(kwargs),
    }
    return model


def backbone_source(model: nn.Module) -> dict[str, Any]:
    """How to rebuild ``model``: recorded by ``create_backbone``, else read from timm's pretrained config."""
    if hasattr(model, "promptvit_source"):
        return dict(model.promptvit_source)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = ".".join(filter(None, [cfg.get("architecture"), cfg.get("tag")])) or None
    return {"name": name, "pretrained": False, "weights": None, "kwargs": {}}


def load_weights(model: nn.Module, path: str | Path, *, allow_pickle: bool = False) -> None:
    """Load a local checkpoint into ``model`` strictly, except for a classifier of another size.

    PyTorch checkpoints are read with ``weights_only=True``; a pickle holding arbitrary objects (which can run
    code when loaded) is refused unless ``allow_pickle=True`` says the file is trusted.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise BackboneError(f"{path} is not a valid safetensors file: {error}") from error
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except Exception as error:  # pickle with arbitrary objects, truncated file...
            hint = "" if allow_pickle else " If you trust the file, allow pickles (allow_pickle=True);"
            raise BackboneError(
                f"cannot read {path} as a weights-only PyTorch checkpoint "
                f"({(str(error).splitlines() or [type(error).__name__])[0]}).{hint} "
                "better, convert it to safetensors"
            ) from error
        for key in ("state_dict", "model", "module"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} does not hold a state dict (names -> tensors); save model.state_dict()")
    own = model.state_dict()
    head = classifier_name(model)
    state = {
        k: v for k, v in state.items() if not (k.startswith(head + ".") and own.get(k, v).shape != v.shape)
    }
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise BackboneError(
            f"{path} does not match {type(model).__name__}: {str(error).splitlines()[-1].strip()} "
            "(check the architecture name and its options such as img_size, patch_size, depth)"
        ) from error
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        raise BackboneError(
            f"{path} does not match {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            " (check the architecture name and its options such as img_size, patch_size, depth)"
        )
