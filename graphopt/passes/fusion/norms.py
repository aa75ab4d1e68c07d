"""Fuse hand-written LayerNorm and RMSNorm into ``aten.layer_norm`` / ``aten.rms_norm``.

The pass starts at every ``rsqrt`` / ``sqrt`` and reads the statistics under it:

- LayerNorm: ``var = mean((x - mean(x))**2)`` (or ``(x - m) * (x - m)``, or
  ``var(x, correction=0)``), normalized as ``(x - mean(x)) * rsqrt(var + eps)`` or
  ``(x - mean(x)) / sqrt(var + eps)``;
- RMSNorm (T5, LLaMA): ``x * rsqrt(mean(x**2) + eps)``;

then an optional affine part above the normalized value: ``* weight`` (either side) and, for
LayerNorm, ``+ bias``, where weight and bias have the normalized shape (leading 1s allowed).
``aten.rms_norm`` exists in torch 2.13 (``rms_norm(input, normalized_shape, weight, eps)``).

Refused with a reason: statistics over dims that are not the trailing ones (a channels-first
LayerNorm over dim 1: ``layer_norm`` normalizes trailing dims only), an unbiased variance,
reductions without ``keepdim`` or in another dtype, dynamic normalized dims, a normalization
that does not divide the same centered ``x``, and weights of another dtype.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import node_dtype, node_shape
from graphopt.ir.meta import infer_meta
from graphopt.ir.op_args import argument
from graphopt.passes.base import Pass, PassResult, register_pass
from graphopt.passes.fusion._match import (
    add_operands,
    erase_dead,
    is_call,
    normalize_dims,
    scalar_value,
)

aten = torch.ops.aten

__all__ = ["FuseNorms"]

_MUL = (aten.mul.Tensor,)


class _Refused(Exception):
    """A near-miss: a normalization that cannot become one op; ``args[0]`` is the reason."""


@dataclass
class _Norm:
    kind: str  # "layer_norm" | "rms_norm"
    x: fx.Node
    dims: tuple[int, ...]
    eps: float
    normalized: fx.Node
    weight: fx.Node | None = None
    bias: fx.Node | None = None
    root: fx.Node | None = None


def _mean_of(node: Any) -> tuple[fx.Node, Any] | None:
    """``(x, dims)`` for ``mean(x, dims, keepdim=True)``; refuses other keepdim/dtype."""
    if not is_call(node, aten.mean.dim):
        return None
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if not keepdim:
        raise _Refused("mean without keepdim")
    if node.kwargs.get("dtype") is not None or (len(node.args) > 3 and node.args[3] is not None):
        raise _Refused("mean computed in another dtype")
    return node.args[0], node.args[1]


def _centered(node: Any) -> tuple[fx.Node, Any] | None:
    """``(x, dims)`` for ``x - mean(x, dims, keepdim=True)``, else None."""
    if not is_call(node, aten.sub.Tensor):
        return None
    if argument(node, "alpha", 1) != 1:
        return None
    x, mean = node.args[0], node.args[1]
    found = _mean_of(mean)
    if found is None or found[0] is not x:
        return None
    return x, found[1]


def _squared(node: Any) -> fx.Node | None:
    """``a`` for ``a ** 2`` / ``a * a``, else None."""
    if is_call(node, aten.pow.Tensor_Scalar) and node.args[1] in (2, 2.0):
        return node.args[0]
    if is_call(node, aten.mul.Tensor) and node.args[0] is node.args[1]:
        return node.args[0]
    if is_call(node, aten.mul.Tensor) and _centered(node.args[0]) and _centered(node.args[1]):
        a, b = _centered(node.args[0]), _centered(node.args[1])
        if a[0] is b[0] and a[1] == b[1]:
            return node.args[0]
    return None


def _statistics(gm: fx.GraphModule, root: fx.Node) -> tuple[str, fx.Node, Any, float] | None:
    """``(kind, x, dims, eps)`` for the ``rsqrt``/``sqrt`` ``root`` of a norm, else None."""
    inner = root.args[0]
    operands = add_operands(inner) if isinstance(inner, fx.Node) else None
    eps, variance = 0.0, inner
    if operands is not None:
        for a, b in (operands, operands[::-1]):
            value = scalar_value(gm, b)
            if value is not None and isinstance(a, fx.Node):
                eps, variance = value, a
                break
        else:
            return None
    if is_call(variance, aten.var.correction, aten.var.dim):
        if variance.target is aten.var.correction:
            correction = variance.kwargs.get("correction", variance.args[2] if len(variance.args) > 2 else 1)
            keepdim = variance.kwargs.get("keepdim", variance.args[3] if len(variance.args) > 3 else False)
        else:
            unbiased = variance.args[2] if len(variance.args) > 2 else variance.kwargs.get("unbiased", True)
            correction = 1 if unbiased else 0
            keepdim = variance.args[3] if len(variance.args) > 3 else variance.kwargs.get("keepdim", False)
        if correction is None or correction != 0:
            raise _Refused("unbiased variance (correction=1): layer_norm uses the biased one")
        if not keepdim:
            raise _Refused("variance without keepdim")
        return "layer_norm", variance.args[0], variance.args[1], eps
    mean = _mean_of(variance) if isinstance(variance, fx.Node) else None
    if mean is None:
        return None
    squared = _squared(mean[0])
    if squared is None:
        return None
    centered = _centered(squared)
    if centered is not None:
        if normalize_dims(centered[1], 99) != normalize_dims(mean[1], 99):
            raise _Refused("mean and variance reduce over different dims")
        return "layer_norm", centered[0], mean[1], eps
    return "rms_norm", squared, mean[1], eps


def _normalized(root: fx.Node, kind: str, x: fx.Node, dims: tuple[int, ...]) -> fx.Node | None:
    """The user of ``root`` that divides the centered (or plain, for RMS) ``x`` by the deviation."""
    rank = len(node_shape(x))
    for user in root.users:
        if root.target is aten.rsqrt.default and is_call(user, *_MUL):
            other = user.args[1] if user.args[0] is root else user.args[0]
        elif root.target is aten.sqrt.default and is_call(user, aten.div.Tensor) and user.args[1] is root:
            other = user.args[0]
        else:
            continue
        if kind == "rms_norm" and other is x:
            return user
        centered = _centered(other) if kind == "layer_norm" else None
        if centered is not None and centered[0] is x and normalize_dims(centered[1], rank) == dims:
            return user
    return None


def _affine_operand(node: fx.Node, target_shape: tuple[int, ...]) -> bool:
    shape = node_shape(node)
    if shape is None or len(shape) < len(target_shape):
        return False
    lead = shape[: len(shape) - len(target_shape)]
    return tuple(shape[len(lead):]) == target_shape and all(d == 1 for d in lead)


def _affine(norm: _Norm, normalized_shape: tuple[int, ...]) -> None:
    """Extend ``norm`` with ``* weight`` and ``+ bias`` above its normalized value, where present."""
    top = norm.normalized
    users = list(top.users)
    if len(users) == 1 and is_call(users[0], *_MUL):
        user = users[0]
        other = user.args[1] if user.args[0] is top else user.args[0]
        same_shape = node_shape(user) == node_shape(top)
        if isinstance(other, fx.Node) and _affine_operand(other, normalized_shape) and same_shape:
            norm.weight, top = other, user
    users = list(top.users)
    if norm.kind == "layer_norm" and len(users) == 1:
        operands = add_operands(users[0])
        if operands is not None:
            other = operands[1] if operands[0] is top else operands[0]
            if isinstance(other, fx.Node) and _affine_operand(other, normalized_shape) and \
                    node_shape(users[0]) == node_shape(top):
                norm.bias, top = other, users[0]
    norm.root = top


def _match(gm: fx.GraphModule, root: fx.Node) -> _Norm | None:
    found = _statistics(gm, root)
    if found is None:
        return None
    kind, x, dims, eps = found
    shape = node_shape(x)
    if shape is None:
        return None
    rank = len(shape)
    dims = normalize_dims(dims, rank)
    if dims is None:
        return None
    normalized = _normalized(root, kind, x, dims)
    if normalized is None:
        raise _Refused(f"{kind}: the statistics do not normalize the same x")
    if dims != tuple(range(rank - len(dims), rank)):
        raise _Refused(f"{kind} over dims {list(dims)} of a rank-{rank} tensor, not the trailing dims")
    dtype = node_dtype(x)
    if dtype is None or not dtype.is_floating_point:
        raise _Refused(f"{kind} of a non-floating tensor")
    normalized_shape = tuple(shape[d] for d in dims)
    if not all(isinstance(d, int) for d in normalized_shape):
        raise _Refused(f"{kind} over dynamic dims")
    norm = _Norm(kind, x, dims, eps, normalized)
    _affine(norm, normalized_shape)
    for tensor in (norm.weight, norm.bias):
        if tensor is not None and node_dtype(tensor) != dtype:
            raise _Refused(f"{kind} weight/bias dtype {node_dtype(tensor)} differs from the input's {dtype}")
    return norm


def _build(gm: fx.GraphModule, norm: _Norm) -> fx.Node:
    graph = gm.graph
    normalized_shape = [node_shape(norm.x)[d] for d in norm.dims]
    with graph.inserting_before(norm.root):
        operands = []
        for tensor in (norm.weight, norm.bias):
            if tensor is not None and list(node_shape(tensor)) != normalized_shape:
                tensor = graph.call_function(aten.reshape.default, (tensor, normalized_shape))
                infer_meta(tensor)
            operands.append(tensor)
        weight, bias = operands
        if norm.kind == "layer_norm":
            fused = graph.call_function(aten.layer_norm.default, (norm.x, normalized_shape, weight, bias, norm.eps))
        else:
            fused = graph.call_function(aten.rms_norm.default, (norm.x, normalized_shape, weight, norm.eps))
    infer_meta(fused)
    norm.root.replace_all_uses_with(fused)
    return fused


def _between(root: fx.Node, x: fx.Node) -> list[fx.Node]:
    seen, stack = {root}, [root]
    while stack:
        node = stack.pop()
        for arg in node.all_input_nodes:
            if arg is not x and arg not in seen and arg.op == "call_function":
                seen.add(arg)
                stack.append(arg)
    return list(seen)


@register_pass
@dataclass(frozen=True)
class FuseNorms(Pass):
    """Replace hand-written LayerNorm / RMSNorm (statistics, normalization, affine) by one ATen op."""

    name = "fuse-norms"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Fuse every recognized normalization; near-misses say why a look-alike was left."""
        hits, misses = Counter[str](), Counter[str]()
        erased: set[fx.Node] = set()
        for node in list(gm.graph.nodes):
            if node in erased or not is_call(node, aten.rsqrt.default, aten.sqrt.default):
                continue
            try:
                norm = _match(gm, node)
            except _Refused as refusal:
                misses[str(refusal.args[0])] += 1
                continue
            if norm is None:
                continue
            _build(gm, norm)
            erased |= erase_dead(gm, _between(norm.root, norm.x))
            hits[norm.kind] += 1
        return PassResult(
            changed=bool(hits),
            stats={"fused": sum(hits.values())},
            rule_hits=dict(hits),
            near_misses={self.name: dict(misses)} if misses else {},
        )
