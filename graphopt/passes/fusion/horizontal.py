"""Horizontal fusion: sibling linears that read the same input become one linear and a split.

``q = x @ Wq^T + bq; k = x @ Wk^T + bk; v = x @ Wv^T + bv`` (attention projections; gate/up
projections of gated MLPs; cross-attention K/V) becomes ``qkv = linear(x, [Wq; Wk; Wv], [bq; bk; bv])``
and ``q, k, v`` are slices of ``qkv``'s last dim. One larger GEMM reads ``x`` once and runs
closer to peak than several small ones.

Members are ``aten.linear`` / ``aten.matmul`` / ``aten.mm`` / ``aten.addmm`` calls whose weight (and
bias) are constants. The concatenated weight and bias are registered as new constants; the old
ones are left untouched (and dropped from the graph when nothing else reads them). A member
without a bias gets zeros in the concatenated bias (``+ 0`` is exact).

Each slice is a strided view of the fused output where the member's result was a fresh tensor,
so consumers that depend on layout are checked the way ``remove-identity`` checks a dropped
copy: ``view`` becomes ``reshape`` along the layout path; ``as_strided``, stride queries and
non-aten consumers refuse the member. Near-misses: siblings whose weight is computed at run
time, of another dtype or device, a bias that cannot be laid out per output feature, a member
returned as a graph output, a layout-dependent consumer.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.analysis.aliasing import REWRITABLE_VIEWS, CopyAnalysis, alias_closure
from graphopt.ir.graph import (
    attribute_value,
    inherit_module_paths,
    node_shape,
    prune_unused_attributes,
    read_constant,
    register_constant,
)
from graphopt.ir.meta import infer_meta
from graphopt.ir.op_args import argument
from graphopt.ir.ops import LINEAR_OPS
from graphopt.passes.base import Pass, PassResult, register_pass
from graphopt.passes.fusion._match import is_call

aten = torch.ops.aten

__all__ = ["FuseHorizontal"]

_LINEAR_LIKE = LINEAR_OPS | {aten.mm.default, aten.matmul.default}


@dataclass
class _Member:
    """One projection of ``x``: its node and its weight as ``(out, in)`` with an optional bias."""

    node: fx.Node
    x: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None


def _member(gm: fx.GraphModule, node: fx.Node) -> _Member | str | None:
    """``node`` as a projection with constant weights, a reason when it is one with a problem, else None."""
    target, args = node.target, node.args
    if target is aten.linear.default:
        x, weight_node = args[0], args[1]
        bias_node = argument(node, "bias")
        transpose = False
    elif target in (aten.matmul.default, aten.mm.default):
        x, weight_node, bias_node, transpose = args[0], args[1], None, True
    elif target is aten.addmm.default:
        bias_node, x, weight_node = args[0], args[1], args[2]
        if argument(node, "beta") != 1 or argument(node, "alpha") != 1:
            return "addmm with beta or alpha other than 1"
        transpose = True
    else:
        return None
    if not isinstance(x, fx.Node) or not isinstance(weight_node, fx.Node):
        return None
    weight = attribute_value(gm, weight_node)
    if weight is None:
        return "weight computed at run time" if weight_node.op != "placeholder" else None
    if weight.dim() != 2:
        return None
    weight = weight.t() if transpose else weight
    bias = None
    if bias_node is not None:
        bias = attribute_value(gm, bias_node)
        if bias is None:
            return "bias computed at run time"
        out = weight.shape[0]
        if bias.numel() == out:
            bias = bias.reshape(out)
        elif bias.numel() == 1:
            bias = bias.reshape(1).expand(out)
        else:
            return "bias that is not one value per output feature"
    shape = node_shape(x)
    if shape is None or len(shape) < 1 or (target in (aten.mm.default, aten.addmm.default) and len(shape) != 2):
        return None
    return _Member(node, x, weight, bias)


def _group_problem(members: list[_Member]) -> str | None:
    first = members[0].weight
    for member in members[1:]:
        if member.weight.dtype != first.dtype:
            return "siblings have weights of different dtypes"
        if member.weight.device != first.device:
            return "siblings have weights on different devices"
        if member.bias is not None and member.bias.dtype != first.dtype:
            return "a bias dtype differs from the weights'"
    return None


def _concatenated(members: list[_Member]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([m.weight.detach() for m in members], dim=0)
    if all(m.bias is None for m in members):
        return weight, None
    biases = [
        m.bias.detach() if m.bias is not None else torch.zeros(m.weight.shape[0], dtype=m.weight.dtype,
                                                               device=m.weight.device)
        for m in members
    ]
    return weight, torch.cat(biases)


_Fused = dict[tuple[Any, ...], tuple[str, str | None]]
"""Buffers already fused in this run, by the identity of the weights and biases they concatenate."""


def _sources(members: list[_Member]) -> tuple[Any, ...]:
    """What a fused weight is made of: each member's weight and bias storage, shape and strides."""
    def identity(tensor: torch.Tensor | None) -> Any:
        return None if tensor is None else (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
    return tuple((identity(m.weight), identity(m.bias)) for m in members)


def _fused_constants(gm: fx.GraphModule, members: list[_Member], first: fx.Node,
                     fused: _Fused) -> tuple[fx.Node, fx.Node | None]:
    """get_attr nodes of the concatenated weight and bias, stored once however many groups share the layers.

    A model that applies one block several times (ALBERT's shared layer) has a group per use with the
    same weights: every use reads the one fused copy instead of a copy of its own.
    """
    key = _sources(members)
    if key in fused:
        weight_name, bias_name = fused[key]
        return read_constant(gm, weight_name, first), read_constant(gm, bias_name, first) if bias_name else None
    weight, bias = _concatenated(members)
    weight_node = register_constant(gm, f"{first.name}_hfused_weight", weight, before=first)
    bias_node = register_constant(gm, f"{first.name}_hfused_bias", bias, before=first) if bias is not None else None
    fused[key] = (str(weight_node.target), str(bias_node.target) if bias_node is not None else None)
    return weight_node, bias_node


def _fuse(gm: fx.GraphModule, members: list[_Member], rewrites: list[fx.Node], order: dict[fx.Node, int],
          fused_constants: _Fused) -> None:
    graph = gm.graph
    first = min((m.node for m in members), key=order.__getitem__)
    x = members[0].x
    weight_node, bias_node = _fused_constants(gm, members, first, fused_constants)
    rank = len(node_shape(x))
    with graph.inserting_before(first):
        fused = graph.call_function(aten.linear.default, (x, weight_node, bias_node))
        infer_meta(fused)
        inherit_module_paths(fused, [m.node for m in members])
        start = 0
        for member in members:
            end = start + member.weight.shape[0]
            piece = graph.call_function(aten.slice.Tensor, (fused, rank - 1, start, end))
            infer_meta(piece)
            member.node.replace_all_uses_with(piece)
            start = end
    for view in rewrites:
        view.target = REWRITABLE_VIEWS.get(view.target, view.target)  # a view may be on several members' paths
    for member in members:
        graph.erase_node(member.node)


@register_pass
@dataclass(frozen=True)
class FuseHorizontal(Pass):
    """Merge linears with constant weights that read the same input into one linear and slices.

    ``min_group`` is the smallest number of siblings worth merging.
    """

    name = "fuse-horizontal"
    min_group: int = 2

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Fuse every group of sibling projections; near-misses say why a sibling stayed apart."""
        by_input: dict[fx.Node, list[_Member]] = defaultdict(list)
        problems: dict[fx.Node, Counter[str]] = defaultdict(Counter)
        for node in gm.graph.nodes:
            if not is_call(node, *_LINEAR_LIKE):
                continue
            found = _member(gm, node)
            x = node.args[1] if node.target is aten.addmm.default else node.args[0]
            if isinstance(found, _Member):
                by_input[found.x].append(found)
            elif isinstance(found, str) and isinstance(x, fx.Node):
                problems[x][found] += 1
        misses = Counter[str]()
        analysis = CopyAnalysis(gm)
        order = {node: index for index, node in enumerate(gm.graph.nodes)}
        groups, merged = 0, 0
        fused_constants: _Fused = {}
        for x, members in by_input.items():
            if len(members) + sum(problems[x].values()) < self.min_group:
                continue
            misses.update(problems[x])
            kept, views_of = [], {}
            for member in members:
                reason, views = self._layout_problem(analysis, member.node)
                if reason:
                    misses[reason] += 1
                else:
                    kept.append(member)
                    views_of[member.node] = views
            by_dtype: dict[torch.dtype, list[_Member]] = defaultdict(list)
            for member in kept:
                by_dtype[member.weight.dtype].append(member)
            if len(by_dtype) > 1:
                misses["siblings have weights of different dtypes"] += 1
            for group in by_dtype.values():
                if len(group) < self.min_group:
                    continue
                problem = _group_problem(group)
                if problem:
                    misses[problem] += 1
                    continue
                _fuse(gm, group, [v for m in group for v in views_of[m.node]], order, fused_constants)
                groups += 1
                merged += len(group)
        if groups:
            prune_unused_attributes(gm)
        return PassResult(
            changed=groups > 0,
            stats={"groups": groups, "linears_merged": merged},
            rule_hits={"sibling-linears": groups} if groups else {},
            near_misses={self.name: dict(misses)} if misses else {},
        )

    @staticmethod
    def _layout_problem(analysis: CopyAnalysis, node: fx.Node) -> tuple[str | None, list[fx.Node]]:
        """Why ``node``'s result cannot become a strided slice, or the views to turn into reshapes."""
        for alias in alias_closure(node):
            if any(user.op == "output" for user in alias.users):
                return "projection returned as a graph output", []
        reason, views = analysis._layout_users(node)
        if reason:
            return reason.replace("copy", "projection"), []
        return None, views

