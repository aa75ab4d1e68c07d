"""A causal language model with its key/value cache in buffers: one call is one prefill or decode step.

transformers' causal LMs keep their cache in a ``Cache`` object passed in and out of ``forward``;
graphopt's IR has no such objects, only tensors. :class:`CachedDecoder` wraps the model with a
static cache (transformers' ``StaticCache``: every layer's keys and values preallocated for
``max_cache_len`` positions, plus its fill counter) whose tensors are **registered buffers** of the
wrapper. A step writes the new keys and values into them in place (``index_copy_``); capture turns
those writes into declared state updates (``aten.copy_`` marked ``STATE_UPDATE``), which the
passes keep and verify like any other state.

A step takes ``input_ids [batch, seq]``, ``attention_mask [batch, max_cache_len]`` (1 where a real
token sits in the cache or is being written, 0 for padding and unused slots) and
``position_ids [batch, seq]``, and returns the next-token logits ``[batch, vocab]`` of the last
position only (the LM head never runs on the rest of the prompt).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from graphopt.errors import InputError

__all__ = ["STEP_INPUTS", "CachedDecoder", "is_causal_lm", "step_inputs"]

STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")
"""A step's own inputs, in order (the lifted state follows them)."""


def is_causal_lm(model: nn.Module) -> bool:
    """True for a transformers-style causal LM: it generates and its forward takes ``past_key_values``."""
    forward = getattr(model, "forward", None)
    if not callable(getattr(model, "generate", None)) or getattr(model, "config", None) is None or forward is None:
        return False
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    return "past_key_values" in parameters and not getattr(model.config, "is_encoder_decoder", False)


def _static_cache(model: nn.Module, max_cache_len: int) -> Any:
    from transformers.cache_utils import StaticCache  # transformers is only needed for its models

    try:
        cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    except Exception as error:  # any failure means this architecture has no static cache
        raise InputError(
            f"{type(model).__name__} has no static key/value cache in transformers ({type(error).__name__}: {error}); "
            "graphopt generates with models that support cache_implementation='static'."
        ) from error
    return _full_layers(cache, max_cache_len)


def _full_layers(cache: Any, max_cache_len: int) -> Any:
    """``cache`` with every sliding-window layer replaced by a full static layer of ``max_cache_len`` positions.

    transformers' static sliding-window layer steers its writes and mask sizes with a Python int
    (how many tokens it has seen), which one captured graph cannot carry between calls (capture
    fails, or the graph is specialized to the count at capture). A full layer holds every position in
    tensors; the model's sliding-window mask (built from the config, on absolute cache
    positions) still limits attention to the window, so the result is the same attention.
    """
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    for index, layer in enumerate(cache.layers):
        if isinstance(layer, StaticSlidingWindowLayer):
            cache.layers[index] = StaticLayer(max_cache_len=max_cache_len)
    return cache


def _bounded_length(layer: Any) -> Any:
    """``get_seq_length`` of a static cache layer: its counter, an integer in ``[0, max_cache_len]`` under export."""
    if not getattr(layer, "is_initialized", True):
        return 0
    length = layer.cumulative_length
    if not torch.compiler.is_exporting():
        return length
    value = length.item()
    torch._check(value >= 0)
    torch._check(value <= layer.max_cache_len)
    return value


class CachedDecoder(nn.Module):
    """``model`` (a causal LM, not copied: pass a copy) with a static cache for ``batch_size`` rows in buffers.

    Buffers are named ``cache_<layer>_<field>`` (``field``: ``keys``, ``values``,
    ``cumulative_length``, ...: every tensor the cache layer holds). :meth:`reset` empties the cache.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_cache_len: int) -> None:
        super().__init__()
        self.model = model
        self.batch_size = batch_size
        self.max_cache_len = max_cache_len
        self.cache = _static_cache(model, max_cache_len)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._allocate()
        # the cache layers keep referencing these tensors; capture rebinds those references to the traced
        # buffers on every call (graphopt.ir.buffer_aliases), so the writes are captured as state
        self._cache_buffers: list[str] = []
        for index, layer in enumerate(self.cache.layers):
            for field_name, value in list(vars(layer).items()):
                if isinstance(value, torch.Tensor):
                    buffer_name = f"cache_{index}_{field_name}"
                    self.register_buffer(buffer_name, value, persistent=False)
                    self._cache_buffers.append(buffer_name)
        self.reset()

    def _allocate(self) -> None:
        """Let the cache size itself on a one-token dry run (its layers allocate on first use)."""
        ids = torch.zeros(self.batch_size, 1, dtype=torch.long, device=_device(self.model))
        mask = torch.ones(self.batch_size, self.max_cache_len, dtype=torch.long, device=ids.device)
        with torch.no_grad():
            self(ids, mask, torch.zeros_like(ids))

    def bound_fill_counts(self) -> bool:
        """Make the cache report its fill count to torch.export as an integer in ``[0, max_cache_len]``.

        transformers' static layer returns its ``cumulative_length`` tensor from ``get_seq_length``.
        A model that sizes or slices anything with it (MPT's ALiBi bias: ``max(0, bias.size(1) -
        (seq + past))``) then asks torch.export for a number it only knows at run time, and the
        captured shapes do not line up. Traced, the count becomes an unbacked integer known to lie
        in ``[0, max_cache_len]``, so such expressions resolve from the ranges (``seq >= 1``,
        ``past >= 0``); eager calls are unchanged, and only this cache's layers are overridden.
        For capture only, and only where capturing failed without it: the count then enters the
        graph as a scalar read from the counter (``aten.item``), which models that never size
        anything by it do better without. Returns whether the cache has such counters.
        """
        bounded = False
        for layer in self.cache.layers:
            if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor) and hasattr(layer, "max_cache_len"):
                layer.get_seq_length = _bounded_length.__get__(layer)
                bounded = True
        return bounded

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the cache (every slot and counter back to zero)."""
        for buffer_name in self._cache_buffers:
            getattr(self, buffer_name).zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        """One step: write the keys/values of ``input_ids`` into the cache, return the last position's logits."""
        extra = {"logits_to_keep": 1} if self._keeps_logits else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=self.cache, use_cache=True, **extra)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1, :]


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def step_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, max_cache_len: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prefill step's inputs for a (left-padded) prompt: ids, the cache-wide mask, position ids.

    Positions count real tokens only, as transformers' ``generate`` does (padding gets position 1).
    """
    batch, length = input_ids.shape
    mask = torch.zeros(batch, max_cache_len, dtype=torch.long, device=input_ids.device)
    mask[:, :length] = attention_mask
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return input_ids, mask, positions
