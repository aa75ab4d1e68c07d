"""Analyses of the IR: the cost model (``cost``), per-layer reports (``layers``) and stage partitioning."""

from graphopt.analysis.cost import NodeCost, count_parameters, node_costs, profile_nodes, total_flops, total_macs
from graphopt.analysis.layers import LayerCost, ModelAnalysis, analyze
from graphopt.analysis.partitioning import PartitionError, balanced_split, graph_items

__all__ = [
    "LayerCost",
    "ModelAnalysis",
    "NodeCost",
    "PartitionError",
    "analyze",
    "balanced_split",
    "count_parameters",
    "graph_items",
    "node_costs",
    "profile_nodes",
    "total_flops",
    "total_macs",
]
