"""CKA invariances, independence, the direct formula, the unbiased estimator and the model helpers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import promptvit
from promptvit.analysis.cka import (
    cka_matrix,
    gram_linear,
    hsic,
    layer_cka,
    linear_cka,
    model_prompt_patch_cka,
    plot_cka_heatmap,
    prompt_patch_cka,
    rbf_cka,
)
from tests.conftest import build_tiny, tiny_input


def _x(n: int = 40, d: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


@pytest.mark.parametrize("debiased", [False, True])
def test_invariances(debiased: bool) -> None:
    x = _x()
    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(6, 6)))
    assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0)
    assert linear_cka(x, x @ rotation, debiased=debiased) == pytest.approx(1.0)
    assert linear_cka(x, 7.5 * x, debiased=debiased) == pytest.approx(1.0)
    assert linear_cka(x, x + 3.0, debiased=debiased) == pytest.approx(1.0)  # centring


def test_independent_matrices_are_dissimilar() -> None:
    x, y = _x(200, 5, 0), _x(200, 5, 1)
    assert linear_cka(x, y) < 0.1
    assert abs(linear_cka(x, y, debiased=True)) < 0.05
    assert rbf_cka(x, y) < 0.15


def test_matches_direct_feature_space_formula() -> None:
    x = _x(30, 4)
    y = np.concatenate([x[:, :2] ** 2, _x(30, 3, 5)], 1)  # partly dependent, other width
    xc, yc = x - x.mean(0), y - y.mean(0)
    direct = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert linear_cka(torch.tensor(x), torch.tensor(y)) == pytest.approx(direct)


def test_debiased_hsic_is_the_u_statistic() -> None:
    n = 6
    k = gram_linear(_x(n, 3, 2))
    l = gram_linear(_x(n, 2, 3))  # noqa: E741
    pairs = [(i, j) for i, j in itertools.permutations(range(n), 2)]
    triples = list(itertools.permutations(range(n), 3))
    quads = list(itertools.permutations(range(n), 4))
    term1 = sum(k[i, j] * l[i, j] for i, j in pairs) / len(pairs)
    term2 = sum(k[i, j] * l[q, r] for i, j, q, r in quads) / len(quads)
    term3 = sum(k[i, j] * l[i, q] for i, j, q in triples) / len(triples)
    assert hsic(k, l, debiased=True).item() == pytest.approx((term1 + term2 - 2 * term3).item())


def test_rbf_cka_identity_and_rotation() -> None:
    x = _x()
    rotation, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(6, 6)))
    assert rbf_cka(x, x) == pytest.approx(1.0)
    assert rbf_cka(x, x @ rotation) == pytest.approx(1.0)


def test_cka_matrix_and_model_helpers(tmp_path) -> None:
    x = _x()
    matrix = cka_matrix([x, None], [x, x[:, :2]])
    assert matrix[0, 0] == pytest.approx(1.0) and np.isnan(matrix[1]).all()
    model = promptvit.wrap(build_tiny("vit_token"), "vpt", num_classes=3, prompt_length=2)
    images = tiny_input("vit_token", batch=6)
    same = layer_cka(model, model, images)
    assert same.shape == (2, 2)
    np.testing.assert_allclose(np.diag(same), 1.0)
    cnn = build_tiny("resnet")
    cross = layer_cka(model, cnn, images)
    assert cross.shape == (2, 4) and np.isfinite(cross).all()
    prompts = prompt_patch_cka([x, None], [x, x])
    assert prompts.shape == (2, 2) and np.isnan(prompts[1]).all()
    plot_cka_heatmap(same, tmp_path / "cka.png", row_label="a", col_label="b", title="t")
    assert (tmp_path / "cka.png").stat().st_size > 0


def test_model_prompt_patch_cka_pairs_images() -> None:
    model = promptvit.wrap(
        build_tiny("vit_token"), "ap", num_classes=3, variant="concat", layer=1, prompt_length=3
    )
    images = tiny_input("vit_token", batch=6)
    matrix = model_prompt_patch_cka(model, images, batch_size=4)
    assert matrix.shape == (2, 2)
    assert np.isnan(matrix[0]).all() and np.isfinite(matrix[1]).all()  # block 0's output holds no prompts
    outputs = {}
    handle = model.backbone.blocks[1].register_forward_hook(lambda m, a, o: outputs.setdefault("o", o))
    with torch.no_grad(), model.all_token_outputs():  # every block runs as a module, so its hooks fire
        model.eval()
        model(images)
    handle.remove()
    o = outputs["o"]
    assert matrix[1, 1] == pytest.approx(linear_cka(o[:, 1:4].mean(1), o[:, 4:].mean(1)))
