"""Backends that lower an optimized graph: ``cpu`` and ``gpu`` (PyTorch), ``onnx`` (onnxruntime).

A target is a ``Target`` (``graphopt.targets.base``): ``lower(gm, LoweringContext(...))``, its
ordered ``lowering_passes(gm)`` (verified one by one by the pass manager:
``graphopt.targets.common.lowering``) and ``candidates()`` for ``tune``. Its config is one of
the option classes exported here. Backend code is organised by backend (``cpu/``, ``gpu/``,
``onnx/``; ``common/`` for what two backends share).
"""

from graphopt.passes.base import register_builtin
from graphopt.targets.base import LoweringContext, Target, available_targets, get_target
from graphopt.targets.cpu.lowering import CpuLowering
from graphopt.targets.gpu.lowering import GpuLowering
from graphopt.targets.onnx.options import OnnxLowering

# Lowering rewrites a pipeline may also name (``optimize(passes=[..., "channels-last"])``), imported on first use.
register_builtin("epilogue-fusion", "graphopt.targets.cpu.epilogue:EpilogueFusion")
register_builtin("channels-last", "graphopt.targets.common.channels_last:ChannelsLast")

__all__ = ["CpuLowering", "GpuLowering", "LoweringContext", "OnnxLowering", "Target", "available_targets",
           "get_target"]
