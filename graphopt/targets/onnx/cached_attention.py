"""Attention over a static key/value cache as onnxruntime's ``GroupQueryAttention``, the cache updated in place.

A decoder step captured with a static cache (``graphopt.workflows.generation``) writes its new
keys and values with ``index_copy`` into the cache state at a run of consecutive slots, then runs
``scaled_dot_product_attention`` of the queries over the *whole* cache, the unwritten and padded
slots masked. Exported as such, every layer costs a scatter (a copy of the cache unless bound in
place), four transposes and an attention over every ``max_cache_len`` slot, some 20 ONNX nodes.

onnxruntime's contrib op ``com.microsoft.GroupQueryAttention`` does all of it in one kernel: it
writes the new keys/values into the cache at slots ``[seqlens_k + 1 - S, seqlens_k + 1)`` (in
place when the present output is bound to the past input's buffer, which
``graphopt.targets.onnx.stateful`` does), attends causally over the written slots only, reads
grouped key/value heads in place, and adds ``attention_bias`` (the model's own mask, so left
padding and sliding windows still apply).

:class:`GroupQueryAttentionOverCache` replaces the cache writes and the attention with
``graphopt_onnx::cached_gqa``, whose PyTorch body is those very ATen ops (the rewrite is verified
like any other) and whose translation writes the contrib op. It applies where the match is
exact: both writes are ``index_copy`` of one contiguous run of slots into state inputs read by
nothing else, no dropout, a mask given. Queries, keys and values are passed in
``[batch, seq, heads, head_dim]`` layout: the transposes into attention's layout are dropped,
and a rotary embedding between them is applied in the untransposed layout instead. Where the
three are consecutive slices of one projection (a fused Q/K/V linear) and queries and keys are
rotated, the op gets that projection whole and rotates them itself (``graphopt_onnx::cached_gqa_packed``:
``do_rotary`` with the step's own angle tables and positions, for a batch of one, see
``_rotates_inside``): one kernel instead of a split, two rotary embeddings and the attention.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import onnx
import torch
import torch.fx as fx

from graphopt.ir.graph import register_constant, same_shape
from graphopt.ir.meta import infer_meta
from graphopt.ir.op_args import argument
from graphopt.ir.state import state_inputs
from graphopt.passes.base import NodeRewrite, PassResult
from graphopt.passes.fusion.decoder_ops import ROTARY, rotary_reference
from graphopt.targets.onnx.contrib_ops import ensure_schema

__all__ = ["GroupQueryAttentionOverCache", "cached_gqa", "cached_gqa_packed", "has_cached_attention",
           "translation_table"]

aten = torch.ops.aten


@torch.library.custom_op("graphopt_onnx::cached_gqa", mutates_args=())
def cached_gqa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
               past_value: torch.Tensor, seqlens_k: torch.Tensor, total_length: torch.Tensor, bias_end: torch.Tensor,
               bias: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write ``key``/``value`` into the caches before slot ``total_length``, then attend: ``(output, keys, values)``.

    ``query [B, S, H*D]``, ``key``/``value [B, S, Hkv*D]`` (``H`` a multiple of ``Hkv``), caches
    ``[B, Hkv, L, D]``; the new entries go to slots ``total_length - S`` to ``total_length - 1``;
    ``bias`` additive ``[B or 1, 1, S, L]``. ``seqlens_k`` (``total_length - 1`` per row, int32)
    and ``bias_end`` (``[total_length]``, int64) are what the ONNX op reads. ``output [B, S, H*D]``.
    The reference of onnxruntime's ``GroupQueryAttention`` with a shared past/present buffer.
    """
    batch, length = query.shape[:2]
    kv_heads, dim = past_key.shape[1], past_key.shape[3]
    heads = query.shape[2] // dim
    positions = torch.arange(length, device=query.device) + (int(total_length) - length)
    new_key = past_key.index_copy(2, positions, key.view(batch, length, kv_heads, dim).transpose(1, 2))
    new_value = past_value.index_copy(2, positions, value.view(batch, length, kv_heads, dim).transpose(1, 2))
    output = torch.nn.functional.scaled_dot_product_attention(
        query.view(batch, length, heads, dim).transpose(1, 2), new_key, new_value, attn_mask=bias, scale=scale,
        enable_gqa=heads != kv_heads)
    return output.transpose(1, 2).reshape(batch, length, heads * dim), new_key, new_value


@cached_gqa.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
      seqlens_k: torch.Tensor, total_length: torch.Tensor, bias_end: torch.Tensor, bias: torch.Tensor,
      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return query.new_empty(query.shape), past_key.new_empty(past_key.shape), past_value.new_empty(past_value.shape)


@torch.library.custom_op("graphopt_onnx::rotary_embedding", mutates_args=())
def rotary_embedding(x: torch.Tensor, position_ids: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                     num_heads: int) -> torch.Tensor:
    """Half-split rotary embedding of ``x [B, S, num_heads*D]``, angles looked up per position in the tables.

    ``cos_table``/``sin_table [T, D/2]`` hold one half of the duplicated angles (``cat([f, f])``),
    ``position_ids [B, S]`` index their rows. The reference of onnxruntime's ``RotaryEmbedding``
    (``interleaved=0``); the same bits as ``graphopt_decoder::rotary`` with the full tables.
    """
    batch, length = x.shape[:2]
    cos, sin = cos_table[position_ids], sin_table[position_ids]
    cos, sin = torch.cat([cos, cos], -1).unsqueeze(2), torch.cat([sin, sin], -1).unsqueeze(2)
    heads = x.view(batch, length, num_heads, -1)
    return rotary_reference(heads, cos, sin).reshape(x.shape)


@rotary_embedding.register_fake
def _(x: torch.Tensor, position_ids: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
      num_heads: int) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("graphopt_onnx::cached_gqa_packed", mutates_args=())
def cached_gqa_packed(qkv: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor, seqlens_k: torch.Tensor,
                      total_length: torch.Tensor, bias_end: torch.Tensor, bias: torch.Tensor,
                      position_ids: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, num_heads: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cached_gqa` on one packed projection ``qkv [B, S, (H + 2 Hkv) * D]``, queries and keys rotated first.

    ``qkv`` holds queries, keys and values in that order; queries and keys get the rotary
    embedding of :func:`rotary_embedding` (``position_ids`` into the tables). The reference of
    ``GroupQueryAttention`` given a packed query and ``do_rotary=1``.
    """
    kv_heads, dim = past_key.shape[1], past_key.shape[3]
    query, key, value = qkv.split([num_heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    query = rotary_embedding(query, position_ids, cos_table, sin_table, num_heads)
    key = rotary_embedding(key, position_ids, cos_table, sin_table, kv_heads)
    return cached_gqa(query, key, value, past_key, past_value, seqlens_k, total_length, bias_end, bias, scale)


@cached_gqa_packed.register_fake
def _(qkv: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor, seqlens_k: torch.Tensor,
      total_length: torch.Tensor, bias_end: torch.Tensor, bias: torch.Tensor, position_ids: torch.Tensor,
      cos_table: torch.Tensor, sin_table: torch.Tensor, num_heads: int, scale: float
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    output = qkv.new_empty((*qkv.shape[:-1], num_heads * past_key.shape[3]))
    return output, past_key.new_empty(past_key.shape), past_value.new_empty(past_value.shape)


CACHED_GQA = torch.ops.graphopt_onnx.cached_gqa.default
CACHED_GQA_PACKED = torch.ops.graphopt_onnx.cached_gqa_packed.default
ROTARY_EMBEDDING = torch.ops.graphopt_onnx.rotary_embedding.default
ROTARY_HEAD_MULTIPLE = 16
"""``GroupQueryAttention`` applies the rotary embedding itself only to heads whose size is a multiple of this."""


def has_cached_attention(gm: fx.GraphModule) -> bool:
    """True when ``gm`` writes a state input with ``index_copy`` (a static key/value cache)."""
    states = state_inputs(gm)
    return any(node.args[0] in states for node in gm.graph.find_nodes(op="call_function",
                                                                       target=aten.index_copy.default))


# -- the rewrite -------------------------------------------------------------------------------------------------


def _is_contiguous_run(positions: object) -> bool:
    """True for ``arange(n) + start`` or ``arange(start, end)``: consecutive cache slots."""
    if not isinstance(positions, fx.Node) or positions.op != "call_function":
        return False
    if positions.target is aten.arange.start:
        return True
    if positions.target is aten.add.Tensor:
        first, second = positions.args[:2]
        for arange, offset in ((first, second), (second, first)):
            if (isinstance(arange, fx.Node) and arange.target is aten.arange.default
                    and _is_scalar(offset)):
                return True
    return False


def _is_scalar(value: object) -> bool:
    if isinstance(value, int):
        return True
    meta = value.meta.get("val") if isinstance(value, fx.Node) else None
    return isinstance(meta, torch.Tensor) and meta.dim() == 0


def _cache_write(node: object, states: dict[fx.Node, int]) -> fx.Node | None:
    """``node`` when it is ``index_copy(state, 2, positions, new)`` whose state only it reads, else None."""
    if not isinstance(node, fx.Node) or node.target is not aten.index_copy.default:
        return None
    cache, dim = node.args[:2]
    if cache not in states or dim != 2 or len(cache.users) != 1:  # type: ignore[union-attr]
        return None
    return node


def _rank(node: object) -> int | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else None


def _shape(node: fx.Node) -> tuple[Any, ...]:
    return tuple(node.meta["val"].shape)


def _is_swap(node: object) -> bool:
    """True for ``transpose(x, 1, 2)``."""
    return (isinstance(node, fx.Node) and node.target is aten.transpose.int
            and sorted(node.args[1:3]) == [1, 2])  # type: ignore[type-var]


def _split_heads_source(node: object) -> fx.Node | None:
    """``x`` of ``reshape(x [B, S, N*D], [B, S, N, D])``, else None."""
    if not isinstance(node, fx.Node) or node.target not in (aten.reshape.default, aten.view.default):
        return None
    source = node.args[0]
    if not isinstance(source, fx.Node) or _rank(source) != 3 or _rank(node) != 4:
        return None
    return source if _shape(source)[:2] == _shape(node)[:2] else None  # [B, S, N*D] -> [B, S, N, D]


_ANGLE_CHAIN = (aten._to_copy.default, aten.mul.Tensor, aten.mul.Scalar)
"""Ops between ``cos(cat([f, f]))`` and the rotary's angles that keep the two halves equal (scalar scaling, casts)."""


def _duplicated_angles(node: object) -> bool:
    """True when ``node`` is ``cos``/``sin`` of ``cat([f, f], -1)`` (maybe scaled or cast): equal halves."""
    while isinstance(node, fx.Node) and node.target in _ANGLE_CHAIN:
        if node.target is aten.mul.Tensor and not isinstance(node.args[1], (int, float)):
            return False
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.target not in (aten.cos.default, aten.sin.default):
        return False
    cat = node.args[0]
    if not isinstance(cat, fx.Node) or cat.target is not aten.cat.default:
        return False
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    rank = _rank(cat)
    return len(parts) == 2 and parts[0] is parts[1] and rank is not None and dim % rank == rank - 1


class _Builder:
    """Inserts the nodes the fused attention reads, each shared by every layer that needs it."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = gm.graph
        self._memo: dict[tuple[Any, ...], Any] = {}

    def call(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> fx.Node:
        node = self.graph.call_function(target, args, kwargs or {})
        infer_meta(node)
        return node

    def attention_inputs(self, positions: fx.Node, mask: fx.Node, batch: Any, dtype: torch.dtype
                         ) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node]:
        """``(seqlens_k, total_length, bias_end, bias)`` of a run of cache slots and the model's mask."""
        def build() -> tuple[fx.Node, fx.Node, fx.Node, fx.Node]:
            last = self.call(aten.select.int, (positions, 0, -1))
            total = self.call(aten.add.Tensor, (last, 1))
            total32 = self.call(aten._to_copy.default, (total,), {"dtype": torch.int32})
            seqlens = self.call(aten.expand.default, (
                self.call(aten.reshape.default, (self.call(aten._to_copy.default, (last,), {"dtype": torch.int32}),
                                                 [1])), [batch]))
            bias_end = self.call(aten.reshape.default, (total, [1]))
            bias = mask
            if mask.meta["val"].dtype == torch.bool:
                bias = self.call(aten.where.Scalar, (mask, 0.0, float("-inf")))
                if dtype != bias.meta["val"].dtype:
                    bias = self.call(aten._to_copy.default, (bias,), {"dtype": dtype})
            return seqlens, total32, bias_end, bias
        return self._ordered(("attention", positions, mask, batch if isinstance(batch, fx.Node) else None), build)

    def _ordered(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """``build()`` the first time ``key`` is asked for, its nodes right after the latest node ``key`` names."""
        if key not in self._memo:
            anchor = max((n for n in key if isinstance(n, fx.Node)), key=_position)
            following = anchor.next
            with self.graph.inserting_before(following):
                self._memo[key] = build()
        return self._memo[key]

    def rotary_tables(self, cos: fx.Node, sin: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
        """``(position_ids, cos_table, sin_table)`` for angles ``cos``/``sin`` ``[B, S, D]`` with equal halves."""
        def build() -> tuple[fx.Node, fx.Node, fx.Node]:
            dim = int(_shape(cos)[-1])
            tables = [self.call(aten.slice.Tensor, (self.call(aten.reshape.default, (angles, [-1, dim])), 1, 0,
                                                    dim // 2)) for angles in (cos, sin)]
            rows = self.call(aten.sym_size.int, (tables[0], 0))
            length = self.call(aten.sym_size.int, (cos, 1))
            ids = self.call(aten.reshape.default, (self.call(aten.arange.default, (rows,), {"dtype": torch.int64}),
                                                   [-1, length]))
            return ids, tables[0], tables[1]
        return self._ordered(("rotary", cos, sin), build)

    def padded_tables(self, rotary: tuple[Any, ...], rows: int) -> tuple[Any, ...]:
        """``(position_ids, cos_table, sin_table)`` with ``rows`` rows of zeros below each table.

        ``GroupQueryAttention`` wants tables at least as long as the cache it attends over; the
        step's own tables hold only its ``B * S`` positions (the rows past them are never read).
        A ``cat`` with constant zeros, not ``constant_pad_nd``: the latter's shape rule puts a guard
        on the symbolic sequence length into the shape environment this copy shares with the
        portable graph, which then saves with that length fixed.
        """
        ids, cos_table, sin_table = rotary

        def build() -> tuple[Any, ...]:
            value = cos_table.meta["val"]
            padding = torch.zeros(rows, value.shape[-1], dtype=value.dtype)
            zeros = register_constant(self.gm, "gqa_rotary_padding", padding,
                                      before=self.graph.find_nodes(op="placeholder")[-1].next)
            return (ids, *(self.call(aten.cat.default, ([table, zeros],)) for table in (cos_table, sin_table)))
        return self._ordered(("padded", cos_table, sin_table, rows), build)

    def packed(self, node: fx.Node) -> fx.Node:
        """An attention operand ``[B, N, S, D]`` as ``[B, S, N*D]``, through its transposes (rotary rewritten)."""
        if node.target is ROTARY and _is_swap(node.args[0]):
            x, cos, sin = node.args[:3]
            source = _split_heads_source(x.args[0])  # type: ignore[union-attr]
            angles = [a.args[0] if isinstance(a, fx.Node) and a.target is aten.unsqueeze.default and a.args[1] == 1
                      else None for a in (cos, sin)]
            if source is not None and all(a is not None and _rank(a) == 3 and _duplicated_angles(a) for a in angles):
                ids, cos_table, sin_table = self.rotary_tables(*angles)
                heads = int(_shape(node)[1])
                return self.call(ROTARY_EMBEDDING, (source, ids, cos_table, sin_table, heads))
        if _is_swap(node):
            source = _split_heads_source(node.args[0])
            if source is not None:
                return source
            return self.call(aten.flatten.using_ints, (node.args[0], 2, 3))
        return self.call(aten.flatten.using_ints, (self.call(aten.transpose.int, (node, 1, 2)), 2, 3))


def _position(node: fx.Node) -> int:
    """A node's index in its graph (for "the later of these nodes")."""
    return next(index for index, n in enumerate(node.graph.nodes) if n is node)


def _slice_of(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """``(source, start, end)`` of ``slice(source, last dim, start, end)`` with step 1, else None."""
    if node.target is not aten.slice.Tensor:
        return None
    source, start, end = node.args[0], argument(node, "start"), argument(node, "end")
    if not isinstance(source, fx.Node) or _rank(source) is None or argument(node, "step", 1) != 1:
        return None
    if argument(node, "dim", 0) % _rank(source) != _rank(source) - 1:
        return None
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    return source, start, end


def _rotates_inside(batch: Any, dim: int) -> bool:
    """True when ``GroupQueryAttention`` can apply the step's rotary embedding itself, exactly.

    Its kernel rotates only heads whose size is a multiple of 16. On a first prompt (an empty
    cache) it ignores ``position_ids`` and rotates token ``s`` of every row by table row ``s``;
    the step's own tables (one row per token, row-major) agree with that only for one row, so the
    batch must be static 1 (left padding included: the tables hold the model's own angles).
    """
    return isinstance(batch, int) and batch == 1 and dim % ROTARY_HEAD_MULTIPLE == 0  # a symbolic batch would guard


def _packed_projection(operands: list[fx.Node], widths: list[int]) -> tuple[fx.Node, tuple[Any, ...]] | None:
    """The one projection the rotated queries and keys and the values slice in order, and the rotary they share.

    ``operands`` are the attention's ``[B, S, width]`` queries, keys and values. Returns ``(qkv,
    (position_ids, cos_table, sin_table))``, or None unless queries and keys are rotated alike,
    values are not, and the three are consecutive slices of one tensor's last dim covering it.
    """
    rotary = [tuple(op.args[1:4]) if op.target is ROTARY_EMBEDDING else None for op in operands]
    if rotary[0] is None or rotary[0] != rotary[1] or rotary[2] is not None:
        return None
    slices = [_slice_of(source) for source in (operands[0].args[0], operands[1].args[0], operands[2])]
    if any(piece is None for piece in slices):
        return None
    start = 0
    for piece, width in zip(slices, widths, strict=True):
        source, first, end = piece  # type: ignore[misc]
        if source is not slices[0][0] or first != start or end != start + width:  # type: ignore[index]
            return None
        start = end
    qkv = slices[0][0]  # type: ignore[index]
    if _rank(qkv) != 3 or _shape(qkv)[-1] != start:
        return None
    return qkv, rotary[0]


@dataclass(frozen=True)
class GroupQueryAttentionOverCache(NodeRewrite):
    """``index_copy`` cache writes + ``sdpa`` over the cache -> ``graphopt_onnx::cached_gqa`` (see the module)."""

    name: ClassVar[str] = "onnx-group-query-attention"
    stat: ClassVar[str] = "group_query_attention"
    dead_code_after: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite every attention over a static cache of ``gm``, in place."""
        self.__dict__["_states"] = state_inputs(gm)  # frozen dataclass: per-run scratch
        self.__dict__["_builder"] = _Builder(gm)
        result = super().run(gm)
        if result.changed:
            gm.graph.lint()
            gm.recompile()
        return result

    def _unmatched(self, node: fx.Node) -> str | tuple[fx.Node, fx.Node, fx.Node] | None:
        """Why ``node`` (an sdpa) cannot be fused, or its ``(key write, value write, mask)``; None: not over a cache."""
        key_write, value_write = _cache_write(node.args[1], self._states), _cache_write(node.args[2], self._states)
        if key_write is None or value_write is None:
            return None
        mask = argument(node, "attn_mask")
        if argument(node, "dropout_p", 0.0) or argument(node, "is_causal", False) or mask is None:
            return "dropout, is_causal or no mask"
        positions = key_write.args[2]
        if value_write.args[2] is not positions or not _is_contiguous_run(positions):
            return "cache writes not at one run of consecutive slots"
        if any(user is not node and user.op != "output" for write in (key_write, value_write) for user in write.users):
            return "the written cache is read by more than this attention"
        heads, kv_heads = _heads(node.args[0]), _heads(key_write)
        if heads is None or kv_heads is None or heads % kv_heads:
            return "query heads not a multiple of key/value heads"
        mask_shape, cache_shape = _shape(mask), _shape(key_write)
        if len(mask_shape) != 4 or mask_shape[1] != 1 or mask_shape[3] != cache_shape[2]:
            return "mask not [batch, 1, query, cache] shaped"
        return key_write, value_write, mask

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool | str:
        """Replace one ``scaled_dot_product_attention`` over a just-written cache."""
        if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
            return False
        matched = self._unmatched(node)
        if not isinstance(matched, tuple):
            return matched or False
        key_write, value_write, mask = matched
        query = node.args[0]
        scale = argument(node, "scale")
        query_shape = _shape(query)
        builder = self._builder
        attention_inputs = builder.attention_inputs(key_write.args[2], mask, query_shape[0],
                                                    query.meta["val"].dtype)
        graph = gm.graph
        scale = float(scale) if scale is not None else float(query_shape[-1]) ** -0.5
        with graph.inserting_before(node):
            operands = [builder.packed(query), builder.packed(key_write.args[3]), builder.packed(value_write.args[3])]
            query_heads, dim = int(query_shape[1]), int(query_shape[3])
            kv_width = int(_shape(key_write)[1]) * dim
            packed = _packed_projection(operands, [query_heads * dim, kv_width, kv_width]) \
                if _rotates_inside(query_shape[0], dim) else None
            if packed is not None:
                qkv, rotary = packed
                fused = builder.call(CACHED_GQA_PACKED, (qkv, key_write.args[0], value_write.args[0],
                                                         *attention_inputs,
                                                         *builder.padded_tables(rotary, int(_shape(key_write)[2])),
                                                         query_heads, scale))
            else:
                fused = builder.call(CACHED_GQA, (*operands, key_write.args[0], value_write.args[0],
                                                  *attention_inputs, scale))
            output, new_key, new_value = (builder.call(operator.getitem, (fused, index)) for index in range(3))
        key_write.replace_all_uses_with(new_key)
        value_write.replace_all_uses_with(new_value)
        for user in list(node.users):
            merged = [u for u in user.users if u.target in (aten.reshape.default, aten.view.default)
                      and same_shape(u, output)] if _is_swap(user) else []
            for reshape in merged:
                reshape.replace_all_uses_with(output)
        if any(user.users for user in node.users) or any(not _is_swap(user) for user in node.users):
            with graph.inserting_before(node):
                heads = builder.call(aten.unflatten.int, (output, 2, [int(query_shape[1]), int(query_shape[3])]))
                node.replace_all_uses_with(builder.call(aten.transpose.int, (heads, 1, 2)))
        else:
            for user in list(node.users):
                graph.erase_node(user)
        graph.erase_node(node)
        return True


def _heads(node: object) -> int | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return int(value.shape[1]) if isinstance(value, torch.Tensor) and value.dim() == 4 else None


# -- the ONNX translation ------------------------------------------------------------------------------------


def _group_query_attention_schema() -> onnx.defs.OpSchema:
    """The signature of onnxruntime's ``com.microsoft.GroupQueryAttention``, for onnx (and so onnxscript)."""
    schema = onnx.defs.OpSchema
    optional = schema.FormalParameterOption.Optional
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
             "sin_cache", "position_ids", "attention_bias", "head_sink"]
    types = {"seqlens_k": "M", "total_sequence_length": "M", "position_ids": "P"}
    return schema(
        "GroupQueryAttention", "com.microsoft", 1,
        doc="onnxruntime: attention with grouped key/value heads over a key/value cache (contrib op)",
        inputs=[schema.FormalParameter(name, types.get(name, "T"),
                                       param_option=optional if index > 6 or index in (1, 2, 3, 4) else
                                       schema.FormalParameterOption.Single)
                for index, name in enumerate(names)],
        outputs=[schema.FormalParameter("output", "T"), schema.FormalParameter("present_key", "T"),
                 schema.FormalParameter("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int32)"], ""), ("P", ["tensor(int64)"], "")],
        attributes=[schema.Attribute("num_heads", schema.AttrType.INT, "", required=True),
                    schema.Attribute("kv_num_heads", schema.AttrType.INT, "", required=True),
                    schema.Attribute("scale", schema.AttrType.FLOAT, "", required=False),
                    schema.Attribute("do_rotary", schema.AttrType.INT, "", required=False),
                    schema.Attribute("local_window_size", schema.AttrType.INT, "", required=False)],
    )


def _group_query_attention(query: Any, key: Any, value: Any, past_key: Any, past_value: Any, seqlens_k: Any,
                           total_length: Any, rotary: tuple[Any, Any, Any], bias_end: Any, bias: Any,
                           **attributes: Any) -> Any:
    """``com.microsoft.GroupQueryAttention`` over the cache, the mask's bias cut to the written slots."""
    from onnxscript import opset18 as op  # onnxscript takes about 1.4 s to import: only while exporting
    from onnxscript.values import Opset

    ensure_schema("GroupQueryAttention", _group_query_attention_schema)
    visible = op.Slice(bias, op.Constant(value_ints=[0]), bias_end, op.Constant(value_ints=[3]))
    position_ids, cos_table, sin_table = rotary
    return Opset("com.microsoft", 1).GroupQueryAttention(
        query, key, value, past_key, past_value, seqlens_k, total_length, cos_table, sin_table, position_ids, visible,
        kv_num_heads=int(past_key.shape[1]), **attributes)


def _cached_gqa_onnx(query: Any, key: Any, value: Any, past_key: Any, past_value: Any, seqlens_k: Any,
                     total_length: Any, bias_end: Any, bias: Any, scale: float = 1.0) -> Any:
    return _group_query_attention(query, key, value, past_key, past_value, seqlens_k, total_length,
                                  (None, None, None), bias_end, bias,
                                  num_heads=int(query.shape[2]) // int(past_key.shape[3]), scale=scale)


def _cached_gqa_packed_onnx(qkv: Any, past_key: Any, past_value: Any, seqlens_k: Any, total_length: Any,
                            bias_end: Any, bias: Any, position_ids: Any, cos_table: Any, sin_table: Any,
                            num_heads: int = 1, scale: float = 1.0) -> Any:
    return _group_query_attention(qkv, None, None, past_key, past_value, seqlens_k, total_length,
                                  (position_ids, cos_table, sin_table), bias_end, bias, num_heads=num_heads,
                                  scale=scale, do_rotary=1)


def _rotary_embedding_schema() -> onnx.defs.OpSchema:
    """The signature of onnxruntime's ``com.microsoft.RotaryEmbedding``, for onnx (and so onnxscript)."""
    schema = onnx.defs.OpSchema
    return schema(
        "RotaryEmbedding", "com.microsoft", 1,
        doc="onnxruntime: rotary position embedding, angles looked up per position (contrib op)",
        inputs=[schema.FormalParameter("input", "T"), schema.FormalParameter("position_ids", "M"),
                schema.FormalParameter("cos_cache", "T"), schema.FormalParameter("sin_cache", "T")],
        outputs=[schema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int64)"], "")],
        attributes=[schema.Attribute("num_heads", schema.AttrType.INT, "", required=False),
                    schema.Attribute("interleaved", schema.AttrType.INT, "", required=False),
                    schema.Attribute("rotary_embedding_dim", schema.AttrType.INT, "", required=False),
                    schema.Attribute("is_packed_batching", schema.AttrType.INT, "", required=False),
                    schema.Attribute("scale", schema.AttrType.FLOAT, "", required=False)],
    )


def _rotary_embedding_onnx(x: Any, position_ids: Any, cos_table: Any, sin_table: Any, num_heads: int = 1) -> Any:
    from onnxscript.values import Opset  # onnxscript takes about 1.4 s to import: only while exporting

    ensure_schema("RotaryEmbedding", _rotary_embedding_schema)
    return Opset("com.microsoft", 1).RotaryEmbedding(x, position_ids, cos_table, sin_table, num_heads=num_heads,
                                                     interleaved=0)


def translation_table() -> dict[Any, Callable[..., Any]]:
    """Translation of ``graphopt_onnx::cached_gqa`` for ``torch.onnx.export(custom_translation_table=...)``."""
    return {CACHED_GQA: _cached_gqa_onnx, CACHED_GQA_PACKED: _cached_gqa_packed_onnx,
            ROTARY_EMBEDDING: _rotary_embedding_onnx}
