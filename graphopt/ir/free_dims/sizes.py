"""What freeing dims replaces in a graph, and how a replacement is built: shared by propagation and rewrite."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch.utils._sympy.functions import FloorDiv

from graphopt.errors import InputError

__all__ = ["GraphOps", "Size", "Sliced", "TensorOps", "apply_cuts", "build", "has_size"]

aten = torch.ops.aten


class Size:
    """A literal size replaced by an expression of the freed dims."""

    def __init__(self, expr: sympy.Expr) -> None:
        self.expr = expr

    def __repr__(self) -> str:
        return f"Size({self.expr})"


class Sliced:
    """A constant operand fitted to freed dims.

    Per dim: ``"uniform"`` (cut to 1, it broadcasts), ``"expand"`` (cut to 1 and expanded to the freed
    size), ``"arange"`` (rebuilt as a count up to the freed size) or ``"prefix"`` (cut to the freed
    size: valid up to the example's).
    """

    def __init__(self, node: fx.Node, cuts: list[tuple[int, str, sympy.Expr]], value: torch.Tensor) -> None:
        self.node = node
        self.cuts = cuts
        self.value = value  # the constant's real value



class TensorOps:
    """Tensor operations for ``apply_cuts`` on (fake) tensors."""

    slice = staticmethod(aten.slice.Tensor)
    clone = staticmethod(aten.clone.default)
    expand = staticmethod(aten.expand.default)
    add = staticmethod(aten.add.Tensor)
    view = staticmethod(aten.view.default)
    arange = staticmethod(aten.arange.default)


class GraphOps:
    """The same operations, as nodes appended to a graph."""

    def __init__(self, graph: fx.Graph) -> None:
        for name, op in (("slice", aten.slice.Tensor), ("clone", aten.clone.default), ("expand", aten.expand.default),
                         ("add", aten.add.Tensor), ("view", aten.view.default)):
            setattr(self, name, functools.partial(self._call, op))
        self.graph = graph

    def _call(self, op: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(op, args, kwargs)

    def arange(self, end: Any, **kwargs: Any) -> fx.Node:
        """An ``arange(end)`` node."""
        return self.graph.call_function(aten.arange.default, (end,), kwargs)


def apply_cuts(value: Any, cuts: list[tuple[int, str, sympy.Expr]], size: Callable[[sympy.Expr], Any],
                ops: Any, like: torch.Tensor) -> Any:
    """Fit a constant (a tensor, or a graph node with ``ops`` building nodes) to freed sizes, dim by dim.

    ``like`` is the constant itself (for its rank and dtype).
    """
    for dim, kind, expr in cuts:
        if kind == "uniform":
            value = ops.slice(value, dim, 0, 1)
        elif kind == "expand":
            value = ops.expand(ops.slice(value, dim, 0, 1), [size(expr) if d == dim else -1 for d in range(like.dim())])
        elif kind == "prefix":
            end = size(expr)
            if isinstance(end, torch.SymInt):  # propagating: the freed size stays within the table
                torch._check(end <= like.shape[dim])
            # a copy: a view keeps the table's strides, and strides that equal the freed size's example
            # value would fix it to that value in the next layout check
            value = ops.clone(ops.slice(value, dim, 0, end), memory_format=torch.contiguous_format)
        else:
            steps = ops.view(ops.arange(size(expr), dtype=like.dtype),
                             [-1 if d == dim else 1 for d in range(like.dim())])
            value = ops.add(ops.slice(value, dim, 0, 1), steps)
    return value



def build(expr: sympy.Expr, leaf: Callable[[sympy.Symbol], Any], mul: Callable[[Any, Any], Any],
           add: Callable[[Any, Any], Any], floordiv: Callable[[Any, Any], Any]) -> Any:
    """Evaluate a size expression with ``leaf`` for its symbols and the given operations."""
    if isinstance(expr, sympy.Integer):
        return int(expr)
    if isinstance(expr, sympy.Symbol):
        return leaf(expr)
    parts = [build(a, leaf, mul, add, floordiv) for a in expr.args]
    if isinstance(expr, sympy.Mul):
        combine = mul
    elif isinstance(expr, sympy.Add):
        combine = add
    elif isinstance(expr, FloorDiv):
        return floordiv(parts[0], parts[1])
    elif isinstance(expr, sympy.Pow) and isinstance(expr.args[1], sympy.Integer) and int(expr.args[1]) > 0:
        parts = [parts[0]] * int(expr.args[1])
        combine = mul
    else:
        raise InputError(f"free_dims: a size {expr} has a form that cannot be rebuilt; optimize with dynamic shapes "
                         "declared instead")
    # constants first, so that the nodes read ``sym_size * 12``, not ``12 * sym_size``
    parts.sort(key=lambda p: isinstance(p, int))
    result = parts[0]
    for part in parts[1:]:
        result = combine(result, part)
    return result



def has_size(value: Any) -> bool:
    """Whether an argument holds a replacement (a freed size or a fitted constant), at any depth."""
    if isinstance(value, (Size, Sliced)):
        return True
    if isinstance(value, (list, tuple)):
        return any(has_size(v) for v in value)
    return False

