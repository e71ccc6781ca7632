"""The bad-input table of docs/bad-inputs.md, one parametrised case per row.

Each case builds the bad input in tmp_path and checks what the user gets: for errors, the exception type and
that the message names the file, line or option; for inputs that are accepted, that they work.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import promptvit
from promptvit.artifact import WEIGHTS_FILE, ArtifactError
from promptvit.backbones import BackboneError, create_backbone
from promptvit.cli import app
from promptvit.data import (
    DataError,
    ImageDataset,
    build_transforms,
    medfmc_split_files,
    read_csv,
    read_image_folder,
    read_medfmc_list,
    sample_k_shot,
)
from promptvit.io import OutputError, atomic_write_text, exclusive_folder
from promptvit.methods.base import ConfigError
from promptvit.protocols.spec import ProtocolError
from promptvit.protocols.sweep import load_sweep_config
from tests.conftest import TINY_BACKBONES, build_tiny

EVAL = {
    "input_size": (3, 8, 8),
    "mean": (0.5,) * 3,
    "std": (0.5,) * 3,
    "interpolation": "bilinear",
    "crop_pct": 1.0,
}


def png(path: Path, mode: str = "RGB", value: int = 100, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(
        mode, (size, size), value if len(mode) == 1 or mode.startswith("I") else (value,) * len(mode)
    ).save(path)
    return path


def folder(tmp: Path, classes: int = 2, per_class: int = 3) -> Path:
    for c in range(classes):
        for i in range(per_class):
            png(tmp / "data" / f"c{c}" / f"{i}.png", value=40 * c + i)
    return tmp / "data"


def load_one(path: Path) -> torch.Tensor:
    samples = read_image_folder(path.parent.parent)
    dataset = ImageDataset(samples, build_transforms(EVAL, train=False))
    index = [s.path for s in samples.items].index(str(path))
    return dataset[index][0]


def csv_file(tmp: Path, text: str, images: tuple[str, ...] = ("a.png", "b.png")) -> Path:
    for name in images:
        png(tmp / name)
    (tmp / "labels.csv").write_text(text, encoding="utf-8")
    return tmp / "labels.csv"


def raises(exc: type[BaseException], match: str, call: Callable[[], object]) -> None:
    with pytest.raises(exc, match=match):
        call()


# -- images -------------------------------------------------------------------------------------------------


def missing_image(tmp: Path) -> None:
    raises(
        DataError,
        "gone.png",
        lambda: read_csv(csv_file(tmp, "file,label\na.png,x\ngone.png,y\n", ("a.png",))),
    )


def corrupt_image(tmp: Path) -> None:
    path = png(tmp / "data" / "c0" / "bad.png")
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    raises(DataError, "bad.png", lambda: load_one(path))


def zero_byte_image(tmp: Path) -> None:
    path = png(tmp / "data" / "c0" / "empty.png")
    path.write_bytes(b"")
    raises(DataError, "empty.png", lambda: load_one(path))


def truncated_image(tmp: Path) -> None:
    path = tmp / "data" / "c0" / "cut.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:400])
    raises(DataError, "cut.png", lambda: load_one(path))


def not_an_image(tmp: Path) -> None:
    path = tmp / "data" / "c0" / "notes.png"
    path.parent.mkdir(parents=True)
    path.write_text("these are notes, not pixels")
    raises(DataError, "notes.png", lambda: load_one(path))


@pytest.mark.parametrize("mode", ["I;16", "CMYK", "P", "RGBA", "L", "1"])
def test_unusual_modes_are_converted_to_rgb(tmp_path: Path, mode: str) -> None:
    tensor = load_one(
        png(
            tmp_path / "data" / "c0" / f"x{mode.replace(';', '')}.png"
            if mode != "CMYK"
            else tmp_path / "data" / "c0" / "x.jpg",
            mode=mode,
        )
    )
    assert tensor.shape == (3, 8, 8) and torch.isfinite(tensor).all()


def skip_corrupt_lists_files(tmp: Path) -> None:
    root = folder(tmp)
    (root / "c0" / "0.png").write_bytes(b"")
    dataset = ImageDataset(read_image_folder(root), build_transforms(EVAL, train=False), skip_corrupt=True)
    assert len(dataset) == 5 and "0.png" in str(dataset.skipped[0])


# -- label files -------------------------------------------------------------------------------------------


def wrong_column_count(tmp: Path) -> None:
    raises(DataError, r"line 3", lambda: read_csv(csv_file(tmp, "file,label\na.png,x\nb.png,y,extra\n")))


def unknown_class_name(tmp: Path) -> None:
    path = csv_file(tmp, "file,label\na.png,cat\nb.png,dgo\n")
    raises(DataError, "dgo", lambda: read_csv(path, class_names=["cat", "dog"]))


def label_out_of_range(tmp: Path) -> None:
    path = csv_file(tmp, "file,label\na.png,0\nb.png,7\n")
    raises(DataError, "7", lambda: read_csv(path, class_names=["neg", "pos"]))


def duplicated_names(tmp: Path) -> None:
    raises(DataError, "a.png", lambda: read_csv(csv_file(tmp, "file,label\na.png,x\na.png,y\n", ("a.png",))))


def missing_label_column(tmp: Path) -> None:
    raises(
        DataError,
        "diagnosis",
        lambda: read_csv(csv_file(tmp, "file,label\na.png,x\n"), label_column="diagnosis"),
    )


def empty_label_file(tmp: Path) -> None:
    raises(DataError, "labels.csv", lambda: read_csv(csv_file(tmp, "")))


def names_with_spaces_and_unicode(tmp: Path) -> None:
    samples = read_csv(csv_file(tmp, "file,label\nbild ä 1.png,x\nß b.png,y\n", ("bild ä 1.png", "ß b.png")))
    assert len(samples) == 2


def multilabel_row_without_positives(tmp: Path) -> None:
    path = csv_file(tmp, "file,a,b\na.png,0,0\nb.png,1,0\n")
    samples = read_csv(path, label_columns=["a", "b"])
    assert samples.num_all_negative == 1


def medfmc_unparsable_line(tmp: Path) -> None:
    (tmp / "images").mkdir()
    (tmp / "list.txt").write_text("img1.png 0,1,0\n")
    raises(DataError, "line 1", lambda: read_medfmc_list(tmp / "list.txt", "chest", tmp / "images"))


def medfmc_missing_split_files(tmp: Path) -> None:
    raises(DataError, "colon_5-shot_train_exp2.txt", lambda: medfmc_split_files(tmp, "colon", 5, 2))


def empty_class_folder(tmp: Path) -> None:
    (tmp / "data" / "empty").mkdir(parents=True)
    raises(DataError, "data", lambda: read_image_folder(tmp / "data"))


def k_larger_than_class(tmp: Path) -> None:
    samples = read_image_folder(folder(tmp, per_class=3))
    raises(DataError, "c0", lambda: sample_k_shot(samples, 5, seed=0))


# -- configs and options --------------------------------------------------------------------------------------


def run_cli(tmp: Path, config: dict, *extra: str):
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(config))
    return CliRunner().invoke(app, ["train", "--config", str(tmp / "cfg.yaml"), *extra])


def base_config(tmp: Path) -> dict:
    return {
        "backbone": {"name": "vit_tiny_patch16_224", "options": TINY_BACKBONES["vit_token"][1]},
        "data": {"kind": "folder", "path": str(folder(tmp, per_class=4)), "shots": 1},
        "train": {"epochs": 1, "progress": False},
        "output_dir": str(tmp / "runs"),
    }


def config_unknown_key(tmp: Path) -> None:
    config = base_config(tmp)
    config["train"]["epocs"] = 3
    result = run_cli(tmp, config)
    assert result.exit_code == 2 and "train.epocs" in result.output and "Traceback" not in result.output


def config_wrong_type(tmp: Path) -> None:
    config = base_config(tmp)
    config["train"]["epochs"] = "ten"
    result = run_cli(tmp, config)
    assert result.exit_code == 2 and "train.epochs" in result.output


def unknown_method(tmp: Path) -> None:
    raises(ConfigError, "available: adapter", lambda: promptvit.wrap(build_tiny("vit_token"), "vtp"))


def unknown_method_option(tmp: Path) -> None:
    raises(
        ConfigError, "prompt_lenght", lambda: promptvit.wrap(build_tiny("vit_token"), "vpt", prompt_lenght=3)
    )


def wrong_option_type(tmp: Path) -> None:
    raises(
        ConfigError,
        "prompt_length",
        lambda: promptvit.wrap(build_tiny("vit_token"), "vpt", prompt_length="5"),
    )


def missing_config_file(tmp: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--config", str(tmp / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml" in result.output


def malformed_config_file(tmp: Path) -> None:
    """Train configs and sweep configs share one reader: a malformed file or a list is one line naming it."""
    broken, listed = tmp / "broken.yaml", tmp / "listed.yaml"
    broken.write_text("train: [1, 2\n", encoding="utf-8")
    listed.write_text("- train\n- method\n", encoding="utf-8")
    for path, message in ((broken, "not valid YAML"), (listed, "must hold a mapping")):
        result = CliRunner().invoke(app, ["train", "--config", str(path)])
        assert result.exit_code == 2 and path.name in result.output and message in result.output
        raises(ProtocolError, f"{path.name}.*{message}", lambda path=path: load_sweep_config(path))


def debug_shows_the_trace(tmp: Path) -> None:
    result = CliRunner().invoke(app, ["--debug", "train", "--config", str(tmp / "nope.yaml")])
    CliRunner().invoke(app, ["methods"])  # --debug is process state: leave it off for the tests that follow
    assert isinstance(result.exception, ConfigError)


def method_on_unsupported_backbone(tmp: Path) -> None:
    raises(ConfigError, "vit", lambda: promptvit.wrap(build_tiny("resnet"), "ept"))


# -- backbones and artifacts -------------------------------------------------------------------------------


def saved_artifact(tmp: Path, kind: str = "vit_token") -> Path:
    return promptvit.wrap(build_tiny(kind), "linear", num_classes=2).save_pretrained(tmp / "artifact")


def artifact_other_backbone(tmp: Path) -> None:
    raises(
        ArtifactError, "depth", lambda: promptvit.load(saved_artifact(tmp), base_model=build_tiny("vit_avg"))
    )


def artifact_other_input_size(tmp: Path) -> None:
    arch, options, _ = TINY_BACKBONES["vit_token"]
    bigger = create_backbone(arch, **{**options, "img_size": 32})
    raises(ArtifactError, "img_size", lambda: promptvit.load(saved_artifact(tmp), base_model=bigger))


def artifact_other_weights(tmp: Path) -> None:
    raises(
        ArtifactError,
        "other backbone weights",
        lambda: promptvit.load(saved_artifact(tmp), build_tiny("vit_token", seed=9)),
    )


def artifact_truncated(tmp: Path) -> None:
    path = saved_artifact(tmp) / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:20])
    raises(
        ArtifactError, WEIGHTS_FILE, lambda: promptvit.load(path.parent, base_model=build_tiny("vit_token"))
    )


def artifact_not_safetensors(tmp: Path) -> None:
    path = saved_artifact(tmp) / WEIGHTS_FILE
    path.write_text("PK zip or anything else")
    raises(
        ArtifactError,
        "not a readable safetensors",
        lambda: promptvit.load(path.parent, build_tiny("vit_token")),
    )


def artifact_pickle_offered(tmp: Path) -> None:
    torch.save({"head.weight": torch.zeros(2, 32)}, tmp / "adapter_model.bin")
    raises(ArtifactError, "pickled weights are not loaded", lambda: promptvit.load(tmp))


class Payload:
    """An arbitrary object inside a pickle: it could run code when unpickled."""


def backbone_pickle_refused_unless_allowed(tmp: Path) -> None:
    arch, options, _ = TINY_BACKBONES["vit_token"]
    state = dict(build_tiny("vit_token").state_dict())
    torch.save({"state_dict": state, "extra": Payload()}, tmp / "weights.pth")
    raises(
        BackboneError, "allow_pickle", lambda: create_backbone(arch, weights=tmp / "weights.pth", **options)
    )
    model = create_backbone(arch, weights=tmp / "weights.pth", allow_pickle=True, **options)
    assert torch.equal(model.pos_embed, state["pos_embed"])


def backbone_weights_for_another_model(tmp: Path) -> None:
    arch, options, _ = TINY_BACKBONES["vit_token"]
    save_file(build_tiny("vit_avg").state_dict(), str(tmp / "w.safetensors"))
    raises(
        BackboneError,
        "w.safetensors",
        lambda: create_backbone(arch, weights=tmp / "w.safetensors", **options),
    )


def class_count_mismatch_on_load(tmp: Path) -> None:
    directory = saved_artifact(tmp)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["num_classes"] = 5
    config["class_names"] = list("abcde")
    (directory / "adapter_config.json").write_text(json.dumps(config))
    raises(
        ArtifactError,
        r"head\.bias. has shape \(2,\), the model expects \(5,\)",
        lambda: promptvit.load(directory, base_model=build_tiny("vit_token")),
    )


def input_of_another_size(tmp: Path) -> None:
    model = promptvit.wrap(build_tiny("vit_token"), "ept", prompt_length=2)
    raises(ValueError, "built for 16x16 inputs but got 32x32", lambda: model(torch.zeros(1, 3, 32, 32)))


# -- training and output -----------------------------------------------------------------------------------


def nan_loss(tmp: Path) -> None:
    from promptvit.train import TrainingError, fit

    images = torch.full((4, 3, 16, 16), float("nan"))
    data = torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 0, 1]))
    model = promptvit.wrap(build_tiny("vit_token"), "linear", num_classes=2, solver="sgd")
    raises(
        TrainingError,
        "epoch 1, optimiser step 1",
        lambda: fit(
            model,
            data,
            None,
            config={"epochs": 1, "progress": False},
            run_dir=tmp / "run",
            multilabel=False,
            class_names=["a", "b"],
        ),
    )


def full_disk_keeps_previous_file(tmp: Path) -> None:
    atomic_write_text(tmp / "metrics.json", "previous")

    def full(path: Path) -> None:
        path.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    from promptvit.io import atomic_write

    raises(OutputError, "disk is full", lambda: atomic_write(tmp / "metrics.json", full))
    assert (tmp / "metrics.json").read_text() == "previous" and len(list(tmp.iterdir())) == 1


def full_disk_during_artifact_save(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = promptvit.wrap(build_tiny("vit_token"), "linear", num_classes=2)
    directory = model.save_pretrained(tmp / "artifact")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with torch.no_grad():
        model.get_classifier().weight.add_(1)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("promptvit.artifact_format.save_file", no_space)
    raises(OutputError, WEIGHTS_FILE, lambda: model.save_pretrained(directory))
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    promptvit.load(directory, base_model=build_tiny("vit_token"))  # still loads


def read_only_output_folder(tmp: Path) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        raises(OutputError, "permission denied", lambda: atomic_write_text(locked / "x.json", "{}"))
    finally:
        locked.chmod(0o700)


def read_only_file_system(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    raises(OutputError, "read-only", lambda: atomic_write_text(tmp / "x.json", "{}"))


def second_writer_same_run_folder(tmp: Path) -> None:
    with (
        exclusive_folder(tmp / "run"),
        pytest.raises(OutputError, match="another process"),
        exclusive_folder(tmp / "run"),
    ):
        pass
    with exclusive_folder(tmp / "run"):  # released after the first writer ends
        pass


CASES: list[Callable[..., None]] = [
    missing_image,
    corrupt_image,
    zero_byte_image,
    truncated_image,
    not_an_image,
    skip_corrupt_lists_files,
    wrong_column_count,
    unknown_class_name,
    label_out_of_range,
    duplicated_names,
    missing_label_column,
    empty_label_file,
    names_with_spaces_and_unicode,
    multilabel_row_without_positives,
    medfmc_unparsable_line,
    medfmc_missing_split_files,
    empty_class_folder,
    k_larger_than_class,
    config_unknown_key,
    config_wrong_type,
    unknown_method,
    unknown_method_option,
    wrong_option_type,
    missing_config_file,
    malformed_config_file,
    debug_shows_the_trace,
    method_on_unsupported_backbone,
    artifact_other_backbone,
    artifact_other_input_size,
    artifact_other_weights,
    artifact_truncated,
    artifact_not_safetensors,
    artifact_pickle_offered,
    backbone_pickle_refused_unless_allowed,
    backbone_weights_for_another_model,
    class_count_mismatch_on_load,
    input_of_another_size,
    nan_loss,
    full_disk_keeps_previous_file,
    full_disk_during_artifact_save,
    read_only_output_folder,
    read_only_file_system,
    second_writer_same_run_folder,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input(case: Callable[..., None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "monkeypatch" in case.__code__.co_varnames[: case.__code__.co_argcount]:
        case(tmp_path, monkeypatch)
    else:
        case(tmp_path)


def test_atomic_writes_get_ordinary_permissions(tmp_path: Path) -> None:
    import os

    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
