"""Merge a YAML config with command-line overrides such as ``--method.prompt-length 100``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from promptvit.io import read_yaml_mapping


def _config_error(message: str) -> Exception:
    # Imported here: promptvit.methods imports torch, which `promptvit --help` should not wait for.
    from promptvit.methods.base import ConfigError

    return ConfigError(message)

# Fields of BackboneSpec / MethodSpec themselves; any other key under those sections is a build/method option.
_SECTION_FIELDS = {
    "backbone": {"name", "pretrained", "weights", "options", "mean", "std", "allow_pickle", "image_size"},
    "method": {"name", "options"},
}


def read_yaml(path: str | Path) -> dict[str, Any]:
    from promptvit.methods.base import ConfigError

    return read_yaml_mapping(
        path, name="config file", holds="sections backbone, method, data, train", error=ConfigError
    )


def parse_extra_args(args: list[str]) -> dict[str, Any]:
    """``['--train.lr', '0.01', '--method.deep=false']`` -> ``{'train.lr': 0.01, 'method.deep': False}``."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise _config_error(f"unexpected argument {arg!r}; overrides look like --section.option VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise _config_error(f"override {arg} needs a value")
            value = args[i + 1]
            i += 1
        overrides[key.replace("-", "_")] = yaml.safe_load(value)
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
                raise _config_error(f"cannot set {dotted}: '{part}' is not a section")
        node[parts[-1]] = value
    return config
