"""The one exception type for mistakes in user-supplied data."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the user's data files (missing, malformed, inconsistent).

    Subclassing ``ValueError`` lets callers that only know the standard library still catch it,
    while the CLI can catch exactly this type and print the message without a traceback: every
    message names the file (and line, where there is one) and says how to fix it.
    """


class DataWarning(UserWarning):
    """Data that is usable but suspicious (labels only in evaluation splits, singleton classes,
    near-duplicate numeric labels); the message names the file and what to check."""
