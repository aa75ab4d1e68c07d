"""The ``gpu`` target: the optimized fx graph runs on CUDA, weights and inputs moved there."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.errors import DeviceUnavailableError
from graphopt.ir import clone_graph_module
from graphopt.target import Target

__all__ = ["GpuTarget", "retarget_device_constants"]


def _retarget(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.device) and value.type == "cpu":
        return device
    if isinstance(value, (list, tuple)):
        return type(value)(_retarget(v, device) for v in value)
    return value


def retarget_device_constants(gm: fx.GraphModule, device: torch.device) -> int:
    """Point ops that name the CPU device (``arange(device=cpu)``, ``.to(cpu)``...) at ``device``.

    Returns the number of nodes changed.
    """
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        kwargs = dict(node.kwargs)
        if kwargs.get("device") in ("cpu", torch.device("cpu")):
            kwargs["device"] = device
        args = _retarget(node.args, device)
        kwargs = {k: _retarget(v, device) for k, v in kwargs.items()}
        if args != node.args or kwargs != dict(node.kwargs):
            node.args, node.kwargs = args, kwargs
            changed += 1
    gm.recompile()
    return changed


class GpuTarget(Target):
    """Run the optimized graph with PyTorch on the current CUDA device."""

    name = "gpu"

    def __init__(self, device: str | torch.device = "cuda") -> None:
        self.device = torch.device(device)

    def check_available(self) -> None:
        """Fail early, before any work, when CUDA is missing."""
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
            raise DeviceUnavailableError(
                f"target='gpu' needs a CUDA GPU, but torch.cuda.is_available() is False ({build}). "
                "Use target='cpu' or target='onnx' here, or run on a machine with an NVIDIA GPU "
                "and a CUDA build of torch."
            )

    def lower(self, gm: fx.GraphModule, example_args: tuple[Any, ...], example_kwargs: dict[str, Any]) -> Callable[..., Any]:
        """A CUDA copy of the graph module (the CPU graph stays for export and inspection)."""
        self.check_available()
        on_device = clone_graph_module(gm).to(self.device)
        retarget_device_constants(on_device, self.device)
        return on_device

    def move_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Copy tensor arguments to the GPU (no-op for those already there)."""
        def to_device(x: Any) -> Any:
            return x.to(self.device, non_blocking=True) if isinstance(x, torch.Tensor) else x

        return pytree.tree_map(to_device, (args, kwargs))
