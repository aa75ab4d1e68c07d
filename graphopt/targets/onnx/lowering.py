"""How the ``onnx`` target turns the verified graph into a fast onnxruntime session.

1. **Fused attention in the file.** Graphs with ``scaled_dot_product_attention`` are exported at
   ONNX opset 23, where the exporter writes one ``Attention`` node per attention instead of the
   MatMul / Softmax / Where / IsNaN chain of older opsets (onnxruntime's transformer optimizer
   fuses no attention in that chain, and neither does its session). A graph the exporter cannot
   write at opset 23 falls back to its default opset, with a note in the report.
2. **onnxruntime's fusions.** The session runs at ``ORT_ENABLE_ALL``: on the CPU it fuses
   SkipLayerNormalization, Gelu/FastGelu/BiasGelu, MatMul+Add into Gemm, conv + activation into
   FusedConv and NCHWc-blocked convolutions. ``transformer_optimizer=True`` also runs
   ``onnxruntime.transformers.optimizer`` offline (its fused operators are then in the file
   itself); its result is used only when it computes what the plain export computes.
3. **Session options.** Intra-op threads (default: PyTorch's thread count), one inter-op thread,
   sequential execution; ``optimized_model_path`` saves onnxruntime's optimized model, so a
   deployment can load it without optimizing again.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Literal

import onnx
import torch
import torch.fx as fx

from graphopt.errors import UnsupportedOpError
from graphopt.ir.graph import node_shape
from graphopt.ir.shapes import DynamicDims
from graphopt.report import Report, ReportSection

__all__ = ["FUSED_ONNX_OPS", "OnnxLowering", "expand_attention_masks", "fused_op_counts", "lower_onnx",
           "session_options"]

log = logging.getLogger("graphopt")

Level = Literal["disabled", "basic", "extended", "all"]

FUSED_ONNX_OPS = frozenset({
    "Attention", "MultiHeadAttention", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "BiasGelu",
    "FastGelu", "FusedConv", "FusedMatMul", "FusedGemm", "EmbedLayerNormalization", "Gelu", "LayerNormalization",
    "GroupQueryAttention", "RotaryEmbedding", "SimplifiedLayerNormalization", "BiasAdd", "BiasSplitGelu",
})
"""Operators that stand for a fused chain of simpler ones (standard or ``com.microsoft``)."""

FUSED_ATTENTION_OPSET = 23
"""The first ONNX opset with an ``Attention`` operator (the exporter's translation of SDPA)."""


@dataclass(frozen=True)
class OnnxLowering:
    """Options of the ONNX lowering (``OnnxTarget(lowering=...)``); see the module docstring."""

    fused_attention: bool = True
    optimization_level: Level = "all"
    transformer_optimizer: bool = False
    threads: int | None = None
    optimized_model_path: str | None = None

    def __post_init__(self) -> None:
        if self.optimization_level not in ("disabled", "basic", "extended", "all"):
            raise ValueError("optimization_level must be 'disabled', 'basic', 'extended' or 'all', "
                             f"got {self.optimization_level!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")

    def label(self) -> str:
        """Short name of this lowering, for reports and ``tune``."""
        parts = ["ort"]
        parts.append("attention" if self.fused_attention else "opset-default")
        if self.transformer_optimizer:
            parts.append("ort-transformers")
        if self.optimization_level != "all":
            parts.append(self.optimization_level)
        return "-".join(parts)

    def candidates(self) -> list[OnnxLowering]:
        """The variants ``tune`` measures: this one, without fused attention, with the transformer optimizer."""
        options = [self, replace(self, fused_attention=not self.fused_attention),
                   replace(self, transformer_optimizer=not self.transformer_optimizer)]
        return list(dict.fromkeys(options))


def session_options(options: OnnxLowering) -> Any:
    """The onnxruntime ``SessionOptions`` for ``options``."""
    import onnxruntime as ort

    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    session = ort.SessionOptions()
    session.graph_optimization_level = levels[options.optimization_level]
    session.intra_op_num_threads = options.threads or torch.get_num_threads()
    session.inter_op_num_threads = 1
    session.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if options.optimized_model_path:
        session.optimized_model_filepath = str(options.optimized_model_path)
    return session


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


def _export(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: DynamicDims | None,
            options: OnnxLowering, notes: list[str], feed: dict[str, Any]) -> onnx.ModelProto:
    from graphopt.ir.graph import snapshot_graph_module
    from graphopt.targets.onnx.target import export_graph_to_onnx

    if options.fused_attention and _has_attention(gm):
        fused = snapshot_graph_module(gm)
        expanded = expand_attention_masks(fused)
        try:
            model = export_graph_to_onnx(fused, args, kwargs, dynamic, opset=FUSED_ATTENTION_OPSET)
            _run(model, _feed_for(model, feed))  # onnxruntime's Attention kernel is stricter than SDPA
            if expanded:
                notes.append(f"{expanded} attention mask(s) broadcast to (q_len, kv_len) for the Attention op")
            return model
        except UnsupportedOpError:
            raise
        except Exception as error:
            notes.append(f"opset {FUSED_ATTENTION_OPSET} export with fused Attention failed "
                         f"({type(error).__name__}: {str(error)[:160]}); exported at the exporter's default opset, "
                         "attention unfused")
    return export_graph_to_onnx(gm, args, kwargs, dynamic)


def _feed_for(model: onnx.ModelProto, feed: dict[str, Any]) -> dict[str, Any]:
    names = [i.name for i in model.graph.input]
    return dict(zip(names, feed.values(), strict=False))


def _run(model: onnx.ModelProto, feed: dict[str, Any]) -> list[Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _transformer_optimized(model: onnx.ModelProto, feed: dict[str, Any], notes: list[str]) -> onnx.ModelProto:
    """``onnxruntime.transformers.optimizer`` on a copy of ``model``; ``model`` when it fails or changes outputs."""
    from onnxruntime.transformers.optimizer import optimize_model

    from graphopt.ir.verify import compare_outputs
    from graphopt.targets.onnx.target import quiet_loggers

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


def lower_onnx(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: DynamicDims | None,
               options: OnnxLowering, report: Report | None = None) -> Any:
    """Export ``gm`` with fused attention, optionally optimize it offline, and open a tuned session."""
    from graphopt.ir.capture import flatten_inputs
    from graphopt.targets.onnx.target import OnnxRuntimeModule

    notes: list[str] = []
    flat = [t for t in flatten_inputs(gm, args, kwargs) if isinstance(t, torch.Tensor)]
    feed = {str(index): t.detach().cpu().numpy() for index, t in enumerate(flat)}
    model = _export(gm, args, kwargs, dynamic, options, notes, feed)
    if options.transformer_optimizer:
        model = _transformer_optimized(model, _feed_for(model, feed), notes)
    runner = OnnxRuntimeModule(model, getattr(gm, "_out_spec", None), options=session_options(options))
    if report is not None:
        fused = fused_op_counts(model)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        report.notes.extend(f"onnx lowering: {note}" for note in notes)
        report.sections.append(ReportSection(
            title=f"onnx lowering '{options.label()}'",
            description=(f"ONNX opset {opset}; fused operators in the file (onnxruntime fuses more in its session at "
                         f"level '{options.optimization_level}')"),
            headers=["operator", "count"],
            rows=[[op, count] for op, count in fused.items()] or [["(none)", 0]],
        ))
    return runner
