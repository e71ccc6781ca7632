"""HAM10000 K=10, EfficientNet-Lite0 at 224 px, draws of the cnn_derm_224 protocol (seeds from the command
line, default 0 1 2): features with the eval transform (no augmentation); our L-BFGS probe (l2 chosen on val)
vs scikit-learn LogisticRegression (C=1) on the same features."""

import json
import sys
import time

import torch
from draws import CPU, eval_draws
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from promptvit.train.probe import fit_lbfgs_probe

out = {}
t = time.time()  # reset after each draw, so that a draw's time includes its feature extraction
for draw in eval_draws([int(s) for s in sys.argv[1:]] or [0, 1, 2]):
    spec, split, model, sets, feats = (draw[k] for k in ("spec", "split", "model", "sets", "feats"))
    names = split.train.class_names
    probe = fit_lbfgs_probe(
        model, sets["train"], sets["val"], multilabel=False, select="accuracy", class_names=names, device=CPU
    )
    head = model.get_classifier()
    with torch.no_grad():
        pred = (feats["test"][0].float() @ head.weight.T + head.bias).argmax(1).numpy()
    y = feats["test"][1].numpy()
    ours = 100 * balanced_accuracy_score(y, pred)
    sk = LogisticRegression(C=1.0, max_iter=5000).fit(feats["train"][0].numpy(), feats["train"][1].numpy())
    theirs = 100 * balanced_accuracy_score(y, sk.predict(feats["test"][0].numpy()))
    out[spec.seed] = {
        "lbfgs_l2": probe.l2,
        "lbfgs_bal_acc": ours,
        "sklearn_C1_bal_acc": theirs,
        "seconds": time.time() - t,
    }
    print(spec.seed, out[spec.seed], flush=True)
    t = time.time()
print(json.dumps(out, indent=1))
