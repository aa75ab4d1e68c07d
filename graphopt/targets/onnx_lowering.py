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

from graphopt.errors import LoweringError, UnsupportedOpError
from graphopt.report import Report, ReportSection
from graphopt.shapes import DynamicDims

__all__ = ["FUSED_ONNX_OPS", "OnnxLowering", "fused_op_counts", "lower_onnx", "session_options"]

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


def _export(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: DynamicDims | None,
            options: OnnxLowering, notes: list[str]) -> onnx.ModelProto:
    from graphopt.targets.onnx import export_graph_to_onnx

    if options.fused_attention and _has_attention(gm):
        try:
            return export_graph_to_onnx(gm, args, kwargs, dynamic, opset=FUSED_ATTENTION_OPSET)
        except UnsupportedOpError:
            raise
        except LoweringError as error:
            notes.append(f"opset {FUSED_ATTENTION_OPSET} export failed ({str(error)[:160]}); exported at the "
                         "exporter's default opset, attention unfused")
    return export_graph_to_onnx(gm, args, kwargs, dynamic)


def _run(model: onnx.ModelProto, feed: dict[str, Any]) -> list[Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _transformer_optimized(model: onnx.ModelProto, feed: dict[str, Any], notes: list[str]) -> onnx.ModelProto:
    """``onnxruntime.transformers.optimizer`` on a copy of ``model``; ``model`` when it fails or changes outputs."""
    from onnxruntime.transformers.optimizer import optimize_model

    from graphopt.verify import compare_outputs

    try:
        with contextlib.redirect_stdout(io.StringIO()), _quiet("onnxruntime.transformers"):
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


@contextlib.contextmanager
def _quiet(name: str) -> Any:
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def lower_onnx(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: DynamicDims | None,
               options: OnnxLowering, report: Report | None = None) -> Any:
    """Export ``gm`` with fused attention, optionally optimize it offline, and open a tuned session."""
    from graphopt.capture import flatten_inputs
    from graphopt.targets.onnx import OnnxRuntimeModule

    notes: list[str] = []
    model = _export(gm, args, kwargs, dynamic, options, notes)
    if options.transformer_optimizer:
        flat = [t for t in flatten_inputs(gm, args, kwargs) if isinstance(t, torch.Tensor)]
        names = [i.name for i in model.graph.input]
        feed = {name: t.detach().cpu().numpy() for name, t in zip(names, flat, strict=False)}
        model = _transformer_optimized(model, feed, notes)
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
