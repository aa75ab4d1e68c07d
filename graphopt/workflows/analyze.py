"""``graphopt.analyze``: the cost model of a model, per layer, as a report section with plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from graphopt.analysis.cost import NodeCost, count_parameters, node_costs, profile_nodes
from graphopt.analysis.layers import LayerCost, cost_section, group_by_layer
from graphopt.errors import InputError
from graphopt.ir.capture import capture, flatten_inputs
from graphopt.report import Report
from graphopt.workflows.optimized_model import OptimizedModel

__all__ = ["ModelAnalysis", "analyze"]

@dataclass
class ModelAnalysis:
    """The cost model of one captured graph: per node, per layer, totals, and a report with plots.

    ``str()`` prints the per-layer table, ``to_html(path)`` writes the report with its plots.
    """

    graph_module: fx.GraphModule
    nodes: dict[str, NodeCost]
    layers: list[LayerCost]
    parameters: int
    report: Report = field(default_factory=lambda: Report(target="analysis"))

    @property
    def flops(self) -> int:
        """FLOPs of one run on the example inputs."""
        return sum(c.flops for c in self.nodes.values())

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one run on the example inputs."""
        return sum(c.macs for c in self.nodes.values())

    @property
    def seconds(self) -> float:
        """Sum of the measured per-node times (medians)."""
        return sum(c.seconds or 0.0 for c in self.nodes.values())

    def to_html(self, path: str | Path) -> Path:
        """Write the analysis as a self-contained HTML page (tables and plots)."""
        return self.report.to_html(path)

    def __str__(self) -> str:
        return "\n".join(
            [f"{self.parameters:,} parameters, {self.flops / 1e9:.3f} GFLOPs, {self.macs / 1e9:.3f} GMACs, "
             f"{self.seconds * 1e3:.2f} ms measured", *[s.text_table() for s in self.report.sections]]
        )


def analyze(
    model: torch.nn.Module,
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    repeats: int = 5,
    depth: int | None = None,
) -> ModelAnalysis:
    """The cost of ``model`` on ``example_inputs`` per node and per layer (FLOPs, MACs, bytes, measured time).

    ``model`` is a ``torch.nn.Module`` (captured as ``graphopt.optimize`` captures it, without
    passes) or the result of ``graphopt.optimize`` (its ``portable_graph`` on its
    ``example_inputs``; the per-layer section is then also appended to its report). Layers are
    the innermost modules nodes came from; ``depth=2`` groups by the first two components of
    the module path instead (``encoder.layer``...). Times are medians over ``repeats`` runs.
    """
    optimized: OptimizedModel | None = model if isinstance(model, OptimizedModel) else None
    if optimized is not None:
        gm = optimized.portable_graph
        flat = flatten_inputs(gm, optimized.example_inputs, optimized.example_kwargs)
    else:
        if example_inputs is None:
            raise InputError("analyze(model, example_inputs): give example inputs, e.g. (torch.randn(1, 3, 224, 224),)")
        captured = capture(model, example_inputs, example_kwargs, share_weights=True)
        gm, flat = captured.graph_module, captured.flat_inputs
    costs = node_costs(gm, profile_nodes(gm, flat, repeats=repeats))
    layers = group_by_layer(costs, depth)
    section = cost_section(layers)
    report = Report(target="analysis", sections=[section])
    if optimized is not None:
        optimized.report.sections.append(section)
    return ModelAnalysis(gm, costs, layers, count_parameters(gm), report)
