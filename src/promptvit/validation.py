"""Checks at the edges: values that enter promptvit from the environment or a command line are validated
where they enter, with one-line errors naming the variable or option and the fix (docs/bad-inputs.md).

Config files and ``--section.option`` values are validated by the pydantic models that read them (types,
ranges, finiteness: ``FINITE`` below); this module holds what those models and the command line share.
It imports nothing from promptvit but the errors.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import ConfigDict

from promptvit.errors import ConfigError

#: the largest seed accepted anywhere: numpy's legacy seeding and many tools stop at 2**32 - 1
MAX_SEED = 2**32 - 1

#: config models reject NaN and infinity in every float field (``--train.weight_decay .inf``)
FINITE = ConfigDict(extra="forbid", allow_inf_nan=False)


def env_int(
    name: str, *, default: int | None = None, minimum: int | None = None, maximum: int | None = None, hint: str
) -> int | None:
    """The integer in environment variable ``name`` (``default`` when unset); ``ConfigError`` naming it if the
    value is not a whole number in ``[minimum, maximum]``. ``hint`` says who sets it and how to fix it."""
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not a whole number; {hint}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"{minimum if minimum is not None else '-inf'}..{maximum if maximum is not None else 'inf'}"
        raise ConfigError(f"environment variable {name}={value} is outside {bounds}; {hint}")
    return value


def env_seconds(name: str, default: float) -> float:
    """A positive, finite number of seconds from environment variable ``name`` (``default`` when unset)."""
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ConfigError(f"environment variable {name}={text!r} must be a positive number of seconds")
    return value


def whole_number(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an int in Python, never a count or a size here)."""
    return isinstance(value, int) and not isinstance(value, bool)
