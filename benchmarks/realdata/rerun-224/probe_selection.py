"""How the L-BFGS probe should pick its L2 strength from 5 validation images per class: a study on
development draws (seeds 100..104 of the cnn_derm_224 protocol), kept apart from the reported draws 0..9.

For every draw: features of train/val/test with the eval transform, the whole L2 path (grid of
promptvit.train.probe), and per strength the val accuracy, val loss and test balanced accuracy. Rules that
look at val only (and one that cross-validates on train + val pooled) are then scored on the test sets of
these draws; scikit-learn's LogisticRegression(C=1) and the best strength in hindsight (test) are printed for
scale.
"""

import json
import statistics
import sys
import time

import numpy as np
import torch
from draws import HERE, eval_draws
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from promptvit.train.losses import classification_loss
from promptvit.train.probe import DEFAULT_L2_GRID, fit_head

SEEDS = [int(s) for s in sys.argv[1:]] or [100, 101, 102, 103, 104]
grid = sorted(DEFAULT_L2_GRID, reverse=True)
draws = {}
started = time.time()  # reset after each draw, so that a draw's time includes its feature extraction
for draw in eval_draws(SEEDS):
    spec, split, feats = draw["spec"], draw["split"], draw["feats"]
    head = torch.nn.Linear(feats["train"][0].shape[1], split.train.num_classes, dtype=torch.float64)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    path = []
    for l2 in grid:  # strong to weak, warm-started, as the probe does
        fit_head(head, feats["train"][0], feats["train"][1], l2)
        with torch.no_grad():
            val_logits, test_logits = head(feats["val"][0]), head(feats["test"][0])
        path.append({
            "l2": l2,
            "val_acc": float((val_logits.argmax(1) == feats["val"][1]).double().mean()),
            "val_loss": float(classification_loss(val_logits, feats["val"][1], False)),
            "test_bal_acc": 100 * balanced_accuracy_score(feats["test"][1].numpy(), test_logits.argmax(1).numpy()),
        })
    # 5-fold cross-validation on train + val pooled (stratified: 3 images per class per fold)
    pooled_x = torch.cat([feats["train"][0], feats["val"][0]])
    pooled_y = torch.cat([feats["train"][1], feats["val"][1]])
    folds = torch.empty_like(pooled_y)
    for c in pooled_y.unique():
        where = (pooled_y == c).nonzero().flatten()
        where = where[torch.randperm(len(where), generator=torch.Generator().manual_seed(int(c)))]
        folds[where] = torch.arange(len(where)) % 5
    correct, losses = torch.zeros(len(grid)), torch.zeros(len(grid))
    for fold in range(5):
        inside, held = folds != fold, folds == fold
        cv_head = torch.nn.Linear(pooled_x.shape[1], split.train.num_classes, dtype=torch.float64)
        torch.nn.init.zeros_(cv_head.weight)
        torch.nn.init.zeros_(cv_head.bias)
        for i, l2 in enumerate(grid):
            fit_head(cv_head, pooled_x[inside], pooled_y[inside], l2)
            with torch.no_grad():
                logits = cv_head(pooled_x[held])
            correct[i] += float((logits.argmax(1) == pooled_y[held]).sum())
            losses[i] += float(classification_loss(logits, pooled_y[held], False)) * int(held.sum())
    for i, point in enumerate(path):
        point["cv_acc"], point["cv_loss"] = float(correct[i]) / len(pooled_y), float(losses[i]) / len(pooled_y)
    sk = LogisticRegression(C=1.0, max_iter=5000).fit(feats["train"][0].numpy(), feats["train"][1].numpy())
    sk_acc = 100 * balanced_accuracy_score(feats["test"][1].numpy(), sk.predict(feats["test"][0].numpy()))
    draws[spec.seed] = {"path": path, "sklearn_C1": sk_acc, "seconds": round(time.time() - started, 1)}
    print(spec.seed, "sklearn C=1:", round(sk_acc, 1), f"({draws[spec.seed]['seconds']} s)", flush=True)
    started = time.time()


def rule_best_acc_loss(path):  # today's rule: best val accuracy, ties to the lower val loss
    return max(range(len(path)), key=lambda i: (path[i]["val_acc"], -path[i]["val_loss"], -i))


def rule_val_loss(path):  # the lowest val loss (NLL)
    return min(range(len(path)), key=lambda i: path[i]["val_loss"])


def rule_best_acc_middle(path):  # best val accuracy, ties to the middle of the tied strengths
    best = max(p["val_acc"] for p in path)
    tied = [i for i, p in enumerate(path) if p["val_acc"] == best]
    return tied[len(tied) // 2]


def rule_best_acc_weakest(path):  # best val accuracy, ties to the weakest L2
    best = max(p["val_acc"] for p in path)
    return max(i for i, p in enumerate(path) if p["val_acc"] == best)


def rule_cv(path):  # best 5-fold CV accuracy on train + val pooled, ties to the lower CV loss
    return max(range(len(path)), key=lambda i: (path[i]["cv_acc"], -path[i]["cv_loss"], -i))


rules = {
    "best val acc, ties -> lower val loss (current)": rule_best_acc_loss,
    "lowest val loss": rule_val_loss,
    "best val acc, ties -> middle of the tie": rule_best_acc_middle,
    "best val acc, ties -> weakest L2": rule_best_acc_weakest,
    "5-fold CV on train + val, ties -> lower CV loss": rule_cv,
}
summary = {}
for name, rule in rules.items():
    scores = [d["path"][rule(d["path"])]["test_bal_acc"] for d in draws.values()]
    chosen = [d["path"][rule(d["path"])]["l2"] for d in draws.values()]
    summary[name] = (statistics.mean(scores), statistics.stdev(scores), scores, chosen)
sk = [d["sklearn_C1"] for d in draws.values()]
oracle = [max(p["test_bal_acc"] for p in d["path"]) for d in draws.values()]
summary["scikit-learn C=1 (fixed)"] = (statistics.mean(sk), statistics.stdev(sk), sk, None)
summary["best strength on test (hindsight)"] = (statistics.mean(oracle), statistics.stdev(oracle), oracle, None)
for name, (mean, std, scores, chosen) in summary.items():
    l2s = "" if chosen is None else "  l2: " + ", ".join(f"{c:.3g}" for c in chosen)
    print(f"{name:48s} {mean:5.1f} ± {std:4.1f}   " + ", ".join(f"{s:.1f}" for s in scores) + l2s)
(HERE / "probe_selection.json").write_text(json.dumps({"seeds": SEEDS, "draws": draws}, indent=1) + "\n")
print("log10 grid:", [round(float(np.log10(g)), 1) for g in grid])
