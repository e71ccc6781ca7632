"""Prompt/patch NMI (SPT eq. 7-8) on constructed token sets with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from promptvit.analysis.nmi import block_input_nmi, joint_distribution, nmi_from_joint, prompt_patch_nmi


def _separated_tokens(n: int, scale: float = 20.0) -> torch.Tensor:
    """n tokens with t_k . t_j = scale^2 (1 - 1/n) if k == j else -scale^2 / n."""
    return scale * (torch.eye(n) - 1.0 / n)


def test_joint_is_eq7() -> None:
    g = torch.Generator().manual_seed(0)
    p, e = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    joint = joint_distribution(p, e)
    manual = torch.tensor(
        [[torch.sigmoid(p[k] @ e[j]).item() for j in range(5)] for k in range(3)], dtype=torch.float64
    )
    torch.testing.assert_close(joint, manual / manual.sum())
    assert joint.sum().item() == pytest.approx(1.0)


def test_identical_distributions_give_one() -> None:
    tokens = _separated_tokens(4)
    # prompts equal to the patch tokens: each prompt matches exactly one patch -> deterministic joint
    assert prompt_patch_nmi(tokens, tokens).item() == pytest.approx(1.0, abs=1e-9)
    assert nmi_from_joint(torch.eye(5) / 5).item() == pytest.approx(1.0)


def test_independent_distributions_give_zero() -> None:
    # prompts and patches in orthogonal subspaces: every similarity is 0, the joint is uniform = product
    prompts = torch.cat([torch.randn(4, 3), torch.zeros(4, 3)], 1)
    patches = torch.cat([torch.zeros(6, 3), torch.randn(6, 3)], 1)
    assert prompt_patch_nmi(prompts, patches).item() == pytest.approx(0.0, abs=1e-12)
    # any product joint
    joint = torch.outer(torch.tensor([0.1, 0.2, 0.7]), torch.tensor([0.5, 0.25, 0.125, 0.125]))
    assert nmi_from_joint(joint).item() == pytest.approx(0.0, abs=1e-12)
    # independent random tokens with small dot products: nearly a product distribution
    g = torch.Generator().manual_seed(1)
    small = prompt_patch_nmi(0.1 * torch.randn(8, 16, generator=g), 0.1 * torch.randn(30, 16, generator=g))
    assert 0 <= small.item() < 0.01


def test_nmi_matches_sklearn_on_a_contingency_table() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, 500)
    b = (a + rng.integers(0, 2, 500)) % 5  # dependent labels
    table = np.zeros((4, 5))
    np.add.at(table, (a, b), 1)
    expected = normalized_mutual_info_score(a, b, average_method="arithmetic")
    assert nmi_from_joint(table / table.sum()).item() == pytest.approx(expected, rel=1e-9)


def test_block_input_nmi_uses_the_prompt_rows_per_image() -> None:
    tokens = _separated_tokens(3)
    prefix = 100 * torch.ones(1, 3)  # would dominate if the prefix token were taken as a prompt
    image = torch.cat([prefix, tokens, tokens])  # [CLS, 3 prompts, 3 patches]
    batch = torch.stack([image, torch.cat([prefix, torch.zeros(3, 3), tokens])])
    values = block_input_nmi(batch, num_prefix=1, num_patches=3)
    assert values.shape == (2,)
    assert values[0].item() == pytest.approx(1.0, abs=1e-9)
    assert values[1].item() == pytest.approx(0.0, abs=1e-12)  # zero prompts: uniform joint
    assert block_input_nmi(batch[:, :4], num_prefix=1, num_patches=3) is None
    assert torch.isnan(prompt_patch_nmi(torch.ones(1, 2), torch.ones(1, 2)))  # both entropies 0


def test_layer_nmi_of_a_prompted_vit_reads_block_inputs() -> None:
    import promptvit
    from promptvit.analysis.nmi import layer_nmi
    from tests.conftest import build_tiny, tiny_input

    model = promptvit.wrap(
        build_tiny("vit_token"), "ap", num_classes=3, variant="concat", layer=1, prompt_length=3
    )
    images = tiny_input("vit_token", batch=5)
    inputs = {}
    handle = model.backbone.blocks[1].register_forward_hook(lambda m, a, o: inputs.setdefault("x", a[0]))
    with torch.no_grad(), model.all_token_outputs():  # every block runs as a module, so its hooks fire
        model.eval()
        model(images)
    handle.remove()
    x = inputs["x"]  # (5, 1 + 3 + 4, 32): CLS, 3 prompts, 2x2 patches
    expected = prompt_patch_nmi(x[:, 1:4], x[:, 4:])
    curve = layer_nmi(model, images, batch_size=2)
    assert curve["mean"][0] is None and curve["images"] == [0, 5]  # block 0 sees no prompts
    assert curve["mean"][1] == pytest.approx(expected.mean().item())
