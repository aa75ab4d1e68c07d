"""Analyses of the IR: cost model, balanced stage splits, pipeline throughput, aliasing, pruning dependencies."""

from graphopt.analysis.balanced_split import PartitionError, balanced_split, graph_items
from graphopt.analysis.cost import NodeCost, count_parameters, node_costs, profile_nodes, total_flops, total_macs

__all__ = [
    "NodeCost",
    "PartitionError",
    "balanced_split",
    "count_parameters",
    "graph_items",
    "node_costs",
    "profile_nodes",
    "total_flops",
    "total_macs",
]
