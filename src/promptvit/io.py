"""Safe file I/O: atomic file writes, one writer per run folder, and checked YAML reads.

A kill at any moment leaves the previous file or the new one, never a torn one; a full disk or a read-only
folder leaves the previous file intact and raises ``OutputError`` naming the file.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from promptvit.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, the run-folder lock is skipped
    fcntl = None

LOCK_FILE = ".promptvit.lock"
_OUTPUT_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EDQUOT: "disk quota exceeded",
}


def _file_mode() -> int:
    """Permissions a plainly created file gets under the current umask (mkstemp would leave 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _output_error(path: Path, error: OSError) -> OutputError:
    reason = _OUTPUT_ERRNOS.get(error.errno, error.strerror or str(error))
    return OutputError(
        error.errno, f"cannot write {path}: {reason}; free space or choose another output folder"
    )


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _output_error(path, error) from error
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        tmp.chmod(_file_mode())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in _OUTPUT_ERRNOS:
            raise _output_error(path, error) from error
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextmanager
def exclusive_folder(folder: str | Path) -> Iterator[Path]:
    """Hold an advisory lock on ``folder`` so a second process cannot write the same run folder.

    The operating system drops the lock when the holder dies (even by SIGKILL), so no stale lock remains.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_FILE, "a+")  # noqa: SIM115 (held for the whole block)
    except OSError as error:
        raise _output_error(folder, error) from error
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise OutputError(
                    errno.EBUSY,
                    f"{folder} is being written by another process (pid {holder}); wait for it to finish "
                    "or choose another run name",
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        yield folder
    finally:
        handle.close()


def read_yaml_mapping(path: str | Path, *, name: str, holds: str, error: type[Exception]) -> dict[str, Any]:
    """The mapping in a YAML file; ``error`` naming the file when it is missing, malformed or not a mapping.

    ``name`` says what the file is ("config file"), ``holds`` what its mapping should contain (for the message).
    An empty file is an empty mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{name} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as problem:
        raise error(f"{path} is not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a mapping ({holds})")
    return data
