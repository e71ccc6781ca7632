"""Export a tuned model into the formats other tools load: a peft adapter, a plain timm checkpoint, ONNX.

``export(artifact_or_model, out, format)`` writes one folder and checks it before returning: the exported
model is loaded back through the target tool (peft, timm, onnxruntime) and its logits are compared with
the PromptModel's on a random batch. The comparison and its tolerance are recorded in ``export.json``
beside the files. How our LoRA maps onto peft's is described in ``docs/export.md``.

- ``peft``: methods with a peft form (LoRA: ``Method.peft_form``), with a README. Every adapted ``qkv`` gets a peft LoRA on the whole fused ``nn.Linear`` whose rank is
  ``len(targets) * rank``: A stacks the parts' A matrices, B is block structured (each part's B on its own
  rows, zeros on the rows of parts that are not targeted), ``lora_alpha = alpha * len(targets)`` keeps the
  scale ``alpha / rank``. The classifier is a ``modules_to_save`` entry.
- ``merged-timm``: methods whose effect lives in the backbone's own weights (or merges into them) become a
  ``model.safetensors`` + ``config.json`` folder in timm's Hub layout (``PromptModel.merge_and_unload`` of a
  copy); ``config.json`` carries the artifact's preprocessing and trained input size, its classes, and the
  base's licence and tag where they apply.
- ``onnx``: every method; merged first where the method can merge. Dynamic batch size.

A format the method cannot take is refused in one sentence naming why and the formats that work
(:func:`formats_for`). No exported file names a path of the machine that wrote it.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from promptvit.artifact import default_data_config, load, read_artifact_config, resolve_artifact_dir
from promptvit.backbones import origin_of
from promptvit.errors import ExportError, OutputError
from promptvit.hub import local_folder, peft_card, portable_config, without_local_paths
from promptvit.io import atomic_write_text, check_output_path, output_error, output_folder
from promptvit.model import PromptModel

FORMATS = ("peft", "onnx", "merged-timm")
EXPORT_FILE = "export.json"
#: every file an export writes, in any format; only these are ever replaced in an export folder
EXPORT_FILES = (
    EXPORT_FILE,
    "adapter_config.json",
    "adapter_model.safetensors",
    "model.safetensors",
    "config.json",
    "model.onnx",
    "README.md",
)
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

    ``out`` must be new, empty, or a folder promptvit made for an export (``io.output_folder``); an earlier
    export's files there are replaced, anything else in it is left alone.
    The returned dict is what ``export.json`` records (format, files, max_abs_diff, tolerance).
    ``input_size`` (height, width) of the check images and the ONNX input: default the artifact's
    ``data_config``, else the backbone's geometry.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    inputs = [source] if not isinstance(source, PromptModel) and Path(source).exists() else []
    output_folder(out, "export", inputs=inputs, legacy=EXPORT_FILES, create=False)  # claimed once written
    model, info = _resolve(source, base_model)
    model.eval()
    _check_format(model, format)
    if input_size is None:
        input_size = tuple(info["data_config"]["input_size"][1:])
    writer = {"peft": _write_peft, "merged-timm": _write_merged_timm, "onnx": _write_onnx}[format]
    try:  # the staging folder beside ``out``: a new name, removed in every case
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as error:
        raise output_error(out, error) from error
    try:
        record = writer(model, info, staging, tuple(input_size))
        record = {
            "format": format,
            "method": model.method.name,
            "base_model": portable_config(info)["base_model"],
            "num_classes": model.num_classes,
            "input_size": [3, *input_size],
            **{k: info[k] for k in ("class_names", "multilabel", "data_config") if k in info},
            **record,
            "tolerance": {"atol": ATOL, "rtol": RTOL, "of": "max |logits|"},
        }
        atomic_write_text(staging / EXPORT_FILE, json.dumps(record, indent=2, default=str) + "\n")
        _move_in(staging, output_folder(out, "export", inputs=inputs, legacy=EXPORT_FILES), record["files"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _move_in(staging: Path, out: Path, files: list[str]) -> None:
    """Replace the earlier export in ``out`` by the staged one, file by file; nothing else in ``out`` is touched.

    The old ``export.json`` goes first and the new one comes last, so a kill in between leaves a folder that
    says it holds no complete export rather than a mix that claims to be checked.
    """
    ours = _earlier_export(out)
    for name in (*EXPORT_FILES, *files):  # a link or folder planted under one of these names stops it here
        target = check_output_path(out / name)
        if name in files and target.exists() and name not in ours:
            raise OutputError(
                errno.EEXIST,
                f"{target} is not a file of the earlier export in {out}; move it away or export to a new folder",
            )
    for name in (EXPORT_FILE, *ours):
        (out / name).unlink(missing_ok=True)
    for name in (*files, EXPORT_FILE):
        os.replace(staging / name, out / name)


def _earlier_export(out: Path) -> set[str]:
    """The files of the export already in ``out``: every export file name, and a README only when the earlier
    ``export.json`` lists it (a README may be the user's own notes)."""
    try:
        listed = json.loads((out / EXPORT_FILE).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        listed = []
    return {n for n in EXPORT_FILES if n != "README.md" or n in listed}


def _resolve(source: str | Path | PromptModel, base_model: nn.Module | None) -> tuple[PromptModel, dict]:
    """The model and its artifact config (for a PromptModel, what ``save_pretrained`` would write)."""
    if isinstance(source, PromptModel):
        return source, {
            "method": source.method.name,
            "base_model": source.source,
            "num_classes": source.num_classes,
            "class_names": [f"class_{i}" for i in range(source.num_classes)],
            "multilabel": False,
            "data_config": default_data_config(source),
        }
    folder = resolve_artifact_dir(local_folder(source))
    return load(folder, base_model), read_artifact_config(folder)


def formats_for(model: PromptModel) -> list[str]:
    """The export formats that work for this model's method."""
    formats = ["peft"] if model.method.has_peft_form() else []
    if model.merge_problem() is None:
        formats.append("merged-timm")
    return [*formats, "onnx"]


def _check_format(model: PromptModel, format: str) -> None:
    working = formats_for(model)
    if format in working:
        return
    why = "Hugging Face peft has no equivalent of it" if format == "peft" else model.merge_problem()
    raise ExportError(
        f"method '{model.method.name}' cannot be exported as {format}: {why}; formats that work for it: "
        f"{', '.join(working)}"
    )


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


def _architecture(model: PromptModel) -> tuple[str, dict[str, Any]]:
    """timm's architecture name and the build options of the backbone, with the tuned head's size."""
    source = model.source
    if not source.get("name"):
        raise ExportError("the model records no timm architecture name; build it with create_backbone")
    skip = ("num_classes", "pretrained_cfg_overlay")
    kwargs = {k: v for k, v in (source.get("kwargs") or {}).items() if k not in skip}
    return source["name"].split(".")[0], {**kwargs, "num_classes": model.num_classes}


def _timm_config(model: PromptModel, info: dict[str, Any], path: Path) -> None:
    """timm's ``config.json`` made to describe these weights: the trained preprocessing and input size, the
    classes, and the base's tag and licence only where the weights still descend from timm's Hub weights."""
    config = json.loads(path.read_text(encoding="utf-8"))
    cfg = config.setdefault("pretrained_cfg", {})
    for key in ("file", "url", "hf_hub_id", "hf_hub_filename", "test_input_size", "test_crop_pct", "test_pool_size"):
        cfg.pop(key, None)
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    cfg.update({k: v for k, v in info["data_config"].items() if k in keys})
    base = info.get("base_model") or {}
    name = str(base.get("name") or "")
    cfg["tag"] = name.partition(".")[2] or None if origin_of(base) == "hub" else None
    cfg["license"] = base.get("license") or "unknown"
    cfg["num_classes"] = config["num_classes"] = model.num_classes
    config["label_names"] = [str(n) for n in info["class_names"]]
    cfg = {k: v for k, v in cfg.items() if v is not None}
    config["pretrained_cfg"] = cfg
    atomic_write_text(path, json.dumps(without_local_paths(config), indent=2) + "\n")


def _write_merged_timm(model: PromptModel, info: dict[str, Any], out: Path, size: tuple[int, int]) -> dict[str, Any]:
    from timm.models import save_for_hf

    images = _random_batch(size, 3, seed=0)
    expected = _reference_logits(model, images)
    merged = model.method.merges()
    plain = copy.deepcopy(model).merge_and_unload().cpu().eval()
    architecture, kwargs = _architecture(model)
    save_for_hf(plain, str(out), model_args=kwargs, safe_serialization=True)
    _timm_config(model, info, out / "config.json")
    # Load it back the way the README shows: timm's own loader with the file as the pretrained weights.
    try:
        loaded = timm.create_model(
            architecture,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=model.num_classes),
            **kwargs,
        ).eval()
    except (RuntimeError, TypeError, ValueError) as error:
        raise ExportError(
            f"timm cannot load the merged checkpoint as '{architecture}' with {kwargs} "
            f"({(str(error).splitlines() or [''])[0]}); keep the promptvit artifact or export to onnx"
        ) from error
    with torch.no_grad():
        diff = _compare(expected, loaded(images), "the timm checkpoint")
    return {
        "files": ["model.safetensors", "config.json"],
        "architecture": architecture,
        "model_args": kwargs,
        "merged": merged,
        "max_abs_diff": diff,
    }


def _merge(model: PromptModel) -> bool:
    """Merge the method into the backbone if it can; True if it did."""
    try:
        model.merge()
    except NotImplementedError:
        return False
    return True


# ---------------------------------------------------------------------------------------- peft


def _write_peft(model: PromptModel, info: dict[str, Any], out: Path, size: tuple[int, int]) -> dict[str, Any]:
    from peft import PeftModel

    if getattr(model.method, "merged", False):
        raise ExportError("the LoRA layers are merged into the backbone; unmerge() before exporting to peft")
    images = _random_batch(size, 3, seed=0)
    expected = _reference_logits(model, images)
    model.save_peft_adapter(out)
    adapter = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    atomic_write_text(out / "adapter_config.json", json.dumps(without_local_paths(adapter), indent=2) + "\n")
    atomic_write_text(out / "README.md", peft_card(portable_config(info)))
    # Load it back as a user would: the same timm backbone with a head of the right size, then peft's loader.
    base = copy.deepcopy(model).unload()
    base.reset_classifier(model.num_classes)
    loaded = PeftModel.from_pretrained(base.cpu(), str(out)).eval()
    with torch.no_grad():
        diff = _compare(expected, loaded(images), "the peft adapter")
    return {
        "files": ["adapter_config.json", "adapter_model.safetensors", "README.md"],
        "target_modules": adapter["target_modules"],
        "modules_to_save": adapter["modules_to_save"],
        "peft_rank": adapter["r"],
        "peft_lora_alpha": adapter["lora_alpha"],
        "max_abs_diff": diff,
    }


# ---------------------------------------------------------------------------------------- onnx


def _write_onnx(model: PromptModel, info: dict[str, Any], out: Path, size: tuple[int, int]) -> dict[str, Any]:
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
