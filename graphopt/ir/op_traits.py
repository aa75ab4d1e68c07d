"""What graph analyses may assume about ops they have no rule for: graphopt's own fused ops declare it here.

Analyses (the dependency graph of prunable dims, freeing a static graph's dims) have rules for
ATen ops. A custom op (a fused kernel graphopt's passes insert) declares its shape behaviour with
``register_broadcasting``: its tensor operands broadcast against each other like a pointwise
op's, except for trailing dims it mixes within (rotary embeddings pair the two halves of the head
dim), which must keep their size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Broadcasting", "broadcasting", "register_broadcasting"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Broadcasting:
    """A broadcasting op: ``mixed_last_dims`` trailing dims are mixed within (``reason`` says how)."""

    mixed_last_dims: int = 0
    reason: str = ""


# ATen ops torch does not tag pointwise that broadcast like one
_REGISTERED: dict[Any, Broadcasting] = {
    aten.__and__.Tensor: Broadcasting(), aten.__or__.Tensor: Broadcasting(), aten.__xor__.Tensor: Broadcasting(),
}


def register_broadcasting(op: Any, mixed_last_dims: int = 0, reason: str = "") -> Any:
    """Declare that ``op``'s tensor operands broadcast like a pointwise op's; returns ``op``.

    ``mixed_last_dims``: how many trailing dims the op mixes within (they may not shrink),
    ``reason`` says why, for the reports that name what blocked pruning.
    """
    _REGISTERED[op] = Broadcasting(mixed_last_dims, reason)
    return op


def broadcasting(op: Any) -> Broadcasting | None:
    """How ``op`` broadcasts: pointwise-tagged ATen ops and registered ones; None otherwise."""
    if op in _REGISTERED:
        return _REGISTERED[op]
    if torch.Tag.pointwise in getattr(op, "tags", ()):
        return Broadcasting()
    return None
