"""The options of the ``onnx`` target's lowering (``OnnxTarget(lowering=OnnxLowering(...))``).

Apart from ``graphopt.targets.onnx.lowering`` so that importing the option class (as
``graphopt.targets`` does) does not load onnx, about a second of import time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

__all__ = ["Level", "OnnxLowering", "WeightOnlyActivations", "check_weight_only_activations"]

Level = Literal["disabled", "basic", "extended", "all"]
WeightOnlyActivations = Literal["float", "int8"]


@dataclass(frozen=True)
class OnnxLowering:
    """Options of the ONNX lowering (``OnnxTarget(lowering=...)``); see ``graphopt.targets.onnx.lowering``.

    ``fused_attention``: export attention as one ``Attention`` node (opset 23). ``optimization_level``:
    onnxruntime's session optimizations. ``transformer_optimizer``: also run onnxruntime's offline
    transformer optimizer. ``threads``: intra-op threads. ``optimized_model_path``: where onnxruntime
    saves the model it optimized. ``weight_only_activations``: what the inputs of weight-only int4/int8
    layers (``MatMulNBits``) are computed in: ``"float"`` (exact to the graph) or ``"int8"``, quantized
    per block on the fly (``accuracy_level=4``: W4A8 / W8A8, faster on CPUs with VNNI, less exact;
    a compressed language model's budget judges it and falls back to ``"float"`` if it misses).
    """

    fused_attention: bool = True
    optimization_level: Level = "all"
    transformer_optimizer: bool = False
    threads: int | None = None
    optimized_model_path: str | None = None
    weight_only_activations: WeightOnlyActivations = "float"

    def __post_init__(self) -> None:
        if self.optimization_level not in ("disabled", "basic", "extended", "all"):
            raise ValueError("optimization_level must be 'disabled', 'basic', 'extended' or 'all', "
                             f"got {self.optimization_level!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        check_weight_only_activations(self.weight_only_activations)

    def label(self) -> str:
        """Short name of this lowering, for reports and ``tune``."""
        parts = ["ort"]
        parts.append("attention" if self.fused_attention else "opset-default")
        if self.transformer_optimizer:
            parts.append("ort-transformers")
        if self.optimization_level != "all":
            parts.append(self.optimization_level)
        if self.weight_only_activations == "int8":
            parts.append("a8")
        return "-".join(parts)

    def candidates(self) -> list[OnnxLowering]:
        """The variants ``tune`` measures: this one, without fused attention, with the transformer optimizer."""
        options = [self, replace(self, fused_attention=not self.fused_attention),
                   replace(self, transformer_optimizer=not self.transformer_optimizer)]
        return list(dict.fromkeys(options))


def check_weight_only_activations(value: str) -> None:
    """``ValueError`` unless ``value`` is a ``weight_only_activations`` choice."""
    if value not in ("float", "int8"):
        raise ValueError(f"weight_only_activations must be 'float' or 'int8', got {value!r}")
