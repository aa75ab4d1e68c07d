"""``GenerativeModel``: what ``graphopt.optimize`` returns for a causal language model.

It generates like transformers' ``generate`` (``fast.generate(input_ids, max_new_tokens=...)``)
with lowered prefill and decode steps over a static key/value cache. Steps are built per batch
size, the first time a batch of that size is generated (each build is one capture, one verified
pass pipeline and two lowerings, recorded in ``report``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphopt.errors import InputError
from graphopt.passes.base import Pass
from graphopt.report import Report
from graphopt.targets.base import Target
from graphopt.workflows.generation.build import BuiltSteps, build_steps
from graphopt.workflows.generation.decoder import step_inputs
from graphopt.workflows.generation.loop import run_generation
from graphopt.workflows.generation.sampling import Sampling

__all__ = ["DEFAULT_MAX_CACHE_LEN", "GenerativeModel"]

DEFAULT_MAX_CACHE_LEN = 1024
"""Cache positions (prompt plus new tokens) when neither the user nor the model's config says fewer."""


def _config_value(model: nn.Module, *names: str) -> Any:
    for owner in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        for name in names:
            value = getattr(owner, name, None) if owner is not None else None
            if value is not None:
                return value
    return None


class GenerativeModel(nn.Module):
    """A causal LM optimized for generation on ``target``.

    ``generate`` produces tokens; calling the model returns the next-token logits ``[batch, vocab]``
    of a prompt. ``max_cache_len`` bounds prompt plus new tokens. ``report`` records every build.
    """

    def __init__(self, model: nn.Module, example_ids: torch.Tensor, target: Target, passes: list[Pass],
                 max_cache_len: int, report: Report, *, verify: bool = True, on_error: str = "rollback") -> None:
        super().__init__()
        self.__dict__["_model"] = model  # the user's model, read (never written) when a new batch size is built
        self.target = target
        self.report = report
        self.max_cache_len = max_cache_len
        self._passes = passes
        self._example_ids = example_ids
        self._verify, self._on_error = verify, on_error
        self._built: dict[int, BuiltSteps] = {}
        self.eos_token_id = _config_value(model, "eos_token_id")
        self.pad_token_id = _config_value(model, "pad_token_id")
        config = getattr(model, "generation_config", None)
        self._sampling_defaults = {"temperature": getattr(config, "temperature", None) or 1.0,
                                   "top_k": getattr(config, "top_k", None),
                                   "top_p": getattr(config, "top_p", None)}
        self.setup_seconds = 0.0
        self.steps_for(example_ids.shape[0])

    def steps_for(self, batch_size: int) -> BuiltSteps:
        """The built steps for ``batch_size`` rows (built and verified now if not yet)."""
        if batch_size not in self._built:
            started = time.perf_counter()
            self._built[batch_size] = build_steps(self._model, self._example_ids, batch_size, self.max_cache_len,
                                                  self.target, list(self._passes), self.report,
                                                  verify=self._verify, on_error=self._on_error)
            self.setup_seconds += time.perf_counter() - started
        return self._built[batch_size]

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
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        pad = pad_token_id if pad_token_id is not None else self.pad_token_id
        return run_generation(built.steps, input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                              sampling=self._sampling(do_sample, temperature, top_k, top_p), eos_token_id=eos,
                              pad_token_id=pad, min_new_tokens=min_new_tokens, streamer=streamer,
                              generator=generator)

    def _sampling(self, do_sample: bool, temperature: float | None, top_k: int | None, top_p: float | None
                  ) -> Sampling:
        """The sampling settings, the model's generation config filling what the call leaves out."""
        if not do_sample:
            return Sampling()
        defaults = self._sampling_defaults
        return Sampling(True, defaults["temperature"] if temperature is None else temperature,
                        defaults["top_k"] if top_k is None else top_k, defaults["top_p"] if top_p is None else top_p)

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
