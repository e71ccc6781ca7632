"""Data errors; ``DataError`` is defined in ``promptvit.errors`` with the library's other exceptions."""

from __future__ import annotations

from promptvit.errors import DataError

__all__ = ["DataError"]
