"""Grouped-query attention without the materialised ``repeat_kv``: SDPA's ``enable_gqa=True`` instead.

transformers repeats each key/value head ``n`` times before attention (``repeat_kv``: ``x[:, :, None]
.expand(b, kv, n, s, d).reshape(b, kv * n, s, d)``, a copy of the whole cache per layer and step);
``scaled_dot_product_attention(q, k, v, ..., enable_gqa=True)`` reads the ``kv`` heads directly
and gives each group of ``n`` query heads the same one. Matched repeats: ``unsqueeze(x, 2)``
(or ``x[:, :, None]``) → ``expand`` (``clone``) → ``reshape``/``view``/``_unsafe_view``, and
``repeat_interleave(x, n, dim=1)``. Near-misses: keys and values repeated by different factors,
only one of them repeated, a repeat the graph uses elsewhere too, ``repeat`` (tiling: head ``h``
reads ``h mod kv``, not ``h // n``), an SDPA that already has ``enable_gqa`` or dropout.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import node_shape
from graphopt.ir.meta import infer_meta
from graphopt.ir.ops import COPY_OPS, RESHAPE_OPS
from graphopt.passes.base import Pass, PassResult, register_pass
from graphopt.passes.fusion._match import erase_dead, is_call

aten = torch.ops.aten

__all__ = ["FuseGroupedQueryAttention", "repeated_heads"]

_SDPA = aten.scaled_dot_product_attention.default


def repeated_heads(node: Any) -> tuple[fx.Node, int, list[fx.Node]] | str | None:
    """``(x, n, nodes)`` when ``node`` repeats each head (dim 1) of 4-d ``x`` ``n`` times; a reason for a tiling."""
    if is_call(node, aten.repeat.default):
        return "keys/values tiled with repeat (head h reads h mod kv), not repeated in place"
    if is_call(node, aten.repeat_interleave.self_int):
        x, repeats = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        shape = node_shape(x) if isinstance(x, fx.Node) else None
        if shape is None or len(shape) != 4 or dim is None or dim % 4 != 1 or not isinstance(repeats, int):
            return None
        return x, repeats, [node]
    if not is_call(node, *RESHAPE_OPS):
        return None
    nodes = [node]
    source = node.args[0]
    while is_call(source, *COPY_OPS):
        nodes.append(source)
        source = source.args[0]
    if not is_call(source, aten.expand.default) or not is_call(source.args[0], aten.unsqueeze.default):
        return None
    expand, unsqueeze = source, source.args[0]
    x = unsqueeze.args[0]
    x_shape, expanded, out = (node_shape(n) if isinstance(n, fx.Node) else None for n in (x, expand, node))
    if x_shape is None or expanded is None or out is None or len(x_shape) != 4 or len(expanded) != 5:
        return None
    if unsqueeze.args[1] % 5 != 2:
        return None
    n = expanded[2]
    b, kv, s, d = x_shape
    if not isinstance(n, int) or (expanded[0], expanded[1], expanded[3], expanded[4]) != x_shape:
        return None
    if not isinstance(kv, int) or tuple(out) != (b, kv * n, s, d):
        return None
    return x, n, [*nodes, expand, unsqueeze]


def _plan(sdpa: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]] | str | None:
    """``(k, v, repeat nodes)`` for an SDPA whose keys and values are ``repeat_kv``-ed; a reason for look-alikes."""
    if len(sdpa.args) < 3:
        return None
    keys, values = repeated_heads(sdpa.args[1]), repeated_heads(sdpa.args[2])
    for found in (keys, values):
        if isinstance(found, str):
            return found
    if keys is None and values is None:
        return None
    if keys is None or values is None:
        return "only one of keys and values is repeated per head"
    (k, n_k, k_nodes), (v, n_v, v_nodes) = keys, values
    if n_k != n_v:
        return "keys and values are repeated by different factors"
    if sdpa.kwargs.get("enable_gqa") or (len(sdpa.args) > 4 and sdpa.args[4]) or sdpa.kwargs.get("dropout_p"):
        return "the attention already has enable_gqa or dropout"
    for root in (sdpa.args[1], sdpa.args[2]):
        if len(root.users) != 1:
            return "the repeated keys/values are also used elsewhere"
    q_shape = node_shape(sdpa.args[0])
    k_shape = node_shape(k)
    if q_shape is None or k_shape is None or len(q_shape) != 4 or q_shape[1] != k_shape[1] * n_k:
        return "the query heads are not the key/value heads times the repeat"
    return k, v, [*k_nodes, *v_nodes]


@register_pass
@dataclass(frozen=True)
class FuseGroupedQueryAttention(Pass):
    """Replace ``sdpa(q, repeat_kv(k), repeat_kv(v), ...)`` by ``sdpa(q, k, v, ..., enable_gqa=True)``."""

    name = "fuse-gqa"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Drop every per-head key/value repeat in front of an SDPA; count the look-alikes refused."""
        fused, misses = 0, Counter[str]()
        graph = gm.graph
        for sdpa in list(graph.find_nodes(op="call_function", target=_SDPA)):
            plan = _plan(sdpa)
            if isinstance(plan, str):
                misses[plan] += 1
                continue
            if plan is None:
                continue
            k, v, repeats = plan
            with graph.inserting_before(sdpa):
                new = graph.call_function(_SDPA, (sdpa.args[0], k, v, *sdpa.args[3:]),
                                          {**sdpa.kwargs, "enable_gqa": True})
            new.meta.update({key: value for key, value in sdpa.meta.items() if key not in ("val", "tensor_meta")})
            infer_meta(new)
            sdpa.replace_all_uses_with(new)
            graph.erase_node(sdpa)
            erase_dead(gm, repeats)
            fused += 1
        return PassResult(changed=fused > 0, stats={"fused": fused},
                          rule_hits={"gqa-attention": fused} if fused else {},
                          near_misses={self.name: dict(misses)} if misses else {})
