"""Speed benchmark: training step, inference throughput, few-shot runs with/without the prefix cache, memory.

Run ONE process on an otherwise idle machine (``performance-notes.md``: two OpenMP processes on two cores
spin against each other)::

    .venv/bin/python benchmarks/speed.py                  # CPU, 2 threads -> benchmarks/results/speed-cpu.md
    .venv/bin/python benchmarks/speed.py --gpu            # CUDA timings -> benchmarks/results/speed-gpu.md
    .venv/bin/python benchmarks/speed.py --quick --out /tmp/speed.md   # smoke run on a micro ViT (seconds)
    .venv/bin/python benchmarks/speed.py --model vit_s_224 --batch 8 --rounds 3   # ViT-S/16 at 224 px, 197 tokens

Everything is measured in one run on the same backbone, batch and data (random-init ViT-Ti/16 at 112 px,
50 tokens, batch 32, 100 classes by default). Timed configurations are interleaved round by round, so a
slow period of the machine hits all of them; ratios are taken per round (paired) and reported as
min/median/max over the rounds. The load average is recorded before and after each section; a 1-minute
load above ~0.5 while a 2-thread benchmark runs means another process shared the cores, and the table says
so. Memory is the peak RSS (VmHWM) of a fresh subprocess per configuration on CPU (it includes the ~350 MB torch +
timm baseline, hence the 'peak - after build' column), ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------- set-up


def _configure_threads(threads: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load() -> tuple[float, float, float]:
    try:
        return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return (float("nan"),) * 3  # type: ignore[return-value]


MODELS = {
    # name -> (timm architecture, options, image size)
    "vit_ti_112": ("vit_tiny_patch16_224", {"img_size": 112}, 112),
    "vit_s_224": ("vit_small_patch16_224", {}, 224),  # ViT-S/16 at 224 px, 197 tokens
    "micro": (
        "vit_tiny_patch16_224",
        {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2},
        32,
    ),
}


def _backbone(model: str, num_classes: int = 100):
    from promptvit.backbones import create_backbone

    arch, options, _ = MODELS[model]
    return create_backbone(arch, num_classes=num_classes, init_seed=0, **options)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _interleaved(
    fns: dict[str, Callable[[], None]], rounds: int, warmup: int, device: str
) -> dict[str, list[float]]:
    """Seconds per call of every function, measured round-robin (one call of each per round)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _paired_ratios(times: dict[str, list[float]], name: str, reference: str) -> dict[str, float]:
    return _summary([a / b for a, b in zip(times[name], times[reference], strict=True)])


# --------------------------------------------------------------------------------- training step


def _ept_manual(q, k, v, *, way, prompt=None, scale=None, dropout_p=0.0, **_):
    """(a): materialised scaled logits, exact gate on the softmax (pure_cat only)."""
    import torch

    s = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q @ k.transpose(-2, -1)) * s
    prompt_lse = torch.logsumexp(prompt, dim=-1)
    peak = torch.maximum(logits.amax(-1), prompt_lse).unsqueeze(-1)
    weights = torch.exp(logits - peak)
    denominator = weights.sum(-1, keepdim=True) + torch.exp(prompt_lse.unsqueeze(-1) - peak)
    return (weights / denominator) @ v


def _ept_mask(q, k, v, *, way, prompt=None, scale=None, dropout_p=0.0, **_):
    """The earlier shipped form: one zero key/value row, LSE(P) in a float additive mask (no fused kernel in
    training, since the mask requires grad)."""
    import torch
    import torch.nn.functional as F

    n = k.shape[-2]
    mask = F.pad(torch.logsumexp(prompt, dim=-1).unsqueeze(-1).to(q.dtype), (n, 0))
    k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _with_sdpa(step: Callable[[], None], variant: Callable) -> Callable[[], None]:
    from promptvit.layers import prompted_attention

    def run() -> None:
        original = prompted_attention.prompted_sdpa
        prompted_attention.prompted_sdpa = variant
        try:
            step()
        finally:
            prompted_attention.prompted_sdpa = original

    return run


TRAIN_CONFIGS = [
    "plain",
    "plain_readout",
    "ept",
    "ept_manual",
    "ept_mask",
    "vpt",
    "lora",
    "lora_all_tokens",
    "peft_r16",
    "peft_r8",
]
TRAIN_LABELS = {
    "plain": "frozen backbone, backward to the input (reference)",
    "plain_readout": "the same as a `PromptModel` (linear): class-token readout, backward to the input",
    "lora_all_tokens": "LoRA (ours) as above, readout off (`plan.class_token_readout=False`)",
    "ept": "EPT, every block, d_p=100 (pure_cat): shipped path, SDPA + 1 padded key, LSE(P) on 2 extra q/k channels",
    "ept_manual": "EPT variant (a): materialised logits, gate sigmoid(LSE(u) - LSE(P)) (bench only)",
    "ept_mask": "EPT variant: LSE(P) in a float mask over 1 padded key (the earlier shipped form; bench only)",
    "vpt": "VPT-deep, 10 prompts per block",
    "lora": "LoRA (ours), r=8 on q,v of every qkv",
    "peft_r16": "peft LoRA on qkv, r=16 (= our q,v r=8: parity construction)",
    "peft_r8": "peft LoRA on qkv, r=8",
}


def build_training(name: str, model: str, device: str, checkpointing: bool = False):
    """(module, trainable parameters, needs input grad) for a training configuration."""
    import peft

    import promptvit

    backbone = _backbone(model)
    if name == "plain":
        backbone.requires_grad_(False).eval()
        backbone.get_classifier().requires_grad_(True)
        module, input_grad = backbone, True
    elif name == "plain_readout":
        module = promptvit.wrap(backbone, "linear")
        module.train()
        input_grad = True
    elif name.startswith("ept"):
        module = promptvit.wrap(backbone, "ept", prompt_length=100)
        module.train()
        input_grad = False
    elif name in ("vpt", "lora", "lora_all_tokens"):
        method = name.split("_")[0]
        options = {
            "vpt": {"prompt_length": 10, "deep": True},
            "lora": {"rank": 8, "targets": ["q", "v"]},
        }[method]
        module = promptvit.wrap(backbone, method, **options)
        module.plan.class_token_readout = name != "lora_all_tokens"
        module.train()
        input_grad = False
    elif name.startswith("peft"):
        rank = int(name.split("_r")[1])
        backbone.requires_grad_(False)
        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["qkv"], lora_dropout=0.0)
        module = peft.get_peft_model(backbone, config)
        module.base_model.model.get_classifier().requires_grad_(True)
        module.eval()  # like ours: frozen parts in eval mode (no dropout anyway)
        input_grad = False
    else:
        raise ValueError(name)
    if checkpointing:
        backbone.set_grad_checkpointing(True)
    module.to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    return module, params, input_grad


def training_step_fn(name: str, model: str, device: str, batch: int, checkpointing: bool = False):
    import torch
    import torch.nn.functional as F

    module, params, input_grad = build_training(name, model, device, checkpointing)
    size = MODELS[model][2]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    targets = torch.randint(0, 100, (batch,), generator=g).to(device)
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        x = images.detach().requires_grad_(True) if input_grad else images
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(module(x), targets).backward()
        optimizer.step()

    if name == "ept_manual":
        step = _with_sdpa(step, _ept_manual)
    elif name == "ept_mask":
        step = _with_sdpa(step, _ept_mask)
    return step, sum(p.numel() for p in params)


def bench_training(args, device: str) -> dict[str, Any]:
    fns, counts = {}, {}
    for name in TRAIN_CONFIGS:
        fns[name], counts[name] = training_step_fn(name, args.model, device, args.batch)
    load_before = _load()
    times = _interleaved(fns, args.rounds, args.warmup, device)
    return {
        "times": times,
        "params": counts,
        "ratios": {
            "ept_vs_plain": _paired_ratios(times, "ept", "plain"),
            "ept_manual_vs_plain": _paired_ratios(times, "ept_manual", "plain"),
            "ept_mask_vs_plain": _paired_ratios(times, "ept_mask", "plain"),
            "vpt_vs_plain": _paired_ratios(times, "vpt", "plain"),
            "lora_vs_peft_r16": _paired_ratios(times, "lora", "peft_r16"),
            "lora_vs_peft_r8": _paired_ratios(times, "lora", "peft_r8"),
            "readout_vs_plain": _paired_ratios(times, "plain_readout", "plain"),
            "ept_vs_readout": _paired_ratios(times, "ept", "plain_readout"),
            "vpt_vs_readout": _paired_ratios(times, "vpt", "plain_readout"),
            "lora_all_tokens_vs_peft_r16": _paired_ratios(times, "lora_all_tokens", "peft_r16"),
        },
        "load": [load_before, _load()],
    }


# --------------------------------------------------------------------------------------- inference

INFER_CONFIGS = ["timm", "linear", "ept", "ept_all_tokens", "ap", "bias", "norm", "lora_merged"]
INFER_TARGETS = ["ept", "ap", "bias", "norm", "lora_merged"]
INFER_LABELS = {
    "timm": "untouched timm model (reference)",
    "linear": "linear probe: `PromptModel`, no method (class-token readout only)",
    "ept": "EPT, every block, d_p=100",
    "ept_all_tokens": "EPT, readout off (`plan.class_token_readout=False`; not a shipped default)",
    "ap": "AP (add) at block 0",
    "bias": "BitFit (bias)",
    "norm": "norm tuning",
    "lora_merged": "LoRA r=8 q,v, merged",
}


def inference_fn(name: str, model: str, device: str, batch: int):
    import torch

    import promptvit

    backbone = _backbone(model)
    if name == "timm":
        module = backbone
    else:
        method = {"lora_merged": "lora", "ept_all_tokens": "ept"}.get(name, name)
        options = {"ept": {"prompt_length": 100}, "lora": {"rank": 8}}.get(method, {})
        module = promptvit.wrap(backbone, method, **options)
        with torch.no_grad():
            for _, p in module.tuned_named_parameters():
                p.add_(0.01)
        if name == "lora_merged":
            module.merge()
        module.plan.class_token_readout = name != "ept_all_tokens"
    module.eval().to(device)
    size = MODELS[model][2]
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)

    def run() -> None:
        with torch.inference_mode():
            module(images)

    return run


def bench_inference(args, device: str) -> dict[str, Any]:
    fns = {name: inference_fn(name, args.model, device, args.batch) for name in INFER_CONFIGS}
    load_before = _load()
    times = _interleaved(fns, args.rounds, args.warmup, device)

    # throughput ratio (method / reference) = time ratio (reference / method)
    def ratios(reference: str) -> dict[str, dict[str, float]]:
        return {
            name: _summary([t / m for t, m in zip(times[reference], times[name], strict=True)])
            for name in INFER_CONFIGS
            if name != reference
        }

    return {
        "times": times,
        "ratios": ratios("timm"),
        "ratios_vs_linear": ratios("linear"),
        "load": [load_before, _load()],
    }


# --------------------------------------------------------------------------------- few-shot runs

# linear with the optimiser: this section times the epoch loop (its default L-BFGS probe passes each image
# once by construction, and reads a shared cache's pre-logit features like mlp)
FEWSHOT_METHODS = [("linear", {"solver": "optimizer"}), ("mlp", {}), ("partial", {"num_blocks": 1})]


def _timed_fit(
    args,
    device: str,
    method: str,
    options: dict,
    train,
    val,
    names: list[str],
    run_dir,
    eval_every: int,
    cache: bool,
    cache_dir: str | None = None,
) -> tuple[float, Any]:
    """(seconds, FitResult) of one few-shot ``fit`` on a fresh backbone: batch 4, SGD, eval batch 64."""
    import promptvit
    from promptvit.train import TrainConfig, fit

    model = promptvit.wrap(_backbone(args.model, args.fewshot_classes), method, **options)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=4,
        eval_batch_size=64,
        eval_every=eval_every,
        progress=False,
        device=device,
        cache_prefix=cache,
        cache_dir=cache_dir,
    )
    _sync(device)
    start = time.perf_counter()
    result = fit(model, train, val, config=config, run_dir=run_dir, multilabel=False, class_names=names)
    _sync(device)
    return time.perf_counter() - start, result


def bench_fewshot(args, device: str) -> dict[str, Any]:
    import torch
    from torch.utils.data import TensorDataset

    size = MODELS[args.model][2]
    classes = args.fewshot_classes
    g = torch.Generator().manual_seed(2)
    n_train = classes * args.shots
    train = TensorDataset(torch.randn(n_train, 3, size, size, generator=g), torch.arange(n_train) % classes)
    val = TensorDataset(
        torch.randn(args.eval_images, 3, size, size, generator=g), torch.arange(args.eval_images) % classes
    )
    names = [f"c{i}" for i in range(classes)]
    results: dict[str, Any] = {"load": [_load()]}
    for protocol, eval_every in (("eval_every_epoch", 1), ("eval_at_end", args.epochs)):
        for method, options in FEWSHOT_METHODS:
            row: dict[str, Any] = {}
            for cache in (False, True):
                with tempfile.TemporaryDirectory() as run_dir:
                    total, result = _timed_fit(
                        args, device, method, options, train, val, names, run_dir, eval_every, cache
                    )
                epochs = [r["seconds"] for r in result.history]
                row["cached" if cache else "uncached"] = {"total": total, "epoch": _summary(epochs)}
            row["ratio"] = row["uncached"]["total"] / row["cached"]["total"]
            results.setdefault(protocol, {})[method] = row
            results["load"].append(_load())
    results["protocol"] = _fewshot_protocol(args, device, val, names)
    results["load"].append(_load())
    results["setup"] = {
        "train_images": n_train,
        "eval_images": args.eval_images,
        "epochs": args.epochs,
        "classes": classes,
        "shots": args.shots,
    }
    return results


def _fewshot_protocol(args, device: str, val, names: list[str]) -> dict[str, Any]:
    """MedFMC-style: every method x sampling is one run with its own training images, all evaluated once
    at the end on the same test set; cached runs share one ``cache_dir``, so that set's prefix is computed
    once per cut instead of once per run."""
    import torch
    from torch.utils.data import TensorDataset

    size = MODELS[args.model][2]
    classes = args.fewshot_classes
    n_train = classes * args.shots
    row: dict[str, Any] = {"runs": len(FEWSHOT_METHODS) * args.samplings, "samplings": args.samplings}
    for cache in (False, True):
        with tempfile.TemporaryDirectory() as cache_dir, tempfile.TemporaryDirectory() as run_root:
            seconds = []
            for method, options in FEWSHOT_METHODS:
                for sampling in range(args.samplings):
                    g = torch.Generator().manual_seed(100 + sampling)  # each sampling draws other images
                    images = torch.randn(n_train, 3, size, size, generator=g)
                    train = TensorDataset(images, torch.arange(n_train) % classes)
                    run_dir = Path(run_root) / f"{method}-{sampling}"
                    total, _ = _timed_fit(
                        args,
                        device,
                        method,
                        options,
                        train,
                        val,
                        names,
                        run_dir,
                        args.epochs,
                        cache,
                        cache_dir=cache_dir if cache else None,
                    )
                    seconds.append(total)
            entry: dict[str, Any] = {"total": sum(seconds), "run": _summary(seconds)}
            if cache:  # one folder per prefix key (cut), one file per cached image
                entry["prefix_keys"] = sum(1 for d in Path(cache_dir).iterdir() if d.is_dir())
                entry["entries"] = sum(1 for _ in Path(cache_dir).rglob("*.safetensors"))
            row["cached" if cache else "uncached"] = entry
    row["ratio"] = row["uncached"]["total"] / row["cached"]["total"]
    return row


# ------------------------------------------------------------------------------------------ memory

MEMORY_CONFIGS = [
    ("plain", False),
    ("ept", False),
    ("vpt", False),
    ("lora", False),
    ("peft_r16", False),
    ("ept", True),
    ("vpt", True),
    ("lora", True),
    ("peft_r16", True),
]


def memory_child(name: str, checkpointing: bool, model: str, batch: int, device: str) -> dict[str, float]:
    """Runs in a fresh process: build, 3 training steps, report peak memory."""
    step, _ = training_step_fn(name, model, device, batch, checkpointing)
    import torch

    after_build = _rss_now_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(3):
        step()
    _sync(device)
    out = {
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_build_mb": after_build,
    }
    if device.startswith("cuda"):
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_allocated_before_mb"] = base / 2**20
    return out


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_now_mb() -> float:
    value = _status_mb("VmRSS")
    return float("nan") if value is None else value


def _peak_rss_mb() -> float:
    """Peak RSS of this process image: VmHWM (reset by exec). ``ru_maxrss`` is not: on Linux it keeps the
    high-water mark of the process before ``exec``, i.e. of the (large) benchmark parent that forked it."""
    value = _status_mb("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_memory(args, device: str) -> dict[str, Any]:
    results = {}
    for name, checkpointing in MEMORY_CONFIGS if not args.quick else MEMORY_CONFIGS[:2]:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-child",
            name,
            "--model",
            args.model,
            "--batch",
            str(args.batch),
            "--threads",
            str(args.threads),
        ]
        if checkpointing:
            command.append("--checkpointing")
        if device.startswith("cuda"):
            command.append("--gpu")
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
        results[f"{name}{'+ckpt' if checkpointing else ''}"] = json.loads(output.strip().splitlines()[-1])
    return results


# ------------------------------------------------------------------------------------------ report


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def _range(summary: dict[str, float], digits: int = 3) -> str:
    return f"{_fmt(summary['min'], digits)} / **{_fmt(summary['median'], digits)}** / {_fmt(summary['max'], digits)}"


def _verdict(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "NOT met"


def _contended(loads: list[tuple[float, ...]], threads: int) -> bool:
    # a 2-thread benchmark alone gives a 1-minute load of about 2 on 2 cores; more means other work
    return any(load[0] > threads + 0.5 for load in loads)


def report(args, device: str, info: dict[str, Any], results: dict[str, Any]) -> str:
    lines = [f"# Speed benchmark ({'GPU' if device.startswith('cuda') else 'CPU'})", ""]
    lines += [
        f"Produced by `benchmarks/speed.py{' --gpu' if device.startswith('cuda') else ''}` "
        f"({'quick smoke run' if args.quick else 'full run'}), {info['date']}.",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {info['cpu']} |",
        f"| cores (os.cpu_count) | {info['cores']} |",
        f"| torch / timm / peft | {info['torch']} / {info['timm']} / {info['peft']} |",
        f"| torch threads | {info['threads']} |",
        f"| device | {info['device']} |",
        f"| load average (1/5/15 min) before | {info['load_before']} |",
        f"| load average after | {info['load_after']} |",
        f"| wall time of the run | {info['seconds']:.0f} s |",
        "",
        f"Backbone: random-init `{MODELS[args.model][0]}` {MODELS[args.model][1]} "
        f"({info['tokens']} tokens), batch {args.batch}, 100 classes; {args.rounds} interleaved rounds after "
        f"{args.warmup} warm-up calls per configuration. Ranges are min / **median** / max over the rounds; "
        "ratios are paired per round.",
        "",
    ]
    all_loads = [tuple(info["load_before"]), tuple(info["load_after"])]
    for section in ("training", "inference"):
        if section in results:
            all_loads += [tuple(v) for v in results[section]["load"]]
    if "fewshot" in results:
        all_loads += [tuple(v) for v in results["fewshot"]["load"]]
    if _contended(all_loads, args.threads):
        lines += [
            f"**The machine was contended**: a 1-minute load average above {args.threads + 0.5} was seen "
            "during the run (other processes shared the cores), so absolute times are pessimistic and the "
            "ratios noisier than on an idle machine.",
            "",
        ]
    else:
        lines += [
            f"No contention seen: the 1-minute load average stayed at or below {args.threads + 0.5} (the "
            f"benchmark's own {args.threads} threads) at every check, before, between and after the sections.",
            "",
        ]
    verdicts = []
    if "training" in results:
        r = results["training"]
        lines += ["## Training step (zero_grad + forward + CE + backward + AdamW step)", ""]
        lines += [
            "| configuration | tuned params | ms/step (min / **median** / max) | img/s (median) |",
            "|---|---|---|---|",
        ]
        for name in TRAIN_CONFIGS:
            if name not in r["times"]:
                continue
            t = _summary([v * 1000 for v in r["times"][name]])
            lines.append(
                f"| {TRAIN_LABELS[name]} | {r['params'][name]:,} | {_range(t, 1)} | {args.batch / t['median'] * 1000:.1f} |"
            )
        lines += ["", "| ratio | min / **median** / max | target | verdict (median) |", "|---|---|---|---|"]
        for key, label, target in (
            ("ept_vs_plain", "EPT / plain backward", 1.10),
            ("ept_manual_vs_plain", "EPT variant (a) / plain backward (not shipped)", 1.10),
            ("ept_mask_vs_plain", "EPT variant float-mask / plain backward (earlier form)", 1.10),
            ("vpt_vs_plain", "VPT-deep / plain backward", 1.15),
            ("lora_vs_peft_r16", "LoRA ours / peft r16 (same function)", 1.0),
            ("lora_vs_peft_r8", "LoRA ours / peft r8", 1.0),
            ("readout_vs_plain", "readout reference / plain backward (what the readout saves)", None),
            ("ept_vs_readout", "EPT / readout reference (EPT's own cost)", None),
            ("vpt_vs_readout", "VPT-deep / readout reference (VPT's own cost)", None),
            (
                "lora_all_tokens_vs_peft_r16",
                "LoRA ours, readout off / peft r16 (implementations alone)",
                None,
            ),
        ):
            if key not in r["ratios"]:
                continue
            summary = r["ratios"][key]
            if target is None:
                lines.append(f"| {label} | {_range(summary)} | | |")
                continue
            verdict = _verdict(summary["median"], target, higher_is_better=False)
            if "not shipped" not in label:
                verdicts.append((label, verdict))
            lines.append(f"| {label} | {_range(summary)} | <= {target:.2f} | {verdict} |")
        lines += ["", f"Load average before/after this section: {r['load'][0]} / {r['load'][1]}", ""]
    if "inference" in results:
        r = results["inference"]
        lines += ["## Inference throughput (`inference_mode`)", ""]
        by_linear = r.get("ratios_vs_linear", {})
        lines += [
            "| configuration | img/s (min / **median** / max) | throughput / timm | throughput / linear probe "
            "| target (vs timm) | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for name in INFER_CONFIGS:
            if name not in r["times"]:
                continue
            ips = _summary([args.batch / v for v in r["times"][name]])
            if name == "timm":
                lines.append(f"| {INFER_LABELS[name]} | {_range(ips, 1)} | 1 | | | |")
                continue
            summary = r["ratios"][name]
            versus_linear = _range(by_linear[name]) if name in by_linear else ""
            target, verdict = "", ""
            if name in INFER_TARGETS:
                target, verdict = ">= 0.97", _verdict(summary["median"], 0.97, higher_is_better=True)
                verdicts.append((f"inference {name}", verdict))
            lines.append(
                f"| {INFER_LABELS[name]} | {_range(ips, 1)} | {_range(summary)} | {versus_linear} "
                f"| {target} | {verdict} |"
            )
        lines += ["", f"Load average before/after this section: {r['load'][0]} / {r['load'][1]}", ""]
    if "fewshot" in results:
        r = results["fewshot"]
        s = r["setup"]
        lines += [
            "## Few-shot runs: `fit` with `cache_prefix=True` vs without",
            "",
            f"{s['classes']} classes x {s['shots']} shots = {s['train_images']} training images, {s['epochs']} epochs, "
            f'batch 4, SGD (linear too: `solver="optimizer"`, not its default L-BFGS probe, which computes '
            "each image's features once in any case); evaluation on "
            f"{s['eval_images']} images (the engine's validation pass) either after "
            "every epoch (the engine's default, `eval_every=1`, for model selection) or once at the end. In-memory tensors (no image decoding), fresh cache per run "
            "(nothing shared between methods). Per-epoch seconds are min / median / max over the epochs.",
            "",
            "Image-pass ratio: passes of an image through the backbone uncached over cached for linear/mlp "
            "(cached: each image once), what the cache can save; measured speed-ups differ by batch-size "
            "efficiency (training batches of 4 against prefix batches of 64).",
            "",
            "| protocol | method | uncached total s | cached total s | speed-up | image-pass ratio | uncached s/epoch | cached s/epoch | target | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        n, m, e = s["train_images"], s["eval_images"], s["epochs"]
        ceilings = {"eval_every_epoch": float(e), "eval_at_end": (e * n + m) / (n + m)}
        for protocol in ("eval_every_epoch", "eval_at_end"):
            for method, _ in FEWSHOT_METHODS:
                row = r[protocol][method]
                verdict = _verdict(row["ratio"], 10.0, higher_is_better=True)
                verdicts.append((f"few-shot {method} ({protocol})", verdict))
                lines.append(
                    f"| {protocol.replace('_', ' ')} | {method} | {row['uncached']['total']:.1f} | {row['cached']['total']:.1f} | "
                    f"**{row['ratio']:.1f}x** | {ceilings[protocol]:.1f}x | {_range(row['uncached']['epoch'], 2)} "
                    f"| {_range(row['cached']['epoch'], 2)} | >= 10x | {verdict} |"
                )
        p = r.get("protocol")
        if p:
            # every image of the test set and of each sampling's training set cached once per cut
            expected = p["cached"]["prefix_keys"] * (s["eval_images"] + p["samplings"] * s["train_images"])
            once = p["cached"]["entries"] == expected
            verdict = "met" if once else f"NOT met ({p['cached']['entries']} entries, {expected} expected)"
            verdicts.append(("few-shot protocol: each image's prefix computed once per cut", verdict))
            methods = ", ".join(m for m, _ in FEWSHOT_METHODS)
            lines += [
                "",
                f"Protocol: {methods} x {p['samplings']} samplings = {p['runs']} runs, each with its own "
                f"{s['train_images']} training images, {s['epochs']} epochs, evaluated once at the end on the "
                f"same {s['eval_images']} test images. Cached runs share one `cache_dir`: "
                f"{p['cached']['prefix_keys']} prefix keys (cuts) and {p['cached']['entries']} cached images "
                "on disk at the end. Per-run seconds are min / median / max over the runs.",
                "",
                "| protocol | uncached total s | cached total s | speed-up | uncached s/run | cached s/run | "
                "target | verdict |",
                "|---|---|---|---|---|---|---|---|",
                f"| {p['runs']} runs, shared cache | {p['uncached']['total']:.1f} | {p['cached']['total']:.1f} | "
                f"**{p['ratio']:.1f}x** | {_range(p['uncached']['run'], 2)} | {_range(p['cached']['run'], 2)} "
                f"| prefix computed once per image and cut | {verdict} |",
            ]
        lines += ["", f"Load averages during this section: {r['load']}", ""]
    if "memory" in results:
        r = results["memory"]
        cuda = device.startswith("cuda")
        lines += [
            "## Peak training memory at equal batch",
            "",
            "CUDA: `max_memory_allocated` over 3 steps."
            if cuda
            else "Peak RSS (VmHWM) of a fresh subprocess per configuration over build + 3 training steps; "
            "'peak - build' subtracts the RSS after building the model (torch + timm + weights).",
            "",
            "| configuration | peak MB | peak - build MB | vs peft r16 | with checkpointing: peak - build MB | reduction |",
            "|---|---|---|---|---|---|",
        ]

        def net(entry: dict[str, float]) -> float:
            if cuda:
                return entry["cuda_max_allocated_mb"] - entry["cuda_allocated_before_mb"]
            return entry["peak_rss_mb"] - entry["rss_after_build_mb"]

        reference = net(r["peft_r16"]) if "peft_r16" in r else None
        for name in ("plain", "ept", "vpt", "lora", "peft_r16"):
            if name not in r:
                continue
            entry = r[name]
            peak = entry["cuda_max_allocated_mb"] if cuda else entry["peak_rss_mb"]
            ckpt = r.get(f"{name}+ckpt")
            ckpt_cell = f"{net(ckpt):.0f}" if ckpt else ""
            reduction = f"{100 * (1 - net(ckpt) / net(entry)):.0f} %" if ckpt else ""
            versus = f"{net(entry) / reference:.2f}x" if reference else ""
            lines.append(
                f"| {TRAIN_LABELS[name]} | {peak:.0f} | {net(entry):.0f} | {versus} | {ckpt_cell} | {reduction} |"
            )
        lines.append("")
    if verdicts:
        lines += ["## Targets", ""]
        lines += [f"- {label}: {verdict}" for label, verdict in verdicts]
        lines.append("")
    lines += NOTES
    return "\n".join(lines)


NOTES = [
    "## Notes",
    "",
    "- *Reference for the training ratios*: the same frozen timm model, head trained, gradient taken down to "
    "the input images (every block's activation gradients). EPT needs no gradient below block 0's attention "
    "input, hence a ratio slightly under 1. EPT's shipped path (c) pads K/V with one zero key whose mask "
    "column holds LSE_k P_ik; with learnable P the mask requires grad and SDPA runs its math kernel in "
    "training. The two alternatives timed beside it (materialised logits; LSE moved into an extra q/k "
    "channel so that no mask is needed and SDPA keeps its flash kernel) are exact too (tests/perf) but not "
    "faster at 50 tokens, so (c) stays.",
    "- *VPT-deep*: the insertion is one concatenation per block (no Python loops over tokens or heads). A "
    "block whose prompt outputs the next block replaces (every block of deep VPT; the last one before the "
    "norm) computes queries, attention rows, projection and MLP for the real tokens only, with the prompts "
    "as keys and values (layers/selected_tokens.py). What remains of the overhead is the prompts' share of "
    "norm1 and qkv and the 10 extra key columns.",
    "- *LoRA vs peft*: peft cannot target q and v slices of the fused qkv (peft#1705); the function-equivalent "
    "peft model uses r=16 on qkv with a dense B (576 x 16). Ours stacks the per-part B into one (576 x 16) "
    "matrix with a zero block for k and adds the update to the frozen output in one fused addmm; peft runs "
    "A, B, a scaling multiply and an add.",
    "- *Class-token readout*: with timm's `'token'` pool the head reads one row of the last block, so "
    "`PromptModel` runs that block for the class token only (keys and values still from every token), in "
    "training and inference; equal to the full forward up to float rounding (tests: float64 within 1e-12 "
    "for every method). Every wrapped model gains from it while the references (timm, peft) do not, so the "
    "tables also show the readout alone (the linear probe as a `PromptModel`) and ratios against it: those "
    "are each method's own cost; the target rows compare with the untouched timm / peft models, as the "
    "targets are set. 'LoRA ours, readout off / peft r16' compares the two LoRA implementations alone.",
    "- *EPT inference*: the padded key and its mask are EPT's own cost (EPT / linear probe, 0.929 median in "
    "the committed run). Tried and not shipped: "
    "reading LSE(u) from the CPU flash kernel's second output (`_scaled_dot_product_flash_attention_for_cpu`) "
    "and gating its output. It is exact and faster per attention call in isolation (4.2 vs 5.2 ms per call, "
    "batch 32, 2 threads), but the whole model got slower (0.835 vs 0.938 of timm's throughput, 12 rounds "
    "each, run back to back, before the readout existed); the cause was not found.",
    "- *Few-shot speed-ups are bounded by what is left to compute* (the image-pass ratio column). With "
    "evaluation once at the end every image goes through the backbone once either way except the training "
    "epochs, (20 x 50 + 1000) / (50 + 1000) ~ 1.9x, so >= 10x cannot be reached in a single such run. With "
    "validation after every epoch (the default) the bound is 20x. Partial-1 also re-runs the tuned last "
    "block on every image of every validation pass; the class-token readout makes that pass cheaper (keys "
    "and values for every token, everything else for one row). Across runs sharing a `cache_dir` (protocol table) the test set's prefix is computed once "
    "per cut: linear and mlp share the pre-logit features (cut 12); partial-1 has its own cut (11), whose "
    "blocks 0-10 the cut-12 pass computed too (a cut is not derived from another cut's entries). What stays "
    "per run in the cached protocol is partial-1's training of its block and, per run, a checkpoint per "
    "epoch and the disk reads of the cached entries.",
    "- Figures quoted in these notes are from the committed run, except the flash-kernel experiment (earlier "
    "runs, as stated there). Numbers are from random-init weights (speed does not depend on them). Re-render this file from the "
    "JSON beside it with `--render`.",
    "",
]


# -------------------------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="measure on CUDA (fails if none is available)")
    parser.add_argument("--quick", action="store_true", help="micro ViT, few rounds: a smoke run in seconds")
    parser.add_argument("--model", default=None, choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--fewshot-classes", type=int, default=10)
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--samplings", type=int, default=5, help="few-shot samplings per method (protocol)")
    parser.add_argument(
        "--skip", default="", help="comma-separated sections to skip: training,inference,fewshot,memory"
    )
    parser.add_argument(
        "--out", default=None, help="markdown output (default benchmarks/results/speed-{cpu,gpu}.md)"
    )
    parser.add_argument(
        "--render", default=None, help="re-render the markdown from a results JSON (no timing)"
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.model = args.model or "micro"
        args.rounds = args.rounds or 2
        args.warmup = 1
        args.epochs = min(args.epochs, 2)
        args.eval_images = min(args.eval_images, 40)
        args.samplings = min(args.samplings, 2)
        args.batch = min(args.batch, 8)
    args.model = args.model or "vit_ti_112"
    args.rounds = args.rounds or 12
    return args


def main(argv: list[str] | None = None) -> Path | None:
    args = parse(argv)
    _configure_threads(args.threads)
    import torch

    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: CUDA is not available on this machine")
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.checkpointing, args.model, args.batch, device)))
        return None
    if args.render:
        stored = json.loads(Path(args.render).read_text(encoding="utf-8"))
        saved_args = argparse.Namespace(**stored["args"])
        device = "cuda" if saved_args.gpu else "cpu"
        out = Path(args.out) if args.out else Path(args.render).with_suffix(".md")
        out.write_text(report(saved_args, device, stored["info"], stored["results"]) + "\n", encoding="utf-8")
        print(out)
        return out
    import peft
    import timm

    skip = {s for s in args.skip.split(",") if s}
    started = time.perf_counter()
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "peft": peft.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if args.gpu else "cpu",
        "load_before": _load(),
    }
    from promptvit.backbones import geometry_of

    info["tokens"] = geometry_of(_backbone(args.model)).num_tokens
    results: dict[str, Any] = {}
    sections = [
        ("training", bench_training),
        ("inference", bench_inference),
        ("fewshot", bench_fewshot),
        ("memory", bench_memory),
    ]
    for name, fn in sections:
        if name in skip:
            continue
        t0 = time.perf_counter()
        results[name] = fn(args, device)
        print(f"{name}: {time.perf_counter() - t0:.0f} s, load {_load()}", file=sys.stderr, flush=True)
    info["load_after"] = _load()
    info["seconds"] = time.perf_counter() - started
    out = (
        Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "results" / f"speed-{'gpu' if args.gpu else 'cpu'}.md"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(args, device, info, results) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(
        json.dumps({"info": info, "args": vars(args), "results": results}, indent=1, default=str) + "\n",
        encoding="utf-8",
    )
    print(out)
    return out


if __name__ == "__main__":
    main()
