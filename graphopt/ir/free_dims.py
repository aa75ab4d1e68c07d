"""Free input dims of a static graph: re-derive the sizes it baked in from its inputs' sizes.

A graph captured with static shapes carries the example's sizes as literals, e.g.
``view(x, [540, 512])`` after a flatten. ``free_dims`` returns a copy in which chosen input dims
(the batch, a sequence length) may take other sizes: every literal size that came from a freed
dim becomes ``sym_size`` of the input it came from (times the other factors it was merged with).
Which literals came from a freed dim is found by propagating symbolic shapes through the graph
(fake tensors on a ``ShapeEnv``) and matching each literal against the sizes of the tensors it
acts on:

- ``view`` / ``reshape`` sizes are regrouped against the input's shape, so a merge
  (``[B, S, H] -> [B*S, H]``) and a split (``[B*S, H] -> [B, S, H]``) are followed exactly;
- ``expand`` sizes are matched to the input dim they broadcast;
- the sizes of tensor factories (``full``, ``zeros``, ``arange``...) and slice bounds are
  matched to the sizes seen so far in the graph.

When two sizes coincide (a batch of 64 and a head dim of 64) the outer dim is taken as the freed
one; a wrong guess is caught, because it fixes the freed dim to a number somewhere later in the
graph (raised as ``InputError`` naming the node), or by the caller's check of the result.
``graphopt.distill`` uses this to train a graph optimized for one batch size on a loader's batches.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from torch.utils._sympy.functions import FloorDiv

from graphopt.errors import InputError
from graphopt.ir.graph import snapshot_graph_module
from graphopt.ir.op_traits import broadcasting

__all__ = ["FreedGraph", "free_dims"]

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


class _Size:
    """A literal size replaced by an expression of the freed dims."""

    def __init__(self, expr: sympy.Expr, literal: int) -> None:
        self.expr = expr
        self.literal = literal

    def __repr__(self) -> str:
        return f"_Size({self.expr})"


class _Sliced:
    """A constant operand fitted to freed dims.

    Per dim: ``"uniform"`` (cut to 1, it broadcasts), ``"expand"`` (cut to 1 and expanded to the freed
    size), ``"arange"`` (rebuilt as a count up to the freed size) or ``"prefix"`` (cut to the freed
    size: valid up to the example's).
    """

    def __init__(self, node: fx.Node, cuts: list[tuple[int, str, sympy.Expr]], value: torch.Tensor) -> None:
        self.node = node
        self.cuts = cuts
        self.value = value  # the constant's real value


@dataclass(frozen=True)
class FreedGraph:
    """``free_dims``'s result: the graph with freed dims, and the constants it reads only in part.

    ``fitted`` names the attributes (folded masks, position tables, index ranges) the graph now
    cuts or rebuilds to the freed sizes; training them would change values the original graph
    reads and this one does not, so leave them frozen. ``bounds``: the freed sizes (by name) that
    may not exceed their example value, because a table was cut to them.
    """

    graph_module: fx.GraphModule
    fitted: frozenset[str]
    bounds: dict[str, int]


def free_dims(gm: fx.GraphModule, flat_inputs: Sequence[Any], dims: Mapping[int, Mapping[int, str]]) -> FreedGraph:
    """A copy of ``gm`` whose listed input dims may vary: ``dims[i] = {dim: name}`` for flat input ``i``.

    Dims given the same name are one size (the batch dim of every input, say) and must have the
    same size in ``flat_inputs``; each freed size must be at least 2 in the example (sizes 0 and
    1 are indistinguishable from constants). The copy shares ``gm``'s weights, keeps its
    attribute names, and computes what ``gm`` does on ``flat_inputs``. Constants folded at the
    example's sizes are fitted: uniform ones broadcast, counting ones (``arange``) are rebuilt, and
    others (position tables, causal masks) are cut to the freed size, so those dims may then only
    shrink below the example's size.
    Raises ``InputError`` when a freed dim cannot vary in this graph.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(flat_inputs):
        raise InputError(f"free_dims: the graph has {len(placeholders)} inputs, {len(flat_inputs)} were given")
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    symbols, sizes, sources = _make_symbols(env, flat_inputs, dims)
    fake_inputs = _fake_inputs(mode, env, flat_inputs, dims, symbols)
    propagation = _Propagation(gm, mode, env, symbols, {symbols[name]: size for name, size in sizes.items()})
    with mode:
        propagation.run(*fake_inputs)
    freed = _rewrite(gm, placeholders, propagation.decisions, symbols, sources)
    return FreedGraph(freed, frozenset(propagation.fitted), dict(propagation.bounds))


def _make_symbols(env: ShapeEnv, flat_inputs: Sequence[Any], dims: Mapping[int, Mapping[int, str]]
                  ) -> tuple[dict[str, sympy.Symbol], dict[str, int], dict[sympy.Symbol, tuple[int, int]]]:
    """One symbol per freed name, its size in the example (the symbol's hint), and where to read it from."""
    symbols: dict[str, sympy.Symbol] = {}
    sizes: dict[str, int] = {}
    sources: dict[sympy.Symbol, tuple[int, int]] = {}
    for index, per_dim in dims.items():
        value = flat_inputs[index]
        if not isinstance(value, torch.Tensor):
            raise InputError(f"free_dims: input {index} is not a tensor")
        for dim, name in per_dim.items():
            if not -value.dim() <= dim < value.dim():
                raise InputError(f"free_dims: input {index} has {value.dim()} dims, dim {dim} does not exist")
            size = int(value.shape[dim])
            if size < 2:
                raise InputError(f"free_dims: dim {dim} of input {index} has size {size} in the example; a size of "
                                 "0 or 1 cannot be told apart from a constant. Capture with a size of 2 or more.")
            if sizes.setdefault(name, size) != size:
                raise InputError(f"free_dims: dims named {name!r} have sizes {sizes[name]} and {size} in the example")
            if name not in symbols:
                symbols[name] = env.create_symbol(size, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
                sources[symbols[name]] = (index, dim % value.dim())
    return symbols, sizes, sources


def _fake_inputs(mode: FakeTensorMode, env: ShapeEnv, flat_inputs: Sequence[Any],
                 dims: Mapping[int, Mapping[int, str]], symbols: dict[str, sympy.Symbol]) -> list[Any]:
    fakes: list[Any] = []
    for index, value in enumerate(flat_inputs):
        if not isinstance(value, torch.Tensor):
            fakes.append(value)
            continue
        freed = {d % max(value.dim(), 1): name for d, name in dims.get(index, {}).items()}
        sizes = [env.create_symintnode(symbols[freed[d]], hint=int(value.shape[d]), source=ConstantSource(freed[d]))
                 if d in freed else int(value.shape[d]) for d in range(value.dim())]
        with mode:
            fakes.append(torch.empty(sizes, dtype=value.dtype, device=value.device))
    return fakes


def _expr(size: Any) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _hint(expr: sympy.Expr, hints: Mapping[sympy.Symbol, int]) -> int:
    return int(expr.subs(hints))


def _simplest(candidates: list[sympy.Expr], order: Mapping[sympy.Symbol, int]) -> sympy.Expr:
    """The plainest expression: fewest symbols, outer (earlier-created) symbols first."""
    return min(candidates, key=lambda e: (len(e.free_symbols), sorted(order[s] for s in e.free_symbols),
                                          sympy.count_ops(e), str(e)))


class _Propagation(fx.Interpreter):
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
        self.constants: dict[fx.Node, Any] = {}  # real values of the nodes that read only weights


    def fetch_attr(self, target: str) -> Any:
        value = super().fetch_attr(target)
        return self.mode.from_tensor(value, static_shapes=True) if isinstance(value, torch.Tensor) else value

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        self._record_constant(n)
        for value in torch.utils._pytree.tree_leaves(result):
            if isinstance(value, torch.Tensor):
                self.pool.update(e for e in map(_expr, value.shape) if e.free_symbols)
        fixed = [self.names[s] for s in self.symbols.values()
                 if isinstance(self.shape_env.replacements.get(s), sympy.Integer)]
        if fixed:
            raise InputError(f"free_dims: the size named {fixed[0]!r} cannot vary in this graph: node "
                             f"{n.format_node()} fixes it to {self.shape_env.replacements[self.symbols[fixed[0]]]}. "
                             "Optimize with dynamic shapes declared instead (dynamic_shapes=... / dynamic_batch=True).")
        return result

    def _record_constant(self, n: fx.Node) -> None:
        """Keep the real value of a node computed from weights alone (a folded table and its views)."""
        if n.op == "get_attr":
            value = super().fetch_attr(str(n.target))
        elif n.op == "call_function" and n.all_input_nodes and all(a in self.constants for a in n.all_input_nodes):
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: self.constants[a])
            with unset_fake_temporarily():
                value = n.target(*args, **kwargs)
        else:
            return
        self.constants[n] = value

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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
            if not (isinstance(value, torch.Tensor) and isinstance(self.constants.get(node_arg), torch.Tensor)):
                continue
            # what it meets: the shapes of the operands that are not constants themselves (those get fitted too)
            others = [shape for i, shape in enumerate(shapes) if shape and i != index
                      and not (i < len(node_args) and isinstance(self.constants.get(node_args[i]), torch.Tensor))]
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
                new_values[index] = _Sliced(node_arg, cuts, self.constants[node_arg])
        return new_values if any(isinstance(v, _Sliced) for v in new_values) else None

    def _broadcast_partner(self, size: int, from_end: int, shapes: list[list[Any]]) -> sympy.Expr | None:
        """The freed size a constant's dim of ``size`` broadcasts against (dims counted from the end), if any.

        It meets a freed size of the same example value, or only size-1 dims with such a size known
        elsewhere in the graph (a folded ``[1, 1, S, 1]`` mask meeting ``[B, 1, 1, S]``); a dim that meets
        an equal fixed size (a bias against the hidden dim) is left alone.
        """
        if size < 2:
            return None
        hints = self.hints
        partners = [_expr(shape[len(shape) - from_end]) for shape in shapes if len(shape) >= from_end]
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
            if not (isinstance(index, torch.Tensor) and isinstance(self.constants.get(node_arg), torch.Tensor)):
                continue
            extent = _expr(source.shape[i])
            cuts = [(dim, "arange", extent) for dim in range(index.dim())
                    if extent.free_symbols and not isinstance(index.shape[dim], torch.SymInt)
                    and int(index.shape[dim]) == _hint(extent, hints) >= 2
                    and self._cut_kind(node_arg, dim) == "arange"]
            if cuts:
                self.fitted.update(str(a.target) for a in _weights_read(node_arg))
                new_indices[i] = _Sliced(node_arg, cuts, self.constants[node_arg])
        if not any(isinstance(a, _Sliced) for a in new_indices):
            return args
        return (source, new_indices, *args[2:])

    def _cut_kind(self, node: fx.Node, dim: int) -> str:
        """How a constant varies along ``dim``: ``"uniform"``, ``"arange"`` (counts up by one) or ``"prefix"``."""
        real = self.constants[node]
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
            return replaced if any(isinstance(v, _Size) for v in replaced) else value
        if argument.name in _SCALAR_SIZES.get(target, ()) and isinstance(value, int) and not isinstance(value, bool):
            if target is aten.slice.Tensor:
                return self._slice_bound(args, value)
            return self._from_pool(value)
        return value

    def _from_pool(self, literal: int) -> Any:
        match = self._pool_match(literal)
        return literal if match is None else _Size(match, literal)

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
        size = _expr(tensor.shape[dim])
        if size.free_symbols and _hint(size, self.hints) == literal:
            return _Size(size, literal)
        return literal

    def _expand(self, tensor: torch.Tensor, sizes: list[int]) -> Any:
        hints = self.hints
        offset = len(sizes) - tensor.dim()
        out: list[Any] = []
        for position, literal in enumerate(sizes):
            source = _expr(tensor.shape[position - offset]) if position >= offset else sympy.Integer(1)
            if literal == -1 or not (source.free_symbols or source == 1):
                out.append(literal)
            elif source.free_symbols and _hint(source, hints) == literal:
                out.append(_Size(source, literal))
            else:
                out.append(self._from_pool(literal))
        return out if any(isinstance(v, _Size) for v in out) else sizes

    def _regroup(self, tensor: torch.Tensor, sizes: list[int]) -> Any:
        """The sizes of a view of ``tensor``, with the freed dims followed through merges and splits."""
        shape = [_expr(s) for s in tensor.shape]
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
                    out[position] = _Size(expr, literal[position])
        for position in inferred:
            out[position] = -1
        return out if any(isinstance(v, _Size) for v in out) else sizes

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
        if isinstance(value, _Sliced):
            constant = self.env[value.node]
            return _apply_cuts(constant, value.cuts, self._materialize_expr, _TensorOps, constant)
        if isinstance(value, _Size):
            return _build(value.expr, self._symint, operator.mul, operator.add, operator.floordiv)
        if isinstance(value, (list, tuple)):
            return type(value)(self._materialize(v) for v in value)
        if isinstance(value, dict):
            return {k: self._materialize(v) for k, v in value.items()}
        return value

    def _materialize_expr(self, expr: sympy.Expr) -> Any:
        return _build(expr, self._symint, operator.mul, operator.add, operator.floordiv)

    def _symint(self, symbol: sympy.Symbol) -> torch.SymInt:
        return self.shape_env.create_symintnode(symbol, hint=self.hints[symbol])


class _TensorOps:
    """Tensor operations for ``_apply_cuts`` on (fake) tensors."""

    slice = staticmethod(aten.slice.Tensor)
    clone = staticmethod(aten.clone.default)
    expand = staticmethod(aten.expand.default)
    add = staticmethod(aten.add.Tensor)
    view = staticmethod(aten.view.default)
    arange = staticmethod(aten.arange.default)


class _GraphOps:
    """The same operations, as nodes appended to a graph."""

    def __init__(self, graph: fx.Graph) -> None:
        for name, op in (("slice", aten.slice.Tensor), ("clone", aten.clone.default), ("expand", aten.expand.default),
                         ("add", aten.add.Tensor), ("view", aten.view.default)):
            setattr(self, name, functools.partial(self._call, op))
        self.graph = graph

    def _call(self, op: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(op, args, kwargs)

    def arange(self, end: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(aten.arange.default, (end,), kwargs)


def _apply_cuts(value: Any, cuts: list[tuple[int, str, sympy.Expr]], size: Callable[[sympy.Expr], Any],
                ops: Any, like: torch.Tensor) -> Any:
    """Fit a constant (a tensor, or a graph node with ``ops`` building nodes) to freed sizes, dim by dim.

    ``like`` is the constant itself (for its rank and dtype).
    """
    for dim, kind, expr in cuts:
        if kind == "uniform":
            value = ops.slice(value, dim, 0, 1)
        elif kind == "expand":
            value = ops.expand(ops.slice(value, dim, 0, 1), [size(expr) if d == dim else -1 for d in range(like.dim())])
        elif kind == "prefix":
            end = size(expr)
            if isinstance(end, torch.SymInt):  # propagating: the freed size stays within the table
                torch._check(end <= like.shape[dim])
            # a copy: a view keeps the table's strides, and strides that equal the freed size's example
            # value would fix it to that value in the next layout check
            value = ops.clone(ops.slice(value, dim, 0, end), memory_format=torch.contiguous_format)
        else:
            steps = ops.view(ops.arange(size(expr), dtype=like.dtype),
                             [-1 if d == dim else 1 for d in range(like.dim())])
            value = ops.add(ops.slice(value, dim, 0, 1), steps)
    return value


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


def _build(expr: sympy.Expr, leaf: Callable[[sympy.Symbol], Any], mul: Callable[[Any, Any], Any],
           add: Callable[[Any, Any], Any], floordiv: Callable[[Any, Any], Any]) -> Any:
    """Evaluate a size expression with ``leaf`` for its symbols and the given operations."""
    if isinstance(expr, sympy.Integer):
        return int(expr)
    if isinstance(expr, sympy.Symbol):
        return leaf(expr)
    parts = [_build(a, leaf, mul, add, floordiv) for a in expr.args]
    if isinstance(expr, sympy.Mul):
        combine = mul
    elif isinstance(expr, sympy.Add):
        combine = add
    elif isinstance(expr, FloorDiv):
        return floordiv(parts[0], parts[1])
    elif isinstance(expr, sympy.Pow) and isinstance(expr.args[1], sympy.Integer) and int(expr.args[1]) > 0:
        parts = [parts[0]] * int(expr.args[1])
        combine = mul
    else:
        raise InputError(f"free_dims: a size {expr} has a form that cannot be rebuilt; optimize with dynamic shapes "
                         "declared instead")
    # constants first, so that the nodes read ``sym_size * 12``, not ``12 * sym_size``
    parts.sort(key=lambda p: isinstance(p, int))
    result = parts[0]
    for part in parts[1:]:
        result = combine(result, part)
    return result


def _rewrite(gm: fx.GraphModule, placeholders: list[fx.Node],
             decisions: dict[str, tuple[tuple[Any, ...], dict[str, Any]]],
             symbols: dict[str, sympy.Symbol], sources: dict[sympy.Symbol, tuple[int, int]]) -> fx.GraphModule:
    copy = snapshot_graph_module(gm)
    nodes = {n.name: n for n in copy.graph.nodes}
    copy_placeholders = [nodes[p.name] for p in placeholders]
    sizes: dict[sympy.Symbol, fx.Node] = {}
    with copy.graph.inserting_after(copy_placeholders[-1]):
        for symbol in reversed(list(symbols.values()) if decisions else []):
            index, dim = sources[symbol]
            sizes[symbol] = copy.graph.call_function(aten.sym_size.int, (copy_placeholders[index], dim))
    built: dict[sympy.Expr, Any] = {}

    def node_for(expr: sympy.Expr, before: fx.Node) -> Any:
        if expr not in built:
            with copy.graph.inserting_before(before):
                built[expr] = _build(
                    expr, sizes.__getitem__,
                    lambda a, b: copy.graph.call_function(operator.mul, (a, b)),
                    lambda a, b: copy.graph.call_function(operator.add, (a, b)),
                    lambda a, b: copy.graph.call_function(operator.floordiv, (a, b)))
        return built[expr]

    def to_graph(value: Any, original: Any, before: fx.Node) -> Any:
        """The copy's argument: ``value``'s replacements built as nodes, everything else ``original``."""
        if isinstance(value, _Sliced):
            with copy.graph.inserting_before(before):
                return _apply_cuts(original, value.cuts, lambda e: node_for(e, before),
                                   _GraphOps(copy.graph), value.value)
        if isinstance(value, _Size):
            return node_for(value.expr, before)
        if isinstance(value, (list, tuple)) and _has_size(value):
            return type(original)(to_graph(v, o, before) for v, o in zip(value, original, strict=True))
        return original

    for name, (args, kwargs) in decisions.items():
        node = nodes[name]
        node.args = tuple(to_graph(a, o, node) for a, o in zip(args, node.args, strict=True))
        node.kwargs = {k: to_graph(v, node.kwargs[k], node) for k, v in kwargs.items()}
    copy.graph.lint()
    copy.recompile()
    # torch.export's unlifted modules check calls against the exported (static) sizes: not any more
    for key, hook in list(copy._forward_pre_hooks.items()):
        if "input_constraints" in getattr(hook, "__name__", ""):
            del copy._forward_pre_hooks[key]
    return copy


def _has_size(value: Any) -> bool:
    if isinstance(value, (_Size, _Sliced)):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_size(v) for v in value)
    return False
