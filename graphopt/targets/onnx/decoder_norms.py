"""Residual add + RMSNorm as onnxruntime's ``SkipSimplifiedLayerNormalization``: one kernel instead of nine.

Every block of a Llama-family decoder adds its residual and normalises the sum:
``h = x + f(x); y = rms_norm(h)``. torch.onnx writes ``aten.rms_norm`` below opset 23 as
``Pow``/``ReduceMean``/``Add``/``Sqrt``/``Reciprocal``/``Mul``/``Mul``/``Cast``, so with the add
that is nine nodes per norm, two norms per layer: on a decode step, where each node costs more
in dispatch than in arithmetic, they add up. onnxruntime's contrib op
``com.microsoft.SkipSimplifiedLayerNormalization`` computes the sum and its norm in one kernel
and also returns the sum (the next residual).

:class:`SkipRmsNorm` replaces ``rms_norm(a + b, [D], weight, eps)`` with
``graphopt_onnx::skip_rms_norm``, whose PyTorch body is those two ATen ops (the rewrite is
verified like any other) and whose translation writes the contrib op. ``clear_unused_outputs``
then blanks the op's optional outputs nothing reads (its mean and inverse deviation), which
onnxruntime does not compute for inference.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import onnx
import torch
import torch.fx as fx

from graphopt.ir.graph import same_shape
from graphopt.ir.meta import infer_meta
from graphopt.ir.op_args import argument
from graphopt.passes.base import NodeRewrite
from graphopt.targets.onnx.contrib_ops import ensure_schema

__all__ = ["SKIP_RMS_NORM", "SkipRmsNorm", "clear_unused_outputs", "has_rms_norm", "skip_rms_norm",
           "translation_table"]

aten = torch.ops.aten


@torch.library.custom_op("graphopt_onnx::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + skip, weight, eps), x + skip)`` over the last dim: the reference of onnxruntime's op."""
    total = x + skip
    return torch.rms_norm(total, [total.shape[-1]], weight, eps), total


@skip_rms_norm.register_fake
def _(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    shape = torch.broadcast_shapes(x.shape, skip.shape)
    return x.new_empty(shape), x.new_empty(shape)


SKIP_RMS_NORM = torch.ops.graphopt_onnx.skip_rms_norm.default


def has_rms_norm(gm: fx.GraphModule) -> bool:
    """True when ``gm`` has an ``aten.rms_norm``."""
    return bool(gm.graph.find_nodes(op="call_function", target=aten.rms_norm.default))


@dataclass(frozen=True)
class SkipRmsNorm(NodeRewrite):
    """``rms_norm(a + b)`` over the last dim, with a weight -> ``graphopt_onnx::skip_rms_norm`` (see the module)."""

    name: ClassVar[str] = "onnx-skip-rms-norm"
    stat: ClassVar[str] = "skip_rms_norm"
    dead_code_after: ClassVar[bool] = True

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool | str:
        """Replace one ``rms_norm`` of a sum (and the sum)."""
        if node.op != "call_function" or node.target is not aten.rms_norm.default:
            return False
        total, shape = node.args[:2]
        weight, eps = argument(node, "weight"), argument(node, "eps")
        if not isinstance(total, fx.Node) or total.target is not aten.add.Tensor or len(total.args) != 2 \
                or total.kwargs.get("alpha", 1) != 1:
            return False
        x, skip = total.args
        matching = isinstance(x, fx.Node) and isinstance(skip, fx.Node) and same_shape(x, skip) and same_shape(x, total)
        if weight is None or eps is None or len(shape) != 1 or not matching:
            return "not a weighted norm over the last dim of a sum of equal shapes"
        graph = gm.graph
        with graph.inserting_before(node):
            fused = graph.call_function(SKIP_RMS_NORM, (x, skip, weight, float(eps)))
            infer_meta(fused)
            normed, summed = (graph.call_function(operator.getitem, (fused, index)) for index in range(2))
            infer_meta(normed)
            infer_meta(summed)
        node.replace_all_uses_with(normed)
        total.replace_all_uses_with(summed)
        graph.erase_node(node)
        return True


_OPTIONAL_OUTPUTS = {("com.microsoft", "SkipSimplifiedLayerNormalization"): (1, 2, 3)}
"""Contrib ops whose outputs at these indices may be left unnamed (not computed)."""


def clear_unused_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (changed in place) with the optional outputs nothing reads left unnamed."""
    read = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    for node in model.graph.node:
        for index in _OPTIONAL_OUTPUTS.get((node.domain, node.op_type), ()):
            if index < len(node.output) and node.output[index] not in read:
                node.output[index] = ""
    return model


def _skip_simplified_layer_norm_schema() -> onnx.defs.OpSchema:
    """The signature of onnxruntime's ``SkipSimplifiedLayerNormalization``, for onnx (and so onnxscript)."""
    schema = onnx.defs.OpSchema
    optional = schema.FormalParameterOption.Optional
    return schema(
        "SkipSimplifiedLayerNormalization", "com.microsoft", 1,
        doc="onnxruntime: RMS normalization of input + skip (+ bias), also returning the sum (contrib op)",
        inputs=[schema.FormalParameter("input", "T"), schema.FormalParameter("skip", "T"),
                schema.FormalParameter("gamma", "T"), schema.FormalParameter("bias", "T", param_option=optional)],
        outputs=[schema.FormalParameter("output", "T"), schema.FormalParameter("mean", "U", param_option=optional),
                 schema.FormalParameter("inv_std_var", "U", param_option=optional),
                 schema.FormalParameter("input_skip_bias_sum", "T", param_option=optional)],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("U", ["tensor(float)"], "")],
        attributes=[schema.Attribute("epsilon", schema.AttrType.FLOAT, "", required=False)],
    )


def _skip_rms_norm_onnx(x: Any, skip: Any, weight: Any, eps: float = 1e-6) -> Any:
    from onnxscript.values import Opset  # onnxscript takes about 1.4 s to import: only while exporting

    ensure_schema("SkipSimplifiedLayerNormalization", _skip_simplified_layer_norm_schema)
    output, _, _, total = Opset("com.microsoft", 1).SkipSimplifiedLayerNormalization(x, skip, weight, epsilon=eps)
    return output, total


def translation_table() -> dict[Any, Callable[..., Any]]:
    """Translation of ``graphopt_onnx::skip_rms_norm`` for ``torch.onnx.export(custom_translation_table=...)``."""
    return {SKIP_RMS_NORM: _skip_rms_norm_onnx}
