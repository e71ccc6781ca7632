"""Token-axis helpers for blocks that compute only some output rows.

A block whose output rows are partly discarded next (prompt outputs that the next block replaces, or every
row but the class token at the last block when the head reads only that) computes just the kept rows:
every token still serves as key and value, only the kept rows are queries and go through the MLP. The
family adapter does the computation (``BackboneAdapter.forward_block_rows``); these functions say which
rows are kept.
"""

from __future__ import annotations

import torch


def class_token_row(tokens: torch.Tensor) -> torch.Tensor:
    """Row 0 of the token axis (-2), kept as a length-1 axis: what timm's ``'token'`` pool reads."""
    return tokens[..., :1, :]


def drop_token_range(tokens: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Remove tokens ``start .. start + count - 1`` from the token axis (-2) of (..., tokens, dim)."""
    return torch.cat([tokens[..., :start, :], tokens[..., start + count :, :]], dim=-2)
