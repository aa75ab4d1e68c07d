"""State as inputs and outputs: turn a graph that updates its own buffers into a pure function of them.

Capture keeps a model's state (a key/value cache, a step counter) as buffers and every write to
them as an explicit ``aten.copy_`` marked ``STATE_UPDATE`` at the end of the graph. Runtimes that
hold no state between calls (onnxruntime), compilers, and a generation loop that owns its cache
want the same computation as a function ``(inputs..., state...) -> (outputs..., new state...)``:
:func:`lift_state` makes that graph. The state keeps its order and names (``StateSpec``), so the
caller can feed each new value back as the next call's input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt.errors import StateError
from graphopt.ir.graph import clone_graph_module, state_update_nodes

__all__ = ["STATE_INPUT", "LiftedState", "StateSpec", "lift_state", "merge_equal_state", "relift_state",
           "state_inputs"]

STATE_INPUT = "graphopt_state_input"
"""``node.meta`` key on a lifted state placeholder: the index of the output that returns its new value."""


@dataclass(frozen=True)
class StateSpec:
    """One piece of lifted state: the buffer's name, and its example value's shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class LiftedState:
    """A graph whose state was lifted: ``graph_module(*inputs, *state) -> (*outputs, *new_state)``.

    ``state`` lists the lifted buffers in placeholder (and output) order; ``initial`` holds their
    values as the captured model had them; ``num_outputs`` counts the original outputs that come
    before the new state.
    """

    graph_module: fx.GraphModule
    state: list[StateSpec]
    initial: list[torch.Tensor]
    num_outputs: int


def _attribute(gm: fx.GraphModule, target: str) -> torch.Tensor:
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor):
        raise StateError(f"state {target!r} is not a tensor")
    return value


def lift_state(gm: fx.GraphModule) -> LiftedState:
    """A copy of ``gm`` that takes every buffer it updates as an input and returns its new value.

    Reads of a state buffer become reads of the new placeholder; the ``copy_`` that wrote it is
    dropped and the value it wrote is appended to the outputs. The graph's outputs become a flat
    tuple (original leaves first). ``gm`` is not modified. Raises ``StateError`` when a state write
    goes to a graph input rather than a buffer (that state already belongs to the caller).
    """
    lifted = clone_graph_module(gm)
    graph = lifted.graph
    updates = state_update_nodes(lifted)
    for update in updates:
        if update.args[0].op != "get_attr":
            raise StateError(f"the graph writes into its input {update.args[0].name}; only buffer state can be lifted")
    names = list(dict.fromkeys(str(u.args[0].target) for u in updates))
    written = {str(u.args[0].target): u.args[1] for u in updates}
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    placeholders: dict[str, fx.Node] = {}
    specs, initial = [], []
    anchor = last_placeholder
    for name in names:
        value = _attribute(lifted, name)
        with graph.inserting_after(anchor):
            placeholder = graph.placeholder("state_" + name.replace(".", "_"))
        reads = [n for n in graph.nodes if n.op == "get_attr" and n.target == name]
        for key in ("val", "tensor_meta"):  # the buffer's shape and dtype, as its reads carry them
            placeholder.meta[key] = next((n.meta[key] for n in reads if key in n.meta), None)
        anchor = placeholders[name] = placeholder
        specs.append(StateSpec(name, tuple(value.shape), value.dtype))
        initial.append(value.detach().clone())
    for update in updates:
        graph.erase_node(update)
    for node in list(graph.nodes):
        if node.op == "get_attr" and str(node.target) in placeholders:
            node.replace_all_uses_with(placeholders[str(node.target)])
            graph.erase_node(node)
    output = next(n for n in graph.nodes if n.op == "output")
    leaves = _leaves(output.args[0])
    output.args = (tuple(leaves) + tuple(written[name] for name in names),)
    for index, name in enumerate(names):
        placeholders[name].meta[STATE_INPUT] = len(leaves) + index
    graph._codegen = fx.graph.CodeGen()  # flat inputs in, a flat tuple out: no pytree (un)flattening
    for spec_name in ("_in_spec", "_out_spec"):
        lifted.__dict__.pop(spec_name, None)
    for name in names:
        _delete_attribute(lifted, name)
    graph.lint()
    lifted.recompile()
    return LiftedState(lifted, specs, initial, len(leaves))


def relift_state(gm: fx.GraphModule, state: list[StateSpec], initial: list[torch.Tensor],
                 num_outputs: int) -> LiftedState:
    """``gm``, a state-lifted graph that lost its marks (re-exported, saved, loaded), as a :class:`LiftedState` again.

    Its last ``len(state)`` inputs are the state, in ``state``'s order, and its last
    ``len(state)`` outputs their new values, after ``num_outputs`` outputs of its own (what
    :func:`lift_state` made). The state placeholders get their :data:`STATE_INPUT` marks back
    (``gm`` is changed in place; how it is called is not). Raises ``StateError`` when the graph's
    inputs or outputs do not fit that layout.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    count = len(_leaves(output.args[0]))
    if len(placeholders) < len(state) or count != num_outputs + len(state):
        raise StateError(f"the graph has {len(placeholders)} inputs and {count} outputs, not the "
                         f"{len(state)} state inputs and {num_outputs} + {len(state)} outputs of a lifted step")
    first = len(placeholders) - len(state)
    for index, placeholder in enumerate(placeholders[first:]):
        placeholder.meta[STATE_INPUT] = num_outputs + index
    return LiftedState(gm, list(state), list(initial), num_outputs)


def _leaves(value: object) -> list[object]:
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    return [value]


def _delete_attribute(gm: fx.GraphModule, target: str) -> None:
    *path, last = target.split(".")
    owner: torch.nn.Module = gm
    for part in path:
        owner = getattr(owner, part)
    if last in owner._buffers:
        del owner._buffers[last]
    elif hasattr(owner, last):
        delattr(owner, last)


def state_inputs(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """The lifted state placeholders of ``gm``, each with the index of the output returning its new value."""
    return {n: n.meta[STATE_INPUT] for n in gm.graph.nodes if n.op == "placeholder" and STATE_INPUT in n.meta}


class _Computations:
    """What each node of a graph computes, as an id: equal ids, equal values.

    Each placeholder in ``renamed`` is read as its image. Built in one pass in graph order (no
    recursion, so a graph of any depth); an impure node (a random draw) is only equal to itself.
    """

    def __init__(self, gm: fx.GraphModule, renamed: dict[fx.Node, fx.Node]) -> None:
        self.ids: dict[fx.Node, int] = {}
        table: dict[object, int] = {}
        for node in gm.graph.nodes:
            if node.op == "output":
                continue
            if node.op == "placeholder":
                key: object = ("input", renamed.get(node, node).name)
            elif node.op == "get_attr":
                key = ("attr", str(node.target))
            elif node.is_impure():
                key = ("impure", node.name)
            else:
                key = (node.op, str(node.target), self.key(node.args), self.key(dict(node.kwargs)))
            self.ids[node] = table.setdefault(key, len(table))

    def key(self, value: object) -> object:
        """A hashable description of ``value``: a node's id, or the structure of an argument."""
        if isinstance(value, fx.Node):
            return ("node", self.ids[value])
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, *(self.key(item) for item in value))
        if isinstance(value, dict):
            return ("dict", *sorted((str(name), self.key(item)) for name, item in value.items()))
        return ("const", repr(value))


def merge_equal_state(lifted: LiftedState) -> int:
    """Let every state tensor that always equals another be read through that one; returns how many were merged.

    Two state tensors are equal on every call when they start equal and their new values are the
    same expression of the inputs with each read of one taken as a read of the other (induction
    on calls): the groups of equal start are split until every member of a group updates alike
    with each group read through one member. A decoder's per-layer cache counters are such
    state: every layer's cache holds its own ``cumulative_length``, all advanced by the step's
    length. Merged, the layers' write positions are one computation instead of one per layer,
    and the merged state leaves the graph: its input, its output and its entries in
    ``lifted.state`` and ``lifted.initial`` (changed in place; the state markers renumbered), so
    a runtime neither feeds it nor computes its new value (in onnxruntime, one ``Add`` per layer
    fewer).
    """
    gm = lifted.graph_module
    states = state_inputs(gm)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    returned = list(output.args[0])
    groups: list[list[fx.Node]] = []
    for node in states:
        value = lifted.initial[states[node] - lifted.num_outputs]
        for group in groups:
            first = lifted.initial[states[group[0]] - lifted.num_outputs]
            if first.shape == value.shape and first.dtype == value.dtype and torch.equal(first, value):
                group.append(node)
                break
        else:
            groups.append([node])
    while True:  # split the groups until each one's members update alike, every group read as its first member
        computations = _Computations(gm, {node: group[0] for group in groups for node in group})
        split: list[list[fx.Node]] = []
        for group in groups:
            alike: dict[object, list[fx.Node]] = {}
            for node in group:
                alike.setdefault(computations.key(returned[states[node]]), []).append(node)
            split.extend(alike.values())
        if len(split) == len(groups):
            break
        groups = split
    merged: list[fx.Node] = []
    for group in groups:
        for node in group[1:]:
            node.replace_all_uses_with(group[0])
            merged.append(node)
    if merged:
        _drop_state(lifted, merged)
        gm.graph.lint()
        gm.recompile()
    return len(merged)


def _drop_state(lifted: LiftedState, unread: list[fx.Node]) -> None:
    """Take the state placeholders ``unread`` (read by nothing now) out of ``lifted``: input, output, spec, initial."""
    gm = lifted.graph_module
    output = next(n for n in gm.graph.nodes if n.op == "output")
    states = state_inputs(gm)
    dropped = {states[node] for node in unread}  # output indices; the state's own index is num_outputs less
    output.args = (tuple(value for index, value in enumerate(output.args[0]) if index not in dropped),)
    lifted.state[:] = [spec for index, spec in enumerate(lifted.state) if index + lifted.num_outputs not in dropped]
    lifted.initial[:] = [value for index, value in enumerate(lifted.initial)
                         if index + lifted.num_outputs not in dropped]
    kept = sorted((index, node) for node, index in states.items() if index not in dropped)
    for position, (_, node) in enumerate(kept):
        node.meta[STATE_INPUT] = lifted.num_outputs + position
    for node in unread:
        gm.graph.erase_node(node)
