"""Hostile and careless input (docs/bad-inputs.md, cases 46 on): one function per row, the row's test id.

Each case builds the input in tmp_path and checks what the user gets: the error type and that its message
names the file, line or option; for inputs that are handled, that the result is right (pinned against an
independent computation where there is one). Cases that need a trained run share one tiny run per module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import promptvit
from promptvit.artifact import CONFIG_FILE, WEIGHTS_FILE, ArtifactError, read_artifact_config
from promptvit.cli import app
from promptvit.data import (
    DataError,
    ImageDataset,
    LabeledSamples,
    Sample,
    build_transforms,
    read_csv,
    read_image_folder,
)
from promptvit.data.errors import DataWarning
from promptvit.data.fewshot import FewShotSplit, warn_untrained_classes
from promptvit.data.manifest import SPLIT_FILES, recorded_samples
from promptvit.io import OutputError, atomic_write_text, check_output_path, load_yaml_strict
from promptvit.methods.base import ConfigError
from promptvit.protocols.spec import ProtocolError
from promptvit.protocols.sweep import load_sweep_config
from tests.conftest import TINY_BACKBONES, build_tiny

runner = CliRunner()
TINY = TINY_BACKBONES["vit_token"][1]
EVAL = {
    "input_size": (3, 8, 8),
    "mean": (0.5,) * 3,
    "std": (0.5,) * 3,
    "interpolation": "bilinear",
    "crop_pct": 1.0,
}


def png(path: Path, value: int = 100, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 255 - value)).save(path)
    return path


def image_folder(root: Path, classes: int = 2, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            pixels = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
            pixels[8 * c : 8 * (c + 1)] += 150
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return root


def config_file(tmp: Path, data: Path, **extra) -> Path:
    config = {
        "backbone": {"name": "vit_tiny_patch16_224", "options": TINY},
        "method": {"name": "linear"},
        "data": {"kind": "folder", "path": str(data), "shots": 2, "test_fraction": 0.34, "val_per_class": 1},
        "train": {"epochs": 1, "batch_size": 4, "progress": False},
        "output_dir": str(tmp / "runs"),
        **extra,
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert not (result.exception and not isinstance(result.exception, SystemExit)), result.output
    return result


def clear_error(result, *names: str) -> None:
    """Exit code 2, one error line naming each of ``names``, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output
    flat = " ".join(result.output.split())
    for name in names:
        assert name in flat, (name, result.output)


def raises(exc: type[BaseException], match: str, call: Callable[[], object]) -> None:
    with pytest.raises(exc, match=match):
        call()


def one_warning(match: str, call: Callable[[], object]) -> object:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    assert any(issubclass(w.category, DataWarning) and match in str(w.message) for w in caught), [
        str(w.message) for w in caught
    ]
    return result


def python_artifact(tmp: Path, **extra) -> Path:
    return promptvit.wrap(build_tiny("vit_token"), "linear", num_classes=2).save_pretrained(
        tmp / "art", **extra
    )


def rewrite_weights(directory: Path, change: Callable[[dict], dict]) -> None:
    """Replace the weights (and the recorded hash, as a hand-made artifact would have none)."""
    state = change(load_file(str(directory / WEIGHTS_FILE)))
    save_file(state, str(directory / WEIGHTS_FILE))
    config = json.loads((directory / CONFIG_FILE).read_text())
    config.pop("weights_sha256")
    (directory / CONFIG_FILE).write_text(json.dumps(config))


def load_one(path: Path) -> torch.Tensor:
    samples = LabeledSamples([Sample(str(path), 0)], ["x"], False, "test")
    return ImageDataset(samples, build_transforms(EVAL, train=False))[0][0]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny trained run (CLI), shared by the cases that evaluate or predict; copied before changes."""
    tmp = tmp_path_factory.mktemp("run")
    data = image_folder(tmp / "data")
    result = cli("train", "--config", config_file(tmp, data), "--name", "r")
    assert result.exit_code == 0, result.output
    return tmp / "runs" / "r"


def own_run(tmp: Path, run: Path) -> Path:
    """A private copy of the shared run and its data (the recorded paths are rewritten to the copy)."""
    shutil.copytree(run.parent.parent / "data", tmp / "data")
    shutil.copytree(run, tmp / "run")
    record = (tmp / "run" / SPLIT_FILES).read_text()
    (tmp / "run" / SPLIT_FILES).write_text(record.replace(str(run.parent.parent / "data"), str(tmp / "data")))
    return tmp / "run"


# -- output paths ------------------------------------------------------------------------------------------


def null_device(tmp: Path) -> Path:
    """A private copy of /dev/null (never the real one: a regression must not break the machine)."""
    try:
        os.mknod(tmp / "mynull", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    return tmp / "mynull"


def out_device_node(tmp: Path, run: Path) -> None:
    device = null_device(tmp)
    result = cli("predict", run, png(tmp / "x.png"), "--out", device)
    clear_error(result, "mynull", "not a regular file")
    assert stat.S_ISCHR(os.stat(device).st_mode) and os.stat(device).st_rdev == os.makedev(1, 3)


def out_fifo(tmp: Path, run: Path) -> None:
    os.mkfifo(tmp / "pipe")
    clear_error(cli("predict", run, png(tmp / "x.png"), "--out", tmp / "pipe"), "pipe", "FIFO")
    assert stat.S_ISFIFO(os.stat(tmp / "pipe").st_mode)


def out_directory(tmp: Path, run: Path) -> None:
    (tmp / "results").mkdir()
    (tmp / "results" / "keep.txt").write_text("mine")
    clear_error(cli("predict", run, png(tmp / "x.png"), "--out", tmp / "results"), "results", "a folder")
    assert (tmp / "results" / "keep.txt").read_text() == "mine"


def out_symlink(tmp: Path, run: Path) -> None:
    (tmp / "real.csv").write_text("precious")
    (tmp / "link.csv").symlink_to(tmp / "real.csv")
    clear_error(
        cli("predict", run, png(tmp / "x.png"), "--out", tmp / "link.csv"), "link.csv", "symbolic link"
    )
    assert (tmp / "link.csv").is_symlink() and (tmp / "real.csv").read_text() == "precious"


def out_inside_artifact(tmp: Path, run: Path) -> None:
    run = own_run(tmp, run)
    config = run / "artifact" / CONFIG_FILE
    before = config.read_bytes()
    clear_error(cli("predict", run, png(tmp / "x.png"), "--out", config), "adapter_config.json", "reads")
    assert config.read_bytes() == before


def out_inside_run_folder(tmp: Path, run: Path) -> None:
    run = own_run(tmp, run)
    before = (run / "metrics.json").read_bytes()
    clear_error(cli("eval", run, "--out", run / "metrics.json"), "metrics.json", "reads")
    assert (run / "metrics.json").read_bytes() == before


def out_analysis_into_artifact(tmp: Path, run: Path) -> None:
    run = own_run(tmp, run)
    before = sorted(p.name for p in (run / "artifact").iterdir())
    clear_error(cli("analyze", run, "--out", run / "artifact"), "artifact", "reads")
    assert sorted(p.name for p in (run / "artifact").iterdir()) == before


def out_into_input_images(tmp: Path, run: Path) -> None:
    image = png(tmp / "imgs" / "x.png")
    before = image.read_bytes()
    clear_error(cli("predict", run, tmp / "imgs", "--out", image), "x.png")
    assert image.read_bytes() == before


def out_new_file_in_new_folder(tmp: Path, run: Path) -> None:
    result = cli("predict", run, png(tmp / "x.png"), "--out", tmp / "new" / "deeper" / "p.csv")
    assert result.exit_code == 0, result.output
    assert (tmp / "new" / "deeper" / "p.csv").read_text().startswith("file,c0,c1,prediction")


def out_python_api_symlink(tmp: Path) -> None:
    (tmp / "real.json").write_text("{}")
    (tmp / "link.json").symlink_to(tmp / "real.json")
    raises(OutputError, "symbolic link", lambda: atomic_write_text(tmp / "link.json", "x"))
    raises(OutputError, "not a regular file", lambda: check_output_path(null_device(tmp)))
    assert (tmp / "real.json").read_text() == "{}"


def run_name_escapes_out(tmp: Path) -> None:
    data = image_folder(tmp / "data")
    for name in ("../../escaped", "/tmp/abs", "a\\b", ".."):
        result = cli("train", "--config", config_file(tmp, data), "--name", name)
        clear_error(result, "name")
    assert not (tmp.parent / "escaped").exists() and not (tmp / "escaped").exists()


# -- artifacts ---------------------------------------------------------------------------------------------


def python_artifact_predict(tmp: Path) -> None:
    directory = python_artifact(tmp)
    result = cli("predict", directory, png(tmp / "x.png", size=(16, 16)), "--out", tmp / "p.csv")
    assert result.exit_code == 0, result.output
    header = (tmp / "p.csv").read_text().splitlines()[0]
    assert header == "file,class_0,class_1,prediction"


def python_artifact_eval_and_analyze(tmp: Path) -> None:
    data = image_folder(tmp / "data")
    directory = python_artifact(tmp, class_names=["c0", "c1"])
    result = cli("eval", directory, "--data", data, "--out", tmp / "m.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp / "m.json").read_text())["num_samples"] == 12
    result = cli("analyze", directory, "--data", data, "--out", tmp / "analysis", "--max-samples", "8")
    assert result.exit_code == 0, result.output


def python_artifact_without_class_names(tmp: Path) -> None:
    data = image_folder(tmp / "data")
    clear_error(cli("eval", python_artifact(tmp), "--data", data), "class_names", "class_0")


def artifact_formats_agree(tmp: Path, run: Path) -> None:
    """One format: a CLI-trained artifact and a Python-saved one have the same config keys."""
    cli_keys = set(read_artifact_config(run))
    python_keys = set(read_artifact_config(python_artifact(tmp)))
    assert python_keys >= {"class_names", "multilabel", "data_config", "weights_sha256"}
    # a run adds how it chose its epoch, its environment and what it fitted on validation
    assert python_keys == cli_keys - {"selection", "environment", "calibration", "thresholds"}


def load_run_folder(tmp: Path, run: Path) -> None:
    model = promptvit.load(run)
    assert model.num_classes == 2


def load_neither_folder(tmp: Path) -> None:
    raises(ArtifactError, "neither an artifact folder nor a run folder", lambda: promptvit.load(tmp))


def interrupted_pair_save(tmp: Path) -> None:
    old = python_artifact(tmp)
    model = promptvit.wrap(build_tiny("vit_token"), "linear", num_classes=2)
    with torch.no_grad():
        model.get_classifier().weight.add_(1)
    new = model.save_pretrained(tmp / "new")
    shutil.copy(new / WEIGHTS_FILE, old / WEIGHTS_FILE)  # what a kill between the two writes leaves
    raises(ArtifactError, "different saves", lambda: promptvit.load(old))


def kill_between_pair_writes(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = python_artifact(tmp)
    model = promptvit.wrap(build_tiny("vit_token"), "linear", num_classes=2)
    with torch.no_grad():
        model.get_classifier().bias.add_(1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("promptvit.artifact_format.atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(directory)
    monkeypatch.undo()
    raises(ArtifactError, "SHA-256 differs", lambda: promptvit.load(directory))


def _artifact_with(tmp: Path, change: Callable[[torch.Tensor], torch.Tensor]) -> Path:
    directory = python_artifact(tmp)
    rewrite_weights(directory, lambda state: {k: change(v) for k, v in state.items()})
    return directory


def artifact_nan_tensors(tmp: Path) -> None:
    directory = _artifact_with(tmp, lambda t: torch.full_like(t, float("nan")))
    raises(ArtifactError, "NaN or infinite", lambda: promptvit.load(directory))


def artifact_inf_tensors(tmp: Path) -> None:
    directory = _artifact_with(
        tmp, lambda t: t.masked_fill(torch.ones_like(t, dtype=torch.bool), float("inf"))
    )
    raises(ArtifactError, "NaN or infinite", lambda: promptvit.load(directory))


def artifact_int_tensors(tmp: Path) -> None:
    directory = _artifact_with(tmp, lambda t: t.to(torch.int32))
    raises(ArtifactError, "dtype torch.int32", lambda: promptvit.load(directory))


def artifact_bool_tensors(tmp: Path) -> None:
    directory = _artifact_with(tmp, lambda t: t > 0)
    raises(ArtifactError, "dtype torch.bool", lambda: promptvit.load(directory))


def artifact_half_tensors(tmp: Path) -> None:
    directory = python_artifact(tmp)
    saved = load_file(str(directory / WEIGHTS_FILE))
    rewrite_weights(directory, lambda state: {k: v.half() for k, v in state.items()})
    loaded = promptvit.load(directory).tuned_state_dict()
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor.half().float())


def artifact_extra_tensor(tmp: Path) -> None:
    directory = python_artifact(tmp)
    rewrite_weights(directory, lambda state: {**state, "smuggled": torch.zeros(3)})
    raises(ArtifactError, "unexpected \\['smuggled'\\]", lambda: promptvit.load(directory))


def _edit_config(tmp: Path, **changes) -> Path:
    directory = python_artifact(tmp)
    config = json.loads((directory / CONFIG_FILE).read_text())
    config.update(changes)
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    return directory


def artifact_num_classes_not_a_count(tmp: Path) -> None:
    for value in ("2", -1, 10**9, True):
        directory = _edit_config(tmp / str(value), num_classes=value)
        raises(ArtifactError, "is not a class count", lambda d=directory: promptvit.load(d))


def artifact_class_names_wrong(tmp: Path) -> None:
    for names in (["a"], ["a", "a"], "ab"):
        directory = _edit_config(tmp / str(len(names)) / str(names), class_names=names)
        raises(ArtifactError, "class_names must list 2 distinct names", lambda d=directory: promptvit.load(d))


def artifact_config_is_a_list(tmp: Path) -> None:
    directory = python_artifact(tmp)
    (directory / CONFIG_FILE).write_text("[1, 2]")
    raises(ArtifactError, "not written by promptvit", lambda: promptvit.load(directory))


def artifact_config_not_utf8(tmp: Path) -> None:
    directory = python_artifact(tmp)
    (directory / CONFIG_FILE).write_bytes(b"\xff\xfe{\x00")
    raises(ArtifactError, "not valid JSON", lambda: promptvit.load(directory))


def artifact_future_format(tmp: Path) -> None:
    directory = _edit_config(tmp, format_version=99)
    raises(ArtifactError, "upgrade promptvit", lambda: promptvit.load(directory))


def artifact_unknown_method(tmp: Path) -> None:
    directory = _edit_config(tmp, method="prefix_magic")
    raises(ArtifactError, r"adapter_config.json is damaged .*unknown method 'prefix_magic'", lambda: promptvit.load(directory))


def artifact_weights_missing(tmp: Path) -> None:
    directory = python_artifact(tmp)
    (directory / WEIGHTS_FILE).unlink()
    raises(ArtifactError, "incomplete", lambda: promptvit.load(directory))


def artifact_path_is_a_file(tmp: Path) -> None:
    directory = python_artifact(tmp)
    raises(ArtifactError, "not found", lambda: promptvit.load(directory / WEIGHTS_FILE))


def cli_artifact_is_missing(tmp: Path) -> None:
    clear_error(cli("predict", tmp / "nothing", png(tmp / "x.png")), "nothing")


# -- run folders: eval scores the recorded files ------------------------------------------------------------


def eval_run_after_data_grew(tmp: Path, run: Path) -> None:
    run = own_run(tmp, run)
    recorded = json.loads((run / SPLIT_FILES).read_text())["test"]["files"]
    for i in range(10):  # new images, some of them the training images' copies
        shutil.copy(tmp / "data" / "c0" / "0.png", tmp / "data" / "c0" / f"new{i}.png")
    result = cli("eval", run, "--out", tmp / "m.json")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp / "m.json").read_text())
    assert (
        metrics["num_samples"] == len(recorded) == json.loads((run / "metrics.json").read_text())["num_test"]
    )


def eval_run_image_changed(tmp: Path, run: Path) -> None:
    run = own_run(tmp, run)
    changed = Path(json.loads((run / SPLIT_FILES).read_text())["test"]["files"][0]["path"])
    png(changed, value=3, size=(16, 16))
    clear_error(cli("eval", run), "1 changed", changed.name, "--data")


def eval_run_image_vanished(tmp: Path, run: Path) -> None:
    run = own_run(tmp, run)
    gone = Path(json.loads((run / SPLIT_FILES).read_text())["test"]["files"][-1]["path"])
    gone.unlink()
    clear_error(cli("eval", run), "1 vanished", gone.name)


def eval_run_record_damaged(tmp: Path, run: Path) -> None:
    run = own_run(tmp, run)
    (run / SPLIT_FILES).write_text("{ not json")
    clear_error(cli("eval", run), SPLIT_FILES, "damaged")


def eval_run_without_artifact(tmp: Path, run: Path) -> None:
    run = own_run(tmp, run)
    shutil.rmtree(run / "artifact")
    clear_error(cli("eval", run), "neither an artifact folder nor a run folder")


def split_record_hashes(tmp: Path, run: Path) -> None:
    """The recorded hashes are the files' SHA-256 (independent hashlib computation)."""
    for entry in json.loads((run / SPLIT_FILES).read_text())["test"]["files"]:
        assert entry["sha256"] == hashlib.sha256(Path(entry["path"]).read_bytes()).hexdigest()
    samples = recorded_samples(run / SPLIT_FILES, "test")
    assert samples.class_names == ["c0", "c1"] and len(samples) > 0


# -- YAML --------------------------------------------------------------------------------------------------


def yaml_duplicate_top_level_key(tmp: Path) -> None:
    data = image_folder(tmp / "data")
    path = config_file(tmp, data)
    path.write_text(path.read_text() + "train:\n  epochs: 3\n")
    clear_error(cli("train", "--config", path), "cfg.yaml", "'train' is given twice")


def yaml_duplicate_nested_key(tmp: Path) -> None:
    raises(
        Exception,
        "'prompt_length' is given twice",
        lambda: load_yaml_strict("method:\n  options:\n    prompt_length: 5\n    prompt_length: 50\n"),
    )


def yaml_alias_bomb(tmp: Path) -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefgh"):
        previous = "abcdefgh"[i]
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 10)}]")
    path = tmp / "bomb.yaml"
    path.write_text(
        "method:\n  name: vpt\n  options:\n    bomb:\n" + "\n".join("      " + ln for ln in lines) + "\n"
    )
    clear_error(cli("train", "--config", path), "bomb.yaml", "aliases")


def yaml_aliases_allowed(tmp: Path) -> None:
    assert load_yaml_strict("a: &x [1, 2]\nb: *x\n") == {"a": [1, 2], "b": [1, 2]}
    merged = load_yaml_strict("base: &b {x: 1, z: 0}\nother:\n  <<: *b\n  x: 2\n")
    assert merged["other"] == {"x": 2, "z": 0}


def sweep_duplicate_key(tmp: Path) -> None:
    (tmp / "s.yaml").write_text("protocol: {kind: fewshot}\nmethods: [linear]\nmethods: [vpt]\n")
    raises(ProtocolError, "'methods' is given twice", lambda: load_sweep_config(tmp / "s.yaml"))


def yaml_not_utf8(tmp: Path) -> None:
    (tmp / "latin.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    clear_error(cli("train", "--config", tmp / "latin.yaml"), "latin.yaml", "UTF-8")


def yaml_with_bom(tmp: Path) -> None:
    (tmp / "bom.yaml").write_bytes("\ufefftrain: {epochs: 2}\n".encode())
    from promptvit.cli.overrides import read_yaml

    assert read_yaml(tmp / "bom.yaml") == {"train": {"epochs": 2}}


def yaml_empty_config(tmp: Path) -> None:
    (tmp / "empty.yaml").write_text("")
    clear_error(cli("train", "--config", tmp / "empty.yaml"), "data.path is required")


def method_switch_drops_options(tmp: Path) -> None:
    data = image_folder(tmp / "data")
    path = config_file(tmp, data, method={"name": "vpt", "options": {"prompt_length": 3}})
    result = cli("train", "--config", path, "--method", "linear", "--name", "lin")
    assert result.exit_code == 0, result.output
    assert "prompt_length are not carried over" in " ".join(result.output.split())
    saved = yaml.safe_load((tmp / "runs" / "lin" / "config.yaml").read_text())
    assert saved["method"] == {"name": "linear", "options": {}}


def method_same_keeps_options(tmp: Path) -> None:
    from promptvit.cli.overrides import switch_method

    config = {"method": {"name": "vpt", "options": {"prompt_length": 3}}}
    assert switch_method(config, "vpt") == [] and config["method"]["options"] == {"prompt_length": 3}
    assert switch_method(config, "lora") == ["prompt_length"] and config["method"] == {"name": "lora"}


def readme_command_switches_method(tmp: Path) -> None:
    """The README's `-c configs/ham10000_efficientnet.yaml --method linear` validates (ap options dropped)."""
    from promptvit.cli.app import _run_config

    config = _run_config(Path("configs/ham10000_efficientnet.yaml"), {"method.name": "linear"}, [])
    assert config.method.name == "linear" and config.method.options == {}


# -- CSV labels --------------------------------------------------------------------------------------------


def labels_csv(tmp: Path, labels: list[str], header: str = "file,label") -> Path:
    lines = [header] + [f"{i}.png,{label}" for i, label in enumerate(labels)]
    (tmp / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp / "labels.csv"


def csv_numeric_near_duplicates(tmp: Path) -> None:
    path = labels_csv(tmp, ["1", "1.0", "0", "0", "01", "1"])
    samples = one_warning("['01', '1', '1.0'] -> '1'", lambda: read_csv(path, check_files=False))
    assert samples.class_names == ["0", "1"] and [s.label for s in samples.items] == [1, 1, 0, 0, 1, 1]


def csv_names_with_numeric_spellings(tmp: Path) -> None:
    path = labels_csv(tmp, ["cat", "cat", "1", "1.0", "dog", "dog"])
    samples = one_warning("-> '1'", lambda: read_csv(path, check_files=False))
    assert samples.class_names == ["1", "cat", "dog"]


def csv_nan_label(tmp: Path) -> None:
    raises(
        DataError,
        "line 3: the label is missing \\('NaN'\\)",
        lambda: read_csv(labels_csv(tmp, ["cat", "NaN", "dog"]), check_files=False),
    )


def csv_empty_label(tmp: Path) -> None:
    raises(
        DataError,
        "line 2: the label is missing",
        lambda: read_csv(labels_csv(tmp, [" ", "dog"]), check_files=False),
    )


def csv_na_like_labels(tmp: Path) -> None:
    for text in ("NA", "n/a", "null", "None", "?"):
        raises(
            DataError, "missing", lambda t=text: read_csv(labels_csv(tmp, ["0", t, "1"]), check_files=False)
        )


def csv_integer_typo(tmp: Path) -> None:
    path = labels_csv(tmp, ["0", "1", "2", "3", "4", "1000", "2"])
    raises(
        DataError,
        "line 7: label 1000 makes 1,001 classes, but 995 of the indices",
        lambda: read_csv(path, check_files=False),
    )


def csv_label_1e8(tmp: Path) -> None:
    raises(
        DataError,
        "label 100000000 makes 100,000,001 classes",
        lambda: read_csv(labels_csv(tmp, ["0", "1e8", "1"]), check_files=False),
    )


def csv_one_based_labels(tmp: Path) -> None:
    raises(
        DataError,
        r"indices 0..3 are never used \(\[0\]\)",
        lambda: read_csv(labels_csv(tmp, ["1", "2", "3", "1"]), check_files=False),
    )


def csv_too_many_names(tmp: Path) -> None:
    path = labels_csv(tmp, [f"id{i}" for i in range(10_001)])
    raises(DataError, "10,001 distinct labels", lambda: read_csv(path, check_files=False))


def csv_singleton_class(tmp: Path) -> None:
    path = labels_csv(tmp, ["cat", "cat", "dgo", "dog", "dog"])
    one_warning("1 class(es) have a single image (['dgo'])", lambda: read_csv(path, check_files=False))


def csv_whitespace_labels(tmp: Path) -> None:
    samples = read_csv(labels_csv(tmp, [" cat", "cat ", "dog", " dog "]), check_files=False)
    assert samples.class_names == ["cat", "dog"] and [s.label for s in samples.items] == [0, 0, 1, 1]


def csv_latin1(tmp: Path) -> None:
    (tmp / "labels.csv").write_bytes("file,label\nb\xe4r.png,katze\n".encode("latin-1"))
    raises(DataError, "labels.csv is not UTF-8", lambda: read_csv(tmp / "labels.csv", check_files=False))


def csv_utf8_bom(tmp: Path) -> None:
    (tmp / "labels.csv").write_bytes("\ufefffile,label\na.png,x\nb.png,x\n".encode())
    assert len(read_csv(tmp / "labels.csv", check_files=False)) == 2


def csv_semicolons(tmp: Path) -> None:
    (tmp / "labels.csv").write_text("file;label\na.png;x\n")
    raises(
        DataError,
        r"not in the header \['file;label'\]",
        lambda: read_csv(tmp / "labels.csv", check_files=False),
    )


def csv_multilabel_nan(tmp: Path) -> None:
    (tmp / "labels.csv").write_text("file,a,b\nx.png,1,NaN\n")
    raises(
        DataError,
        "line 2: column 'b' is 'NaN'",
        lambda: read_csv(tmp / "labels.csv", label_columns=["a", "b"], check_files=False),
    )


def csv_warning_on_the_console(tmp: Path) -> None:
    data = image_folder(tmp / "data")
    rows = [f"c{c}/{i}.png,{'0.0' if (c, i) == (0, 0) else c}" for c in range(2) for i in range(6)]
    (tmp / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    config = config_file(tmp, data)
    raw = yaml.safe_load(config.read_text())
    raw["data"].update(kind="csv", path=str(tmp / "labels.csv"), image_root=str(data))
    config.write_text(yaml.safe_dump(raw))
    result = cli("train", "--config", config, "--name", "csv")
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "['0', '0.0'] -> '0'" in result.output


def labels_only_in_evaluation(tmp: Path) -> None:
    def part(labels: list[int]) -> LabeledSamples:
        return LabeledSamples(
            [Sample(f"{i}.png", c) for i, c in enumerate(labels)], ["a", "b", "c"], False, "s"
        )

    split = FewShotSplit(train=part([0, 0, 1]), val=part([0, 1]), test=part([0, 1, 2]))
    assert one_warning("classes ['c'] appear only", lambda: warn_untrained_classes(split)) == ["c"]


# -- images ------------------------------------------------------------------------------------------------


def strip_image(tmp: Path) -> None:
    path = png(tmp / "strip.png", size=(1, 300_000))
    raises(DataError, "1x300000 px; sides must be 1..30,000", lambda: load_one(path))


def strip_image_3m(tmp: Path) -> None:
    path = png(tmp / "strip.png", size=(3_000_000, 1))
    raises(DataError, "strip.png", lambda: load_one(path))


def thin_image(tmp: Path) -> None:
    path = png(tmp / "thin.png", size=(2, 400))
    raises(DataError, "more than 100:1", lambda: load_one(path))


def exif_rotated_jpeg(tmp: Path) -> None:
    pixels = np.zeros((8, 16, 3), dtype=np.uint8)
    pixels[:, :8] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp / "photo.jpg", exif=exif, quality=100)
    shown = np.asarray(Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_270))  # as a viewer shows it
    samples = LabeledSamples([Sample(str(tmp / "photo.jpg"), 0)], ["x"], False, "t")
    from promptvit.data import load_image

    loaded = np.asarray(load_image(samples.items[0], samples))
    assert loaded.shape == shown.shape and np.abs(loaded.astype(int) - shown).mean() < 10


def float_image_with_inf(tmp: Path) -> None:
    pixels = np.array([[0.0, 0.5], [1.0, np.inf]], dtype=np.float32)
    Image.fromarray(pixels, mode="F").save(tmp / "hdr.tif")
    from promptvit.data import to_8bit

    out = np.asarray(to_8bit(Image.open(tmp / "hdr.tif")))
    assert out.tolist() == [[0, 128], [255, 0]]


def float_image_with_nan(tmp: Path) -> None:
    pixels = np.array([[np.nan, 2.0], [4.0, -1.0]], dtype=np.float32)
    Image.fromarray(pixels, mode="F").save(tmp / "nan.tif")
    tensor = load_one(tmp / "nan.tif")
    assert torch.isfinite(tensor).all()


def sixteen_bit_all_zero(tmp: Path) -> None:
    Image.fromarray(np.zeros((8, 8), dtype=np.uint16)).save(tmp / "dark.png")
    assert torch.equal(load_one(tmp / "dark.png"), torch.full((3, 8, 8), -1.0))


def wrong_extension(tmp: Path) -> None:
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp / "really_jpeg.png", format="JPEG")
    assert load_one(tmp / "really_jpeg.png").shape == (3, 8, 8)


def animated_gif_first_frame(tmp: Path) -> None:
    frames = [Image.new("RGB", (8, 8), (c, c, c)) for c in (0, 255)]
    frames[0].save(tmp / "anim.gif", save_all=True, append_images=frames[1:])
    assert torch.allclose(load_one(tmp / "anim.gif"), torch.full((3, 8, 8), -1.0))


def symlinked_image_followed(tmp: Path) -> None:
    root = image_folder(tmp / "data", per_class=1)
    (root / "c0" / "link.png").symlink_to(root / "c1" / "0.png")
    samples = read_image_folder(root)
    assert len(samples) == 3 and samples.class_counts() == [2, 1]


def dangling_symlink_image(tmp: Path) -> None:
    root = image_folder(tmp / "data", per_class=1)
    (root / "c0" / "gone.png").symlink_to(tmp / "nowhere.png")
    samples = read_image_folder(root)
    dataset = ImageDataset(samples, build_transforms(EVAL, train=False))
    index = [Path(s.path).name for s in samples.items].index("gone.png")
    raises(DataError, "gone.png.*does not exist", lambda: dataset[index])


def symlinked_class_folder(tmp: Path) -> None:
    image_folder(tmp / "elsewhere", classes=1)
    root = image_folder(tmp / "data", classes=1)
    (root / "linked").symlink_to(tmp / "elsewhere" / "c0")
    assert read_image_folder(root).class_names == ["c0", "linked"]


def hidden_files_ignored(tmp: Path) -> None:
    root = image_folder(tmp / "data", per_class=2)
    (root / "c0" / "._0.png").write_bytes(b"\x00\x05mac resource fork")
    (root / "c0" / ".DS_Store").write_bytes(b"junk")
    assert len(read_image_folder(root)) == 4


def image_folder_is_a_file(tmp: Path) -> None:
    (tmp / "data").write_text("not a folder")
    raises(DataError, "is not a folder", lambda: read_image_folder(tmp / "data"))


def predict_corrupt_image(tmp: Path, run: Path) -> None:
    (tmp / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    clear_error(cli("predict", run, tmp / "bad.png", "--out", tmp / "p.csv"), "bad.png")
    assert not (tmp / "p.csv").exists()


def predict_strip_image(tmp: Path, run: Path) -> None:
    path = png(tmp / "strip.png", size=(300_000, 1))
    clear_error(cli("predict", run, path, "--out", tmp / "p.csv"), "strip.png", "sides")


def predict_empty_folder(tmp: Path, run: Path) -> None:
    (tmp / "empty").mkdir()
    clear_error(cli("predict", run, tmp / "empty"), "no images found")


# -- rich markup, reports, sweeps, training ----------------------------------------------------------------


def markup_in_file_name(tmp: Path, run: Path) -> None:
    result = cli("predict", run, tmp / "scan[/].png")
    clear_error(result, "scan[/].png")


def markup_in_message(tmp: Path) -> None:
    import contextlib
    import io

    from promptvit.cli.output import fail

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(Exception) as info:
        fail(ConfigError("install the extra: pip install 'promptvit[ray]'"))
    assert getattr(info.value, "exit_code", None) == 2
    assert "pip install 'promptvit[ray]'" in printed.getvalue()


def report_without_records(tmp: Path) -> None:
    (tmp / "results").mkdir()
    clear_error(cli("report", tmp / "results", "--out", tmp / "report"), "no run records", "results")
    assert not (tmp / "report").exists()


def sweep_without_methods(tmp: Path) -> None:
    (tmp / "s.yaml").write_text(
        "protocol: {kind: fewshot}\nbase: {backbone: {name: vit_tiny_patch16_224}}\nmethods: []\n"
    )
    clear_error(cli("sweep", tmp / "s.yaml", "--results", tmp / "r"), "methods is empty")
    raises(Exception, "methods is empty", lambda: load_sweep_config(tmp / "s.yaml"))


def random_backbone_warned(tmp: Path, run: Path) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["backbone_init"] == "random"
    data = image_folder(tmp / "data")
    result = cli("train", "--config", config_file(tmp, data), "--name", "w")
    assert result.exit_code == 0 and result.output.count("randomly initialised") == 2


def weights_backbone_not_warned(tmp: Path) -> None:
    data = image_folder(tmp / "data")
    save_file(build_tiny("vit_token").state_dict(), str(tmp / "w.safetensors"))
    result = cli(
        "train", "--config", config_file(tmp, data), "--weights", tmp / "w.safetensors", "--name", "p"
    )
    assert result.exit_code == 0, result.output
    assert "randomly initialised" not in result.output
    assert json.loads((tmp / "runs" / "p" / "metrics.json").read_text())["backbone_init"] == "weights"


def report_says_random_backbone(tmp: Path) -> None:
    from promptvit.protocols import write_report
    from tests.protocols.test_report import rec

    def with_backbone(record: dict, backbone: dict) -> dict:
        return {**record, "spec": {"config": {"backbone": backbone}}}

    records = [
        with_backbone(rec("linear", "chest", 1, 10.0, 0), {"name": "vit", "pretrained": False}),
        with_backbone(rec("linear", "chest", 1, 12.0, 1), {"name": "vit", "weights": "w.safetensors"}),
    ]
    (tmp / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    markdown = write_report(tmp / "r.jsonl", tmp / "out", plots=False).markdown.read_text()
    assert "WARNING: 1 of 2 runs trained on a randomly initialised backbone" in markdown
    (tmp / "r.jsonl").write_text(json.dumps(records[1]) + "\n")
    assert (
        "randomly initialised"
        not in write_report(tmp / "r.jsonl", tmp / "o2", plots=False).markdown.read_text()
    )


# -- concurrency and interrupted writes --------------------------------------------------------------------


def concurrent_writers_same_file(tmp: Path) -> None:
    texts = [f"{i}\n" * 20_000 for i in range(6)]
    threads = [threading.Thread(target=atomic_write_text, args=(tmp / "out.csv", t)) for t in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (tmp / "out.csv").read_text() in texts and [p.name for p in tmp.iterdir()] == ["out.csv"]


def lock_file_planted_as_link(tmp: Path) -> None:
    from promptvit.io import LOCK_FILE, exclusive_folder

    (tmp / "precious.txt").write_text("keep me")
    (tmp / "run").mkdir()
    (tmp / "run" / LOCK_FILE).symlink_to(tmp / "precious.txt")
    with pytest.raises(OutputError, match="run"), exclusive_folder(tmp / "run"):
        pass
    assert (tmp / "precious.txt").read_text() == "keep me"


def stale_temp_files_ignored(tmp: Path) -> None:
    directory = python_artifact(tmp)
    (directory / f".{WEIGHTS_FILE}.abc123.tmp").write_bytes(b"half a file")
    assert promptvit.load(directory).num_classes == 2


# -- third pass (issue 25): the output rule, the results disk, what a run records ----------------------------


def tree(*roots: Path) -> dict[str, object]:
    """Bytes of every file, target of every link under ``roots`` (links not followed)."""
    found: dict[str, object] = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            found[str(path)] = (
                ("link", os.readlink(path))
                if path.is_symlink()
                else path.read_bytes()
                if path.is_file()
                else "dir"
            )
    return found


def export_keeps_what_the_user_added(tmp: Path, run: Path) -> None:
    """export --out DIR over an earlier export to which the user added notes and a results/ folder."""
    out = tmp / "exported"
    assert cli("export", run, "--format", "merged-timm", "--out", out).exit_code == 0
    (out / "notes.txt").write_text("my notes")
    (out / "results").mkdir()
    (out / "results" / "table.csv").write_text("a,b\n")
    mine = tree(out / "results", out / "notes.txt")
    result = cli("export", run, "--format", "onnx", "--out", out)
    assert result.exit_code == 0, result.output
    assert tree(out / "results", out / "notes.txt") == mine
    assert {p.name for p in out.iterdir()} == {
        ".promptvit-output",
        "export.json",
        "model.onnx",
        "notes.txt",
        "results",
    }
    assert json.loads((out / "export.json").read_text())["format"] == "onnx"


def export_out_dot_refused(tmp: Path, run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp / "exported"
    assert cli("export", run, "--format", "merged-timm", "--out", out).exit_code == 0
    (out / "notes.txt").write_text("my notes")
    before = tree(out)
    monkeypatch.chdir(out)
    clear_error(cli("export", run, "--format", "merged-timm", "--out", "."), "current folder")
    assert tree(out) == before


def export_onto_run_with_planted_export_json(tmp: Path, run: Path) -> None:
    run = own_run(tmp, run)
    (run / "export.json").write_text('{"format": "peft", "files": ["config.yaml", "metrics.json"]}')
    before = tree(run)
    clear_error(
        cli("export", run / "artifact", "--format", "merged-timm", "--out", run), "holds a promptvit run"
    )
    (run / ".promptvit-output").unlink()  # a run folder from before folders were marked
    before = tree(run)
    clear_error(cli("export", run / "artifact", "--format", "merged-timm", "--out", run), "did not write")
    assert tree(run) == before


def train_name_is_a_symlink(tmp: Path) -> None:
    data = image_folder(tmp / "data")
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere" / "config.yaml").write_text("mine: true\n")
    (tmp / "elsewhere" / "metrics.json").write_text('{"mine": 1}\n')
    (tmp / "runs").mkdir()
    (tmp / "runs" / "r").symlink_to(tmp / "elsewhere")
    before = tree(tmp / "elsewhere")
    clear_error(cli("train", "--config", config_file(tmp, data), "--name", "r"), "symbolic link", "runs/r")
    assert tree(tmp / "elsewhere") == before and (tmp / "runs" / "r").is_symlink()


def link_planted_inside_a_run_folder(tmp: Path) -> None:
    """A run folder whose artifact/ was replaced by a link: the rerun refuses to write through it."""
    data = image_folder(tmp / "data")
    assert cli("train", "--config", config_file(tmp, data), "--name", "r").exit_code == 0
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere" / "adapter_config.json").write_text("the user's\n")
    shutil.rmtree(tmp / "runs" / "r" / "artifact")
    (tmp / "runs" / "r" / "artifact").symlink_to(tmp / "elsewhere")
    before = tree(tmp / "elsewhere")
    result = cli("train", "--config", config_file(tmp, data), "--name", "r", "--no-resume")
    clear_error(result, "artifact is a symbolic link", "inside a promptvit folder")
    assert tree(tmp / "elsewhere") == before


def sweep_disk_fills(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The results disk fills after the first record: one line, the records written stay intact."""
    data = image_folder(tmp / "data")
    sweep = {
        "protocol": {
            "name": "fewshot",
            "tasks": {"t": {"kind": "folder", "path": str(data)}},
            "shots": [2],
            "seeds": [0, 1],
        },
        "base": {
            "backbone": {"name": "vit_tiny_patch16_224", "options": TINY},
            "train": {"epochs": 1, "batch_size": 4},
        },
        "methods": ["linear"],
    }
    (tmp / "s.yaml").write_text(yaml.safe_dump(sweep))
    records = tmp / "res" / "records"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # what a full disk reports once the first run is recorded
        if records.is_dir() and any(records.glob("[!.]*.json")):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    result = cli("sweep", tmp / "s.yaml", "--results", tmp / "res", "--no-report")
    monkeypatch.undo()
    clear_error(result, "the disk is full")
    assert result.output.count("error:") == 1
    (record,) = records.glob("*.json")
    assert json.loads(record.read_text())["status"] == "ok"
    assert not list(records.glob(".tmp-*")) and not list((tmp / "res" / "failed").glob("*.json"))


def recipe_flag_over_null_recipe_is_recorded(tmp: Path) -> None:
    data = image_folder(tmp / "data")
    config = config_file(tmp, data)
    raw = yaml.safe_load(config.read_text())
    raw["train"]["recipe"] = None
    config.write_text(yaml.safe_dump(raw))
    result = cli("train", "--config", config, "--recipe", "ept-medfmc", "--method", "ept", "--name", "r")
    assert result.exit_code == 0, result.output
    recorded = yaml.safe_load((tmp / "runs" / "r" / "config.yaml").read_text())
    assert recorded["train"]["recipe"] == "ept-medfmc@v1"


def method_counts_refuse_bools_and_oversized_ranks(tmp: Path) -> None:
    raises(
        ConfigError,
        "'prompt_length' of method 'vpt' must be int, got True",
        lambda: promptvit.wrap(build_tiny("vit_token"), "vpt", prompt_length=True),
    )
    raises(
        ConfigError,
        "must be a list of ints",
        lambda: promptvit.wrap(build_tiny("vit_token"), "lora", layers=[True]),
    )
    raises(
        ConfigError,
        "must be a finite number",
        lambda: promptvit.wrap(build_tiny("vit_token"), "lora", alpha=float("inf")),
    )
    raises(
        ConfigError,
        "rank 33 exceeds the width 32",
        lambda: promptvit.wrap(build_tiny("vit_token"), "lora", rank=33),
    )
    raises(
        ConfigError,
        "bottleneck 33 is wider",
        lambda: promptvit.wrap(build_tiny("vit_token"), "adapter", bottleneck=33),
    )
    assert promptvit.wrap(build_tiny("vit_token"), "lora", rank=32).method.config.rank == 32


def output_folder_python_api(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from promptvit.io import OUTPUT_MARKER, output_folder

    (tmp / "mine").mkdir()
    (tmp / "mine" / "a.txt").write_text("x")
    raises(OutputError, "did not write \\(a.txt\\)", lambda: output_folder(tmp / "mine", "report"))
    made = output_folder(tmp / "new" / "report", "report")
    assert json.loads((made / OUTPUT_MARKER).read_text())["kind"] == "report"
    raises(OutputError, "holds a promptvit report", lambda: output_folder(made, "export"))
    assert output_folder(made, "report") == made  # the same kind: reused
    monkeypatch.chdir(made)
    raises(OutputError, "current folder", lambda: output_folder(".", "report"))
    raises(
        OutputError, "inside", lambda: output_folder(tmp / "mine" / "sub", "report", inputs=[tmp / "mine"])
    )
    assert not (tmp / "mine" / "sub").exists()


CASES: list[Callable[..., None]] = [
    out_device_node,
    out_fifo,
    out_directory,
    out_symlink,
    out_inside_artifact,
    out_inside_run_folder,
    out_analysis_into_artifact,
    out_into_input_images,
    out_new_file_in_new_folder,
    out_python_api_symlink,
    run_name_escapes_out,
    python_artifact_predict,
    python_artifact_eval_and_analyze,
    python_artifact_without_class_names,
    artifact_formats_agree,
    load_run_folder,
    load_neither_folder,
    interrupted_pair_save,
    kill_between_pair_writes,
    artifact_nan_tensors,
    artifact_inf_tensors,
    artifact_int_tensors,
    artifact_bool_tensors,
    artifact_half_tensors,
    artifact_extra_tensor,
    artifact_num_classes_not_a_count,
    artifact_class_names_wrong,
    artifact_config_is_a_list,
    artifact_config_not_utf8,
    artifact_future_format,
    artifact_unknown_method,
    artifact_weights_missing,
    artifact_path_is_a_file,
    cli_artifact_is_missing,
    eval_run_after_data_grew,
    eval_run_image_changed,
    eval_run_image_vanished,
    eval_run_record_damaged,
    eval_run_without_artifact,
    split_record_hashes,
    yaml_duplicate_top_level_key,
    yaml_duplicate_nested_key,
    yaml_alias_bomb,
    yaml_aliases_allowed,
    sweep_duplicate_key,
    yaml_not_utf8,
    yaml_with_bom,
    yaml_empty_config,
    method_switch_drops_options,
    method_same_keeps_options,
    readme_command_switches_method,
    csv_numeric_near_duplicates,
    csv_names_with_numeric_spellings,
    csv_nan_label,
    csv_empty_label,
    csv_na_like_labels,
    csv_integer_typo,
    csv_label_1e8,
    csv_one_based_labels,
    csv_too_many_names,
    csv_singleton_class,
    csv_whitespace_labels,
    csv_latin1,
    csv_utf8_bom,
    csv_semicolons,
    csv_multilabel_nan,
    csv_warning_on_the_console,
    labels_only_in_evaluation,
    strip_image,
    strip_image_3m,
    thin_image,
    exif_rotated_jpeg,
    float_image_with_inf,
    float_image_with_nan,
    sixteen_bit_all_zero,
    wrong_extension,
    animated_gif_first_frame,
    symlinked_image_followed,
    dangling_symlink_image,
    symlinked_class_folder,
    hidden_files_ignored,
    image_folder_is_a_file,
    predict_corrupt_image,
    predict_strip_image,
    predict_empty_folder,
    markup_in_file_name,
    markup_in_message,
    report_without_records,
    sweep_without_methods,
    random_backbone_warned,
    weights_backbone_not_warned,
    report_says_random_backbone,
    concurrent_writers_same_file,
    stale_temp_files_ignored,
    lock_file_planted_as_link,
    export_keeps_what_the_user_added,
    export_out_dot_refused,
    export_onto_run_with_planted_export_json,
    train_name_is_a_symlink,
    link_planted_inside_a_run_folder,
    sweep_disk_fills,
    recipe_flag_over_null_recipe_is_recorded,
    method_counts_refuse_bools_and_oversized_ranks,
    output_folder_python_api,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_hostile_input(case: Callable[..., None], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    names = case.__code__.co_varnames[1 : case.__code__.co_argcount]
    case(tmp_path, *(request.getfixturevalue(n) for n in names))
