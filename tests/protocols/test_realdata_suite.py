"""The real-data benchmark suite: its configs validate, and it skips cleanly without ../shared."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from promptvit.protocols import load_sweep_config
from promptvit.protocols.sweep import resolve_preset

SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "realdata"


def _load_runner():
    spec = importlib.util.spec_from_file_location("realdata_run", SUITE / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_suite_skips_cleanly_without_shared_data(tmp_path: Path, monkeypatch, capsys) -> None:
    runner = _load_runner()
    monkeypatch.setattr(runner, "SHARED", tmp_path / "no-shared")
    assert runner.main(["--smoke", "--results", str(tmp_path / "out")]) == 0
    assert "skipping the real-data suite" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (SUITE / "configs").glob("*.yaml")))
def test_committed_configs_validate(name: str) -> None:
    config = load_sweep_config(SUITE / "configs" / name, {"shared": "/nonexistent/shared"})
    labels = [resolve_preset(m).label for m in config.methods]
    if name.startswith("clinical"):  # many draws at one K
        assert config.protocol.shots == [10] and len(config.protocol.seeds) >= 10
        if config.protocol.recipe is None:  # a main table: linear first (the paired baseline)
            assert len(labels) == len(set(labels)) >= 4 and labels[0] == "linear"
        else:  # rows trained by a paper's recipe, paired with the main table's draws of the same task
            main = load_sweep_config(SUITE / "configs" / name.replace("_recipe", ""), {"shared": "/nonexistent/shared"})
            assert config.protocol.seeds == main.protocol.seeds and config.protocol.tasks == main.protocol.tasks
            assert not set(labels) & {resolve_preset(m).label for m in main.methods}
    else:
        assert len(labels) == len(set(labels)) >= 8
        assert set(config.protocol.shots) >= {1, 5, 10} and len(config.protocol.seeds) >= 5
    specs = config.protocol.run_specs(config.base, method="linear")
    assert specs and all(s.evaluate_on == "test" for s in specs)
