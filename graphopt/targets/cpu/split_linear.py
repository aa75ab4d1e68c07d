"""Linear layers of a decoder step as matrix-vector products that use every core's memory bandwidth.

A decode step multiplies one row per sequence by every weight matrix: it is bound by reading the
weights, not by arithmetic. ATen's ``linear`` at one row runs a single-threaded matrix-vector
product (about 12 GB/s on this kind of CPU, 2 cores reading ~29 GB/s together). Stored as
``[parts, in_features, out_features / parts]`` (each slice of output features transposed and
contiguous), the same product is a batched matmul whose batches the cores read side by side, at
about twice the bandwidth (measured 24 GB/s with 2 parts on 2 cores, SmolLM2's matrices from DRAM).

:class:`SplitLinears` rewrites the constant-weight ``linear`` nodes of a state-lifted step graph
(``graphopt.ir.state``) into ``graphopt_cpu::split_linear`` with the weight laid out that way (a
lowering copy; the portable graph keeps the original). Prompt-sized inputs run the same batched
matmul, as a GEMM per slice. Results equal ``linear``'s up to summation order (verified).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value, prune_unused_attributes, register_constant
from graphopt.ir.meta import copy_meta
from graphopt.passes.base import Pass, PassResult

__all__ = ["SplitLinears", "split_weight"]

aten = torch.ops.aten

_LIBRARY = torch.library.Library("graphopt_cpu", "FRAGMENT")  # beside graphopt_cpu::attention
_LIBRARY.define("split_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def _split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``weight = split_weight(W, parts)`` (``[parts, in, out / parts]``)."""
    parts, features, width = weight.shape
    rows = x.reshape(1, -1, features)
    out = torch.matmul(rows, weight)  # [parts, rows, width]: one slice of output features per core
    out = out.transpose(0, 1).reshape(*x.shape[:-1], parts * width)
    return out.add_(bias) if bias is not None else out


def _split_linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0] * weight.shape[2]))


_LIBRARY.impl("split_linear", _split_linear, "CompositeExplicitAutograd")
torch.library.register_fake("graphopt_cpu::split_linear")(_split_linear_fake)
SPLIT_LINEAR = torch.ops.graphopt_cpu.split_linear.default


def split_weight(weight: torch.Tensor, parts: int) -> torch.Tensor:
    """``[out, in]`` -> ``[parts, in, out / parts]``: each slice of output features transposed, contiguous."""
    out_features, in_features = weight.shape
    return weight.reshape(parts, out_features // parts, in_features).transpose(1, 2).contiguous()


@dataclass(frozen=True)
class SplitLinears(Pass):
    """Constant-weight fp32 ``linear`` -> ``split_linear`` over ``parts`` slices (default: the intra-op threads)."""

    name: ClassVar[str] = "split-linears"
    parts: int = 0

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite every fp32 linear whose weight is a stored constant with out_features divisible by ``parts``."""
        parts = self.parts or torch.get_num_threads()
        if parts < 2:
            return PassResult(False, {"linears": 0}, near_misses={self.name: {"one thread: nothing to split": 1}})
        rewritten, refused = 0, 0
        split: dict[int, fx.Node] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not aten.linear.default:
                continue
            weight = attribute_value(gm, node.args[1])
            bias = node.args[2] if len(node.args) > 2 else None
            if weight is None or weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[0] % parts:
                refused += 1
                continue
            if id(weight) not in split:
                split[id(weight)] = register_constant(gm, f"{node.args[1].target}_split",
                                                      split_weight(weight, parts), node)
            with gm.graph.inserting_before(node):
                fused = gm.graph.call_function(SPLIT_LINEAR, (node.args[0], split[id(weight)], bias))
            copy_meta(fused, node)
            node.replace_all_uses_with(fused)
            gm.graph.erase_node(node)
            rewritten += 1
        gm.graph.eliminate_dead_code()
        prune_unused_attributes(gm)
        gm.recompile()
        near = {self.name: {"weight not a float32 constant divisible into parts": refused}} if refused else {}
        return PassResult(rewritten > 0, {"linears": rewritten}, near_misses=near)
