"""``GenerativeModel``: what ``graphopt.optimize`` returns for a causal language model.

It generates like transformers' ``generate`` (``fast.generate(input_ids, max_new_tokens=...)``)
with lowered prefill and decode steps over a static key/value cache. Steps are built per batch
size, the first time a batch of that size is generated (each build is one capture, one verified
pass pipeline and two lowerings, recorded in ``report``). ``save`` writes the verified step
graphs; ``graphopt.load`` gives back a model with the steps of the batch sizes saved and no
user model, which therefore builds no others.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphopt.errors import InputError
from graphopt.passes.base import Pass
from graphopt.report import Report
from graphopt.targets.base import Target
from graphopt.workflows.collector import eased_collector
from graphopt.workflows.generation.build import BuiltSteps, build_steps
from graphopt.workflows.generation.compression import StepCompression
from graphopt.workflows.generation.decoder import step_inputs
from graphopt.workflows.generation.loop import generate_with
from graphopt.workflows.generation.sampling import GenerationDefaults
from graphopt.workflows.generation.saving import read_generation, write_generation
from graphopt.workflows.lowering_fallback import lowered_or_fallback
from graphopt.workflows.save_load import Archive

__all__ = ["DEFAULT_MAX_CACHE_LEN", "GenerativeModel", "StepSource", "load_generative"]

DEFAULT_MAX_CACHE_LEN = 1024
"""Cache positions (prompt plus new tokens) when neither the user nor the model's config says fewer."""


@dataclass
class StepSource:
    """What builds the steps for a new batch size: the user's model (read, never written) and how to optimize it."""

    model: nn.Module
    example_ids: torch.Tensor
    passes: list[Pass]
    verify: bool = True
    on_error: str = "rollback"
    compression: StepCompression | None = None

    def build(self, batch_size: int, max_cache_len: int, target: Target, report: Report,
              fallback: Target | None = None) -> BuiltSteps:
        """Capture, optimize (verified), compress (if asked) and lower the steps for ``batch_size`` rows.

        ``fallback``: lowered for it where ``target`` cannot lower them (``build_steps``).
        """
        return build_steps(self.model, self.example_ids, batch_size, max_cache_len, target, list(self.passes),
                           report, verify=self.verify, on_error=self.on_error, compression=self.compression,
                           fallback=fallback)


class GenerativeModel(nn.Module):
    """A causal LM optimized for generation on ``target``.

    ``generate`` produces tokens; calling the model returns the next-token logits ``[batch, vocab]``
    of a prompt. ``max_cache_len`` bounds prompt plus new tokens. ``report`` records every build.
    ``source`` builds the steps of batch sizes not in ``built``: given, the steps of its example's
    batch size are built now; None (a model from ``graphopt.load``), only the batch sizes in
    ``built`` can be generated. ``fallback``: the target as the user named it, when ``target`` is
    the generation default put in its place (``generation_target``); a step graph ``target``
    cannot lower (an op its runtime lacks) is lowered for ``fallback`` instead, which then builds
    every later batch size too.
    """

    def __init__(self, target: Target, report: Report, max_cache_len: int, defaults: GenerationDefaults, *,
                 source: StepSource | None = None, built: dict[int, BuiltSteps] | None = None,
                 loaded_from: Path | None = None, fallback: Target | None = None) -> None:
        super().__init__()
        if source is None and not built:
            raise InputError("a GenerativeModel needs a model to build its steps from, or built steps")
        self.target = target
        self.fallback = fallback
        self.report = report
        self.max_cache_len = max_cache_len
        self.defaults = defaults
        self._source = source
        self._built: dict[int, BuiltSteps] = dict(built or {})
        self._loaded_from = loaded_from
        self.setup_seconds = sum(sum(b.seconds.values()) for b in self._built.values())
        if source is not None and not self._built:
            self.steps_for(source.example_ids.shape[0])

    @property
    def eos_token_id(self) -> int | list[int] | None:
        """The model's end-of-sequence id(s), ``generate``'s default."""
        return self.defaults.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        """The model's padding id, ``generate``'s default."""
        return self.defaults.pad_token_id

    @property
    def batch_sizes(self) -> list[int]:
        """The batch sizes whose steps are built (what ``save`` writes; all a loaded model can generate)."""
        return list(self._built)

    def steps_for(self, batch_size: int) -> BuiltSteps:
        """The built steps for ``batch_size`` rows (built and verified now if not yet).

        Raises ``InputError`` for a model without its user model (from ``graphopt.load``) when
        the batch size was not saved.
        """
        if batch_size not in self._built:
            if self._source is None:
                raise InputError(self._unsaved_batch_size(batch_size))
            started = time.perf_counter()
            with eased_collector():
                built = self._source.build(batch_size, self.max_cache_len, self.target, self.report, self.fallback)
            if built.target is self.fallback:  # later batch sizes start where this one ended
                self.target, self.fallback = built.target, None
            self._built[batch_size] = built
            self.setup_seconds += time.perf_counter() - started
        return self._built[batch_size]

    def _unsaved_batch_size(self, batch_size: int) -> str:
        sizes = ", ".join(str(size) for size in sorted(self._built))
        origin = f"{self._loaded_from} holds" if self._loaded_from else "this model holds"
        return (f"no steps for a batch of {batch_size} rows: {origin} the steps for batch size(s) {sizes} only, and a "
                "loaded model has no model to build others from. Generate with a batch of "
                f"{batch_size} rows before saving, or optimize the model again with graphopt.optimize")

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The optimized step graph of the first batch size built (state lifted: cache in, cache out)."""
        return next(iter(self._built.values())).lifted.graph_module

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, attention_mask: torch.Tensor | None = None,
                 do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, min_new_tokens: int = 0, streamer: Any = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Generate like transformers' ``generate``: returns ``[batch, prompt + new]`` token ids.

        Batches must be left-padded (``attention_mask`` 0 on the left). ``eos_token_id`` defaults
        to the model's; pass ``eos_token_id=[]`` to always produce ``max_new_tokens``, or
        ``min_new_tokens`` to forbid eos before that many new tokens (transformers' way). Sampling
        (``do_sample=True``) applies temperature, then top-k, then top-p, each defaulting to the
        model's ``generation_config`` as in transformers; ``generator`` seeds it.
        ``streamer`` gets the tokens as they come (transformers' ``TextStreamer`` works).
        """
        if not isinstance(input_ids, torch.Tensor):
            raise InputError("input_ids must be a tensor of token ids [batch, prompt_length]")
        built = self.steps_for(int(input_ids.shape[0])) if input_ids.dim() == 2 else None
        if built is None:
            raise InputError(f"input_ids must be [batch, prompt_length], got shape {list(input_ids.shape)}")
        return generate_with(built.steps, self.defaults, input_ids, max_new_tokens, attention_mask, do_sample,
                             temperature, top_k, top_p, eos_token_id, pad_token_id, min_new_tokens, streamer, generator)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The next-token logits ``[batch, vocab]`` after each (left-padded) prompt."""
        built = self.steps_for(int(input_ids.shape[0]))
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        built.steps.reset()
        logits = built.steps.prefill(*step_inputs(input_ids.long(), mask.long(), self.max_cache_len))
        built.steps.reset()
        return logits

    def export_onnx(self, path: str | Path, batch_size: int | None = None) -> Path:
        """Write the step as an ONNX decoder at ``path`` (and its ``.genai.json`` sidecar); return ``path``.

        ``input_ids, attention_mask, position_ids, past_key_values.*`` in, ``logits, present.*`` out
        (``graphopt.workflows.generation.onnx_export``).
        """
        from graphopt.workflows.generation.onnx_export import export_decoder

        built = self.steps_for(batch_size or next(iter(self._built)))
        return export_decoder(built, Path(path), eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)

    def save(self, path: str | Path) -> Path:
        """Write the verified step graphs as graphopt ``.pt2`` files; return ``path``.

        The steps of the first batch size built go in ``path``, those of any other batch size in
        ``<stem>.batch<n>.pt2`` beside it (keep them together). ``graphopt.load(path)`` gives the
        model back in another process, lowered for its target (or another), without the user's
        model: it generates with the saved batch sizes only. No steps built yet: batch 1 is
        built first. See ``graphopt.workflows.generation.saving``.
        """
        if not self._built:
            self.steps_for(1)
        return write_generation(path, self._built, target=self.target.name, report=self.report,
                                max_cache_len=self.max_cache_len, defaults=self.defaults)


def load_generative(archive: Archive, target: Target, fallback: Target | None = None) -> GenerativeModel:
    """The generation model saved in ``archive`` (read by ``graphopt.load``), its steps lowered for ``target``.

    ``fallback`` as in :class:`GenerativeModel`.
    """
    notes: list[str] = []
    saved, target = lowered_or_fallback(lambda chosen: read_generation(archive, chosen), target, fallback, notes,
                                        "the generation steps")
    saved.report.notes.extend(notes)
    return GenerativeModel(target, saved.report, saved.max_cache_len, saved.defaults, built=saved.built,
                           loaded_from=saved.path)
