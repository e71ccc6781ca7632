"""benchmarks/speed.py runs end to end (quick mode, no timing assertions) and its EPT variants are exact."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from promptvit.layers.prompted_attention import reference_prompted_attention

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("promptvit_speed_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ept_variants_of_the_benchmark_match_the_reference(speed) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64) for _ in range(3))
    prompt = torch.randn(7, 5, generator=g, dtype=torch.float64) * 1.5
    results = []
    for fn in (speed._ept_manual, speed._ept_mask, reference_prompted_attention):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, prompt)]
        out = fn(*leaves[:3], way="pure_cat", prompt=leaves[3])
        results.append((out, torch.autograd.grad((out * out.detach().sin()).sum(), leaves)))
    reference = results[-1]
    for out, grads in results[:-1]:
        torch.testing.assert_close(out, reference[0], rtol=0, atol=1e-12)
        for a, b in zip(grads, reference[1], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_quick_run_writes_the_tables(speed, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        out = speed.main(
            ["--quick", "--threads", "1", "--skip", "memory", "--out", str(tmp_path / "speed.md")]
        )
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    for heading in (
        "## Training step",
        "## Inference throughput",
        "## Few-shot runs",
        "## Targets",
        "| CPU |",
    ):
        assert heading in text
    assert out.with_suffix(".json").is_file()
