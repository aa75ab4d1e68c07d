"""torch.onnx's dynamo exporter without its second decomposition, for graphs that are already ATen.

``torch.onnx.export`` exports the module again (torch.export), then runs
``run_decompositions`` with its ONNX table, which traces every op once more with fake tensors
and symbolic shapes, then translates. A graph graphopt hands it is already a functional ATen
graph; when every op in the re-export has an ONNX translation, that decomposition has nothing
to decompose (the table leaves translated ops alone) and only costs time: 7-12 s of a SmolLM2
decoder step's lowering. :func:`export_translated_directly` re-exports, checks the ops, and
translates with the same registry, type promotion and assertion removal as the exporter.

It uses the exporter's internal modules (``torch.onnx._internal.exporter``); when they are
missing or differ, or any op would need decomposing, it returns None and the caller uses
``torch.onnx.export``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import node_dtype
from graphopt.ir.inference_form import to_as_copies
from graphopt.ir.op_args import argument

__all__ = ["export_translated_directly"]

log = logging.getLogger(__name__)


def export_translated_directly(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any],
                               dynamic_shapes: Any, opset: int | None, optimize: bool,
                               custom_translation_table: dict[Any, Any] | None) -> Any | None:
    """``gm`` as an ``ONNXProgram``, translated without re-decomposition; None when that path does not apply."""
    try:
        from torch.onnx import _constants as onnx_constants
        from torch.onnx._internal._lazy_import import onnxscript_apis
        from torch.onnx._internal.exporter import _constants, _core, _decomp, _dynamic_shapes, _fx_passes, _registration
    except ImportError as error:
        log.debug("direct ONNX translation unavailable: %s", error)
        return None
    try:
        opset_version = opset if opset is not None else onnx_constants.ONNX_DEFAULT_OPSET  # as torch.onnx.export
        registry = _registration.ONNXRegistry.from_torchlib(
            opset_version=max(opset_version, _constants.TORCHLIB_OPSET))
        for op, translation in {**_COMPOSITE_TRANSLATIONS, **(custom_translation_table or {})}.items():
            registry.register_op(op, translation, is_complex=False)
        shapes, renames = _dynamic_shapes.convert_str_to_export_dim(dynamic_shapes)
        program = torch.export.export(gm, tuple(args), kwargs or None, dynamic_shapes=shapes, strict=False)
        to_as_copies(program.graph_module)  # the re-export's training IR keeps .to() calls
        missing = _needs_decomposition(program.graph_module, set(_decomp.get_onnx_implemented_overloads(registry)))
        if missing:
            log.debug("direct ONNX translation skipped: %s would need decomposing", sorted(map(str, missing))[:5])
            return None
        graph_module = program.graph_module
        _fx_passes.insert_type_promotion_nodes(graph_module)
        program._graph_module = _fx_passes.remove_assertion_nodes(graph_module)
        onnx_program = _core._exported_program_to_onnx_program(program, registry=registry)
        onnx_program.model = onnxscript_apis.convert_version(onnx_program.model, opset_version)
        if optimize:
            onnx_program.optimize()
        if renames and dynamic_shapes is not None:
            onnx_program._rename_dynamic_axes(dynamic_shapes)
    except Exception as error:  # the exporter's own path reports any real problem with a proper message
        log.debug("direct ONNX translation failed (%s: %s); using torch.onnx.export", type(error).__name__, error)
        return None
    return onnx_program


_ASSERTIONS = frozenset({"_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range_for_size"})


def _needs_decomposition(gm: fx.GraphModule, translated: set[Any]) -> set[Any]:
    """The op overloads of ``gm`` with no ONNX translation (and any mutating op: those need functionalizing)."""
    missing = set()
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            if node.op == "call_function" and isinstance(target, torch._ops.HigherOrderOperator):
                missing.add(target)
            continue
        if target._opname in _ASSERTIONS:
            continue
        if target._schema.is_mutable or target not in translated or not _translatable(node):
            missing.add(target)
    return missing


aten = torch.ops.aten


def _translatable(node: fx.Node) -> bool:
    """False for a composite op below whose translation here this node falls (it needs decomposing)."""
    if node.target is aten.rms_norm.default:
        inputs_float32 = isinstance(node.args[0], fx.Node) and node_dtype(node.args[0]) == torch.float32
        return argument(node, "eps") is not None and isinstance(argument(node, "weight"), fx.Node) and inputs_float32
    if node.target in (aten.__and__.Tensor, aten.__or__.Tensor):
        return all(isinstance(a, fx.Node) and node_dtype(a) == torch.bool for a in node.args[:2])
    if node.target is aten.adaptive_avg_pool2d.default:
        return list(node.args[1]) == [1, 1]
    return True


def _rms_norm_onnx(x: Any, normalized_shape: Any, weight: Any = None, eps: float | None = None) -> Any:
    """``aten.rms_norm`` of float32 with a weight and an eps, as torch.onnx decomposes it below opset 23."""
    from onnxscript import opset18 as op

    axes = op.Constant(value_ints=[-(i + 1) for i in range(len(normalized_shape))])
    mean_square = op.ReduceMean(op.Mul(x, x), axes, keepdims=1)
    inverse = op.Reciprocal(op.Sqrt(op.Add(mean_square, op.Constant(value_float=float(eps)))))
    return op.Mul(op.Mul(x, inverse), weight)


def _and_onnx(a: Any, b: Any) -> Any:
    from onnxscript import opset18 as op

    return op.And(a, b)


def _or_onnx(a: Any, b: Any) -> Any:
    from onnxscript import opset18 as op

    return op.Or(a, b)


def _global_average_pool_onnx(x: Any, output_size: Any) -> Any:
    """``adaptive_avg_pool2d(x, [1, 1])``: the mean over the spatial dims."""
    from onnxscript import opset18 as op

    return op.ReduceMean(x, op.Constant(value_ints=[-2, -1]), keepdims=1)


_COMPOSITE_TRANSLATIONS = {aten.rms_norm.default: _rms_norm_onnx, aten.__and__.Tensor: _and_onnx,
                           aten.__or__.Tensor: _or_onnx, aten.adaptive_avg_pool2d.default: _global_average_pool_onnx}
"""Translations of composite ops the exporter only decomposes (``_translatable`` says for which nodes)."""
