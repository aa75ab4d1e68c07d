"""Clean-up passes: dead code, common subexpressions, dropout and identity ops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir import node_dtype, node_shape, prune_unused_attributes
from graphopt.pass_infra import Pass, PassResult, register_pass

aten = torch.ops.aten

__all__ = ["CommonSubexpressionElimination", "DeadCodeElimination", "RemoveDropout", "RemoveIdentity"]


def is_pure(node: fx.Node) -> bool:
    """True when ``node`` may be removed or merged: no side effects, no mutation, no randomness."""
    if node.op != "call_function" or node.is_impure():
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
            return False
    return True


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
        merged = 0
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
            node.replace_all_uses_with(first)
            canonical[node] = first
            gm.graph.erase_node(node)
            merged += 1
        return PassResult(changed=merged > 0, stats={"merged": merged})


_DROPOUTS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default)


@register_pass
@dataclass(frozen=True)
class RemoveDropout(Pass):
    """Drop inference-mode dropout: with ``train=False`` it returns its input unchanged."""

    name = "remove-dropout"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Replace every non-training dropout by its input."""
        removed = 0
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in _DROPOUTS:
                training = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
                if training is False:
                    node.replace_all_uses_with(node.args[0])
                    gm.graph.erase_node(node)
                    removed += 1
        return PassResult(changed=removed > 0, stats={"removed": removed})


_ALWAYS_IDENTITY = (aten.alias.default, aten.detach.default, aten.contiguous.default, aten.lift_fresh_copy.default)
_SAME_SHAPE_IDENTITY = (aten.view.default, aten.reshape.default, aten.expand.default, aten._unsafe_view.default)
_SCALAR_IDENTITY = {
    aten.mul.Tensor: 1, aten.mul.Scalar: 1, aten.div.Tensor: 1, aten.div.Scalar: 1,
    aten.add.Tensor: 0, aten.add.Scalar: 0, aten.sub.Tensor: 0, aten.sub.Scalar: 0,
}
_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default)


def _graph_mutates(gm: fx.GraphModule) -> bool:
    return any(
        isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
        for n in gm.graph.nodes
        if n.op == "call_function"
    )


def _identity_input(node: fx.Node, allow_copies: bool) -> fx.Node | None:
    """The node ``node`` merely passes through, or None when it does real work."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source = node.args[0]
    same_shape = node_shape(node) is not None and node_shape(node) == node_shape(source)
    same_dtype = node_dtype(node) is not None and node_dtype(node) == node_dtype(source)
    target = node.target
    if target in _ALWAYS_IDENTITY and same_shape and same_dtype:
        return source
    if target is aten.clone.default and allow_copies and same_shape and "memory_format" not in node.kwargs:
        return source
    if target in _SAME_SHAPE_IDENTITY and same_shape and same_dtype:
        return source
    if target in _CASTS and same_shape and same_dtype and allow_copies:
        device = node.kwargs.get("device")
        if device is None or getattr(source.meta.get("val"), "device", None) == torch.device(device):
            return source
    if target in _SCALAR_IDENTITY and len(node.args) == 2 and same_shape and same_dtype:
        other = node.args[1]
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == _SCALAR_IDENTITY[target]:
            if "alpha" not in node.kwargs or node.kwargs["alpha"] == 1:
                return source
    return None


@register_pass
@dataclass(frozen=True)
class RemoveIdentity(Pass):
    """Remove ops that return their input unchanged: no-op reshapes and casts, ``x * 1``, ``x + 0``...

    Export's ``_assert_tensor_metadata`` checks go too: every node's dtype is fixed at capture.

    Copies (``clone``, same-dtype casts) are only dropped when no op in the graph mutates a
    tensor in place, since a mutation could then reach the original.
    """

    name = "remove-identity"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Replace each identity op by its input."""
        allow_copies = not _graph_mutates(gm)
        removed = 0
        for node in list(gm.graph.nodes):
            if node.target is aten._assert_tensor_metadata.default and not node.users:
                gm.graph.erase_node(node)  # export's dtype check: the captured graph is typed already
                removed += 1
                continue
            source = _identity_input(node, allow_copies)
            if source is None:
                continue
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            removed += 1
        return PassResult(changed=removed > 0, stats={"removed": removed})
