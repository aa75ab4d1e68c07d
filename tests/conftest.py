"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helpers import SmallCNN, randomize_batchnorm


@pytest.fixture
def small_cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = randomize_batchnorm(SmallCNN()).eval()
    return model, (torch.randn(2, 3, 8, 8),)
