"""Data errors and warnings; ``DataError`` and ``DataWarning`` are defined in ``promptvit.errors`` with the library's other exceptions."""

from __future__ import annotations

from promptvit.errors import DataError, DataWarning

__all__ = ["DataError", "DataWarning"]
