"""Efficiency portrait (AP, Zhang et al., Table 2): tuned parameters, peak training memory, time per epoch,
training and inference throughput, for several methods on one backbone, measured side by side in one run.

What is measured, per method (``promptvit.wrap(backbone_factory(), method, num_classes=..., **options)``):

* tuned parameters: ``PromptModel.parameter_summary()`` (method + head) and their share of all parameters;
* peak training memory over ``memory_steps`` training steps after a warm-up step, measured for one method
  at a time:

  - CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated before the model was built (so
    weights, gradients, optimiser state and activations count), label "peak CUDA allocated";
  - CPU: in a fresh subprocess per method (``forkserver``: forked from a server process that only imported
    this module; ``spawn`` where forkserver does not exist), the growth of the process's peak resident set
    size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, reset to the current RSS first where Linux allows)
    from its current RSS just before the model is built to the end of the steps, label "peak RSS (CPU)". It includes the backbone weights and allocator
    slack, so compare methods within one portrait only. ``backbone_factory`` must then be picklable (a
    module-level function or a ``functools.partial`` of one); otherwise, or if the subprocess fails,
    memory is ``None`` with the reason;
* training step time: ``steps`` optimiser steps (AdamW on the tuned parameters, cross-entropy on a fixed
  random batch, plus the method's ``auxiliary_loss`` if any) timed with a wall clock (CUDA synchronised);
  training throughput = images / second of those steps; seconds per epoch = ``epoch_images`` / training
  throughput (estimated from step time: data loading and validation are excluded);
* inference throughput: ``steps`` forward passes in eval mode under ``torch.inference_mode``.

Each timing is repeated ``repeats`` times, round-robin over the methods (method A, B, C, then A, B, C...)
so that drifts of the machine hit every method alike; min / median / max over repeats are reported. The
linear probe is always measured in the same run (added if absent) and every method gets the ratio of its
median (memory: its value) to the linear probe's. One-off costs (data-driven initialisation of SPT-style
methods, model building) are not timed.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MEMORY_LABELS = {"cuda": "peak CUDA allocated", "cpu": "peak RSS (CPU)"}


def _wrap(
    backbone_factory: Callable[[], nn.Module], method: str, options: dict, num_classes: int
) -> nn.Module:
    from promptvit.model import wrap

    return wrap(backbone_factory(), method, num_classes=num_classes, **options)


def _image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def _batch(
    batch_size: int, image_size: int | Sequence[int], num_classes: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, *_image_hw(image_size), generator=generator)
    targets = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return images.to(device), targets.to(device)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4)


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, targets: torch.Tensor
) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), targets)
    method = getattr(model, "method", None)
    aux = method.auxiliary_loss(model, targets) if method is not None else None
    if aux is not None:
        loss = loss + aux
    loss.backward()
    optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kb_now() -> float | None:
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1024
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_kb() -> float:
    import resource

    peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak / 1024 if sys.platform == "darwin" else peak  # macOS reports bytes, Linux kilobytes


def _warm_up_torch() -> None:
    """Initialise torch's thread pools, allocator and autograd on throwaway tensors, so that their one-off
    memory is not charged to the method measured next."""
    weight = torch.randn(3, 3, 3, 3, requires_grad=True)
    linear = torch.randn(16, 16, requires_grad=True)
    optimizer = torch.optim.AdamW([weight, linear], lr=1e-4)
    x = F.conv2d(torch.randn(2, 3, 8, 8), weight).flatten(2).mean(-1)
    y = F.layer_norm(F.gelu(torch.randn(2, 4, 16) @ linear), (16,)).softmax(-1).mean((1, 2))
    F.cross_entropy(torch.cat([x, y[:, None]], 1), torch.zeros(2, dtype=torch.long)).backward()
    optimizer.step()
    with torch.inference_mode():
        F.scaled_dot_product_attention(*torch.randn(3, 1, 2, 4, 8).unbind(0))


def _reset_peak_rss() -> None:
    """Linux >= 4.0: reset the peak RSS (ru_maxrss) to the current RSS, so that transient peaks from
    before the measurement (imports, the server process) do not mask the training peak."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _cpu_memory_child(
    backbone_factory: Callable[[], nn.Module],
    method: str,
    options: dict,
    num_classes: int,
    batch_size: int,
    image_size: int | Sequence[int],
    steps: int,
    threads: int,
    seed: int,
) -> dict[str, float]:
    """Runs in a fresh spawned process: peak RSS growth (MB) over building + training steps."""
    torch.set_num_threads(threads)
    images, targets = _batch(batch_size, image_size, num_classes, torch.device("cpu"), seed)
    _warm_up_torch()
    gc.collect()
    _reset_peak_rss()
    before = _rss_kb_now() or _maxrss_kb()
    model = _wrap(backbone_factory, method, options, num_classes)
    model.train()
    optimizer = _optimizer(model)
    for _ in range(1 + steps):
        _train_step(model, optimizer, images, targets)
    peak = _maxrss_kb()
    return {
        "memory_mb": max(0.0, peak - before) / 1024,
        "process_peak_mb": peak / 1024,
        "baseline_mb": before / 1024,
    }


def _fresh_process_context() -> Any:
    """A multiprocessing context whose children are fresh processes that never built a model.

    ``forkserver`` (POSIX) forks each child from a server process that only imported this module, so a
    child starts in well under a second instead of re-importing torch and timm; ``spawn`` elsewhere.
    """
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


def _cpu_memory(spec: dict, common: dict) -> tuple[float | None, str]:
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    try:
        pickle.dumps(common["backbone_factory"])
    except Exception as error:  # lambdas, local functions
        return None, (
            f"memory not measured: backbone_factory cannot be sent to a fresh process ({type(error).__name__}: "
            f"{error}); pass a module-level function or a functools.partial of one"
        )
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=_fresh_process_context()) as pool:
            result = pool.submit(
                _cpu_memory_child,
                common["backbone_factory"],
                spec["method"],
                spec["options"],
                common["num_classes"],
                common["batch_size"],
                common["image_size"],
                common["memory_steps"],
                torch.get_num_threads(),
                common["seed"],
            ).result()
    except Exception as error:  # crash of the child, method error...
        return None, f"memory not measured: {type(error).__name__}: {error}"
    return result["memory_mb"], (
        f"growth of peak RSS in a fresh process (process peak {result['process_peak_mb']:.0f} MB, "
        f"baseline before building the model {result['baseline_mb']:.0f} MB)"
    )


def _cuda_memory(spec: dict, common: dict, device: torch.device) -> tuple[float | None, str]:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model = _wrap(common["backbone_factory"], spec["method"], spec["options"], common["num_classes"]).to(
        device
    )
    model.train()
    optimizer = _optimizer(model)
    images, targets = _batch(
        common["batch_size"], common["image_size"], common["num_classes"], device, common["seed"]
    )
    for _ in range(1 + common["memory_steps"]):
        _train_step(model, optimizer, images, targets)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del model, optimizer, images, targets
    gc.collect()
    torch.cuda.empty_cache()
    return peak / 2**20, "torch.cuda.max_memory_allocated above the allocation before building the model"


def _summary(values: list[float]) -> dict[str, Any]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "values": values}


def _labels(methods: Sequence[tuple[str, dict]]) -> list[str]:
    names = [name for name, _ in methods]
    labels = []
    for name, options in methods:
        if names.count(name) > 1 and options:
            labels.append(f"{name}(" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + ")")
        else:
            labels.append(name)
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


def efficiency_portrait(
    backbone_factory: Callable[[], nn.Module],
    methods: list[tuple[str, dict]],
    *,
    num_classes: int,
    batch_size: int,
    image_size: int | Sequence[int],
    steps: int = 10,
    repeats: int = 3,
    device: str | torch.device = "cpu",
    epoch_images: int = 1000,
    warmup: int = 2,
    memory_steps: int = 2,
    measure_memory: bool = True,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Measure every method (plus the linear probe) side by side; one row (dict) per method.

    Row keys: ``label``, ``method``, ``options``, ``reference`` (True for the linear probe), ``tuned_params``,
    ``method_params``, ``head_params``, ``total_params``, ``tuned_percent``, ``memory_mb``, ``memory_label``,
    ``memory_note``, ``train_step_s``, ``train_img_s``, ``epoch_s``, ``infer_img_s`` (each
    ``{min, median, max, values}``), ``ratio_to_linear`` and the settings (``device``, ``batch_size``,
    ``image_size``, ``steps``, ``repeats``, ``epoch_images``).
    """
    if steps < 1 or repeats < 1 or batch_size < 1:
        raise ValueError("steps, repeats and batch_size must be >= 1")
    device = torch.device(device)
    from promptvit.methods import baseline_method

    specs_in = list(methods)
    baseline = baseline_method()
    if not any(name == baseline for name, _ in specs_in):
        specs_in = [(baseline, {}), *specs_in]
    labels = _labels(specs_in)
    specs = [
        {"label": label, "method": name, "options": dict(options), "reference": name == baseline}
        for label, (name, options) in zip(labels, specs_in, strict=True)
    ]
    reference = next(s for s in specs if s["reference"])
    common = {
        "backbone_factory": backbone_factory,
        "num_classes": num_classes,
        "batch_size": batch_size,
        "image_size": image_size,
        "memory_steps": memory_steps,
        "seed": seed,
    }
    kind = "cuda" if device.type == "cuda" else "cpu"

    # 1) memory, one method at a time
    memory: dict[str, tuple[float | None, str]] = {}
    for spec in specs:
        if not measure_memory:
            memory[spec["label"]] = (None, "not measured (measure_memory=False)")
        elif kind == "cuda":
            memory[spec["label"]] = _cuda_memory(spec, common, device)
        else:
            memory[spec["label"]] = _cpu_memory(spec, common)

    # 2) timing, all models alive, round-robin over repeats
    models, optimizers, summaries = {}, {}, {}
    images, targets = _batch(batch_size, image_size, num_classes, device, seed)
    for spec in specs:
        model = _wrap(backbone_factory, spec["method"], spec["options"], num_classes).to(device)
        models[spec["label"]] = model
        optimizers[spec["label"]] = _optimizer(model)
        summaries[spec["label"]] = model.parameter_summary()
        model.train()
        for _ in range(warmup):
            _train_step(model, optimizers[spec["label"]], images, targets)
        model.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                model(images)
        model.train()
    train_times: dict[str, list[float]] = {s["label"]: [] for s in specs}
    infer_times: dict[str, list[float]] = {s["label"]: [] for s in specs}
    for _ in range(repeats):
        for spec in specs:
            label = spec["label"]
            model, optimizer = models[label], optimizers[label]
            model.train()
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                _train_step(model, optimizer, images, targets)
            _sync(device)
            train_times[label].append((time.perf_counter() - start) / steps)
            model.eval()
            with torch.inference_mode():
                _sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    model(images)
                _sync(device)
            infer_times[label].append((time.perf_counter() - start) / steps)
            model.train()
    del models, optimizers

    rows = []
    for spec in specs:
        label = spec["label"]
        summary = summaries[label]
        step = train_times[label]
        rows.append(
            {
                **spec,
                "tuned_params": summary["tuned"],
                "method_params": summary["method"],
                "head_params": summary["head"],
                "total_params": summary["total"],
                "tuned_percent": 100.0 * summary["tuned"] / summary["total"],
                "memory_mb": memory[label][0],
                "memory_label": MEMORY_LABELS[kind],
                "memory_note": memory[label][1],
                "train_step_s": _summary(step),
                "train_img_s": _summary([batch_size / t for t in step]),
                "epoch_s": _summary([epoch_images / (batch_size / t) for t in step]),
                "infer_img_s": _summary([batch_size / t for t in infer_times[label]]),
                "device": str(device),
                "batch_size": batch_size,
                "image_size": list(_image_hw(image_size)),
                "steps": steps,
                "repeats": repeats,
                "epoch_images": epoch_images,
            }
        )
    ref = next(r for r in rows if r["label"] == reference["label"])
    for row in rows:
        row["ratio_to_linear"] = {
            "tuned_params": _ratio(row["tuned_params"], ref["tuned_params"]),
            "memory": _ratio(row["memory_mb"], ref["memory_mb"]),
            "epoch_s": _ratio(row["epoch_s"]["median"], ref["epoch_s"]["median"]),
            "train_img_s": _ratio(row["train_img_s"]["median"], ref["train_img_s"]["median"]),
            "infer_img_s": _ratio(row["infer_img_s"]["median"], ref["infer_img_s"]["median"]),
        }
    return rows


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return float(value) / float(reference)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def _spread(stat: dict[str, Any]) -> str:
    return f"{_fmt(stat['median'])} [{_fmt(stat['min'])}–{_fmt(stat['max'])}]"


def efficiency_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: median [min–max] over repeats, and ratios to the linear probe (x linear)."""
    if not rows:
        return ""
    first = rows[0]
    header = (
        f"Efficiency portrait: device {first['device']}, batch {first['batch_size']}, "
        f"images {first['image_size'][0]}x{first['image_size'][1]}, {first['steps']} steps x "
        f"{first['repeats']} repeats, epoch = {first['epoch_images']} images (estimated from step time).\n\n"
    )
    mem = first["memory_label"]
    lines = [
        f"| method | tuned params | tuned % | {mem} (MB) | s/epoch | train img/s | inference img/s | "
        "x linear: params / memory / s/epoch / train / inference |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        r = row["ratio_to_linear"]
        ratios = " / ".join(
            _fmt(r[k]) for k in ("tuned_params", "memory", "epoch_s", "train_img_s", "infer_img_s")
        )
        lines.append(
            f"| {row['label']} | {row['tuned_params']:,} | {row['tuned_percent']:.3f} | {_fmt(row['memory_mb'])} | "
            f"{_spread(row['epoch_s'])} | {_spread(row['train_img_s'])} | {_spread(row['infer_img_s'])} | {ratios} |"
        )
    return header + "\n".join(lines) + "\n"


def plot_efficiency(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Five bar panels (params, memory, s/epoch, train and inference img/s); whiskers = min–max over repeats."""
    import numpy as np

    from promptvit.analysis._plotting import colour, new_figure, save_figure

    labels = [r["label"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = new_figure(1, 5, width=3.4, height=3.6)
    panels = [
        ("tuned parameters", "parameters (log scale)", [r["tuned_params"] for r in rows], None),
        (rows[0]["memory_label"] if rows else "memory", "MB", [r["memory_mb"] or 0.0 for r in rows], None),
        ("time per epoch", f"s / {rows[0]['epoch_images'] if rows else ''} images", None, "epoch_s"),
        ("training throughput", "images / s", None, "train_img_s"),
        ("inference throughput", "images / s", None, "infer_img_s"),
    ]
    for ax, (title, unit, values, key) in zip(axes[0], panels, strict=True):
        if key is None:
            heights = np.asarray(values, dtype=float)
            errors = None
        else:
            heights = np.asarray([r[key]["median"] for r in rows])
            errors = np.asarray(
                [
                    [r[key]["median"] - r[key]["min"] for r in rows],
                    [r[key]["max"] - r[key]["median"] for r in rows],
                ]
            )
        ax.bar(x, heights, yerr=errors, capsize=3, color=[colour(i) for i in range(len(rows))])
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=9)
        if key is None and title == "tuned parameters" and np.all(heights > 0):
            ax.set_yscale("log")
    if rows:
        fig.suptitle(
            f"Efficiency portrait ({rows[0]['device']}, batch {rows[0]['batch_size']}; bars = median, "
            f"whiskers = min–max over {rows[0]['repeats']} repeats)",
            fontsize=10,
        )
    save_figure(fig, path)
