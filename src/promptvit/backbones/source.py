"""How a backbone was built, read from the model itself, and rebuilding the same backbone from that record.

The record (``base_model`` in an artifact's ``adapter_config.json``) holds:

- ``name``: the timm name with its pretrained tag (``vit_base_patch16_224.augreg_in21k``);
- ``origin``: where the weights came from: ``hub`` (timm's Hub weights, ``hub_id``), ``file`` (a local
  file, ``weights``, loaded by ``weights_loader``: ``promptvit`` for ``create_backbone(weights=...)``,
  ``timm`` for ``pretrained_cfg_overlay=dict(file=...)``), ``random`` (``init_seed``), or ``unknown``;
- ``kwargs``: the ``timm.create_model`` options that give the architecture (image and patch size, depth,
  width, heads, prefix tokens, pooling, window size...), with ``num_classes`` of the head it was built with;
- ``license`` of the base weights where timm names it; ``problem``: why the base cannot be rebuilt, if so.

A model made by ``create_backbone`` carries its record. For any other timm model the family's backbone
adapter reads the options off the modules and checks them by rebuilding the architecture on the meta
device (:meth:`BackboneAdapter.build_options`); the weights are matched against the file named in the
model's ``pretrained_cfg`` or timm's Hub weights in the local Hub cache. Weights matching neither (a random
init outside ``create_backbone``, weights loaded in place) are ``unknown``: such a base cannot be rebuilt
and loading needs ``base_model=``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from promptvit.backbones.base import BackboneError, adapter_for
from promptvit.backbones.creation import body_parameters, create_backbone, weights_fingerprint

ORIGINS = ("hub", "file", "random", "unknown")
UNKNOWN_WEIGHTS = (
    "its weights match neither a local file named in its pretrained_cfg nor timm's Hub weights in the local "
    "cache (a random initialisation outside promptvit.create_backbone, or weights loaded in place)"
)


def backbone_source(model: nn.Module, fingerprint: str | None = None) -> dict[str, Any]:
    """The record of how ``model`` was built (see the module docstring); ``fingerprint`` of its body if known."""
    recorded = getattr(model, "promptvit_source", None)
    if recorded is not None:
        record = {k: v for k, v in recorded.items() if k != "fingerprint"}
        fingerprint = fingerprint or weights_fingerprint(body_parameters(model))
        if recorded.get("fingerprint") in (None, fingerprint):
            return record
        return {
            **record,
            "origin": "unknown",
            "pretrained": False,
            "problem": "its weights changed after promptvit.create_backbone built it (trained or loaded in place)",
        }
    return _detected_source(model)


def _detected_source(model: nn.Module) -> dict[str, Any]:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    architecture = cfg.get("architecture")
    record: dict[str, Any] = {
        "name": None,
        "origin": "unknown",
        "pretrained": False,
        "weights": None,
        "kwargs": {},
    }
    if not architecture:
        return {
            **record,
            "problem": f"this {type(model).__name__} has no timm pretrained_cfg naming its architecture",
        }
    record["name"] = ".".join(filter(None, [architecture, cfg.get("tag")]))
    try:
        record["kwargs"] = adapter_for(model).build_options(architecture)
    except (BackboneError, RuntimeError) as error:
        return {**record, "problem": f"its architecture cannot be rebuilt by timm: {error}"}
    file = cfg.get("file")
    if file and _holds_weights(Path(file), model):
        return {
            **record,
            "origin": "file",
            "pretrained": True,
            "weights": str(Path(file).resolve()),
            "weights_loader": "timm",
        }
    hub_id = cfg.get("hf_hub_id")
    if hub_id and any(_holds_weights(path, model) for path in _cached_hub_files(hub_id, cfg)):
        return {
            **record,
            "origin": "hub",
            "pretrained": True,
            "hub_id": hub_id,
            "license": cfg.get("license"),
        }
    return {**record, "problem": UNKNOWN_WEIGHTS}


def _cached_hub_files(hub_id: str, cfg: dict[str, Any]) -> list[Path]:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    names = [
        cfg.get("hf_hub_filename"),
        "model.safetensors",
        "pytorch_model.bin",
        "open_clip_pytorch_model.bin",
    ]
    found = []
    for filename in dict.fromkeys(n for n in names if n):
        try:
            cached = try_to_load_from_cache(repo, filename, revision=revision or None)
        except ValueError:  # not a repository id the cache can hold
            return []
        if isinstance(cached, str):
            found.append(Path(cached))
    return found


def _holds_weights(path: Path, model: nn.Module) -> bool:
    """Whether ``model``'s body tensors are those of the file (same names and shapes, at least half of them;
    a position embedding resampled to another image size has another shape and is left out)."""
    body = body_parameters(model)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                stored = set(handle.keys())
                names = [
                    n for n in body if n in stored and list(handle.get_slice(n).get_shape()) == list(body[n].shape)
                ]
                if not names or 2 * len(names) < len(body):
                    return False
                return all(
                    torch.equal(body[n].detach().cpu(), handle.get_tensor(n).to(body[n].dtype)) for n in names
                )
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError):  # unreadable: no match
        return False
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        return False
    names = [n for n in body if isinstance(state.get(n), torch.Tensor) and state[n].shape == body[n].shape]
    if not names or 2 * len(names) < len(body):
        return False
    return all(torch.equal(body[n].detach().cpu(), state[n].to(body[n].dtype)) for n in names)


def origin_of(record: dict[str, Any]) -> str:
    """The record's origin; artifacts from before it was recorded say it with ``pretrained``/``weights``."""
    if record.get("origin") in ORIGINS:
        return record["origin"]
    return "file" if record.get("weights") else "hub" if record.get("pretrained") else "random"


def rebuild_problem(record: dict[str, Any]) -> str | None:
    """Why the record cannot rebuild its backbone, or None."""
    if record.get("problem"):
        return record["problem"]
    if not record.get("name"):
        return "it records no timm model name"
    if origin_of(record) == "unknown":
        return UNKNOWN_WEIGHTS
    return None


def base_model_call(record: dict[str, Any]) -> str:
    """The ``timm.create_model(...)`` call that builds the record's architecture, for messages."""
    options = {k: v for k, v in (record.get("kwargs") or {}).items() if k != "pretrained_cfg_overlay"}
    arguments = "".join(f", {k}={v!r}" for k, v in options.items())
    return f"timm.create_model({record.get('name') or 'NAME'!r}{arguments})"


def find_weights_file(record: dict[str, Any], near: Path | None) -> Path | None:
    """The local weights file of a ``file`` record: where it was recorded, else beside the artifact (``near``)."""
    recorded = Path(record["weights"])
    candidates = [recorded if recorded.is_absolute() or near is None else near / recorded]
    if near is not None:
        candidates.append(near / recorded.name)
    return next((path for path in candidates if path.is_file()), None)


def rebuild_backbone(record: dict[str, Any], weights_file: Path | None = None) -> nn.Module:
    """Build the backbone the record describes (``weights_file``: where a ``file`` record's weights are now)."""
    origin = origin_of(record)
    options = dict(record.get("kwargs") or {})
    seed = record.get("init_seed") or 0
    if origin == "file" and record.get("weights_loader") == "timm":
        # A state-dict file (safetensors or .pth: what the record matched), not timm's custom npz loading.
        overlay = {**options.pop("pretrained_cfg_overlay", {}), "file": str(weights_file), "custom_load": False}
        return create_backbone(
            record["name"], pretrained=True, init_seed=seed, pretrained_cfg_overlay=overlay, **options
        )
    if origin == "file":
        return create_backbone(record["name"], weights=weights_file, init_seed=seed, **options)
    return create_backbone(record["name"], pretrained=origin == "hub", init_seed=seed, **options)
