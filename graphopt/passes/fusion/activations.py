"""Fuse activations written op by op into their single ATen op.

| written as | becomes |
|---|---|
| ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))`` | ``gelu(x, approximate="tanh")`` |
| (any association, ``x*x*x``, FastGELU's ``x * 0.79788 * (1 + 0.044715 * x * x)``) | |
| ``0.5 * x * (1 + erf(x / sqrt(2)))`` | ``gelu(x)`` |
| ``x * sigmoid(x)`` | ``silu(x)`` |
| ``x * relu6(x + 3) / 6`` (``hardtanh``/``clamp(0, 6)`` too) | ``hardswish(x)`` |
| ``relu6(x + 3) / 6`` | ``hardsigmoid(x)`` |

Matching is algebraic, not by op sequence: the argument of ``tanh``/``erf`` is read as a
polynomial in one tensor ``x`` (products, sums, powers and numbers), and the product around
``1 + tanh(...)`` as ``coefficient * x * (1 + tanh(...))``, so any association or order of the
factors matches. Coefficients must agree with the exact ones to a relative ``1e-5`` (user code
often writes ``0.7978845608``); a different one is a near-miss naming it, and so is
``x * sigmoid(c * x)`` with ``c != 1`` (QuickGELU, swish-beta: no single ATen op).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import node_dtype
from graphopt.ir.meta import infer_meta
from graphopt.ir.op_args import argument
from graphopt.passes.base import Pass, PassResult, register_pass
from graphopt.passes.fusion._match import add_operands, close_to, erase_dead, is_call, scalar_value

aten = torch.ops.aten

__all__ = ["FuseActivations"]

COEFFICIENT_TOLERANCE = 1e-5
"""Relative difference allowed between a written coefficient and the exact one."""

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
_MUL = (aten.mul.Tensor, aten.mul.Scalar)
_DIV = (aten.div.Tensor, aten.div.Scalar)
_RELU6_LIKE = (aten.hardtanh.default, aten.relu6.default, aten.clamp.default)

Poly = dict[int, float]


def _poly(gm: fx.GraphModule, node: Any, x: fx.Node, depth: int = 10) -> Poly | None:
    """``node`` as a polynomial in ``x`` (power -> coefficient), or None when it is not one."""
    if node is x:
        return {1: 1.0}
    value = scalar_value(gm, node)
    if value is not None:
        return {0: value}
    if not isinstance(node, fx.Node) or depth == 0 or node.op != "call_function":
        return None
    args = node.args
    if node.target in _MUL:
        a, b = _poly(gm, args[0], x, depth - 1), _poly(gm, args[1], x, depth - 1)
        return _times(a, b) if a is not None and b is not None else None
    if node.target in _DIV and not node.kwargs.get("rounding_mode"):
        divisor = scalar_value(gm, args[1])
        a = _poly(gm, args[0], x, depth - 1)
        return {p: c / divisor for p, c in a.items()} if a is not None and divisor else None
    if node.target in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
        alpha = argument(node, "alpha", 1)
        sign = -alpha if node.target in (aten.sub.Tensor, aten.sub.Scalar) else alpha
        a, b = _poly(gm, args[0], x, depth - 1), _poly(gm, args[1], x, depth - 1)
        if a is None or b is None:
            return None
        total = dict(a)
        for power, coefficient in b.items():
            total[power] = total.get(power, 0.0) + sign * coefficient
        return total
    if node.target in (aten.pow.Tensor_Scalar,) and isinstance(args[1], (int, float)) and float(args[1]).is_integer():
        exponent = int(args[1])
        base = _poly(gm, args[0], x, depth - 1)
        if base is None or not 0 < exponent <= 4:
            return None
        result: Poly = {0: 1.0}
        for _ in range(exponent):
            result = _times(result, base)
        return result
    return None


def _times(a: Poly, b: Poly) -> Poly:
    result: Poly = {}
    for pa, ca in a.items():
        for pb, cb in b.items():
            result[pa + pb] = result.get(pa + pb, 0.0) + ca * cb
    return result


def _terms(poly: Poly) -> Poly:
    return {p: c for p, c in poly.items() if c != 0.0}


def _candidates(node: Any, depth: int = 8) -> list[fx.Node]:
    """Nodes inside the arithmetic around ``node`` that could be the variable ``x`` (deepest first)."""
    found: list[fx.Node] = []
    frontier = [node]
    for _ in range(depth):
        following = []
        for current in frontier:
            if not isinstance(current, fx.Node):
                continue
            if current not in found:
                found.append(current)
            if current.op == "call_function" and current.target in (*_MUL, *_DIV, aten.add.Tensor, aten.sub.Tensor,
                                                                    aten.pow.Tensor_Scalar):
                following.extend(a for a in current.args if isinstance(a, fx.Node))
        frontier = following
    return list(reversed(found))


def _monomial(
    gm: fx.GraphModule, node: Any, leaves: tuple[fx.Node, ...], depth: int = 6
) -> tuple[float, Counter] | None:
    """``node`` as ``coefficient * product(leaves)``: the coefficient and how often each leaf occurs."""
    if isinstance(node, fx.Node) and node in leaves:
        return 1.0, Counter({node: 1})
    value = scalar_value(gm, node)
    if value is not None:
        return value, Counter()
    if not isinstance(node, fx.Node) or depth == 0:
        return None
    if is_call(node, *_MUL):
        a, b = _monomial(gm, node.args[0], leaves, depth - 1), _monomial(gm, node.args[1], leaves, depth - 1)
        return (a[0] * b[0], a[1] + b[1]) if a is not None and b is not None else None
    if is_call(node, *_DIV) and not node.kwargs.get("rounding_mode"):
        divisor = scalar_value(gm, node.args[1])
        a = _monomial(gm, node.args[0], leaves, depth - 1)
        return (a[0] / divisor, a[1]) if a is not None and divisor else None
    return None


def _product_root(gm: fx.GraphModule, factor: fx.Node, x: fx.Node, coefficient: float) -> fx.Node | None:
    """The lowest node above ``factor`` that is ``coefficient * x * factor`` (mul/div nodes only)."""
    frontier = [factor]
    for _ in range(4):
        following = []
        for node in frontier:
            for user in node.users:
                if not is_call(user, *_MUL, *_DIV):
                    continue
                found = _monomial(gm, user, (x, factor))
                if found is not None and found[1] == Counter({x: 1, factor: 1}):
                    if close_to(found[0], coefficient, COEFFICIENT_TOLERANCE):
                        return user
                following.append(user)
        frontier = following
    return None


def _one_plus(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The ``1 + node`` user of ``node``, if any."""
    for user in node.users:
        operands = add_operands(user)
        if operands is not None and node in operands:
            other = operands[1] if operands[0] is node else operands[0]
            if scalar_value(gm, other) == 1.0:
                return user
    return None


@dataclass
class _Found:
    root: fx.Node
    x: fx.Node
    target: Any
    kwargs: dict
    label: str


def _gelu(gm: fx.GraphModule, node: fx.Node, misses: Counter) -> _Found | None:
    """``node`` is ``tanh``/``erf``: the GELU around it, or None."""
    inner = node.args[0]
    is_tanh = node.target is aten.tanh.default
    one_plus = _one_plus(gm, node)
    if one_plus is None:
        return None
    for x in _candidates(inner):
        poly = _poly(gm, inner, x)
        if poly is None:
            continue
        poly = _terms(poly)
        if is_tanh:
            if set(poly) != {1, 3}:
                continue
            if not close_to(poly[1], _SQRT_2_OVER_PI, COEFFICIENT_TOLERANCE) or not close_to(
                poly[3] / poly[1], _GELU_CUBIC, COEFFICIENT_TOLERANCE
            ):
                written = f"{poly[1]:.8g}, {poly[3] / poly[1]:.8g}"
                misses[f"tanh-GELU coefficients {written} are not sqrt(2/pi), 0.044715"] += 1
                return None
        else:
            if set(poly) != {1}:
                continue
            if not close_to(poly[1], 1 / math.sqrt(2.0), COEFFICIENT_TOLERANCE):
                misses[f"erf-GELU scales x by {poly[1]:.8g}, not 1/sqrt(2)"] += 1
                return None
        root = _product_root(gm, one_plus, x, 0.5)
        if root is None:
            misses["1 + tanh/erf(...) is not multiplied by 0.5 * x"] += 1
            return None
        approximate = "tanh" if is_tanh else "none"
        kwargs = {"approximate": "tanh"} if is_tanh else {}
        return _Found(root, x, aten.gelu.default, kwargs, f"gelu-{approximate}")
    return None


def _silu(gm: fx.GraphModule, node: fx.Node, misses: Counter) -> _Found | None:
    """``node`` is ``sigmoid``: ``x * sigmoid(x)`` around it, or None."""
    x = node.args[0]
    root = _product_root(gm, node, x, 1.0)
    if root is not None:
        return _Found(root, x, aten.silu.default, {}, "silu")
    for user in node.users:  # x * sigmoid(c * x): QuickGELU or swish-beta
        if is_call(user, *_MUL):
            other = user.args[1] if user.args[0] is node else user.args[0]
            poly = _poly(gm, x, other) if isinstance(other, fx.Node) else None
            if poly is not None and set(_terms(poly)) == {1}:
                misses[f"x * sigmoid({poly[1]:.4g} * x) is not SiLU (no single ATen op)"] += 1
    return None


def _relu6_input(gm: fx.GraphModule, node: fx.Node) -> Any:
    """The input of a ``relu6``-like clamp to [0, 6], or None."""
    if is_call(node, aten.relu6.default):
        return node.args[0]
    if is_call(node, aten.hardtanh.default, aten.clamp.default):
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", node.kwargs.get("min"))
        high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", node.kwargs.get("max"))
        if scalar_value(gm, low) == 0.0 and scalar_value(gm, high) == 6.0:
            return node.args[0]
    return None


def _hard(gm: fx.GraphModule, node: fx.Node, misses: Counter) -> _Found | None:
    """``node`` clamps to [0, 6]: hardswish or hardsigmoid around it, or None."""
    shifted = _relu6_input(gm, node)
    if not isinstance(shifted, fx.Node):
        return None
    for x in _candidates(shifted, depth=2):
        poly = _poly(gm, shifted, x)
        if poly is None or _terms(poly) != {0: 3.0, 1: 1.0}:
            continue
        root = _product_root(gm, node, x, 1.0 / 6.0)
        if root is not None:
            return _Found(root, x, aten.hardswish.default, {}, "hardswish")
        for user in node.users:
            found = _monomial(gm, user, (node,)) if is_call(user, *_MUL, *_DIV) else None
            if found is not None and found[1] == Counter({node: 1}) and close_to(found[0], 1 / 6, 1e-6):
                return _Found(user, x, aten.hardsigmoid.default, {}, "hardsigmoid")
    return None


_MATCHERS = {
    aten.tanh.default: _gelu,
    aten.erf.default: _gelu,
    aten.sigmoid.default: _silu,
    aten.relu6.default: _hard,
    aten.hardtanh.default: _hard,
    aten.clamp.default: _hard,
}


@register_pass
@dataclass(frozen=True)
class FuseActivations(Pass):
    """Replace GELU (tanh and erf forms), SiLU, hardswish and hardsigmoid written op by op by their ATen op."""

    name = "fuse-activations"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Fuse every decomposed activation; near-misses name wrong coefficients and look-alikes."""
        hits, misses = Counter[str](), Counter[str]()
        erased: set[fx.Node] = set()
        for node in list(gm.graph.nodes):
            if node in erased or node.op != "call_function" or node.target not in _MATCHERS:
                continue
            found = _MATCHERS[node.target](gm, node, misses)
            if found is None:
                continue
            dtype = node_dtype(found.x)
            if dtype is None or not dtype.is_floating_point:
                misses[f"{found.label} of a non-floating tensor"] += 1
                continue
            with gm.graph.inserting_before(found.root):
                fused = gm.graph.call_function(found.target, (found.x,), found.kwargs)
            infer_meta(fused)
            found.root.replace_all_uses_with(fused)
            erased |= erase_dead(gm, _subgraph(found.root, found.x))
            hits[found.label] += 1
        return PassResult(
            changed=bool(hits),
            stats={"fused": sum(hits.values())},
            rule_hits=dict(hits),
            near_misses={self.name: dict(misses)} if misses else {},
        )


def _subgraph(root: fx.Node, x: fx.Node) -> list[fx.Node]:
    """Every node between ``x`` and ``root`` (exclusive of ``x``), found by walking up from ``root``."""
    seen, stack = {root}, [root]
    while stack:
        node = stack.pop()
        for arg in node.all_input_nodes:
            if arg is not x and arg not in seen and arg.op == "call_function":
                seen.add(arg)
                stack.append(arg)
    return list(seen)
