"""Export a tuned model into the formats other tools load: a peft adapter, a plain timm checkpoint, ONNX.

``export(artifact_or_model, out, format)`` writes one folder and checks it before returning: the exported
model is loaded back through the target tool (peft, timm, onnxruntime) and its logits are compared with
the PromptModel's on a random batch. The comparison and its tolerance are recorded in ``export.json``
beside the files. How our LoRA maps onto peft's is described in ``docs/export.md``.

- ``peft``: LoRA only. Every adapted ``qkv`` gets a peft LoRA on the whole fused ``nn.Linear`` whose rank is
  ``len(targets) * rank``: A stacks the parts' A matrices, B is block structured (each part's B on its own
  rows, zeros on the rows of parts that are not targeted), ``lora_alpha = alpha * len(targets)`` keeps the
  scale ``alpha / rank``. The classifier is a ``modules_to_save`` entry.
- ``merged-timm``: methods whose effect lives in the backbone's own weights (or merges into them) become a
  ``model.safetensors`` + ``config.json`` folder in timm's Hub layout.
- ``onnx``: every method; merged first where the method can merge. Dynamic batch size.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from promptvit.artifact import ArtifactError, load, read_artifact_config
from promptvit.errors import ExportError
from promptvit.io import atomic_write_text
from promptvit.layers.base import PerAdapter, TunerLayer
from promptvit.layers.heads import AdapterHeads
from promptvit.layers.lora import FusedLoRALinear
from promptvit.model import PromptModel

FORMATS = ("peft", "onnx", "merged-timm")
EXPORT_FILE = "export.json"
#: exported logits must agree with the PromptModel's within ATOL + RTOL * max|logits| (float32, CPU)
ATOL, RTOL = 1e-4, 1e-4
ONNX_OPSET = 17


def export(
    source: str | Path | PromptModel,
    out: str | Path,
    format: str,
    *,
    base_model: nn.Module | None = None,
    input_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Export an artifact folder (or run folder, or a PromptModel) to ``out`` in ``format``; return the check.

    ``out`` must not exist, be empty, or hold an earlier export (it is then replaced); anything else is
    refused. The returned dict is what ``export.json`` records (format, files, max_abs_diff, tolerance).
    ``input_size`` (height, width) of the check images and the ONNX input: default the artifact's
    ``data_config``, else the backbone's geometry.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    _check_out(out)
    model, info = _resolve(source, base_model)
    model.eval()
    if input_size is None:
        input_size = tuple(info.get("data_config", {}).get("input_size", [3, *model.geometry.img_size])[1:])
    writer = {"peft": _write_peft, "merged-timm": _write_merged_timm, "onnx": _write_onnx}[format]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        record = writer(model, staging, tuple(input_size))
        record = {
            "format": format,
            "method": model.method.name,
            "base_model": model.source,
            "num_classes": model.num_classes,
            "input_size": [3, *input_size],
            **{k: info[k] for k in ("class_names", "multilabel", "data_config") if k in info},
            **record,
            "tolerance": {"atol": ATOL, "rtol": RTOL, "of": "max |logits|"},
        }
        atomic_write_text(staging / EXPORT_FILE, json.dumps(record, indent=2, default=str) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _check_out(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir() or out.is_symlink():
        raise ExportError(f"--out {out} exists and is not a folder; choose a new folder")
    if any(out.iterdir()) and not (out / EXPORT_FILE).is_file():
        raise ExportError(
            f"--out {out} is a non-empty folder that holds no earlier export; choose a new or empty folder"
        )


def _resolve(source: str | Path | PromptModel, base_model: nn.Module | None) -> tuple[PromptModel, dict]:
    if isinstance(source, PromptModel):
        return source, {}
    path = Path(source)
    for candidate in (path, path / "artifact"):
        try:
            info = read_artifact_config(candidate)
        except ArtifactError:
            continue
        return load(candidate, base_model), info
    raise ArtifactError(f"{path} is neither an artifact folder nor a run folder with artifact/ inside")


# ---------------------------------------------------------------------------------------- checks


def _random_batch(size: tuple[int, int], batch: int, seed: int) -> torch.Tensor:
    height, width = size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)


@torch.no_grad()
def _reference_logits(model: PromptModel, images: torch.Tensor) -> torch.Tensor:
    return model(images.to(_device(model))).float().cpu()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _compare(expected: torch.Tensor, actual: torch.Tensor, what: str) -> float:
    actual = torch.as_tensor(actual).float().cpu()
    if actual.shape != expected.shape:
        raise ExportError(f"{what} gives logits of shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    diff = (actual - expected).abs().max().item()
    bound = ATOL + RTOL * expected.abs().max().item()
    if not diff <= bound:
        raise ExportError(
            f"{what} computes other logits than the tuned model (max abs diff {diff:.3g} > {bound:.3g}); "
            "the export was not written"
        )
    return diff


# ---------------------------------------------------------------------------------------- plain timm


def _plain_state(model: PromptModel) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The backbone as timm names it, with the active adapter's head and in-place weights, and the adapter's
    tensors that have no place in a plain model (LoRA factors, bottlenecks, MLP head layers...).

    Injected tuner layers keep the module they wrap as ``base_layer``; that level is dropped from the names,
    and the other adapters' tensors (in ``PerAdapter`` containers) are left out.
    """
    containers = [name for name, m in model.backbone.named_modules() if isinstance(m, PerAdapter)]
    state = {
        ".".join(part for part in name.split(".") if part != "base_layer"): tensor.detach().cpu()
        for name, tensor in model.backbone.state_dict().items()
        if not any(name.startswith(f"{container}.") for container in containers)
    }
    extra = []
    for key, tensor in model.tuned_state_dict().items():
        name = key.removeprefix("backbone.")
        if key.startswith("backbone.") and name in state:
            state[name] = tensor.detach().cpu()  # the adapter's head, weights it tunes in place
        else:
            extra.append(key)
    return state, extra


def _architecture(model: PromptModel) -> tuple[str, dict[str, Any]]:
    source = model.source
    if not source.get("name"):
        raise ExportError("the model records no timm architecture name; build it with create_backbone")
    kwargs = {k: v for k, v in source.get("kwargs", {}).items() if k != "num_classes"}
    return source["name"].split(".")[0], {**kwargs, "num_classes": model.num_classes}


def _plain_model(model: PromptModel) -> nn.Module:
    """A fresh timm model of the same architecture holding the backbone's current (unmerged) tensors."""
    architecture, kwargs = _architecture(model)
    plain = timm.create_model(architecture, pretrained=False, **kwargs)
    state, _ = _plain_state(model)
    try:
        plain.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ExportError(
            f"the tuned backbone does not fit a plain timm '{architecture}' with {kwargs}: "
            f"{str(error).splitlines()[-1].strip()}"
        ) from error
    return plain.eval()


def _not_mergeable(model: PromptModel, why: str) -> ExportError:
    return ExportError(
        f"method '{model.method.name}' cannot be written as a plain timm checkpoint: {why}; "
        "export it with --format onnx, or keep the promptvit artifact"
    )


def _write_merged_timm(model: PromptModel, out: Path, size: tuple[int, int]) -> dict[str, Any]:
    from timm.models import save_for_hf

    own = [n for n in model.tuned_state_dict() if not n.startswith("backbone.")]
    if own:
        raise _not_mergeable(model, f"it adds its own tensors ({', '.join(own[:3])})")
    changes = sorted({entry.kind for entry in model.method.injections if entry.kind != "replace"})
    if changes:
        raise _not_mergeable(model, f"it changes the forward outside the weights ({', '.join(changes)})")
    images = _random_batch(size, 3, seed=0)
    expected = _reference_logits(model, images)
    layers = _adapter_layers(model)
    merged = _merge(model)
    try:
        if layers and not merged:
            raise _not_mergeable(model, f"its layers ({', '.join(sorted(layers)[:3])}) do not merge")
        # once merged, the layers' own tensors are in the frozen weights
        _, extra = _plain_state(model)
        extra = [key for key in extra if not any(key.startswith(f"backbone.{name}.") for name in layers)]
        if extra:
            raise _not_mergeable(model, f"it adds its own tensors ({', '.join(extra[:3])})")
        try:
            plain = _plain_model(model)
        except ExportError as error:
            raise _not_mergeable(model, str(error)) from error
    finally:
        if merged:
            model.unmerge()
    architecture, kwargs = _architecture(model)
    save_for_hf(plain, str(out), model_args=kwargs, safe_serialization=True)
    # Load it back the way the README shows: timm's own loader with the file as the pretrained weights.
    loaded = timm.create_model(
        architecture,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=model.num_classes),
        **kwargs,
    ).eval()
    with torch.no_grad():
        diff = _compare(expected, loaded(images), "the timm checkpoint")
    return {
        "files": ["model.safetensors", "config.json"],
        "architecture": architecture,
        "model_args": kwargs,
        "merged": merged,
        "max_abs_diff": diff,
    }


def _adapter_layers(model: PromptModel) -> list[str]:
    """Names (as timm's) of the tuner layers that hold the active adapter's tensors, heads aside."""
    return [
        ".".join(part for part in name.split(".") if part != "base_layer")
        for name, m in model.backbone.named_modules()
        if isinstance(m, TunerLayer)
        and not isinstance(m, AdapterHeads)
        and model.active_adapter in m.adapter_names
    ]


def _merge(model: PromptModel) -> bool:
    """Merge the method into the backbone if it can; True if it did."""
    try:
        model.merge()
    except NotImplementedError:
        return False
    return True


# ---------------------------------------------------------------------------------------- peft


def _write_peft(model: PromptModel, out: Path, size: tuple[int, int]) -> dict[str, Any]:
    from peft import LoraConfig, PeftModel, get_peft_model

    active = model.active_adapter
    layers = {
        ".".join(part for part in n.split(".") if part != "base_layer"): m.lora[active]
        for n, m in model.backbone.named_modules()
        if isinstance(m, FusedLoRALinear) and active in m.lora
    }
    if not layers:
        raise ExportError(
            f"--format peft exports LoRA artifacts; method '{model.method.name}' has no LoRA layers "
            "(use --format onnx or merged-timm)"
        )
    first = next(iter(layers.values()))
    shapes = {(m.parts, m.rank, m.alpha, m.num_parts) for m in layers.values()}
    if len(shapes) != 1:
        raise ExportError(f"LoRA layers with different parts/rank/alpha cannot share one peft config: {shapes}")
    if any(m.merged for m in layers.values()):
        raise ExportError("the LoRA layers are merged into the backbone; unmerge() before exporting to peft")
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    num_targets = len(first.parts)
    images = _random_batch(size, 3, seed=0)
    expected = _reference_logits(model, images)
    config = LoraConfig(
        r=num_targets * first.rank,
        lora_alpha=first.alpha * num_targets,  # peft scales by lora_alpha / r: alpha / rank, as ours
        lora_dropout=dropout,
        target_modules=sorted(layers),
        modules_to_save=[model.head_name],
        bias="none",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(_plain_model(model), config)
    # Set after wrapping: peft resets it from the model, which a timm model does not name.
    peft_model.peft_config["default"].base_model_name_or_path = model.source.get("name")
    with torch.no_grad():
        for name, layer in layers.items():
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A.reshape(num_targets * layer.rank, -1))
            target.lora_B["default"].weight.copy_(layer.stacked_lora_B())
    peft_model.save_pretrained(str(out), save_embedding_layers=False)  # a ViT has no vocabulary to check
    # Load it back as a user would: a plain timm model of the same weights, then PeftModel.from_pretrained.
    loaded = PeftModel.from_pretrained(_plain_model(model), str(out)).eval()
    with torch.no_grad():
        diff = _compare(expected, loaded(images), "the peft adapter")
    return {
        "files": ["adapter_config.json", "adapter_model.safetensors"],
        "target_modules": sorted(layers),
        "modules_to_save": [model.head_name],
        "peft_rank": config.r,
        "peft_lora_alpha": config.lora_alpha,
        "max_abs_diff": diff,
    }


# ---------------------------------------------------------------------------------------- onnx


def _write_onnx(model: PromptModel, out: Path, size: tuple[int, int]) -> dict[str, Any]:
    import warnings

    try:
        import onnxruntime
    except ImportError as error:
        raise ExportError("--format onnx needs onnx and onnxruntime: pip install 'promptvit[export]'") from error
    traced_batch, checked_batch = _random_batch(size, 2, seed=0), _random_batch(size, 3, seed=1)
    expected = _reference_logits(model, checked_batch)
    merged = _merge(model)
    device = _device(model)
    model.cpu()
    try:
        with warnings.catch_warnings():  # the tracer's notes on Python control flow it fixes at export time
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (traced_batch,),
                str(out / "model.onnx"),
                dynamo=False,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=ONNX_OPSET,
            )
    finally:
        if merged:
            model.unmerge()
        model.to(device)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["logits"], {"images": checked_batch.numpy()})
    diff = _compare(expected, torch.from_numpy(actual), "the ONNX model (onnxruntime)")
    return {
        "files": ["model.onnx"],
        "opset": ONNX_OPSET,
        "inputs": {"images": ["batch", 3, *size]},
        "merged": merged,
        "checked_batch_size": checked_batch.shape[0],
        "traced_batch_size": traced_batch.shape[0],
        "max_abs_diff": diff,
    }
