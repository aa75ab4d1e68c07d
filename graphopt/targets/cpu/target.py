"""The ``cpu`` target: the optimized graph, lowered to oneDNN's fused kernels, runs with PyTorch on the CPU."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from graphopt.analysis.cost import total_flops
from graphopt.errors import LoweringError
from graphopt.ir.graph import snapshot_graph_module, state_update_nodes
from graphopt.passes.base import Pass
from graphopt.passes.cleanup import DeadCodeElimination
from graphopt.passes.quantize.patterns import has_quantized_ops, static_activation
from graphopt.targets.base import LoweringContext, Target
from graphopt.targets.common.channels_last import conv_share
from graphopt.targets.common.lowering import computes_in, run_lowering
from graphopt.targets.cpu.attention import QuantizedGraphAttention
from graphopt.targets.cpu.lowering import CpuLowering, float_lowering_passes, lower_graph
from graphopt.targets.cpu.packed_attention import QuantizedPackedAttention
from graphopt.targets.cpu.packed_rows import CHOOSE_QPARAMS, PackedRows
from graphopt.targets.cpu.quantized import INT8_LOWERING
from graphopt.targets.cpu.weight_only import CpuWeightOnlyKernels
from graphopt.targets.onnx.options import OnnxLowering, openvino_installed

__all__ = ["CpuTarget"]

ONNX_BACKENDS = ("onnxruntime", "openvino")
"""``CpuLowering`` backends that run the graph's ONNX export in another runtime (with its own int8 kernels)."""

MEASURED_RUNTIME_MIN_FLOPS = 10**8
"""Float32 graphs of at least this many floating point operations per call (``CpuTarget.runtime_candidates``)
are timed in PyTorch and OpenVINO by ``optimize``, which keeps the faster: about half a millisecond on two cores."""

OPENVINO_INT8_MIN_CONV_SHARE = 0.5
"""A static int8 graph runs in OpenVINO (``CpuTarget.for_graph``) when convolutions do this share of its work."""


class CpuTarget(Target):
    """Run the optimized graph with PyTorch's CPU kernels, after the lowering in ``graphopt.targets.cpu.lowering``.

    ``lowering`` chooses it (default ``CpuLowering()``: oneDNN epilogue fusion, channels-last for
    convolution nets, prepacked weights); ``CpuLowering(fuse=False, layout="contiguous")`` runs
    the optimized ATen graph as it is, ``CpuLowering(backend="inductor")`` through torch.compile.
    A quantized graph first runs ``packed-rows``, then ``INT8_LOWERING`` (oneDNN int8 and
    weight-only kernels), then ``packed-attention`` and ``trimmed-attention``.
    """

    name = "cpu"

    def __init__(self, lowering: CpuLowering | None = None) -> None:
        self.lowering: CpuLowering = lowering or CpuLowering()

    def lowering_passes(self, gm: fx.GraphModule) -> list[Pass]:
        """The int8 / weight-only kernel rewrites for a quantized graph, the float lowering's otherwise."""
        if has_quantized_ops(gm):
            choice = self.lowering.weight_kernels
            kernels = [replace(p, choice=choice) if isinstance(p, CpuWeightOnlyKernels) else p for p in INT8_LOWERING]
            packing = self.lowering.packs_rows
            dynamic = any(node.target is CHOOSE_QPARAMS for node in gm.graph.nodes)
            return [*([PackedRows(statistics_on_kept_rows=dynamic)] if packing else []), *kernels,
                    *([QuantizedPackedAttention()] if packing else []), QuantizedGraphAttention()]
        return float_lowering_passes(self.lowering)

    def for_graph(self, gm: fx.GraphModule) -> CpuTarget:
        """OpenVINO for the graphs it runs much faster than oneDNN through PyTorch, where it is installed.

        Only with the default PyTorch backend. Two kinds of graph:

        * a float graph computing in bfloat16, on a CPU with bfloat16 instructions (AVX512-BF16 or
          AMX), too small to measure (``runtime_candidates`` lists the larger ones: measured,
          ResNet-50 21 vs 35 ms, but MiniLM at 8 x 128 on sentences of a dozen tokens 75 vs 16 ms
          in PyTorch, which skips the padded rows);
        * a static int8 graph (int8 activations) whose convolutions do at least
          ``OPENVINO_INT8_MIN_CONV_SHARE`` of the work: ResNet-50 14.2 ms (bf16 hint) or 20.0 (f32)
          against 43.3 in PyTorch. On transformers PyTorch's int8 linears are as fast (MiniLM 8 x
          128: 39.0 ms against OpenVINO's 42.2), so those keep them, as do weight-only and dynamic
          int8 graphs.
        """
        if self.lowering.backend != "graph" or not openvino_installed():
            return self
        if has_quantized_ops(gm, activations=True):
            static = any(static_activation(node) is not None for node in gm.graph.nodes)
            if not static or conv_share(gm) < OPENVINO_INT8_MIN_CONV_SHARE:
                return self
        elif has_quantized_ops(gm) or not computes_in(gm, torch.bfloat16) or not cpu_has_bfloat16():
            return self
        elif self.runtime_candidates(gm):
            return self  # large enough to measure PyTorch against OpenVINO (runtime_candidates)
        return self.with_lowering(replace(self.lowering, backend="openvino"))  # type: ignore[return-value]

    def runtime_candidates(self, gm: fx.GraphModule) -> list[CpuTarget]:
        """PyTorch and OpenVINO for a large float graph, where OpenVINO is installed: measured, not ruled.

        Which one is faster depends on the graph more than on its kind. Measured on the zoo
        (OpenVINO f32 against this lowering, ms): ResNet-50 41.8 / 51.5, mobilenet_v2 6.0 / 11.1,
        BERT 140.8 / 163.3, ViT 48.4 / 58.4, but MiniLM at 8 x 128 103.1 / 94.4 (22 since PyTorch's
        lowering skips padded rows). Only with the default PyTorch backend, for graphs of at least
        ``MEASURED_RUNTIME_MIN_FLOPS`` per call (below it a call takes well under a millisecond and
        OpenVINO's compile, seconds, does not pay), without state (a cache the graph writes),
        computing in float32, or in bfloat16 on a CPU with bfloat16 instructions (OpenVINO then
        runs the graph's bfloat16 as ``for_graph`` would). int8 graphs go by ``for_graph``'s rules.
        """
        if self.lowering.backend != "graph" or not openvino_installed() or has_quantized_ops(gm):
            return []
        if computes_in(gm, torch.float16) or state_update_nodes(gm) or total_flops(gm) < MEASURED_RUNTIME_MIN_FLOPS:
            return []
        if computes_in(gm, torch.bfloat16):
            if not cpu_has_bfloat16():
                return []
            # OpenVINO as for_graph would run it (the graph's bfloat16), against PyTorch's bfloat16 kernels
            return [self, self.with_lowering(replace(self.lowering, backend="openvino"))]  # type: ignore[list-item]
        return [self, self.with_lowering(self.lowering.on_openvino())]  # type: ignore[list-item]

    def specializes_decode(self, gm: fx.GraphModule) -> bool:
        """Inductor's compiled kernels, or onnxruntime steps whose decode step would run graphopt's kernels."""
        if self.lowering.backend in ONNX_BACKENDS:
            return self.weight_kernels_round_within_bound(gm)
        return super().specializes_decode(gm)

    def weight_kernels_round_within_bound(self, gm: fx.GraphModule) -> bool:
        """True when the onnxruntime session may run graphopt's kernels on ``gm`` (``native_kernels_apply``)."""
        if self.lowering.backend not in ONNX_BACKENDS:
            return False
        from graphopt.targets.onnx.lowering import native_kernels_apply  # loads onnx: only for these backends

        return native_kernels_apply(gm, self.lowering.onnx_lowering())

    def exact_weight_lowering(self) -> CpuTarget | None:
        """The next more exact lowering of weight-only layers, for a compressed model whose kernels missed its budget.

        int8 activations (``weight_only_activations="int8"``) go back to float ones first; in
        onnxruntime, graphopt's kernels (16-bit activations, float16 scales) then give way to
        onnxruntime's float ``MatMulNBits``; in PyTorch, float weights computed once replace PyTorch's
        int8/int4 kernels (bfloat16). None when the weights are computed once already, or onnxruntime's
        own kernels run on float activations.
        """
        if self.lowering.weight_only_activations == "int8":  # first: the same kernels on float activations
            return self.with_lowering(replace(self.lowering, weight_only_activations="float"))  # type: ignore[return-value]
        if self.lowering.backend in ONNX_BACKENDS:
            from graphopt.targets.onnx.native_kernels import native_kernels_run  # loads onnx: only for these

            if native_kernels_run(self.lowering.onnx_lowering()):
                stock = replace(self.lowering.onnx or OnnxLowering(), native_kernels=False)
                return self.with_lowering(replace(self.lowering, onnx=stock))  # type: ignore[return-value]
        if self.lowering.backend != "graph" or self.lowering.weight_kernels == "dequantize-once":
            return None
        return self.with_lowering(replace(self.lowering, weight_kernels="dequantize-once"))  # type: ignore[return-value]

    def lower(self, gm: fx.GraphModule, context: LoweringContext) -> Callable[..., Any]:
        """A lowered copy of the graph (``gm`` itself stays the portable ATen graph)."""
        gm.recompile()
        if self.lowering.weight_only_activations == "int8" and self.lowering.backend != "onnxruntime":
            raise LoweringError("weight_only_activations='int8' runs in onnxruntime (MatMulNBits with int8 "
                                "activations): use CpuLowering(backend='onnxruntime', weight_only_activations='int8')")
        # int8 QDQ / weight-only graph: its own lowering to PyTorch's int8/int4 kernels (float graphs never get
        # here); onnxruntime and OpenVINO have kernels of their own (graphopt.targets.onnx)
        if has_quantized_ops(gm) and self.lowering.backend not in ONNX_BACKENDS:
            result = run_lowering(snapshot_graph_module(gm), self.lowering_passes(gm), context)
            lowered = result.graph_module
            if context.report is not None:
                counts = result.stats_of({p.name for p in INT8_LOWERING if p.name != DeadCodeElimination.name})
                kernels = ", ".join(f"{count} {kind}" for kind, count in counts.items() if count)
                context.report.notes.append(f"cpu lowering: int8 kernels: {kernels or 'none matched'}")
            result.report(context.report, "cpu lowering: quantized kernels")
            if has_quantized_ops(lowered, activations=True) or not _only_float_ops(lowered):
                return lowered
            gm = lowered  # weight-only graph whose weights were all dequantized once: a float graph, lowered as one
        return lower_graph(gm, context, self.lowering, self.lowering_passes(gm))


def cpu_has_bfloat16() -> bool:
    """True when this CPU has bfloat16 arithmetic instructions (Linux's ``/proc/cpuinfo``: avx512_bf16, amx_bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _only_float_ops(gm: fx.GraphModule) -> bool:
    """True when every call in ``gm`` is an ATen op, ``getitem`` or a float ``graphopt_cpu`` op: no int8 kernel left."""
    return all(n.target is operator.getitem
               or (isinstance(n.target, torch._ops.OpOverload) and n.target.namespace in ("aten", "graphopt_cpu"))
               for n in gm.graph.nodes if n.op == "call_function")
