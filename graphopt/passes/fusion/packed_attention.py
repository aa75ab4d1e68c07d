"""``nn.MultiheadAttention`` in the standard attention layout: q/k/v as slices, heads not folded into the batch.

PyTorch's multi-head attention (``nn.MultiheadAttention``, so ``nn.TransformerEncoderLayer`` and
torchvision's ViT) computes q, k and v with one packed projection and picks them apart with
``unflatten(-1, [3, E]) -> unsqueeze(0) -> transpose(0, -2) -> squeeze(-2) -> select(0, i)``; it
then folds the batch into the heads (``[S, N, E] -> [S, N*H, d] -> transpose -> [N, H, S, d]``).
Both compute exactly what simpler forms do, which other passes and analyses understand:

- ``select(..., 0, i)`` of the packed projection ``p`` is ``p[..., i*E:(i+1)*E]`` (a ``slice``);
- ``reshape([S, N*H, d]) -> transpose(0, 1) -> reshape([N, H, S, d])`` is
  ``reshape([S, N, H, d]) -> permute([1, 2, 0, 3])``.

With them, structured pruning finds the heads of packed attention (the dependency graph cannot
follow a dim that merges the fixed batch with the prunable heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import node_shape
from graphopt.ir.meta import infer_meta
from graphopt.ir.ops import RESHAPE_OPS
from graphopt.passes.base import Pass, PassResult, register_pass
from graphopt.passes.fusion._match import erase_dead, is_call

aten = torch.ops.aten

__all__ = ["UnpackAttention"]


def _ints(shape: Any) -> tuple[int, ...] | None:
    return tuple(shape) if shape is not None and all(isinstance(s, int) for s in shape) else None


def _packed_piece(select: fx.Node) -> tuple[fx.Node, int, int, list[fx.Node]] | None:
    """``(projection, start, end, chain)`` when ``select`` picks piece ``i`` of a packed projection."""
    if not (is_call(select, aten.select.int) and select.args[1] == 0 and isinstance(select.args[2], int)):
        return None
    squeeze = select.args[0]
    if not is_call(squeeze, aten.squeeze.dim):
        return None
    transpose = squeeze.args[0]
    if not is_call(transpose, aten.transpose.int):
        return None
    unsqueeze = transpose.args[0]
    if not (is_call(unsqueeze, aten.unsqueeze.default) and unsqueeze.args[1] == 0):
        return None
    unflatten = unsqueeze.args[0]
    if not is_call(unflatten, aten.unflatten.int):
        return None
    projection = unflatten.args[0]
    shape = _ints(node_shape(projection))
    if shape is None or unflatten.args[1] % len(shape) != len(shape) - 1:
        return None
    pieces, width = unflatten.args[2]
    rank = len(shape) + 2  # after unflatten and unsqueeze
    if (transpose.args[1] % rank, transpose.args[2] % rank) != (0, rank - 2) or squeeze.args[1] % rank != rank - 2:
        return None
    index = select.args[2] % pieces
    return projection, index * width, (index + 1) * width, [squeeze, transpose, unsqueeze, unflatten]


def _folded_heads(merge: fx.Node) -> tuple[fx.Node, list[int], list[fx.Node]] | None:
    """``(x, [S, N, H, d], chain)`` for ``merge = reshape(transpose(reshape(x, [S, N*H, d]), 0, 1), [N, H, S, d])``."""
    if not is_call(merge, *RESHAPE_OPS):
        return None
    transpose = merge.args[0]
    if not (is_call(transpose, aten.transpose.int) and {a % 3 for a in transpose.args[1:3]} == {0, 1}):
        return None
    split = transpose.args[0]
    if not is_call(split, *RESHAPE_OPS) or len(transpose.users) != 1 or len(split.users) != 1:
        return None
    x = split.args[0]
    x_shape, split_shape, out_shape = (_ints(node_shape(n)) for n in (x, split, merge))
    if x_shape is None or split_shape is None or out_shape is None or len(x_shape) != 3 or len(out_shape) != 4:
        return None
    seq, batch, width = x_shape
    n, heads, seq_out, head_dim = out_shape
    if (n, seq_out) != (batch, seq) or split_shape != (seq, batch * heads, head_dim) or heads * head_dim != width:
        return None
    return x, [seq, batch, heads, head_dim], [transpose, split]


@register_pass
@dataclass(frozen=True)
class UnpackAttention(Pass):
    """Rewrite packed multi-head attention's q/k/v picking and batch-folded heads into the standard forms."""

    name = "unpack-attention"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Slices for packed q/k/v, ``[S, N, H, d]`` permuted for batch-folded heads; counts of each."""
        graph = gm.graph
        sliced = unfolded = 0
        for node in list(graph.nodes):
            piece = _packed_piece(node)
            if piece is None:
                continue
            projection, start, end, chain = piece
            with graph.inserting_before(node):
                new = graph.call_function(aten.slice.Tensor, (projection, -1, start, end))
            self._replace(node, new)
            erase_dead(gm, chain)
            sliced += 1
        for node in list(graph.nodes):
            folded = _folded_heads(node)
            if folded is None:
                continue
            x, sizes, chain = folded
            with graph.inserting_before(node):
                split = graph.call_function(aten.reshape.default, (x, sizes))
                infer_meta(split)
                new = graph.call_function(aten.permute.default, (split, [1, 2, 0, 3]))
            self._replace(node, new)
            erase_dead(gm, chain)
            unfolded += 1
        changed = sliced + unfolded
        return PassResult(changed=changed > 0, stats={"qkv_slices": sliced, "heads_unfolded": unfolded},
                          rule_hits={"packed-qkv": sliced, "batch-folded-heads": unfolded} if changed else {})

    @staticmethod
    def _replace(old: fx.Node, new: fx.Node) -> None:
        new.meta.update({key: value for key, value in old.meta.items() if key not in ("val", "tensor_meta")})
        infer_meta(new)
        old.replace_all_uses_with(new)
        old.graph.erase_node(old)
