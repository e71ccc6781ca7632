"""Data loading for promptvit: readers, few-shot sampling, splits, transforms and the Dataset; ``spec``: a run
config's ``data`` section (``DataSpec``) and the split it names.

This subpackage knows no model: it depends on torch, torchvision, PIL, numpy, scikit-learn and pydantic, and
of promptvit only on ``errors``, ``validation`` and ``io``, so it can be used (and tested) on its own.
"""

from promptvit.data.benchmarks import (
    FGVC_FOLDERS,
    VTAB_LIST_FILES,
    VTAB_NAMES,
    read_fgvc_json,
    read_label_list,
    vtab_task,
)
from promptvit.data.dataset import ImageDataset, SkippedFile, find_unreadable, load_image
from promptvit.data.errors import DataError
from promptvit.data.fewshot import (
    FewShotSplit,
    cap_per_class,
    holdout_validation,
    load_medfmc_split,
    make_few_shot_split,
    sample_k_shot,
    sample_medfmc_k_shot,
    stratified_split,
)
from promptvit.data.sources import (
    IMAGE_EXTENSIONS,
    MEDFMC_CLASSES,
    MEDFMC_DATASETS,
    Label,
    LabeledSamples,
    MedFMCFiles,
    Sample,
    digits_demo,
    medfmc_split_files,
    parse_medfmc_line,
    read_csv,
    read_image_folder,
    read_medfmc_list,
    read_npz,
)
from promptvit.data.transforms import ToModelMode, build_transforms, to_8bit

__all__ = [
    "FGVC_FOLDERS",
    "IMAGE_EXTENSIONS",
    "MEDFMC_CLASSES",
    "MEDFMC_DATASETS",
    "DataError",
    "FewShotSplit",
    "ImageDataset",
    "Label",
    "LabeledSamples",
    "MedFMCFiles",
    "VTAB_LIST_FILES",
    "VTAB_NAMES",
    "Sample",
    "SkippedFile",
    "ToModelMode",
    "build_transforms",
    "cap_per_class",
    "digits_demo",
    "find_unreadable",
    "holdout_validation",
    "load_image",
    "load_medfmc_split",
    "make_few_shot_split",
    "medfmc_split_files",
    "parse_medfmc_line",
    "read_csv",
    "read_fgvc_json",
    "read_label_list",
    "read_image_folder",
    "read_medfmc_list",
    "read_npz",
    "sample_k_shot",
    "sample_medfmc_k_shot",
    "stratified_split",
    "to_8bit",
    "vtab_task",
]
