"""Judging a compressed language model: perplexity on held-out text and greedy tokens against the float model.

An output cosine says little about a language model: what its users notice is whether it still
predicts text as well (perplexity) and whether greedy decoding still writes the same words
(token agreement). :class:`LanguageBudget` holds the text both are measured on, tokenized once,
and the float model's own figures on it; :meth:`LanguageBudget.measure` gives any stand-in
model's figures (the float model with some weights replaced by their compressed values, or the
lowered generation steps).

The text, by default, comes from Python's ``pydoc_data.topics`` (English prose on every Python):
the topics are split in two, the first half for measuring how sensitive each layer is
(``calibration``), the second for the budget (perplexity chunks and agreement prompts), so the
budget is never judged on the data that chose what to compress. A user's ``Fidelity(text=...)``
replaces the second half.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.errors import InputError
from graphopt.passes.lossy.base import Fidelity

__all__ = ["LanguageBudget", "LanguageMeasurement", "default_language_fidelity"]

CHUNK_TOKENS = 256
"""Tokens per perplexity chunk (and per sensitivity chunk); fewer per chunk, more chunks, for a shorter context."""
PERPLEXITY_CHUNKS = 4
"""Chunks the perplexity is measured on (``PERPLEXITY_CHUNKS * CHUNK_TOKENS`` tokens)."""
CALIBRATION_CHUNKS = 2
"""Chunks the layers' sensitivity is measured on."""
PROMPTS = 10
"""Prompts the greedy token agreement is measured on."""
PROMPT_TOKENS = 16
"""Tokens per agreement prompt."""


def default_language_fidelity(bits: int) -> Fidelity:
    """The budget of a compressed language model when the user gives none.

    int4 may cost 2% perplexity and must keep the first 32 greedy tokens of 8 of 10 prompts
    identical to the float model's; int8 may cost 0.5% perplexity. (Greedy agreement over 32
    tokens breaks on any small change near a tie: symmetric int8 of SmolLM2's 4-bit-born weights
    keeps perplexity at 1.000x and yet changes some continuations.)
    """
    if bits == 4:
        return Fidelity(max_perplexity_ratio=1.02, min_token_agreement=0.8)
    return Fidelity(max_perplexity_ratio=1.005)


@dataclass
class LanguageMeasurement:
    """A model's figures on the held-out text, beside the float model's."""

    perplexity: float
    perplexity_ratio: float
    agreement: float
    """Share of prompts whose first ``agreement_tokens`` greedy tokens equal the float model's."""
    matched_tokens: float
    """Mean number of leading greedy tokens equal to the float model's, per prompt."""

    def meets(self, fidelity: Fidelity) -> bool:
        """True when every part of ``fidelity`` given holds."""
        if fidelity.max_perplexity_ratio is not None and not self.perplexity_ratio <= fidelity.max_perplexity_ratio:
            return False
        return fidelity.min_token_agreement is None or self.agreement >= fidelity.min_token_agreement

    def describe(self) -> str:
        """The figures in words."""
        return (f"perplexity {self.perplexity:.3f} ({self.perplexity_ratio:.4f}x float), greedy tokens equal on "
                f"{self.agreement:.0%} of prompts (mean {self.matched_tokens:.1f} leading tokens)")


Generator = Callable[[torch.Tensor, int], torch.Tensor]
"""``generate(prompts [P, T], new_tokens) -> new token ids [P, new_tokens]`` (greedy)."""


class LanguageBudget:
    """Held-out text for judging compressed versions of ``model``, and the float model's figures on it."""

    def __init__(self, model: nn.Module, fidelity: Fidelity) -> None:
        self.fidelity = fidelity
        tokenizer = fidelity.tokenizer or _saved_tokenizer(model)
        calibration_text, held_out_text = _texts(fidelity.text)
        length = _chunk_length(model, fidelity)
        self.calibration = _chunks(tokenizer, calibration_text, CALIBRATION_CHUNKS, length, "calibration")
        self.chunks = _chunks(tokenizer, held_out_text, PERPLEXITY_CHUNKS, length, "Fidelity(text=...)")
        self.prompts = _prompts(tokenizer, held_out_text)
        self.float_perplexity = model_perplexity(model, self.chunks)
        self.float_tokens = model_greedy(model)(self.prompts, fidelity.agreement_tokens)

    def measure(self, perplexity: float, tokens: torch.Tensor) -> LanguageMeasurement:
        """Compare a model's ``perplexity`` and greedy ``tokens`` (for ``self.prompts``) with the float model's."""
        same = (tokens == self.float_tokens).long()
        leading = same.cumprod(dim=1).sum(dim=1).float()
        return LanguageMeasurement(perplexity, perplexity / self.float_perplexity,
                                   float((leading == same.shape[1]).float().mean()), float(leading.mean()))

    def measure_model(self, model: nn.Module) -> LanguageMeasurement:
        """Perplexity and greedy tokens of ``model`` (called like the float one)."""
        return self.measure(model_perplexity(model, self.chunks),
                            model_greedy(model)(self.prompts, self.fidelity.agreement_tokens))

    def describe_text(self) -> str:
        """Where the text came from and how much of it, for the report."""
        source = "the text given (Fidelity(text=...))" if self.fidelity.text is not None else \
            "pydoc_data.topics (second half; the first half measured the layers' sensitivity)"
        return (f"{self.chunks.numel()} tokens of {source} for perplexity, {self.prompts.shape[0]} prompts of "
                f"{self.prompts.shape[1]} tokens for greedy agreement over {self.fidelity.agreement_tokens} tokens")


@torch.no_grad()
def model_perplexity(model: nn.Module, chunks: torch.Tensor) -> float:
    """Perplexity of ``model`` (a causal LM returning ``.logits``) on ``chunks [n, length]`` of token ids."""
    total, count = 0.0, 0
    for chunk in chunks.split(2):
        logits = model(input_ids=chunk, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        total, count = total + float(loss), count + chunk[:, 1:].numel()
    return math.exp(total / count)


def model_greedy(model: nn.Module) -> Generator:
    """Greedy generation with ``model.generate`` (no early stop), new tokens only."""

    @torch.no_grad()
    def generate(prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[:, prompts.shape[1]:]

    return generate


def _saved_tokenizer(model: nn.Module) -> Any:
    """The tokenizer saved beside the model's weights, or an ``InputError`` saying to pass one."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
    if name:
        try:
            from transformers import AutoTokenizer

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return AutoTokenizer.from_pretrained(name)
        except Exception:  # any failure: no tokenizer saved there
            pass
    raise InputError(
        "a compressed language model is judged on held-out text (perplexity, greedy token agreement), and no "
        f"tokenizer was found beside the model ({name or 'no name_or_path'}): pass one, e.g. "
        "optimize(lm, ids, quantize='int4-weight-only', fidelity=Fidelity(max_perplexity_ratio=1.02, "
        "min_token_agreement=0.8, tokenizer=tokenizer))"
    )


def _texts(user_text: str | None) -> tuple[str, str]:
    """(calibration text, held-out text): the two halves of ``pydoc_data.topics``, the second replaced by the user's."""
    from pydoc_data.topics import topics

    ordered = [text for _, text in sorted(topics.items())]
    middle = len(ordered) // 2
    calibration = "\n\n".join(ordered[:middle])
    held_out = user_text if user_text is not None else "\n\n".join(reversed(ordered[middle:]))
    return calibration, held_out


def _token_ids(tokenizer: Any, text: str, limit: int) -> torch.Tensor:
    """The first ``limit`` token ids of ``text`` (only as much text as that needs is tokenized)."""
    chars = 6 * limit
    while True:
        ids = tokenizer(text[:chars], return_tensors="pt").input_ids[0]
        if ids.shape[0] >= limit or chars >= len(text):
            return ids[:limit]
        chars *= 2


def _chunk_length(model: nn.Module, fidelity: Fidelity) -> int:
    """``CHUNK_TOKENS``, or the model's context where that is shorter (its position table ends there).

    Raises ``InputError`` when the context cannot hold an agreement prompt and its new tokens.
    """
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(context, int):
        return CHUNK_TOKENS
    needed = PROMPT_TOKENS + fidelity.agreement_tokens
    if context < needed:
        raise InputError(f"the model's context ({context} positions, max_position_embeddings) cannot hold the "
                         f"budget's greedy agreement ({PROMPT_TOKENS} prompt tokens + {fidelity.agreement_tokens} new "
                         f"ones): use Fidelity(agreement_tokens={max(1, context - PROMPT_TOKENS)}) or fewer")
    return min(CHUNK_TOKENS, context)


def _chunks(tokenizer: Any, text: str, count: int, length: int, what: str) -> torch.Tensor:
    """The first ``count * CHUNK_TOKENS`` tokens of ``text`` (at least ``length``) in rows of ``length``."""
    ids = _token_ids(tokenizer, text, count * CHUNK_TOKENS)
    available = ids.shape[0] // length
    if available < 1:
        raise InputError(f"{what} holds {ids.shape[0]} tokens; a language-model budget needs at least "
                         f"{length} (a few paragraphs of text)")
    return ids[: available * length].reshape(available, length)


def _prompts(tokenizer: Any, text: str) -> torch.Tensor:
    """``PROMPTS`` prompts of ``PROMPT_TOKENS`` tokens, each the start of one paragraph of ``text``."""
    paragraphs = [p for p in text.split("\n\n") if len(p) > 8 * PROMPT_TOKENS]
    rows = []
    for paragraph in paragraphs:
        ids = _token_ids(tokenizer, paragraph, PROMPT_TOKENS)
        if ids.shape[0] == PROMPT_TOKENS:
            rows.append(ids)
        if len(rows) == PROMPTS:
            break
    if not rows:
        raise InputError(f"Fidelity(text=...) has no paragraph of {PROMPT_TOKENS} tokens to prompt with; give "
                         "several paragraphs separated by blank lines")
    return torch.stack(rows)
