"""Readers of the QDQ patterns every lowering of a quantized graph starts from.

Each takes an fx node of the quantized IR (see ``placement``) and returns what a kernel needs
from it, or None when the node is not that pattern: a static uint8 activation, an int8 weight
with its per-channel scales, a constant bias, the float input of a run-time quantized activation.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value
from graphopt.passes.quantize.placement import is_dequantize

__all__ = ["constant_bias", "dynamic_source", "has_quantized_ops", "int8_weight", "static_activation"]

qd = torch.ops.quantized_decomposed


def static_activation(node: object) -> tuple[fx.Node, float, int] | None:
    """``(uint8 tensor, scale, zero point)`` when ``node`` is a static uint8 per-tensor dequantize."""
    if not (isinstance(node, fx.Node) and node.target == qd.dequantize_per_tensor.default):
        return None
    source, scale, zero_point, _, _, dtype = node.args[:6]
    if dtype != torch.uint8:
        return None
    return source, float(scale), int(zero_point)


def int8_weight(gm: fx.GraphModule, node: object, axis: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(int8 weight with channels on dim 0, float scales per channel)`` behind a weight dequantize."""
    if not is_dequantize(node):
        return None
    q_weight = attribute_value(gm, node.args[0])
    if q_weight is None or q_weight.dtype != torch.int8:
        return None
    if node.target == qd.dequantize_per_channel.default:
        scales = attribute_value(gm, node.args[1])
        if scales is None or node.args[3] != axis:
            return None
    elif node.target == qd.dequantize_per_tensor.default:
        scales = torch.full((q_weight.shape[axis],), float(node.args[1]))
    else:
        return None
    if axis != 0:
        q_weight = q_weight.transpose(0, axis).contiguous()
    return q_weight, scales.float()


def constant_bias(gm: fx.GraphModule, node: object) -> torch.Tensor | bool | None:
    """The constant float bias, None for no bias, False when the bias is computed at run time."""
    if node is None:
        return None
    value = attribute_value(gm, node)
    return value.float() if value is not None else False


def dynamic_source(node: object) -> fx.Node | None:
    """The float input of a run-time quantized activation ``DQ(Q(x, choose_qparams(x)))``."""
    if not (isinstance(node, fx.Node) and node.target == qd.dequantize_per_tensor.tensor):
        return None
    quantize = node.args[0]
    if not (isinstance(quantize, fx.Node) and quantize.target == qd.quantize_per_tensor.tensor):
        return None
    scale = quantize.args[1]
    if not (isinstance(scale, fx.Node) and scale.target == operator.getitem):
        return None
    choose = scale.args[0]
    if not (isinstance(choose, fx.Node) and choose.target == qd.choose_qparams.tensor):
        return None
    return quantize.args[0]


def has_quantized_ops(gm: fx.GraphModule, activations: bool = False) -> bool:
    """True when ``gm`` holds quantize/dequantize nodes (or another scheme's quantized ops).

    ``activations=True``: only quantized activations count (``quantized_decomposed`` ops), so a
    weight-only graph answers False.
    """
    namespaces = ("quantized_decomposed",) if activations else ("quantized_decomposed", "graphopt_weights")
    return any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace in namespaces
        for n in gm.graph.nodes
    )
