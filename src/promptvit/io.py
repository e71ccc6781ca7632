"""Safe file I/O: atomic file writes, one writer per run folder, and checked YAML reads.

A kill at any moment leaves the previous file or the new one, never a torn one; a full disk or a read-only
folder leaves the previous file intact and raises ``OutputError`` naming the file.

What may be written over (``check_output_path``): only a regular file or a path that does not exist yet.
Device nodes, FIFOs, sockets and folders are refused, and so are symbolic links (a link is neither
followed nor replaced: the user is told to name the real file), and any path inside a folder the command
reads or owns (an artifact, a run folder).
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
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


def check_output_path(path: str | Path, *, protected: Iterable[str | Path] = ()) -> Path:
    """``path`` if it may be written: a regular file or a new name, not a link, not inside ``protected``.

    ``protected`` lists the files and folders the command reads or owns; writing into them would destroy
    the inputs (``predict ART img.png --out ART/adapter_config.json``).
    """
    path = Path(path)
    if path.is_symlink():
        raise OutputError(
            errno.EEXIST,
            f"cannot write {path}: it is a symbolic link (to {os.readlink(path)}); links are neither followed "
            "nor replaced, give the real file or a new name",
        )
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, FIFO or socket)"
        raise OutputError(
            errno.EEXIST, f"cannot write {path}: it is {kind}; give the path of a new or regular file"
        )
    folder = next((p for p in path.parents if p.exists()), None)  # the nearest existing parent
    if folder is not None and not folder.is_dir():
        raise OutputError(
            errno.ENOTDIR,
            f"cannot write {path}: {folder} is a file, not a folder; choose another output path",
        )
    target = path.resolve()
    for owned in protected:
        owned_path = Path(owned).resolve()
        if target == owned_path or owned_path in target.parents:
            raise OutputError(
                errno.EEXIST,
                f"cannot write {path}: it is inside {owned}, which this command reads; "
                "choose an output path outside it",
            )
    return path


def check_run_name(name: str) -> str:
    """A run name is one folder name: no separators, no ``..``, not absolute (it cannot leave ``--out``)."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or Path(name).is_absolute()
    ):
        raise ValueError(
            f"run name {name!r} must be a single folder name (no '/', '\\' or '..'); "
            "use --out to choose where runs go"
        )
    return name


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    ``path`` must be a regular file or a new name (``check_output_path``); anything else is refused.
    """
    path = check_output_path(path)
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
        # O_NOFOLLOW: a lock file planted as a link must not make us truncate the file it points to
        descriptor = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        handle = open(descriptor, "a+")  # noqa: SIM115 (held for the whole block)
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
        data = load_yaml_strict(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as problem:
        raise error(f"{path} is not UTF-8 text ({problem}); save it as UTF-8") from None
    except yaml.YAMLError as problem:
        mark = getattr(problem, "problem_mark", None)
        if isinstance(problem, yaml.constructor.ConstructorError) and mark is not None:  # one line
            raise error(f"{path}, line {mark.line + 1}: {problem.problem}") from None
        raise error(f"{path} is not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a mapping ({holds})")
    return data


MAX_YAML_NODES = 100_000
"""Values a YAML document may expand to through aliases; a legitimate config has a few hundred."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML keeps only the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key '{key}' is given twice (lines {seen[key]} and {line}); YAML would silently keep "
                    "only the last, merge the two entries",
                    key_node.start_mark,
                )
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """Nodes the document has once every alias is expanded, counting stops just past ``limit``."""
    count = 0
    stack = [node]
    while stack and count <= limit:
        current = stack.pop()
        count += 1
        if isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
        elif isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack.extend((key, value))
    return count


def load_yaml_strict(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys and alias bombs (``yaml.YAMLError`` saying which)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise yaml.YAMLError(
                f"the document expands to more than {MAX_YAML_NODES:,} values through aliases (&/*); "
                "write the values out instead of nesting aliases"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
