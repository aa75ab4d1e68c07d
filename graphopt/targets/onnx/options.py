"""The options of the ``onnx`` target's lowering (``OnnxTarget(lowering=OnnxLowering(...))``).

Apart from ``graphopt.targets.onnx.lowering`` so that importing the option class (as
``graphopt.targets`` does) does not load onnx, about a second of import time.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import Literal

from graphopt.targets.onnx.opsets import check_opset

__all__ = ["Level", "OnnxLowering", "OpenVinoPrecision", "Runtime", "WeightOnlyActivations",
           "check_weight_only_activations", "openvino_installed"]

Level = Literal["disabled", "basic", "extended", "all"]
WeightOnlyActivations = Literal["float", "int8"]
Runtime = Literal["onnxruntime", "openvino"]
OpenVinoPrecision = Literal["f32", "bf16"]


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
    ``opset``: the ONNX opset of the file (``MIN_OPSET`` to ``MAX_OPSET``; default: 23 where the graph has
    attention and ``fused_attention`` is on, the exporter's otherwise). Below 23 attention is exported as
    standard ops (see ``graphopt.targets.onnx.opsets`` for which onnxruntime reads which opset).
    ``runtime``: what runs the exported model, ``"onnxruntime"`` (CPU execution provider) or ``"openvino"``
    (OpenVINO's CPU device, ``pip install openvino``; ``graphopt.targets.onnx.openvino_runtime``). The
    onnxruntime session settings (``optimization_level``, ``transformer_optimizer``, ``optimized_model_path``,
    int8 ``weight_only_activations``) are refused with ``"openvino"``. ``openvino_precision``: OpenVINO's
    inference precision, ``"f32"`` (the file as written: a ``precision="bf16"`` graph's reduced layers still
    run in bfloat16) or ``"bf16"`` (every op OpenVINO can in bfloat16; needs the fidelity budget of a lossy
    pass). Unset: ``"f32"`` (a ``precision="bf16"`` graph still runs its reduced layers in bfloat16).
    ``native_kernels``: let the onnxruntime session run graphopt's own kernels where they apply (4-bit
    weight-only layers on float activations, which the kernels round to 16 bits per group of 32:
    ``graphopt.Int4Linear``, built on first use with the system's C++ compiler, x86-64 with AVX512-VNNI;
    ``graphopt.targets.onnx.native_kernels``); the exported file keeps standard ops.
    """

    fused_attention: bool = True
    optimization_level: Level = "all"
    transformer_optimizer: bool = False
    threads: int | None = None
    optimized_model_path: str | None = None
    weight_only_activations: WeightOnlyActivations = "float"
    opset: int | None = None
    runtime: Runtime = "onnxruntime"
    openvino_precision: OpenVinoPrecision | None = None
    native_kernels: bool = True

    def __post_init__(self) -> None:
        if self.optimization_level not in ("disabled", "basic", "extended", "all"):
            raise ValueError("optimization_level must be 'disabled', 'basic', 'extended' or 'all', "
                             f"got {self.optimization_level!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        check_weight_only_activations(self.weight_only_activations)
        check_opset(self.opset)
        self._check_runtime()

    def _check_runtime(self) -> None:
        """``ValueError`` for an unknown runtime or precision, or settings the chosen runtime does not have."""
        if self.runtime not in ("onnxruntime", "openvino"):
            raise ValueError(f"runtime must be 'onnxruntime' or 'openvino', got {self.runtime!r}")
        if self.openvino_precision not in (None, "f32", "bf16"):
            raise ValueError(f"openvino_precision must be None, 'f32' or 'bf16', got {self.openvino_precision!r}")
        if self.runtime == "onnxruntime" and self.openvino_precision is not None:
            raise ValueError("openvino_precision applies to runtime='openvino' only")
        if self.runtime == "openvino":
            onnxruntime_only = {"optimization_level": self.optimization_level != "all",
                                "transformer_optimizer": self.transformer_optimizer,
                                "optimized_model_path": self.optimized_model_path is not None,
                                "weight_only_activations='int8'": self.weight_only_activations == "int8"}
            asked = [name for name, set_ in onnxruntime_only.items() if set_]
            if asked:
                raise ValueError(f"{', '.join(asked)}: onnxruntime session settings, which runtime='openvino' does "
                                 "not have (its transformer optimizer and int8 MatMulNBits write onnxruntime's "
                                 "contrib ops); leave them at their defaults or use runtime='onnxruntime'")

    @property
    def runs_native_kernels(self) -> bool:
        """True when a session under these options may run graphopt's own kernels (onnxruntime, float activations)."""
        return self.native_kernels and self.runtime == "onnxruntime" and self.weight_only_activations == "float"

    @property
    def lossy(self) -> bool:
        """True when the runtime computes beyond the graph (OpenVINO's bfloat16 inference): it needs a budget."""
        return self.openvino_precision == "bf16"

    def label(self) -> str:
        """Short name of this lowering, for reports and ``tune``."""
        if self.runtime == "openvino":
            return self._openvino_label()
        parts = ["ort"]
        if self.opset is not None:
            parts.append(f"opset{self.opset}")
        else:
            parts.append("attention" if self.fused_attention else "opset-default")
        if self.transformer_optimizer:
            parts.append("ort-transformers")
        if self.optimization_level != "all":
            parts.append(self.optimization_level)
        if self.weight_only_activations == "int8":
            parts.append("a8")
        if not self.native_kernels:
            parts.append("stock-kernels")
        return "-".join(parts)

    def _openvino_label(self) -> str:
        """``openvino``, its precision when set (``openvino-bf16``), and a non-default opset / attention."""
        parts = ["openvino", *([self.openvino_precision] if self.openvino_precision else [])]
        if self.opset is not None:
            parts.append(f"opset{self.opset}")
        elif not self.fused_attention:
            parts.append("opset-default")
        return "-".join(parts)

    def candidates(self) -> list[OnnxLowering]:
        """The variants ``tune`` measures: this one, without fused attention, with the transformer optimizer.

        With an ``opset`` chosen, attention follows it: no variant flips ``fused_attention``. The other
        runtime is a variant too: OpenVINO where it is installed, onnxruntime for an OpenVINO config
        (OpenVINO has no transformer optimizer variant).
        """
        flipped = replace(self, fused_attention=not self.fused_attention) if self.opset is None else self
        if self.runtime == "openvino":
            return list(dict.fromkeys([self, flipped, replace(self, runtime="onnxruntime", openvino_precision=None)]))
        options = [self, flipped,
                   replace(self, transformer_optimizer=not self.transformer_optimizer)]
        if self.opset is None:  # the optimizer fuses the standard-op attention chains, not ONNX's Attention
            options.append(replace(self, fused_attention=False, transformer_optimizer=True))
        if openvino_installed():
            openvino = replace(self, runtime="openvino", optimization_level="all", transformer_optimizer=False,
                               optimized_model_path=None, weight_only_activations="float")
            options += [openvino, replace(openvino, openvino_precision="bf16")]  # bf16: tune, for lossy graphs only
        return list(dict.fromkeys(options))


def openvino_installed() -> bool:
    """True when the ``openvino`` package is installed (looked up, not imported: importing it takes a second)."""
    return importlib.util.find_spec("openvino") is not None


def check_weight_only_activations(value: str) -> None:
    """``ValueError`` unless ``value`` is a ``weight_only_activations`` choice."""
    if value not in ("float", "int8"):
        raise ValueError(f"weight_only_activations must be 'float' or 'int8', got {value!r}")
