"""Fuse hand-written attention, ``softmax(q @ k^T * scale + mask) @ v``, into ``scaled_dot_product_attention``.

The pass starts at every softmax over the last dim and walks back through the ops between it and
the ``q @ k^T`` matmul:

- scaling by a number (``* scale``, ``/ sqrt(d)``, ``* 1.0`` in T5) becomes SDPA's ``scale=``;
  a number multiplied into ``q`` or ``k`` before the matmul is folded in too;
- additive tensors (an attention mask, a position bias, both) become ``attn_mask`` (summed
  when there are several);
- ``masked_fill(mask, value)`` / ``where(mask, scores, value)`` become an additive mask
  ``where(mask, value, 0)`` when ``value`` dominates every score (``-inf``, or finite and
  ``<= -1e30`` such as ``finfo.min``), so that ``score + value == value`` exactly as the fill
  gives; a finite fill like ``-1e4`` is refused (a row masked entirely would average the values
  in eager and not in SDPA);
- eval-mode dropout and casts to the same dtype are skipped.

It then follows the softmax forward to ``@ v``. Everything else refuses the match with a
reason (a near-miss in the report): a softmax over another dim or in another dtype, scaling
after the mask, an op between the scores and the softmax (softcapping, say), scores or
weights used elsewhere (``output_attentions``), q/k/v whose batch dims differ (matmul
broadcasts them, SDPA does not), a mask that broadcasts the scores up or has another dtype.

One difference is accepted by default: a row whose scores are all ``-inf`` is NaN in eager
softmax and zeros in SDPA. With ``keep_nan_rows=True`` fills with ``-inf`` are refused
instead. (An additive mask that holds ``-inf`` is a run-time value the pass cannot see; such
masks behave the same way.)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value, node_dtype, node_shape, op_name
from graphopt.ir.meta import infer_meta
from graphopt.ir.ops import BATCHED_MATMUL_OPS, SOFTMAX_OPS
from graphopt.passes.base import Pass, PassResult, register_pass
from graphopt.passes.fusion._match import (
    add_operands,
    erase_dead,
    is_call,
    scalar_value,
    strip_passthrough,
)

aten = torch.ops.aten

__all__ = ["FuseAttention"]

_FILLS = (aten.masked_fill.Scalar, aten.masked_fill.Tensor)
_WHERES = (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf)
DOMINANT_FILL = -1e30
"""A fill value at or below this swallows any score it is added to (``score + fill == fill``)."""


class _Refused(Exception):
    """A near-miss: the chain looks like attention but cannot become SDPA; ``args[0]`` is the reason."""


@dataclass
class _Scores:
    """The score chain between ``q @ k^T`` and the softmax, in graph order (matmul first)."""

    root: fx.Node
    steps: list[tuple[str, Any]] = field(default_factory=list)
    nodes: list[fx.Node] = field(default_factory=list)


def _leads_to_matmul(node: Any, depth: int = 6) -> bool:
    if not isinstance(node, fx.Node) or depth < 0:
        return False
    if is_call(node, *BATCHED_MATMUL_OPS):
        return True
    return any(_leads_to_matmul(n, depth - 1) for n in node.all_input_nodes)


def _chain_side(gm: fx.GraphModule, a: Any, b: Any, shape: Any) -> tuple[fx.Node, Any] | None:
    """Which operand of a binary op carries the scores (same shape, reaches a matmul), and the other."""
    for chain, other in ((a, b), (b, a)):
        if isinstance(chain, fx.Node) and node_shape(chain) == shape and _leads_to_matmul(chain):
            return chain, other
    return None


def _walk_scores(gm: fx.GraphModule, softmax: fx.Node) -> _Scores | None:
    """Walk from the softmax input back to ``q @ k^T``; None when no matmul feeds it at all."""
    node = softmax.args[0]
    shape = node_shape(softmax)
    steps: list[tuple[str, Any]] = []
    nodes: list[fx.Node] = []
    for _ in range(32):
        stripped = strip_passthrough(node)
        if stripped is not node:
            nodes.append(node)
            node = stripped
            continue
        if not isinstance(node, fx.Node):
            return None
        if is_call(node, *BATCHED_MATMUL_OPS):
            if node_shape(node) != shape:
                raise _Refused("the mask broadcasts the scores to a larger shape")
            steps.reverse()
            nodes.reverse()
            return _Scores(node, steps, nodes)
        if node_dtype(node) is not None and node_dtype(node) != node_dtype(softmax.args[0]):
            if _leads_to_matmul(node):
                raise _Refused(f"the scores are cast from {node_dtype(node)} before the softmax")
            return None
        step = _score_step(gm, node, shape)
        if step is None:
            if _leads_to_matmul(node):
                raise _Refused(f"{op_name(node.target)} between the scores and the softmax")
            return None
        kind, payload, previous = step
        steps.append((kind, payload))
        nodes.append(node)
        node = previous
    return None


def _score_step(gm: fx.GraphModule, node: fx.Node, shape: Any) -> tuple[str, Any, fx.Node] | None:
    """One op of the score chain: ``(kind, payload, node before it)``, or None for another op."""
    if node.op != "call_function":
        return None
    target, args = node.target, node.args
    if target in (aten.mul.Tensor, aten.mul.Scalar):
        for chain, other in ((args[0], args[1]), (args[1], args[0])):
            value = scalar_value(gm, other)
            if value is not None and isinstance(chain, fx.Node):
                return "scale", value, chain
        if _chain_side(gm, args[0], args[1], shape) is not None:
            raise _Refused("the scores are multiplied by a tensor")
        return None
    if target in (aten.div.Tensor, aten.div.Scalar) and isinstance(args[0], fx.Node):
        value = scalar_value(gm, args[1])
        if value is not None and value != 0 and len(args) < 3 and not node.kwargs.get("rounding_mode"):
            return "scale", 1.0 / value, args[0]
        return None
    operands = add_operands(node)
    if operands is not None:
        a, b = operands
        if scalar_value(gm, b) is not None or scalar_value(gm, a) is not None:
            if _leads_to_matmul(node):
                raise _Refused("a number is added to the scores")
            return None
        sides = _chain_side(gm, a, b, shape)
        if sides is None:
            return None
        return "add", sides[1], sides[0]
    if target in _FILLS:
        return "fill", (args[1], args[2], True), args[0]
    if target in _WHERES:
        condition, when_true, when_false = args
        sides = _chain_side(gm, when_true, when_false, shape)
        if sides is None:
            return None
        chain, fill = sides
        return "fill", (condition, fill, chain is when_false), chain
    return None


def _transposed_back(node: fx.Node) -> fx.Node | None:
    """``k`` for ``k^T`` written as a transpose/permute/``t`` of the last two dims, else None."""
    shape = node_shape(node)
    if shape is None or not is_call(node, aten.transpose.int, aten.permute.default, aten.t.default):
        return None
    rank = len(shape)
    if node.target is aten.t.default:
        return node.args[0] if rank == 2 else None
    if node.target is aten.transpose.int:
        dims = {node.args[1] % rank, node.args[2] % rank}
        return node.args[0] if dims == {rank - 2, rank - 1} else None
    perm = [d % rank for d in node.args[1]]
    wanted = [*range(rank - 2), rank - 1, rank - 2]
    return node.args[0] if perm == wanted else None


def _fold_scale(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, float, fx.Node | None]:
    """``(x, c, folded node)`` when ``node`` is ``x * c`` / ``x / c`` used only here; else ``(node, 1, None)``."""
    if len(node.users) == 1 and is_call(node, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
        a, b = node.args[0], node.args[1]
        value = scalar_value(gm, b)
        if value is not None and isinstance(a, fx.Node) and not node.kwargs.get("rounding_mode"):
            if node.target in (aten.mul.Tensor, aten.mul.Scalar):
                return a, value, node
            if value != 0:
                return a, 1.0 / value, node
    return node, 1.0, None


def _weights_consumer(softmax: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The ``weights @ v`` matmul the softmax feeds (through eval dropout and no-op casts)."""
    node, passed = softmax, []
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise _Refused("the attention weights are also used elsewhere (returned or reused)")
        user = users[0]
        if is_call(user, *BATCHED_MATMUL_OPS) and user.args[0] is node:
            return user, passed
        if strip_passthrough(user) is node:
            passed.append(user)
            node = user
            continue
        if is_call(user, aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout):
            raise _Refused(f"the attention weights are cast to {node_dtype(user)}")
        raise _Refused(f"the attention weights feed {op_name(user.target)}, not a matmul with the values")


def _softmax_problem(softmax: fx.Node) -> str | None:
    shape = node_shape(softmax)
    if shape is None or len(shape) < 2:
        return "softmax of a tensor with fewer than 2 dims"
    dim = softmax.args[1] % len(shape)
    if dim != len(shape) - 1:
        return f"softmax over dim {softmax.args[1]}, not the last (key) dim"
    if softmax.target is aten.softmax.int:
        dtype = softmax.args[2] if len(softmax.args) > 2 else softmax.kwargs.get("dtype")
        if dtype is not None and dtype != node_dtype(softmax.args[0]):
            return f"softmax computed in {dtype}, the scores are {node_dtype(softmax.args[0])}"
    elif softmax.target is aten._softmax.default and softmax.args[2]:
        return "softmax computed in float32 from half-precision scores"
    return None


@dataclass(frozen=True)
class _Plan:
    """Everything needed to build one SDPA node."""

    q: fx.Node
    k: fx.Node
    k_needs_transpose: bool
    v: fx.Node
    scale: float
    additive: list[fx.Node]
    fills: list[tuple[fx.Node, float, bool]]
    output: fx.Node
    matched: list[fx.Node]
    is_causal: bool = False


def _plan(gm: fx.GraphModule, softmax: fx.Node, keep_nan_rows: bool) -> _Plan | None:
    """How to replace the attention ending at ``softmax``; None when it is no attention at all."""
    scores = _walk_scores(gm, softmax)
    if scores is None:
        return None
    problem = _softmax_problem(softmax)
    if problem:
        raise _Refused(problem)
    for node in [scores.root, *scores.nodes]:
        if len(node.users) != 1:
            raise _Refused("the scores are also used elsewhere")
    scale, additive, fills, masked = 1.0, [], [], False
    for kind, payload in scores.steps:
        if kind == "scale":
            if masked:
                raise _Refused("the scores are scaled after the mask is applied")
            scale *= payload
        elif kind == "add":
            if not isinstance(payload, fx.Node):
                raise _Refused("the added mask is not a tensor")
            additive.append(payload)
            masked = True
        else:
            condition, fill, fill_where_true = payload
            value = scalar_value(gm, fill)
            if value is None:
                raise _Refused("the masked-fill value is computed at run time")
            if value == float("-inf") and keep_nan_rows:
                raise _Refused("fill with -inf: fully masked rows are NaN in eager, zeros in SDPA (keep_nan_rows=True)")
            if value > DOMINANT_FILL:
                raise _Refused(
                    f"masked-fill value {value:g} does not dominate the scores (needs -inf or <= -1e30): "
                    "a fully masked row would differ"
                )
            if node_dtype(condition) != torch.bool:
                raise _Refused("the masked-fill mask is not boolean")
            fills.append((condition, value, fill_where_true))
            masked = True
    pv, passed = _weights_consumer(softmax)
    q, kt = scores.root.args[0], scores.root.args[1]
    matched = [pv, *passed, softmax, *scores.nodes, scores.root]
    q, q_scale, folded = _fold_scale(gm, q)
    matched += [folded] if folded is not None else []
    kt, kt_scale, folded = _fold_scale(gm, kt)
    matched += [folded] if folded is not None else []
    k = _transposed_back(kt)
    k_needs_transpose = k is None
    if k is None:
        k, k_scale = kt, 1.0
    else:
        matched.append(kt)
        k, k_scale, folded = _fold_scale(gm, k)
        matched += [folded] if folded is not None else []
    v = pv.args[1]
    _check_operands(q, kt, v, additive)
    is_causal = False
    constant = _constant_mask(gm, additive, fills)
    if constant is not None:
        kind = _constant_mask_kind(constant, node_shape(scores.root))
        if kind is not None:
            additive, fills, is_causal = [], [], kind == "causal"
    return _Plan(q, k, k_needs_transpose, v, scale * q_scale * kt_scale * k_scale, additive, fills, pv, matched,
                 is_causal)


def _constant_mask(gm: fx.GraphModule, additive: list[fx.Node], fills: list[tuple[fx.Node, float, bool]]
                   ) -> torch.Tensor | None:
    """The additive mask as a tensor when it is one constant (an additive buffer or a fill by a constant mask)."""
    if len(additive) + len(fills) != 1:
        return None
    if additive:
        return attribute_value(gm, additive[0])
    condition, value, fill_where_true = fills[0]
    keep = attribute_value(gm, condition)
    if keep is None:
        return None
    keep = ~keep if fill_where_true else keep
    return torch.zeros(keep.shape).masked_fill(~keep, value)


def _constant_mask_kind(value: torch.Tensor, scores_shape: Any) -> str | None:
    """``"zeros"`` for a constant all-zero mask, ``"causal"`` for a constant causal one, else None.

    A causal mask holds 0 on and below the diagonal and a dominant negative value above it, so
    SDPA's ``is_causal=True`` (which uses ``-inf``) gives the same weights: no row is fully masked.
    """
    if not value.is_floating_point() or value.dim() < 2:
        return None
    if bool((value == 0).all()):
        return "zeros"
    rows, columns = value.shape[-2:]
    length, keys = scores_shape[-2], scores_shape[-1]
    if not isinstance(length, int) or not rows == columns == length == keys:
        return None
    below = torch.ones(rows, columns, dtype=torch.bool, device=value.device).tril()
    flat = value.reshape(-1, rows, columns)
    if bool((flat[:, below] == 0).all()) and bool((flat[:, ~below] <= DOMINANT_FILL).all()):
        return "causal"
    return None


def _check_operands(q: fx.Node, kt: fx.Node, v: fx.Node, additive: list[fx.Node]) -> None:
    shapes = [node_shape(n) for n in (q, kt, v)]
    if any(s is None for s in shapes):
        raise _Refused("q, k or v has no recorded shape")
    q_shape, kt_shape, v_shape = shapes
    if not len(q_shape) == len(kt_shape) == len(v_shape) or len(q_shape) < 2:
        raise _Refused("q, k and v have different ranks (matmul broadcasts them, SDPA does not)")
    if not q_shape[:-2] == kt_shape[:-2] == v_shape[:-2]:
        raise _Refused("q, k and v batch dims differ (matmul broadcasts them, SDPA does not)")
    dtypes = {node_dtype(n) for n in (q, kt, v)}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise _Refused("q, k and v are not all of one floating dtype")
    dtype = next(iter(dtypes))
    for mask in additive:
        if node_dtype(mask) != dtype:
            raise _Refused(f"additive mask dtype {node_dtype(mask)} differs from the scores' {dtype}")


def _build(gm: fx.GraphModule, plan: _Plan) -> fx.Node:
    graph = gm.graph
    new: list[fx.Node] = []

    def call(target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        node = graph.call_function(target, args, kwargs or {})
        infer_meta(node)
        new.append(node)
        return node

    with graph.inserting_before(plan.output):
        k = call(aten.transpose.int, (plan.k, -2, -1)) if plan.k_needs_transpose else plan.k
        terms = list(plan.additive)
        for condition, value, fill_where_true in plan.fills:
            fill = call(aten.new_full.default, (plan.q, [], value))
            zero = call(aten.new_zeros.default, (plan.q, []))
            terms.append(call(aten.where.self, (condition, fill, zero) if fill_where_true else (condition, zero, fill)))
        mask = terms[0] if terms else None
        for term in terms[1:]:
            mask = call(aten.add.Tensor, (mask, term))
        sdpa = call(aten.scaled_dot_product_attention.default, (plan.q, k, plan.v, mask, 0.0, plan.is_causal),
                    {"scale": plan.scale})
    sdpa.meta.setdefault("stack_trace", plan.output.meta.get("stack_trace"))
    plan.output.replace_all_uses_with(sdpa)
    return sdpa


@register_pass
@dataclass(frozen=True)
class FuseAttention(Pass):
    """Replace hand-written ``softmax(q @ k^T * scale + mask) @ v`` by ``aten.scaled_dot_product_attention``.

    ``keep_nan_rows=True`` refuses ``-inf`` fills, whose fully masked rows are NaN in eager but
    zeros in SDPA. Near-misses name why a softmax that is fed by a matmul was not fused.
    """

    name = "fuse-attention"
    keep_nan_rows: bool = False

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Fuse every attention chain the pass can prove equal; count the refusals by reason."""
        fused, masked, causal, misses = 0, 0, 0, Counter[str]()
        for softmax in list(gm.graph.nodes):
            if not is_call(softmax, *SOFTMAX_OPS):
                continue
            try:
                plan = _plan(gm, softmax, self.keep_nan_rows)
            except _Refused as refusal:
                misses[str(refusal.args[0])] += 1
                continue
            if plan is None:
                continue
            _build(gm, plan)
            erase_dead(gm, plan.matched)
            fused += 1
            masked += bool(plan.additive or plan.fills)
            causal += plan.is_causal
        if fused:
            gm.graph.lint()
        return PassResult(
            changed=fused > 0,
            stats={"fused": fused, "with_mask": masked, "causal": causal},
            rule_hits={"attention": fused} if fused else {},
            near_misses={self.name: dict(misses)} if misses else {},
        )
