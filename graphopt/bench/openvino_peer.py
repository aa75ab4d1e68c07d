"""OpenVINO as a peer in ``graphopt bench``: the original model's ONNX file compiled by OpenVINO for the CPU.

``openvino`` runs it with OpenVINO's defaults (on a CPU with AVX512-BF16 or AMX that means
bfloat16 inference), ``openvino-f32`` with its precision hint pinned to float32. Rows skip
when OpenVINO is not installed (``pip install openvino``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from graphopt.bench.runner import Backend, ExportedOnnx, Runner

__all__ = ["OpenVinoBackend", "OpenVinoRunner"]


class OpenVinoRunner(ExportedOnnx):
    """Calls an OpenVINO compiled model with torch tensors; keeps its ONNX file in a temp dir."""

    def __init__(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...], threads: int,
                 precision: str | None) -> None:
        import openvino as ov

        super().__init__(model, example_inputs, "graphopt-bench-openvino-")
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = ov.Core().compile_model(str(self.path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Run the compiled model on CPU tensors and return copies of its outputs."""
        results = self.request.infer([x.detach().cpu().numpy() for x in inputs])
        return [torch.from_numpy(results[output].copy()) for output in self.compiled.outputs]


@dataclass(frozen=True)
class OpenVinoBackend(Backend):
    """``torch.onnx.export(model, dynamo=True)`` of the original model, compiled by OpenVINO (CPU plugin).

    ``precision``: OpenVINO's ``INFERENCE_PRECISION_HINT`` (``"f32"``, ``"bf16"``), or None for its default.
    """

    name: str = "openvino"
    threads: int = 1
    precision: str | None = None

    def skip_reason(self) -> str | None:
        """OpenVINO must be installed."""
        return None if importlib.util.find_spec("openvino") else "OpenVINO is not installed (pip install openvino)"

    def prepare(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Runner:
        """Export to ONNX and compile it for the CPU with ``threads`` inference threads."""
        return OpenVinoRunner(model, example_inputs, self.threads, self.precision)

    def artifact_bytes(self, runner: Runner, workdir: Path) -> int | None:
        """The exported ONNX file's size."""
        return runner.disk_bytes() if isinstance(runner, OpenVinoRunner) else None

    def describe(self, runner: Runner) -> str | None:
        """The precision OpenVINO compiled the model in."""
        return f"OpenVINO inference precision {runner.precision}" if isinstance(runner, OpenVinoRunner) else None
