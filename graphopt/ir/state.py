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


def _expression(node: object, renamed: dict[fx.Node, fx.Node], memo: dict[fx.Node, object]) -> object:
    """A hashable description of what ``node`` computes, reading each placeholder in ``renamed`` as its image."""
    if isinstance(node, (tuple, list)):
        return (type(node).__name__, *(_expression(item, renamed, memo) for item in node))
    if isinstance(node, dict):
        return ("dict", *sorted((key, _expression(value, renamed, memo)) for key, value in node.items()))
    if not isinstance(node, fx.Node):
        return ("const", repr(node))
    if node in memo:
        return memo[node]
    if node.op == "placeholder":
        key: object = ("input", renamed.get(node, node).name)
    elif node.op == "get_attr":
        key = ("attr", str(node.target))
    else:
        key = (node.op, str(node.target), _expression(node.args, renamed, memo),
               _expression(dict(node.kwargs), renamed, memo))
    memo[node] = key
    return key


def merge_equal_state(lifted: LiftedState) -> int:
    """Let every state tensor that always equals another be read through that one; returns how many were merged.

    Two state tensors are equal on every call when they start equal and their new values are the
    same expression of the inputs with each read of one taken as a read of the other (induction
    on calls). A decoder's per-layer cache counters are such state: every layer's cache holds its
    own ``cumulative_length``, all advanced by the step's length. Merged, the layers' write
    positions are one computation instead of one per layer. The inputs and outputs stay as they
    were (the caller still feeds every state back); only the reads change.
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
    merged = 0
    for group in (g for g in groups if len(g) > 1):
        renamed = {node: group[0] for node in group}
        memo: dict[fx.Node, object] = {}
        first = _expression(returned[states[group[0]]], renamed, memo)
        same = [node for node in group[1:] if _expression(returned[states[node]], renamed, memo) == first]
        if len(same) != len(group) - 1:
            continue  # the induction holds only for the whole group at once
        for node in same:
            node.replace_all_uses_with(group[0])
            merged += 1
    if merged:
        gm.graph.lint()
        gm.recompile()
    return merged
