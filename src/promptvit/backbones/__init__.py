"""timm backbones: creation and weights (``creation``), the adapter interface (``base``), one module per family.

Importing this package registers every built-in family adapter. Public names are re-exported here.
"""

from torch import nn

from promptvit.backbones import (  # noqa: F401  (registration)
    beit,
    cnn,
    distilled,
    eva,
    generic,
    hierarchical,
    maxxvit,
    naflexvit,
    relpos,
    sam,
    swin,
    swin_v2,
    vit,
)
from promptvit.backbones.base import (
    NORM_LAYERS,
    AttentionParts,
    BackboneAdapter,
    BackboneError,
    PartsFromCall,
    TimmTokenAdapter,
    adapter_class_for,
    adapter_for,
    all_rows,
    attend,
    build_structure,
    classifier_name,
    register_adapter,
    registered_adapters,
    sdpa_core,
    unregister_adapter,
    unwrap_base_layers,
)
from promptvit.backbones.creation import (
    body_parameters,
    create_backbone,
    load_weights,
    weights_fingerprint,
)
from promptvit.backbones.geometry import Geometry
from promptvit.backbones.source import (
    backbone_source,
    base_model_call,
    find_weights_file,
    origin_of,
    rebuild_backbone,
    rebuild_problem,
)


def is_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a token model (its adapter's kind is ``"vit"``)."""
    adapter = adapter_class_for(model)
    return adapter is not None and adapter.kind == "vit"


def geometry_of(model: nn.Module) -> Geometry:
    """Describe a supported timm model (BackboneError for other classes)."""
    return adapter_for(model).geometry()


def cnn_stages(model: nn.Module) -> list[nn.Module]:
    """The stages of a timm CNN: ResNet ``layer1..4`` or EfficientNet-style ``blocks``."""
    return adapter_for(model).stages


def set_classifier(model: nn.Module, module: nn.Module) -> None:
    """Replace the classifier module in place."""
    adapter_for(model).set_classifier(module)


__all__ = [
    "NORM_LAYERS",
    "AttentionParts",
    "PartsFromCall",
    "BackboneAdapter",
    "TimmTokenAdapter",
    "BackboneError",
    "Geometry",
    "adapter_class_for",
    "adapter_for",
    "all_rows",
    "attend",
    "backbone_source",
    "base_model_call",
    "body_parameters",
    "build_structure",
    "classifier_name",
    "cnn_stages",
    "create_backbone",
    "find_weights_file",
    "geometry_of",
    "is_vit",
    "load_weights",
    "origin_of",
    "rebuild_backbone",
    "rebuild_problem",
    "register_adapter",
    "registered_adapters",
    "unregister_adapter",
    "sdpa_core",
    "set_classifier",
    "unwrap_base_layers",
    "weights_fingerprint",
]
