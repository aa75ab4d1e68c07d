"""What a target is (a backend that lowers an optimized graph to something runnable), and its registry."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch.fx as fx

from graphopt.errors import UnknownTargetError
from graphopt.ir.shapes import DynamicDims

__all__ = ["DEFAULT_PIPELINE", "Target", "available_targets", "get_target"]

DEFAULT_PIPELINE: tuple[str, ...] = (
    "remove-dropout",
    "remove-identity",
    "constant-folding",
    "fold-conv-batchnorm",
    "fold-linear-batchnorm",
    "cse",
    "fuse-activations",
    "fuse-norms",
    "fuse-attention",
    "fuse-horizontal",
    "dce",
)


class Target:
    """A backend: says whether it can run here, which passes it wants, and lowers a graph.

    ``lower`` returns a callable taking the model's own arguments (as the user calls the
    model) and returning outputs structured as the model's.
    """

    name: ClassVar[str] = ""
    default_passes: ClassVar[tuple[str, ...]] = DEFAULT_PIPELINE

    def check_available(self) -> None:
        """Raise ``DeviceUnavailableError`` when this machine cannot run the target."""

    def lower(
        self,
        gm: fx.GraphModule,
        example_args: tuple[Any, ...],
        example_kwargs: dict[str, Any],
        dynamic: DynamicDims | None = None,
    ) -> Callable[..., Any]:
        """Turn the optimized graph into a runnable callable."""
        raise NotImplementedError

    def native_error(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], reference: list[Any]) -> float:
        """Max abs error of the *unoptimized* model run the target's way, vs the CPU reference.

        The final check allows twice this on top of the usual tolerance: graphopt must not
        claim more precision than the device gives the original model (0 for CPU targets).
        """
        return 0.0

    def move_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Put call arguments where the lowered module expects them (identity by default)."""
        return args, kwargs


_TARGETS = {
    "cpu": "graphopt.targets.cpu.target:CpuTarget",
    "gpu": "graphopt.targets.gpu.target:GpuTarget",
    "onnx": "graphopt.targets.onnx.target:OnnxTarget",
}


def available_targets() -> list[str]:
    """Names accepted by ``optimize(target=...)``."""
    return sorted(_TARGETS)


def get_target(name: str | Target) -> Target:
    """A target instance from its name (or the instance itself)."""
    if isinstance(name, Target):
        return name
    if name not in _TARGETS:
        raise UnknownTargetError(f"unknown target {name!r}; choose one of {', '.join(available_targets())}")
    module_name, class_name = _TARGETS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
