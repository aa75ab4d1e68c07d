"""Constant folding: compute ahead of time every op whose inputs are all constants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value, prune_unused_attributes, register_constant
from graphopt.passes.base import Pass, PassResult, register_pass
from graphopt.passes.cleanup import is_pure

__all__ = ["ConstantFolding"]


def _materialize(value: Any, constants: dict[fx.Node, Any]) -> Any:
    if isinstance(value, fx.Node):
        return constants[value]
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(v, constants) for v in value)
    if isinstance(value, dict):
        return {k: _materialize(v, constants) for k, v in value.items()}
    return value


def _numel(value: Any) -> int:
    return value.numel() if isinstance(value, torch.Tensor) else 0


@register_pass
@dataclass(frozen=True)
class ConstantFolding(Pass):
    """Replace constant subgraphs (weights transposed, ``arange``, masks...) by stored tensors.

    A result larger than ``max(its inputs, min_growth_elements)`` is not stored, so folding
    never blows an ``expand`` of a weight up into a large buffer.
    """

    name = "constant-folding"
    min_growth_elements: int = 1 << 16

    def _worth_storing(self, node: fx.Node, constants: dict[fx.Node, Any]) -> bool:
        """True for a computed constant that a non-constant node reads, and that is not too large."""
        value = constants[node]
        if node.op == "get_attr" or not isinstance(value, torch.Tensor):
            return False
        if all(user in constants for user in node.users):
            return False  # an outer constant will absorb it
        inputs = sum(_numel(constants[arg]) for arg in node.all_input_nodes)
        return value.numel() <= max(inputs, self.min_growth_elements)

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Evaluate constant nodes and swap the outermost ones for new buffers."""
        constants: dict[fx.Node, Any] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                value = attribute_value(gm, node)
                if value is not None:
                    constants[node] = value
            elif is_pure(node) and all(arg in constants for arg in node.all_input_nodes):
                try:
                    with torch.no_grad():
                        args = _materialize(node.args, constants)
                        kwargs = _materialize(node.kwargs, constants)
                        constants[node] = node.target(*args, **kwargs)
                except Exception:
                    continue
        frontier = [node for node in constants if self._worth_storing(node, constants)]
        for node in frontier:
            replacement = register_constant(gm, node.name, constants[node].clone(), before=node)
            node.replace_all_uses_with(replacement)
        folded = len(frontier)
        removed = 0
        for node in reversed(list(gm.graph.nodes)):
            if node in constants and node.op != "get_attr" and not node.users and is_pure(node):
                gm.graph.erase_node(node)
                removed += 1
        if folded:
            prune_unused_attributes(gm)
        return PassResult(changed=folded > 0 or removed > 0, stats={"folded": folded, "removed": removed})
