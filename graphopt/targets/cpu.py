"""The ``cpu`` target: the optimized fx graph runs as a PyTorch module on the CPU."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx

from graphopt.shapes import DynamicDims
from graphopt.target import Target

__all__ = ["CpuTarget"]


class CpuTarget(Target):
    """Run the optimized graph module directly with PyTorch's CPU kernels."""

    name = "cpu"

    def lower(
        self,
        gm: fx.GraphModule,
        example_args: tuple[Any, ...],
        example_kwargs: dict[str, Any],
        dynamic: DynamicDims | None = None,
    ) -> Callable[..., Any]:
        """The graph module itself is the runnable form."""
        gm.recompile()
        return gm
