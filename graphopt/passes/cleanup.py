"""Clean-up passes: dead code, common subexpressions, dropout and identity ops."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.analysis.aliasing import REWRITABLE_VIEWS, CopyAnalysis
from graphopt.ir.graph import (
    draws_random_numbers,
    is_mutating,
    node_dtype,
    node_shape,
    prune_unused_attributes,
)
from graphopt.ir.op_args import given_argument
from graphopt.ir.ops import ALIAS_OPS, DROPOUT_OPS, RESHAPE_OPS
from graphopt.passes.base import NodeRewrite, Pass, PassResult, register_pass

aten = torch.ops.aten

__all__ = ["CommonSubexpressionElimination", "DeadCodeElimination", "RemoveDropout", "RemoveIdentity"]


def is_pure(node: fx.Node) -> bool:
    """True when ``node`` may be removed or merged: no side effects, no mutation, no randomness."""
    if node.op != "call_function" or node.is_impure():
        return False
    return not is_mutating(node) and not draws_random_numbers(node)


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove nodes whose results nobody uses, and the weights no node reads any more."""

    name = "dce"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Erase unused pure nodes (last to first), then unused attributes."""
        removed = 0
        for node in reversed(list(gm.graph.nodes)):
            if not node.users and is_pure(node):
                gm.graph.erase_node(node)
                removed += 1
        attributes = prune_unused_attributes(gm)
        return PassResult(changed=bool(removed or attributes), stats={"nodes": removed, "weights": attributes})


def _key(node: fx.Node, canonical: dict[fx.Node, fx.Node]) -> Any:
    def freeze(value: Any) -> Any:
        if isinstance(value, fx.Node):
            return ("node", canonical.get(value, value))
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(freeze(v) for v in value))
        if isinstance(value, dict):
            return ("dict", tuple(sorted((k, freeze(v)) for k, v in value.items())))
        if isinstance(value, torch.Tensor):
            return ("tensor", id(value))
        return (type(value).__name__, value)

    return (node.op, node.target, freeze(node.args), freeze(node.kwargs))


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Merge nodes that compute the same pure op on the same inputs (and duplicate weight reads)."""

    name = "cse"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Keep the first of each set of identical nodes and point users of the rest at it."""
        seen: dict[Any, fx.Node] = {}
        canonical: dict[fx.Node, fx.Node] = {}
        merged, kept_apart = 0, 0
        for node in list(gm.graph.nodes):
            if node.op != "get_attr" and not is_pure(node):
                continue
            try:
                key = _key(node, canonical)
                hash(key)
            except TypeError:
                continue
            first = seen.setdefault(key, node)
            if first is node:
                continue
            if _is_returned(node) and _is_returned(first) and node.op != "get_attr":
                kept_apart += 1  # eager returns two tensors: merged, writing into one would change the other
                continue
            node.replace_all_uses_with(first)
            canonical[node] = first
            gm.graph.erase_node(node)
            merged += 1
        misses = {self.name: {"both results are returned as separate outputs": kept_apart}} if kept_apart else {}
        return PassResult(changed=merged > 0, stats={"merged": merged}, near_misses=misses)


def _is_returned(node: fx.Node) -> bool:
    return any(user.op == "output" for user in node.users)


@register_pass
@dataclass(frozen=True)
class RemoveDropout(NodeRewrite):
    """Drop inference-mode dropout: with ``train=False`` it returns its input unchanged."""

    name = "remove-dropout"
    stat = "removed"

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """Replace a non-training dropout by its input."""
        if node.op != "call_function" or node.target not in DROPOUT_OPS or given_argument(node, "train") is not False:
            return False
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        return True


# --- identity removal -------------------------------------------------------------------------
#
# An identity op is either an *alias* of its input (``alias``, ``detach``, a same-shape view, a
# no-op ``to``), which may always go, or a *copy* with the same values (``contiguous``, ``clone``,
# ``lift_fresh_copy``, a same-dtype/device ``_to_copy``, ``x * 1``, ``x + 0``...). A copy is a new
# tensor, often with another layout than its input, so it may only go where nothing depends on
# that: see ``CopyAnalysis``.


_SAME_SHAPE_VIEWS = RESHAPE_OPS | {aten.expand.default}
_SCALAR_IDENTITY = {
    aten.mul.Tensor: 1, aten.mul.Scalar: 1, aten.div.Tensor: 1, aten.div.Scalar: 1,
    aten.add.Tensor: 0, aten.add.Scalar: 0, aten.sub.Tensor: 0, aten.sub.Scalar: 0,
}
_TO = (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other)
_SAME_VALUE_FORMATS = (None, torch.contiguous_format, torch.preserve_format)


def _device(node: fx.Node) -> torch.device | None:
    value = node.meta.get("val")
    return value.device if isinstance(value, torch.Tensor) else None


def _same_device(node: fx.Node, source: fx.Node, requested: Any) -> bool:
    mine, theirs = _device(node), _device(source)
    if mine is not None and theirs is not None:
        return mine == theirs
    return requested is None


def _copy_kind(memory_format: Any) -> str:
    return "copy" if memory_format in _SAME_VALUE_FORMATS else "format"


def _identity(node: fx.Node) -> tuple[str, fx.Node] | None:
    """How ``node`` passes its input through: ``(kind, input)``, or None when it does real work.

    ``kind`` is ``"alias"`` (returns its input or a same-layout view of it: always removable),
    ``"copy"`` (a new tensor with the same values: removable where nothing needs the copy) or
    ``"format"`` (the same values copied into another memory format: kept, on purpose).
    """
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source, target = node.args[0], node.target
    shape, dtype = node_shape(node), node_dtype(node)
    if shape is None or dtype is None or shape != node_shape(source) or dtype != node_dtype(source):
        return None
    if target in ALIAS_OPS or target in _SAME_SHAPE_VIEWS:
        return "alias", source
    if target is aten.type_as.default:
        return ("alias", source) if _same_device(node, source, None) else None
    if target is aten.lift_fresh_copy.default:
        return "copy", source
    if target in (aten.contiguous.default, aten.clone.default):
        return _copy_kind(given_argument(node, "memory_format")), source
    if target is aten._to_copy.default or target in _TO:
        layout, pinned, device = (given_argument(node, name) for name in ("layout", "pin_memory", "device"))
        if layout not in (None, torch.strided) or pinned or not _same_device(node, source, device):
            return None
        memory_format = given_argument(node, "memory_format")
        if target in _TO and not given_argument(node, "copy", False) and memory_format is None:
            return "alias", source  # Tensor.to returns self when nothing changes
        return _copy_kind(memory_format), source
    if target in _SCALAR_IDENTITY and len(node.args) == 2:
        other = node.args[1]
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == _SCALAR_IDENTITY[target]:
            if given_argument(node, "alpha", 1) == 1:
                return "copy", source
    return None


@register_pass
@dataclass(frozen=True)
class RemoveIdentity(Pass):
    """Remove ops that return their input unchanged: no-op reshapes and casts, copies, ``x * 1``, ``x + 0``...

    Aliases of the input (``alias``, ``detach``, same-shape view/reshape/expand, a ``to`` that
    changes nothing) always go. Copies (``contiguous``, ``clone``, ``lift_fresh_copy``,
    same-dtype/device ``_to_copy``/``to(copy=True)``, ``x * 1``, ``x + 0``...) go only where no
    consumer depends on their layout or identity; ``view`` consumers are rewritten to
    ``reshape``. A kept copy is a near-miss with its reason (see ``CopyAnalysis``).

    Export's ``_assert_tensor_metadata`` checks go too: every node's dtype is fixed at capture.
    """

    name = "remove-identity"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Replace each identity op by its input, rewriting the views that need it."""
        analysis = CopyAnalysis(gm)
        removed = copies = rewritten = 0
        kept: Counter[str] = Counter()
        for node in list(gm.graph.nodes):
            if node.target is aten._assert_tensor_metadata.default and not node.users:
                gm.graph.erase_node(node)  # export's dtype check: the captured graph is typed already
                removed += 1
                continue
            found = _identity(node)
            if found is None:
                continue
            kind, source = found
            if kind == "format":
                kept["copy changes the memory format"] += 1
                continue
            if kind == "copy":
                reason, views = analysis.why_keep(node, source)
                if reason is not None:
                    kept[reason] += 1
                    continue
                for view in views:
                    view.target = REWRITABLE_VIEWS[view.target]  # same node: name and meta are kept
                rewritten += len(views)
                copies += 1
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            analysis.graph_changed()
            removed += 1
        return PassResult(
            changed=bool(removed or rewritten),
            stats={"removed": removed, "copies_removed": copies, "views_rewritten": rewritten},
            near_misses={self.name: dict(kept)} if kept else {},
        )
