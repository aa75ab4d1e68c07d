"""The ``partition`` pass: cut the graph into pipeline stages, each its own GraphModule.

After the pass the graph is a chain of ``call_module`` nodes, ``stage_0`` ... ``stage_{N-1}``: each
stage is an ``fx.GraphModule`` holding only the weights it reads, taking the values live at its
start (the model's inputs for ``stage_0``) and returning the values live at its end (the model's
outputs for the last stage). Values needed by several stages (attention masks, position ids,
skip connections spanning a cut) are routed: a stage passes on, untouched, every value a later
stage still needs, so stages form a linear pipeline. Weights, constants computed from weights
and integer size computations are not routed but recomputed in each stage that needs them.
The pass manager verifies that the chain computes what the graph did.

    gm = Partition(stages=4, balance="flops").run(gm)   # or in optimize(passes=[..., "partition"])
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.analysis.balanced_split import (
    BALANCE_KEYS,
    COMPUTE,
    CONSTANT,
    INPUT,
    OUTPUT,
    SIZE,
    WEIGHT,
    CarriedState,
    GraphItems,
    PartitionError,
    balanced_split,
    graph_items,
)
from graphopt.analysis.cost import node_costs, profile_nodes, value_bytes
from graphopt.ir.graph import (
    fill_output_nodes,
    prune_unused_attributes,
    state_update_nodes,
    torch_deprecations_silenced,
)
from graphopt.passes.base import Pass, PassResult

__all__ = ["Partition", "StageInfo", "is_partitioned", "item_costs", "plan_boundaries", "split_stages",
           "stage_modules", "synthetic_inputs"]

STAGE_PREFIX = "stage_"


@dataclass
class StageInfo:
    """One stage of a split graph: its module and the values (original node names) it takes and returns.

    A graph with lifted state (``graphopt.ir.state``) gives each stage the state it keeps:
    ``held`` (``state``: their indexes into the graph's state), taken after ``inputs`` and
    returned after ``outputs``, so the module is ``(*inputs, *state) -> (*outputs, *new_state)``;
    ``state_bytes`` is their size.
    """

    index: int
    module: fx.GraphModule
    inputs: list[str]
    outputs: list[str]
    nodes: list[str]
    input_bytes: int = 0
    held: list[CarriedState] = field(default_factory=list)

    @property
    def state(self) -> list[int]:
        """The indexes (in the graph's state) of the state this stage keeps."""
        return [carried.index for carried in self.held]

    @property
    def state_bytes(self) -> int:
        """The size of the state this stage keeps."""
        return sum(carried.bytes for carried in self.held)


def item_costs(gm: fx.GraphModule, items: GraphItems, balance: str, seconds: dict[str, float] | None) -> list[float]:
    """The cost of each cuttable node under ``balance`` ("time" needs ``seconds`` from ``profile_nodes``)."""
    if balance not in BALANCE_KEYS:
        raise PartitionError(f"balance must be one of {', '.join(BALANCE_KEYS)}, got {balance!r}")
    costs = node_costs(gm, seconds)
    if balance == "time":
        if seconds is None:
            raise PartitionError("balance='time' needs measured node times (profile_nodes)")
        return [float(seconds.get(n.name, 0.0)) for n in items.nodes]
    if balance == "flops":
        return [float(costs[n.name].flops) for n in items.nodes]
    if balance == "params":
        return [float(costs[n.name].param_bytes) for n in items.nodes]
    return [float(costs[n.name].param_bytes + costs[n.name].activation_bytes) for n in items.nodes]


def synthetic_inputs(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    """Inputs shaped like the graph's recorded placeholders (random floats, zero integers) to time it on."""
    generator = torch.Generator().manual_seed(0)
    values = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        val = node.meta.get("val")
        if meta is None and not isinstance(val, torch.Tensor):
            raise PartitionError(f"input {node.name} has no recorded shape; run the graph once (capture does)")
        shape = tuple(int(d) for d in (meta.shape if meta is not None else val.shape))
        dtype = meta.dtype if meta is not None else val.dtype
        if dtype.is_floating_point:
            values.append(torch.randn(shape, generator=generator).to(dtype))
        elif dtype == torch.bool:
            values.append(torch.ones(shape, dtype=dtype))
        else:
            values.append(torch.zeros(shape, dtype=dtype))
    return tuple(values)


def plan_boundaries(
    gm: fx.GraphModule,
    stages: int,
    balance: str = "time",
    *,
    seconds: dict[str, float] | None = None,
    memory_cap: float | None = None,
    tolerance: float = 0.02,
    costs: Sequence[float] | None = None,
) -> tuple[GraphItems, list[int], list[float]]:
    """Cut points of a balanced split: the cuttable items, the first item of each stage and every item's cost.

    ``costs`` (one per cuttable item) replaces the costs ``balance`` gives, e.g. costs corrected
    by measured stage times.
    """
    _refuse_state_updates(gm)
    costs_table = node_costs(gm)
    weight_bytes = {name: cost.param_bytes for name, cost in costs_table.items()}
    items = graph_items(gm, weight_bytes)
    costs = list(costs) if costs is not None else item_costs(gm, items, balance, seconds)
    useful = sum(1 for c in costs if c > 0)
    if useful < stages:
        raise PartitionError(
            f"cannot make {stages} stages: the graph has only {useful} layer(s) (nodes that compute something "
            f"with a nonzero {balance} cost). Use stages <= {max(useful, 1)}."
        )
    boundaries = balanced_split(costs, stages, cut_bytes=items.cut_bytes, allowed=items.allowed,
                                tolerance=tolerance, weight_bytes=items.weight_bytes, peak_bytes=items.peak_bytes,
                                memory_cap=memory_cap, shared_weights=items.shared)
    return items, boundaries, costs


def _refuse_state_updates(gm: fx.GraphModule) -> None:
    if state_update_nodes(gm):
        raise PartitionError(
            "the model updates its own buffers on every call; pipeline stages on other devices cannot share that "
            "state. Partition a model whose forward() writes no buffer (or pass the state in and return it)."
        )


# ---------------------------------------------------------------------------------- splitting


def _symbol_sources(env: dict[fx.Node, fx.Node]) -> dict[Any, tuple[fx.Node, int]]:
    """For each symbolic dim seen on an available tensor, one (stage node, dim) holding it."""
    sources: dict[Any, tuple[fx.Node, int]] = {}
    for original, local in env.items():
        val = original.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for dim, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt):
                expr = size.node.expr
                if isinstance(expr, sympy.Symbol) and expr not in sources:
                    sources[expr] = (local, dim)
    return sources


def _emit_expression(graph: fx.Graph, expr: Any, symbols: dict[Any, fx.Node]) -> Any:
    """Fx nodes computing a sympy integer expression (sums, products, floor division) of dim symbols."""
    if isinstance(expr, sympy.Integer):
        return int(expr)
    if isinstance(expr, sympy.Symbol):
        return symbols[expr]
    if isinstance(expr, (sympy.Add, sympy.Mul)):
        combine = operator.add if isinstance(expr, sympy.Add) else operator.mul
        parts = [_emit_expression(graph, a, symbols) for a in expr.args]
        result = parts[0]
        for part in parts[1:]:
            result = graph.call_function(combine, (result, part))
        return result
    if type(expr).__name__ == "FloorDiv":
        a, b = (_emit_expression(graph, x, symbols) for x in expr.args)
        return graph.call_function(operator.floordiv, (a, b))
    raise PartitionError(f"cannot rebuild the size {expr} in a later stage; partition with a static batch size")


class _StageBuilder:
    """Builds one stage's graph: copies its compute nodes, recomputes weights, constants and sizes locally."""

    def __init__(self, gm: fx.GraphModule, kinds: dict[fx.Node, str], inputs: Sequence[fx.Node]) -> None:
        self.gm = gm
        self.kinds = kinds
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.attributes: dict[str, Any] = {}
        for node in inputs:
            placeholder = self.graph.placeholder(node.name)
            placeholder.meta = copy.copy(node.meta)
            self.env[node] = placeholder

    def value(self, node: fx.Node) -> Any:
        if node in self.env:
            return self.env[node]
        kind = self.kinds[node]
        if kind == WEIGHT:
            target = str(node.target)
            self.attributes[target] = _resolve(self.gm, target)
            local = self.graph.get_attr(target)
            local.meta = copy.copy(node.meta)
        elif kind == CONSTANT:
            local = self.graph.node_copy(node, self.value)
        elif kind == SIZE:
            local = self._size(node)
        else:
            raise PartitionError(f"internal error: value {node.name} ({kind}) is not available in this stage")
        self.env[node] = local
        return local

    def _size(self, node: fx.Node) -> Any:
        if self._copyable(node):
            return self.graph.node_copy(node, self.value)
        val = node.meta.get("val")
        if not isinstance(val, torch.SymInt):
            raise PartitionError(f"cannot recompute size value {node.name} in a later stage; partition with a "
                                 "static batch size (microbatches=1)")
        expr = val.node.expr
        sources = _symbol_sources(self.env)
        symbols = {}
        for symbol in expr.free_symbols:
            if symbol not in sources:
                raise PartitionError(
                    f"cannot recompute size {node.name} = {expr} in a later stage: no tensor passed to it has that "
                    "dim. Partition with a static batch size (microbatches=1)."
                )
            tensor, dim = sources[symbol]
            symbols[symbol] = self.graph.call_function(torch.ops.aten.sym_size.int, (tensor, dim))
        return _emit_expression(self.graph, expr, symbols)

    def _copyable(self, node: fx.Node) -> bool:
        """True when every tensor a size computation reads is available in this stage."""
        for source in node.all_input_nodes:
            kind = self.kinds[source]
            if source in self.env or kind in (WEIGHT, CONSTANT):
                continue
            if kind != SIZE or not self._copyable(source):
                return False
        return True

    def copy(self, node: fx.Node) -> None:
        self.env[node] = self.graph.node_copy(node, self.value)

    def finish(self, outputs: Sequence[fx.Node], index: int) -> fx.GraphModule:
        self.graph.output(tuple(self.value(o) for o in outputs))
        module = fx.GraphModule(self.attributes, self.graph, class_name=f"Stage{index}")
        for tensor in module.parameters():
            tensor.requires_grad_(False)
        return module


def _resolve(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _flat_outputs(gm: fx.GraphModule) -> list[Any]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return pytree.tree_leaves(output.args[0])


def split_stages(gm: fx.GraphModule, items: GraphItems, boundaries: Sequence[int]) -> list[StageInfo]:
    """Build one GraphModule per stage for the split of ``items`` starting at ``boundaries``."""
    kinds = items.kinds
    count = len(boundaries)
    edges = [*boundaries, len(items)]
    stage_of: dict[fx.Node, int] = {}
    for stage in range(count):
        for index in range(edges[stage], edges[stage + 1]):
            stage_of[items.nodes[index]] = stage
    for node in gm.graph.nodes:
        if kinds[node] == INPUT:
            stage_of[node] = -1
    owner = {carried.index: _owning_stage(carried, items, stage_of) for carried in items.state}
    for carried in items.state:
        stage_of[carried.placeholder] = owner[carried.index]
    flat_outputs = _flat_outputs(gm)
    plain_outputs = flat_outputs[:len(flat_outputs) - len(items.state)]
    last_use: dict[fx.Node, int] = {}
    order = list(gm.graph.nodes)

    def users_stage(node: fx.Node, user: fx.Node) -> list[int]:
        """Stages that need ``node`` because ``user`` reads it (none for sizes and constants: they are rebuilt)."""
        kind = kinds[user]
        if kind == COMPUTE:
            return [stage_of[user]]
        if kind == OUTPUT and node not in items.state_only_outputs:
            return [count]
        return []

    for node in order:
        if kinds[node] in (INPUT, COMPUTE):
            needs = [s for user in node.users for s in users_stage(node, user)]
            if needs:
                last_use[node] = max(needs)
    routed_values = [n for n in order if n in last_use and stage_of[n] < last_use[n]]
    state_placeholders = {carried.placeholder for carried in items.state}
    placeholders = [n for n in order if kinds[n] == INPUT and n not in state_placeholders]
    stages: list[StageInfo] = []
    for stage in range(count):
        held = [carried for carried in items.state if owner[carried.index] == stage]
        inputs = placeholders if stage == 0 else [
            n for n in routed_values if stage_of[n] < stage and last_use[n] >= stage]
        if stage == count - 1:
            outputs: list[Any] = [o for o in plain_outputs if isinstance(o, fx.Node)]  # literals stay in the parent
        else:
            outputs = [n for n in routed_values if stage_of[n] <= stage and last_use[n] > stage]
        builder = _StageBuilder(gm, kinds, [*inputs, *(c.placeholder for c in held)])
        members = [items.nodes[i] for i in range(edges[stage], edges[stage + 1])]
        for node in members:
            builder.copy(node)
        module = builder.finish([*outputs, *(c.update for c in held)], stage)
        stages.append(StageInfo(stage, module, [n.name for n in inputs], [o.name for o in outputs],
                                [n.name for n in members], sum(value_bytes(n) for n in inputs), held))
    return stages


def _owning_stage(carried: CarriedState, items: GraphItems, stage_of: dict[fx.Node, int]) -> int:
    """The stage keeping a piece of lifted state: the one reading it first (or computing its new value)."""
    position = carried.first if carried.first is not None else carried.last
    return stage_of[items.nodes[position]] if position is not None else 0


def rewrite_as_stage_chain(gm: fx.GraphModule, stages: Sequence[StageInfo]) -> None:
    """Replace ``gm``'s graph by calls of its stages in order (``stage_0``, ``stage_1``...), in place."""
    old = gm.graph
    graph = fx.Graph()
    with torch_deprecations_silenced():  # while copying the specs
        graph._codegen = copy.deepcopy(old._codegen)
    values: dict[str, fx.Node] = {}
    for node in old.nodes:
        if node.op == "placeholder":
            values[node.name] = graph.node_copy(node)
    originals = {n.name: n for n in old.nodes}
    output = next(n for n in old.nodes if n.op == "output")
    leaves = [leaf for leaf in pytree.tree_leaves(output.args[0]) if isinstance(leaf, fx.Node)]
    for stage in stages:
        name = f"{STAGE_PREFIX}{stage.index}"
        gm.add_submodule(name, stage.module)
        call = graph.call_module(name, (*(values[v] for v in stage.inputs),
                                        *(values[c.placeholder.name] for c in stage.held)))
        returned = [*stage.outputs, *(c.update.name for c in stage.held if isinstance(c.update, fx.Node))]
        results = []
        for position, value in enumerate(returned):
            item = graph.call_function(operator.getitem, (call, position))
            if value in originals:
                item.meta = copy.copy(originals[value].meta)
                results.append(originals[value].meta.get("val"))
            values[value] = item  # the latest stage to return a value gives it to the ones after
        call.meta["val"] = tuple(results)
    graph.output(fill_output_nodes(output.args[0], [values[leaf.name] for leaf in leaves]))
    gm.graph = graph
    prune_unused_attributes(gm)
    gm.recompile()


def is_partitioned(gm: fx.GraphModule) -> bool:
    """True when ``gm`` is a chain of stage calls (the ``partition`` pass ran on it)."""
    return any(n.op == "call_module" and str(n.target).startswith(STAGE_PREFIX) for n in gm.graph.nodes)


def stage_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The stage GraphModules of a partitioned graph, in pipeline order."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(STAGE_PREFIX)]
    return [gm.get_submodule(str(n.target)) for n in calls]


@dataclass(frozen=True)
class Partition(Pass):
    """Split the graph into ``stages`` contiguous pipeline stages with balanced cost.

    ``balance`` is what the split equalizes: ``"time"`` (measured per node on inputs shaped like
    the example's, the default), ``"flops"``, ``"params"`` (weight bytes) or ``"memory"`` (weights
    plus activations). ``memory_cap`` (bytes per device: a stage's weights plus its peak live
    activations) restricts the stages. Among splits within ``tolerance`` of the best bottleneck
    the one whose cuts carry the fewest bytes wins. ``boundaries`` (the name of the first node of
    every stage but the first) fixes the split instead, as ``graphopt.partition`` does after
    measuring. Run it last: after it the graph is a chain of stage modules.
    """

    name = "partition"
    stages: int = 2
    balance: str = "time"
    memory_cap: float | None = None
    tolerance: float = 0.02
    boundaries: tuple[str, ...] | None = None
    repeats: int = 5
    seconds: dict[str, float] | None = field(default=None, compare=False, hash=False)

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite ``gm`` into a chain of ``stage_i`` submodules."""
        if is_partitioned(gm):
            return PassResult(changed=False)
        if self.boundaries is not None:
            _refuse_state_updates(gm)
            items = graph_items(gm)
            names = {n.name: i for i, n in enumerate(items.nodes)}
            missing = [b for b in self.boundaries if b not in names]
            if missing:
                raise PartitionError(f"boundaries name nodes that are not cuttable in this graph: {missing[:3]}")
            boundaries = [0, *sorted(names[b] for b in self.boundaries)]
        else:
            seconds = self.seconds
            if self.balance == "time" and seconds is None:
                seconds = profile_nodes(gm, synthetic_inputs(gm), repeats=self.repeats)
            items, boundaries, _ = plan_boundaries(gm, self.stages, self.balance, seconds=seconds,
                                                   memory_cap=self.memory_cap, tolerance=self.tolerance)
        stages = split_stages(gm, items, boundaries)
        rewrite_as_stage_chain(gm, stages)
        cut = [s.input_bytes for s in stages[1:]]
        return PassResult(changed=True, stats={"stages": len(stages), "max cut bytes": max(cut, default=0)})
