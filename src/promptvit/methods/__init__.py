"""Tuning methods. Importing this package registers every built-in method."""

from promptvit.methods import (  # noqa: F401  (registration)
    adapter,
    ap,
    bias,
    da_vpt,
    ept,
    full,
    linear,
    lora,
    mlp,
    norm,
    partial,
    spt,
    vp,
    vpt,
)
from promptvit.methods.base import (
    ConfigError,
    Method,
    MethodConfig,
    PeftForm,
    TunerLayer,
    available_methods,
    baseline_method,
    get_method,
    methods_in_table_order,
    register_method,
)

__all__ = [
    "ConfigError",
    "Method",
    "MethodConfig",
    "PeftForm",
    "TunerLayer",
    "available_methods",
    "baseline_method",
    "get_method",
    "methods_in_table_order",
    "register_method",
]
