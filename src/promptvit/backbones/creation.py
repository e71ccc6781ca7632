"""Create timm backbones (hub name or local weights), fingerprint and load their weights."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from promptvit.backbones.base import BackboneError, classifier_name


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
                f"cannot read {path} as a weights-only PyTorch checkpoint ({str(error).splitlines()[0]}).{hint} "
                "better, convert it to safetensors"
            ) from error
        for key in ("state_dict", "model", "module"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
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
