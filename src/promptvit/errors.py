"""The library's exceptions: one base, ``PromptvitError``, and one subclass per kind of user mistake.

Every message names the file or option at fault and the fix, so the CLI prints it as one line without a
traceback by catching ``PromptvitError`` alone. Each subclass also keeps the standard-library base it
always had (``ValueError``, ``RuntimeError``, ``OSError``), so callers that catch those still work.
This module is the bottom of the import graph: it imports nothing from promptvit.
"""

from __future__ import annotations

from collections.abc import Iterable


def listed(items: Iterable[object], shown: int = 3) -> str:
    """``a, b, c and 4 more``: a list named in a one-line message."""
    names = [str(item) for item in items]
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


class PromptvitError(Exception):
    """Base of every error promptvit raises for something the user can fix."""


class ConfigError(PromptvitError, ValueError):
    """A method or run option is unknown or has the wrong type or value."""


class CacheError(ConfigError):
    """Prefix caching cannot be used as asked (random transforms, unsupported dataset, bad cache file)."""


class BackboneError(PromptvitError, ValueError):
    """A backbone cannot be built, loaded or matched."""


class DataError(PromptvitError, ValueError):
    """A problem with the user's data files (missing, malformed, inconsistent).

    Every message names the file (and line, where there is one) and says how to fix it.
    """


class ArtifactError(PromptvitError, ValueError):
    """An artifact is missing, unreadable, or does not fit the backbone it is loaded on."""


class HubError(ArtifactError):
    """The Hugging Face Hub cannot be reached, refuses access, or holds no such repository (nor does the cache)."""


class OutputError(PromptvitError, OSError):
    """An output file or folder cannot be written (full disk, read-only folder, another writer)."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return self.strerror if self.strerror else super().__str__()


class TrainingError(PromptvitError, RuntimeError):
    """Training cannot go on (non-finite loss or parameters); the last good checkpoint is kept."""


class ResumeError(TrainingError):
    """The checkpoint in the run folder does not belong to this run (other setup) or is unreadable."""


class ProtocolError(PromptvitError, ValueError):
    """A protocol, sweep or results-store problem the user can fix (bad option, missing data, bad YAML)."""


class DataWarning(UserWarning):
    """Data that is usable but suspicious (labels only in evaluation splits, singleton classes,
    near-duplicate numeric labels); the message names the file and what to check."""


class ExportError(PromptvitError, ValueError):
    """A model cannot be exported in the requested format, or the exported model computes other logits."""
