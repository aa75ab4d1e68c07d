"""Prepare a quantized graph for ONNX export so onnxruntime runs it with int8 kernels.

torch.onnx (onnxscript's torchlib) already turns ``quantized_decomposed`` quantize /
dequantize nodes into ``QuantizeLinear`` / ``DequantizeLinear``; the int8 weights stay int8
initializers. Two patterns need help first (passes run on a structure copy of the graph before
export, each verified against the graph before it: ``graphopt.targets.onnx.export``). Both are
``KernelSubstitution`` passes: their matmuls round differently from the linear they replace, and
the quantizers after them turn that into whole quanta (the ops become int8 kernels in onnxruntime).

- ``StaticLinearAsMatmul``: ``linear(DQ(x), DQ(w), b)`` exports as ``DQ(w) → Transpose → MatMul``: the transpose between
  the weight's dequantize and the MatMul hides the QDQ pattern from onnxruntime, which then
  multiplies in float. It becomes ``matmul(DQ(x), DQ(wᵀ)) + b`` with a transposed int8 weight,
  which onnxruntime fuses into ``QGemm`` / ``QLinearMatMul``.
- ``DynamicLinearOp``: dynamic linear (``choose_qparams`` at run time) becomes one ``graphopt_quant::dynamic_linear``
  op, exported as ``DynamicQuantizeLinear → MatMulInteger → Cast → Mul (→ Add)``, the pattern
  onnxruntime fuses into its ``DynamicQuantizeMatMul`` kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import register_constant
from graphopt.ir.meta import infer_meta
from graphopt.passes.base import NodeRewrite
from graphopt.passes.quantize.observers import WEIGHT_QMAX, WEIGHT_QMIN
from graphopt.passes.quantize.patterns import dynamic_source, int8_weight
from graphopt.passes.quantize.placement import is_dequantize
from graphopt.targets.common.lowering import KernelSubstitution
from graphopt.targets.common.patterns import dynamic_int8_gemm

__all__ = ["DynamicLinearOp", "StaticLinearAsMatmul", "dynamic_linear", "translation_table"]

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed


@torch.library.custom_op("graphopt_quant::dynamic_linear", mutates_args=())
def dynamic_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (weight * weight_scale) + bias`` with ``x`` quantized to uint8 per tensor at run time.

    ``weight`` is int8 ``[in, out]``, ``weight_scale`` float ``[out]``.
    """
    scale, zero_point = qd.choose_qparams.tensor(x, 0, 255, torch.finfo(torch.float32).eps, torch.uint8)
    q = qd.quantize_per_tensor.tensor(x, scale, zero_point, 0, 255, torch.uint8)
    xd = qd.dequantize_per_tensor.tensor(q, scale, zero_point, 0, 255, torch.uint8)
    out = torch.matmul(xd, weight.float() * weight_scale)
    return out + bias if bias is not None else out


@dynamic_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


def _dynamic_linear_onnx(x: Any, weight: Any, weight_scale: Any, bias: Any = None) -> Any:
    from onnxscript import opset18 as op  # onnxscript takes about 1.4 s to import: only while exporting

    x_q, x_scale, x_zero_point = op.DynamicQuantizeLinear(x)
    accumulated = op.MatMulInteger(x_q, weight, x_zero_point)
    out = op.Mul(op.Cast(accumulated, to=1), op.Mul(x_scale, weight_scale))
    return op.Add(out, bias) if bias is not None else out


def translation_table() -> dict[Any, Any]:
    """Custom ONNX translations for graphopt's own quantized ops (``torch.onnx.export(custom_translation_table=)``)."""
    return {torch.ops.graphopt_quant.dynamic_linear.default: _dynamic_linear_onnx}


def _transposed_weight(gm: fx.GraphModule, node: fx.Node, dequantize: fx.Node) -> fx.Node | None:
    """A dequantize of the int8 weight stored transposed (``[in, out]``, channel axis 1)."""
    weight = int8_weight(gm, dequantize, 0)
    if weight is None:
        return None
    q_weight, scales = weight
    q_node = register_constant(gm, f"{node.name}_weight_int8_t", q_weight.t().contiguous(), before=node)
    graph = gm.graph
    if dequantize.target == qd.dequantize_per_channel.default:
        scale_node = register_constant(gm, f"{node.name}_weight_scale_t", scales, before=node)
        zero_node = register_constant(gm, f"{node.name}_weight_zp_t", torch.zeros(scales.shape, dtype=torch.int64),
                                      before=node)
        with graph.inserting_before(node):
            new = graph.call_function(qd.dequantize_per_channel.default,
                                      (q_node, scale_node, zero_node, 1, WEIGHT_QMIN, WEIGHT_QMAX, torch.int8))
    else:
        with graph.inserting_before(node):
            new = graph.call_function(qd.dequantize_per_tensor.default, (q_node, *dequantize.args[1:]))
    infer_meta(new)
    return new


@dataclass(frozen=True)
class StaticLinearAsMatmul(NodeRewrite, KernelSubstitution):
    """``linear(DQ(x), DQ(w), b)`` -> ``matmul(DQ(x), DQ(wᵀ)) + b`` on a transposed int8 weight (for QGemm)."""

    name = "onnx-static-linear-as-matmul"
    stat = "static_linears"

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """Rewrite a static int8 linear in place."""
        if node.target != aten.linear.default or not is_dequantize(node.args[1]) or not is_dequantize(node.args[0]):
            return False
        if dynamic_source(node.args[0]) is not None:
            return False
        weight = _transposed_weight(gm, node, node.args[1])
        if weight is None:
            return False
        graph = gm.graph
        with graph.inserting_before(node):
            product = graph.call_function(aten.matmul.default, (node.args[0], weight))
            infer_meta(product)
            bias = node.args[2] if len(node.args) > 2 else None
            new = graph.call_function(aten.add.Tensor, (product, bias)) if bias is not None else product
            infer_meta(new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return True


@dataclass(frozen=True)
class DynamicLinearOp(NodeRewrite, KernelSubstitution):
    """Dynamic int8 linear / addmm / matmul-by-weight -> ``graphopt_quant::dynamic_linear`` (DynamicQuantizeMatMul)."""

    name = "onnx-dynamic-linear"
    stat = "dynamic_linears"

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """Rewrite a dynamic int8 GEMM in place."""
        match = dynamic_int8_gemm(gm, node)
        if match is None:
            return False
        source, q_weight, scales, bias = match
        q_node = register_constant(gm, f"{node.name}_weight_int8_t", q_weight.t().contiguous(), before=node)
        scale_node = register_constant(gm, f"{node.name}_weight_scale", scales, before=node)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.graphopt_quant.dynamic_linear.default,
                                         (source, q_node, scale_node, bias))
        infer_meta(new)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return True
