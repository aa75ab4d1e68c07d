"""A linear read only through slices of its output features becomes one linear per slice (decoder steps).

Horizontal fusion (``graphopt.passes.fusion.horizontal``) merges sibling projections, a gated
MLP's gate and up layers say, into one linear and slices of its output: one GEMM that reads the
input once. A decode step multiplies a single row by each weight, which is bound by reading the
weights, so the merge saves nothing there; in onnxruntime its slices become one ``Split`` kernel
per layer (its optimizer joins them), and on SmolLM2's fp32 decode step those 30 splits took 0.57
ms of a 20 ms token in onnxruntime's profile, most of what graphopt's step spent beyond
onnxruntime-genai's. :class:`LinearPerSlice` gives each slice a linear of its own over its rows of
the weight and bias, views of the merged ones (rows of a row-major matrix are contiguous), so the
lowering copies no weight. The result is exact up to the GEMM's summation order (verified).

It applies where every user of the linear is a slice of its last dim with step 1, the slices do
not overlap, and each is at least ``MIN_PIECE_FEATURES`` wide: narrower products lose more to a
GEMM's fixed costs than the split costs (at 4 rows SmolLM2's Q/K/V apart, 576 + 192 + 192
features, took 134 us against 105 merged, profiled in onnxruntime). A projection consumed whole
(the fused Q/K/V that ``GroupQueryAttention`` reads) stays merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.fx as fx

from graphopt.ir.graph import (
    attribute_value,
    inherit_module_paths,
    node_shape,
    prune_unused_attributes,
    register_constant,
)
from graphopt.ir.meta import infer_meta
from graphopt.ir.op_args import argument
from graphopt.passes.base import Pass, PassResult

__all__ = ["MIN_PIECE_FEATURES", "LinearPerSlice", "output_slices"]

aten = torch.ops.aten

MIN_PIECE_FEATURES = 1024
"""The narrowest slice worth a linear of its own (SmolLM2's gate and up halves are 1536 wide)."""


def output_slices(node: fx.Node, features: int) -> list[tuple[fx.Node, int, int]] | None:
    """``(slice, start, end)`` for each user of ``node`` when all slice its last dim apart, else None."""
    shape = node_shape(node)
    if shape is None or not node.users:
        return None
    ranges = []
    for user in node.users:
        if user.target is not aten.slice.Tensor or user.args[0] is not node:
            return None
        dim, start, end, step = (argument(user, name) for name in ("dim", "start", "end", "step"))
        if dim not in (len(shape) - 1, -1) or step != 1:
            return None
        start, end = 0 if start is None else start, features if end is None else end
        if not isinstance(start, int) or not isinstance(end, int):
            return None
        start, end = (max(0, min(features, v + features if v < 0 else v)) for v in (start, end))
        if start >= end:
            return None
        ranges.append((user, start, end))
    ranges.sort(key=lambda r: r[1])
    if any(later[1] < earlier[2] for earlier, later in pairwise(ranges)):
        return None  # overlapping slices would read some weights twice
    return ranges


@dataclass(frozen=True)
class LinearPerSlice(Pass):
    """Every constant-weight ``linear`` read only through disjoint last-dim slices, as one linear per slice."""

    name = "linear-per-slice"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite in place; stats: how many linears were divided, into how many."""
        divided = pieces = 0
        for node in list(gm.graph.find_nodes(op="call_function", target=aten.linear.default)):
            weight = attribute_value(gm, node.args[1])
            bias_node = argument(node, "bias")
            bias = attribute_value(gm, bias_node) if bias_node is not None else None
            if weight is None or weight.dim() != 2 or (bias_node is not None and bias is None):
                continue
            slices = output_slices(node, weight.shape[0])
            if slices is None or len(slices) < 2 or any(end - start < MIN_PIECE_FEATURES for _, start, end in slices):
                continue
            for piece, start, end in slices:
                with gm.graph.inserting_before(piece):
                    rows = register_constant(gm, f"{node.name}_rows_{start}", weight[start:end], before=piece)
                    part = (register_constant(gm, f"{node.name}_bias_{start}", bias[start:end], before=piece)
                            if bias is not None else None)
                    linear = gm.graph.call_function(aten.linear.default, (node.args[0], rows, part))
                infer_meta(linear)
                inherit_module_paths(linear, [node])
                piece.replace_all_uses_with(linear)
                gm.graph.erase_node(piece)
            gm.graph.erase_node(node)
            divided += 1
            pieces += len(slices)
        if divided:
            prune_unused_attributes(gm)
            gm.graph.lint()
            gm.recompile()
        return PassResult(divided > 0, {"linears_divided": divided, "linears_after": pieces})
