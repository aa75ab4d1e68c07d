"""The generation loop: one prefill step over the prompt, then one decode step per new token.

It drives any :class:`DecoderSteps` (a lowered prefill and decode step sharing a cache), so the
same loop, with the same padding, positions, stopping and sampling rules, runs every target.
Output follows transformers' ``generate``: the prompt followed by the new tokens; rows that
reached an end-of-sequence token are filled with the pad token while the others go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from graphopt.errors import InputError
from graphopt.ir.threads import torch_threads
from graphopt.workflows.generation.decoder import step_inputs
from graphopt.workflows.generation.sampling import GenerationDefaults, Sampling, next_tokens

__all__ = ["GREEDY", "DecoderSteps", "generate_with", "run_generation"]

GREEDY = Sampling()
"""The default: argmax, no sampling."""


class DecoderSteps(Protocol):
    """A prefill and a decode step over one cache of ``max_cache_len`` positions for ``batch_size`` rows."""

    batch_size: int
    max_cache_len: int
    host_threads: int | None
    """Threads for torch's own work in the loop (sampling, masks) where it must differ from torch's
    setting: 1 when the steps run outside torch (onnxruntime), whose threads would otherwise wait
    for torch's OpenMP threads still spinning on the same cores after each small op (a decode step
    of SmolLM2 on 2 cores took 26 ms that way instead of 18)."""

    def reset(self) -> None:
        """Empty the cache before a new batch of prompts."""

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
                ) -> torch.Tensor:
        """Write the prompt into the cache; return its last position's logits ``[batch, vocab]``."""

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
               ) -> torch.Tensor:
        """Write one token per row into the cache; return the next-token logits ``[batch, vocab]``."""


def _eos_set(eos_token_id: int | Sequence[int] | None) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long) if ids else None


def _check_prompt(input_ids: Any, attention_mask: Any, steps: DecoderSteps, max_new_tokens: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long,
                                                                                                  torch.int):
        raise InputError("input_ids must be an integer tensor [batch, prompt_length] (a tokenizer's "
                         "return_tensors='pt' output); add a batch dim with input_ids[None] for one prompt")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(input_ids.shape)}: "
                         "they must match")
    if bool((attention_mask[:, -1] == 0).any()):
        raise InputError("the prompt batch is right-padded (attention_mask ends in 0); decoder-only generation "
                         "needs left padding: tokenizer.padding_side = 'left'")
    length = input_ids.shape[1]
    if length + max_new_tokens > steps.max_cache_len:
        raise InputError(
            f"prompt length {length} + max_new_tokens {max_new_tokens} = {length + max_new_tokens} positions, "
            f"more than the cache holds (max_cache_len={steps.max_cache_len}). Generate fewer tokens, shorten the "
            "prompt, or optimize again with a larger max_cache_len=..."
        )
    return input_ids.long(), attention_mask.long()


def run_generation(steps: DecoderSteps, input_ids: torch.Tensor, *, max_new_tokens: int,
                   attention_mask: torch.Tensor | None = None, sampling: Sampling = GREEDY,
                   eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                   min_new_tokens: int = 0, streamer: Any = None, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` per row; return ``[batch, prompt + new]`` ids.

    Generation stops early when every row has produced an end-of-sequence token (finished rows
    are padded with ``pad_token_id``, by default the first eos id); before ``min_new_tokens`` new
    tokens the eos ids are never chosen, as in transformers. ``streamer`` follows
    transformers' streamer protocol: ``put(ids)`` with the prompt, then with each new token
    ``[batch]``, and ``end()``.
    """
    input_ids, attention_mask = _check_prompt(input_ids, attention_mask, steps, max_new_tokens)
    with torch_threads(getattr(steps, "host_threads", None)):
        return _generate(steps, input_ids, attention_mask, max_new_tokens, sampling, _eos_set(eos_token_id),
                         pad_token_id, min_new_tokens, streamer, generator)


def _generate(steps: DecoderSteps, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
              sampling: Sampling, eos: torch.Tensor | None, pad_token_id: int | None, min_new_tokens: int,
              streamer: Any, generator: torch.Generator | None) -> torch.Tensor:
    """The loop of :func:`run_generation`, on checked inputs."""
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos is not None else 0)
    batch, length = input_ids.shape
    steps.reset()
    ids, mask, positions = step_inputs(input_ids, attention_mask, steps.max_cache_len)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    logits = steps.prefill(ids, mask, positions)
    finished = torch.zeros(batch, dtype=torch.bool)
    generated = []
    next_position = positions[:, -1:] + 1
    for index in range(max_new_tokens):
        logits = logits.float().cpu()
        if eos is not None and index < min_new_tokens:
            logits = logits.clone()  # the step's own output may be an inference-mode tensor
            logits[:, eos] = float("-inf")
        token = next_tokens(logits, sampling, generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        generated.append(token)
        if streamer is not None:
            streamer.put(token)
        if eos is not None:
            finished |= torch.isin(token, eos)
        if index == max_new_tokens - 1 or bool(finished.all()):
            break
        mask[:, length + index] = 1
        logits = steps.decode(token[:, None], mask, next_position)
        next_position = next_position + 1
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1)


def generate_with(steps: DecoderSteps, defaults: GenerationDefaults, input_ids: torch.Tensor, max_new_tokens: int,
                  attention_mask: torch.Tensor | None, do_sample: bool, temperature: float | None, top_k: int | None,
                  top_p: float | None, eos_token_id: int | Sequence[int] | None, pad_token_id: int | None,
                  min_new_tokens: int, streamer: Any, generator: torch.Generator | None) -> torch.Tensor:
    """:func:`run_generation` with a ``generate`` call's arguments, ``defaults`` (the model's) filling the gaps."""
    eos = defaults.eos_token_id if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else defaults.pad_token_id
    sampling = defaults.sampling(do_sample, temperature, top_k, top_p)
    return run_generation(steps, input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                          sampling=sampling, eos_token_id=eos, pad_token_id=pad, min_new_tokens=min_new_tokens,
                          streamer=streamer, generator=generator)
