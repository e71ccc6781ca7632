"""Issue 16's before/after table: HAM10000 K=10, EfficientNet-Lite0 at 224 px, the same 10 draws (seeds 0..9,
identical splits) trained by the code before the recipes work (commit 7f2bf71: BatchNorm statistics
re-estimated in train mode, prompts exempt from weight decay, eval transform from timm's config) and by the
current code (frozen BatchNorm statistics, one weight-decay rule, direct resize).

    python benchmarks/realdata/rerun-224/before_after.py BEFORE.jsonl [BEFORE2.jsonl ...] --after AFTER.jsonl

Prints per method: balanced accuracy mean ± std over the draws before and after, and the paired difference
(after - before) with its 95 % t interval and Wilcoxon p (promptvit.protocols.stats.paired_comparison).
"""

import argparse
import json
import statistics
from pathlib import Path

from promptvit.methods import get_method
from promptvit.protocols.stats import paired_comparison


def scores(paths: list[Path], task: str) -> dict[str, dict[int, float]]:
    """label -> seed -> balanced accuracy (the test set is balanced, 30 images per class), in table order."""
    out: dict[str, dict[int, float]] = {}
    rank: dict[str, tuple[int, str]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("task") != task or record.get("status", "ok") != "ok":
                continue
            label = record.get("label") or record["method"]
            out.setdefault(label, {})[record["seed"]] = record["metrics"]["balanced_accuracy"]
            rank[label] = (get_method(record.get("method_name") or record["method"]).table_rank, label)
    return {label: out[label] for label in sorted(out, key=rank.__getitem__)}


def cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("before", nargs="+", type=Path)
    parser.add_argument("--after", required=True, type=Path)
    parser.add_argument("--task", default="ham10000")
    args = parser.parse_args()
    before, after = scores(args.before, args.task), scores([args.after], args.task)
    print("| method | before (10 draws) | after (10 draws) | after - before, paired: mean [95 % CI] | Wilcoxon p |")
    print("|---|---|---|---|---|")
    for label in after:
        now = after[label]
        old = before.get(label, {})
        seeds = sorted(set(now) & set(old))
        if not seeds:
            print(f"| {label} | n/a | {cell(list(now.values()))} ({len(now)}) | | |")
            continue
        diff = paired_comparison([now[s] for s in seeds], [old[s] for s in seeds])
        print(
            f"| {label} | {cell([old[s] for s in seeds])} | {cell([now[s] for s in seeds])} | "
            f"{diff['mean']:+.1f} [{diff['low']:+.1f}, {diff['high']:+.1f}] | {diff['wilcoxon_p']:.3f} |"
        )


if __name__ == "__main__":
    main()
