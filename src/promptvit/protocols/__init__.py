"""Benchmark protocols, sweeps, the append-only results store and paper-style reports.

* Protocols (:class:`MedFMCProtocol`, :class:`VTABProtocol`, :class:`FGVCProtocol`,
  :class:`FewShotProtocol`) list units (task, shots, split, seed) and turn a base config into
  :class:`RunSpec` objects with ``run_specs(base, stage=..., method=..., hparams=...)``.
* :func:`run_sweep` crosses them with method presets and grids, chooses hyperparameters on validation,
  and runs in-process, in a process pool or on Ray; :class:`ResultStore` keeps one record per run.
* :func:`write_report` renders Markdown/HTML tables (mean ± std, averages, % vs linear probing, VTAB group
  means) and plots from the records.

Dependencies point downward: protocols read run configs (``promptvit.run_config``) and data
(``promptvit.data``), and only ``runner`` runs the pipeline (``promptvit.experiment``); nothing below
imports this package.
"""

from promptvit.protocols.fewshot import FewShotProtocol
from promptvit.protocols.fgvc import FGVC_DATASETS, FGVCProtocol
from promptvit.protocols.medfmc import MEDFMC_METRICS, MedFMCProtocol
from promptvit.protocols.report import Table, build_tables, write_report
from promptvit.protocols.runner import execute, run_and_record
from promptvit.protocols.spec import (
    Protocol,
    ProtocolError,
    RunSpec,
    SourceSpec,
    SplitSpec,
    Unit,
    config_hash,
    train_hash,
)
from promptvit.protocols.splits import materialise
from promptvit.protocols.store import LoadedRecords, ResultStore, load_records
from promptvit.protocols.sweep import (
    PRESETS,
    Choice,
    MethodPreset,
    RunnerOptions,
    SweepConfig,
    SweepResult,
    grid_points,
    load_sweep_config,
    run_specs,
    run_sweep,
    select_hparams,
)
from promptvit.protocols.vtab import VTAB_GROUPS, VTAB_SEEDS, VTAB_TASKS, VTABProtocol

__all__ = [
    "FGVC_DATASETS",
    "MEDFMC_METRICS",
    "PRESETS",
    "VTAB_GROUPS",
    "VTAB_SEEDS",
    "VTAB_TASKS",
    "Choice",
    "FGVCProtocol",
    "FewShotProtocol",
    "LoadedRecords",
    "MedFMCProtocol",
    "MethodPreset",
    "Protocol",
    "ProtocolError",
    "ResultStore",
    "RunSpec",
    "RunnerOptions",
    "SourceSpec",
    "SplitSpec",
    "SweepConfig",
    "SweepResult",
    "Table",
    "Unit",
    "VTABProtocol",
    "build_tables",
    "config_hash",
    "execute",
    "grid_points",
    "load_records",
    "load_sweep_config",
    "materialise",
    "run_and_record",
    "run_specs",
    "run_sweep",
    "select_hparams",
    "train_hash",
    "write_report",
]
