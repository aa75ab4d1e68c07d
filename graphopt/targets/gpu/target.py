"""The ``gpu`` target: the optimized fx graph runs on CUDA, weights and inputs moved there."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor

from graphopt.errors import DeviceUnavailableError
from graphopt.ir.graph import attribute_value, snapshot_graph_module
from graphopt.ir.verify import compare_outputs
from graphopt.passes.base import Pass
from graphopt.passes.quantize.patterns import has_quantized_ops
from graphopt.targets.base import LoweringContext, Target
from graphopt.targets.gpu.lowering import GpuLowering, float_lowering_passes, lower_for_gpu
from graphopt.targets.gpu.quantized import INT8_LOWERING

__all__ = ["GpuTarget", "retarget_device_constants", "retarget_meta_values"]


def _retarget(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.device) and value != device:
        return device
    if isinstance(value, (list, tuple)):
        return type(value)(_retarget(v, device) for v in value)
    return value


def retarget_device_constants(gm: fx.GraphModule, device: torch.device) -> int:
    """Point ops that name a device (``arange(device=cpu)``, ``.to(cpu)``...) at ``device``.

    Returns the number of nodes changed.
    """
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        kwargs = dict(node.kwargs)
        if isinstance(kwargs.get("device"), str):
            kwargs["device"] = torch.device(kwargs["device"])
        args = _retarget(node.args, device)
        kwargs = {k: _retarget(v, device) for k, v in kwargs.items()}
        if args != node.args or kwargs != dict(node.kwargs):
            node.args, node.kwargs = args, kwargs
            changed += 1
    gm.recompile()
    return changed


def retarget_meta_values(gm: fx.GraphModule, device: torch.device) -> None:
    """Point the fake tensors recorded on nodes (``meta["val"]``) at ``device``, where the graph now runs.

    Capture records them on the CPU; a rewrite made after the move infers new nodes' values from
    them and from the moved weights, and fake tensors on two devices do not mix. Constants that
    passes registered carry their real value: it is replaced by the moved one.
    """
    def move(value: Any) -> Any:
        if isinstance(value, FakeTensor) and value.device != device:
            with value.fake_mode:
                return value.to(device)
        return value

    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if node.op == "get_attr" and isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            moved = attribute_value(gm, node)  # a constant a pass registered: its value, now on the device
            node.meta["val"] = moved if moved is not None else value
        elif value is not None:
            node.meta["val"] = pytree.tree_map(move, value)


class GpuTarget(Target):
    """Run the optimized graph with PyTorch on the current CUDA device, lowered as ``lowering`` says."""

    name = "gpu"

    def __init__(self, device: str | torch.device = "cuda", lowering: GpuLowering | None = None) -> None:
        self.device = torch.device(device)
        self.lowering: GpuLowering = lowering or GpuLowering()

    def check_available(self) -> None:
        """Fail early, before any work, when CUDA is missing."""
        if not torch.cuda.is_available():
            cuda = torch.version.cuda
            build = "a CPU-only build of torch" if cuda is None else f"torch built for CUDA {cuda}"
            raise DeviceUnavailableError(
                f"target='gpu' needs a CUDA GPU, but torch.cuda.is_available() is False ({build}). "
                "Use target='cpu' or target='onnx' here, or run on a machine with an NVIDIA GPU "
                "and a CUDA build of torch."
            )

    def lowering_passes(self, gm: fx.GraphModule) -> list[Pass]:
        """The int8 kernel rewrites for a quantized graph, then the float lowering's (epilogues, layout)."""
        int8 = list(INT8_LOWERING) if has_quantized_ops(gm) else []
        return int8 + float_lowering_passes(self.lowering)

    def lower(self, gm: fx.GraphModule, context: LoweringContext) -> Callable[..., Any]:
        """Move the graph module to the GPU (one copy of the weights) and lower a copy of it there.

        Lowering: int8 GEMMs for a quantized graph, cuBLASLt / cuDNN epilogues, SDPA backend order,
        CUDA graphs for static shapes (``graphopt.targets.gpu.lowering``).
        """
        self.check_available()
        gm.to(self.device)
        retarget_device_constants(gm, self.device)
        retarget_meta_values(gm, self.device)
        moved = context.with_inputs(*self.move_inputs(context.example_args, context.example_kwargs))
        return lower_for_gpu(snapshot_graph_module(gm), moved, self.lowering, self.lowering_passes(gm))

    def native_error(self, model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     reference: list[Any]) -> float:
        """How far the unoptimized model on this GPU is from its CPU outputs (TF32, cuDNN algorithms)."""
        twin = copy.deepcopy(model).eval().to(self.device)
        moved_args, moved_kwargs = self.move_inputs(args, kwargs)
        with torch.inference_mode():
            outputs = pytree.tree_leaves(twin(*moved_args, **moved_kwargs))
        del twin
        return compare_outputs(outputs, reference).max_abs_diff  # compares on the CPU

    def move_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Copy tensor arguments to the GPU (no-op for those already there)."""
        def to_device(x: Any) -> Any:
            return x.to(self.device, non_blocking=True) if isinstance(x, torch.Tensor) else x

        return pytree.tree_map(to_device, (args, kwargs))
