"""What every run records of where it ran: the library, torch, timm and Python versions and the git commit."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import timm
import torch

from promptvit._version import __version__


def environment() -> dict[str, str]:
    """Versions and commit recorded with every run, so results can be traced."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "promptvit": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "git_commit": commit or "unknown",
    }
