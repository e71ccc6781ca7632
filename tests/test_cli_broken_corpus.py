"""Every CLI verb on a corpus of broken inputs: each must end in a clear error (or work), never a traceback.

An exception that escapes a verb is a bug by definition (docs/bad-inputs.md): user mistakes print one
``error:`` line naming the input and exit 2. The corpus crosses each verb's inputs with broken files:
missing, empty, garbage bytes, wrong encodings, wrong YAML shapes, folders for files, FIFOs, links, device
nodes, names holding Rich markup. ``EXPECTED`` adds options, outputs and the torchrun environment with the
outcome each must get; ``test_writing_verbs_keep_user_files`` points every writing verb at a folder of the
user's files and checks that every byte survives.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from promptvit.cli import app
from tests.conftest import TINY_BACKBONES
from tests.export.conftest import fake_hub  # noqa: F401 (a fixture: the Hub upload calls, offline)

TINY = TINY_BACKBONES["vit_token"][1]
BROKEN = (
    "missing",
    "empty_file",
    "garbage",
    "text",
    "yaml_list",
    "yaml_duplicate",
    "latin1",
    "empty_dir",
    "junk_dir",
    "fifo",
    "dangling_link",
    "markup[/]name",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The broken inputs plus a working run, image and data folder to combine them with."""
    tmp = tmp_path_factory.mktemp("corpus")
    paths = {name: tmp / name for name in BROKEN}
    paths["empty_file"].write_bytes(b"")
    paths["garbage"].write_bytes(np.random.default_rng(0).bytes(2048))
    paths["text"].write_text("just some notes\n")
    paths["yaml_list"].write_text("- train\n- method\n")
    paths["yaml_duplicate"].write_text("train: {epochs: 1}\ntrain: {epochs: 2}\n")
    paths["latin1"].write_bytes("name: caf\xe9\n".encode("latin-1"))
    paths["empty_dir"].mkdir()
    paths["junk_dir"].mkdir()
    (paths["junk_dir"] / "a").mkdir()
    (paths["junk_dir"] / "a" / "x.png").write_bytes(b"not a png")
    os.mkfifo(paths["fifo"])
    paths["dangling_link"].symlink_to(tmp / "nowhere")
    paths["device"] = tmp / "mynull"  # a private null device, never the real /dev/null
    try:
        os.mknod(paths["device"], 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:  # not root: a FIFO is the nearest special file
        os.mkfifo(paths["device"])
    data = tmp / "data"
    rng = np.random.default_rng(0)
    for c in range(2):
        (data / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                data / f"c{c}" / f"{i}.png"
            )
    config = {
        "backbone": {"name": "vit_tiny_patch16_224", "options": TINY},
        "data": {"kind": "folder", "path": str(data), "shots": 2, "test_fraction": 0.34, "val_per_class": 1},
        "train": {"epochs": 1, "batch_size": 4, "progress": False},
        "output_dir": str(tmp / "runs"),
        "name": "good",
    }
    (tmp / "good.yaml").write_text(yaml.safe_dump(config))
    sweep = {
        "protocol": {
            "name": "fewshot",
            "tasks": {"t": {"kind": "folder", "path": str(data)}},
            "shots": [2],
            "seeds": [0],
        },
        "base": {k: config[k] for k in ("backbone", "train")},
        "methods": ["linear"],
    }
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    result = CliRunner().invoke(app, ["train", "--config", str(tmp / "good.yaml")])
    assert result.exit_code == 0, result.output
    paths.update(run=tmp / "runs" / "good", image=data / "c0" / "0.png", data=data, out=tmp / "out")
    return paths


def invocations() -> list[tuple[str, list[str]]]:
    """(id, argv with {BROKEN}/{run}/{image}/{data}/{out} placeholders)."""
    templates = {
        "train-config": ["train", "--config", "{X}"],
        "train-data": [
            "train",
            "--backbone",
            "vit_tiny_patch16_224",
            "--data",
            "{X}",
            "--epochs",
            "1",
            "--backbone.img-size",
            "16",
            "--backbone.depth",
            "1",
            "--out",
            "{out}",
        ],
        "train-csv": [
            "train",
            "--backbone",
            "vit_tiny_patch16_224",
            "--data",
            "{X}",
            "--data-kind",
            "csv",
            "--backbone.img-size",
            "16",
            "--out",
            "{out}",
        ],
        "train-weights": ["train", "--config", "{good}", "--weights", "{X}", "--name", "w"],
        "eval-run": ["eval", "{X}"],
        "eval-data": ["eval", "{run}", "--data", "{X}"],
        "eval-out": ["eval", "{run}", "--out", "{X}"],
        "predict-artifact": ["predict", "{X}", "{image}", "--out", "{out}/p.csv"],
        "predict-images": ["predict", "{run}", "{X}", "--out", "{out}/p.csv"],
        "predict-out": ["predict", "{run}", "{image}", "--out", "{X}"],
        "analyze-run": ["analyze", "{X}", "--out", "{out}/a"],
        "analyze-data": ["analyze", "{run}", "--data", "{X}", "--out", "{out}/a"],
        "analyze-compare": ["analyze", "{run}", "--compare", "{X}", "--out", "{out}/a", "--max-samples", "4"],
        "sweep": ["sweep", "{X}", "--results", "{out}/r"],
        "report": ["report", "{X}", "--out", "{out}/rep"],
        "export-artifact": ["export", "{X}", "--format", "merged-timm", "--out", "{out}/e"],
        "export-out": ["export", "{run}", "--format", "merged-timm", "--out", "{X}"],
        "push": ["push", "{X}", "--repo", "org/name"],
        "data-check": ["data", "check", "{X}", "--input-size", "0"],
        "data-fewshot": ["data", "fewshot", "{X}", "--out", "{out}/f", "--shots", "1", "--seeds", "0"],
        "data-fewshot-out": ["data", "fewshot", "{data}", "--out", "{X}", "--shots", "1", "--seeds", "0"],
    }
    cases = [
        (f"{verb}:{name}", [a.replace("{X}", "{" + name + "}") for a in argv])
        for verb, argv in templates.items()
        for name in BROKEN
        # writing into a new name or an empty folder works (the module shares these paths: keep them as they are)
        if not (verb in ("export-out", "data-fewshot-out") and name in ("missing", "empty_dir"))
    ]
    cases += [
        ("train:override-without-value", ["train", "--config", "{good}", "--train.lr"]),
        ("train:override-not-dotted", ["train", "--config", "{good}", "--lr", "1"]),
        ("train:override-bad-section", ["train", "--config", "{good}", "--train.epochs.deep", "1"]),
        ("train:negative-shots", ["train", "--config", "{good}", "--shots", "-1"]),
        ("train:unknown-method", ["train", "--config", "{good}", "--method", "nope"]),
        ("train:name-escapes", ["train", "--config", "{good}", "--name", "../../x"]),
        (
            "predict:batch-size-0",
            ["predict", "{run}", "{image}", "--batch-size", "0", "--out", "{out}/p.csv"],
        ),
        ("predict:out-under-a-file", ["predict", "{run}", "{image}", "--out", "{garbage}/p.csv"]),
        ("eval:out-under-a-file", ["eval", "{run}", "--out", "{garbage}/m.json"]),
        ("analyze:out-is-a-file", ["analyze", "{run}", "--out", "{garbage}", "--max-samples", "4"]),
        ("predict:device-node", ["predict", "{run}", "{image}", "--out", "{device}"]),
        ("eval:data-kind-unknown", ["eval", "{run}", "--data", "{data}", "--data-kind", "nope"]),
        ("analyze:max-samples-0", ["analyze", "{run}", "--out", "{out}/a", "--max-samples", "0"]),
        ("sweep:bad-var", ["sweep", "{yaml_list}", "--var", "novalue"]),
        ("sweep:bad-backend", ["sweep", "{yaml_list}", "--backend", "gpu-cluster"]),
        (
            "bench:unknown-method",
            [
                "bench-methods",
                "--methods",
                "nope",
                "--backbone.depth",
                "1",
                "--image-size",
                "16",
                "--backbone.patch-size",
                "8",
                "--out",
                "{out}/b",
            ],
        ),
        ("bench:out-is-a-file", ["bench-methods", "--out", "{garbage}", "--methods", "linear"]),
        ("sweep:results-is-a-file", ["sweep", "{good_sweep}", "--results", "{garbage}"]),
        ("report:out-is-a-file", ["report", "{run}", "--out", "{garbage}"]),
        ("bench:unknown-backbone", ["bench-methods", "--backbone", "not_a_model", "--out", "{out}/b"]),
        ("bench:bad-option", ["bench-methods", "--backbone.nonsense", "1", "--out", "{out}/b"]),
    ]
    return cases


CASES = invocations()


@pytest.mark.parametrize(("case", "argv"), CASES, ids=[c for c, _ in CASES])
def test_no_traceback(case: str, argv: list[str], corpus: dict[str, Path]) -> None:
    values = {name: str(path) for name, path in corpus.items()}
    values["good"] = str(corpus["run"].parent.parent / "good.yaml")
    values["good_sweep"] = str(corpus["run"].parent.parent / "sweep.yaml")
    args = [arg.format(**values) if "{" in arg and "[/]" not in arg else arg for arg in argv]
    args = [a.replace("{markup[/]name}", values["markup[/]name"]) for a in args]
    result = CliRunner().invoke(app, args)
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not escaped, f"{case}: {type(result.exception).__name__}: {result.exception}\n{result.output}"
    assert "Traceback" not in result.output, result.output
    if result.exit_code != 0:  # a refusal is one clear line, not a usage dump or a bare code
        assert "error" in result.output.lower() or "Error" in result.output, result.output


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


TORCHRUN = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "PROMPTVIT_DIST_TIMEOUT": "1"}

#: (id, argv, environment, exit code, texts the output must hold): options, outputs and the torchrun
#: environment of the verbs added since the corpus above (issue 25); docs/bad-inputs.md lists each.
EXPECTED: list[tuple[str, list[str], dict[str, str], int, tuple[str, ...]]] = [
    ("train:seed-2**64", ["train", "-c", "{good}", "--seed", "18446744073709551616"], {}, 2, ("train.seed",)),
    (
        "train:device-absent",
        ["train", "-c", "{good}", "--train.device", "cuda:99"],
        {},
        2,
        ("train.device 'cuda:99'",),
    ),
    (
        "train:crop-range-reversed",
        ["train", "-c", "{good}", "--data.train_scale", "[1,0]"],
        {},
        2,
        ("data.train_scale",),
    ),
    ("train:depth-0", ["train", "-c", "{good}", "--backbone.depth", "0"], {}, 2, ("backbone.depth",)),
    (
        "train:patch-larger-than-image",
        ["train", "-c", "{good}", "--backbone.patch-size", "64"],
        {},
        2,
        ("backbone.patch_size 64", "img_size 16"),
    ),
    (
        "train:weight-decay-inf",
        ["train", "-c", "{good}", "--train.weight_decay", ".inf"],
        {},
        2,
        ("train.weight_decay", "finite"),
    ),
    ("train:lr-nan", ["train", "-c", "{good}", "--train.lr", ".nan"], {}, 2, ("train.lr", "finite")),
    (
        "train:lora-rank-above-width",
        ["train", "-c", "{good}", "--method", "lora", "--method.rank", "100000"],
        {},
        2,
        ("rank 100000", "width 32"),
    ),
    (
        "train:bool-for-a-count",
        ["train", "-c", "{good}", "--method", "vpt", "--method.prompt_length", "true"],
        {},
        2,
        ("prompt_length", "must be int"),
    ),
    ("train:WORLD_SIZE=abc", ["train", "-c", "{good}"], {"WORLD_SIZE": "abc"}, 2, ("WORLD_SIZE='abc'",)),
    (
        "train:WORLD_SIZE-without-RANK",
        ["train", "-c", "{good}"],
        {"WORLD_SIZE": "2"},
        2,
        ("RANK is not set",),
    ),
    ("train:RANK=5-of-2", ["train", "-c", "{good}"], {**TORCHRUN, "RANK": "5"}, 2, ("RANK=5", "0..1")),
    (
        "train:LOCAL_RANK=-1",
        ["train", "-c", "{good}"],
        {**TORCHRUN, "RANK": "0", "LOCAL_RANK": "-1"},
        2,
        ("LOCAL_RANK",),
    ),
    (
        "train:no-MASTER_ADDR",
        ["train", "-c", "{good}"],
        {"WORLD_SIZE": "2", "RANK": "0"},
        2,
        ("MASTER_ADDR",),
    ),
    (
        "train:MASTER_PORT=abc",
        ["train", "-c", "{good}"],
        {**TORCHRUN, "RANK": "0", "MASTER_PORT": "abc"},
        2,
        ("MASTER_PORT",),
    ),
    (
        "train:PROMPTVIT_DIST_TIMEOUT=0",
        ["train", "-c", "{good}"],
        {**TORCHRUN, "RANK": "0", "MASTER_PORT": "{port}", "PROMPTVIT_DIST_TIMEOUT": "0"},
        2,
        ("PROMPTVIT_DIST_TIMEOUT",),
    ),
    (
        "train:rank-0-alone",  # WORLD_SIZE=2 RANK=0 and no second process: a bounded wait, then the rank named
        ["train", "-c", "{good}", "--name", "alone0"],
        {**TORCHRUN, "RANK": "0", "MASTER_PORT": "{port}"},
        2,
        ("rank(s) 1 of 2 did not join", "within 1 s", "PROMPTVIT_DIST_TIMEOUT"),
    ),
    (
        "train:rank-1-alone",
        ["train", "-c", "{good}", "--name", "alone1"],
        {**TORCHRUN, "RANK": "1", "MASTER_PORT": "{port}"},
        2,
        ("rank 1 of 2 could not reach rank 0", "within 1 s"),
    ),
    (
        "train:out-with-markup",  # printed as written after the work, exit code 0
        ["train", "-c", "{good}", "--out", "{out}/odd[/]dir", "--name", "m"],
        {},
        0,
        ("odd[/]dir/m/artifact",),
    ),
    (
        "analyze:max-samples-negative",
        ["analyze", "{run}", "--out", "{out}/a", "--max-samples", "-5"],
        {},
        2,
        ("--max-samples",),
    ),
    ("backbones:unknown-method", ["backbones", "--method", "bogus"], {}, 2, ("unknown method 'bogus'",)),
    (
        "sweep:workers-0",
        ["sweep", "{good_sweep}", "--backend", "process", "--workers", "0", "--results", "{out}/w"],
        {},
        2,
        ("--workers",),
    ),
    (
        "export:unknown-format",
        ["export", "{run}", "--format", "tflite", "--out", "{out}/x"],
        {},
        2,
        ("tflite",),
    ),
    (
        "export:out-under-a-file",
        ["export", "{run}", "--format", "merged-timm", "--out", "{garbage}/x"],
        {},
        2,
        ("is a file, not a folder",),
    ),
    (
        "export:out-under-proc",
        ["export", "{run}", "--format", "merged-timm", "--out", "/proc/promptvit-corpus/x"],
        {},
        2,
        ("cannot write /proc/promptvit-corpus/x",),
    ),
    (
        "export:onto-the-run",
        ["export", "{run}", "--format", "merged-timm", "--out", "{run}"],
        {},
        2,
        ("which this command reads",),
    ),
    ("push:not-an-artifact", ["push", "{data}", "--repo", "org/name"], {}, 2, ("neither an artifact",)),
    (
        "data-check:input-size-negative",
        ["data", "check", "{data}", "--input-size", "-1"],
        {},
        2,
        ("--input-size",),
    ),
    (
        "data-fewshot:test-fraction-2",
        ["data", "fewshot", "{data}", "--out", "{out}/f2", "--test-fraction", "2"],
        {},
        2,
        ("--test-fraction",),
    ),
    (
        "data-fewshot:out-inside-the-images",
        ["data", "fewshot", "{data}", "--out", "{data}/splits", "--shots", "1", "--seeds", "0"],
        {},
        2,
        ("which this command reads",),
    ),
    ("predict:out-exists", ["predict", "{run}", "{image}", "--out", "{text}"], {}, 2, ("already exists",)),
]


@pytest.mark.parametrize(("case", "argv", "env", "code", "texts"), EXPECTED, ids=[c[0] for c in EXPECTED])
def test_expected_outcome(
    case: str,
    argv: list[str],
    env: dict[str, str],
    code: int,
    texts: tuple[str, ...],
    corpus: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if "/proc/" in " ".join(argv) and not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    values = {name: str(path) for name, path in corpus.items() if "[" not in name}
    values.update(good=str(corpus["run"].parent.parent / "good.yaml"), port=free_port())
    values["good_sweep"] = str(corpus["run"].parent.parent / "sweep.yaml")
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(**values))
    args = [arg.replace("[/]", "\0").format(**values).replace("\0", "[/]") for arg in argv]
    result = CliRunner().invoke(app, args)
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not escaped, f"{case}: {type(result.exception).__name__}: {result.exception}\n{result.output}"
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    flat = " ".join(result.output.split())
    for text in texts:
        assert text in flat, (text, result.output)


# -- the output rule: every writing verb pointed at a folder of the user's files -----------------------------


def user_folder(root: Path) -> Path:
    """A folder of the user's own files, some with the names promptvit's outputs use, and a link out."""
    user = root / "mine"
    (user / "results").mkdir(parents=True)
    (user / "notes.txt").write_text("my notes\n")
    (user / "results" / "table.csv").write_text("a,b\n1,2\n")
    for name in ("export.json", "config.yaml", "metrics.json", "report.md", "analysis.json"):
        (user / name).write_text(f"the user's own {name}\n")
    (user / "model.onnx").write_bytes(bytes(range(256)))
    (root / "outside.txt").write_text("a file the link points at\n")
    (user / "link.txt").symlink_to(root / "outside.txt")
    return user


def snapshot(*roots: Path) -> dict[str, object]:
    """Every file's bytes, every link's target and every folder under ``roots`` (links not followed)."""
    seen: dict[str, object] = {str(root): root.read_bytes() for root in roots if root.is_file()}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder) / name
                if path.is_symlink():
                    seen[str(path)] = ("link", os.readlink(path))
                elif path.is_file():
                    seen[str(path)] = path.read_bytes()
                else:
                    seen[str(path)] = "folder"
    return seen


BENCH = [
    "bench-methods",
    "--methods",
    "linear",
    "--image-size",
    "16",
    "--backbone.patch-size",
    "8",
    "--backbone.depth",
    "1",
]

#: (id, argv, run in the user folder (``--out .``)): each must refuse and leave every byte where it was
WRITERS: list[tuple[str, list[str], bool]] = [
    ("train", ["train", "-c", "{good}", "--out", "{parent}", "--name", "mine"], False),
    ("train-name-is-a-link", ["train", "-c", "{good}", "--out", "{links}", "--name", "to_mine"], False),
    ("sweep", ["sweep", "{good_sweep}", "--results", "{user}"], False),
    ("sweep-dot", ["sweep", "{good_sweep}", "--results", "."], True),
    ("export", ["export", "{run}", "--format", "merged-timm", "--out", "{user}"], False),
    ("export-dot", ["export", "{run}", "--format", "merged-timm", "--out", "."], True),
    ("predict-folder", ["predict", "{run}", "{image}", "--out", "{user}"], False),
    ("predict-file", ["predict", "{run}", "{image}", "--out", "{user}/notes.txt"], False),
    ("predict-link", ["predict", "{run}", "{image}", "--out", "{user}/link.txt"], False),
    ("eval", ["eval", "{run}", "--out", "{user}/metrics.json"], False),
    ("analyze", ["analyze", "{run}", "--out", "{user}", "--max-samples", "4"], False),
    ("analyze-dot", ["analyze", "{run}", "--out", ".", "--max-samples", "4"], True),
    ("report", ["report", "{data}", "--out", "{user}"], False),
    ("report-dot", ["report", "{data}", "--out", "."], True),
    ("data-fewshot", ["data", "fewshot", "{data}", "--out", "{user}", "--shots", "1", "--seeds", "0"], False),
    ("data-fewshot-dot", ["data", "fewshot", "{data}", "--out", ".", "--shots", "1", "--seeds", "0"], True),
    ("bench-methods", [*BENCH, "--out", "{user}"], False),
    ("bench-methods-dot", [*BENCH, "--out", "."], True),
]


@pytest.mark.parametrize(("case", "argv", "inside"), WRITERS, ids=[w[0] for w in WRITERS])
def test_writing_verbs_keep_user_files(
    case: str, argv: list[str], inside: bool, corpus: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    user = user_folder(tmp_path)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "to_mine").symlink_to(user)
    values = {name: str(path) for name, path in corpus.items() if "[" not in name}
    values.update(
        good=str(corpus["run"].parent.parent / "good.yaml"),
        good_sweep=str(corpus["run"].parent.parent / "sweep.yaml"),
        user=str(user),
        parent=str(tmp_path),
        links=str(tmp_path / "links"),
    )
    before = snapshot(tmp_path, corpus["run"], corpus["data"])
    if inside:
        monkeypatch.chdir(user)
    result = CliRunner().invoke(app, [arg.format(**values) for arg in argv])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output, (
        result.output
    )
    assert snapshot(tmp_path, corpus["run"], corpus["data"]) == before


def test_push_stages_outside_the_user_folders(
    corpus: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """push writes only into a staging folder of its own; the run and the folder it runs in are unchanged."""
    calls = request.getfixturevalue("fake_hub")  # the Hub upload calls, recorded; no network
    user = user_folder(tmp_path)
    before = snapshot(user, tmp_path / "outside.txt", corpus["run"])
    monkeypatch.chdir(user)
    result = CliRunner().invoke(app, ["push", str(corpus["run"]), "--repo", "org/name"])
    assert result.exit_code == 0, result.output
    assert [call[0] for call in calls] == ["create_repo", "upload_folder"]
    assert snapshot(user, tmp_path / "outside.txt", corpus["run"]) == before
    uploaded = tmp_path / "remote" / "org" / "name" / "adapter_model.safetensors"
    assert uploaded.read_bytes() == (corpus["run"] / "artifact" / "adapter_model.safetensors").read_bytes()
