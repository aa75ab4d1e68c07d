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
  matched to the sizes seen so far in the graph;
- constants folded at the example's sizes (a token-type table, a mask, position ids, a rotary
  table) that meet a freed dim are fitted: cut to 1 where uniform, rebuilt where they count up,
  cut to the freed size otherwise (which bounds that size by the example's).

``propagation`` decides, ``rewrite`` writes the decisions into a copy of the graph, ``sizes``
holds what both share.

When two sizes coincide (a batch of 64 and a head dim of 64) the outer dim is taken as the freed
one; a wrong guess is caught, because it fixes the freed dim to a number somewhere later in the
graph (raised as ``InputError`` naming the node), or by the caller's check of the result.
``graphopt.distill`` uses this to train a graph optimized for one batch size on a loader's batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

from graphopt.errors import InputError
from graphopt.ir.free_dims.propagation import Propagation
from graphopt.ir.free_dims.rewrite import rewrite

__all__ = ["FreedGraph", "free_dims"]


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
    propagation = Propagation(gm, mode, env, symbols, {symbols[name]: size for name, size in sizes.items()})
    with mode:
        propagation.run(*fake_inputs)
    freed = rewrite(gm, placeholders, propagation.decisions, symbols, sources)
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

