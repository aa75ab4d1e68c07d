"""The ``onnx`` target: export through ``torch.onnx``, check the model, run it in onnxruntime.

The export and the session module live in ``graphopt.targets.onnx.export`` (re-exported here),
the lowering options and steps in ``graphopt.targets.onnx.lowering``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import onnx
import torch.fx as fx

from graphopt.ir.shapes import DynamicDims
from graphopt.passes.base import Pass
from graphopt.targets.base import LoweringContext, Target
from graphopt.targets.onnx.export import OnnxRuntimeModule, export_graph_to_onnx, export_passes
from graphopt.targets.onnx.lowering import export_model, lower_onnx, native_kernels_apply
from graphopt.targets.onnx.native_kernels import native_kernels_run
from graphopt.targets.onnx.options import OnnxLowering

__all__ = ["OnnxRuntimeModule", "OnnxTarget", "export_graph_to_onnx", "export_onnx_model"]


def export_onnx_model(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any],
                      dynamic: DynamicDims | None = None, opset: int | None = None) -> onnx.ModelProto:
    """The ONNX model of ``gm`` at ``opset``: attention fused from opset 23, standard ops below it.

    Without an ``opset`` the exporter's default opset (attention as standard ops), as before.
    Raises ``LoweringError`` when the graph cannot be written at that opset.
    """
    if opset is None:
        return export_graph_to_onnx(gm, args, kwargs, dynamic)
    context = LoweringContext(tuple(args), dict(kwargs), dynamic)
    return export_model(gm, context, OnnxLowering(opset=opset)).model


class OnnxTarget(Target):
    """Export to ONNX and run with onnxruntime (CPU execution provider), for edge runtimes."""

    name = "onnx"

    def __init__(self, lowering: OnnxLowering | None = None) -> None:
        self.lowering: OnnxLowering = lowering or OnnxLowering()

    def exact_weight_lowering(self) -> OnnxTarget | None:
        """The next more exact weight-only kernels: int8 activations -> float ones -> onnxruntime's own float path.

        graphopt's kernels (16-bit activations, float16 scales) come before onnxruntime's float
        ``MatMulNBits``; None once that runs.
        """
        if self.lowering.weight_only_activations == "int8":
            return self.with_lowering(replace(self.lowering, weight_only_activations="float"))  # type: ignore[return-value]
        if native_kernels_run(self.lowering):
            return self.with_lowering(replace(self.lowering, native_kernels=False))  # type: ignore[return-value]
        return None

    def weight_kernels_round_within_bound(self, gm: fx.GraphModule) -> bool:
        """True when the session may run graphopt's int4/int8 kernels on ``gm`` (``native_kernels_apply``)."""
        return native_kernels_apply(gm, self.lowering)

    def specializes_decode(self, gm: fx.GraphModule) -> bool:
        """True when the decode step would run graphopt's kernels: they need the rows fixed (``NATIVE_MAX_ROWS``)."""
        return self.weight_kernels_round_within_bound(gm)

    def lowering_passes(self, gm: fx.GraphModule) -> list[Pass]:
        """The rewrites before export: custom ops onnxruntime runs with int8 / compressed-weight kernels."""
        return export_passes(gm)

    def lower(self, gm: fx.GraphModule, context: LoweringContext) -> Callable[..., Any]:
        """Export (fused attention), check, and open a tuned onnxruntime session (``onnx.lowering``)."""
        return lower_onnx(gm, context, self.lowering, self.lowering_passes(gm))
