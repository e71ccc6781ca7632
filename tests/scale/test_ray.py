"""A sweep pointed at an existing Ray cluster (here: a local Ray instance this test starts), as the README's
"Scale out" shows; the records equal an in-process sweep's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from promptvit.protocols import load_records, run_sweep
from tests.protocols.helpers import TINY_BACKBONE, write_image_folder

pytestmark = pytest.mark.distributed


def sweep_yaml(data: Path, **runner) -> dict:
    return {
        "protocol": {
            "name": "fewshot",
            "tasks": {"t": {"path": str(data)}},
            "shots": [1],
            "seeds": [0, 1],
            "val_per_class": 2,
        },
        "base": {
            "backbone": TINY_BACKBONE,
            "train": {"epochs": 2, "batch_size": 2, "optimizer": "adamw", "lr": 0.01},
        },
        "methods": ["bias"],
        "grid": {"lr": [0.01, 0.003]},
        "runner": runner,
    }


def scores(root: Path) -> dict[str, tuple]:
    return {r["config_hash"]: (r["status"], r["score"]) for r in load_records(root).records}


def test_sweep_on_an_existing_ray_cluster_matches_in_process(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    data = write_image_folder(tmp_path / "data", classes=2, per_class=6)
    reference = tmp_path / "inprocess.yaml"
    reference.write_text(yaml.safe_dump(sweep_yaml(data)))
    from promptvit.protocols import load_sweep_config

    run_sweep(load_sweep_config(reference), results=tmp_path / "inprocess")

    context = ray.init(num_cpus=2, include_dashboard=False)  # the "cluster"; its workers inherit our env
    try:
        address = context.address_info["address"]
        config = tmp_path / "sweep.yaml"
        config.write_text(yaml.safe_dump(sweep_yaml(data, backend="ray", ray_address=address, cpus_per_run=1)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        result = subprocess.run(
            [sys.executable, "-m", "promptvit", "sweep", str(config), "--results", str(tmp_path / "res")],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert ray.is_initialized()  # the sweep left the cluster it did not start running
    finally:
        ray.shutdown()
    ours, expected = scores(tmp_path / "res"), scores(tmp_path / "inprocess")
    assert ours.keys() == expected.keys() and len(ours) == 4
    for digest, (status, score) in ours.items():
        assert status == expected[digest][0] == "ok"
        assert score == pytest.approx(expected[digest][1], abs=1e-6)
