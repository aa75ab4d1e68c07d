"""The ``cpu`` target: the optimized graph, lowered to oneDNN's fused kernels, runs with PyTorch on the CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx

from graphopt.ir.capture import flatten_inputs
from graphopt.ir.shapes import DynamicDims
from graphopt.report import Report
from graphopt.targets.base import Target
from graphopt.targets.cpu.lowering import CpuLowering, lower_graph

__all__ = ["CpuTarget"]


class CpuTarget(Target):
    """Run the optimized graph with PyTorch's CPU kernels, after the lowering in ``cpu_lowering``.

    ``lowering`` chooses it (default ``CpuLowering()``: oneDNN epilogue fusion, channels-last for
    convolution nets, prepacked weights); ``CpuLowering(fuse=False, layout="contiguous")`` runs
    the optimized ATen graph as it is, ``CpuLowering(backend="inductor")`` through torch.compile.
    """

    name = "cpu"

    def __init__(self, lowering: CpuLowering | None = None) -> None:
        self.lowering = lowering or CpuLowering()

    def lower(
        self,
        gm: fx.GraphModule,
        example_args: tuple[Any, ...],
        example_kwargs: dict[str, Any],
        dynamic: DynamicDims | None = None,
        report: Report | None = None,
    ) -> Callable[..., Any]:
        """A lowered copy of the graph (``gm`` itself stays the portable ATen graph)."""
        from graphopt.passes.quantize.patterns import has_quantized_ops

        gm.recompile()
        if has_quantized_ops(gm):  # int8 QDQ graph: its own lowering to int8 kernels (float graphs never get here)
            lowered = _lower_quantized(gm, report)
            if has_quantized_ops(gm, activations=True) or not _only_aten_ops(lowered):
                return lowered
            gm = lowered  # weight-only graph whose weights were all dequantized once: a float graph, lowered as one
        flat = flatten_inputs(gm, example_args, example_kwargs)
        return lower_graph(gm, example_args, example_kwargs, flat, self.lowering, report, dynamic=dynamic)


def _only_aten_ops(gm: fx.GraphModule) -> bool:
    """True when every call in ``gm`` is an ATen op (or ``getitem``): no int8 kernel, no quantized op left."""
    import operator

    import torch

    return all(n.target is operator.getitem
               or (isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "aten")
               for n in gm.graph.nodes if n.op == "call_function")


def _lower_quantized(gm: fx.GraphModule, report: Report | None) -> fx.GraphModule:
    """A copy of the quantized graph whose QDQ patterns run oneDNN int8 kernels."""
    from graphopt.ir.graph import snapshot_graph_module
    from graphopt.targets.cpu.quantized import lower_quantized_for_cpu

    lowered = snapshot_graph_module(gm)
    counts = lower_quantized_for_cpu(lowered)
    if report is not None:
        kernels = ", ".join(f"{count} {kind}" for kind, count in counts.items() if count)
        report.notes.append(f"cpu lowering: int8 kernels: {kernels or 'none matched'}")
    return lowered
