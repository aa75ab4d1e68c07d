"""Fuse rotary position embeddings, ``x * cos + rotate_half(x) * sin``, into ``graphopt_decoder::rotary``.

``rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2], dim=-1)`` is the half-split convention of
Llama, Mistral, Qwen2, Phi-3, Gemma and GPT-NeoX (applied to queries and keys alike; with a
partial rotary dim, ``x`` is the rotated slice). The pass starts at every ``add`` and reads it
as ``(x * cos) + (rotate_half(x) * sin)``, any operand order. Other conventions stay as they
are: the interleaved one (GPT-J: ``stack(-x[..., 1::2], x[..., ::2])``) never matches; a
``cat`` of ``x``'s halves that is not ``rotate_half`` (swapped signs, a split off the middle,
another dim) is a near-miss, and so is a chain whose ``cos``/``sin`` broadcast ``x`` up or
change its dtype.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import inherit_module_paths, node_dtype, node_shape
from graphopt.ir.meta import infer_meta
from graphopt.passes.base import Pass, PassResult, register_pass
from graphopt.passes.fusion._match import add_operands, erase_dead, is_call
from graphopt.passes.fusion.decoder_ops import ROTARY

aten = torch.ops.aten

__all__ = ["FuseRotary"]


class _Refused(Exception):
    """A near-miss: ``args[0]`` says why the chain is no half-split rotary embedding."""


def _last_dim_slice(node: Any, size: int) -> tuple[fx.Node, int, int] | None:
    """``(source, start, end)`` for a step-1 slice of ``source``'s last dim (bounds clamped to ``size``)."""
    if not is_call(node, aten.slice.Tensor):
        return None
    source = node.args[0]
    shape = node_shape(source) if isinstance(source, fx.Node) else None
    args = [*node.args[1:], *[None] * 4][:4]
    dim, start, end, step = args[0] or 0, args[1], args[2], args[3]
    if shape is None or not isinstance(dim, int) or dim % len(shape) != len(shape) - 1 or step not in (None, 1):
        return None
    start = 0 if start is None else start
    end = size if end is None or (isinstance(end, int) and end >= min(size, sys.maxsize)) else end
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    return source, start % size if start < 0 else start, end % size if end < 0 else end


def _rotate_half_source(node: Any) -> fx.Node | None:
    """``x`` for ``cat([-x[..., d/2:], x[..., :d/2]], -1)``; None when ``node`` is no ``cat``; refuses look-alikes."""
    if not is_call(node, aten.cat.default) or len(node.args[0]) != 2:
        return None
    shape = node_shape(node)
    dim = node.args[1] if len(node.args) > 1 else 0
    if shape is None or not isinstance(dim, int) or dim % len(shape) != len(shape) - 1:
        return None
    size = shape[-1]
    if not isinstance(size, int) or size % 2:
        return None
    negated, plain = node.args[0]
    if not is_call(negated, aten.neg.default):
        if is_call(plain, aten.neg.default):
            raise _Refused("rotate_half with the sign on the other half")
        return None
    second, first = _last_dim_slice(negated.args[0], size), _last_dim_slice(plain, size)
    if second is None or first is None or second[0] is not first[0]:
        return None
    half = size // 2
    if (second[1:], first[1:]) != ((half, size), (0, half)) or node_shape(first[0])[-1] != size:
        raise _Refused("a cat of the input's slices that is not rotate_half (split off the middle)")
    return first[0]


def _match(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, list[fx.Node]] | None:
    """``(x, cos, sin, matched nodes)`` for ``node = x * cos + rotate_half(x) * sin``; None when it is no rotary."""
    operands = add_operands(node)
    if operands is None or not all(is_call(o, aten.mul.Tensor) for o in operands):
        return None
    for rotated_product, plain_product in (operands, operands[::-1]):
        for rotated, sin in (rotated_product.args, rotated_product.args[::-1]):
            x = _rotate_half_source(rotated)
            if x is None:
                continue
            a, b = plain_product.args
            cos = b if a is x else a if b is x else None
            if not isinstance(cos, fx.Node) or not isinstance(sin, fx.Node):
                raise _Refused("x * cos is not on the rotated tensor, or cos/sin is a number")
            return x, cos, sin, [node, rotated_product, plain_product, rotated, *rotated.all_input_nodes,
                                 *rotated.args[0][0].all_input_nodes]
    return None


def _check(x: fx.Node, cos: fx.Node, sin: fx.Node, node: fx.Node) -> None:
    if node_shape(node) != node_shape(x):
        raise _Refused("cos/sin broadcast the input to a larger shape")
    if not node_dtype(node) == node_dtype(x) == node_dtype(cos) == node_dtype(sin):
        raise _Refused("cos/sin and the input have different dtypes")


@register_pass
@dataclass(frozen=True)
class FuseRotary(Pass):
    """Replace half-split rotary embeddings ``x * cos + rotate_half(x) * sin`` by ``graphopt_decoder::rotary``."""

    name = "fuse-rotary"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Fuse every rotary embedding; count the look-alikes refused, by reason."""
        fused, misses = 0, Counter[str]()
        graph = gm.graph
        for node in list(graph.nodes):
            if not is_call(node, aten.add.Tensor):
                continue
            try:
                found = _match(node)
                if found is None:
                    continue
                x, cos, sin, matched = found
                _check(x, cos, sin, node)
            except _Refused as refusal:
                misses[str(refusal.args[0])] += 1
                continue
            with graph.inserting_before(node):
                rotary = graph.call_function(ROTARY, (x, cos, sin))
            infer_meta(rotary)
            inherit_module_paths(rotary, [node])
            node.replace_all_uses_with(rotary)
            erase_dead(gm, [n for n in matched if n is not x])
            fused += 1
        return PassResult(changed=fused > 0, stats={"fused": fused}, rule_hits={"rotary": fused} if fused else {},
                          near_misses={self.name: dict(misses)} if misses else {})
