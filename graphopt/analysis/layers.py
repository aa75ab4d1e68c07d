"""Per-layer cost: the node costs of ``graphopt.analysis.cost`` summed per module, as a report section."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from graphopt.analysis.cost import NodeCost
from graphopt.report import PlotSpec, ReportSection

__all__ = ["LayerCost", "cost_section", "group_by_layer"]

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
