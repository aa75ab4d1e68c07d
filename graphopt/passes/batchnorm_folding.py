"""Fold inference-mode batch norm into the convolution or linear layer that feeds it."""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value, node_shape, prune_unused_attributes, register_constant
from graphopt.passes.base import Pass, PassResult, register_pass

aten = torch.ops.aten

__all__ = ["FoldConvBatchNorm", "FoldLinearBatchNorm"]

_CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
          aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default)


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
    if node.op != "call_function":
        return None
    if node.target is aten.batch_norm.default:
        x, weight, bias, mean, var, training, _momentum, eps = node.args[:8]
        if training:
            return "batch norm in training mode"
        output = node
    elif node.target is aten._native_batch_norm_legit_no_training.default:
        x, weight, bias, mean, var, _momentum, eps = node.args[:7]
        users = list(node.users)
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in users) or len(users) != 1:
            return "batch norm statistics are used"
        output = users[0]
    else:
        return None
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


def _fold_into(gm: fx.GraphModule, layer: fx.Node, bn: _BatchNorm, bias_index: int) -> None:
    weight = attribute_value(gm, layer.args[1])
    bias_node = layer.args[bias_index] if len(layer.args) > bias_index else layer.kwargs.get("bias")
    bias = attribute_value(gm, bias_node) if bias_node is not None else None
    new_weight, new_bias = _folded(weight, bias, bn)
    args = list(layer.args) + [None] * max(0, bias_index + 1 - len(layer.args))
    args[1] = register_constant(gm, f"{layer.name}_weight", new_weight, before=layer)
    args[bias_index] = register_constant(gm, f"{layer.name}_bias", new_bias, before=layer)
    layer.args = tuple(args)
    layer.kwargs = {k: v for k, v in layer.kwargs.items() if k != "bias"}
    bn.output.replace_all_uses_with(layer)
    stale = [bn.output] + ([bn.output.args[0]] if bn.output.target is operator.getitem else [])
    for node in stale:
        if not node.users:
            gm.graph.erase_node(node)


def _layer_problem(gm: fx.GraphModule, layer: fx.Node, bias_index: int) -> str | None:
    if len(layer.users) != 1:
        return "layer output is also used elsewhere"
    if attribute_value(gm, layer.args[1]) is None:
        return "layer weight is not a constant"
    bias_node = layer.args[bias_index] if len(layer.args) > bias_index else layer.kwargs.get("bias")
    if bias_node is not None and attribute_value(gm, bias_node) is None:
        return "layer bias is not a constant"
    return None


def _fold_all(gm: fx.GraphModule, layer_ops: tuple, layer_check, pass_name: str) -> PassResult:
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
        _fold_into(gm, layer, bn, bias_index=2)
        folded += 1
    if folded:
        prune_unused_attributes(gm)
    return PassResult(
        changed=folded > 0, stats={"folded": folded}, near_misses={pass_name: dict(misses)} if misses else {}
    )


def _conv_problem(gm: fx.GraphModule, layer: fx.Node) -> str | None:
    if layer.target is aten.convolution.default and layer.args[6]:
        return "transposed convolution"
    return _layer_problem(gm, layer, 2)


def _linear_problem(gm: fx.GraphModule, layer: fx.Node) -> str | None:
    shape = node_shape(layer)
    if shape is None or len(shape) != 2:
        return "linear output is not (batch, features)"
    return _layer_problem(gm, layer, 2)


@register_pass
@dataclass(frozen=True)
class FoldConvBatchNorm(Pass):
    """Fold ``batch_norm(conv(x))`` in inference mode into the convolution's weight and bias."""

    name = "fold-conv-batchnorm"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Fold every foldable conv → batch norm pair; report the pairs that could not be folded."""
        return _fold_all(gm, _CONVS, _conv_problem, self.name)


@register_pass
@dataclass(frozen=True)
class FoldLinearBatchNorm(Pass):
    """Fold ``batch_norm(linear(x))`` (BatchNorm1d over features) into the linear layer."""

    name = "fold-linear-batchnorm"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Fold every foldable linear → batch norm pair; report the pairs that could not be folded."""
        return _fold_all(gm, (aten.linear.default,), _linear_problem, self.name)
