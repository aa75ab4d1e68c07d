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
- ``StaticLinearFloatOutput``: a static int8 linear whose output no int8 op reads (a transformer's
  projections, read by attention, GELU or a layer norm) has no quantize after it, and onnxruntime
  runs ``DQ → MatMul`` in float. It becomes one ``graphopt_quant::static_linear`` op, exported as
  ``QuantizeLinear`` with the calibrated scale and onnxruntime's ``com.microsoft.MatMulIntegerToFloat``
  (int8 product, float out, bias added; OpenVINO reads it too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx
import torch
import torch.fx as fx

from graphopt.ir.graph import register_constant
from graphopt.ir.meta import infer_meta
from graphopt.passes.base import NodeRewrite
from graphopt.passes.quantize.observers import WEIGHT_QMAX, WEIGHT_QMIN
from graphopt.passes.quantize.patterns import dynamic_source, int8_weight, static_activation
from graphopt.passes.quantize.placement import is_dequantize, is_quantize, output_point
from graphopt.targets.common.lowering import KernelSubstitution
from graphopt.targets.common.patterns import dynamic_int8_gemm, gemm_operands
from graphopt.targets.onnx.contrib_ops import ensure_schema

__all__ = ["DynamicLinearOp", "StaticLinearAsMatmul", "StaticLinearFloatOutput", "dynamic_linear", "static_linear",
           "translation_table"]

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


@torch.library.custom_op("graphopt_quant::static_linear", mutates_args=())
def static_linear(x: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor, weight: torch.Tensor,
                  weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (weight * weight_scale) + bias`` with ``x`` quantized to uint8 by a calibrated scale; float out.

    ``x_scale`` float32 and ``x_zero_point`` uint8 are 0-d; ``weight`` is int8 ``[in, out]``,
    ``weight_scale`` float ``[out]``.
    """
    scale, zero_point = float(x_scale), int(x_zero_point)
    q = qd.quantize_per_tensor.default(x, scale, zero_point, 0, 255, torch.uint8)
    xd = qd.dequantize_per_tensor.default(q, scale, zero_point, 0, 255, torch.uint8)
    out = torch.matmul(xd, weight.float() * weight_scale)
    return out + bias if bias is not None else out


@static_linear.register_fake
def _(x: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor, weight: torch.Tensor,
      weight_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


def _matmul_integer_to_float_schema() -> onnx.defs.OpSchema:
    """The signature of onnxruntime's ``com.microsoft.MatMulIntegerToFloat``, for onnx (and so onnxscript)."""
    schema = onnx.defs.OpSchema
    optional = schema.FormalParameterOption.Optional
    inputs = [("A", "T1"), ("B", "T2"), ("a_scale", "T3"), ("b_scale", "T3"), ("a_zero_point", "T1"),
              ("b_zero_point", "T2"), ("bias", "T3")]
    return schema(
        "MatMulIntegerToFloat", "com.microsoft", 1,
        doc="onnxruntime: uint8/int8 matrix product scaled to float, plus a bias (contrib op)",
        inputs=[schema.FormalParameter(name, kind, param_option=optional if index > 3 else
                                       schema.FormalParameterOption.Single)
                for index, (name, kind) in enumerate(inputs)],
        outputs=[schema.FormalParameter("Y", "T3")],
        type_constraints=[("T1", ["tensor(uint8)", "tensor(int8)"], ""), ("T2", ["tensor(uint8)", "tensor(int8)"], ""),
                          ("T3", ["tensor(float)", "tensor(float16)"], "")],
    )


def _static_linear_onnx(x: Any, x_scale: Any, x_zero_point: Any, weight: Any, weight_scale: Any,
                        bias: Any = None) -> Any:
    """``QuantizeLinear`` by the calibrated scale, then onnxruntime's ``MatMulIntegerToFloat`` (OpenVINO reads it).

    The standard-op form (``MatMulInteger → Cast → Mul``) is not fused by onnxruntime here: its
    constant folding multiplies the two constant scales first, and the fusion looks for that ``Mul``.
    """
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    ensure_schema("MatMulIntegerToFloat", _matmul_integer_to_float_schema)
    x_q = op.QuantizeLinear(x, x_scale, x_zero_point)
    return Opset("com.microsoft", 1).MatMulIntegerToFloat(x_q, weight, x_scale, weight_scale, x_zero_point, None,
                                                          bias)


def translation_table() -> dict[Any, Any]:
    """Custom ONNX translations for graphopt's own quantized ops (``torch.onnx.export(custom_translation_table=)``)."""
    return {torch.ops.graphopt_quant.dynamic_linear.default: _dynamic_linear_onnx,
            torch.ops.graphopt_quant.static_linear.default: _static_linear_onnx}


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


@dataclass(frozen=True)
class StaticLinearFloatOutput(NodeRewrite, KernelSubstitution):
    """Static int8 linear read only by float ops -> ``graphopt_quant::static_linear`` (MatMulIntegerToFloat)."""

    name = "onnx-static-linear-float-output"
    stat = "static_float_linears"

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """Rewrite a static int8 linear whose output is not quantized in place."""
        operands = gemm_operands(node)
        if (operands is None or node.target != aten.linear.default
                or any(is_quantize(user) for user in output_point(node).users)):  # an int8 op reads it
            return False
        x_arg, w_arg, bias, axis = operands
        activation = static_activation(x_arg)
        weight = int8_weight(gm, w_arg, axis)
        if activation is None or weight is None or not is_quantize(activation[0]):
            return False
        source = activation[0].args[0]
        _, scale, zero_point = activation
        q_weight, scales = weight
        constants = [register_constant(gm, f"{node.name}_{stem}", value, before=node) for stem, value in (
            ("x_scale", torch.tensor(scale, dtype=torch.float32)),
            ("x_zero_point", torch.tensor(zero_point, dtype=torch.uint8)),
            ("weight_int8_t", q_weight.t().contiguous()), ("weight_scale", scales))]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.graphopt_quant.static_linear.default, (source, *constants, bias))
        infer_meta(new)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return True
