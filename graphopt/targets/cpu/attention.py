"""Attention on the CPU that skips the key columns no query may see.

A model compiled for fixed shapes is fed padded inputs: eight sentences of a dozen tokens padded
to the 128 the graph was captured at, or a decoder's static cache of ``max_cache_len`` slots of
which a few are written. ``scaled_dot_product_attention`` then scores every query against every
padded or unwritten key, only to mask the result. :class:`TrimmedAttention` replaces each
``sdpa`` (also one whose key/value are ``repeat_kv`` of a grouped cache, or ``enable_gqa``) with
``graphopt_cpu::attention``, which at run time

1. **trims** key/value and mask to the key columns some query may attend to (one past the last
   set column of the mask, rounded up to :data:`KEY_BLOCK` columns, since torch's matmuls are slow
   on odd widths); columns past it are masked for every query, so they add exactly nothing;
2. **drops** a mask that attends everywhere (torch's kernels are faster without one);
3. **picks the kernel** for what is left: two matmuls and a softmax where trimming left a short
   key length (:data:`MATMUL_MAX_KEYS`; torch's flash kernel has a fixed cost of about 2 ms on
   MiniLM's 8 x 12 heads x 128 queries, whatever the key length), torch's attention otherwise:
   for untrimmed keys (on strided inputs the matmuls lose to it: 1.2 ms against 0.87 on Swin's
   64 windows x 2 heads x 49 tokens), grouped key/value heads (read in place with
   ``enable_gqa``), reduced-precision inputs (the flash kernel accumulates in float32), and masks
   with a query row that sees no key (torch defines those rows as zeros).

A mask computed from weights and constants alone (Swin's relative-position bias, a fixed window
mask) is the same on every call: nothing in it can be trimmed per call, so such attention keeps
torch's kernel as the graph had it.

Measured here (2 threads): MiniLM at 8 x 128 with sentences of 10-14 tokens, 3.3 ms per layer
with the flash kernel, 0.7 ms trimmed; a decode step over SmolLM2's static cache, 25 µs per layer
instead of 80 µs for the untrimmed, repeated form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from graphopt.ir.meta import copy_meta, shared_call_outputs
from graphopt.ir.op_args import argument
from graphopt.passes.base import NodeRewrite
from graphopt.passes.fusion.gqa import repeated_heads
from graphopt.targets.common.lowering import KernelSubstitution

__all__ = ["ATTENTION", "KEY_BLOCK", "KEY_MASK", "MATMUL_MAX_KEYS", "QuantizedGraphAttention", "TrimmedAttention"]

aten = torch.ops.aten

KEY_BLOCK = 16
"""Trimmed key lengths are rounded up to a multiple of this (torch's matmuls are slow on odd widths)."""

MATMUL_MAX_KEYS = 96
"""Key lengths up to this run as two matmuls and a softmax; longer ones in torch's flash kernel."""


_LIBRARY = torch.library.Library("graphopt_cpu", "FRAGMENT")  # beside graphopt_cpu::split_linear
_LIBRARY.define("key_mask(Tensor mask, ScalarType dtype) -> (Tensor, Tensor)")
_LIBRARY.define("attention(Tensor query, Tensor key, Tensor value, Tensor? mask, Tensor? plan, float scale) -> Tensor")

_NO_MASK, _MATMUL_SAFE, _EMPTY_ROWS = 0, 1, 2
"""What a key mask's plan says of the trimmed mask: attends everywhere; every query sees a key; some sees none."""


def _key_mask(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask`` (boolean, True: attend; or additive) as an additive ``dtype`` mask, and its plan.

    The plan is ``[live, kind]``: one past the last key column some query may attend to, rounded
    up to ``KEY_BLOCK`` (at most all of them; all of them when no column is live), and what the
    mask is within those columns (``_NO_MASK``, ``_MATMUL_SAFE``, ``_EMPTY_ROWS``). Computed once
    per mask, however many attention layers read it.
    """
    # as bytes: torch's boolean reductions across rows are 20x slower than max/min of uint8
    attends = (mask if mask.dtype == torch.bool else mask > float("-inf")).view(torch.uint8)
    length = mask.shape[-1]
    columns = attends.reshape(-1, length).amax(0).tolist()
    live = length
    if 1 in columns:
        last = length - columns[::-1].index(1)
        live = min(length, -(-last // KEY_BLOCK) * KEY_BLOCK)
    if mask.dtype == torch.bool:
        additive = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
    else:
        additive = mask.to(dtype, copy=True)
    seen = attends[..., :live]
    unmasked = seen if mask.dtype == torch.bool else (additive[..., :live] == 0).view(torch.uint8)  # finite biases mask
    if int(unmasked.amin()) == 1:
        kind = _NO_MASK
    elif int(seen.amax(-1).amin()) == 1:
        kind = _MATMUL_SAFE
    else:
        kind = _EMPTY_ROWS
    return additive, torch.tensor([live, kind])


def _key_mask_fake(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return mask.new_empty(mask.shape, dtype=dtype), mask.new_empty((2,), dtype=torch.int64)


def _matmul_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
    """softmax(query keyᵀ · scale + mask) value as two batched matmuls, in place where it can.

    The result has the query's layout, as torch's attention gives it (so a later transpose back to
    ``[B, S, H, D]`` stays a view, and compilers reading the fake kernel see the real strides).
    """
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        scores.add_(mask)
    return torch.matmul(torch.softmax(scores, dim=-1), value, out=torch.empty_like(query))


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               plan: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(query keyᵀ · scale + mask) value over the key columns ``plan`` leaves live.

    ``query [B, H, S, D]``, ``key``/``value [B, Hkv, L, D]`` with ``H`` a multiple of ``Hkv``
    (grouped heads), ``mask`` additive, broadcastable to ``[B, H, S, L]``, with its ``plan`` from
    ``key_mask`` (without one, the mask, additive or boolean, goes to torch's attention as it is).
    """
    kind, trimmed = _EMPTY_ROWS, False  # without a plan: torch's kernel, as the graph had it
    if mask is not None and plan is not None:
        live, kind = plan.tolist()
        if live < key.shape[2]:
            key, value, mask, trimmed = key[:, :, :live], value[:, :, :live], mask[..., :live], True
        if kind == _NO_MASK:
            mask = None
    grouped = key.shape[1] != query.shape[1]
    if (trimmed and not grouped and kind != _EMPTY_ROWS and key.shape[2] <= MATMUL_MAX_KEYS
            and query.dtype in (torch.float32, torch.float64)):
        return _matmul_attention(query, key, value, mask, scale)
    # torch's attention, grouped heads read in place (enable_gqa); rows with every key masked (left
    # padding) give 0, as in the eager model
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                                            enable_gqa=grouped)


def _attention_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                    plan: torch.Tensor | None, scale: float) -> torch.Tensor:
    # the kernel's own layout: torch's attention on fake tensors (compilers check strides)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                                            enable_gqa=key.shape[1] != query.shape[1])


_LIBRARY.impl("key_mask", _key_mask, "CompositeExplicitAutograd")
_LIBRARY.impl("attention", _attention, "CompositeExplicitAutograd")
torch.library.register_fake("graphopt_cpu::key_mask")(_key_mask_fake)
torch.library.register_fake("graphopt_cpu::attention")(_attention_fake)
KEY_MASK = torch.ops.graphopt_cpu.key_mask.default
ATTENTION = torch.ops.graphopt_cpu.attention.default


def _reads_inputs(node: fx.Node) -> bool:
    """True when ``node``'s value depends on a graph input (not on weights and constants alone)."""
    seen, pending = {node}, [node]
    while pending:
        current = pending.pop()
        if current.op == "placeholder":
            return True
        for source in current.all_input_nodes:
            if source not in seen:
                seen.add(source)
                pending.append(source)
    return False


@dataclass(frozen=True)
class TrimmedAttention(NodeRewrite):
    """``sdpa`` with a mask, or over ``repeat_kv`` of grouped key/value heads -> ``graphopt_cpu::attention``."""

    name: ClassVar[str] = "trimmed-attention"
    stat: ClassVar[str] = "attention"
    dead_code_after: ClassVar[bool] = True

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool | str:
        """Replace one masked ``scaled_dot_product_attention``; key/value behind ``repeat_kv`` are read unrepeated."""
        if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
            return False
        query, key, value = node.args[:3]
        mask, scale = argument(node, "attn_mask"), argument(node, "scale")
        if argument(node, "dropout_p", 0.0) or argument(node, "is_causal", False):
            return "dropout or is_causal attention"
        if query.meta.get("val") is None or query.meta["val"].dim() != 4:
            return "query shape unknown"
        unrepeated = False
        if not argument(node, "enable_gqa", False):
            keys, values = repeated_heads(key), repeated_heads(value)  # repeat_kv, as fuse-gqa matches it
            if isinstance(keys, tuple) and isinstance(values, tuple) and keys[1] == values[1]:
                key, value, unrepeated = keys[0], values[0], True
        fixed_mask = mask is not None and not _reads_inputs(mask)  # the same on every call: nothing to trim
        if (mask is None or fixed_mask) and not unrepeated:
            return False  # nothing to trim or read in place: torch's kernel as it is
        dim = query.meta["val"].shape[-1]
        additive, plan = mask, None  # without a plan the kernel takes the mask as it is (torch's attention)
        if mask is not None and not fixed_mask:
            additive, plan = self._key_mask(gm, node, mask, query.meta["val"].dtype)
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(ATTENTION, (query, key, value, additive, plan,
                                                       float(scale) if scale is not None else float(dim) ** -0.5))
        copy_meta(fused, node)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        return True

    @staticmethod
    def _key_mask(gm: fx.GraphModule, node: fx.Node, mask: fx.Node,
                  dtype: torch.dtype) -> tuple[fx.Node, fx.Node]:
        """The (additive mask, plan) nodes of ``mask`` for ``dtype`` queries: the ones an earlier layer made, or new."""
        additive, plan = shared_call_outputs(gm, node, KEY_MASK, (mask, dtype), mask, 2)
        return additive, plan


@dataclass(frozen=True)
class QuantizedGraphAttention(TrimmedAttention, KernelSubstitution):
    """``trimmed-attention`` after the int8 kernels, held to the fidelity budget like them.

    Its arithmetic is the same, but in a quantized graph the next dynamic quantization can round
    a last-bit difference of the attention output to the neighbouring int8 step, which the exact
    tolerance would count as a changed output (measured: 1e-3 on a pruned int8 MiniLM).
    """
