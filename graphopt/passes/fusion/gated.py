"""Fuse gated MLP activations, ``silu(gate) * up`` and ``gelu(gate) * up``, into one ``graphopt_decoder`` op.

| written as | becomes |
|---|---|
| ``silu(gate) * up`` (either order) | ``graphopt_decoder::swiglu(gate, up)`` |
| ``gelu(gate, approximate=a) * up`` | ``graphopt_decoder::geglu(gate, up, a)`` |

``gate`` and ``up`` may come from anywhere: two linears, the two slices of one linear after
``fuse-horizontal``, the ``split``/``chunk`` of a fused ``gate_up_proj`` (Phi-3). Run it after
``fuse-horizontal``, which leaves projections read by non-ATen ops apart. Near-misses: an
activation also used elsewhere (it would be computed twice), ``gate`` and ``up`` of different
shapes (the product broadcasts) or dtypes (the product promotes).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt.ir.graph import inherit_module_paths, node_dtype, node_shape
from graphopt.ir.meta import infer_meta
from graphopt.passes.base import Pass, PassResult, register_pass
from graphopt.passes.fusion._match import erase_dead, is_call
from graphopt.passes.fusion.decoder_ops import GEGLU, SWIGLU

aten = torch.ops.aten

__all__ = ["FuseGatedActivations"]


def _gate_of(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(activation, up)`` for ``mul(act(gate), up)`` in either order, where ``act`` is silu or gelu."""
    for activation, up in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if is_call(activation, aten.silu.default, aten.gelu.default) and isinstance(up, fx.Node):
            return activation, up
    return None


def _problem(activation: fx.Node, up: fx.Node, mul: fx.Node) -> str | None:
    gate = activation.args[0]
    if not isinstance(gate, fx.Node):
        return "the gate is not a tensor"
    if len(activation.users) != 1:
        return "the activation is also used elsewhere"
    shapes = [node_shape(n) for n in (gate, up, mul)]
    if any(s is None for s in shapes) or not shapes[0] == shapes[1] == shapes[2]:
        return "gate and up have different shapes (the product broadcasts)"
    if node_dtype(gate) != node_dtype(up) or node_dtype(gate) is None or not node_dtype(gate).is_floating_point:
        return "gate and up have different dtypes (the product promotes)"
    return None


@register_pass
@dataclass(frozen=True)
class FuseGatedActivations(Pass):
    """Replace ``silu(gate) * up`` by ``swiglu(gate, up)`` and ``gelu(gate) * up`` by ``geglu(gate, up)``."""

    name = "fuse-gated-mlp"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Fuse every gated activation; count the look-alikes refused, by reason."""
        hits, misses = Counter[str](), Counter[str]()
        graph = gm.graph
        for mul in list(graph.nodes):
            if not is_call(mul, aten.mul.Tensor):
                continue
            found = _gate_of(mul)
            if found is None:
                continue
            activation, up = found
            problem = _problem(activation, up, mul)
            if problem:
                misses[problem] += 1
                continue
            gate = activation.args[0]
            if activation.target is aten.silu.default:
                target, args, label = SWIGLU, (gate, up), "swiglu"
            else:
                approximate = activation.kwargs.get("approximate", activation.args[1] if len(activation.args) > 1
                                                    else "none")
                target, args, label = GEGLU, (gate, up, approximate), "geglu"
            with graph.inserting_before(mul):
                fused = graph.call_function(target, args)
            infer_meta(fused)
            inherit_module_paths(fused, [mul, activation])
            mul.replace_all_uses_with(fused)
            erase_dead(gm, [mul, activation])
            hits[label] += 1
        total = sum(hits.values())
        return PassResult(changed=total > 0, stats={"fused": total}, rule_hits=dict(hits),
                          near_misses={self.name: dict(misses)} if misses else {})
