"""Small graph queries shared by the fusion passes: scalars, pass-through ops, clean-up."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value, node_dtype
from graphopt.ir.op_args import argument
from graphopt.ir.ops import ALIAS_OPS, COPY_OPS, DROPOUT_OPS
from graphopt.passes.cleanup import is_pure

aten = torch.ops.aten

__all__ = [
    "add_operands",
    "erase_dead",
    "is_call",
    "normalize_dims",
    "scalar_value",
    "strip_passthrough",
]


def is_call(node: Any, *targets: Any) -> bool:
    """True when ``node`` is a ``call_function`` node calling one of ``targets``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def scalar_value(gm: fx.GraphModule, value: Any) -> float | None:
    """The number behind ``value``: a Python number, a 0-d constant tensor, or ``full([], c)``; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, fx.Node):
        return None
    if is_call(value, aten.full.default) and list(value.args[0]) == []:
        return scalar_value(gm, value.args[1])
    if is_call(value, aten.scalar_tensor.default):
        return scalar_value(gm, value.args[0])
    if is_call(value, aten.lift_fresh_copy.default, aten.clone.default, aten.detach.default):
        return scalar_value(gm, value.args[0])
    tensor = attribute_value(gm, value)
    if tensor is not None and tensor.numel() == 1 and tensor.dim() == 0 and tensor.is_floating_point() is not None:
        return float(tensor.item())
    return None


def add_operands(node: fx.Node) -> tuple[Any, Any] | None:
    """``(a, b)`` for ``add(a, b)`` with ``alpha`` 1 (``sub(a, b)`` is not an add); None otherwise."""
    if not is_call(node, aten.add.Tensor, aten.add.Scalar):
        return None
    alpha = argument(node, "alpha", 1)
    if alpha != 1:
        return None
    return node.args[0], node.args[1]


def strip_passthrough(node: Any) -> Any:
    """Follow ops that return their input's values unchanged (eval dropout, same-dtype casts, copies)."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        target, args = node.target, node.args
        if target in DROPOUT_OPS and (argument(node, "train") is False or argument(node, "p") == 0):
            node = args[0]
        elif target in COPY_OPS or target in ALIAS_OPS:
            node = args[0]
        elif target in (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default):
            source = args[0]
            if node_dtype(source) is None or node_dtype(source) != node_dtype(node):
                return node
            node = source
        else:
            return node
    return node


def normalize_dims(dims: Any, rank: int) -> tuple[int, ...] | None:
    """Reduction dims made non-negative and sorted, or None when they are not plain ints."""
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None
    return tuple(sorted(d % rank for d in dims))


def erase_dead(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """Erase the pure nodes among ``nodes`` that nothing uses any more (repeatedly); returns them."""
    pending = {n for n in nodes if n.op == "call_function" or n.op == "get_attr"}
    erased: set[fx.Node] = set()
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            if node.users or not (node.op == "get_attr" or is_pure(node) or node.target is operator.getitem):
                continue
            pending.discard(node)
            gm.graph.erase_node(node)
            erased.add(node)
            changed = True
    return erased


def close_to(value: float | None, expected: float, rel: float) -> bool:
    """``value`` is within relative ``rel`` of ``expected``."""
    return value is not None and math.isclose(value, expected, rel_tol=rel, abs_tol=0.0)

