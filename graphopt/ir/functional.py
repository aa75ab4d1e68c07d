"""A cheap functionalization for the common cases: in-place ops on fresh intermediates and on state.

``ReLU(inplace=True)``, ``x += residual`` and the like write into a tensor that an earlier op
has just computed and that nothing else views. Rewriting each such op to its out-of-place form
(``relu_`` -> ``relu``) and pointing the later readers of the written tensor at the result is
exactly what functionalization would do, without its cost (about a second on a ResNet).

A write straight into state (a buffer or an input, or a ``.to()`` of one that converts nothing:
a key/value cache's ``index_copy_``, a step counter's ``add_``) is rewritten the same way, and
the state's last value is written back by one ``aten.copy_`` before the output, the form
torch.export's functionalization gives (on a 30-layer decoder step that functionalization took
15 s). Anything else (a write into a view, or into a tensor some view still reads) is left to
torch.export's own functionalization: :func:`outplace_simple_mutations` then changes nothing.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.ir.graph import STATE_UPDATE, is_aten, is_mutating
from graphopt.ir.inference_form import to_returns_input
from graphopt.ir.ops import MAYBE_ALIASING_OPS

__all__ = ["creates_alias", "outplace_simple_mutations"]

aten = torch.ops.aten

def _out_of_place(node: fx.Node) -> torch._ops.OpOverload | None:
    """``aten.relu.default`` for ``aten.relu_.default``: the functional twin of a plain in-place op."""
    if not is_aten(node):
        return None
    target = node.target
    name = target._opname
    if not name.endswith("_") or name.startswith("_"):
        return None
    schema = target._schema
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if len(written) != 1 or written[0] is not schema.arguments[0]:
        return None
    packet = getattr(aten, name[:-1], None)
    overload = getattr(packet, target._overloadname, None) if packet is not None else None
    if overload is None or overload._schema.is_mutable:
        return None
    return overload


def _is_fresh(node: fx.Node) -> bool:
    """True when ``node`` is an aten op returning a new tensor that aliases none of its inputs."""
    if not is_aten(node):
        return False
    target = node.target
    if target.overloadpacket in MAYBE_ALIASING_OPS or target._schema.is_mutable:
        return False
    return all(r.alias_info is None for r in target._schema.returns)


def creates_alias(user: fx.Node, of: fx.Node) -> bool:
    """True when ``user``'s result may share storage with ``of`` (a view, getitem, unknown op...)."""
    target = user.target
    if user.op == "output":
        return False
    if user.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return True  # unknown code may keep a reference: be conservative
    if is_mutating(user):
        return False  # in-place ops are handled as links of the chain
    if target.overloadpacket in MAYBE_ALIASING_OPS:
        return True
    return any(r.alias_info is not None for r in target._schema.returns)


def _same_tensor(node: fx.Node) -> bool:
    """True for ``aten.alias(x)`` or an ``x.to(...)`` that returns ``x`` itself."""
    if node.op == "call_function" and node.target is aten.alias.default:
        return isinstance(node.args[0], fx.Node)
    return to_returns_input(node)


def _state_group(root: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node] | None:
    """``root`` (state) and the ``.to()`` nodes that return it itself, when its writes are simple; else None.

    Simple: every write goes into one of those names (or into an earlier write's result) with an op
    that has a functional twin, and no view of the state is taken before its last write (a view
    read after a write would see the new value, which the rewrite cannot give it).
    """
    group = [root]
    writes: list[fx.Node] = []
    for member in group:  # the group grows while it is walked
        for user in member.users:
            if _same_tensor(user) and user.args[0] is member:
                group.append(user)
            elif is_mutating(user):
                if user.args[0] is not member or _out_of_place(user) is None:
                    return None  # written through another argument, or by an op with no functional twin
                writes.append(user)
    for write in writes:  # a write's result names the state too; a write into it is another write
        writes.extend(u for u in write.users if is_mutating(u) and u.args[0] is write and u not in writes)
    if any(_out_of_place(w) is None for w in writes):
        return None
    last_write = max((order[w] for w in writes), default=-1)
    for tensor in [*group, *writes]:
        for user in tensor.users:
            if user in group or is_mutating(user):
                continue
            if creates_alias(user, tensor) and order[user] < last_write:
                return None  # a view of the state taken before a later write
    return group


def _chains(gm: fx.GraphModule) -> tuple[list[fx.Node], dict[fx.Node, list[fx.Node]]] | None:
    """The in-place nodes in order and the state groups they write, when every write is simple; else None.

    Simple: the written tensor is fresh and unaliased (with the chain of writes into it), or is
    state that nothing views (``_state_group``).
    """
    mutating = [n for n in gm.graph.nodes if is_mutating(n)]
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in mutating:
        if _out_of_place(node) is None or not isinstance(node.args[0], fx.Node):
            return None
        base = node.args[0]
        chain = [base]
        while is_mutating(base):  # relu_(add_(x, y)): the chain of writes into one tensor
            base = base.args[0]
            chain.append(base)
        state = base
        while _same_tensor(state):
            state = state.args[0]
        if state.op in ("get_attr", "placeholder"):
            if state not in groups:
                group = _state_group(state, order)
                if group is None:
                    return None
                groups[state] = group
            continue
        if not _is_fresh(base):
            return None
        for link in chain:
            if any(creates_alias(user, link) for user in link.users):
                return None
    return mutating, groups


def _copied_value(node: fx.Node) -> fx.Node | None:
    """``src`` of ``copy_(dst, src)`` when it has ``dst``'s shape, dtype and device (the write is ``src`` itself)."""
    if node.target is not aten.copy_.default or not isinstance(node.args[1], fx.Node):
        return None
    if node.args[1].op in ("get_attr", "placeholder"):
        return None  # state copied into state: the source may be updated before the end (a copy keeps its value)
    dst, src = node.args[0].meta.get("val"), node.args[1].meta.get("val")
    if not isinstance(dst, torch.Tensor) or not isinstance(src, torch.Tensor):
        return None
    same = (dst.shape, dst.dtype, dst.device) == (src.shape, src.dtype, src.device)
    return node.args[1] if same else None


def outplace_simple_mutations(gm: fx.GraphModule) -> bool:
    """Rewrite every in-place op of ``gm`` out of place, if all write fresh unaliased tensors or unviewed state.

    Each write into state leaves one ``aten.copy_(state, last value)`` before the output, marked
    ``STATE_UPDATE``. Returns True when the graph is now free of mutation (but for those copies);
    False (and ``gm`` untouched) when some write needs real functionalization.
    """
    found = _chains(gm)
    if found is None:
        return False
    mutating, groups = found
    group_of = {member: group for group in groups.values() for member in group}
    state_of = {member: group[0] for member, group in group_of.items()}  # every name of a state, and later its values
    last_value: dict[fx.Node, fx.Node] = {}
    order: dict[fx.Node, float] = {node: index for index, node in enumerate(gm.graph.nodes)}
    for node in mutating:
        written = node.args[0]
        result = _copied_value(node)
        if result is None:
            with gm.graph.inserting_before(node):
                result = gm.graph.call_function(_out_of_place(node), node.args, node.kwargs)
            result.meta = {k: v for k, v in node.meta.items() if k != STATE_UPDATE}
            order[result] = order[node] - 0.5  # it runs where the in-place op ran
        # readers of the written tensor (or of another name for the same state) after the write see the new value
        position = order[node]
        for tensor in group_of.get(written, [written]):
            for user in list(tensor.users):
                if user is not node and user is not result and order[user] > position:
                    user.replace_input_with(tensor, result)
        node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
        if written in state_of:  # the state's newest value; a later write into the state goes through it
            state_of[result] = state_of[written]
            last_value[state_of[written]] = result
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for root, value in sorted(last_value.items(), key=lambda item: order[item[0]]):  # state in the graph's order
        with gm.graph.inserting_before(output):
            update = gm.graph.call_function(aten.copy_.default, (root, value))
        update.meta = {**root.meta, STATE_UPDATE: True}
    gm.graph.lint()
    gm.recompile()
    return True
