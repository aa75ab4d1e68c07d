"""Graph readers the backends share, so that each sees a layer alike.

- ``conv_arguments`` / ``residual_operand``: a convolution's arguments and a residual add's other
  input, for the epilogue fusions of ``graphopt.targets.cpu.epilogue`` (oneDNN) and
  ``graphopt.targets.gpu.lowering`` (cuDNN);
- ``gemm_operands``: the operands of a linear / addmm / matmul-by-weight, for the int8 GEMM
  lowerings of the cpu, gpu and onnx targets; ``dynamic_int8_gemm``: those of one whose
  activation is quantized at run time and whose weight is int8 (cpu and onnx).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import same_shape
from graphopt.passes.quantize.patterns import dynamic_source, int8_weight

__all__ = ["RESIDUAL_BROADCASTS", "ConvArguments", "conv_arguments", "dynamic_int8_gemm", "gemm_operands",
           "residual_operand"]

aten = torch.ops.aten


def _pair(value: Any, default: int) -> list[int]:
    if value is None:
        return [default, default]
    values = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return values * 2 if len(values) == 1 else values


ConvArguments = tuple[Any, Any, Any, list[int], list[int], list[int], int]
"""``(x, weight, bias, stride, padding, dilation, groups)``, each of the three lists of two ints."""


def conv_arguments(node: fx.Node) -> ConvArguments | str:
    """The arguments of an ``aten.conv2d`` / ``aten.convolution`` node, defaults filled in.

    Returns the reason instead when the node is not a plain convolution these fusions handle
    (transposed, or padding given as a string).
    """
    if node.target == aten.convolution.default:
        x, w, b, stride, padding, dilation, transposed, _, groups = node.args[:9]
        if transposed:
            return "transposed convolution"
    else:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults: list[Any] = [None, None, None, 1, 0, 1, 1]
        x, w, b, stride, padding, dilation, groups = (
            node.args[i] if i < len(node.args) else node.kwargs.get(name, defaults[i]) for i, name in enumerate(names))
    if isinstance(padding, str):
        return "padding given as a string"
    return x, w, b, _pair(stride, 1), _pair(padding, 0), _pair(dilation, 1), int(groups)


RESIDUAL_BROADCASTS = "residual add broadcasts"
"""Near-miss reason: the tensor added to a layer's output has another shape (it would broadcast)."""


def residual_operand(add: fx.Node, out: fx.Node) -> fx.Node | str | None:
    """The tensor ``add`` sums with ``out``, when a fused kernel can take it as its residual input.

    That is a plain ``add.Tensor`` (alpha 1) of another same-shape, same-dtype tensor. Returns
    ``RESIDUAL_BROADCASTS`` for an add of a tensor of another shape, and None when ``add`` is no
    such add at all.
    """
    if add.op != "call_function" or add.target != aten.add.Tensor:
        return None
    if add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    a, c = add.args
    other = c if a is out else a
    if not isinstance(other, fx.Node) or other is out:
        return None
    if not same_shape(other, out) or other.meta.get("val") is None:
        return RESIDUAL_BROADCASTS
    if other.meta["val"].dtype != out.meta["val"].dtype:
        return None
    return other


def gemm_operands(node: fx.Node) -> tuple[Any, Any, Any, int] | None:
    """(activation, weight, bias, weight's output-channel axis) of a linear / addmm / matmul node, or None.

    ``addmm`` with ``beta`` / ``alpha`` is no plain GEMM and gives None; the bias is None when absent.
    """
    if node.op != "call_function":
        return None
    if node.target == aten.linear.default:
        return node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None, 0
    if node.target == aten.addmm.default and not node.kwargs:
        return node.args[1], node.args[2], node.args[0], 1
    if node.target == aten.matmul.default:
        return node.args[0], node.args[1], None, 1
    return None


def dynamic_int8_gemm(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor, torch.Tensor, Any] | None:
    """(float input, int8 weight ``[out, in]``, scales per output channel, bias argument) of a dynamic int8 GEMM.

    That is a ``gemm_operands`` node reading ``DQ(Q(x, choose_qparams(x)))`` and a constant int8
    weight's dequantize; None for any other node.
    """
    operands = gemm_operands(node)
    if operands is None:
        return None
    x_arg, w_arg, bias, axis = operands
    source = dynamic_source(x_arg)
    weight = int8_weight(gm, w_arg, axis)
    if source is None or weight is None:
        return None
    return source, *weight, bias
