"""The command line as a new user meets it: quick to start, one line per epoch, clear about resume,
interruption and random initialisation, readable method list, YAML-ish values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import promptvit
from promptvit.cli import catalog
from tests.cli.test_cli import invoke, write_config, write_image_folder


def test_help_and_the_cli_module_do_not_import_torch() -> None:
    """`promptvit --help` must not wait for torch/timm (seconds); timed in the README, not here."""
    code = (
        "import sys, promptvit.cli, promptvit.cli.catalog, promptvit.cli.export_commands;"
        "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    help_run = subprocess.run(
        [sys.executable, "-m", "promptvit", "--help"], capture_output=True, text=True, check=True
    )
    assert "export" in help_run.stdout and "train" in help_run.stdout


def test_method_list_fits_80_columns_and_never_splits_an_option(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PROMPTVIT_CACHE_DIR", str(tmp_path))
    rows = catalog.method_rows()
    text = catalog.render(rows, 80)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    tokens = [token.removesuffix(",") for token in " ".join(lines).split()]
    for name in promptvit.available_methods():
        config = promptvit.get_method(name).config_class()
        for option, default in config.to_dict().items():
            flag = f"--method.{option.replace('_', '-')}"
            assert flag in tokens, (name, flag)  # whole, on one line
            # The shown default reads back (as YAML, the way the CLI reads values) to the default itself.
            assert yaml.safe_load(tokens[tokens.index(flag) + 1]) == default, (name, option)
            tokens.remove(flag)


def test_method_list_is_cached_and_rebuilt_when_the_code_changes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PROMPTVIT_CACHE_DIR", str(tmp_path))
    first = catalog.method_rows()
    assert len(list(tmp_path.glob("methods-*.json"))) == 1

    def registry_not_needed():
        raise AssertionError("the cached rows should have been used")

    monkeypatch.setattr(catalog, "_rows_from_registry", registry_not_needed)
    assert catalog.method_rows() == first
    monkeypatch.undo()
    monkeypatch.setenv("PROMPTVIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(catalog, "_sources_key", lambda: "changed")
    assert catalog.method_rows() == first
    assert (tmp_path / "methods-changed.json").is_file()


def test_training_talks_per_epoch_on_resume_and_about_random_init(tmp_path: Path, monkeypatch) -> None:
    data = write_image_folder(tmp_path / "data")
    config = write_config(tmp_path, data, epochs=3)
    args = ["train", "--config", str(config), "--method", "bias", "--name", "run"]
    bias = promptvit.get_method("bias")

    def interrupt(self, model, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # Ctrl-C during epoch 2: epoch 1's checkpoint is on disk
        return {}

    monkeypatch.setattr(bias, "on_epoch_end", interrupt)
    monkeypatch.setattr(sys, "argv", ["promptvit", *args, "--no-resume"])
    interrupted = invoke(*args, "--no-resume")
    monkeypatch.undo()
    assert interrupted.exit_code == 130
    out = interrupted.output
    assert "randomly initialised" in out
    assert "epoch 1/3: train_loss" in out and "val accuracy" in out
    run = tmp_path / "runs" / "run"
    assert f"the last checkpoint (saved after every epoch) is in {run / 'checkpoint'}" in out
    assert f"resume with:\n  promptvit {' '.join(args)}\n" in out  # --no-resume dropped

    resumed = invoke(*args)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from epoch 1" in resumed.output
    epoch_lines = [line for line in resumed.output.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == ["epoch 2/3", "epoch 3/3"]
    assert json.loads((run / "metrics.json").read_text())["backbone_init"] == "random"


def test_list_options_take_yaml_values(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", classes=3)
    for c in range(3):
        (data / f"class_{c}").rename(data / str(c))
    config = write_config(tmp_path, data, epochs=1)
    result = invoke("train", "--config", str(config), "--data.classes", "[0,2]", "--name", "two")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "runs" / "two" / "artifact" / "adapter_config.json").read_text())
    assert info["class_names"] == ["0", "2"]


@pytest.mark.parametrize("value", ["[q,v]", "[q, k, v]"])
def test_method_list_values_parse_as_the_cli_reads_them(value: str) -> None:
    from promptvit.cli.overrides import parse_extra_args

    assert parse_extra_args(["--method.targets", value])["method.targets"] == yaml.safe_load(value)


def test_reports_warn_about_runs_on_a_random_init_backbone() -> None:
    from promptvit.protocols import build_tables
    from tests.protocols.test_report import medfmc_records

    records = medfmc_records()
    assert not any("randomly initialised" in note for note in build_tables(records)[0].notes)
    for record in records[:3]:
        record["backbone_init"] = "random"
    notes = build_tables(records)[0].notes
    assert notes[0].startswith("WARNING: 3 of ") and "runs used a randomly initialised backbone" in notes[0]


def _run_into_closed_pipe(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """``promptvit ARGS | true``: the reader closes the pipe before the verb prints its first line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "promptvit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    process.stdout.close()  # long before the interpreter has started and printed anything
    stderr = process.stderr.read().decode()
    return process.wait(timeout=120), stderr


def test_a_reader_that_leaves_early_ends_every_verb_quietly(tmp_path: Path) -> None:
    """`promptvit methods | head` and the like: no traceback, and exit status 141 (128 + SIGPIPE, what the
    shell reports for tools SIGPIPE stops), never 1, which `data check` means as "blocking problems"."""
    import os

    from promptvit.cli.output import CLOSED_OUTPUT_EXIT

    env = {**os.environ, "PROMPTVIT_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(sys.path)}
    full = subprocess.run(  # also fills the method list's cache, so the run below starts at once
        [sys.executable, "-m", "promptvit", "methods"], capture_output=True, text=True, env=env, timeout=120
    )
    assert full.returncode == 0 and len(full.stdout.splitlines()) > 40  # many lines, all printed when read
    data = write_image_folder(tmp_path / "data", classes=2, per_class=3)
    assert invoke("data", "check", str(data), "--json").exit_code == 0  # nothing blocks training
    # rich's console (methods), typer's help and click's echo (data check --json) print the verbs' output
    for args in (["methods"], ["train", "--help"], ["data", "check", str(data), "--json"]):
        status, stderr = _run_into_closed_pipe(args, env)
        assert status == CLOSED_OUTPUT_EXIT == 141, (args, status, stderr)
        assert stderr == "", (args, stderr)  # no traceback, no "Exception ignored"
