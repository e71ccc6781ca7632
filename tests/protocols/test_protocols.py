"""Run-spec generation of the MedFMC, VTAB-1k, FGVC and generic protocols; hashes; presets and grids."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from promptvit.data import read_medfmc_list
from promptvit.protocols import (
    FGVC_DATASETS,
    PRESETS,
    VTAB_GROUPS,
    VTAB_SEEDS,
    VTAB_TASKS,
    FewShotProtocol,
    FGVCProtocol,
    MedFMCProtocol,
    MethodPreset,
    ProtocolError,
    VTABProtocol,
    config_hash,
    grid_points,
    materialise,
    train_hash,
)
from promptvit.protocols.spec import RunSpec, resolved_config
from promptvit.protocols.sweep import resolve_preset
from promptvit.train import EvaluationConfig

from .helpers import tiny_base, write_fgvc_root, write_image_folder, write_medfmc_root, write_vtab_root


@pytest.fixture(scope="module")
def medfmc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_medfmc_root(tmp_path_factory.mktemp("medfmc"))


def test_medfmc_specs_cover_datasets_shots_exps_and_seeds(medfmc_root: Path) -> None:
    protocol = MedFMCProtocol(root=str(medfmc_root), seeds=[0, 1])
    protocol.check()
    specs = protocol.run_specs(tiny_base(), method="linear")
    assert len(specs) == 3 * 3 * 5 * 2
    assert Counter(s.task for s in specs) == {"chest": 30, "colon": 30, "endo": 30}
    assert {s.metric for s in specs if s.task == "chest"} == {"map"}
    assert {s.metric for s in specs if s.task == "endo"} == {"map"}
    assert {s.metric for s in specs if s.task == "colon"} == {"accuracy"}
    assert {(s.shots, s.split) for s in specs if s.task == "colon"} == {
        (k, f"exp{e}") for k in (1, 5, 10) for e in range(1, 6)
    }
    assert all(s.evaluate_on == "test" and s.epoch_selection == "val" and s.stage == "final" for s in specs)
    spec = next(s for s in specs if s.task == "endo" and s.shots == 5 and s.split == "exp3")
    assert spec.config.data.kind == "medfmc" and spec.config.data.exp == 3 and spec.config.data.shots == 5
    assert len({config_hash(s) for s in specs}) == len(specs)
    search = protocol.run_specs(tiny_base(), stage="search")
    assert len(search) == 3 * 3 * 5 and all(s.evaluate_on == "val" and s.seed == 0 for s in search)


def test_medfmc_follows_the_ept_medfmc_recipe_unless_told_otherwise(medfmc_root: Path) -> None:
    protocol = MedFMCProtocol(root=str(medfmc_root), datasets=["colon", "endo"], shots=[1], exps=[1])
    specs = protocol.run_specs(tiny_base(), method="ept")
    assert sorted(s.seed for s in specs if s.task == "endo") == [0, 1, 2, 3]  # EPT: four runs per sampling
    endo = next(s for s in specs if s.task == "endo")
    colon = next(s for s in specs if s.task == "colon")
    assert endo.metric == "map" and endo.config.train.select_metric == "auc"  # reported mAP, selected on AUC
    assert colon.config.train.select_metric == "accuracy"
    assert endo.eval_resize == "direct" and endo.config.backbone.mean == [0.485, 0.456, 0.406]
    train = endo.config.train
    assert train.recipe == "ept-medfmc@v1" and train.weight_decay_rule == "all" and train.head_init == "normal_0.01"
    assert train.lr == 0.01 and train.optimizer == "adamw"  # what the base config sets wins
    assert endo.config.method.options["prompt_length"] == 100
    plain = MedFMCProtocol(root=str(medfmc_root), datasets=["endo"], shots=[1], exps=[1], recipe=None)
    (spec,) = plain.run_specs(tiny_base(), method="ept")
    assert spec.seed == 0 and spec.eval_resize == "model" and spec.config.train.select_metric is None
    assert spec.config.train.recipe is None and spec.config.backbone.mean is None


def test_medfmc_selection_never_uses_official_val_files(medfmc_root: Path) -> None:
    protocol = MedFMCProtocol(root=str(medfmc_root), datasets=["chest", "colon", "endo"], shots=[1], exps=[2])
    for spec in protocol.run_specs(tiny_base()):
        split = materialise(spec)
        base = medfmc_root / spec.task
        keys = {
            name: {s.key for s in read_medfmc_list(base / name, spec.task, base / "images").items}
            for name in ("trainval.txt", f"{spec.task}_1-shot_val_exp2.txt", "test_WithLabel.txt")
        }
        train = {s.key for s in split.train.items}
        val = {s.key for s in split.val.items}
        assert val == keys["trainval.txt"] - train and not train & val
        official = keys[f"{spec.task}_1-shot_val_exp2.txt"]
        assert official & train and val != official  # the official val file overlaps train; not used
        assert {s.key for s in split.test.items} == keys["test_WithLabel.txt"]


def test_medfmc_missing_files_are_reported(tmp_path: Path) -> None:
    root = write_medfmc_root(tmp_path / "m", datasets=("colon",), shots=(1,), exps=(1,))
    with pytest.raises(ProtocolError, match="exp2"):
        MedFMCProtocol(root=str(root), datasets=["colon"], shots=[1], exps=[1, 2]).check()


def test_vtab_specs_follow_vpt(tmp_path: Path) -> None:
    assert len(VTAB_TASKS) == 19 and [len(v) for v in VTAB_GROUPS.values()] == [7, 4, 8]
    assert VTAB_SEEDS == (42, 44, 82, 100, 800)
    protocol = VTABProtocol(root=str(tmp_path))
    final = protocol.run_specs(tiny_base(), method="vpt")
    assert len(final) == 19 * 5 and {s.seed for s in final} == set(VTAB_SEEDS)
    spec = final[0]
    assert spec.splits.train.path.endswith("cifar100/train800val200") and spec.splits.test.path.endswith(
        "cifar100/test"
    )
    assert spec.epoch_selection == "last" and spec.evaluate_on == "test" and not spec.augment
    # the recorded config says what the run does: rerunning config.yaml must not augment either
    assert spec.config.data.augment is False and all(not s.config.data.augment for s in final)
    assert spec.eval_resize == "direct" and spec.metric == "accuracy" and spec.group == "natural"
    assert spec.config.backbone.mean == [0.485, 0.456, 0.406] and spec.config.backbone.std == [
        0.229,
        0.224,
        0.225,
    ]
    search = protocol.run_specs(tiny_base(), stage="search", hparams={"train.lr": 0.1})
    assert len(search) == 19 and {s.seed for s in search} == {42}
    assert search[0].splits.train.path.endswith("train800") and search[0].splits.val.path.endswith("val200")
    assert all(s.epoch_selection == "last" and s.evaluate_on == "val" for s in search)
    assert search[0].config.train.lr == 0.1 and search[0].hparams == {"train.lr": 0.1}
    with pytest.raises(ProtocolError, match="train800"):
        protocol.check()
    with pytest.raises(ValueError, match="unknown VTAB"):
        VTABProtocol(root=str(tmp_path), tasks=["imagenet"])
    write_vtab_root(tmp_path / "v", ["dtd"])
    VTABProtocol(root=str(tmp_path / "v"), tasks=["dtd"]).check()


def test_fgvc_specs_and_class_count_check(tmp_path: Path) -> None:
    assert FGVC_DATASETS == {"cub": 200, "nabirds": 555, "flowers": 102, "dogs": 120, "cars": 196}
    protocol = FGVCProtocol(root=str(tmp_path))
    specs = protocol.run_specs(tiny_base())
    assert len(specs) == 5 * 5 and {s.task for s in specs} == set(FGVC_DATASETS)
    assert all(s.splits.holdout_fraction == 0.1 and s.splits.holdout_seed == s.seed for s in specs)
    assert all(s.epoch_selection == "val" and s.evaluate_on == "test" for s in specs)
    assert len(protocol.run_specs(tiny_base(), stage="search")) == 5
    write_fgvc_root(tmp_path / "f", {"cub": 3})
    with pytest.raises(ProtocolError, match="3 classes in train, expected 200"):
        FGVCProtocol(root=str(tmp_path / "f"), datasets=["cub"]).check()
    FGVCProtocol(root=str(tmp_path / "f"), datasets=["cub"], check_num_classes=False).check()


def test_fewshot_specs_and_hashes(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "d")
    protocol = FewShotProtocol(tasks={"a": {"path": str(data)}, "b": {"path": str(data)}})
    specs = protocol.run_specs(tiny_base(), method="linear")
    assert len(specs) == 2 * 4 * 5 and {s.shots for s in specs} == {1, 5, 10, 20}
    assert len(protocol.run_specs(tiny_base(), stage="search")) == 2 * 4
    spec = specs[0]
    # operational fields and notes do not change the identity of a run; results-relevant fields do
    same = spec.model_copy(
        update={"notes": {"x": 1}, "config": spec.config.model_copy(update={"output_dir": "elsewhere"})}
    )
    same.config.train.progress = True
    same.config.train.eval_batch_size = 7
    assert config_hash(same) == config_hash(spec)
    other = protocol.run_specs(tiny_base(lr=0.5), method="linear")[0]
    assert config_hash(other) != config_hash(spec) and train_hash(other) != train_hash(spec)
    # a search run and the final run with the same training share the run folder
    search = protocol.run_specs(tiny_base(), method="linear", stage="search")[0]
    assert config_hash(search) != config_hash(spec) and train_hash(search) == train_hash(spec)


def test_a_run_spec_augments_as_its_config_says(tmp_path: Path) -> None:
    """The unit and the base config both decide; the spec and its recorded config agree, with or without a recipe."""
    for recipe in ("vpt-vtab", None):
        spec = VTABProtocol(root=str(tmp_path), tasks=["dtd"], recipe=recipe).run_specs(tiny_base())[0]
        assert spec.augment is False and spec.config.data.augment is False
    fgvc = dict(root=str(tmp_path), datasets=["cub"], layout="folder", seeds=[0])
    assert FGVCProtocol(**fgvc).run_specs(tiny_base())[0].config.data.augment is True
    base = {**tiny_base(), "data": {"augment": False}}
    spec = FGVCProtocol(**fgvc, recipe=None).run_specs(base)[0]
    assert spec.augment is False and spec.config.data.augment is False  # before: the run augmented anyway


def test_vtab_search_and_final_train_differently(tmp_path: Path) -> None:
    protocol = VTABProtocol(root=str(tmp_path), tasks=["dtd"], seeds=[42])
    search = protocol.run_specs(tiny_base(), stage="search")[0]
    final = protocol.run_specs(tiny_base())[0]
    assert train_hash(search) != train_hash(final)


def test_presets_and_grids() -> None:
    ept = resolve_preset("ept.dp")
    assert [p["method.prompt_length"] for p in grid_points(ept, {})] == [5, 10, 20, 50, 100, 200, 400, 600]
    assert PRESETS["vpt.np"].grid["prompt_length"] == [1, 5, 10, 50, 100, 150]
    assert PRESETS["lora.rank"].grid["rank"] == [1, 4, 8, 32, 64]
    assert PRESETS["adapter.rank"].grid == {"reduction": [1, 4, 8, 32, 64]}  # rates: widths 768 .. 12 at d=768
    points = grid_points(resolve_preset("lora.rank"), {"lr": [0.1, 0.01], "weight_decay": [0.0, 1e-4]})
    assert len(points) == 5 * 2 * 2 and points[0] == {
        "method.rank": 1,
        "train.lr": 0.1,
        "train.weight_decay": 0.0,
    }
    depth = grid_points(resolve_preset("ept.depth"), {}, backbone_depth=6)
    assert [p["method.layers"] for p in depth] == [[5], [4, 5], [2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    custom = resolve_preset(MethodPreset(preset="vpt.np", grid={"prompt_length": [1, 2]}, label="vpt-small"))
    assert custom.method == "vpt" and custom.label == "vpt-small" and custom.grid == {"prompt_length": [1, 2]}
    assert resolve_preset("bias").label == "bias"
    with pytest.raises(ProtocolError, match="unknown method or preset"):
        resolve_preset("nonsense")


def test_sweep_yaml_example_in_the_docs_is_valid(tmp_path: Path) -> None:
    import textwrap

    import yaml

    from promptvit.protocols import SweepConfig, sweep

    raw = yaml.safe_load(textwrap.dedent(sweep.__doc__.split("::", 1)[1]))
    raw["protocol"]["root"] = str(tmp_path)
    config = SweepConfig.model_validate(raw)
    assert [resolve_preset(m).label for m in config.methods] == ["linear", "ept.dp", "vpt", "lora-r8"]
    assert len(config.protocol.run_specs(config.base, method="linear")) == 3 * 3 * 5


def test_fewshot_check_reads_labels_before_any_run(tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "d", classes=2, per_class=3)
    FewShotProtocol(tasks={"ok": {"path": str(data)}}).check()
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\nmissing.png,a\n")
    with pytest.raises(ProtocolError, match="task 'bad'.*do not exist"):
        FewShotProtocol(tasks={"bad": {"kind": "csv", "path": str(csv)}}).check()
    with pytest.raises(ProtocolError, match="column"):
        FewShotProtocol(tasks={"bad": {"kind": "csv", "path": str(csv), "label_column": "dx"}}).check()


def test_the_evaluation_section_at_its_defaults_leaves_run_identities_unchanged(tmp_path: Path) -> None:
    """Records written before RunConfig had `evaluation` must still be found: the section is hashed only when
    something in it is set (an empty section would have changed every hash)."""
    data = write_image_folder(tmp_path / "d")
    spec = FewShotProtocol(tasks={"a": {"path": str(data)}}).run_specs(tiny_base(), method="linear")[0]
    assert "evaluation" not in resolved_config(spec)["config"]
    binned = spec.model_copy(
        update={"config": spec.config.model_copy(update={"evaluation": EvaluationConfig(ece_bins=10)})}
    )
    assert resolved_config(binned)["config"]["evaluation"] == {"ece_bins": 10}
    assert config_hash(binned) != config_hash(spec)


#: (config hash, train hash) prefixes of the first few-shot run of each method at its defaults, as recorded
#: before `linear`'s default solver changed from the optimiser to L-BFGS; "linear" is the one that moved
PINNED_HASHES = {
    "full": ("229f02ba5cc368c3", "3ffb904c7894156e"),
    "partial": ("74d9a763d57f57e8", "925abb3874388e02"),
    "mlp": ("8a7449ce8fd67bdf", "e33f231bf3904418"),
    "lora": ("278aae9f12e5b55b", "c21a2263427d9582"),
    "bias": ("16498341585c5f28", "e71a3741e7d79abd"),
    "norm": ("c3a495ecb75976bb", "c04dc05417ff88bc"),
    "adapter": ("7764d38400155bae", "ae7ae37212dc4f54"),
    "vp": ("d9c5b277254c8f1f", "555297ace6bd5610"),
    "vpt": ("cfdc14ff6305e072", "08441025e7a12208"),
    "ept": ("f77a9cb6f48f003b", "4f26ba60a932a7c9"),
    "ap": ("90ca639b475f40cd", "54a5a9f98518af6e"),
    "spt": ("62af5d646a955ba1", "a92de82365a578f6"),
    "da_vpt": ("e5a99add0f7df206", "9681dd0de862ae79"),
    "linear solver=sgd": ("ac1a2347a206e419", "01575bb8189cda7e"),
    "linear solver=lbfgs": ("18aa6d3e233302df", "4ba6729e4c47f08c"),
    "mlp solver=lbfgs": ("c09326edf9ad781d", "bd783c35b63b86be"),
}
#: what a default `linear` run hashed to while its default trained with the optimiser
OLD_DEFAULT_LINEAR = ("fe58273dc29180e9", "7153efd13895dd70")


def _pinned_spec(label: str) -> RunSpec:
    method, _, option = label.partition(" ")
    options = dict([option.split("=")]) if option else {}
    protocol = FewShotProtocol(tasks={"a": {"path": "/promptvit-pinned/data"}})  # never read: only hashed
    return protocol.run_specs(tiny_base(), method=method, method_options=options)[0]


def test_a_default_that_changed_meaning_gives_runs_a_new_identity_and_no_other_hash_moves() -> None:
    """A linear run that leaves `solver` unset now fits by L-BFGS: it must not find the records its SGD
    default wrote (a sweep would skip it and report them), and must share the identity of an explicit
    `solver: lbfgs` run. Every other record keeps the hash it was written under."""
    for label, pinned in PINNED_HASHES.items():
        spec = _pinned_spec(label)
        assert (config_hash(spec)[:16], train_hash(spec)[:16]) == pinned, label
    default = _pinned_spec("linear")
    hashes = (config_hash(default)[:16], train_hash(default)[:16])
    assert hashes != OLD_DEFAULT_LINEAR and hashes == PINNED_HASHES["linear solver=lbfgs"]
    assert resolved_config(default)["config"]["method"]["options"] == {"solver": "lbfgs"}
