"""Real-data benchmark suite: the generic few-shot protocol on ../shared/data with ../shared/backbones.

    python benchmarks/realdata/run.py            # default suite (well under an hour on 2 CPU cores)
    python benchmarks/realdata/run.py --full     # full suite: more data, K, draws and an lr search (hours)
    python benchmarks/realdata/run.py --smoke    # every method once (K=5, one draw): a check and a timing sample
    python benchmarks/realdata/run.py --clinical # 10 draws at K=10: PneumoniaMNIST (ViT), HAM10000 224 px (CNN)

The configs are ``configs/*.yaml`` (default: vit_medmnist + cnn_derm; full: the ``*_full`` pair). Results go
to ``results/<suite>/``: the results store (``store/``, resumable: re-run the same command after a kill), the
records as ``records.jsonl``, the report (``report.md``, ``report.html``, ``summary.csv``, ``plots/``) and
``machine.json`` (CPU model, cores, torch version, wall time). Only ``store/`` is ignored by git.

The data and backbones live outside the repository, in ``../shared`` relative to the repository root; when
that folder is absent (a user's machine) the suite prints why and exits 0. Nothing from it is copied here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
CONFIGS = {
    "default": ["vit_medmnist.yaml", "cnn_derm.yaml"],
    "full": ["vit_medmnist_full.yaml", "cnn_derm_full.yaml"],
    "smoke": ["vit_medmnist.yaml", "cnn_derm.yaml"],
    "clinical": ["clinical_pneumonia.yaml", "clinical_ham224.yaml", "clinical_ham224_recipe.yaml"],
}
CITATIONS = [
    "Data (read from ../shared/data, not redistributed): MedMNIST v2 PneumoniaMNIST, BreastMNIST, RetinaMNIST "
    "(CC BY 4.0; Yang et al., Sci. Data 2023); HAM10000 (CC BY-NC 4.0; Tschandl et al., Sci. Data 2018); "
    "ISIC 2017 (ISIC archive; Codella et al. 2018).",
    "Backbones (../shared/backbones): a depth-6 ViT pretrained here on Fashion-MNIST (28 px; a weak stand-in "
    "for an ImageNet ViT) and Google's EfficientNet-Lite0 ImageNet-1k weights (Apache-2.0).",
]


def machine() -> dict[str, Any]:
    """CPU model, cores and library versions of this machine."""
    import timm
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
    }


def smoke_config(config: Any) -> Any:
    """Every method once: the middle K, one draw, the same training budget (so timings extrapolate)."""
    protocol = config.protocol.model_copy(update={"shots": [5], "seeds": config.protocol.seeds[:1]})
    return config.model_copy(update={"protocol": protocol, "name": f"{config.name}_smoke"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the full suite (hours)")
    mode.add_argument("--smoke", action="store_true", help="every method once (K=5, one draw)")
    mode.add_argument(
        "--clinical", action="store_true", help="10 draws for paired comparisons and calibration (issue 18)"
    )
    parser.add_argument("--results", type=Path, help="results folder (default results/<suite>)")
    parser.add_argument(
        "--backend", choices=["inprocess", "process", "ray"], help="override the configs' runner"
    )
    parser.add_argument("--workers", type=int, help="process backend: parallel workers (default 2)")
    parser.add_argument("--only", help="run only this config (file name without .yaml)")
    parser.add_argument(
        "--report-only", action="store_true", help="run nothing: re-render the report from the store"
    )
    args = parser.parse_args(argv)

    if not (SHARED / "data").is_dir() or not (SHARED / "backbones").is_dir():
        print(
            f"skipping the real-data suite: {SHARED}/data and {SHARED}/backbones are not here (they only exist on "
            "the benchmark machine; nothing to do)"
        )
        return 0
    import torch

    from promptvit.protocols import load_sweep_config, run_sweep, write_report

    torch.set_num_threads(1)
    suite = "full" if args.full else "smoke" if args.smoke else "clinical" if args.clinical else "default"
    out = args.results or HERE / "results" / suite
    store = out / "store"
    names = [n for n in CONFIGS[suite] if args.only is None or n == f"{args.only}.yaml"]
    if not names:
        parser.error(f"--only {args.only}: no such config in {CONFIGS[suite]}")
    started = time.perf_counter()
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def on_event(stage: str, spec: Any, status: str, error: str | None, done: int, total: int) -> None:
        elapsed = (time.perf_counter() - started) / 60
        print(
            f"[{elapsed:6.1f} min] {stage} {done}/{total} {status}: {spec.describe()}"
            + (f" -- {error}" if error else ""),
            flush=True,
        )

    failures: list[str] = []
    for name in names if not args.report_only else []:
        config = load_sweep_config(HERE / "configs" / name, {"shared": str(SHARED)})
        if args.smoke:
            config = smoke_config(config)
        print(f"== {config.name}: {config.title}", flush=True)
        outcome = run_sweep(
            config, results=store, backend=args.backend, workers=args.workers, on_event=on_event
        )
        failures += outcome.failures + outcome.unresolved
    wall = time.perf_counter() - started

    from promptvit.protocols import ResultStore, load_records

    ResultStore(store).export_jsonl(out / "records.jsonl")
    loaded = load_records(store)
    compute = sum(r.get("wall_seconds", 0.0) for r in loaded.records)
    info = machine()
    previous = []
    if (out / "machine.json").is_file():
        try:
            previous = json.loads((out / "machine.json").read_text()).get("invocations", [])
        except (OSError, json.JSONDecodeError):
            previous = []
    invocation = {
        "date": when,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "wall_seconds": round(wall, 1),
        "runs_in_store_after": len(loaded.records),
    }
    invocations = [*previous, invocation]
    total_wall = sum(i["wall_seconds"] for i in invocations)
    facts = {
        **info,
        "suite": suite,
        "configs": names,
        "wall_seconds_all_invocations": round(total_wall, 1),
        "sum_of_run_wall_seconds": round(compute, 1),
        "records": len(loaded.records),
        "failed_attempts": len(loaded.failures),
        "invocations": invocations,
    }
    from promptvit.io import atomic_write_text

    atomic_write_text(out / "machine.json", json.dumps(facts, indent=2) + "\n")
    header = [
        f"Suite: {suite} ({', '.join(names)}); last run {when} with `{invocation['command']}`.",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), torch {info['torch']}, "
        f"timm {info['timm']}, Python {info['python']}, CUDA {'yes' if info['cuda'] else 'no'}.",
        f"Wall time: {total_wall / 60:.1f} min over {len(invocations)} invocation(s) of run.py (this one "
        f"{wall / 60:.1f} min; runs already in the store are skipped); sum of the recorded runs' own wall "
        f"times: {compute / 60:.1f} min over {len(loaded.records)} runs (parallel workers overlap).",
        *CITATIONS,
    ]
    # the clinical suite also compares every method with VPT (EPT's claim is relative to it)
    reference = "vpt" if suite == "clinical" else None
    report = write_report(
        store, out, title=f"promptvit real-data suite ({suite})", header=header, reference=reference
    )
    print(f"\nreport: {report.markdown}\nwall time {wall / 60:.1f} min; {len(failures)} problems")
    for line in failures[:20]:
        print(f"  {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
