"""A cheap functionalization for the common case: in-place ops on fresh, unaliased intermediates.

``ReLU(inplace=True)``, ``x += residual`` and the like write into a tensor that an earlier op
has just computed and that nothing else views. Rewriting each such op to its out-of-place form
(``relu_`` -> ``relu``) and pointing the later readers of the written tensor at the result is
exactly what functionalization would do, without its cost (about a second on a ResNet). Anything
else (a write into an input, a buffer, a view, or a tensor some view still reads) is left to
torch.export's own functionalization: :func:`outplace_simple_mutations` then changes nothing.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.ir.graph import is_aten, is_mutating
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


def _chains(gm: fx.GraphModule) -> list[fx.Node] | None:
    """The in-place nodes, in order, when every one writes a fresh unaliased tensor; else None."""
    mutating = [n for n in gm.graph.nodes if is_mutating(n)]
    for node in mutating:
        if _out_of_place(node) is None or not isinstance(node.args[0], fx.Node):
            return None
        base = node.args[0]
        chain = [base]
        while is_mutating(base):  # relu_(add_(x, y)): the chain of writes into one tensor
            base = base.args[0]
            chain.append(base)
        if not _is_fresh(base):
            return None
        for link in chain:
            if any(creates_alias(user, link) for user in link.users):
                return None
    return mutating


def outplace_simple_mutations(gm: fx.GraphModule) -> bool:
    """Rewrite every in-place op of ``gm`` out of place, if all write fresh unaliased tensors.

    Returns True when the graph is now free of mutation; False (and ``gm`` untouched) when some
    write needs real functionalization.
    """
    mutating = _chains(gm)
    if mutating is None:
        return False
    order: dict[fx.Node, float] = {node: index for index, node in enumerate(gm.graph.nodes)}
    for node in mutating:
        written = node.args[0]
        with gm.graph.inserting_before(node):
            result = gm.graph.call_function(_out_of_place(node), node.args, node.kwargs)
        result.meta = dict(node.meta)
        order[result] = order[node] - 0.5  # it runs where the in-place op ran
        # readers of the written tensor after the write see the new value; readers before keep the old
        position = order[node]
        for user in list(written.users):
            if user is not node and user is not result and order[user] > position:
                user.replace_input_with(written, result)
        node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return True
