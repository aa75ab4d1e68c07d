"""How the ``onnx`` target turns the verified graph into a fast onnxruntime session.

1. **Fused attention in the file.** Graphs with ``scaled_dot_product_attention`` are exported at
   ONNX opset 23, where the exporter writes one ``Attention`` node per attention instead of the
   MatMul / Softmax / Where / IsNaN chain of older opsets (onnxruntime's transformer optimizer
   fuses no attention in that chain, and neither does its session). A graph the exporter cannot
   write at opset 23 falls back to its default opset, with a note in the report.
   ``OnnxLowering(opset=N)`` writes opset ``N`` instead (``graphopt.targets.onnx.opsets``): attention
   fused from 23 on, standard ops below it, and no fallback to another opset.
2. **onnxruntime's fusions.** The session runs at ``ORT_ENABLE_ALL``: on the CPU it fuses
   SkipLayerNormalization, Gelu/FastGelu/BiasGelu, MatMul+Add into Gemm, conv + activation into
   FusedConv and NCHWc-blocked convolutions. ``transformer_optimizer=True`` also runs
   ``onnxruntime.transformers.optimizer`` offline (its fused operators are then in the file
   itself); its result is used only when it computes what the plain export computes.
3. **State kept in place.** A graph whose last inputs are state (``LoweringContext.state_inputs``:
   a generation step's key/value cache) runs through ``StatefulOnnxRunner``: IO binding by
   address, the cache updated in place or written into preallocated buffers, never copied
   through numpy.
4. **Session options.** Intra-op threads (default: PyTorch's thread count), one inter-op thread,
   sequential execution; ``optimized_model_path`` saves onnxruntime's optimized model, so a
   deployment can load it without optimizing again.
5. **Another runtime.** ``runtime="openvino"`` compiles the same export in OpenVINO instead of
   opening an onnxruntime session (``graphopt.targets.onnx.openvino_runtime``: its precision rule,
   what it refuses).

The graph's own rewrites are passes verified one by one through the pass manager
(``graphopt.targets.common.lowering``): the custom ops of ``graphopt.targets.onnx.export.export_passes``
(int8 and compressed weights) before any export, and ``ExpandAttentionMasks`` on the copy exported
with fused attention. Their records form an "onnx lowering ...: rewrites" report section.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import onnx
import onnxruntime as ort
import torch
import torch.fx as fx

from graphopt.errors import LoweringError, UnsupportedOpError
from graphopt.ir.graph import node_shape, snapshot_graph_module
from graphopt.ir.verify import compare_outputs
from graphopt.passes.base import Pass, PassResult
from graphopt.passes.quantize.weight_ops import DEQUANTIZE_INT4, DEQUANTIZE_INT8
from graphopt.report import PassRecord, ReportSection
from graphopt.targets.base import LoweringContext
from graphopt.targets.common.lowering import LoweringResult, run_lowering
from graphopt.targets.common.weight_only_kernels import weight_only_linears
from graphopt.targets.onnx.decode_attention import decode_attention_nodes, decode_attention_while, use_decode_attention
from graphopt.targets.onnx.export import OnnxRuntimeModule, export_prepared, prepare_for_export, quiet_loggers
from graphopt.targets.onnx.native_kernels import native_int4_library, native_int4_model, native_kernels_run
from graphopt.targets.onnx.openvino_runtime import CompiledOpenVino, openvino_export, openvino_runner, run_openvino
from graphopt.targets.onnx.opsets import FUSED_ATTENTION_OPSET, opset_of
from graphopt.targets.onnx.options import Level, OnnxLowering
from graphopt.targets.onnx.session_weights import open_session
from graphopt.targets.onnx.stateful import StatefulOnnxRunner

__all__ = ["ATTENTION_EXPORT_PASSES", "FUSED_ONNX_OPS", "ExpandAttentionMasks", "ExportedModel", "Level",
           "OnnxLowering", "expand_attention_masks", "export_model", "fused_op_counts", "lower_onnx",
           "NATIVE_MAX_ROWS", "native_kernels_apply", "onnxruntime_runner", "session_options", "weight_only_rows"]

log = logging.getLogger("graphopt")

FUSED_ONNX_OPS = frozenset({
    "Attention", "MultiHeadAttention", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "BiasGelu",
    "FastGelu", "FusedConv", "FusedMatMul", "FusedGemm", "EmbedLayerNormalization", "Gelu", "LayerNormalization",
    "GroupQueryAttention", "RotaryEmbedding", "SimplifiedLayerNormalization", "BiasAdd", "BiasSplitGelu",
})
"""Operators that stand for a fused chain of simpler ones (standard or ``com.microsoft``)."""


def session_options(options: OnnxLowering) -> Any:
    """The onnxruntime ``SessionOptions`` for ``options``."""
    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    session = ort.SessionOptions()
    session.graph_optimization_level = levels[options.optimization_level]
    session.intra_op_num_threads = options.threads or torch.get_num_threads()
    session.inter_op_num_threads = 1
    session.log_severity_level = 3  # errors only: its warnings (constant folds it skips) are nothing to act on
    session.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if options.optimized_model_path:
        session.optimized_model_filepath = str(options.optimized_model_path)
    return session


NATIVE_MAX_ROWS = 16
"""graphopt's int4/int8 kernels run a graph's weight-only layers only when each reads at most this many rows per call,
fixed in the graph (a decode step: batch x 1 token). On 24 layers of 1536x576 (2 threads) they ran 2.97x
``MatMulNBits``' float path at one row, 1.83x at 4, 1.59x at 8 and 1.44x at 16 in one run; 2.19x at 8, 1.79x at
16, 1.43x at 32 and 1.37x at 64 in another. A prompt's rows are known only at run time, and there that path's
GEMM runs."""


def _input_dim_values(gm: fx.GraphModule, context: LoweringContext) -> dict[Any, int]:
    """The example call's size of every input dim ``gm`` records as a bare symbol (``s0`` -> 1 for one token)."""
    values: dict[Any, int] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, tensor in zip(placeholders, context.flat_inputs(gm), strict=False):
        recorded = node.meta.get("val")
        if not isinstance(recorded, torch.Tensor) or not isinstance(tensor, torch.Tensor):
            continue
        for size, actual in zip(recorded.shape, tensor.shape, strict=False):
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                values[size.node.expr] = int(actual)
    return values


def weight_only_rows(gm: fx.GraphModule, context: LoweringContext | None = None) -> int | None:
    """The most rows any weight-only linear of ``gm`` reads per call (leading dims of its input); None if dynamic.

    With a ``context`` of static shapes, dims the graph recorded as symbolic take the example call's
    sizes (the one-token decode step lowered from a graph captured for any sequence length).
    """
    values = _input_dim_values(gm, context) if context is not None and context.static else {}
    most = 0
    for node, _ in weight_only_linears(gm.graph):
        recorded = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(recorded, torch.Tensor):
            return None
        rows = 1
        for size in recorded.shape[:-1]:
            expr = size.node.expr.xreplace(values) if isinstance(size, torch.SymInt) else size
            if not isinstance(expr, int) and not getattr(expr, "is_number", False):
                return None
            rows *= int(expr)
        most = max(most, rows)
    return most


def native_kernels_apply(gm: fx.GraphModule, options: OnnxLowering) -> bool:
    """True when an onnxruntime session of ``gm`` under ``options`` could run graphopt's int4 / int8 kernels.

    That is: native kernels allowed, float activations, onnxruntime as the runtime, a 4-bit or an
    8-bit weight-only linear whose in-features are a multiple of 32 (an 8-bit one is exported as
    two 4-bit halves, which ``Int8Linear`` runs as one), and the library available here. (The rows
    it reads decide the rest: ``NATIVE_MAX_ROWS``.)
    """
    if not options.runs_native_kernels:
        return False
    eligible = any(dequant.target in (DEQUANTIZE_INT4, DEQUANTIZE_INT8) and isinstance(node.args[0], fx.Node)
                   and node.args[0].meta.get("val") is not None and node.args[0].meta["val"].shape[-1] % 32 == 0
                   for node, dequant in weight_only_linears(gm.graph))
    return eligible and native_kernels_run(options)  # the library is built only for graphs that have such layers


def onnxruntime_runner(model: onnx.ModelProto, out_spec: Any, options: OnnxLowering, notes: list[str], *,
                       rows: int | None) -> OnnxRuntimeModule:
    """An onnxruntime session over ``model``, running graphopt's own kernels where ``options`` allow them.

    4-bit ``MatMulNBits`` layers on float activations run ``graphopt.Int4Linear`` (an int8 layer's
    two halves, ``graphopt.Int8Linear``) in the session's copy of the model (``native_kernels``) when
    ``rows``, the most rows any of them reads per call, is at most ``NATIVE_MAX_ROWS``; ``model``
    itself, what the module saves, keeps ``MatMulNBits``. A decoder's ``GroupQueryAttention`` runs
    ``graphopt.DecodeAttention`` in the session the same way (``decode_attention``). Appends to
    ``notes`` what ran, or why graphopt's kernels did not.
    """
    session = session_options(options)
    session_model = None
    nbits = sum(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" for n in model.graph.node)
    if nbits and options.runs_native_kernels:
        library = native_int4_library()
        small = rows is not None and rows <= NATIVE_MAX_ROWS
        rewrite = native_int4_model(model) if library.path is not None and small else None
        if library.path is None:
            notes.append(f"graphopt's int4/int8 kernels not used ({library.reason}): MatMulNBits runs as exported")
        elif not small:
            count = "a number of rows fixed only at run time" if rows is None else f"{rows} rows"
            notes.append(f"graphopt's int4/int8 kernels not used: the weight-only layers read {count} per call (more "
                         f"than {NATIVE_MAX_ROWS}), where MatMulNBits' dequantize-then-GEMM is faster")
        elif rewrite is not None and rewrite.layers:
            session.register_custom_ops_library(str(library.path))
            session_model = rewrite.model
            notes.append(f"{rewrite.layers} of {nbits} MatMulNBits layers run graphopt's kernels "
                         f"(integer products on 16-bit activations): "
                         f"{rewrite.int4_layers} graphopt.Int4Linear ({rewrite.offsets_folded} with their group "
                         f"offsets folded in), {rewrite.int8_layers} graphopt.Int8Linear (each an int8 layer "
                         "exported as two 4-bit halves)"
                         + (f"; {rewrite.swiglus} SwiGLU blocks run their gate and up layers as one kernel, SiLU "
                            "and product included" if rewrite.swiglus else "")
                         + (f"; {rewrite.skip_norms} residual adds and RMS norms run inside the kernel after them"
                            if rewrite.skip_norms else "")
                         + "; the exported file keeps MatMulNBits")
    if not (options.native_kernels and options.runtime == "onnxruntime" and decode_attention_nodes(model)):
        return OnnxRuntimeModule(model, out_spec, options=session, session_model=session_model)
    library = native_int4_library()
    if library.path is None:
        notes.append(f"graphopt.DecodeAttention not used ({library.reason}): GroupQueryAttention runs as exported")
        return OnnxRuntimeModule(model, out_spec, options=session, session_model=session_model)
    if session_model is None:  # the session's model is the one saved: swapped for the session only, not copied
        session.register_custom_ops_library(str(library.path))
        with decode_attention_while(model) as attention:
            runner = OnnxRuntimeModule(model, out_spec, options=session)
    else:  # already a copy with graphopt's int4 kernels, their library registered
        attention = use_decode_attention(session_model)
        runner = OnnxRuntimeModule(model, out_spec, options=session, session_model=session_model)
    notes.append(f"{attention} GroupQueryAttention nodes run graphopt.DecodeAttention (each key/value head's cache "
                 "read once for all its query heads); the exported file keeps GroupQueryAttention")
    return runner


INT8_ACTIVATIONS_LEVEL = 4
"""``MatMulNBits``' ``accuracy_level`` that quantizes its float input to int8 per block (onnxruntime's contrib op)."""


def quantize_weight_only_activations(model: onnx.ModelProto) -> int:
    """Let every ``MatMulNBits`` of ``model`` compute on int8 activations (in place); how many there are."""
    count = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", INT8_ACTIVATIONS_LEVEL)])
            count += 1
    return count


def fused_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many fused operators ``model`` holds, by ``domain::op`` (``::op`` for standard ones)."""
    counts = Counter(f"{node.domain}::{node.op_type}" for node in model.graph.node if node.op_type in FUSED_ONNX_OPS)
    return dict(sorted(counts.items()))


def _has_attention(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target == torch.ops.aten.scaled_dot_product_attention.default
               for n in gm.graph.nodes)


def expand_attention_masks(gm: fx.GraphModule) -> int:
    """Broadcast SDPA masks to their full ``(..., q_len, kv_len)`` shape; returns how many were expanded.

    onnxruntime's ``Attention`` kernel requires the mask's query dim to equal the query length,
    while PyTorch broadcasts a ``(batch, 1, 1, kv_len)`` padding mask. An ``expand`` is a view, so
    the rewrite is exact and costs no copy in PyTorch.
    """
    expanded = 0
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.scaled_dot_product_attention.default):
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if not isinstance(mask, fx.Node):
            continue
        q_shape, mask_shape = node_shape(node.args[0]), node_shape(mask)
        k_shape = node_shape(node.args[1])
        if q_shape is None or mask_shape is None or k_shape is None or len(mask_shape) < 2:
            continue
        if mask_shape[-2] == q_shape[-2] and mask_shape[-1] == k_shape[-2]:
            continue
        with gm.graph.inserting_before(node):
            sizes = [_size_arg(gm, node.args[0], q_shape, -2), _size_arg(gm, node.args[1], k_shape, -2)]
            full = gm.graph.call_function(torch.ops.aten.expand.default,
                                          (mask, [*[-1] * (len(mask_shape) - 2), *sizes]))
        value, q_value, k_value = (n.meta.get("val") for n in (mask, node.args[0], node.args[1]))
        if all(isinstance(v, torch.Tensor) for v in (value, q_value, k_value)):
            mode = getattr(value, "fake_mode", None)
            with mode if mode is not None else contextlib.nullcontext():
                full.meta["val"] = value.expand(*value.shape[:-2], q_value.shape[-2], k_value.shape[-2])
        node.replace_input_with(mask, full)
        expanded += 1
    if expanded:
        gm.recompile()
    return expanded


def _size_arg(gm: fx.GraphModule, source: fx.Node, shape: tuple[Any, ...], dim: int) -> Any:
    """``shape[dim]`` as an op argument: the int, or a ``sym_size`` node when the dim is dynamic."""
    if isinstance(shape[dim], int):
        return shape[dim]
    size = gm.graph.call_function(torch.ops.aten.sym_size.int, (source, len(shape) + dim))
    value = source.meta.get("val")
    if isinstance(value, torch.Tensor):
        size.meta["val"] = value.shape[dim]
    return size


@dataclass(frozen=True)
class ExpandAttentionMasks(Pass):
    """SDPA masks broadcast to their full ``(..., q_len, kv_len)`` shape (``expand_attention_masks``; exact).

    onnxruntime's ``Attention`` kernel needs them so; run on the copy exported with fused attention.
    """

    name = "expand-attention-masks"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Expand every SDPA mask that broadcasts, in place."""
        expanded = expand_attention_masks(gm)
        return PassResult(expanded > 0, {"expanded": expanded})


ATTENTION_EXPORT_PASSES: tuple[Pass, ...] = (ExpandAttentionMasks(),)
"""The rewrites of the copy exported with fused attention (opset 23), in order."""


def _export(gm: fx.GraphModule, context: LoweringContext, options: OnnxLowering, notes: list[str],
            feed: dict[str, Any]) -> tuple[onnx.ModelProto, list[PassRecord], CompiledOpenVino | None]:
    """The ONNX model of the prepared graph ``gm`` (fused attention when asked and possible), and its rewrites.

    At ``options.opset`` when given: attention fused from ``FUSED_ATTENTION_OPSET`` on (the exporter
    then always emits ``Attention``), standard ops below it. Third: OpenVINO's compile of the
    model from the trial run of fused attention, for the runner to reuse (None otherwise).
    """
    args, kwargs, dynamic = context.example_args, context.example_kwargs, context.dynamic
    fused_opset = options.opset or FUSED_ATTENTION_OPSET
    wants_fused = options.fused_attention if options.opset is None else options.opset >= FUSED_ATTENTION_OPSET
    # OpenVINO transforms the graph as it compiles: onnxscript's optimizer before it cost BERT 3.4 s of a 15.6 s
    # setup, ResNet-50 2.3 s of 7.2, for the same outputs and speed (one process, 15 alternating calls)
    tidy = options.runtime != "openvino"
    if not (wants_fused and _has_attention(gm)):
        return export_prepared(gm, args, kwargs, dynamic, opset=options.opset, graph_optimizer=tidy), [], None
    fused = run_lowering(snapshot_graph_module(gm), ATTENTION_EXPORT_PASSES, context)
    try:
        model = export_prepared(fused.graph_module, args, kwargs, dynamic, opset=fused_opset, graph_optimizer=tidy)
        trial = None  # onnxruntime's Attention kernel is stricter than SDPA: run it once
        if options.runtime == "openvino":
            _, trial = run_openvino(model, _feed_for(model, feed))
        else:
            _run(model, _feed_for(model, feed))
        expanded = fused.stats.get("expanded", 0)
        if expanded:
            notes.append(f"{expanded} attention mask(s) broadcast to (q_len, kv_len) for the Attention op")
        return model, fused.records, trial
    except UnsupportedOpError:
        raise
    except Exception as error:
        if options.opset is not None:  # the user asked for this opset: no silent fallback to another
            raise LoweringError(f"the export at opset {options.opset} (attention fused as ONNX's Attention) failed: "
                                f"{type(error).__name__}: {str(error)[:300]}. Try opset "
                                f"{FUSED_ATTENTION_OPSET - 1} (attention as standard ops).") from error
        notes.append(f"opset {FUSED_ATTENTION_OPSET} export with fused Attention failed "
                     f"({type(error).__name__}: {str(error)[:160]}); exported at the exporter's default opset, "
                     "attention unfused")
    return export_prepared(gm, args, kwargs, dynamic, graph_optimizer=tidy), fused.records, None


def _feed_for(model: onnx.ModelProto, feed: dict[str, Any]) -> dict[str, Any]:
    names = [i.name for i in model.graph.input]
    return dict(zip(names, feed.values(), strict=False))


def _run(model: onnx.ModelProto, feed: dict[str, Any]) -> list[Any]:
    session, _weights = open_session(model, ort.SessionOptions())
    return session.run(None, feed)


def _transformer_optimized(model: onnx.ModelProto, feed: dict[str, Any], notes: list[str]) -> onnx.ModelProto:
    """``onnxruntime.transformers.optimizer`` on a copy of ``model``; ``model`` when it fails or changes outputs."""
    # imported here: onnxruntime's transformer tools take 0.2 s to import, for an option that is off by default
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        with contextlib.redirect_stdout(io.StringIO()), quiet_loggers("onnxruntime.transformers"):
            optimized = optimize_model(copy.deepcopy(model), model_type="bert", num_heads=0, hidden_size=0,
                                       opt_level=0).model
        before = [torch.from_numpy(o) for o in _run(model, feed)]
        after = [torch.from_numpy(o) for o in _run(optimized, feed)]
    except Exception as error:  # the optimizer's pattern matching is best-effort
        notes.append(f"onnxruntime transformer optimizer failed ({type(error).__name__}: {str(error)[:120]}); "
                     "not used")
        return model
    comparison = compare_outputs(after, before)
    if not comparison.ok:
        notes.append(f"onnxruntime transformer optimizer changed the outputs ({comparison.detail}); not used")
        return model
    return optimized


@dataclass
class ExportedModel:
    """What :func:`export_model` wrote: the ONNX model, the verified rewrites of the graph, the notes to report."""

    model: onnx.ModelProto
    rewrites: LoweringResult
    notes: list[str]
    trial: CompiledOpenVino | None = None
    """OpenVINO's compile of ``model`` from the export's trial run, for its runner to reuse."""


def export_model(gm: fx.GraphModule, context: LoweringContext, options: OnnxLowering | None = None,
                 passes: list[Pass] | None = None) -> ExportedModel:
    """Export ``gm`` as the ``onnx`` target does: verified rewrites, fused attention, optional offline optimizer.

    ``passes`` (default ``export_passes(gm)``) rewrite a copy of ``gm`` before export, each
    verified on the context's example inputs. The model's inputs and outputs are named by the
    exporter (after the graph's placeholders and output nodes).
    """
    options = options or OnnxLowering()
    notes: list[str] = []
    prepared = prepare_for_export(gm, context, passes)
    flat = [t for t in context.flat_inputs(gm) if isinstance(t, torch.Tensor)]
    feed = {str(index): t.detach().cpu().numpy() for index, t in enumerate(flat)}
    model, attention_records, trial = _export(prepared.graph_module, context, options, notes, feed)
    if options.transformer_optimizer:
        model = _transformer_optimized(model, _feed_for(model, feed), notes)
    rewrites = LoweringResult(prepared.graph_module, [*prepared.records, *attention_records])
    return ExportedModel(model, rewrites, notes, trial)


def _runtime_fusions(options: OnnxLowering) -> str:
    """Where the runtime fuses more, for the report."""
    if options.runtime == "openvino":
        return "OpenVINO fuses more when it compiles the model"
    return f"onnxruntime fuses more in its session at level '{options.optimization_level}'"


def lower_onnx(gm: fx.GraphModule, context: LoweringContext, options: OnnxLowering,
               passes: list[Pass] | None = None) -> Any:
    """Export ``gm`` with fused attention, optionally optimize it offline, and open a tuned session.

    ``passes`` (default ``export_passes(gm)``) rewrite a copy of ``gm`` before export, each
    verified on the context's example inputs.
    """
    report = context.report
    export_options = options
    if options.runtime == "openvino":  # refuses decoder steps; a bfloat16 graph exports at opset 22+
        export_options, passes = openvino_export(gm, context, options, passes)
    exported = export_model(gm, context, export_options, passes)
    model = exported.model
    trial = exported.trial
    if options.weight_only_activations == "int8":
        count = quantize_weight_only_activations(model)  # in place: a trial compile no longer fits
        exported.notes.append(f"{count} MatMulNBits layer(s) take int8 activations (accuracy_level 4)")
        trial = None
    runner: Any
    if options.runtime == "openvino":
        runner = openvino_runner(model, gm, context, options, exported.notes, trial)
    else:
        runner = onnxruntime_runner(model, getattr(gm, "_out_spec", None), options, exported.notes,
                                    rows=weight_only_rows(gm, context))
    if context.state_inputs:
        runner = StatefulOnnxRunner(runner, context.state_inputs)
    if report is not None:
        fused = fused_op_counts(model)
        opset = opset_of(model)
        report.notes.extend(f"onnx lowering: {note}" for note in exported.notes)
        report.sections.append(ReportSection(
            title=f"onnx lowering '{options.label()}'",
            description=(f"ONNX opset {opset}; fused operators in the file ({_runtime_fusions(options)})"),
            headers=["operator", "count"],
            rows=[[op, count] for op, count in fused.items()] or [["(none)", 0]],
        ))
        if exported.rewrites.records:
            exported.rewrites.report(report, f"onnx lowering '{options.label()}': rewrites")
    return runner
