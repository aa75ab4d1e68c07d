"""Balanced contiguous partitioning of the IR into pipeline stages.

The graph's compute nodes, in graph (topological) order, are cut into ``N`` contiguous stages.
``balanced_split`` solves the problem exactly by dynamic programming: first the smallest
possible cost of the slowest stage (the bottleneck), then, among splits whose slowest stage
stays within ``tolerance`` of it, the one whose cuts carry the fewest bytes. An optional
per-stage memory cap (weights of the stage + its peak live activations) restricts the stages.

``graph_items`` prepares the inputs from a graph: which nodes are cut (compute nodes), which are
recomputed in every stage that needs them instead (weights, constants derived from weights,
integer size computations), the bytes live across each possible cut, and the cuts that are not
allowed (a tuple value, like ``native_layer_norm``'s, would cross them). The dataflow graph is a
``networkx.DiGraph``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
import torch.fx as fx

from graphopt.analysis.cost import shared_weights, value_bytes
from graphopt.errors import GraphoptError
from graphopt.ir.graph import draws_random_numbers
from graphopt.ir.state import STATE_INPUT, state_inputs

__all__ = [
    "BALANCE_KEYS",
    "CarriedState",
    "GraphItems",
    "PartitionError",
    "balanced_split",
    "carried_state",
    "dataflow_graph",
    "graph_items",
    "node_kinds",
    "stage_costs",
]

BALANCE_KEYS = ("time", "flops", "params", "memory")
"""What ``balance=`` may equalize across stages."""


class PartitionError(GraphoptError, ValueError):
    """The model cannot be partitioned as asked (too many stages, a memory cap no split meets, ...)."""


INPUT, WEIGHT, CONSTANT, SIZE, COMPUTE, OUTPUT = "input", "weight", "constant", "size", "compute", "output"


def dataflow_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """The graph's dataflow as a networkx DiGraph of node names (an edge from producer to consumer)."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node.name, op=node.op)
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def _is_tensor_value(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor) or "tensor_meta" in node.meta


def _is_size_value(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)) and not isinstance(
        val, torch.Tensor)


def node_kinds(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Classify every node: input, weight, constant (computed from weights only), size, compute, output.

    Weights, constants and sizes are recomputed in each stage that needs them; inputs and
    compute values are passed from stage to stage. A node is a constant when no input and no
    random op reaches it in the dataflow graph.
    """
    graph = dataflow_graph(gm)
    sources = [n.name for n in gm.graph.nodes if n.op == "placeholder" or draws_random_numbers(n)]
    varying = set(sources).union(*(nx.descendants(graph, name) for name in sources))
    kinds: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            kinds[node] = INPUT
        elif node.op == "get_attr":
            kinds[node] = WEIGHT
        elif node.op == "output":
            kinds[node] = OUTPUT
        elif node.op != "call_function":
            kinds[node] = COMPUTE
        elif _is_size_value(node) and not _is_tensor_value(node):
            kinds[node] = SIZE
        elif node.name not in varying:
            kinds[node] = CONSTANT
        else:
            kinds[node] = COMPUTE
    return kinds


@dataclass
class GraphItems:
    """A graph seen as a sequence of cuttable items (its compute nodes in graph order).

    ``cut_bytes[i]`` is the number of bytes of tensors live across a cut just before item ``i``
    (``cut_bytes[0]``: the model's inputs, ``cut_bytes[n]``: the values the last item leaves to the
    outputs); ``allowed[i]`` says whether a cut may go there. ``peak_bytes[i]`` is the live
    activation bytes while item ``i`` runs, ``weight_bytes[i]`` the bytes of the weights item ``i``
    is the first to read (and of the lifted state its stage keeps). ``state`` lists that state and
    ``state_only_outputs`` the nodes the graph outputs only as new state (their stage returns
    them; nothing routes them to the end); ``shared`` the weights several items read (their
    positions, their bytes), which every stage holding one of those items holds.
    """

    nodes: list[fx.Node]
    kinds: dict[fx.Node, str]
    cut_bytes: np.ndarray
    allowed: np.ndarray
    peak_bytes: np.ndarray
    weight_bytes: np.ndarray
    position: dict[fx.Node, int] = field(default_factory=dict)
    state: list[CarriedState] = field(default_factory=list)
    shared: list[tuple[list[int], float]] = field(default_factory=list)
    state_only_outputs: set[fx.Node] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.nodes)


@dataclass(frozen=True)
class CarriedState:
    """One piece of lifted state (``graphopt.ir.state``) as a split sees it.

    ``placeholder`` takes the state in, ``update`` is the value returned as its new state, and
    ``first``/``last`` are the positions (in ``GraphItems.nodes``) of the first item that reads it
    and of the item computing ``update`` (None where there is none). The stage holding those
    items owns the state: it keeps it from one call to the next, so no cut may fall between them.
    """

    index: int
    placeholder: fx.Node
    update: object
    first: int | None
    last: int | None

    @property
    def bytes(self) -> int:
        """The state's size (the memory its owning stage holds)."""
        return value_bytes(self.placeholder)


def carried_state(gm: fx.GraphModule, position: dict[fx.Node, int]) -> list[CarriedState]:
    """The lifted state of ``gm`` (placeholders marked by ``lift_state``), in state order."""
    marked = state_inputs(gm)
    if not marked:
        return []
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = list(output.args[0])
    first_output = min(marked.values())
    result = []
    for placeholder, output_index in sorted(marked.items(), key=lambda item: item[1]):
        update = leaves[output_index]
        readers = [position[u] for u in placeholder.users if u in position]
        first = min(readers) if readers else None
        last = position.get(update) if isinstance(update, fx.Node) else None
        result.append(CarriedState(output_index - first_output, placeholder, update, first, last))
    return result


def _state_only_outputs(gm: fx.GraphModule, state: Sequence[CarriedState]) -> set[fx.Node]:
    """Nodes the graph outputs only as new state (their stage returns them; nothing routes them to the end)."""
    if not state:
        return set()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    first_output = min(s.placeholder.meta[STATE_INPUT] for s in state)
    plain = {leaf for leaf in list(output.args[0])[:first_output] if isinstance(leaf, fx.Node)}
    return {s.update for s in state if isinstance(s.update, fx.Node) and s.update not in plain}


def graph_items(gm: fx.GraphModule, weight_bytes: dict[str, int] | None = None) -> GraphItems:
    """The compute nodes of ``gm`` in order, with the bytes live across each cut and the cuts allowed.

    A graph with lifted state (a decoder step: cache in, new cache out) keeps each piece of state
    in one stage: its placeholder is live from its first reader on (not from the graph's start),
    its new value is not carried to the end, no cut separates its first reader from the item
    computing its new value, and its bytes count towards that stage's memory like weights.
    """
    kinds = node_kinds(gm)
    items = [n for n in gm.graph.nodes if kinds[n] == COMPUTE]
    position = {node: index for index, node in enumerate(items)}
    count = len(items)
    delta = np.zeros(count + 2, dtype=np.float64)
    blocked = np.zeros(count + 2, dtype=np.int64)
    weights = np.array([(weight_bytes or {}).get(n.name, 0) for n in items], dtype=np.float64)
    state = carried_state(gm, position)
    state_first = {s.placeholder: s.first for s in state}
    state_outputs = _state_only_outputs(gm, state)
    for carried in state:
        held = [p for p in (carried.first, carried.last) if p is not None]
        if held:
            blocked[min(held) + 1] += 1
            blocked[max(held) + 1] -= 1
            weights[min(held)] += carried.bytes
    for node in gm.graph.nodes:
        if kinds[node] not in (INPUT, COMPUTE):
            continue
        if node in state_first:
            if state_first[node] is None:
                continue
            start = state_first[node]
        else:
            start = -1 if kinds[node] == INPUT else position[node]
        consumers = [position[u] if kinds[u] == COMPUTE else
                     (count if kinds[u] == OUTPUT and node not in state_outputs else None) for u in node.users]
        ends = [c for c in consumers if c is not None]
        if not ends:
            continue
        end = max(ends)
        if end <= start:
            continue
        # live across the cuts start+1 .. end (a cut at i sits just before item i)
        if _is_tensor_value(node):
            delta[start + 1] += value_bytes(node)
            delta[end + 1] -= value_bytes(node)
        else:  # a tuple or another non-tensor value: no stage boundary may separate it from its users
            blocked[start + 1] += 1
            blocked[end + 1] -= 1
    cut_bytes = np.cumsum(delta)[: count + 1]
    allowed = np.cumsum(blocked)[: count + 1] == 0
    output_bytes = np.array([value_bytes(n) for n in items], dtype=np.float64)
    peak = cut_bytes[:count] + output_bytes if count else np.zeros(0)
    shared = []
    for readers, size in shared_weights(gm):
        positions = sorted({position[n] for n in items if n.name in readers})
        if len(positions) > 1:
            shared.append((positions, float(size)))
    return GraphItems(items, kinds, cut_bytes, allowed, peak, weights, position, state, shared, state_outputs)


def stage_costs(costs: Sequence[float], boundaries: Sequence[int]) -> list[float]:
    """Sum of item costs per stage, for stages starting at ``boundaries`` (the first is 0)."""
    edges = [*boundaries, len(costs)]
    return [float(sum(costs[edges[k]:edges[k + 1]])) for k in range(len(boundaries))]


def _memory_starts(weight_bytes: np.ndarray, peak_bytes: np.ndarray, cap: float,
                   shared: Sequence[tuple[Sequence[int], float]] = ()) -> np.ndarray:
    """For each end j (exclusive), the smallest start i such that stage [i, j) fits in ``cap`` bytes (j if none).

    ``weight_bytes`` charges each weight to its first reader; a weight in ``shared`` (its readers'
    positions, its bytes) is also held by a stage that reads it without holding its first reader.
    """
    count = len(weight_bytes)
    prefix = np.concatenate([[0.0], np.cumsum(weight_bytes)])
    starts = np.zeros(count + 1, dtype=np.int64)
    for end in range(1, count + 1):
        peaks = np.maximum.accumulate(peak_bytes[:end][::-1])[::-1]  # max of peak over [i, end)
        held = prefix[end] - prefix[:end] + peaks
        for positions, size in shared:
            last = max((p for p in positions if p < end), default=-1)
            if last > positions[0]:  # stages starting in (first reader, last reader] hold it too
                held[positions[0] + 1:last + 1] += size
        fits = held <= cap
        # fits is monotone (shorter stages use less): the first True is the smallest start
        starts[end] = int(np.argmax(fits)) if fits.any() else end
    return starts


def balanced_split(
    costs: Sequence[float],
    stages: int,
    *,
    cut_bytes: Sequence[float] | None = None,
    allowed: Sequence[bool] | None = None,
    tolerance: float = 0.02,
    weight_bytes: Sequence[float] | None = None,
    peak_bytes: Sequence[float] | None = None,
    memory_cap: float | None = None,
    shared_weights: Sequence[tuple[Sequence[int], float]] = (),
) -> list[int]:
    """Split items with ``costs`` into ``stages`` contiguous stages minimizing the costliest stage.

    Returns the index of the first item of each stage (the first is 0). Exact: a dynamic
    program finds the smallest possible bottleneck ``B``; a second one picks, among the splits
    whose stages all cost at most ``B * (1 + tolerance)``, the one with the fewest bytes crossing
    its cuts (``cut_bytes[i]``: bytes live across a cut just before item ``i``). ``allowed[i]``
    False forbids a cut before item ``i``. With ``memory_cap``, every stage's
    ``sum(weight_bytes) + max(peak_bytes)`` must fit in it, plus the ``shared_weights`` (reader
    positions, bytes) it reads but whose first reader is in an earlier stage.

    Raises ``PartitionError`` when there are fewer items than stages, or no split meets the cap.
    """
    values = np.asarray(costs, dtype=np.float64)
    count = len(values)
    if stages < 1:
        raise PartitionError(f"stages must be at least 1, got {stages}")
    if count < stages:
        raise PartitionError(
            f"cannot make {stages} stages from {count} layer(s) (compute nodes): every stage needs at least one. "
            f"Use stages <= {count}."
        )
    cuts = np.zeros(count + 1) if cut_bytes is None else np.asarray(cut_bytes, dtype=np.float64)
    ok = np.ones(count + 1, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool).copy()
    ok[0] = True
    prefix = np.concatenate([[0.0], np.cumsum(values)])
    if memory_cap is not None:
        weights = np.zeros(count) if weight_bytes is None else np.asarray(weight_bytes, dtype=np.float64)
        peaks = np.zeros(count) if peak_bytes is None else np.asarray(peak_bytes, dtype=np.float64)
        starts = _memory_starts(weights, peaks, float(memory_cap), shared_weights)
    else:
        starts = np.zeros(count + 1, dtype=np.int64)

    def solve(limit: float | None) -> tuple[np.ndarray, np.ndarray]:
        """Dp over stages; with ``limit`` minimize cut bytes under it, else minimize the bottleneck."""
        best = np.full((stages + 1, count + 1), np.inf)
        choice = np.zeros((stages + 1, count + 1), dtype=np.int64)
        best[0, 0] = 0.0
        for k in range(1, stages + 1):
            previous = best[k - 1].copy()
            if k > 1:
                previous[~ok] = np.inf
                previous[0] = np.inf
            for end in range(k, count - (stages - k) + 1):
                low = max(int(starts[end]), k - 1)
                if low >= end:
                    continue
                span = prefix[end] - prefix[low:end]
                if limit is None:
                    candidates = np.maximum(previous[low:end], span)
                else:
                    extra = cuts[low:end] if k > 1 else 0.0
                    candidates = np.where(span <= limit, previous[low:end] + extra, np.inf)
                index = int(np.argmin(candidates))
                best[k, end], choice[k, end] = candidates[index], low + index
        return best, choice

    bottleneck_table, _ = solve(None)
    bottleneck = bottleneck_table[stages, count]
    if not np.isfinite(bottleneck):
        if memory_cap is not None:
            single = float(np.max(weights + peaks)) if count else 0.0
            raise PartitionError(
                f"no split into {stages} stages fits the memory cap of {memory_cap / 2**20:.1f} MiB per device "
                f"(weights, kept state such as a cache, and peak activations of a stage; the largest single layer "
                f"alone needs "
                f"{single / 2**20:.1f} MiB). Raise the cap, use more stages, or shrink the model (quantize it) first."
            )
        raise PartitionError(
            f"no valid split into {stages} stages: too few places to cut the graph. Use fewer stages."
        )
    limit = bottleneck * (1 + tolerance) + 1e-12 * max(1.0, abs(bottleneck))
    table, choice = solve(limit)
    boundaries = [0] * stages
    end = count
    for k in range(stages, 0, -1):
        start = int(choice[k, end])
        boundaries[k - 1] = start
        end = start
    del table
    return boundaries

