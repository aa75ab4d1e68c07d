"""Propagating symbolic shapes through a static graph, deciding which literal sizes and constants follow a freed dim.

See ``graphopt.ir.free_dims`` for what is matched how.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import re
from collections.abc import Mapping
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from graphopt.errors import InputError
from graphopt.ir.free_dims.sizes import Size, Sliced, TensorOps, apply_cuts, build
from graphopt.ir.op_traits import broadcasting

__all__ = ["Propagation"]

aten = torch.ops.aten

_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_EXPANDS = {aten.expand.default}
# scalar size arguments (not lists) that may carry a freed size: slice bounds, arange ends, narrow lengths
_SCALAR_SIZES = {
    aten.slice.Tensor: ("start", "end"),
    aten.arange.default: ("end",),
    aten.arange.start: ("start", "end"),
    aten.arange.start_step: ("start", "end"),
    aten.narrow.default: ("length",),
}


def _size_of(size: Any) -> sympy.Expr:
    """A tensor dim's size as a sympy expression (an integer when it is fixed)."""
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _hint(expr: sympy.Expr, hints: Mapping[sympy.Symbol, int]) -> int:
    return int(expr.subs(hints))


def _simplest(candidates: list[sympy.Expr], order: Mapping[sympy.Symbol, int]) -> sympy.Expr:
    """The plainest expression: fewest symbols, outer (earlier-created) symbols first."""
    return min(candidates, key=lambda e: (len(e.free_symbols), sorted(order[s] for s in e.free_symbols),
                                          sympy.count_ops(e), str(e)))



class Propagation(fx.Interpreter):
    """Runs the graph on fake tensors with symbolic freed dims, replacing the literal sizes that came from them."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, env: ShapeEnv,
                 symbols: dict[str, sympy.Symbol], hints: dict[sympy.Symbol, int]) -> None:
        super().__init__(gm)
        self.hints = hints  # each freed size's value in the example
        self.mode = mode
        self.shape_env = env
        self.symbols = symbols
        self.order = {s: i for i, s in enumerate(symbols.values())}
        self.names = {s: name for name, s in symbols.items()}
        self.pool: set[sympy.Expr] = set()  # every symbolic size seen so far
        self.decisions: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.fitted: set[str] = set()  # constants cut or rebuilt to fit the freed dims
        self.bounds: dict[str, int] = {}  # freed sizes that may not exceed their example value
        self.weight_only: set[fx.Node] = set()  # nodes computed from weights alone (no graph input)
        self._real_values: dict[fx.Node, Any] = {}  # the real values of those asked for


    def fetch_attr(self, target: str) -> Any:
        """A weight as a fake tensor of its fixed shape."""
        value = super().fetch_attr(target)
        return self.mode.from_tensor(value, static_shapes=True) if isinstance(value, torch.Tensor) else value

    def run_node(self, n: fx.Node) -> Any:
        """Run ``n`` on fake tensors; raise ``InputError`` when it fixes a freed size to a number."""
        self.current = n
        result = super().run_node(n)
        self._record_constant(n)
        for value in torch.utils._pytree.tree_leaves(result):
            if isinstance(value, torch.Tensor):
                self.pool.update(e for e in map(_size_of, value.shape) if e.free_symbols)
        fixed = [self.names[s] for s in self.symbols.values()
                 if isinstance(self.shape_env.replacements.get(s), sympy.Integer)]
        if fixed:
            raise InputError(f"free_dims: the size named {fixed[0]!r} cannot vary in this graph: node "
                             f"{n.format_node()} fixes it to {self.shape_env.replacements[self.symbols[fixed[0]]]}. "
                             "Optimize with dynamic shapes declared instead (dynamic_shapes=... / dynamic_batch=True).")
        return result

    def _record_constant(self, n: fx.Node) -> None:
        """Note whether ``n`` is computed from weights alone (a folded table and its views)."""
        if n.op == "get_attr" or (n.op == "call_function" and n.all_input_nodes
                                  and all(a in self.weight_only for a in n.all_input_nodes)):
            self.weight_only.add(n)

    def _is_constant(self, node: Any) -> bool:
        """Whether ``node`` is a tensor computed from weights alone."""
        return node in self.weight_only and isinstance(self.env.get(node), torch.Tensor)

    def _real(self, node: fx.Node) -> Any:
        """The real (not fake) value of a weight-only node, computed when first asked for."""
        if node not in self._real_values:
            if node.op == "get_attr":
                value = super().fetch_attr(str(node.target))
            else:
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), self._real)
                with unset_fake_temporarily():
                    value = node.target(*args, **kwargs)
            self._real_values[node] = value
        return self._real_values[node]

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run an op with its freed sizes and fitted constants, recording what was replaced."""
        new_args, new_kwargs = self._replace_sizes(target, args, kwargs)
        new_args = self._cut_constants(target, new_args)
        if new_args is not args or new_kwargs is not kwargs:
            self.decisions[self.current.name] = (new_args, new_kwargs)
            args, kwargs = self._materialize(new_args), self._materialize(new_kwargs)
        return super().call_function(target, args, kwargs)

    # -- constants folded at the example's sizes -------------------------------------------------

    def _cut_constants(self, target: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Fit the constants an op combines with freed sizes: folded masks, position tables, index ranges."""
        node_args = self.current.args
        if target is aten.index.Tensor:
            return self._cut_indices(args)
        if target is aten.cat.default and isinstance(args[0], (list, tuple)):
            tensors = list(args[0])
            rank = max((t.dim() for t in tensors), default=0)
            dim = (args[1] if len(args) > 1 else 0) % max(rank, 1)
            fitted = self._fit(tensors, list(node_args[0]), [list(t.shape) for t in tensors], skip=rank - dim,
                               broadcasts=False)
            return args if fitted is None else (fitted, *args[1:])
        if target is aten.scaled_dot_product_attention.default:
            if len(args) < 4 or not isinstance(args[3], torch.Tensor):
                return args
            scores = [*args[0].shape[:-1], args[1].shape[-2]]  # the attention mask broadcasts to [..., Lq, Lk]
            fitted = self._fit([args[3]], [node_args[3]], [list(args[3].shape), scores])
            return args if fitted is None else (*args[:3], fitted[0], *args[4:])
        if broadcasting(target) is None:
            return args
        shapes = [list(a.shape) if isinstance(a, torch.Tensor) else [] for a in args]
        fitted = self._fit(list(args), list(node_args), shapes)
        return args if fitted is None else tuple(fitted)

    def _fit(self, values: list[Any], node_args: list[Any], shapes: list[list[Any]], skip: int | None = None,
             broadcasts: bool = True) -> list[Any] | None:
        """``values`` with their constants cut along the dims where the other ``shapes`` carry a freed size.

        ``shapes[i]`` is the shape of ``values[i]`` (more shapes may follow: what they broadcast to);
        ``skip``: a dim, counted from the end, that is not matched (a concatenation's); ``broadcasts``:
        whether the op broadcasts (else a uniform constant is expanded to the freed size, not cut to 1).
        """
        new_values = list(values)
        for index, (value, node_arg) in enumerate(zip(values, node_args, strict=False)):
            if not (isinstance(value, torch.Tensor) and self._is_constant(node_arg)):
                continue
            # what it meets: the shapes of the operands that are not constants themselves (those get fitted too)
            others = [shape for i, shape in enumerate(shapes) if shape and i != index
                      and not (i < len(node_args) and self._is_constant(node_args[i]))]
            cuts = []
            for dim in range(value.dim()):
                if value.dim() - dim == skip or isinstance(value.shape[dim], torch.SymInt):
                    continue  # (a dim that already follows a freed size stays)
                freed = self._broadcast_partner(int(value.shape[dim]), value.dim() - dim, others)
                if freed is not None:
                    kind = self._cut_kind(node_arg, dim)
                    cuts.append((dim, "expand" if kind == "uniform" and not broadcasts else kind, freed))
                    if kind == "prefix":
                        for symbol in freed.free_symbols:  # the table ends at the example's size
                            name = self.names[symbol]
                            self.bounds[name] = min(self.bounds.get(name, self.hints[symbol]), self.hints[symbol])
            if cuts:
                self.fitted.update(str(a.target) for a in _weights_read(node_arg))
                new_values[index] = Sliced(node_arg, cuts, self._real(node_arg))
        return new_values if any(isinstance(v, Sliced) for v in new_values) else None

    def _broadcast_partner(self, size: int, from_end: int, shapes: list[list[Any]]) -> sympy.Expr | None:
        """The freed size a constant's dim of ``size`` broadcasts against (dims counted from the end), if any.

        It meets a freed size of the same example value, or only size-1 dims with such a size known
        elsewhere in the graph (a folded ``[1, 1, S, 1]`` mask meeting ``[B, 1, 1, S]``); a dim that meets
        an equal fixed size (a bias against the hidden dim) is left alone.
        """
        if size < 2:
            return None
        hints = self.hints
        partners = [_size_of(shape[len(shape) - from_end]) for shape in shapes if len(shape) >= from_end]
        if any(not p.free_symbols and int(p) == size for p in partners):
            return None
        matching = [p for p in partners if p.free_symbols and _hint(p, hints) == size]
        if matching:
            return matching[0]
        if partners and all(p == 1 for p in partners):
            return self._pool_match(size)
        return None

    def _cut_indices(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Constant index tensors that count along a freed dim of the indexed tensor (``x[arange(B), ...]``)."""
        source, indices = args[0], args[1]
        node_indices = self.current.args[1]
        new_indices = list(indices)
        hints = self.hints
        for i, (index, node_arg) in enumerate(zip(indices, node_indices, strict=False)):
            if not (isinstance(index, torch.Tensor) and self._is_constant(node_arg)):
                continue
            extent = _size_of(source.shape[i])
            cuts = [(dim, "arange", extent) for dim in range(index.dim())
                    if extent.free_symbols and not isinstance(index.shape[dim], torch.SymInt)
                    and int(index.shape[dim]) == _hint(extent, hints) >= 2
                    and self._cut_kind(node_arg, dim) == "arange"]
            if cuts:
                self.fitted.update(str(a.target) for a in _weights_read(node_arg))
                new_indices[i] = Sliced(node_arg, cuts, self._real(node_arg))
        if not any(isinstance(a, Sliced) for a in new_indices):
            return args
        return (source, new_indices, *args[2:])

    def _cut_kind(self, node: fx.Node, dim: int) -> str:
        """How a constant varies along ``dim``: ``"uniform"``, ``"arange"`` (counts up by one) or ``"prefix"``."""
        real = self._real(node)
        with unset_fake_temporarily():
            first = real.narrow(dim, 0, 1)
            if torch.equal(real, first.expand_as(real)):
                return "uniform"
            if not real.is_floating_point() and real.dtype != torch.bool:
                steps = torch.arange(real.shape[dim], dtype=real.dtype).view(
                    [-1 if d == dim else 1 for d in range(real.dim())])
                if torch.equal(real, first + steps):
                    return "arange"
        return "prefix"

    # -- which literals to replace ------------------------------------------------------------

    def _replace_sizes(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                       ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        schema = getattr(target, "_schema", None)
        if schema is None or not self.pool:
            return args, kwargs
        new_args, new_kwargs = list(args), dict(kwargs)
        changed = False
        for position, argument in enumerate(schema.arguments):
            in_args = position < len(args)
            if not in_args and argument.name not in kwargs:
                continue
            value = args[position] if in_args else kwargs[argument.name]
            replaced = self._replace_argument(target, argument, value, args)
            if replaced is value:
                continue
            changed = True
            if in_args:
                new_args[position] = replaced
            else:
                new_kwargs[argument.name] = replaced
        return (tuple(new_args), new_kwargs) if changed else (args, kwargs)

    def _replace_argument(self, target: Any, argument: Any, value: Any, args: tuple[Any, ...]) -> Any:
        if argument.name in ("size", "shape") and _int_list(value) and argument.name in _symint_arguments(target):
            if target in _VIEWS:
                return self._regroup(args[0], list(value))
            if target in _EXPANDS:
                return self._expand(args[0], list(value))
            replaced = [self._from_pool(v) for v in value]
            return replaced if any(isinstance(v, Size) for v in replaced) else value
        if argument.name in _SCALAR_SIZES.get(target, ()) and isinstance(value, int) and not isinstance(value, bool):
            if target is aten.slice.Tensor:
                return self._slice_bound(args, value)
            return self._from_pool(value)
        return value

    def _from_pool(self, literal: int) -> Any:
        match = self._pool_match(literal)
        return literal if match is None else Size(match)

    def _pool_match(self, literal: int) -> sympy.Expr | None:
        """The plainest freed size seen so far whose example value is ``literal``."""
        if literal < 2:
            return None
        hints = self.hints
        matches = [e for e in self.pool if _hint(e, hints) == literal]
        return _simplest(matches, self.order) if matches else None

    def _slice_bound(self, args: tuple[Any, ...], literal: int) -> Any:
        """A bound of a slice along a freed dim that equals its size (``x[:, :S]``) follows it; others stay."""
        tensor, dim = args[0], (args[1] if len(args) > 1 else 0)
        size = _size_of(tensor.shape[dim])
        if size.free_symbols and _hint(size, self.hints) == literal:
            return Size(size)
        return literal

    def _expand(self, tensor: torch.Tensor, sizes: list[int]) -> Any:
        hints = self.hints
        offset = len(sizes) - tensor.dim()
        out: list[Any] = []
        for position, literal in enumerate(sizes):
            source = _size_of(tensor.shape[position - offset]) if position >= offset else sympy.Integer(1)
            if literal == -1 or not (source.free_symbols or source == 1):
                out.append(literal)
            elif source.free_symbols and _hint(source, hints) == literal:
                out.append(Size(source))
            else:
                out.append(self._from_pool(literal))
        return out if any(isinstance(v, Size) for v in out) else sizes

    def _regroup(self, tensor: torch.Tensor, sizes: list[int]) -> Any:
        """The sizes of a view of ``tensor``, with the freed dims followed through merges and splits."""
        shape = [_size_of(s) for s in tensor.shape]
        if not any(e.free_symbols for e in shape):
            return sizes
        hints = self.hints
        shape_hints = [_hint(e, hints) for e in shape]
        inferred = [i for i, s in enumerate(sizes) if s == -1]
        literal = list(sizes)
        if inferred:
            known = math.prod(s for s in sizes if s != -1)
            literal[inferred[0]] = math.prod(shape_hints) // max(known, 1)
        out: list[Any] = list(literal)
        for a_run, b_run in _groups(shape_hints, literal):
            exprs = [shape[i] for i in a_run]
            if not any(e.free_symbols for e in exprs):
                continue
            for position, expr in zip(b_run, self._distribute(sympy.Mul(*exprs), [literal[j] for j in b_run]),
                                      strict=True):
                if expr.free_symbols:
                    out[position] = Size(expr)
        for position in inferred:
            out[position] = -1
        return out if any(isinstance(v, Size) for v in out) else sizes

    def _distribute(self, total: sympy.Expr, literals: list[int]) -> list[sympy.Expr]:
        """Split ``total`` (a product of symbols and a constant) over ``literals``, symbols outermost."""
        if len(literals) == 1:
            return [total]
        hints = self.hints
        factors = [base for base, power in total.as_powers_dict().items() if base.free_symbols
                   for _ in range(int(power))]
        factors.sort(key=lambda f: sorted(self.order.get(s, 0) for s in f.free_symbols))
        for placement in itertools.product(range(len(literals)), repeat=len(factors)):
            if list(placement) != sorted(placement):
                continue  # keep the symbols in order: the first one outermost
            parts: list[sympy.Expr] = [sympy.Integer(1)] * len(literals)
            for factor, slot in zip(factors, placement, strict=True):
                parts[slot] = parts[slot] * factor
            scales = [lit / _hint(p, hints) for lit, p in zip(literals, parts, strict=True)]
            if all(float(s).is_integer() and s >= 1 for s in scales):
                return [sympy.Integer(int(s)) * p for s, p in zip(scales, parts, strict=True)]
        raise InputError(f"free_dims: cannot split a size {total} over {literals} at node "
                         f"{self.current.format_node()}; optimize with dynamic shapes declared instead")

    def _materialize(self, value: Any) -> Any:
        if isinstance(value, Sliced):
            constant = self.env[value.node]
            return apply_cuts(constant, value.cuts, self._materialize_expr, TensorOps, constant)
        if isinstance(value, Size):
            return build(value.expr, self._symint, operator.mul, operator.add, operator.floordiv)
        if isinstance(value, (list, tuple)):
            return type(value)(self._materialize(v) for v in value)
        if isinstance(value, dict):
            return {k: self._materialize(v) for k, v in value.items()}
        return value

    def _materialize_expr(self, expr: sympy.Expr) -> Any:
        return build(expr, self._symint, operator.mul, operator.add, operator.floordiv)

    def _symint(self, symbol: sympy.Symbol) -> torch.SymInt:
        return self.shape_env.create_symintnode(symbol, hint=self.hints[symbol])



def _weights_read(node: fx.Node) -> list[fx.Node]:
    """The ``get_attr`` nodes a constant node is computed from."""
    seen, stack, found = set(), [node], []
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr":
            found.append(current)
        stack.extend(current.all_input_nodes)
    return found



def _int_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _groups(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]]:
    """Split two shapes of equal element count into runs of dims with equal products (a view's regrouping)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        a_run, b_run = [], []
        pa = pb = 1
        if i < len(a):
            pa, i = a[i], i + 1
            a_run.append(i - 1)
        if j < len(b):
            pb, j = b[j], j + 1
            b_run.append(j - 1)
        while pa != pb:
            if pa < pb and i < len(a):
                pa, i = pa * a[i], i + 1
                a_run.append(i - 1)
            elif pb < pa and j < len(b):
                pb, j = pb * b[j], j + 1
                b_run.append(j - 1)
            else:
                break
        groups.append((a_run, b_run))
    return groups


@functools.cache
def _symint_arguments(target: Any) -> frozenset[str]:
    """The names of an op's arguments declared ``SymInt`` or ``SymInt[]`` (sizes, as opposed to dims)."""
    return frozenset(re.findall(r"SymInt(?:\[\d*\])?\??\s+(\w+)", str(target._schema)))


