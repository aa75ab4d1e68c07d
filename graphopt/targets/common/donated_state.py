"""Donated state: update a step's state inputs in place instead of returning fresh copies.

A state-lifted step graph (``graphopt.ir.state``) is functional: ``index_copy(cache, ...)``
returns a new cache, so every decode step would copy the whole key/value cache. A caller that
*donates* its state inputs (the generation loop: it hands the state in and only ever uses what
comes back) lets the lowering write them in place. :class:`InplaceStateUpdates` rewrites the op
that computes a state input's new value to its in-place form when that op reads the state input
itself and every other reader of that input runs before it; the in-place node is marked a state
update, so verification runs it on copies of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from graphopt.ir.functional import creates_alias
from graphopt.ir.graph import STATE_UPDATE
from graphopt.ir.state import state_inputs
from graphopt.passes.base import Pass, PassResult

__all__ = ["IN_PLACE_FORMS", "InplaceStateUpdates"]

aten = torch.ops.aten

IN_PLACE_FORMS = {
    aten.index_copy.default: aten.index_copy_.default,
    aten.index_put.default: aten.index_put_.default,
    aten.add.Tensor: aten.add_.Tensor,
}
"""Functional state writes and their in-place forms."""


def _runs_before(order: dict[fx.Node, int], node: fx.Node, writer: fx.Node) -> bool:
    """True when ``node``, and every view of its result read later, have run by the time ``writer`` runs."""
    if order[node] > order[writer]:
        return False
    return all(_runs_before(order, user, writer) for user in node.users if creates_alias(user, node))


@dataclass(frozen=True)
class InplaceStateUpdates(Pass):
    """Write donated state inputs in place (``index_copy`` -> ``index_copy_``, a counter's ``add`` -> ``add_``)."""

    name: ClassVar[str] = "inplace-state-updates"
    in_place_kernels: ClassVar[frozenset] = frozenset(IN_PLACE_FORMS.values())

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite each donated state's update in place where no later reader sees the old value."""
        output = next(n for n in gm.graph.nodes if n.op == "output")
        results = output.args[0]
        order = {node: index for index, node in enumerate(gm.graph.nodes)}
        rewritten, refused = 0, 0
        for placeholder, index in state_inputs(gm).items():
            writer = results[index]
            in_place = IN_PLACE_FORMS.get(getattr(writer, "target", None))
            if not isinstance(writer, fx.Node) or in_place is None or writer.args[0] is not placeholder:
                refused += 1
                continue
            if not all(_runs_before(order, user, writer) for user in placeholder.users if user is not writer):
                refused += 1
                continue
            writer.target = in_place
            writer.meta[STATE_UPDATE] = True
            rewritten += 1
        gm.recompile()
        near = {self.name: {"state not written by an in-place-able op on itself": refused}} if refused else {}
        return PassResult(rewritten > 0, {"in_place": rewritten}, near_misses=near)
