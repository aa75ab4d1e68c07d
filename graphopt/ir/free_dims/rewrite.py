"""Writing the decisions of a propagation into a copy of the graph: ``sym_size`` nodes and the arithmetic on them."""

from __future__ import annotations

import operator
from typing import Any

import sympy
import torch
import torch.fx as fx

from graphopt.ir.free_dims.sizes import GraphOps, Size, Sliced, apply_cuts, build, has_size
from graphopt.ir.graph import snapshot_graph_module

__all__ = ["rewrite"]

aten = torch.ops.aten


def rewrite(gm: fx.GraphModule, placeholders: list[fx.Node],
             decisions: dict[str, tuple[tuple[Any, ...], dict[str, Any]]],
             symbols: dict[str, sympy.Symbol], sources: dict[sympy.Symbol, tuple[int, int]]) -> fx.GraphModule:
    """A copy of ``gm`` (sharing its weights) with ``decisions`` (node name -> new args, kwargs) written in.

    Each freed size is read once with ``sym_size`` from the input ``sources`` names; the expressions
    on them become ``operator`` nodes before their first user, and fitted constants slice nodes.
    """
    copy = snapshot_graph_module(gm)
    nodes = {n.name: n for n in copy.graph.nodes}
    copy_placeholders = [nodes[p.name] for p in placeholders]
    sizes: dict[sympy.Symbol, fx.Node] = {}
    with copy.graph.inserting_after(copy_placeholders[-1]):
        for symbol in reversed(list(symbols.values()) if decisions else []):
            index, dim = sources[symbol]
            sizes[symbol] = copy.graph.call_function(aten.sym_size.int, (copy_placeholders[index], dim))
    built: dict[sympy.Expr, Any] = {}

    def node_for(expr: sympy.Expr, before: fx.Node) -> Any:
        if expr not in built:
            with copy.graph.inserting_before(before):
                built[expr] = build(
                    expr, sizes.__getitem__,
                    lambda a, b: copy.graph.call_function(operator.mul, (a, b)),
                    lambda a, b: copy.graph.call_function(operator.add, (a, b)),
                    lambda a, b: copy.graph.call_function(operator.floordiv, (a, b)))
        return built[expr]

    def to_graph(value: Any, original: Any, before: fx.Node) -> Any:
        """The copy's argument: ``value``'s replacements built as nodes, everything else ``original``."""
        if isinstance(value, Sliced):
            with copy.graph.inserting_before(before):
                return apply_cuts(original, value.cuts, lambda e: node_for(e, before),
                                   GraphOps(copy.graph), value.value)
        if isinstance(value, Size):
            return node_for(value.expr, before)
        if isinstance(value, (list, tuple)) and has_size(value):
            return type(original)(to_graph(v, o, before) for v, o in zip(value, original, strict=True))
        return original

    for name, (args, kwargs) in decisions.items():
        node = nodes[name]
        node.args = tuple(to_graph(a, o, node) for a, o in zip(args, node.args, strict=True))
        node.kwargs = {k: to_graph(v, node.kwargs[k], node) for k, v in kwargs.items()}
    copy.graph.lint()
    copy.recompile()
    # torch.export's unlifted modules check calls against the exported (static) sizes: not any more
    for key, hook in list(copy._forward_pre_hooks.items()):
        if "input_constraints" in getattr(hook, "__name__", ""):
            del copy._forward_pre_hooks[key]
    return copy

