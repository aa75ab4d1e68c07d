"""``graphopt.analyze``: the cost model of a model, per layer, as a report section with plots."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from graphopt.analysis.cost import NodeCost, count_parameters, node_costs, profile_nodes
from graphopt.errors import InputError
from graphopt.ir.capture import capture, flatten_inputs
from graphopt.report import PlotSpec, Report, ReportSection
from graphopt.workflows.optimized_model import OptimizedModel

__all__ = ["LayerCost", "ModelAnalysis", "analyze", "cost_section", "group_by_layer"]

_PLOTTED_LAYERS = 40


@dataclass
class LayerCost:
    """The summed cost of the nodes that came from one module (a "layer")."""

    name: str
    module_type: str
    nodes: int = 0
    flops: int = 0
    macs: int = 0
    param_bytes: int = 0
    activation_bytes: int = 0
    seconds: float | None = None


def _layer_name(cost: NodeCost, depth: int | None) -> str:
    if not cost.module:
        return "(graph)"
    if depth is None:
        return cost.module
    return ".".join(cost.module.split(".")[:depth])


def group_by_layer(costs: Mapping[str, NodeCost], depth: int | None = None) -> list[LayerCost]:
    """Sum node costs per module path (cut to its first ``depth`` components), in graph order."""
    layers: dict[str, LayerCost] = {}
    for cost in costs.values():
        if cost.op in ("placeholder", "get_attr", "output"):
            continue
        name = _layer_name(cost, depth)
        layer = layers.setdefault(name, LayerCost(name, cost.module_type if depth is None else ""))
        layer.nodes += 1
        layer.flops += cost.flops
        layer.macs += cost.macs
        layer.param_bytes += cost.param_bytes
        layer.activation_bytes += cost.activation_bytes
        if cost.seconds is not None:
            layer.seconds = (layer.seconds or 0.0) + cost.seconds
    return list(layers.values())


def cost_section(layers: list[LayerCost], title: str = "Cost per layer") -> ReportSection:
    """A report section: one row per layer and plots of measured time and FLOPs of the costliest layers."""
    total_seconds = sum(layer.seconds or 0.0 for layer in layers)
    rows = [
        [layer.name, layer.module_type, layer.nodes, round(layer.flops / 1e6, 3), round(layer.macs / 1e6, 3),
         round(layer.param_bytes / 1024, 1), round(layer.activation_bytes / 1024, 1),
         None if layer.seconds is None else round(layer.seconds * 1e3, 4),
         None if layer.seconds is None or not total_seconds else round(100 * layer.seconds / total_seconds, 2)]
        for layer in layers
    ]
    by_time = sorted(layers, key=lambda layer: -(layer.seconds or 0.0) if total_seconds else -layer.flops)
    shown = sorted(by_time[:_PLOTTED_LAYERS], key=layers.index)
    labels = [layer.name for layer in shown]
    plots = []
    if total_seconds:
        plots.append(PlotSpec("barh", f"Measured time per layer (ms, the {len(shown)} slowest)", labels,
                              {"ms": [(layer.seconds or 0.0) * 1e3 for layer in shown]}, y_label="ms"))
    plots.append(PlotSpec("barh", "MFLOPs per layer", labels, {"MFLOPs": [layer.flops / 1e6 for layer in shown]},
                          y_label="MFLOPs"))
    description = (f"{len(layers)} layers; {sum(layer.flops for layer in layers) / 1e9:.3f} GFLOPs, "
                   f"{sum(layer.macs for layer in layers) / 1e9:.3f} GMACs"
                   + (f", {total_seconds * 1e3:.2f} ms measured (sum of per-node medians)" if total_seconds else ""))
    headers = ["layer", "type", "nodes", "MFLOPs", "MMACs", "weights KiB", "activations KiB", "ms", "% time"]
    return ReportSection(title, description, headers, rows, plots)


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
