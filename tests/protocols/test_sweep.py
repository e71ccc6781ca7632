"""End-to-end sweeps on tiny data: CLI, selection on validation only, VTAB/MedFMC/FGVC, backends (process, Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from promptvit.cli.protocol_commands import register_protocol_commands
from promptvit.protocols import (
    ResultStore,
    SweepConfig,
    load_records,
    load_sweep_config,
    run_sweep,
    select_hparams,
    write_report,
)

from .helpers import (
    TINY_BACKBONE,
    tiny_base,
    write_fgvc_root,
    write_image_folder,
    write_medfmc_root,
    write_vtab_root,
)


def cli_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # a group, as the real app, so that verbs are sub-commands
        pass

    register_protocol_commands(app)
    return app


def invoke(*args: str):
    return CliRunner().invoke(cli_app(), list(args), terminal_width=200)


def _fewshot_yaml(tmp_path: Path, data: Path, **extra) -> Path:
    config = {
        "name": "e2e",
        "title": "tiny end-to-end",
        "protocol": {
            "name": "fewshot",
            "tasks": {"bands": {"kind": "folder", "path": "${DATA}"}},
            "shots": [1, 2],
            "seeds": [0, 1],
            "val_per_class": 2,
        },
        "base": tiny_base(epochs=2),
        "methods": ["linear", {"preset": "vpt.np", "label": "vpt", "grid": {"prompt_length": [1, 2]}}],
        "grid": {"lr": [0.01, 0.002]},
        "results": str(tmp_path / "res"),
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_sweep_selects_on_val_and_resumes(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", classes=3, per_class=8)
    config = _fewshot_yaml(tmp_path, data)
    result = invoke("sweep", str(config), "--var", f"DATA={data}")
    assert result.exit_code == 0, result.output
    loaded = load_records(tmp_path / "res")
    search = [r for r in loaded.records if r["stage"] == "search"]
    final = [r for r in loaded.records if r["stage"] == "final"]
    assert len(search) == 2 * 2 + 4 * 2 and len(final) == 2 * 2 * 2  # (lr | np x lr) x K; methods x K x seeds
    assert all(r["evaluated_on"] == "val" and "val" in r["data"]["evaluated"] for r in search)
    assert all(r["evaluated_on"] == "test" and "test" in r["data"]["evaluated"] for r in final)
    assert all(r["selection"]["test_used_for_selection"] is False for r in loaded.records)
    assert all(r["selection"]["hyperparameters_split"] == "val" for r in final)
    assert all(r["selection"]["epoch_split"] == "val" for r in final)
    # the final hyperparameters are the best mean val score of the search, recomputed here by hand
    for r in final:
        candidates = {}
        for s in search:
            if (s["method"], s["shots"]) == (r["method"], r["shots"]):
                candidates.setdefault(json.dumps(s["hparams"], sort_keys=True), []).append(s["score"])
        best = max(
            candidates.items(), key=lambda kv: (sum(kv[1]) / len(kv[1]), -json.loads(kv[0])["train.lr"])
        )
        assert r["hparams"] == json.loads(best[0])
    # final runs reuse the search run's training when it is the same (seed 0): only the test set is new
    reused = [r for r in final if r["seed"] == 0]
    assert all(r["resumed"] for r in reused) and all(
        r["train_hash"] in {s["train_hash"] for s in search} for r in reused
    )
    report = tmp_path / "res" / "report" / "report.md"
    assert report.is_file() and "how each number was selected" in report.read_text()
    again = invoke("sweep", str(config), "--var", f"DATA={data}", "--no-report")
    assert again.exit_code == 0 and "skipped 12" in again.output and "skipped 8" in again.output
    assert len(load_records(tmp_path / "res").records) == len(loaded.records)


def test_cli_sweep_user_errors_are_one_line(tmp_path: Path) -> None:
    result = invoke("sweep", str(tmp_path / "missing.yaml"))
    assert (
        result.exit_code == 2
        and "sweep config not found" in result.output
        and "Traceback" not in result.output
    )
    data = write_image_folder(tmp_path / "data", classes=2, per_class=4)
    bad = _fewshot_yaml(tmp_path, data, methods=["linear", "no_such_method"])
    result = invoke("sweep", str(bad), "--var", f"DATA={data}")
    assert result.exit_code == 2 and "unknown method or preset 'no_such_method'" in result.output
    result = invoke("sweep", str(bad))
    assert result.exit_code == 2 and "${DATA}" in result.output
    typo = _fewshot_yaml(tmp_path, data, grids={"lr": [0.1]})
    result = invoke("sweep", str(typo), "--var", f"DATA={data}")
    assert result.exit_code == 2 and "grids" in result.output and "Traceback" not in result.output
    result = invoke(
        "sweep", str(_fewshot_yaml(tmp_path, data)), "--var", f"DATA={data}", "--backend", "slurm"
    )
    assert result.exit_code == 2 and "--backend" in result.output


def test_vtab_sweep_last_epoch_and_group_means(tmp_path: Path) -> None:
    root = write_vtab_root(tmp_path / "vtab", ["cifar100", "eurosat"], classes=3)
    config = SweepConfig.model_validate(
        {
            "protocol": {
                "name": "vtab",
                "root": str(root),
                "tasks": ["cifar100", "eurosat"],
                "seeds": [42, 44],
            },
            "base": tiny_base(epochs=2),
            "methods": ["linear"],
            "grid": {"lr": [0.01, 0.002]},
        }
    )
    outcome = run_sweep(config, results=tmp_path / "res")
    assert outcome.planned == {"search": 4, "final": 4} and not outcome.failures
    final = [r for r in load_records(tmp_path / "res").records if r["stage"] == "final"]
    assert {r["seed"] for r in final} == {42, 44}
    assert all(r["selection"]["epoch_split"] == "last epoch" and r["best_epoch"] == 2 for r in final)
    assert all(r["sizes"] == {"train": 14, "val": 0, "test": 9} and r["num_classes"] == 3 for r in final)
    spec = final[0]["spec"]
    assert spec["augment"] is False and spec["config"]["backbone"]["mean"] == [0.485, 0.456, 0.406]
    table = write_report(tmp_path / "res", tmp_path / "out").tables[0]
    assert "natural mean (1 of 7 tasks)" in table.columns and "mean of group means" in table.columns


def test_medfmc_and_fgvc_sweeps_record_their_metrics(tmp_path: Path) -> None:
    root = write_medfmc_root(tmp_path / "medfmc", datasets=("colon", "endo"), shots=(1,), exps=(1, 2))
    config = SweepConfig.model_validate(
        {
            "protocol": {
                "name": "medfmc",
                "root": str(root),
                "datasets": ["colon", "endo"],
                "shots": [1],
                "exps": [1, 2],
                "seeds": [0],  # the recipe's four seeds per sampling would quadruple the runs
            },
            "base": tiny_base(epochs=1),
            "methods": ["linear"],
        }
    )
    outcome = run_sweep(config, results=tmp_path / "res")
    assert outcome.planned == {"search": 0, "final": 4} and not outcome.failures
    records = load_records(tmp_path / "res").records
    assert {(r["task"], r["metric"]) for r in records} == {("colon", "accuracy"), ("endo", "map")}
    assert all(r["score"] == r["metrics"][r["metric"]] and "auc" in r["metrics"] for r in records)
    assert all(r["selection"]["hyperparameters_split"] == "none (fixed)" for r in records)
    assert all("minus" in r["data"]["val"] for r in records)  # trainval minus train_expE

    fgvc = write_fgvc_root(tmp_path / "fgvc", {"cub": 2}, per_class=10)
    config = SweepConfig.model_validate(
        {
            "protocol": {
                "name": "fgvc",
                "root": str(fgvc),
                "datasets": ["cub"],
                "seeds": [0],
                "check_num_classes": False,
            },
            "base": tiny_base(epochs=1),
            "methods": ["bias"],
        }
    )
    run_sweep(config, results=tmp_path / "res2")
    (record,) = load_records(tmp_path / "res2").records
    assert record["sizes"] == {"train": 18, "val": 2, "test": 4} and record["metric"] == "accuracy"


def _backend_config(
    data: Path, shots: tuple[int, ...] = (1, 2), methods: tuple[str, ...] = ("linear", "bias"), **runner
) -> SweepConfig:
    return SweepConfig.model_validate(
        {
            "protocol": {
                "name": "fewshot",
                "tasks": {"t": {"path": str(data)}},
                "shots": list(shots),
                "seeds": [0, 1],
                "val_per_class": 2,
            },
            "base": {
                "backbone": TINY_BACKBONE,
                "train": {"epochs": 2, "batch_size": 2, "optimizer": "adamw", "lr": 0.01},
            },
            "methods": list(methods),
            "grid": {"lr": [0.01, 0.003]},
            "runner": runner,
        }
    )


def _scores(root: Path) -> dict[str, tuple]:
    return {r["config_hash"]: (r["status"], r["score"], r["hparams"]) for r in load_records(root).records}


@pytest.fixture(scope="module")
def backend_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data folder for the backend comparisons (its path is part of every config hash)."""
    return write_image_folder(tmp_path_factory.mktemp("backend") / "data", classes=2, per_class=6)


@pytest.fixture(scope="module")
def inprocess_scores(backend_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    results = tmp_path_factory.mktemp("inprocess") / "res"
    run_sweep(_backend_config(backend_data), results=results)
    return _scores(results)


def _assert_same(scores: dict[str, tuple], expected: dict[str, tuple]) -> None:
    assert scores.keys() == expected.keys()
    for digest, (status, score, hparams) in scores.items():
        assert status == expected[digest][0] and hparams == expected[digest][2]
        assert score == pytest.approx(expected[digest][1], abs=1e-6)


def test_process_backend_matches_inprocess(backend_data, inprocess_scores, tmp_path: Path) -> None:
    config = _backend_config(backend_data, backend="process", workers=2, start_method="fork", threads=1)
    outcome = run_sweep(config, results=tmp_path / "res")
    assert not outcome.failures
    _assert_same(_scores(tmp_path / "res"), inprocess_scores)


@pytest.mark.slow
@pytest.mark.distributed
def test_ray_backend_matches_inprocess(backend_data, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'promptvit[ray]'); skipping")
    small = {"shots": (1,), "methods": ("bias",)}  # 2 search + 2 final runs: Ray's start-up dominates anyway
    run_sweep(_backend_config(backend_data, **small), results=tmp_path / "inprocess")
    # Ray 2.x removed local_mode; a one-CPU local instance (one worker, Ray tasks) stands in for it
    config = _backend_config(backend_data, **small, backend="ray", ray_num_cpus=1, cpus_per_run=1)
    outcome = run_sweep(config, results=tmp_path / "res")
    assert not ray.is_initialized()  # the sweep shuts down the instance it started
    assert not outcome.failures and outcome.counts["search"]["ok"] == 2 and outcome.counts["final"]["ok"] == 2
    _assert_same(_scores(tmp_path / "res"), _scores(tmp_path / "inprocess"))
    again = run_sweep(config, results=tmp_path / "res", backend="inprocess")
    assert set(again.counts["search"]) == {"skipped"} and set(again.counts["final"]) == {"skipped"}


def test_missing_ray_gives_a_clear_error(backend_data, tmp_path: Path, monkeypatch) -> None:
    import builtins

    from promptvit.protocols import ProtocolError

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ProtocolError, match=r"pip install 'promptvit\[ray\]'"):
        run_sweep(_backend_config(backend_data), results=tmp_path / "res", backend="ray")
    assert not ResultStore(tmp_path / "res").done_hashes()


def test_select_hparams_ignores_test_and_diverged(tmp_path: Path) -> None:
    def r(
        point: float,
        score: float | None,
        status: str = "ok",
        stage: str = "search",
        evaluated_on: str = "val",
    ) -> dict:
        return {
            "config_hash": f"{point}-{score}-{stage}",
            "protocol": "fewshot",
            "task": "t",
            "shots": 1,
            "method": "m",
            "hparams": {"train.lr": point},
            "score": score,
            "status": status,
            "stage": stage,
            "evaluated_on": evaluated_on,
        }

    records = [
        r(0.1, 80.0),
        r(0.1, 70.0),
        r(0.01, 75.0),
        r(0.01, 75.0),
        r(1.0, 99.0),
        r(1.0, None, "diverged"),
        r(0.001, 100.0, stage="final", evaluated_on="test"),
        r(0.0001, 75.0),
    ]
    (choice,) = select_hparams(records).values()
    assert choice.hparams == {"train.lr": 0.0001}  # tie at 75 with lr 0.1 and 0.01: the smaller lr wins
    assert choice.runs == 1 and choice.candidates == 4 and "3 of 4 grid points valid" in choice.detail
    assert load_sweep_config  # re-exported


def test_verbs_are_registered_on_the_main_app() -> None:
    from promptvit.cli import app

    for verb in ("sweep", "report"):
        result = CliRunner().invoke(app, [verb, "--help"], terminal_width=200)
        assert result.exit_code == 0 and "Usage" in result.output


def test_final_runs_wait_for_a_complete_search(backend_data, tmp_path: Path, monkeypatch) -> None:
    from promptvit.protocols import runner

    config = _backend_config(backend_data, shots=(1,), methods=("linear",))
    original = runner.execute

    def flaky(spec, run_dir, **kwargs):
        if spec.stage == "search" and spec.config.train.lr == 0.003:
            raise OSError("network file system hiccup")
        return original(spec, run_dir, **kwargs)

    monkeypatch.setattr(runner, "execute", flaky)
    outcome = run_sweep(config, results=tmp_path / "res")
    assert outcome.counts["search"] == {"ok": 1, "failed": 1} and outcome.planned["final"] == 0
    assert any("failed runs" in line for line in outcome.unresolved) and len(outcome.failures) == 1
    monkeypatch.undo()
    outcome = run_sweep(config, results=tmp_path / "res")
    assert outcome.counts["search"] == {"skipped": 1, "ok": 1} and outcome.counts["final"] == {"ok": 2}
    assert not outcome.unresolved and not outcome.failures


def test_grid_recipe_searches_the_protocol_recipes_lr_and_wd_grid(tmp_path: Path) -> None:
    root = write_vtab_root(tmp_path / "vtab", ["cifar100"], classes=3)
    raw = {
        "protocol": {"name": "vtab", "root": str(root), "tasks": ["cifar100"]},  # recipe vpt-vtab by default
        "base": tiny_base(epochs=1),
        "methods": ["linear"],
        "grid": "recipe",
    }
    config = SweepConfig.model_validate(raw)
    # VPT's tune_vtab.py grid, as docs/recipes.md states it
    assert config.grid["lr"] == [50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05]
    assert config.grid["weight_decay"] == [0.01, 0.001, 0.0001, 0.0]
    fewshot = {**raw, "protocol": {"name": "fewshot", "tasks": {"t": {"kind": "folder", "path": str(root)}}}}
    with pytest.raises(ValueError, match="grid: recipe needs a protocol recipe that states a grid.*vpt-fgvc"):
        SweepConfig.model_validate(fewshot)
