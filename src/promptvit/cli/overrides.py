"""Merge a YAML config with command-line overrides such as ``--method.prompt-length 100``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from promptvit.errors import ConfigError
from promptvit.io import load_yaml_strict, read_yaml_mapping

# Fields of BackboneSpec / MethodSpec themselves; any other key under those sections is a build/method option.
_SECTION_FIELDS = {
    "backbone": {"name", "pretrained", "weights", "options", "mean", "std", "allow_pickle", "image_size"},
    "method": {"name", "options"},
}


def read_yaml(path: str | Path) -> dict[str, Any]:
    from promptvit.methods.base import ConfigError

    return read_yaml_mapping(
        path, name="config file", holds="sections backbone, method, data, train, evaluation", error=ConfigError
    )


def parse_extra_args(args: list[str]) -> dict[str, Any]:
    """``['--train.lr', '0.01', '--method.deep=false']`` -> ``{'train.lr': 0.01, 'method.deep': False}``."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.option VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override {arg} needs a value")
            value = args[i + 1]
            i += 1
        overrides[key.replace("-", "_")] = load_yaml_strict(value)
        i += 1
    return overrides


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys; method/backbone keys that are not spec fields go into their ``options``."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        parts = dotted.split(".")
        section = parts[0]
        if section in _SECTION_FIELDS and len(parts) == 2 and parts[1] not in _SECTION_FIELDS[section]:
            parts = [section, "options", parts[1]]
        node = config
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {dotted}: '{part}' is not a section")
        node[parts[-1]] = value
    return config


def switch_method(config: dict[str, Any], method: str | None) -> list[str]:
    """Give ``config`` the method ``method`` (from ``--method``); the options of another method are dropped.

    Options belong to the method they were written for (``prompt_length`` means nothing to ``linear``), so
    ``-c vpt.yaml --method linear`` trains linear with its defaults. Returns the dropped option names.
    """
    section = config.get("method")
    if method is None or not isinstance(section, dict) or section.get("name", "linear") == method:
        return []
    dropped = sorted(section.get("options") or {})
    config["method"] = {"name": method}
    return dropped
