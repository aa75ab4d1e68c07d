"""Pieces the benchmark's model builders share: what a builder returns, output wrappers, random inputs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["Built", "Builder", "LastHiddenState", "images", "token_inputs"]

Built = tuple[nn.Module, tuple[torch.Tensor, ...], str]
"""What a builder returns: the model, its example inputs, and a one-line description."""
Builder = Callable[[str, int], Built]
"""A model builder: (size, batch) to what it built."""


def images(batch: int, side: int) -> tuple[torch.Tensor, ...]:
    """One random ``[batch, 3, side, side]`` image batch."""
    return (torch.randn(batch, 3, side, side),)


class LastHiddenState(nn.Module):
    """Wrap a Hugging Face encoder so it returns ``last_hidden_state`` as a plain tensor."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Positional inputs as the encoder takes them (e.g. input_ids, attention_mask)."""
        return self.encoder(*inputs).last_hidden_state


def token_inputs(batch: int, seq: int, vocab: int, with_mask: bool) -> tuple[torch.Tensor, ...]:
    """Random token ids; odd rows of the mask pad their last quarter so masking matters."""
    ids = torch.randint(0, vocab, (batch, seq), dtype=torch.long)
    if not with_mask:
        return (ids,)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1::2, seq - seq // 4 :] = 0
    return ids, mask
