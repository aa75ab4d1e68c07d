"""Token-wise work done only for the tokens a mask keeps: padded rows skipped through an encoder.

Sentences batched for an encoder are padded to one length: eight sentences of a dozen tokens at
the 128 a graph was captured for make 1024 rows, of which about 100 are words. Linears, norms,
activations, residual adds and (de)quantization work row by row, so every padded row costs as
much as a word, for outputs nobody reads: the attention masks padded keys, and a sentence
embedding pools with the mask. :class:`PackedRows` finds the graph's token mask (a ``[batch,
seq]`` input) and computes every token-wise op on the packed rows ``[N, ...]`` of the tokens it
keeps, ``N`` counted on each call (``graphopt_cpu::row_index``). Where an op that is not
token-wise reads a packed value (attention, the pooling's sum over the sequence), the value is
scattered back to ``[batch, seq, ...]`` with zeros in the padded rows (``unpack_rows``); where a
token-wise op reads a full value (the attention's output), its kept rows are gathered
(``pack_rows``). ``packed-attention`` (``graphopt.targets.cpu.packed_attention``) then replaces
each attention's scatter and gather by attention among each sentence's kept tokens.

The rewrite is exact, and the pass proves so before it changes anything. Zeros stand in for
what the model computed in padded rows, so every value scattered back must reach the outputs
only through one of:

* **values already zero there**: the model's own value is zero (or False) in every padded row,
  as ``hidden * mask`` is before mean pooling;
* **attention keys and values its mask blocks**: a boolean mask that is False, or an additive
  one at most ``-1e4`` (its weight rounds to exactly 0), in every key column the token mask
  zeroes, for every batch row (followed through casts, views, ``index`` by ``arange``, ``&``
  and ``where``);
* **attention queries** whose output rows are gathered again (padded query rows are dropped);
* **positions read by index** (a classifier's ``hidden[:, 0]``, at most
  :data:`MAX_READ_POSITIONS`): those positions join the kept rows of every batch row, padded or
  not, so what is read there is what the model computed.

A graph where anything else reads the padding (an output of every token's state, a pooling
without the mask) is left as it is, the reason counted as a near miss. The pass manager then
verifies the rewrite on the example inputs, as every lowering pass. One change is not exact and
is made only when asked (``PackedRows(statistics_on_kept_rows=True)``, what the cpu target
does for a dynamic int8 graph): dynamic int8's per-tensor scale of a packed activation is taken
over the kept rows, so the padding no longer widens the range the words are quantized in; the
pass is then held to the fidelity budget instead of exactness.

Measured here (2 threads), all-MiniLM-L6-v2 at 8 x 128 on sentences of 10-14 tokens, lowered
with and without it in one process: float32 22 ms against 120 (eager 144), static int8 14 ms
against 40, outputs bit for bit the same in float32; with ``packed-attention`` 16 and 7.3 ms.
On 8 x 128 real tokens (nothing to skip) 1-3% slower. Dynamic int8, with ``packed-attention``:
10.6-13.9 ms against 49.6-57.5 (eager 184-206), output cosine to eager 0.9927 against 0.9923.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value, node_dtype
from graphopt.ir.meta import infer_meta
from graphopt.ir.op_args import argument
from graphopt.passes.base import Pass, PassResult

__all__ = ["CHOOSE_QPARAMS", "PACK_ROWS", "ROW_INDEX", "UNPACK_ROWS", "PackedRows"]

aten = torch.ops.aten

MAX_READ_POSITIONS = 16
"""At most this many sequence positions read by index (``x[:, 0]``) join the kept rows; more: left padded."""

BLOCKING_BIAS = -1e4
"""An additive mask entry at most this blocks its key: exp of it (plus any real score) rounds to 0 in float32."""

FINITE_BIAS_LIMIT = 1e30
"""How large a bias added to a mask of ``finfo.min`` (T5's, MPNet's relative positions) is taken to be at most."""

_LIBRARY = torch.library.Library("graphopt_cpu", "FRAGMENT")
_LIBRARY.define("row_index(Tensor mask, int[] positions) -> (Tensor, Tensor)")
_LIBRARY.define("pack_rows(Tensor x, Tensor batch, Tensor seq, Tensor mask) -> Tensor")
_LIBRARY.define("unpack_rows(Tensor x, Tensor batch, Tensor seq, Tensor mask, bool flat) -> Tensor")


def _row_index(mask: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (batch, position) indices of the tokens ``mask`` keeps (non-zero) and of every row's ``positions``.

    In row-major order. ``positions`` are the sequence positions the graph reads by index (a
    classifier's first token): computed in every row, padded or not, as the model computed them.
    A row the mask keeps nothing of is kept whole: its queries see no key the mask lets through,
    and attention then averages over every key (an additive mask) or gives zeros, both computed
    as the model computes them.
    """
    keep = mask != 0
    if positions:
        keep[:, positions] = True
    empty = ~keep.any(1)
    if bool(empty.any()):
        keep[empty] = True
    kept = keep.reshape(-1).nonzero().squeeze(1)
    return torch.div(kept, mask.shape[1], rounding_mode="floor"), kept.remainder(mask.shape[1])


def _row_index_fake(mask: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = mask.numel()  # at most every token: the static bound the graph's shapes are recorded at
    return mask.new_empty((rows,), dtype=torch.int64), mask.new_empty((rows,), dtype=torch.int64)


def _pack_rows(x: torch.Tensor, batch: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The kept rows of ``x [batch or 1, seq or 1, ...]`` as ``[N, ...]`` (a broadcast dim is read at 0).

    When every token of ``mask`` is kept, ``x`` itself with its rows flattened (no gather).
    """
    if batch.shape[0] == mask.numel() and x.shape[:2] == mask.shape:
        return x.reshape(-1, *x.shape[2:])
    return x[batch if x.shape[0] != 1 else 0, seq if x.shape[1] != 1 else 0]


def _pack_rows_fake(x: torch.Tensor, batch: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.new_empty((batch.shape[0], *x.shape[2:]))


def _unpack_rows(x: torch.Tensor, batch: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor,
                 flat: bool) -> torch.Tensor:
    """``x [N, ...]`` scattered to ``[B, S, ...]`` (``[B * S, ...]`` when ``flat``), zeros in the padded rows."""
    rows, length = mask.shape
    if x.shape[0] == rows * length:  # every row kept: nothing to scatter
        return x if flat else x.view(rows, length, *x.shape[1:])
    full = x.new_zeros((rows * length, *x.shape[1:]))
    full.index_copy_(0, batch * length + seq, x)
    return full if flat else full.view(rows, length, *x.shape[1:])


def _unpack_rows_fake(x: torch.Tensor, batch: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor,
                      flat: bool) -> torch.Tensor:
    rows, length = mask.shape
    return x.new_empty((rows * length, *x.shape[1:]) if flat else (rows, length, *x.shape[1:]))


_LIBRARY.impl("row_index", _row_index, "CompositeExplicitAutograd")
_LIBRARY.impl("pack_rows", _pack_rows, "CompositeExplicitAutograd")
_LIBRARY.impl("unpack_rows", _unpack_rows, "CompositeExplicitAutograd")
torch.library.register_fake("graphopt_cpu::row_index")(_row_index_fake)
torch.library.register_fake("graphopt_cpu::pack_rows")(_pack_rows_fake)
torch.library.register_fake("graphopt_cpu::unpack_rows")(_unpack_rows_fake)
ROW_INDEX = torch.ops.graphopt_cpu.row_index.default
PACK_ROWS = torch.ops.graphopt_cpu.pack_rows.default
UNPACK_ROWS = torch.ops.graphopt_cpu.unpack_rows.default


@dataclass(frozen=True)
class Rows:
    """Where a tensor's token rows are: its batch dim and sequence dim (``seq=None``: both flattened at ``batch``)."""

    batch: int
    seq: int | None

    @property
    def leading(self) -> bool:
        """Rows first: ``[B, S, ...]`` or ``[B * S, ...]``, the layouts computed packed as ``[N, ...]``."""
        return self.batch == 0 and self.seq in (1, None)

    @property
    def prefix(self) -> int:
        """How many leading dims the rows take when ``leading``."""
        return 1 if self.seq is None else 2

    def dims(self) -> tuple[int, ...]:
        """The dims the rows occupy."""
        return (self.batch,) if self.seq is None else (self.batch, self.seq)

    def shifted(self, by: int) -> Rows:
        """The same rows ``by`` dims later (broadcasting aligns trailing dims)."""
        return Rows(self.batch + by, None if self.seq is None else self.seq + by)


class _NotPackable(Exception):
    """Raised inside the analysis: why the graph cannot skip its padded rows."""


_POINTWISE_EXTRA = {
    aten._to_copy.default, aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.alias.default,
    aten.detach.default, aten.__and__.Tensor, aten.__or__.Tensor, aten.clone.default,
}
_QUANTIZED = ("quantize_per_tensor", "dequantize_per_tensor")
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default}
_SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int}
_MASK_AND = {aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default, aten.mul.Tensor}
_MASK_NOT = {aten.bitwise_not.default, aten.logical_not.default}
_SDPA = aten.scaled_dot_product_attention.default
CHOOSE_QPARAMS = torch.ops.quantized_decomposed.choose_qparams.tensor
"""Dynamic int8's per-tensor scale and zero point of an activation (asymmetric, its range spanning 0)."""
_JOINS = {aten.cat.default, aten.stack.default}
_WHERE = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar}


def _pointwise(node: fx.Node) -> bool:
    target = node.target
    if target in _POINTWISE_EXTRA or target in _WHERE:
        return True
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace == "quantized_decomposed":
            return target._schema.name.split("::")[-1] in _QUANTIZED
        return torch.Tag.pointwise in target.tags and torch.Tag.nondeterministic_seeded not in target.tags
    return False


def _shape(value: Any) -> tuple[Any, ...] | None:
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _view_rows(source: Sequence[Any], target: Sequence[Any], rows: Rows) -> Rows | None:
    """Where ``rows`` of a ``source``-shaped tensor are after a reshape to ``target``, or None if split or merged."""
    def dims_with_prefix(shape: Sequence[Any], size: Any, before: Any) -> list[int]:
        return [j for j, d in enumerate(shape) if d == size and math.prod(shape[:j]) == before]

    batch = source[rows.batch]
    before = math.prod(source[:rows.batch])
    if rows.seq is None:
        flat_candidates = dims_with_prefix(target, batch, before)
        if flat_candidates:
            return Rows(flat_candidates[0], None)
        return None
    length = source[rows.seq]
    if rows.seq == rows.batch + 1:
        merged = dims_with_prefix(target, batch * length, before)
        if merged:
            return Rows(merged[0], None)
    batches = dims_with_prefix(target, batch, before)
    seqs = dims_with_prefix(target, length, math.prod(source[:rows.seq]))
    for b in batches:
        for s in seqs:
            if s > b:
                return Rows(b, s)
    return None


def _flat_split(source: Sequence[Any], target: Sequence[Any], rows: Rows, length: Any) -> Rows | None:
    """``[.., B * S, ..] -> [.., B, S, ..]``: where a flattened row dim lands once split again."""
    batch_size = source[rows.batch] // length if length else None
    before = math.prod(source[:rows.batch])
    for j in range(len(target) - 1):
        if target[j] == batch_size and target[j + 1] == length and math.prod(target[:j]) == before:
            return Rows(j, j + 1)
    return None


class _Analysis:
    """Which nodes run packed, and the proof that the rest never reads a padded row that matters."""

    def __init__(self, gm: fx.GraphModule, mask: fx.Node, statistics_on_kept_rows: bool = False) -> None:
        self.gm = gm
        self.mask = mask
        self.statistics_on_kept_rows = statistics_on_kept_rows
        self.statistics: set[fx.Node] = set()  # per-tensor statistics taken over a packed value's kept rows
        self.mask_shape = _shape(mask)
        self.rows: dict[fx.Node, Rows] = {}  # every node with token rows, packed or not
        self.packed: set[fx.Node] = set()
        self.tainted: set[fx.Node] = set()  # full values whose padded rows differ from the model's
        self.zero: set[fx.Node] = set()  # zero (False) in every padded row
        self.one: set[fx.Node] = set()  # one (True) in every padded row
        self.blocking: dict[fx.Node, float] = {}  # an additive mask: its largest value in any padded row
        self.positions: set[int] = set()  # sequence positions read by index: computed in every row

    # ---- walking the graph ----
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if _shape(node) == self.mask_shape:
                    self.rows[node] = Rows(0, 1)
                if node is self.mask:
                    self.zero.add(node)
            elif node.op == "call_function":
                self._visit(node)
            elif node.op == "output":
                for value in node.all_input_nodes:
                    if self._reads_padding(value):
                        raise _NotPackable("an output keeps every token's rows")

    def _reads_padding(self, value: fx.Node) -> bool:
        """True when a full-shaped read of ``value`` would see rows that differ from the model's."""
        if value in self.packed:
            return value not in self.zero
        return value in self.tainted

    def _visit(self, node: fx.Node) -> None:
        rows = self._output_rows(node)
        if rows is not None:
            self.rows[node] = rows
        if rows is not None and rows.leading and self._worth_packing(node, rows) and self._packable(node, rows):
            self.packed.add(node)
        self._mask_facts(node, rows)
        if node in self.packed:
            return  # padded rows of its inputs are dropped: whatever they hold does not matter
        if node.target is _SDPA:
            self._check_attention(node)
            return
        if self.statistics_on_kept_rows and node.target is CHOOSE_QPARAMS and node.args[0] in self.packed:
            self.statistics.add(node)  # the scale of the kept rows (zero rows would not move it: see PackedRows)
            return
        if any(self._reads_padding(a) for a in node.all_input_nodes):
            if self._reads_positions(node):
                return  # rows read by position are computed whether padded or not
            if rows is None or not _carries_rows(node):
                raise _NotPackable(f"{_name(node)} reads padded rows")
            self.tainted.add(node)

    def _reads_positions(self, node: fx.Node) -> bool:
        """``x[:, i]`` or ``x[:, i:j]`` along the sequence (constants): those positions join the kept rows."""
        source = node.args[0]
        rows = self.rows.get(source)
        length = self.mask_shape[1]
        if node.target not in (aten.select.int, aten.slice.Tensor) or rows is None or rows.seq is None:
            return False
        if not isinstance(length, int) or _dim(node.args[1], len(_shape(source))) != rows.seq:
            return False
        if node.target is aten.select.int:
            first, last = node.args[2], node.args[2] + 1
        else:
            first, last, step = argument(node, "start"), argument(node, "end"), argument(node, "step", 1)
            first = 0 if first is None else first
            if step != 1:
                return False
            last = length if last is None else last
        if not isinstance(first, int) or not isinstance(last, int):
            return False
        first, last = (first + length if first < 0 else first), (last + length if last < 0 else min(last, length))
        if not 0 <= first < last <= length or last - first > MAX_READ_POSITIONS:
            return False
        self.positions.update(range(first, last))
        return True

    # ---- where token rows go ----
    def _output_rows(self, node: fx.Node) -> Rows | None:
        out = _shape(node)
        inputs = [(a, self.rows[a]) for a in node.all_input_nodes if a in self.rows]
        if not inputs:
            return None
        target = node.target
        if target is operator.getitem:
            source = node.args[0]
            return self.rows.get(source) if source.target in _TUPLE_ROW_OPS else None
        first = node.args[0] if node.args else None
        if target in _JOINS:
            return self._joined_rows(node)
        first_rows = self.rows.get(first) if isinstance(first, fx.Node) else None
        if target in _TUPLE_ROW_OPS:
            return self._tuple_rows(node, first_rows)
        if out is None:
            return None
        if _pointwise(node):
            aligned = {rows.shifted(len(out) - len(_shape(a) or ())) for a, rows in inputs}
            if len(aligned) != 1:
                return None
            rows = aligned.pop()
            return rows if self._holds_rows(out, rows) else None
        if first_rows is None:
            if target is _SDPA or target is aten.index.Tensor:
                return None
            if target is aten.embedding.default and node.args[1] in self.rows:
                return self.rows[node.args[1]] if self._holds_rows(out, self.rows[node.args[1]]) else None
            return None
        source = _shape(first)
        if target in _VIEWS or target is aten.expand.default:
            if target is aten.expand.default:
                rows = first_rows.shifted(len(out) - len(source))
            else:
                rows = _view_rows(source, out, first_rows)
                if rows is None and first_rows.seq is None:
                    rows = _flat_split(source, out, first_rows, self.mask_shape[1])
            return rows if rows is not None and self._holds_rows(out, rows) else None
        if target is aten.unsqueeze.default:
            dim = _dim(node.args[1], len(out))
            return Rows(*(d + (d >= dim) if d is not None else None for d in (first_rows.batch, first_rows.seq)))
        if target is aten.transpose.int:
            a, b = _dim(node.args[1], len(out)), _dim(node.args[2], len(out))
            swap = {a: b, b: a}
            return Rows(swap.get(first_rows.batch, first_rows.batch),
                        None if first_rows.seq is None else swap.get(first_rows.seq, first_rows.seq))
        if target is aten.permute.default:
            order = [_dim(d, len(out)) for d in node.args[1]]
            return Rows(order.index(first_rows.batch), None if first_rows.seq is None else order.index(first_rows.seq))
        if target in (aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.index_select.default):
            dim = _dim(argument(node, "dim", 0), len(source))
            if dim in first_rows.dims() or any(a in self.rows for a in node.all_input_nodes[1:]):
                return None
            if target is aten.select.int:
                return Rows(*(d - (d > dim) if d is not None else None for d in (first_rows.batch, first_rows.seq)))
            return first_rows
        if target in _REDUCTIONS:
            dims = [_dim(d, len(source)) for d in (node.args[1] if len(node.args) > 1 else [])]
            if not dims or set(dims) & set(first_rows.dims()):
                return None
            keep = bool(argument(node, "keepdim", False))
            return first_rows if keep else Rows(*(d - sum(x < d for x in dims) if d is not None else None
                                                  for d in (first_rows.batch, first_rows.seq)))
        if target in _SOFTMAX:
            return None if _dim(node.args[1], len(source)) in first_rows.dims() else first_rows
        if target in (aten.layer_norm.default, aten.rms_norm.default):
            return first_rows if len(node.args[1]) <= len(source) - max(first_rows.dims()) - 1 else None
        if target in (aten.linear.default, aten.mm.default, aten.matmul.default):
            weight = node.args[1]
            if weight in self.rows or len(_shape(weight) or ()) != 2 or max(first_rows.dims()) >= len(source) - 1:
                return None
            return first_rows
        if target is _SDPA:
            return first_rows if len(source) == 4 and first_rows == Rows(0, 2) else None
        return None

    def _joined_rows(self, node: fx.Node) -> Rows | None:
        """``cat`` / ``stack`` of values with the same token rows, along another dim: those rows."""
        parts, dim = node.args[0], argument(node, "dim", 0)
        found = {self.rows.get(part) for part in parts}
        out = _shape(node)
        if len(found) != 1 or None in found or out is None:
            return None
        rows = found.pop()
        if node.target is aten.cat.default:
            return None if _dim(dim, len(out)) in rows.dims() else rows
        dim = _dim(dim, len(out))  # stack: a new dim before the rows moves them
        moved = Rows(*(d + (d >= dim) if d is not None else None for d in (rows.batch, rows.seq)))
        return moved if self._holds_rows(out, moved) else None

    def _tuple_rows(self, node: fx.Node, rows: Rows | None) -> Rows | None:
        """Rows of each output of a norm or split that keeps them (read through ``getitem``)."""
        source = _shape(node.args[0])
        if rows is None or source is None:
            return None
        if node.target is aten.native_layer_norm.default:
            return rows if len(node.args[1]) <= len(source) - max(rows.dims()) - 1 else None
        if node.target is aten.unbind.int:
            dim = _dim(argument(node, "dim", 0), len(source))
            return None if dim <= max(rows.dims()) else rows  # the removed dim comes after the rows
        dim = _dim(argument(node, "dim", 0), len(source))
        return None if dim in rows.dims() else rows

    def _holds_rows(self, shape: Sequence[Any], rows: Rows) -> bool:
        batch, length = self.mask_shape
        if rows.batch < 0 or max(rows.dims()) >= len(shape):
            return False
        if rows.seq is None:
            return shape[rows.batch] == batch * length
        return shape[rows.batch] == batch and shape[rows.seq] == length

    # ---- which nodes can run packed ----
    def _worth_packing(self, node: fx.Node, rows: Rows) -> bool:
        """Packed values spread to what reads them; from full inputs alone, only vectors per token start packing.

        A value of one number per token (ids, the mask, position ids counted along the sequence)
        costs little in full and may be read along the sequence (``cumsum``), which would need it
        scattered back; an embedding's ``[B, S, H]`` is where the work starts.
        """
        if any(value in self.packed for value in node.all_input_nodes):
            return True
        shape = _shape(node)
        return shape is not None and len(shape) > rows.prefix

    def _packable(self, node: fx.Node, rows: Rows) -> bool:
        """True when ``node`` computes each token row from the same row of its inputs (as ``_Rewriter`` spells it)."""
        target = node.target
        if target is operator.getitem:
            return node.args[0] in self.packed
        for value in node.all_input_nodes:
            value_rows = self.rows.get(value)
            if value_rows is not None and value not in self.packed and not value_rows.leading:
                return False  # token rows elsewhere than first: not gathered here
            if value_rows is not None and value not in self.packed and value_rows.seq is None:
                return False  # a flattened full value: left alone
        if _pointwise(node):
            return all(rows.prefix == self.rows[a].prefix for a in node.all_input_nodes if a in self.rows
                       and len(_shape(a) or ()) == len(_shape(node) or ())) and self._broadcasts_ok(node, rows)
        if target is aten.embedding.default:
            indices = node.args[1]
            return indices in self.rows and self.rows[indices].leading
        if target in _JOINS:
            return all(part in self.rows and self.rows[part].leading for part in node.args[0])
        first = node.args[0]
        return target in _PACKED_OPS and first in self.rows and self.rows[first].leading

    def _broadcasts_ok(self, node: fx.Node, rows: Rows) -> bool:
        """Operands without token rows either miss the row dims or are size 1 / full there (gathered)."""
        out = _shape(node) or ()
        for value in node.all_input_nodes:
            if value in self.rows:
                continue
            shape = _shape(value)
            if shape is None or len(shape) <= len(out) - rows.prefix:
                continue
            aligned = (1,) * (len(out) - len(shape)) + tuple(shape)
            if rows.seq is None and aligned[0] != 1:
                return False
            if rows.seq is not None and any(aligned[d] not in (1, out[d]) for d in (0, 1)):
                return False
        return True

    # ---- what the mask proves ----
    def _mask_facts(self, node: fx.Node, rows: Rows | None) -> None:
        """What ``node`` is in every padded row: zero, non-zero, or an additive mask bounded above (``blocking``)."""
        target, args = node.target, node.args
        inputs = list(node.all_input_nodes)
        first = args[0] if args and isinstance(args[0], fx.Node) else None
        if target is aten.index.Tensor and first is not None:
            rows = self._arange_index(node)
            if rows is not None:
                self.rows[node] = rows
                self._inherit(node, first)
            return
        if rows is None:
            return
        if target in _SAME_FACTS or target in _VIEWS or target in (aten.expand.default, aten.unsqueeze.default,
                                                                    aten.transpose.int, aten.permute.default,
                                                                    aten.slice.Tensor):
            if first is not None:
                self._inherit(node, first)
            return
        scalar = _largest_scalar(args)
        if target in _MASK_AND and any(a in self.zero for a in inputs):
            self.zero.add(node)
        if target is aten.mul.Tensor and any(a in self.one for a in inputs) and scalar is not None and scalar < 0:
            self.blocking[node] = scalar  # (1 - mask) * c: c in every padded row
        elif target in _MASK_NOT and first in self.zero and node_dtype(node) == torch.bool:
            self.one.add(node)
        elif target is aten.eq.Scalar and first in self.zero and args[1] == 0:
            self.one.add(node)
        elif target is aten.rsub.Scalar and first in self.zero and args[1] == 1:
            self.one.add(node)
        elif target in _WHERE and node_dtype(args[0]) == torch.bool and args[0] in self.zero | self.one:
            value = _largest(args[2] if args[0] in self.zero else args[1], self.gm)  # what padded rows take
            if value is not None:
                self.blocking[node] = value
        elif target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and args[1] in self.one:
            value = _largest(args[2], self.gm)
            if value is not None:
                self.blocking[node] = value
        elif target is aten.add.Tensor and len(inputs) == 2 and sum(a in self.blocking for a in inputs) == 1:
            mask = next(a for a in inputs if a in self.blocking)
            if self.blocking[mask] <= -FINITE_BIAS_LIMIT * 2:  # a bias (T5's positions) added to a vast negative
                self.blocking[node] = self.blocking[mask] + FINITE_BIAS_LIMIT

    def _inherit(self, node: fx.Node, source: fx.Node) -> None:
        """``node`` holds ``source``'s values rearranged: the same facts about padded rows."""
        for fact in (self.zero, self.one):
            if source in fact:
                fact.add(node)
        if source in self.blocking:
            self.blocking[node] = self.blocking[source]

    def _arange_index(self, node: fx.Node) -> Rows | None:
        """``x[i, j]`` with ``x`` the ``[B, S]`` token rows and ``i``, ``j`` constant aranges: where its rows land."""
        source, indices = node.args[0], node.args[1]
        if self.rows.get(source) != Rows(0, 1) or len(indices) != 2:
            return None
        out = _shape(node)
        dims = []
        for index, size in zip(indices, self.mask_shape, strict=True):
            shape = _shape(index)
            if shape is None or len(shape) != len(out) or sum(d != 1 for d in shape) != 1:
                return None
            dim = next(d for d, s in enumerate(shape) if s != 1)
            if shape[dim] != size or not _is_arange(index, size, self.gm):
                return None
            dims.append(dim)
        return Rows(dims[0], dims[1]) if dims[0] != dims[1] else None

    def _check_attention(self, node: fx.Node) -> None:
        """Padded keys and values must be blocked by the mask; padded queries only taint their own rows."""
        query, key, value = node.args[:3]
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        for operand in (key, value):
            if self._reads_padding(operand) and not self._blocks_padded_keys(mask, node):
                raise _NotPackable(f"{_name(node)} reads padded keys its mask does not block")
        if self._reads_padding(query):
            if self.rows.get(node) != Rows(0, 2):
                raise _NotPackable(f"{_name(node)}: padded queries in an unknown layout")
            self.tainted.add(node)

    def _blocks_padded_keys(self, mask: Any, node: fx.Node) -> bool:
        if not isinstance(mask, fx.Node) or mask not in self.rows:
            return False
        shape = _shape(mask) or ()
        rows = self.rows[mask].shifted(4 - len(shape))
        if rows.seq != 3 or rows.batch != 0:
            return False
        if node_dtype(mask) == torch.bool:
            return mask in self.zero
        return self.blocking.get(mask, 0.0) <= BLOCKING_BIAS


def _carries_rows(node: fx.Node) -> bool:
    """Ops a full value with wrong padded rows may pass through (its rows stay rows)."""
    return node.target in _VIEWS or node.target in (aten.transpose.int, aten.permute.default, aten.unsqueeze.default,
                                                   aten.expand.default, aten.clone.default, aten.alias.default)


def _name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


_INDEX_VIEWS = {aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten.expand.default,
                aten._to_copy.default, aten.clone.default, aten.alias.default}


def _is_arange(index: fx.Node, size: Any, gm: fx.GraphModule) -> bool:
    """True when ``index`` holds ``0, 1, ..., size - 1`` along its one long dim: a constant, or ``arange`` viewed."""
    constant = attribute_value(gm, index)
    if constant is not None:
        return bool(torch.equal(constant.reshape(-1), torch.arange(int(size))))
    node = index
    while node.target in _INDEX_VIEWS or (node.target is aten.slice.Tensor and argument(node, "start") in (0, None)
                                          and argument(node, "step", 1) == 1):
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return False
    if node.target is aten.arange.default:
        return node.args[0] == size or _shape(node) == (size,)
    if node.target is aten.arange.start:
        return node.args[0] == 0 and (node.args[1] == size or _shape(node) == (size,))
    return False


def _largest(value: Any, gm: fx.GraphModule) -> float | None:
    """The largest value of a number or constant tensor; None for anything computed."""
    if isinstance(value, (int, float)):
        return float(value)
    constant = attribute_value(gm, value)
    return float(constant.max()) if constant is not None and constant.numel() > 0 else None


def _largest_scalar(args: Sequence[Any]) -> float | None:
    numbers = [float(a) for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    return max(numbers) if numbers else None


_SAME_FACTS = {aten._to_copy.default, aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.clone.default,
               aten.alias.default, aten.detach.default}
_TUPLE_ROW_OPS = {aten.native_layer_norm.default, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
                  aten.unbind.int}
_PACKED_OPS = (_VIEWS | _REDUCTIONS | _SOFTMAX | _TUPLE_ROW_OPS
               | {aten.expand.default, aten.unsqueeze.default, aten.transpose.int, aten.permute.default,
                  aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.index_select.default,
                  aten.layer_norm.default,
                  aten.rms_norm.default, aten.linear.default, aten.mm.default, aten.matmul.default,
                  aten.embedding.default})


class _Rewriter:
    """Builds the packed graph from an analysis that holds."""

    def __init__(self, gm: fx.GraphModule, analysis: _Analysis) -> None:
        self.gm, self.a = gm, analysis
        self.graph = gm.graph
        self.packed_value: dict[fx.Node, fx.Node] = {}  # packed node -> its packed replacement
        self.gathered: dict[fx.Node, fx.Node] = {}  # full node -> pack_rows of it
        self.scattered: dict[fx.Node, fx.Node] = {}  # packed node -> unpack_rows of it
        mask = analysis.mask
        last_input = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        with self.graph.inserting_after(last_input):
            self.index = self.graph.call_function(ROW_INDEX, (mask, sorted(analysis.positions)))
        infer_meta(self.index)
        with self.graph.inserting_after(self.index):
            self.seq = self._new(operator.getitem, (self.index, 1))
        with self.graph.inserting_after(self.index):
            self.batch = self._new(operator.getitem, (self.index, 0))

    def _new(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> fx.Node:
        """A new call at the graph's insertion point, its meta inferred."""
        node = self.graph.call_function(target, args, kwargs or {})
        infer_meta(node)
        return node

    def run(self) -> int:
        """Put a packed twin before each packed node, scatter where full nodes read them; how many ops run packed."""
        count = 0
        for node in list(self.graph.nodes):
            if node in self.a.packed:
                with self.graph.inserting_before(node):
                    self.packed_value[node] = self._packed_call(node)
                count += 1
            elif node.op in ("call_function", "output"):
                self._read_full(node)
        for node in reversed(list(self.packed_value)):
            if not node.users:
                self.graph.erase_node(node)
        self.graph.eliminate_dead_code()
        return count

    def _read_full(self, node: fx.Node) -> None:
        """A full-shaped consumer of packed values reads them scattered back (per-tensor statistics: packed)."""
        for value in list(node.all_input_nodes):
            if value in self.packed_value:
                packed = node in self.a.statistics and value is node.args[0]
                node.replace_input_with(value, self.packed_value[value] if packed else self._scatter(value))

    def _scatter(self, value: fx.Node) -> fx.Node:
        """A packed value scattered back to its full shape, once (right after it is computed)."""
        if value not in self.scattered:
            packed = self.packed_value[value]
            with self.graph.inserting_after(packed):
                flat = self.a.rows[value].seq is None
                self.scattered[value] = self._new(UNPACK_ROWS, (packed, self.batch, self.seq, self.a.mask, flat))
        return self.scattered[value]

    def _gather(self, value: fx.Node) -> fx.Node:
        """The kept rows of a full value, gathered once (before its first packed reader)."""
        if value not in self.gathered:
            self.gathered[value] = self._new(PACK_ROWS, (value, self.batch, self.seq, self.a.mask))
        return self.gathered[value]

    def _operand(self, value: Any, node: fx.Node) -> Any:
        """``value`` as the packed ``node`` reads it."""
        if not isinstance(value, fx.Node):
            return value
        if value in self.packed_value:
            return self.packed_value[value]
        if value in self.a.rows:
            return self._gather(value)
        if not _pointwise(node):
            return value  # a weight, a norm's scale: no token rows
        shape = _shape(value)
        out = _shape(node)
        rows = self.a.rows[node]
        if shape is None or out is None or len(shape) <= len(out) - rows.prefix:
            return value
        aligned = (1,) * (len(out) - len(shape)) + tuple(shape)
        rest = list(aligned[rows.prefix:])
        if all(d == 1 for d in aligned[:rows.prefix]):
            return self._new(aten.reshape.default, (value, rest))  # the same for every row
        full = value if len(shape) == len(out) else self._new(aten.reshape.default, (value, list(aligned)))
        return self._new(PACK_ROWS, (full, self.batch, self.seq, self.a.mask))

    def _packed_call(self, node: fx.Node) -> fx.Node:
        target = node.target
        if target is operator.getitem:
            return self._new(operator.getitem, (self.packed_value[node.args[0]], node.args[1]))
        prefix = self.a.rows[node].prefix if node in self.a.rows else 2
        source_rows = self.a.rows.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        source_prefix = source_rows.prefix if source_rows is not None else prefix
        args = [self._operand(a, node) if isinstance(a, fx.Node) else
                [self._operand(x, node) for x in a] if isinstance(a, (list, tuple)) and any(
                    isinstance(x, fx.Node) for x in a) else a for a in node.args]
        kwargs = {k: self._operand(v, node) for k, v in node.kwargs.items()}
        shift = 1 - source_prefix

        def moved(dim: int) -> int:
            return dim if dim < 0 else dim + shift

        if target in _VIEWS or target is aten.expand.default:
            args[1] = [-1, *list(_shape(node)[prefix:])]
        elif target is aten.unsqueeze.default:
            args[1] = args[1] if args[1] < 0 else args[1] + (1 - prefix)
        elif target is aten.transpose.int:
            args[1], args[2] = moved(args[1]), moved(args[2])
        elif target is aten.permute.default:
            order = [_dim(d, len(_shape(node))) for d in args[1]]
            args[1] = [0, *(d + shift for d in order[source_prefix:])]
        elif target in (aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.index_select.default):
            if len(args) > 1:
                args[1] = moved(args[1])
            elif "dim" in kwargs:
                kwargs["dim"] = moved(kwargs["dim"])
        elif target is aten.unbind.int:
            args[1:2] = [moved(argument(node, "dim", 0))]
            kwargs.pop("dim", None)
        elif target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
            if len(args) > 2:
                args[2] = moved(args[2])
            elif "dim" in kwargs:
                kwargs["dim"] = moved(kwargs["dim"])
        elif target in _REDUCTIONS:
            args[1] = [moved(d) for d in args[1]]
        elif target in _SOFTMAX:
            args[1] = moved(args[1])
        elif target in _JOINS:
            dim = _dim(argument(node, "dim", 0), len(_shape(node)))
            args[1:2] = [dim + (1 - prefix)]
            kwargs.pop("dim", None)
        return self._new(target, tuple(args), kwargs)


def _mask_candidates(gm: fx.GraphModule) -> list[fx.Node]:
    """Graph inputs that could be a token mask: 2-D, integer or boolean."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        shape, dtype = _shape(node), node_dtype(node)
        if shape is not None and len(shape) == 2 and dtype is not None and not dtype.is_floating_point:
            found.append(node)
    return found


@dataclass(frozen=True)
class PackedRows(Pass):
    """Token-wise ops computed on the rows a token mask keeps (see the module docstring). Exact.

    ``statistics_on_kept_rows``: dynamic int8's per-tensor scale (``choose_qparams``) of a packed
    value is taken over its kept rows, not every row. Not exact, so the pass is then held to the
    fidelity budget (``kernel_substituting``), but nearer the float model: a sentence's
    activations are no longer quantized with a range widened by the padding and by the other
    sentences' padded rows. (The asymmetric range always spans 0, so zeros in the padded rows
    would give the same scale as the kept rows alone.)

    Stats: ``ops_on_kept_rows`` and ``scales_on_kept_rows``; near misses say why a graph with a
    candidate mask was left as it is.
    """

    name: ClassVar[str] = "packed-rows"

    statistics_on_kept_rows: bool = False

    @property
    def kernel_substituting(self) -> bool:
        """Held to the fidelity budget (not exactness) when per-tensor scales may be taken over kept rows."""
        return self.statistics_on_kept_rows

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Find a mask whose padded rows nothing needs, then compute the token-wise ops on the kept rows."""
        reasons: dict[str, int] = {}
        if any(node.target is ROW_INDEX for node in gm.graph.nodes):
            # packed already: a weight-only graph lowered twice
            return PassResult(False, {"ops_on_kept_rows": 0, "scales_on_kept_rows": 0})
        for mask in _mask_candidates(gm):
            analysis = _Analysis(gm, mask, self.statistics_on_kept_rows)
            try:
                analysis.run()
            except _NotPackable as why:
                reasons[str(why)] = reasons.get(str(why), 0) + 1
                continue
            if not _worth_it(analysis):
                reasons["no token-wise work on packed rows"] = reasons.get("no token-wise work on packed rows", 0) + 1
                continue
            count = _Rewriter(gm, analysis).run()
            return PassResult(True, {"ops_on_kept_rows": count, "scales_on_kept_rows": len(analysis.statistics)})
        return PassResult(False, {"ops_on_kept_rows": 0, "scales_on_kept_rows": 0},
                          near_misses={self.name: reasons} if reasons else {})


def _worth_it(analysis: _Analysis) -> bool:
    """At least one linear (or matmul) runs packed: the work worth skipping padded rows for."""
    return any(node.target in (aten.linear.default, aten.mm.default, aten.matmul.default, aten.addmm.default)
               for node in analysis.packed)

