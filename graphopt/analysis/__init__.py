"""Analyses of the IR: the cost model (``cost``), per-layer reports (``layers``) and stage partitioning."""

from graphopt.analysis.cost import NodeCost, count_parameters, node_costs, profile_nodes, total_flops, total_macs
from graphopt.analysis.layers import LayerCost, ModelAnalysis, analyze

__all__ = [
    "LayerCost",
    "ModelAnalysis",
    "NodeCost",
    "analyze",
    "count_parameters",
    "node_costs",
    "profile_nodes",
    "total_flops",
    "total_macs",
]
