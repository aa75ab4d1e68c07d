"""Running a lowering: an ordered list of graph rewrites, each returning counts of what it rewrote."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.fx as fx

from graphopt.ir.graph import prune_unused_attributes

__all__ = ["Lowering", "run_lowerings"]

Lowering = Callable[[fx.GraphModule], dict[str, int]]
"""One rewrite of a quantized graph, in place; returns counts by kind (kernels placed, near misses)."""


def run_lowerings(gm: fx.GraphModule, lowerings: Sequence[Lowering]) -> dict[str, int]:
    """Run ``lowerings`` on ``gm`` in order, then drop dead nodes and attributes; returns the summed counts."""
    counts: dict[str, int] = {}
    for lowering in lowerings:
        for key, value in lowering(gm).items():
            counts[key] = counts.get(key, 0) + value
    gm.graph.eliminate_dead_code()
    prune_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()
    return counts
