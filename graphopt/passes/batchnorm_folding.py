"""Fold inference-mode batch norm into the convolution or linear layer that feeds it."""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value, node_shape, prune_unused_attributes, register_constant
from graphopt.ir.op_args import argument, conv_arguments, normalized_args, set_argument
from graphopt.ir.ops import CONV_OPS, STRING_PADDING_CONV_OPS
from graphopt.passes.base import Pass, PassResult, register_pass

aten = torch.ops.aten

__all__ = ["FoldConvBatchNorm", "FoldLinearBatchNorm"]

_BATCH_NORMS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)


@dataclass(frozen=True)
class _BatchNorm:
    """An inference batch norm found in the graph: its output node and its constants."""

    output: fx.Node
    input: fx.Node
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


def _match_batchnorm(gm: fx.GraphModule, node: fx.Node) -> _BatchNorm | str | None:
    """Describe ``node`` as an inference batch norm; a reason string when it cannot be folded."""
    if node.op != "call_function" or node.target not in _BATCH_NORMS:
        return None
    values = normalized_args(node)
    if values is None:
        return None
    if values.get("training", False):
        return "batch norm in training mode"
    output = node
    if node.target is aten._native_batch_norm_legit_no_training.default:
        users = list(node.users)
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in users) or len(users) != 1:
            return "batch norm statistics are used"
        output = users[0]
    x, eps = values["input"], values["eps"]
    weight, bias, mean, var = (values[k] for k in ("weight", "bias", "running_mean", "running_var"))
    tensors = [attribute_value(gm, n) if n is not None else None for n in (weight, bias, mean, var)]
    if any(n is not None and t is None for n, t in zip((weight, bias, mean, var), tensors, strict=True)):
        return "batch norm parameters are not constants"
    if tensors[2] is None or tensors[3] is None:
        return "batch norm has no running statistics"
    return _BatchNorm(output, x, tensors[0], tensors[1], tensors[2], tensors[3], float(eps))


def _folded(weight: torch.Tensor, bias: torch.Tensor | None, bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of the layer with ``bn`` folded in (computed in float64, output dim 0)."""
    w = weight.detach().double()
    channels = w.shape[0]
    mean, var = bn.mean.double(), bn.var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones(channels, dtype=torch.float64)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros(channels, dtype=torch.float64)
    b = bias.double() if bias is not None else torch.zeros(channels, dtype=torch.float64)
    scale = gamma / torch.sqrt(var + bn.eps)
    new_weight = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    new_bias = (b - mean) * scale + beta
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


def _fold_into(gm: fx.GraphModule, layer: fx.Node, bn: _BatchNorm) -> None:
    weight = attribute_value(gm, argument(layer, "weight"))
    bias_node = argument(layer, "bias")
    bias = attribute_value(gm, bias_node) if bias_node is not None else None
    new_weight, new_bias = _folded(weight, bias, bn)
    set_argument(layer, "weight", register_constant(gm, f"{layer.name}_weight", new_weight, before=layer))
    set_argument(layer, "bias", register_constant(gm, f"{layer.name}_bias", new_bias, before=layer))
    bn.output.replace_all_uses_with(layer)
    stale = [bn.output] + ([bn.output.args[0]] if bn.output.target is operator.getitem else [])
    for node in stale:
        if not node.users:
            gm.graph.erase_node(node)


def _layer_problem(gm: fx.GraphModule, layer: fx.Node) -> str | None:
    if len(layer.users) != 1:
        return "layer output is also used elsewhere"
    if attribute_value(gm, argument(layer, "weight")) is None:
        return "layer weight is not a constant"
    bias_node = argument(layer, "bias")
    if bias_node is not None and attribute_value(gm, bias_node) is None:
        return "layer bias is not a constant"
    return None


def _fold_all(gm: fx.GraphModule, layer_ops: frozenset, layer_check, pass_name: str) -> PassResult:
    folded, misses = 0, Counter[str]()
    for node in list(gm.graph.nodes):
        bn = _match_batchnorm(gm, node)
        if bn is None:
            continue
        layer = bn.input if isinstance(bn, _BatchNorm) else node.args[0]
        if not isinstance(layer, fx.Node) or layer.op != "call_function" or layer.target not in layer_ops:
            continue
        problem = bn if isinstance(bn, str) else layer_check(gm, layer)
        if problem:
            misses[problem] += 1
            continue
        _fold_into(gm, layer, bn)
        folded += 1
    if folded:
        prune_unused_attributes(gm)
    return PassResult(
        changed=folded > 0, stats={"folded": folded}, near_misses={pass_name: dict(misses)} if misses else {}
    )


def _conv_problem(gm: fx.GraphModule, layer: fx.Node) -> str | None:
    conv = conv_arguments(layer)
    if conv is None:
        return "convolution arguments do not fit its schema"
    if conv.transposed:
        return "transposed convolution"
    return _layer_problem(gm, layer)


def _linear_problem(gm: fx.GraphModule, layer: fx.Node) -> str | None:
    shape = node_shape(layer)
    if shape is None or len(shape) != 2:
        return "linear output is not (batch, features)"
    return _layer_problem(gm, layer)


@register_pass
@dataclass(frozen=True)
class FoldConvBatchNorm(Pass):
    """Fold ``batch_norm(conv(x))`` in inference mode into the convolution's weight and bias."""

    name = "fold-conv-batchnorm"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Fold every foldable conv → batch norm pair; report the pairs that could not be folded."""
        return _fold_all(gm, CONV_OPS | STRING_PADDING_CONV_OPS, _conv_problem, self.name)


@register_pass
@dataclass(frozen=True)
class FoldLinearBatchNorm(Pass):
    """Fold ``batch_norm(linear(x))`` (BatchNorm1d over features) into the linear layer."""

    name = "fold-linear-batchnorm"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Fold every foldable linear → batch norm pair; report the pairs that could not be folded."""
        return _fold_all(gm, frozenset({aten.linear.default}), _linear_problem, self.name)
