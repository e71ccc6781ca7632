"""VTAB-1k list copies and VPT's FGVC JSONs as people have them: detection, names, splits, sweeps end to end."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from promptvit.cli import app
from promptvit.data import VTAB_NAMES, DataError, read_fgvc_json, read_label_list, vtab_task
from promptvit.protocols import (
    VTAB_TASKS,
    FGVCProtocol,
    MedFMCProtocol,
    ProtocolError,
    VTABProtocol,
    load_records,
    materialise,
)

from .helpers import save_image, tiny_base, write_vtab_root
from .layouts import write_fgvc_json, write_medfmc_baseline, write_vtab_lists


def _pairs(samples) -> list[tuple[str, str]]:
    return sorted((Path(s.path).name, samples.class_names[s.label]) for s in samples.items)


def _expected(rows: list[tuple[str, int]]) -> list[tuple[str, str]]:
    return sorted((Path(rel).name, str(label)) for rel, label in rows)


def test_vtab_names_map_both_ways() -> None:
    assert list(VTAB_NAMES) == list(VTAB_TASKS)
    assert len({n.folder for n in VTAB_NAMES.values()}) == 19
    for task, names in VTAB_NAMES.items():
        assert vtab_task(task) == vtab_task(names.folder) == vtab_task(names.registry) == task
    assert VTAB_NAMES["cifar100"].folder == "cifar" and vtab_task("cifar") == "cifar100"
    assert vtab_task('smallnorb(predicted_attribute="label_azimuth")') == "smallnorb_azi"
    assert (
        vtab_task("svhn_cropped") == "svhn"
        and vtab_task("diabetic_retinopathy_detection") == "diabetic_retinopathy"
    )
    with pytest.raises(DataError, match="several VTAB tasks"):
        vtab_task("clevr")
    assert VTABProtocol(root="r", tasks=["cifar", "oxford_iiit_pet", "dsprites_loc"]).tasks == [
        "cifar100",
        "oxford_iiit_pet",
        "dsprites_loc",
    ]
    with pytest.raises(ValueError, match="unknown VTAB task"):
        VTABProtocol(root="r", tasks=["imagenet"])
    assert {n.num_classes for t, n in VTAB_NAMES.items() if t.startswith("dsprites")} == {16}


def test_vtab_list_copy_is_detected_and_read(tmp_path: Path) -> None:
    rows = write_vtab_lists(tmp_path / "vtab-1k" / "cifar", classes=3)
    protocol = VTABProtocol(root=str(tmp_path / "vtab-1k"), tasks=["cifar100"], seeds=[42])
    protocol.check()
    search = protocol.run_specs(tiny_base(), stage="search")[0]
    final = protocol.run_specs(tiny_base())[0]
    assert search.splits.train.kind == "list" and search.splits.train.path.endswith("cifar/train800.txt")
    assert final.splits.train.path.endswith("cifar/train800val200.txt") and final.splits.test.path.endswith(
        "cifar/test.txt"
    )
    s, f = materialise(search), materialise(final)
    assert s.train.class_names == ["0", "1", "2"] == f.test.class_names  # class 2 only outside train800
    assert _pairs(s.train) == _expected(rows["train800"]) and _pairs(s.val) == _expected(rows["val200"])
    assert _pairs(f.train) == _expected(rows["train800val200"]) and _pairs(f.test) == _expected(rows["test"])
    assert Counter(x.label for x in s.train.items) == {0: 4, 1: 4}


def test_list_reader_errors_name_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "a b.jpg").write_bytes(b"x")
    (tmp_path / "l.txt").write_text("a b.jpg 3\n\nimages/x.jpg three\n")
    with pytest.raises(DataError, match=r"l\.txt, line 3: cannot parse 'images/x.jpg three'"):
        read_label_list(tmp_path / "l.txt", check_files=False)
    (tmp_path / "l.txt").write_text("a b.jpg 3\n")
    assert read_label_list(tmp_path / "l.txt").items[0].path == str(tmp_path / "a b.jpg")
    with pytest.raises(DataError, match="label 3 is not among"):
        read_label_list(tmp_path / "l.txt", class_names=["0", "1"])
    (tmp_path / "t.json").write_text('{"a.jpg": null}')
    with pytest.raises(DataError, match=r"entry 1 \('a.jpg'\) has label None; class ids must be numbers or strings"):
        read_fgvc_json(tmp_path / "t.json", check_files=False)
    (tmp_path / "t.json").write_text('{"a.jpg": 2, "b.jpg": "cat"}')
    with pytest.raises(DataError, match="entry 2 has a text class id while others are numbers"):
        read_fgvc_json(tmp_path / "t.json", check_files=False)
    (tmp_path / "t.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="holds a list"):
        read_fgvc_json(tmp_path / "t.json")


@pytest.mark.parametrize(
    ("ids", "names", "classes"),
    [
        # text ids, sorted
        (["Sooty", "Black_footed", "Laysan"], ["Sooty", "Black_footed", "Laysan"], ["Black_footed", "Laysan", "Sooty"]),
        ([10, -1, 3], ["10", "-1", "3"], ["-1", "3", "10"]),  # numbers in numeric order, negatives too
        ([2.0, 0.5, 1], ["2", "0.5", "1"], ["0.5", "1", "2"]),  # 2.0 is the class 2
    ],
)
def test_fgvc_json_takes_any_sortable_class_id(
    tmp_path: Path, ids: list, names: list[str], classes: list[str]
) -> None:
    """VPT's JSONDataset sorts the ids of a split (json_dataset.py:60); any sortable JSON value is an id."""
    base = tmp_path / "CUB_200_2011"
    for split, members in {"train": [0, 1, 2], "val": [0, 1], "test": [1, 2]}.items():  # val lacks a class
        entries = {}
        for i in members:
            rel = f"c{i}/{split}.jpg"
            save_image(base / "images" / rel, i, len(ids), i)
            entries[rel] = ids[i]
        (base / f"{split}.json").write_text(json.dumps(entries))
    protocol = FGVCProtocol(root=str(tmp_path), datasets=["cub"], seeds=[0], check_num_classes=False)
    protocol.check()
    split = materialise(protocol.run_specs(tiny_base(), stage="search")[0])
    assert split.train.class_names == classes == split.val.class_names
    for part in (split.train, split.val):
        assert {Path(s.path).parent.name: classes[s.label] for s in part.items} == {
            f"c{i}": names[i] for i in range(3) if any(Path(s.path).parent.name == f"c{i}" for s in part.items)
        }


def test_vtab_copy_without_search_files(tmp_path: Path) -> None:
    write_vtab_lists(tmp_path / "dtd", only_final=True)
    protocol = VTABProtocol(root=str(tmp_path), tasks=["dtd"], seeds=[42])
    protocol.check()  # the final stage can run
    assert len(protocol.run_specs(tiny_base())) == 1
    with pytest.raises(ProtocolError, match=r"needs train800\.txt and val200\.txt .*fixed hyperparameters"):
        protocol.run_specs(tiny_base(), stage="search")
    (tmp_path / "dtd" / "test.txt").unlink()
    with pytest.raises(ProtocolError, match=r"dtd: test\.txt"):
        protocol.check()


def test_vtab_folder_layout_still_works(tmp_path: Path) -> None:
    write_vtab_root(tmp_path, ["dtd"])
    protocol = VTABProtocol(root=str(tmp_path), tasks=["dtd"])
    protocol.check()
    assert protocol.run_specs(tiny_base())[0].splits.train.kind == "folder"


def test_fgvc_json_layout(tmp_path: Path) -> None:
    cub = write_fgvc_json(tmp_path / "CUB_200_2011", classes=3, first_id=1)
    cars = write_fgvc_json(tmp_path / "Stanford-cars", classes=2, first_id=0)
    protocol = FGVCProtocol(
        root=str(tmp_path), datasets=["CUB_200_2011", "cars"], seeds=[0], check_num_classes=False
    )
    assert protocol.datasets == ["cub", "cars"]
    protocol.check()
    search = {s.task: materialise(s) for s in protocol.run_specs(tiny_base(), stage="search")}
    final_specs = protocol.run_specs(tiny_base())
    final = {s.task: materialise(s) for s in final_specs}
    assert search["cub"].train.class_names == ["1", "2", "3"]  # VPT's 1-based ids, in numeric order
    assert sorted(
        (Path(s.path).name, int(search["cub"].train.class_names[s.label])) for s in search["cub"].train.items
    ) == sorted((Path(rel).name, label) for rel, label in cub["train"])
    assert len(search["cub"].val) == 6 and len(search["cub"].test) == 0
    assert len(final["cub"].train) == 18 and len(final["cub"].val) == 0 and len(final["cub"].test) == 6
    assert all(s.epoch_selection == "last" and "train.json + val.json" in s.split for s in final_specs)
    assert Path(final["cars"].test.items[0].path).parent.name == "car_ims"  # paths relative to the folder
    assert len(final["cars"].train) == len(cars["train"]) + len(cars["val"])
    vpt_code = FGVCProtocol(
        root=str(tmp_path), datasets=["cub"], final_train="train", check_num_classes=False
    )
    spec = vpt_code.run_specs(tiny_base())[0]
    split = materialise(spec)
    assert spec.epoch_selection == "val" and len(split.train) == 12 and len(split.val) == 6
    for folder in ("CUB_200_2011", "Stanford-cars"):  # data check finds VPT's image roots too
        check = CliRunner().invoke(
            app, ["data", "check", str(tmp_path / folder), "--input-size", "16", "--json"]
        )
        assert check.exit_code == 0 and '"kind": "fgvc"' in check.output, check.output
    (tmp_path / "CUB_200_2011" / "val.json").unlink()
    with pytest.raises(ProtocolError, match=r"val\.json not found"):
        protocol.check()


def _sweep(tmp_path: Path, protocol: dict, grid: dict | None = None) -> tuple[int, str, Path]:
    results = tmp_path / "res"
    config = {
        "name": "layouts",
        "protocol": protocol,
        "base": tiny_base(epochs=1),
        "methods": ["linear"],
        "grid": grid or {},
        "results": str(results),
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["sweep", str(path), "--no-report"], terminal_width=200)
    return result.exit_code, result.output, results


def test_sweeps_on_real_layouts_through_the_cli(tmp_path: Path) -> None:
    write_vtab_lists(tmp_path / "vtab" / "cifar")
    write_vtab_lists(tmp_path / "vtab" / "eurosat", only_final=True)
    code, output, results = _sweep(
        tmp_path / "a",
        {"name": "vtab", "root": str(tmp_path / "vtab"), "tasks": ["cifar", "eurosat"], "seeds": [42]},
    )
    assert code == 0, output
    records = load_records(results).records
    assert {(r["task"], r["status"]) for r in records} == {("cifar100", "ok"), ("eurosat", "ok")}
    assert all(r["sizes"] == {"train": 14, "val": 0, "test": 9} for r in records)
    code, output, _ = _sweep(
        tmp_path / "b",
        {"name": "vtab", "root": str(tmp_path / "vtab"), "tasks": ["eurosat"], "seeds": [42]},
        grid={"lr": [0.01, 0.001]},
    )
    assert code == 2 and "val200.txt" in output and "Traceback" not in output

    write_fgvc_json(tmp_path / "fgvc" / "Stanford-dogs", classes=2)
    code, output, results = _sweep(
        tmp_path / "c",
        {
            "name": "fgvc",
            "root": str(tmp_path / "fgvc"),
            "datasets": ["dogs"],
            "seeds": [0],
            "check_num_classes": False,
        },
        grid={"lr": [0.01, 0.001]},
    )
    assert code == 0, output
    records = load_records(results).records
    assert Counter(r["stage"] for r in records) == {"search": 2, "final": 1}
    final = next(r for r in records if r["stage"] == "final")
    assert (
        final["sizes"] == {"train": 12, "val": 0, "test": 4}
        and final["selection"]["hyperparameters_split"] == "val"
    )


def test_medfmc_neojaundice_and_retino_from_the_baseline_lists(tmp_path: Path) -> None:
    data = tmp_path / "medfmc"  # the results go beside the data, never inside it
    rows = write_medfmc_baseline(data)
    protocol = MedFMCProtocol(root=str(data), datasets=["neojaundice", "retino"], shots=[1], exps=[1, 2])
    protocol.check()
    specs = protocol.run_specs(tiny_base())
    assert {(s.task, s.metric) for s in specs} == {("neojaundice", "accuracy"), ("retino", "accuracy")}
    splits = {(s.task, s.split): materialise(s) for s in specs}
    neo = splits["neojaundice", "exp1"]
    babies = Counter((Path(s.path).name[:4], s.label) for s in neo.train.items)
    assert len(babies) == 2 and set(babies.values()) == {3}  # one baby per class, all three photos
    assert {lab for _, lab in babies} == {0, 1}
    assert {s.key for s in neo.val.items} == {
        str(data / "NeoJaundice" / "images" / n) for n, _ in rows["NeoJaundice"]["fewshot-pool.txt"]
    } - {s.key for s in neo.train.items}
    assert len(neo.test) == len(rows["NeoJaundice"]["test.txt"])
    retino = splits["retino", "exp1"]
    assert sorted(s.label for s in retino.train.items) == [0, 1, 2, 3, 4]
    assert {s.key for s in retino.train.items} != {s.key for s in splits["retino", "exp2"].train.items}
    again = materialise(protocol.run_specs(tiny_base())[0])
    assert [s.key for s in again.train.items] == [
        s.key for s in splits[specs[0].task, specs[0].split].train.items
    ]
    code, output, results = _sweep(
        tmp_path / "d",
        {
            "name": "medfmc",
            "root": str(data),
            "datasets": ["neojaundice", "retino"],
            "shots": [1],
            "exps": [1],
        },
    )
    assert code == 0, output
    records = load_records(results).records
    assert {(r["task"], r["status"], r["metric"]) for r in records} == {
        ("neojaundice", "ok", "accuracy"),
        ("retino", "ok", "accuracy"),
    }
    check = CliRunner().invoke(app, ["data", "check", str(data / "NeoJaundice"), "--input-size", "16"])
    assert check.exit_code == 0 and "data (medfmc): trainval 18 (2 classes), test 18" in check.output
    (data / "Retino" / "test.txt").unlink()
    with pytest.raises(ProtocolError, match=r"Retino/ with images/, fewshot-pool.txt"):
        protocol.check()
