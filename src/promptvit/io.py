"""Safe file I/O: the output rule every writing verb follows, atomic file writes, one writer per run
folder, and checked YAML reads.

The output rule (docs/bad-inputs.md): promptvit writes to a new name, or into a folder it created itself,
and never deletes or replaces anything it did not write.

- ``output_folder(folder, kind)``: the folder a verb writes into (a run, an export, a report, a results
  store...). Accepted when it does not exist (it is created), is empty, or holds ``OUTPUT_MARKER`` saying
  promptvit made it for the same kind of output; the marker is written when the folder is claimed.
  Refused: a folder holding anything else, a symbolic link, the current folder (``--out .``) or one above
  it, and any folder inside what the command reads.
- ``output_file(path)``: a single output file (``predict --out``, ``eval --out``) must be a new name.
- ``check_output_path(path)``, run by every atomic write: only a regular file or a new name may be written;
  device nodes, FIFOs, sockets, folders and symbolic links are refused (a link is neither followed nor
  replaced), and so is a path that reaches its promptvit folder through a link.

A kill at any moment leaves the previous file or the new one, never a torn one; a full disk or a read-only
folder leaves the previous file intact and raises ``OutputError`` naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml

from promptvit.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, the run-folder lock is skipped
    fcntl = None

LOCK_FILE = ".promptvit.lock"
#: written into every output folder promptvit creates or claims; its JSON ``kind`` says what the folder holds
OUTPUT_MARKER = ".promptvit-output"
_OUTPUT_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EDQUOT: "disk quota exceeded",
    errno.ELOOP: "it is a symbolic link, which promptvit does not follow",
    errno.ENOENT: "that folder cannot be created there",
}


def _file_mode() -> int:
    """Permissions a plainly created file gets under the current umask (mkstemp would leave 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def output_error(path: Path, error: OSError) -> OutputError:
    """``error`` (full disk, read-only, no permission...) as an ``OutputError`` naming ``path`` and the fix."""
    reason = _OUTPUT_ERRNOS.get(error.errno, error.strerror or str(error))
    fix = "free space or choose" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "choose"
    return OutputError(error.errno, f"cannot write {path}: {reason}; {fix} another output folder")


def _refuse_hazards(path: Path, inputs: Iterable[str | Path], what: str) -> Path:
    """The checks every output shares: no symbolic link, not the current folder, not inside an input."""
    if path.is_symlink():
        raise OutputError(
            errno.EEXIST,
            f"cannot write {path}: it is a symbolic link (to {os.readlink(path)}); promptvit never follows a "
            f"link it did not create, give the real {what} or a new name",
        )
    target = path.resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise OutputError(
            errno.EEXIST,
            f"cannot write into {path}: it is the current folder{'' if target == here else ' or one above it'}; "
            "promptvit writes into a folder of its own, give a new folder name",
        )
    for owned in inputs:
        owned_path = Path(owned).resolve()
        if target == owned_path or owned_path in target.parents:
            raise OutputError(
                errno.EEXIST,
                f"cannot write {path}: it is inside {owned}, which this command reads; "
                f"choose an output {what} outside it",
            )
    nearest = next((p for p in path.parents if os.path.lexists(p)), None)  # the nearest existing parent
    if nearest is not None and not nearest.is_dir():
        raise OutputError(
            errno.ENOTDIR,
            f"cannot write {path}: {nearest} is a file, not a folder; choose another output path",
        )
    return path


def _marker_kind(folder: Path) -> str | None:
    """The ``kind`` in ``folder``'s marker; None without one (or one promptvit cannot read)."""
    marker = folder / OUTPUT_MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        kind = json.loads(marker.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def output_folder(
    folder: str | Path,
    kind: str,
    *,
    inputs: Iterable[str | Path] = (),
    reuse: bool = True,
    legacy: Iterable[str] = (),
    create: bool = True,
) -> Path:
    """``folder``, claimed for a verb's output of ``kind`` ("run", "export", "report"...); created if new.

    Accepted: a new name, an empty folder, or (``reuse``) a folder whose marker says promptvit made it for
    ``kind``; ``legacy`` names (or ``*.png`` patterns) what an older promptvit wrote there before folders
    were marked: a folder holding only those is adopted. ``create=False`` only checks (claim it again once
    there is something to write, so a failed command leaves no empty folder behind). Anything else raises
    ``OutputError`` naming the folder: a folder holding files promptvit did not write, another kind of
    promptvit folder, a symbolic link, the current folder, a folder under a file or inside ``inputs``
    (what the command reads).
    """
    folder = _refuse_hazards(Path(folder), inputs, "folder")
    claimed = False
    if os.path.lexists(folder):
        if not folder.is_dir():
            raise OutputError(
                errno.EEXIST, f"cannot write into {folder}: it is a file, not a folder; give a new folder name"
            )
        owner = _marker_kind(folder)
        # not counted: the marker, and a marker another process is writing now (two sweeps on one store)
        ours = (OUTPUT_MARKER, f".{OUTPUT_MARKER}.")
        entries = sorted(p.name for p in folder.iterdir() if not p.name.startswith(ours))
        if owner is not None and owner != kind:
            raise OutputError(
                errno.EEXIST,
                f"cannot write a {kind} into {folder}: it holds a promptvit {owner}; give a new folder name",
            )
        if owner == kind and entries and not reuse:
            raise OutputError(
                errno.EEXIST,
                f"cannot write into {folder}: it is not an empty folder (it holds an earlier {kind}); nothing is "
                "overwritten, give a new folder name",
            )
        legacy = tuple(legacy)
        if owner is None and entries and not all(any(fnmatch(e, n) for n in legacy) for e in entries):
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise OutputError(
                errno.EEXIST,
                f"cannot write into {folder}: it holds files promptvit did not write ({shown}); promptvit never "
                "deletes or replaces them, give a new (or empty) folder",
            )
        claimed = owner == kind
    elif not create:
        return folder
    else:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise output_error(folder, error) from error
    if not claimed and create:
        from promptvit._version import __version__

        atomic_write_text(folder / OUTPUT_MARKER, json.dumps({"kind": kind, "promptvit": __version__}) + "\n")
    return folder


def output_file(path: str | Path, *, inputs: Iterable[str | Path] = ()) -> Path:
    """``path`` for a verb's single output file: a new name, not inside ``inputs`` (``OutputError`` if not)."""
    path = check_output_path(path, protected=inputs)
    if path.exists():
        raise OutputError(
            errno.EEXIST,
            f"{path} already exists; promptvit writes a single output file only to a new name (it never "
            "replaces a file it did not write): give another --out or delete it first",
        )
    return path


def _linked_folder(path: Path) -> Path | None:
    """A symbolic link among the folders between ``path`` and the promptvit folder that holds it."""
    between = []
    for parent in path.parents:
        if (parent / OUTPUT_MARKER).is_file() or (parent / LOCK_FILE).is_file():
            return next((p for p in between if p.is_symlink()), None)
        between.append(parent)
    return None  # not in a promptvit folder: the path is the user's to choose


def check_output_path(path: str | Path, *, protected: Iterable[str | Path] = ()) -> Path:
    """``path`` if it may be written: a regular file or a new name, not a link, not inside ``protected``.

    ``protected`` lists the files and folders the command reads or owns; writing into them would destroy
    the inputs (``predict ART img.png --out ART/adapter_config.json``).
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_symlink() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, FIFO or socket)"
        raise OutputError(
            errno.EEXIST, f"cannot write {path}: it is {kind}; give the path of a new or regular file"
        )
    _refuse_hazards(path, protected, "file")
    link = _linked_folder(path)
    if link is not None:
        raise OutputError(
            errno.EEXIST,
            f"cannot write {path}: {link} is a symbolic link (to {os.readlink(link)}) inside a promptvit "
            "folder; promptvit never follows a link it did not create, remove the link",
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
        raise output_error(path, error) from error
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
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise output_error(path, error) from error
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
        raise output_error(folder, error) from error
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
