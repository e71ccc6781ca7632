"""``analyze``: every applicable analysis view of a model (and optional comparison models) on a dataset.

One pass per model over a seeded subsample collects the final pre-logits features and, for ViTs, the
block inputs/outputs and attention (reduced on the fly, so memory stays small). Then:

* calibration (all models): ``calibration.png`` (EPT Fig. 2 views) and scatter statistics;
* average attention distance (ViTs): ``attention_distance.png``, in input pixels;
* attention maps (ViTs): ``attention_maps_<model>.png``: CLS -> patches (models with a class token) and the
  first prompt tokens -> patches (models that insert prompt tokens), head-averaged, for a few images and
  a shallow, middle and last block (DA-VPT Fig. 3);
* prompt/patch NMI (models that insert prompt tokens): ``nmi.png`` (SPT eq. 7-8);
* prompt/patch CKA (models that insert prompt tokens): ``cka_prompts_patches_<model>.png`` (SPT Fig. S4);
* layer x layer CKA between the main model and each comparison model: ``cka_layers_<main>_vs_<other>.png``
  (AP Fig. 5A; ViT blocks and/or CNN stages);
* token scale (attention layers exposing ``token_scale``, e.g. a cooperating EPT): ``token_scale.png``;

and ``analysis.json`` with every number drawn, the sample, the definitions and the views skipped (why).
Only files inside ``out_dir`` are written, and only into a new or empty folder or an earlier analysis
(``promptvit.io.output_folder``): a run or artifact folder, or any folder holding other files, is refused. The models are left as they were (modes restored, hooks removed).

Labels for colouring: single-label targets are the class index; multi-label (multi-hot) targets use the
first positive class, or -1 drawn as "none" when no class is positive.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from promptvit.analysis import attention as attn_mod
from promptvit.analysis._plotting import colour, new_figure, safe_name, save_figure
from promptvit.analysis.calibration import plot_calibration
from promptvit.analysis.cka import cka_matrix, plot_cka_heatmap, prompt_patch_cka
from promptvit.analysis.extract import (
    BlockRecorder,
    TokenLayout,
    configured_prompt_length,
    eval_mode,
    geometry_for,
    layer_modules,
    model_device,
    patch_grid,
    pool_layer_output,
    pool_tokens,
    stage_map,
)
from promptvit.analysis.nmi import block_input_nmi, plot_nmi, summarize_layers
from promptvit.analysis.reliability import reliability_view
from promptvit.backbones import BackboneError
from promptvit.evaluation.probability import DEFAULT_BINS, scores_from_logits
from promptvit.io import atomic_write_text, output_folder

#: what an analysis folder holds; an older promptvit wrote these before folders were marked
ANALYSIS_FILES = ("analysis.json", "*.png")

DEFINITIONS = {
    "calibration": (
        "tr(Sigma_W) = (1/N) sum_c sum_{i in c} ||x_i - mu_c||^2; tr(Sigma_B) = (1/N) sum_c n_c ||mu_c - mu||^2; "
        "ratio = tr(Sigma_B)/tr(Sigma_W); mean_distance = per-class mean of ||x_i - mu_c||. Features: final "
        "pre-logits features, unstandardised. PCA fitted per model on all sampled features; t-SNE seeded, "
        "PCA init, perplexity min(30, N-1)."
    ),
    "attention_distance": (
        "per head: mean over query patches of sum_j a_ij d(i,j) over key patches, with prefix and prompt tokens "
        "removed and each row renormalised over patch keys; d = Euclidean distance between patch centres in "
        "input pixels; averaged over images. Attention recomputed from the family's attention parts (rotary "
        "positions, relative position bias included) unless the attention layer exposes attention_weights(x)."
    ),
    "attention_maps": (
        "CLS (or prompt) query's attention probabilities on the patch keys, averaged over heads, on the patch "
        "grid; drawn upsampled (bilinear) over the image, one colour scale per column (0 to its maximum)."
    ),
    "nmi": (
        "SPT eq. 7-8 per image on the input of each block: pi(k,j) = sigmoid(p_k . e_j) / sum sigmoid(...), "
        "NMI = 2 I / (H_P + H_E); raw dot product times nmi_scale; mean and std over images."
    ),
    "cka_prompts_patches": (
        "linear CKA over images between the mean prompt token of block i's output and the mean patch token "
        "of block j's output (rows: prompt block, columns: patch block)."
    ),
    "cka_layers": (
        "linear CKA over images between per-layer representations of two models: mean patch token of each "
        "ViT block output (prefix and prompts excluded) or global average pool of each CNN stage output."
    ),
    "token_scale": "mean and std over images and tokens of the attention layer's token_scale(x), per head.",
}


def _to_jsonable(value: Any) -> Any:
    """Numpy/torch to lists; NaN and infinities to null (strict JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return _to_jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return value


def _label_of(target: Any) -> int:
    t = torch.as_tensor(target)
    if t.dim() == 0:
        return int(t)
    if t.dim() == 1:
        positive = torch.nonzero(t > 0.5).reshape(-1)
        return int(positive[0]) if positive.numel() else -1
    raise ValueError(f"targets must be class indices or multi-hot vectors, got shape {tuple(t.shape)}")


def _model_name(model: nn.Module) -> str:
    method = getattr(model, "method", None)
    return getattr(method, "name", None) or type(model).__name__


class _RunState:
    """Accumulators of one model's pass."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.hw: tuple[int, int] = (0, 0)
        self.seen = 0
        self.features: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.layer_reps: list[list[torch.Tensor]] = [[] for _ in range(depth)]
        self.prompt_reps: list[list[torch.Tensor]] = [[] for _ in range(depth)]
        self.nmi: list[list[torch.Tensor]] = [[] for _ in range(depth)]
        self.prompts_in: list[int | None] = [None] * depth
        self.dist_sum: dict[int, torch.Tensor] = {}
        self.share_sum: dict[int, dict[str, torch.Tensor]] = {}
        self.sources: dict[int, str] = {}
        self.scale_sum: dict[int, torch.Tensor] = {}
        self.scale_sq: dict[int, torch.Tensor] = {}
        self.scale_count: dict[int, int] = {}
        self.cls_maps: dict[int, list[torch.Tensor]] = {}
        self.prompt_maps: dict[int, list[torch.Tensor]] = {}
        self.map_images: list[torch.Tensor] = []
        self.attention_error: str | None = None


def _collect(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    num_map_images: int,
    map_layers: Sequence[int] | None,
    num_prompt_maps: int,
    nmi_scale: float,
) -> tuple[_RunState, list[int]]:
    geometry = geometry_for(model)
    vit = geometry.kind == "vit"
    depth = len(layer_modules(model))
    state = _RunState(depth)
    layers_for_maps = set(map_layers if map_layers is not None else attn_mod.default_map_layers(depth))
    device = model_device(model)
    labels: list[int] = []
    has_cls = vit and geometry.class_token and geometry.num_prefix_tokens > 0  # registers are no CLS

    def grid() -> tuple[int, int]:
        return patch_grid(geometry, state.hw)

    def on_block(index: int, x: torch.Tensor, out: torch.Tensor) -> None:
        if not vit:
            state.layer_reps[index].append(pool_layer_output(stage_map(model, out)).cpu())
            return
        layout_in = TokenLayout.from_count(x.shape[1], geometry.num_prefix_tokens, grid())
        state.prompts_in[index] = layout_in.num_prompts
        values = block_input_nmi(
            x, num_prefix=layout_in.num_prefix, num_patches=layout_in.num_patches, scale=nmi_scale
        )
        if values is not None:
            state.nmi[index].append(values.cpu())
        layout_out = TokenLayout.from_count(out.shape[1], geometry.num_prefix_tokens, grid())
        pooled = pool_tokens(out, layout_out)
        state.layer_reps[index].append(pooled.patch_mean.cpu())
        if pooled.prompt_mean is not None:
            state.prompt_reps[index].append(pooled.prompt_mean.cpu())

    def on_layer(index: int, record: attn_mod.LayerAttention) -> None:
        probs = record.probs
        layout = TokenLayout.from_count(probs.shape[-1], geometry.num_prefix_tokens, grid())
        state.sources[index] = record.source
        dist = attn_mod.layer_attention_distance(probs, layout, geometry.patch_size).sum(0).cpu()
        state.dist_sum[index] = state.dist_sum.get(index, 0) + dist
        if has_cls:
            share = attn_mod.cls_attention_share(probs, layout)
            acc = state.share_sum.setdefault(index, {})
            for key, value in share.items():
                acc[key] = acc.get(key, 0) + value.double().sum(0).cpu()
        if record.token_scale is not None:
            ts = record.token_scale.double()
            state.scale_sum[index] = state.scale_sum.get(index, 0) + ts.sum((0, 2)).cpu()
            state.scale_sq[index] = state.scale_sq.get(index, 0) + (ts**2).sum((0, 2)).cpu()
            state.scale_count[index] = state.scale_count.get(index, 0) + ts.shape[0] * ts.shape[2]
        take = num_map_images - state.seen
        if take > 0 and index in layers_for_maps:
            if has_cls:
                cls_map = attn_mod.cls_attention_map(probs[:take], layout).mean(1)
                state.cls_maps.setdefault(index, []).append(cls_map.cpu())
            if layout.num_prompts and num_prompt_maps > 0:
                chosen = list(range(min(num_prompt_maps, layout.num_prompts)))
                maps = attn_mod.prompt_attention_maps(probs[:take], layout, chosen).mean(2)
                state.prompt_maps.setdefault(index, []).append(maps.cpu())

    recorders: list[Any] = [BlockRecorder(model, on_block)]
    if vit:
        try:
            recorders.append(attn_mod.AttentionRecorder(model, on_layer))
        except BackboneError as error:  # an attention layer that can be neither asked nor recomputed
            state.attention_error = str(error)
    with torch.no_grad(), eval_mode(model), contextlib.ExitStack() as stack:
        for recorder in recorders:
            stack.enter_context(recorder)
        for images, targets in loader:
            state.hw = (int(images.shape[-2]), int(images.shape[-1]))
            tokens = model.forward_features(images.to(device))
            state.features.append(model.forward_head(tokens, pre_logits=True).float().cpu())
            state.logits.append(model.forward_head(tokens).float().cpu())
            state.targets.append(torch.as_tensor(targets).cpu())
            take = num_map_images - state.seen
            if take > 0:
                state.map_images.append(images[:take].cpu())
            state.seen += images.shape[0]
            labels.extend(_label_of(t) for t in targets)
    return state, labels


def _stack(chunks: list[torch.Tensor]) -> np.ndarray | None:
    return torch.cat(chunks).numpy() if chunks else None


def _model_info(name: str, model: nn.Module, state: _RunState) -> dict[str, Any]:
    geometry = geometry_for(model)
    method = getattr(model, "method", None)
    info: dict[str, Any] = {
        "name": name,
        "method": getattr(method, "name", None),
        "config": method.config.to_dict()
        if method is not None and hasattr(method.config, "to_dict")
        else None,
        "parameter_summary": model.parameter_summary() if hasattr(model, "parameter_summary") else None,
        "geometry": geometry.to_dict(),
    }
    if geometry.kind == "vit":
        info["prompt_tokens_at_block_input"] = state.prompts_in
        info["configured_prompt_length"] = configured_prompt_length(model)
        info["attention_source"] = [state.sources.get(i) for i in range(state.depth)]
    return info


def _plot_token_scale(curves: dict[str, dict[str, Any]], path: Path) -> None:
    fig, axes = new_figure(1, 1, width=5.5, height=3.8)
    ax = axes[0, 0]
    for index, (name, curve) in enumerate(curves.items()):
        layers = np.asarray(curve["layers"]) + 1
        mean = np.asarray(curve["mean"]).mean(1)
        std = np.asarray(curve["std"]).mean(1)
        ax.errorbar(layers, mean, yerr=std, marker="o", capsize=3, color=colour(index), label=name)
    ax.set_xlabel("block (1 = first)")
    ax.set_xticks(sorted({int(i) + 1 for c in curves.values() for i in c["layers"]}))
    ax.set_ylabel("token scale (unitless), mean over heads")
    ax.set_title(
        "Patch-wise token scale of the attention layers\n(mean ± std over images and tokens)", fontsize=10
    )
    ax.legend(title="model", fontsize=8)
    save_figure(fig, path)


def analyze(
    model: nn.Module,
    dataset: Dataset,
    *,
    out_dir: str | Path,
    class_names: Sequence[str],
    max_samples: int = 500,
    seed: int = 0,
    compare: Mapping[str, nn.Module] | None = None,
    name: str | None = None,
    batch_size: int = 16,
    num_map_images: int = 4,
    map_layers: Sequence[int] | None = None,
    num_prompt_maps: int = 2,
    tsne: bool = True,
    nmi_scale: float = 1.0,
    debiased_cka: bool = False,
    calibrations: Mapping[str, Any] | None = None,
    reliability_bins: int = DEFAULT_BINS,
    progress: bool = False,
) -> dict[str, Any]:
    """Run every applicable view (module docstring), write PNGs and ``analysis.json`` to ``out_dir``.

    Args:
        model: a ``PromptModel`` (or a plain timm model) to analyse.
        dataset: a torch dataset of ``(image, target)``; ``target`` a class index or a multi-hot vector.
        out_dir: destination folder: new, empty, or an earlier analysis (``io.output_folder``).
        class_names: one name per class index, for legends.
        max_samples: subsample size (uniform without replacement, seeded); all images if the dataset is smaller.
        seed: seed of the subsample and of t-SNE.
        compare: more models, by name, analysed on the same images (calibration rows, attention, NMI) and
            compared layer by layer with ``model`` (CKA).
        name: the main model's name in figures (default: its method name).
        calibrations: model name -> a stored ``Calibration`` (or None): the reliability diagram then also
            draws the calibrated probabilities.
        reliability_bins: equal-width bins of the reliability diagram and its ECE.
        progress: show progress bars (on a terminal): the batches per model, then the views.
    Returns:
        the content of ``analysis.json``.
    """
    out = output_folder(out_dir, "analysis", legacy=ANALYSIS_FILES)  # new, empty, or an earlier analysis
    main_name = name or _model_name(model)
    runs: dict[str, nn.Module] = {main_name: model}
    for other, other_model in (compare or {}).items():
        if other in runs:
            raise ValueError(f"comparison model name {other!r} clashes with another model's name")
        runs[other] = other_model
    total = len(dataset)
    if total == 0:
        raise ValueError("the dataset is empty")
    count = min(max_samples, total)
    indices = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
    loader = DataLoader(
        Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=False, num_workers=0
    )

    states: dict[str, _RunState] = {}
    labels: list[int] = []
    hidden = None if progress else True  # tqdm's disable=None: shown on a terminal, silent in logs
    for run_name, run_model in runs.items():
        states[run_name], labels = _collect(
            run_model,
            tqdm(loader, desc=f"analysing {run_name}", unit="batch", disable=hidden, leave=False),
            num_map_images=num_map_images,
            map_layers=map_layers,
            num_prompt_maps=num_prompt_maps,
            nmi_scale=nmi_scale,
        )
    label_array = np.asarray(labels)
    classes, counts = np.unique(label_array, return_counts=True)
    result: dict[str, Any] = {
        "sample": {
            "dataset_size": total,
            "max_samples": max_samples,
            "n": count,
            "seed": seed,
            "rule": "uniform without replacement: numpy.random.default_rng(seed).choice(dataset_size, n), sorted",
            "indices": indices.tolist(),
            "label_rule": "single-label: the class index; multi-label: the first positive class, -1 ('none') if none",
            "class_counts": {
                ("none" if c < 0 else class_names[c] if c < len(class_names) else str(c)): int(k)
                for c, k in zip(classes, counts, strict=True)
            },
        },
        "models": {n: _model_info(n, m, states[n]) for n, m in runs.items()},
        "definitions": DEFINITIONS,
        "views": {},
        "skipped": {},
        "files": [],
    }
    views, skipped, files = result["views"], result["skipped"], result["files"]

    stages = tqdm(total=6, desc="figures", unit="view", disable=hidden, leave=False)

    def stage(name: str) -> None:
        stages.set_postfix_str(name, refresh=False)
        stages.update()

    # calibration
    stage("feature calibration" + (" and t-SNE" if tsne else ""))
    feature_runs = {n: (torch.cat(s.features).numpy(), label_array) for n, s in states.items()}
    views["calibration"] = plot_calibration(
        feature_runs, class_names, out / "calibration.png", seed=seed, tsne=tsne
    )
    files.append("calibration.png")

    # reliability of the predicted probabilities, as trained and with the stored calibration
    stage("reliability")
    curves = {}
    multilabel = torch.cat(states[main_name].targets).ndim == 2  # multi-hot targets: sigmoid probabilities
    for n, s in states.items():
        logits, targets = torch.cat(s.logits), torch.cat(s.targets)
        curves[n] = {"as trained": (scores_from_logits(logits, multilabel), targets)}
        calibration = (calibrations or {}).get(n)
        if calibration is not None:
            curves[n]["calibrated"] = (calibration.probabilities(logits.double()), targets)
    views["reliability"] = reliability_view(curves, multilabel, out / "reliability.png", bins=reliability_bins)
    files.append("reliability.png")

    vit_runs = [n for n, m in runs.items() if geometry_for(m).kind == "vit"]
    attention_runs = [n for n in vit_runs if states[n].attention_error is None]
    for n in runs:
        if n not in vit_runs:
            skipped[f"attention:{n}"] = "not a ViT (no attention)"
        elif states[n].attention_error is not None:
            skipped[f"attention:{n}"] = states[n].attention_error

    # attention distance
    stage("attention")
    if attention_runs:
        distance = {}
        shares = {}
        for n in attention_runs:
            s = states[n]
            distance[n] = (torch.stack([s.dist_sum[i] for i in range(s.depth)]) / s.seen).numpy()
            if s.share_sum:
                shares[n] = {
                    key: [(s.share_sum[i][key] / s.seen).tolist() for i in range(s.depth)]
                    for key in ("prefix", "prompts", "patches")
                }
        views["attention_distance"] = {
            "unit": "pixels",
            "per_layer_head": {n: d.tolist() for n, d in distance.items()},
            "per_layer_mean": {n: d.mean(1).tolist() for n, d in distance.items()},
        }
        views["cls_attention_share"] = shares
        attn_mod.plot_attention_distance(
            distance,
            out / "attention_distance.png",
            unit="pixels",
            title=f"Average attention distance per head, patch tokens only (AP §4.1), n={count} images",
        )
        files.append("attention_distance.png")

    # attention maps
    maps_view = {}
    for n in attention_runs:
        s = states[n]
        panels: list[tuple[str, torch.Tensor]] = []
        entry: dict[str, Any] = {"cls": {}, "prompts": {}}
        for layer in sorted(set(s.cls_maps) | set(s.prompt_maps)):
            if layer in s.cls_maps:
                cls_maps = torch.cat(s.cls_maps[layer])
                panels.append((f"block {layer + 1}: CLS", cls_maps))
                entry["cls"][str(layer)] = cls_maps.tolist()
            if layer in s.prompt_maps:
                prompt_maps = torch.cat(s.prompt_maps[layer])  # (n, k, rows, cols)
                for k in range(prompt_maps.shape[1]):
                    panels.append((f"block {layer + 1}: prompt {k}", prompt_maps[:, k]))
                entry["prompts"][str(layer)] = prompt_maps.tolist()
        if not panels:
            skipped[f"attention_maps:{n}"] = "no class token and no prompt tokens"
            continue
        file = f"attention_maps_{safe_name(n)}.png"
        shown = torch.cat(s.map_images)
        attn_mod.plot_attention_maps(
            shown,
            panels,
            out / file,
            title=f"{n}: attention of CLS / prompt queries on patches (head mean), first {len(shown)} sampled images",
        )
        maps_view[n] = entry
        files.append(file)
    if maps_view:
        views["attention_maps"] = maps_view

    # prompt/patch NMI and CKA
    stage("NMI and prompt CKA")
    nmi_curves = {}
    prompt_cka = {}
    for n in vit_runs:
        s = states[n]
        if not any(p for p in s.prompts_in if p):
            skipped[f"nmi:{n}"] = "the method inserts no prompt tokens"
            skipped[f"cka_prompts_patches:{n}"] = "the method inserts no prompt tokens"
            continue
        nmi_curves[n] = summarize_layers([chunks or None for chunks in s.nmi])
        prompt_reps = [_stack(chunks) for chunks in s.prompt_reps]
        patch_reps = [_stack(chunks) for chunks in s.layer_reps]
        matrix = prompt_patch_cka(prompt_reps, patch_reps, debiased=debiased_cka)
        prompt_cka[n] = matrix.tolist()
        file = f"cka_prompts_patches_{safe_name(n)}.png"
        plot_cka_heatmap(
            matrix,
            out / file,
            row_label="prompt tokens: block output (1 = first)",
            col_label="patch tokens: block output (1 = first)",
            title=f"{n}: CKA of prompts vs patch tokens over {count} images (SPT Fig. S4)",
        )
        files.append(file)
    if nmi_curves:
        views["nmi"] = {"scale": nmi_scale, "per_layer": nmi_curves}
        plot_nmi(
            nmi_curves,
            out / "nmi.png",
            title=f"Prompt/patch NMI (SPT eq. 7-8), mean ± std over {count} images",
        )
        files.append("nmi.png")
    if prompt_cka:
        views["cka_prompts_patches"] = {"debiased": debiased_cka, "matrix": prompt_cka}

    # layer CKA between the main model and each comparison model
    stage("layer CKA")
    if len(runs) > 1:
        layer_cka: dict[str, Any] = {}
        main_reps = [_stack(chunks) for chunks in states[main_name].layer_reps]
        main_unit = "block" if geometry_for(model).kind == "vit" else "stage"
        for n, other_model in runs.items():
            if n == main_name:
                continue
            other_reps = [_stack(chunks) for chunks in states[n].layer_reps]
            matrix = cka_matrix(main_reps, other_reps, debiased=debiased_cka)
            other_unit = "block" if geometry_for(other_model).kind == "vit" else "stage"
            file = f"cka_layers_{safe_name(main_name)}_vs_{safe_name(n)}.png"
            plot_cka_heatmap(
                matrix,
                out / file,
                row_label=f"{main_name}: {main_unit} (1 = first)",
                col_label=f"{n}: {other_unit} (1 = first)",
                title=f"Layer-wise linear CKA, {main_name} vs {n}, {count} images (AP Fig. 5A)",
            )
            layer_cka[n] = {"rows": main_name, "matrix": matrix.tolist()}
            files.append(file)
        views["cka_layers"] = {"debiased": debiased_cka, "pairs": layer_cka}
    else:
        skipped["cka_layers"] = "no comparison model (pass compare={...})"

    # token scale exposed by cooperating attention layers
    stage("token scale")
    stages.close()
    scale_curves = {}
    for n in attention_runs:
        s = states[n]
        if not s.scale_sum:
            continue
        layers = sorted(s.scale_sum)
        mean = [(s.scale_sum[i] / s.scale_count[i]) for i in layers]
        std = [
            ((s.scale_sq[i] / s.scale_count[i]) - m**2).clamp_min(0).sqrt()
            for i, m in zip(layers, mean, strict=True)
        ]
        scale_curves[n] = {
            "layers": layers,
            "mean": torch.stack(mean).tolist(),
            "std": torch.stack(std).tolist(),
        }
    if scale_curves:
        views["token_scale"] = scale_curves
        _plot_token_scale(scale_curves, out / "token_scale.png")
        files.append("token_scale.png")
    else:
        skipped["token_scale"] = "no attention layer exposes token_scale(x)"

    files.append("analysis.json")
    result = _to_jsonable(result)
    atomic_write_text(out / "analysis.json", json.dumps(result, indent=1) + "\n")
    return result
