"""Cache writes that export as one ``ScatterElements``: ``index_copy`` rewritten as ``scatter``.

A static key/value cache writes a step's keys with ``cache.index_copy(2, positions, keys)``.
torch.onnx writes ``index_copy`` as an ``index_put`` along the first dim, so the cache is
transposed, scattered into and transposed back: three copies of the whole cache per layer and
step. ``scatter(cache, dim, positions broadcast to keys' shape, keys)`` computes the same (the
positions of one write are distinct) and exports as one ``ScatterElements`` on ``dim``, which
onnxruntime runs in place when its output is bound to its input's buffer
(``graphopt.targets.onnx.stateful``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt.ir.meta import infer_meta
from graphopt.passes.base import Pass, PassResult

__all__ = ["IndexCopyAsScatter", "has_index_copy"]

aten = torch.ops.aten


def has_index_copy(gm: fx.GraphModule) -> bool:
    """True when ``gm`` has an ``aten.index_copy`` (a static cache's write)."""
    return bool(gm.graph.find_nodes(op="call_function", target=aten.index_copy.default))


def _rewrite(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Replace one ``index_copy(x, dim, index, source)`` by ``scatter(x, dim, index expanded, source)``."""
    x, dim, index, source = node.args
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(value, torch.Tensor) or not isinstance(dim, int):
        return False
    rank = value.dim()
    dim = dim % rank
    with gm.graph.inserting_before(node):
        shape = [1] * rank
        shape[dim] = -1
        view = gm.graph.call_function(aten.view.default, (index, shape))
        sizes = [-1 if d == dim else gm.graph.call_function(aten.sym_size.int, (source, d)) for d in range(rank)]
        expanded = gm.graph.call_function(aten.expand.default, (view, sizes))
        scatter = gm.graph.call_function(aten.scatter.src, (x, dim, expanded, source))
    node.replace_all_uses_with(scatter)
    gm.graph.erase_node(node)
    for new in (view, *[s for s in sizes if isinstance(s, fx.Node)], expanded, scatter):
        infer_meta(new)
    return True


@dataclass(frozen=True)
class IndexCopyAsScatter(Pass):
    """``index_copy`` as ``scatter`` on the same dim (exact: one write's indices are distinct); see the module."""

    name = "index-copy-as-scatter"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite every ``index_copy`` of ``gm``, in place."""
        nodes = list(gm.graph.find_nodes(op="call_function", target=aten.index_copy.default))
        rewritten = sum(_rewrite(gm, node) for node in nodes)
        if rewritten:
            gm.graph.lint()
            gm.recompile()
        return PassResult(rewritten > 0, {"rewritten": rewritten})
