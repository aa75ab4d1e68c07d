"""Test helpers: non-trivial batch-norm statistics, output comparison, a small CNN, a self-attention base, the
fuzz tests' hypothesis settings."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import HealthCheck, Phase, seed, settings


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial statistics, so folding it is a real test."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            if module.track_running_stats:  # a batch norm without running statistics has none to set
                module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model


class SmallCNN(nn.Module):
    """conv → BN → ReLU6, a depthwise conv → BN, dropout, linear → BN1d: every built-in pass fires."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn(self.conv(x)))
        y = F.relu6(self.bn_dw(self.depthwise(y)))
        y = self.dropout(y.mean((2, 3)))
        return self.bn_fc(self.fc(y))


class SelfAttentionBase(nn.Module):
    """The q/k/v/o linears of a ``dim``-wide self-attention in ``heads`` heads; subclasses write ``forward``.

    ``form`` names how a subclass writes it (SDPA or op by op, which views); ``causal`` masks the future.
    """

    def __init__(self, dim: int, heads: int, causal: bool, form: str) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.heads, self.causal, self.form = heads, causal, form
        self.scale = (dim // heads) ** -0.5

    def softmax_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``softmax(q @ kᵀ * scale) @ v`` written op by op (what ``fuse-attention`` looks for)."""
        length = q.shape[-2]
        scores = q @ k.transpose(-2, -1) * self.scale
        if self.causal:
            mask = torch.ones(length, length, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        return scores.softmax(dim=-1) @ v


def max_scaled_error(actual, expected) -> float:
    """Max abs difference over all output tensors, divided by the reference's max magnitude."""
    worst = 0.0
    for a, e in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected), strict=True):
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            scale = max(float(e.abs().max()), 1e-6)
            worst = max(worst, float((a.detach().cpu() - e.detach().cpu()).abs().max()) / scale)
    return worst


def assert_matches(optimized, model: nn.Module, inputs: tuple, kwargs: dict | None = None, tol: float = 1e-4) -> float:
    """Assert the optimized module computes what the eager model computes; return the scaled error."""
    kwargs = kwargs or {}
    with torch.no_grad():
        expected = model(*inputs, **kwargs)
    actual = optimized(*inputs, **kwargs)
    assert len(pytree.tree_leaves(actual)) == len(pytree.tree_leaves(expected))
    error = max_scaled_error(actual, expected)
    assert error <= tol, f"outputs differ: scaled error {error:.3g} > {tol}"
    return error


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer, to prove a model was not modified."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


FUZZ_SEED = os.environ.get("GRAPHOPT_FUZZ_SEED")
"""``GRAPHOPT_FUZZ_SEED``: the fuzz tests explore at random from this seed instead of replaying the same examples."""

T = TypeVar("T")


def fuzz_settings(examples: int, phases: Iterable[Phase] = tuple(Phase)) -> Callable[[T], T]:
    """The fuzz tests' hypothesis settings: ``examples`` examples, the same on every run unless ``FUZZ_SEED`` is set.

    No deadline (an example compiles a model) and no example database; ``phases`` leaves out
    shrinking where an example costs seconds.
    """

    def decorate(test: T) -> T:
        test = settings(
            max_examples=examples,
            deadline=None,
            derandomize=FUZZ_SEED is None,
            database=None,
            print_blob=True,
            phases=list(phases),
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )(test)
        return seed(int(FUZZ_SEED))(test) if FUZZ_SEED is not None else test

    return decorate


def mean_pooled(outputs: list, inputs: tuple) -> torch.Tensor:
    """Sentence embeddings: the last hidden state averaged over the real (unpadded) tokens (``distill(match=)``)."""
    hidden, mask = outputs[0], inputs[1].unsqueeze(-1).to(outputs[0].dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def token_batch(generator: torch.Generator, size: int, length: int, vocab: int = 120
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and an attention mask whose first sentence is padded from half its length."""
    ids = torch.randint(0, vocab, (size, length), generator=generator)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    return ids, mask
