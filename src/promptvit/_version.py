"""The library version (one place; the package root and the artifact writer read it)."""

__version__ = "0.1.0"
