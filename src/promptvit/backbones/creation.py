"""Create timm backbones (hub name or local weights), fingerprint and load their weights."""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from promptvit.backbones.base import BackboneError, adapter_class_for, adapter_for, classifier_name
from promptvit.hub import offline_unless_reachable


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
    download = pretrained and weights is None
    try:
        # Unreachable Hub: timm's download answers from the cache at once instead of retrying for a minute.
        with torch.random.fork_rng(devices=[]), offline_unless_reachable() if download else nullcontext():
            torch.manual_seed(init_seed)
            model = timm.create_model(name, pretrained=download, **kwargs)
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
    model.promptvit_source = _creation_record(model, name, pretrained, weights, init_seed, kwargs)
    return model


def _creation_record(
    model: nn.Module, name: str, pretrained: bool, weights: str | Path | None, init_seed: int, kwargs: dict
) -> dict[str, Any]:
    """How ``create_backbone`` built ``model`` (the record ``promptvit.backbones.source`` documents)."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    cfg = getattr(model, "pretrained_cfg", None) or {}
    record: dict[str, Any] = {"name": name, "pretrained": bool(pretrained or weights is not None), "weights": None}
    if weights is not None:
        record.update(origin="file", weights=str(Path(weights).resolve()), weights_loader="promptvit")
    elif pretrained and overlay.get("file"):
        record.update(origin="file", weights=str(Path(overlay.pop("file")).resolve()), weights_loader="timm")
    elif pretrained:
        tagged = ".".join(filter(None, [cfg.get("architecture"), cfg.get("tag")]))
        record.update(origin="hub", name=tagged or name, hub_id=cfg.get("hf_hub_id"), license=cfg.get("license"))
    else:
        record["origin"] = "random"
    options = {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}
    if overlay:
        options["pretrained_cfg_overlay"] = overlay
    # num_classes stays: at random init it changes how the RNG is consumed, hence the body's weights.
    record.update(init_seed=init_seed, kwargs=options)
    # Weights changed after this (trained in place, loaded over) make the record stale: wrap() compares.
    if adapter_class_for(model) is not None:
        record["fingerprint"] = weights_fingerprint(body_parameters(model))
    return record


def body_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Named parameters outside every classifier module: what identifies a backbone's weights."""
    heads = {id(p) for module in adapter_for(model).classifier_modules() for p in module.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) not in heads}


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
