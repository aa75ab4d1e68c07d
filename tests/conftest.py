"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from helpers import SmallCNN, randomize_batchnorm

# The suite is strict: a pass that fails verification raises instead of being rolled back, so a
# broken pass fails its test. Tests of the rollback behaviour pass on_error="rollback" explicitly.
os.environ.setdefault("GRAPHOPT_ON_ERROR", "raise")


@pytest.fixture
def small_cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = randomize_batchnorm(SmallCNN()).eval()
    return model, (torch.randn(2, 3, 8, 8),)
