"""Data-parallel training under torchrun on CPU (gloo, 2 processes) equals one process with the same global
batch; a rank killed mid-run leaves the run folder resumable. The README's "Scale out" commands."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from promptvit.cli import app
from promptvit.train.distributed import Ranks, ShardedBatches
from tests.cli.test_cli import write_config, write_image_folder

pytestmark = pytest.mark.distributed

KILL_RANK_1 = '''
import os, signal, sys
import promptvit
from promptvit.cli import main

def on_epoch_end(self, model, epoch):
    if epoch == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # as if the machine running rank 1 died
    return {}

promptvit.get_method("lora").on_epoch_end = on_epoch_end
sys.argv = ["promptvit", *sys.argv[1:]]
main()
'''


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = write_image_folder(root / "data", classes=3, per_class=8)
    # 3 classes x 4 shots = 12 training images, global batch 4: 3 steps per epoch, 2 images per rank.
    config = write_config(root, data, method="lora", epochs=3, batch_size=4)
    # No random augmentation: its draws come from each process's own RNG stream.
    args = ["train", "--config", str(config), "--data.shots", "4", "--data.augment", "false", "--method.rank", "2"]
    result = CliRunner().invoke(app, [*args, "--name", "single"])
    assert result.exit_code == 0, result.output
    return root, args


def tuned(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "artifact" / "adapter_model.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:  # gradients summed across ranks in another order: float tolerance, not bit equality
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_shards_of_each_step_together_are_the_single_process_batch() -> None:
    dataset = list(range(12))
    single = [b.tolist() for b in DataLoader(dataset, batch_size=4, shuffle=True, generator=seeded(3))]
    shards = [list(ShardedBatches(dataset, global_batch=4, generator=seeded(3), ranks=Ranks(r, 2, r))) for r in (0, 1)]
    for step, batch in enumerate(single):
        assert sorted(shards[0][step].tolist() + shards[1][step].tolist()) == sorted(batch)
    uneven = ShardedBatches(list(range(5)), global_batch=4, generator=seeded(0), ranks=Ranks(1, 2, 1))
    assert [len(b) for b in uneven] == [2, 1]  # the last batch of one item: rank 1 repeats it


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_two_processes_equal_one_with_the_same_global_batch(setup) -> None:
    root, args = setup
    result = torchrun("-m", "promptvit", *args, "--name", "ddp")
    assert result.returncode == 0, result.stdout + result.stderr
    runs = root / "runs"
    assert_same_tensors(tuned(runs / "ddp"), tuned(runs / "single"))
    assert result.stdout.count("epoch 3/3: train_loss") == 1  # rank 0 alone speaks (and writes)
    single, ddp = (json.loads((runs / n / "metrics.json").read_text()) for n in ("single", "ddp"))
    assert ddp["best_epoch"] == single["best_epoch"]
    assert ddp["test"]["accuracy"] == pytest.approx(single["test"]["accuracy"])
    ddp_log, single_log = (read_log(runs / n / "log.csv") for n in ("ddp", "single"))
    assert [row["epoch"] for row in ddp_log] == ["1", "2", "3"]  # written once, by rank 0
    # The train loss is gathered over both ranks: the mean over all 12 images, as in one process.
    for ours, reference in zip(ddp_log, single_log, strict=True):
        assert float(ours["train_loss"]) == pytest.approx(float(reference["train_loss"]), rel=1e-4)


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_killed_rank_leaves_the_run_resumable(setup) -> None:
    root, args = setup
    script = root / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    killed = torchrun(str(script), *args, "--name", "killed")
    assert killed.returncode != 0
    # the surviving rank names what was kept and the command that resumes (issue 24)
    assert "rank 0: stopped" in killed.stdout, killed.stdout + killed.stderr
    assert "resume with:\n  torchrun --nproc_per_node=2 -m promptvit train" in killed.stdout
    run = root / "runs" / "killed"
    assert (run / "checkpoint").is_dir() and not (run / "metrics.json").exists()
    resumed = torchrun("-m", "promptvit", *args, "--name", "killed")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from epoch" in resumed.stdout
    assert_same_tensors(tuned(run), tuned(root / "runs" / "single"))
