"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

The filters follow transformers' ``generate`` (temperature first, then top-k, then top-p keeping
at least one token), so a seeded run draws from the same distribution. :class:`GenerationDefaults`
holds what a model's generation config says when a call leaves it out (eos / pad ids, sampling
settings); it is read from the model, or from a saved file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from graphopt.errors import InputError

__all__ = ["GenerationDefaults", "Sampling", "greedy_tokens", "next_tokens"]


@dataclass(frozen=True)
class Sampling:
    """How ``generate`` picks tokens: ``do_sample=False`` is greedy (argmax) and ignores the rest."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k must be a positive number of tokens, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")


def _filtered(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    scores = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        ordered, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - sampling.top_p
        drop[..., -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's largest logit (int64 ``[batch]``), as ``argmax`` gives it.

    A float32 CPU tensor goes through NumPy's argmax: on one thread (the generation loop keeps
    torch to one while onnxruntime runs the steps) it took 17 us for 4 x 49,152 logits against
    torch's 176, measured here; both pick the first of equal maxima.
    """
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(np.argmax(logits.numpy(), axis=-1).astype(np.int64, copy=False))
    return logits.argmax(dim=-1)


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of every row of ``logits`` ``[batch, vocab]`` (int64 ``[batch]``)."""
    if not sampling.do_sample:
        return greedy_tokens(logits)
    probabilities = _filtered(logits.float(), sampling).softmax(dim=-1)
    return torch.multinomial(probabilities, num_samples=1, generator=generator).squeeze(1)


def _config_value(model: nn.Module, *names: str) -> Any:
    for owner in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        for name in names:
            value = getattr(owner, name, None) if owner is not None else None
            if value is not None:
                return value
    return None


@dataclass(frozen=True)
class GenerationDefaults:
    """What ``generate`` uses when a call leaves it out: the model's eos / pad ids and sampling settings."""

    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @classmethod
    def of(cls, model: nn.Module) -> GenerationDefaults:
        """The defaults of a transformers model: its ``generation_config``, then its ``config``."""
        config = getattr(model, "generation_config", None)
        eos = _config_value(model, "eos_token_id")
        return cls(list(eos) if isinstance(eos, (list, tuple)) else eos, _config_value(model, "pad_token_id"),
                   getattr(config, "temperature", None) or 1.0, getattr(config, "top_k", None),
                   getattr(config, "top_p", None))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (what a saved file holds)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationDefaults:
        """Rebuild from :meth:`to_dict` output (``TypeError`` on an unknown key)."""
        return cls(**data)

    def sampling(self, do_sample: bool, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None) -> Sampling:
        """The sampling settings of a call, these defaults filling what it leaves out (greedy unless ``do_sample``)."""
        if not do_sample:
            return Sampling()
        return Sampling(True, self.temperature if temperature is None else temperature,
                        self.top_k if top_k is None else top_k, self.top_p if top_p is None else top_p)
