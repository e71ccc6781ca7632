"""HAM10000 K=10, EfficientNet-Lite0 at 224 px, draws of the cnn_derm_224 protocol (seeds from the command
line, default 0 1 2): features with the eval transform (no augmentation); our L-BFGS probe (l2 chosen on val)
vs scikit-learn LogisticRegression (C=1) on the same features."""

import json
import sys
import time
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from promptvit.data import ImageDataset, build_transforms
from promptvit.experiment import build_model, data_config_for
from promptvit.protocols import load_sweep_config
from promptvit.protocols.runner import materialise
from promptvit.train.probe import extract_features, fit_lbfgs_probe

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2].parent / "shared"
if not SHARED.is_dir():
    print(f"{SHARED} not found: skipping")
    sys.exit(0)
cfg = load_sweep_config(HERE / "cnn_derm_224.yaml", {"shared": str(SHARED)})
SEEDS = [int(s) for s in sys.argv[1:]] or [0, 1, 2]
cfg = cfg.model_copy(update={"protocol": cfg.protocol.model_copy(update={"seeds": SEEDS})})
out = {}
for spec in cfg.protocol.run_specs(cfg.base, method="linear"):
    t = time.time()
    split = materialise(spec)
    model = build_model(spec.config, split.train.num_classes)
    dc = data_config_for(model, spec.config.backbone)
    dc["crop_pct"] = 1.0
    tf = build_transforms(dc, train=False)
    sets = {k: ImageDataset(getattr(split, k), tf, False) for k in ("train", "val", "test")}
    dev = torch.device("cpu")
    feats = {k: extract_features(model, v, batch_size=32, device=dev) for k, v in sets.items()}
    names = split.train.class_names
    probe = fit_lbfgs_probe(
        model, sets["train"], sets["val"], multilabel=False, select="accuracy", class_names=names, device=dev
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
print(json.dumps(out, indent=1))
