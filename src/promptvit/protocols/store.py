"""The append-only results store: one JSON file per finished run, created atomically and never rewritten.

Layout of a store folder::

    <store>/
      records/<config_hash>.json         one per run whose outcome is final (status "ok" or "diverged")
      failed/<config_hash>.<time>.<pid>.json   one per failed attempt (retried on the next sweep)
      runs/<train_hash[:20]>/            run folders: checkpoint/, artifact/, log.csv, metrics.json
      locks/<train_hash[:20]>.lock       held (flock) while a run trains; the OS releases it on a kill

Guarantees:

* **No torn records.** A record is written to a temporary file, fsynced, then hard-linked to its final
  name; ``link`` is atomic and fails if the name exists. A kill leaves either the complete record or
  nothing (plus, at worst, a ``.tmp-*`` file that readers ignore and report).
* **No duplicates.** The final name is the config hash, so a second writer of the same run (another
  process, a Ray worker, a re-run sweep) gets ``False`` from :meth:`ResultStore.add` and nothing changes.
  Where hard links are unsupported, ``open(O_CREAT | O_EXCL)`` gives the same exclusivity.
* **Nothing lost on a kill.** Records are written as runs finish; a re-run skips every config hash that
  has a record and resumes unfinished trainings from their checkpoints (``promptvit.train.fit``).

Records can also be exported to (and read from) JSON Lines; a torn last line, as a killed ``>>`` append
would leave, is skipped on read and reported.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptvit.errors import OutputError
from promptvit.io import atomic_write_text, output_error
from promptvit.protocols.spec import ProtocolError

RECORD_FORMAT = 1
FINAL_STATUSES = ("ok", "diverged")
#: what a store folder holds (a sweep adds sweeps/ and report/); an older promptvit wrote these unmarked
STORE_NAMES = ("records", "failed", "runs", "locks", "sweeps", "report")


@dataclass
class LoadedRecords:
    """What :func:`load_records` found: final records, failed attempts, and problems worth reporting."""

    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` if it does not exist; atomic and complete. False if it existed.

    A full disk (or another write error) raises ``OutputError`` naming the file and leaves no partial file.
    """
    try:
        return _create_exclusive(path, text)
    except OutputError:
        raise
    except OSError as error:
        raise output_error(path, error) from error


def _create_exclusive(path: Path, text: str) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return False
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False
        except OSError as error:  # no hard links here (some network or FUSE file systems): O_EXCL instead
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            created = _create_with_excl(path, text)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return created


def _create_with_excl(path: Path, text: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=1, sort_keys=True, allow_nan=False, default=str) + "\n"


class ResultStore:
    """An append-only store of run records in a folder (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.records_dir = self.root / "records"
        self.failed_dir = self.root / "failed"
        self.runs_dir = self.root / "runs"
        self.locks_dir = self.root / "locks"

    def ensure(self) -> ResultStore:
        for directory in (self.records_dir, self.failed_dir, self.runs_dir, self.locks_dir):
            directory.mkdir(parents=True, exist_ok=True)
        return self

    def record_path(self, config_hash: str) -> Path:
        return self.records_dir / f"{config_hash}.json"

    def has(self, config_hash: str) -> bool:
        """Whether the run has a final record (a failed attempt does not count)."""
        return self.record_path(config_hash).is_file()

    def done_hashes(self) -> set[str]:
        if not self.records_dir.is_dir():
            return set()
        return {p.stem for p in self.records_dir.glob("*.json") if not p.name.startswith(".")}

    def run_dir(self, train_hash: str) -> Path:
        return self.runs_dir / train_hash[:20]

    def add(self, record: dict[str, Any]) -> bool:
        """Store a final record under its config hash; False (and no change) if one is already there."""
        if record.get("status") not in FINAL_STATUSES:
            raise ValueError(f"only final records ({FINAL_STATUSES}) go to records/; use add_failure")
        return create_exclusive(self.record_path(record["config_hash"]), _dumps(record))

    def add_failure(self, record: dict[str, Any]) -> Path:
        """Keep a failed attempt (never overwrites; the run is retried by the next sweep)."""
        for attempt in range(100):
            name = f"{record['config_hash']}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}.{attempt}.json"
            path = self.failed_dir / name
            if create_exclusive(path, _dumps(record)):
                return path
        raise ProtocolError(f"cannot name a failure record in {self.failed_dir}")

    @contextlib.contextmanager
    def lock(self, train_hash: str, *, blocking: bool = True) -> Iterator[bool]:
        """Exclusive lock on one run folder; yields whether it was acquired (always True when blocking).

        Non-blocking use lets several sweep processes on one store work on different runs side by side.
        """
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        path = self.locks_dir / f"{train_hash[:20]}.lock"
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: records stay exclusive, runs may repeat work
            yield True
            return
        try:  # O_NOFOLLOW: a lock file planted as a link must not make us truncate the file it points to
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as error:
            raise output_error(path, error) from error
        with open(descriptor, "a+", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(
                    f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
                )
                handle.flush()
                yield True
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def load(self) -> LoadedRecords:
        return load_records(self.root)

    def export_jsonl(self, path: str | Path) -> Path:
        """All final records (sorted by config hash) as one JSON Lines file, written atomically."""
        loaded = self.load()
        lines = [json.dumps(r, sort_keys=True, default=str) for r in sorted(loaded.records, key=_hash_of)]
        return atomic_write_text(path, "".join(line + "\n" for line in lines))


def _hash_of(record: dict[str, Any]) -> str:
    return str(record.get("config_hash", ""))


def _read_json_file(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problems.append(f"{path}: unreadable record ignored ({error})")
        return None
    if not isinstance(record, dict) or "config_hash" not in record:
        problems.append(f"{path}: not a run record (no config_hash); ignored")
        return None
    return record


def read_jsonl(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """Records of a JSON Lines file; a torn or invalid line is skipped and reported."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        problems.append(f"{path}: cannot read ({error})")
        return []
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = number == len(lines)  # no newline after it: the write was cut short
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            what = "torn last line (an interrupted write)" if last else "invalid JSON line"
            problems.append(f"{path}, line {number}: {what} ignored")
            continue
        if not isinstance(record, dict) or "config_hash" not in record:
            problems.append(f"{path}, line {number}: not a run record (no config_hash); ignored")
            continue
        records.append(record)
    return records


def _store_files(root: Path, problems: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    records, failures = [], []
    records_dir = root / "records" if (root / "records").is_dir() else root
    for path in sorted(records_dir.glob(".tmp-*")):
        problems.append(
            f"{path}: leftover temporary file of an interrupted write (ignored; delete it when no sweep is running)"
        )
    for path in sorted(records_dir.glob("*.json")):
        if path.name.startswith("."):
            continue
        record = _read_json_file(path, problems)
        if record is None:
            continue
        if record["config_hash"] != path.stem:
            problems.append(
                f"{path}: file name differs from its config_hash {record['config_hash']}; ignored"
            )
            continue
        records.append(record)
    failed_dir = root / "failed"
    if failed_dir.is_dir():
        for path in sorted(failed_dir.glob("*.json")):
            if not path.name.startswith("."):
                record = _read_json_file(path, problems)
                if record is not None:
                    failures.append(record)
    return records, failures


def is_run_folder(path: Path) -> bool:
    """A folder ``promptvit train`` wrote: ``metrics.json`` beside ``config.yaml``."""
    return (path / "metrics.json").is_file() and (path / "config.yaml").is_file()


def run_folder_record(run_dir: Path, problems: list[str]) -> dict[str, Any] | None:
    """A final record (protocol ``runs``) read from a plain ``promptvit train`` run folder, or None with the
    reason in ``problems`` (an unfinished run, unreadable files).

    The task is the data set (MedFMC name, or the data path's last part), the draw its (exp, seed), the
    metric the one the run's CI was computed for (its selection metric)."""
    import hashlib

    import yaml

    try:
        config_text = (run_dir / "config.yaml").read_text(encoding="utf-8")
        config = yaml.safe_load(config_text)
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        data, train = config.get("data") or {}, config.get("train") or {}
        test = metrics.get("test")
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, AttributeError) as error:
        problems.append(f"{run_dir}: unreadable run folder ignored ({error})")
        return None
    if not isinstance(test, dict):
        problems.append(f"{run_dir}: no test metrics in metrics.json (an unfinished run?); ignored")
        return None
    metric = (test.get("ci") or {}).get("metric") or ("map" if "map" in test else "accuracy")
    kind = data.get("kind")
    task = data.get("dataset") or _task_name(data)
    digest = hashlib.sha256((str(run_dir.resolve()) + "\n" + config_text).encode()).hexdigest()
    finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((run_dir / "metrics.json").stat().st_mtime))
    return {
        "format": RECORD_FORMAT,
        "config_hash": digest,
        "protocol": "runs",
        "task": task,
        "shots": data.get("shots"),
        "split": f"exp{data.get('exp', 1)}" if kind in ("medfmc", "fewshot") else None,
        "seed": train.get("seed"),
        "stage": "final",
        "method": (config.get("method") or {}).get("name", metrics.get("method")),
        "hparams": {},
        "status": "ok",
        "backbone": (config.get("backbone") or {}).get("name", ""),
        "backbone_init": metrics.get("backbone_init"),
        "metric": metric,
        "score": test.get(metric),
        "evaluated_on": "test",
        "metrics": test,
        "parameters": metrics.get("parameters"),
        "spec": {"config": config},
        "selection": {
            "epoch": metrics.get("selection"),
            "epoch_split": "val" if metrics.get("select_metric") else "last epoch",
            "hyperparameters_split": "none (fixed)",
        },
        "run_dir": str(run_dir),
        "finished_at": finished,
    }


def _task_name(data: dict[str, Any]) -> str:
    """A run's data set by name: a ``data fewshot`` folder's name (else its folder's), else the data path's."""
    if not data.get("path"):
        return str(data.get("kind"))
    if data.get("kind") == "fewshot":
        from promptvit.data.split_files import read_fewshot_folder

        try:
            folder, _ = read_fewshot_folder(data["path"])
            return folder.name if folder.name != "data" else folder.root.resolve().name
        except ValueError:  # moved or damaged since: the path names it
            pass
    return Path(str(data["path"])).stem


def _run_folders(path: Path) -> list[Path]:
    """``path`` itself when it is a run folder, else the run folders directly inside it."""
    if is_run_folder(path):
        return [path]
    return sorted(p for p in path.iterdir() if p.is_dir() and is_run_folder(p))


def record_sources(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """What ``load_records`` reads from ``paths``: record files, a store's ``records/`` and ``failed/``, run
    folders (its ``report/`` and ``runs/`` are not read, so a report may be written there)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    sources: list[Path] = []
    for item in map(Path, paths):
        runs = _run_folders(item) if item.is_dir() and not (item / "records").is_dir() else []
        if runs:
            sources += runs
        elif item.is_dir() and (item / "records").is_dir():
            sources += [item / "records", item / "failed"]
        else:
            sources += [item, item / "failed"] if item.is_dir() else [item]
    return sources


def load_records(paths: str | Path | Iterable[str | Path]) -> LoadedRecords:
    """Read records from store folders, ``records/`` folders, ``.jsonl`` files or plain run folders (a run
    folder of ``promptvit train``, or a folder of them such as ``runs/``), in any mix.

    A config hash seen twice keeps its first record and reports the rest; failed attempts of runs that
    later succeeded are dropped from ``failures``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    loaded = LoadedRecords()
    raw_records: list[dict[str, Any]] = []
    for item in paths:
        path = Path(item)
        runs = _run_folders(path) if path.is_dir() and not (path / "records").is_dir() else []
        if runs:
            raw_records += [r for run in runs if (r := run_folder_record(run, loaded.problems)) is not None]
        elif path.is_dir():
            records, failures = _store_files(path, loaded.problems)
            raw_records += records
            loaded.failures += failures
        elif path.is_file():
            for record in read_jsonl(path, loaded.problems):
                (raw_records if record.get("status") in FINAL_STATUSES else loaded.failures).append(record)
        else:
            raise ProtocolError(
                f"results not found: {path} (give a results folder, a .jsonl file or a run folder)"
            )
    seen: set[str] = set()
    for record in raw_records:
        digest = record["config_hash"]
        if digest in seen:
            loaded.problems.append(f"duplicate record for config hash {digest[:12]} ignored")
            continue
        seen.add(digest)
        loaded.records.append(record)
    loaded.failures = [f for f in loaded.failures if f.get("config_hash") not in seen]
    return loaded
