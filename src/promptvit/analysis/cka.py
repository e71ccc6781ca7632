"""Centred kernel alignment (Kornblith et al., ICML 2019) between representations of the same examples.

For two representations of the same n examples, X (n x d1) and Y (n x d2), with Gram matrices K = X X^T
and L = Y Y^T (linear kernel) or RBF Grams::

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

* biased (default, the estimator of Kornblith et al. used by AP Fig. 5 and SPT Fig. S4):
  HSIC(K, L) = tr(K H L H) / (n - 1)^2 with the centring matrix H = I - 11^T / n. For the linear kernel this
  equals ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F) with column-centred X_c, Y_c;
* debiased (``debiased=True``): the unbiased HSIC U-statistic of Song et al. (2012), which removes the
  positive bias of the biased estimator for small n relative to the width (needs n >= 4)::

      HSIC_u = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))

  with K~, L~ the Grams with zeroed diagonals.
* RBF kernel: k(x, x') = exp(-||x - x'||^2 / (2 sigma^2)) with sigma = ``sigma_frac`` x the median
  pairwise distance (Kornblith et al. use a fraction of the median distance; 0.5 here by default).

Linear CKA is invariant to orthogonal transforms and isotropic scaling of either representation, and
CKA(X, X) = 1.

Views:

* ``layer_cka``: the layer x layer CKA matrix between two models on the same images (AP Fig. 5A), each
  layer summarised per image (``promptvit.analysis.extract.pool_layer_output``: mean patch token of a ViT
  block output, global average pool of a CNN stage output per channel, prompt tokens left out on Swin);
* ``prompt_patch_cka``: prompts vs patch tokens across layers (SPT Fig. S4). Prompts and patch tokens are
  different sets of rows, so rows cannot be paired token by token; the paper does not say how it pairs
  them. Our definition pairs them by *image*: for block i, each image's prompt representation is the mean
  of the prompt tokens of that block's output (the output, because deep-VPT prompts at a block input are
  the same for every image); for block j, its patch representation is the mean of the patch tokens of that
  block's output. Entry (i, j) is the CKA over images; NaN where block i's output holds no prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from promptvit.analysis.extract import (
    BlockRecorder,
    TokenLayout,
    eval_mode,
    geometry_for,
    iterate_batches,
    layer_representations,
    model_device,
    patch_grid,
    pool_tokens,
)


def _matrix(x: Any) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    x = x.detach().to(torch.float64)
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2:
        raise ValueError(f"expected an (n, d) matrix, got shape {tuple(x.shape)}")
    return x


def gram_linear(x: Any) -> torch.Tensor:
    x = _matrix(x)
    return x @ x.T


def gram_rbf(x: Any, *, sigma_frac: float = 0.5) -> torch.Tensor:
    """RBF Gram with bandwidth ``sigma_frac`` x median pairwise Euclidean distance."""
    x = _matrix(x)
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min(0)
    off = d2[~torch.eye(len(x), dtype=torch.bool)]
    median = off.median().sqrt() if off.numel() else torch.tensor(0.0, dtype=x.dtype)
    sigma = sigma_frac * median
    if sigma <= 0:
        return torch.ones_like(d2)
    return torch.exp(-d2 / (2 * sigma**2))


def hsic(k: torch.Tensor, l: torch.Tensor, *, debiased: bool = False) -> torch.Tensor:  # noqa: E741
    """HSIC of two (n, n) Gram matrices (biased V-statistic, or the unbiased U-statistic)."""
    n = k.shape[0]
    if debiased:
        if n < 4:
            raise ValueError(f"debiased HSIC needs at least 4 examples, got {n}")
        k = k - torch.diag(torch.diagonal(k))
        l = l - torch.diag(torch.diagonal(l))  # noqa: E741
        ones_k = k.sum(1)
        ones_l = l.sum(1)
        term = (
            (k * l).sum()
            + ones_k.sum() * ones_l.sum() / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (ones_k @ ones_l)
        )
        return term / (n * (n - 3))
    kc = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    lc = l - l.mean(0, keepdim=True) - l.mean(1, keepdim=True) + l.mean()
    return (kc * lc).sum() / (n - 1) ** 2


def cka_from_grams(k: torch.Tensor, l: torch.Tensor, *, debiased: bool = False) -> float:  # noqa: E741
    if k.shape != l.shape or k.shape[0] != k.shape[1]:
        raise ValueError(
            f"Gram matrices must be the same (n, n) shape, got {tuple(k.shape)} and {tuple(l.shape)}"
        )
    cross = hsic(k, l, debiased=debiased)
    denom = hsic(k, k, debiased=debiased) * hsic(l, l, debiased=debiased)
    if not denom > 0:
        return float("nan")
    return float(cross / denom.sqrt())


def linear_cka(x: Any, y: Any, *, debiased: bool = False) -> float:
    """Linear CKA between (n, d1) and (n, d2) representations of the same n examples."""
    x, y = _matrix(x), _matrix(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares the same examples: {x.shape[0]} rows vs {y.shape[0]}")
    return cka_from_grams(gram_linear(x), gram_linear(y), debiased=debiased)


def rbf_cka(x: Any, y: Any, *, sigma_frac: float = 0.5, debiased: bool = False) -> float:
    x, y = _matrix(x), _matrix(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares the same examples: {x.shape[0]} rows vs {y.shape[0]}")
    return cka_from_grams(
        gram_rbf(x, sigma_frac=sigma_frac), gram_rbf(y, sigma_frac=sigma_frac), debiased=debiased
    )


def cka_matrix(
    reps_a: Sequence[Any | None], reps_b: Sequence[Any | None], *, debiased: bool = False
) -> np.ndarray:
    """Linear CKA between every pair (layer i of A, layer j of B); None entries give NaN rows/columns."""
    grams_a = [gram_linear(r) if r is not None else None for r in reps_a]
    grams_b = [gram_linear(r) if r is not None else None for r in reps_b]
    out = np.full((len(grams_a), len(grams_b)), np.nan)
    for i, k in enumerate(grams_a):
        for j, l in enumerate(grams_b):  # noqa: E741
            if k is not None and l is not None:
                out[i, j] = cka_from_grams(k, l, debiased=debiased)
    return out


def prompt_patch_cka(
    prompt_reps: Sequence[Any | None], patch_reps: Sequence[Any], *, debiased: bool = False
) -> np.ndarray:
    """SPT Fig. S4 (our pairing by image, see module docstring): rows = prompts of block i, cols = patches of j."""
    return cka_matrix(prompt_reps, patch_reps, debiased=debiased)


@torch.no_grad()
def model_prompt_patch_cka(
    model: nn.Module, images: torch.Tensor, *, debiased: bool = False, batch_size: int = 32
) -> np.ndarray:
    """``prompt_patch_cka`` of a ViT on images: (blocks x blocks), NaN rows where a block output has no prompts."""
    geometry = geometry_for(model)
    if geometry.kind != "vit":
        raise ValueError("prompt/patch CKA needs a ViT")
    prompts: list[list[torch.Tensor]] = []
    patches: list[list[torch.Tensor]] = []
    for batch in iterate_batches(images, batch_size):
        grid = patch_grid(geometry, tuple(batch.shape[-2:]))

        def reduce(index: int, x: torch.Tensor, out: torch.Tensor, grid: tuple[int, int] = grid) -> Any:
            return pool_tokens(out, TokenLayout.from_count(out.shape[1], geometry.num_prefix_tokens, grid))

        with eval_mode(model), BlockRecorder(model, reduce) as recorder:
            model.forward_features(batch.to(model_device(model)))
        if not prompts:
            prompts = [[] for _ in recorder.modules]
            patches = [[] for _ in recorder.modules]
        for index, pooled in recorder.records.items():
            patches[index].append(pooled.patch_mean.cpu())
            if pooled.prompt_mean is not None:
                prompts[index].append(pooled.prompt_mean.cpu())
    prompt_reps = [torch.cat(c) if c else None for c in prompts]
    patch_reps = [torch.cat(c) for c in patches]
    return prompt_patch_cka(prompt_reps, patch_reps, debiased=debiased)


def layer_cka(
    model_a: nn.Module,
    model_b: nn.Module,
    images: torch.Tensor,
    *,
    pooling: str = "mean",
    debiased: bool = False,
    batch_size: int = 32,
) -> np.ndarray:
    """AP Fig. 5A: (layers of A) x (layers of B) linear CKA on the same images (ViT blocks / CNN stages)."""
    reps_a = layer_representations(model_a, images, pooling=pooling, batch_size=batch_size)
    reps_b = layer_representations(model_b, images, pooling=pooling, batch_size=batch_size)
    return cka_matrix(reps_a, reps_b, debiased=debiased)


def plot_cka_heatmap(
    matrix: Any,
    path: str | Path,
    *,
    row_label: str,
    col_label: str,
    title: str,
    annotate: bool | None = None,
) -> None:
    """Heatmap of a CKA matrix, row/column 1 = first layer at the bottom-left; NaN cells left blank."""
    from promptvit.analysis._plotting import new_figure, save_figure, wrap

    m = np.asarray(matrix, dtype=np.float64)
    rows, cols = m.shape
    fig, axes = new_figure(1, 1, width=max(4.5, 0.45 * cols + 2.5), height=max(3.8, 0.4 * rows + 1.8))
    ax = axes[0, 0]
    image = ax.imshow(
        np.ma.masked_invalid(m), origin="lower", cmap="magma", vmin=0.0, vmax=1.0, aspect="auto"
    )
    fig.colorbar(image, ax=ax, label="linear CKA")
    ax.set_xticks(range(cols), [str(j + 1) for j in range(cols)])
    ax.set_yticks(range(rows), [str(i + 1) for i in range(rows)])
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(wrap(title, max(40, int(10 * fig.get_figwidth()))), fontsize=9)
    if annotate if annotate is not None else rows * cols <= 144:
        for i in range(rows):
            for j in range(cols):
                if np.isfinite(m[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{m[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if m[i, j] < 0.6 else "black",
                    )
    save_figure(fig, path)
