"""Geometry: what methods need to know about a backbone, independent of its weights."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What methods need to know about a backbone, independent of its weights.

    For ViTs ``depth`` counts transformer blocks; for CNNs it counts stages.
    """

    kind: str  # "vit" or "cnn"
    architecture: str
    embed_dim: int  # ViT width; CNN feature width before the head
    depth: int
    num_heads: int = 0
    num_prefix_tokens: int = 0
    num_patches: int = 0
    img_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    mlp_hidden: int = 0
    qkv_bias: bool = True
    global_pool: str = ""
    dynamic_img_size: bool = False
    class_token: bool = True
    pos_embed_len: int = 0  # rows of the learned position embedding (CLS row included unless no_embed_class)

    @property
    def num_tokens(self) -> int:
        """Tokens a ViT block sees without prompts: prefix (CLS, registers) plus patches."""
        return self.num_prefix_tokens + self.num_patches

    def vit_block_parameters(self) -> int:
        """Parameters of one standard pre-norm timm ViT block (two LayerNorms, qkv, proj, two-layer MLP)."""
        d, h = self.embed_dim, self.mlp_hidden
        return 4 * d + 3 * d * d + (3 * d if self.qkv_bias else 0) + d * d + d + d * h + h + h * d + d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        """The geometry a dict records (an artifact's ``geometry``); ``ValueError`` names a missing, unknown or
        mistyped field."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown geometry field(s) {unknown}")
        values = {}
        for name, field in fields.items():
            if name not in data:
                if field.default is dataclasses.MISSING:
                    raise ValueError(f"geometry field '{name}' is missing")
                continue
            value = data[name]
            if field.type == "tuple[int, int]":
                if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value)):
                    raise ValueError(f"geometry {name} must be two integers, got {value!r}")
                value = tuple(value)
            elif not (_is_int(value) if field.type == "int" else isinstance(value, {"str": str, "bool": bool}[field.type])):
                raise ValueError(f"geometry {name} must be of type {field.type}, got {value!r}")
            values[name] = value
        return cls(**values)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
