"""fuse-activations and fuse-norms: activations and norms written op by op become one ATen op, exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.ir.graph import count_ops

PIPELINE = ["remove-identity", "cse", "fuse-activations", "fuse-norms", "dce"]


def _gelu_gpt2(x):  # transformers' NewGELUActivation
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x):  # FastGELU: other association, truncated constant, x * x
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_cubed(x):
    inner = x + 0.044715 * (x * x * x)
    return x * (torch.tanh(inner * math.sqrt(2 / math.pi)) + 1) * 0.5


def _gelu_erf(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _silu(x):
    return x * torch.sigmoid(x)


def _hardswish(x):
    return x * F.relu6(x + 3) / 6


def _hardswish_clamp(x):
    return x * torch.clamp(x + 3, 0, 6) / 6


def _hardsigmoid(x):
    return F.relu6(x + 3.0) / 6.0


class Act(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn, self.linear = fn, nn.Linear(16, 16)

    def forward(self, x):
        return self.fn(self.linear(x))


@pytest.mark.parametrize(("fn", "op", "hit"), [
    (_gelu_gpt2, "aten.gelu.default", "gelu-tanh"),
    (_gelu_fast, "aten.gelu.default", "gelu-tanh"),
    (_gelu_cubed, "aten.gelu.default", "gelu-tanh"),
    (_gelu_erf, "aten.gelu.default", "gelu-none"),
    (_silu, "aten.silu.default", "silu"),
    (_hardswish, "aten.hardswish.default", "hardswish"),
    (_hardswish_clamp, "aten.hardswish.default", "hardswish"),
    (_hardsigmoid, "aten.hardsigmoid.default", "hardsigmoid"),
])
def test_decomposed_activation_becomes_one_op(fn, op: str, hit: str) -> None:
    torch.manual_seed(0)
    model = Act(fn).eval()
    x = torch.randn(4, 16) * 4
    fast = graphopt.optimize(model, (x,), passes=PIPELINE)
    ops = count_ops(fast.graph_module)
    assert ops[op] == 1
    assert set(ops) == {"aten.linear.default", op}  # every op of the decomposed form is gone
    assert fast.report.rule_hits == {hit: 1}
    gelu = [n for n in fast.graph_module.graph.nodes if n.target is torch.ops.aten.gelu.default]
    if hit == "gelu-tanh":
        assert gelu[0].kwargs == {"approximate": "tanh"}
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def _wrong_coefficient(x):
    return 0.5 * x * (1.0 + torch.tanh(0.79 * (x + 0.044715 * x**3)))


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


@pytest.mark.parametrize(("fn", "reason"), [
    (_wrong_coefficient, "tanh-GELU coefficients 0.79, 0.044715 are not sqrt(2/pi), 0.044715"),
    (_quick_gelu, "x * sigmoid(1.702 * x) is not SiLU (no single ATen op)"),
])
def test_activation_near_misses(fn, reason: str) -> None:
    fast = graphopt.optimize(Act(fn).eval(), (torch.randn(4, 16),), passes=PIPELINE)
    record = next(r for r in fast.report.records if r.name == "fuse-activations")
    assert record.status == "unchanged"
    assert record.near_misses == {"fuse-activations": {reason: 1}}


class HandLayerNorm(nn.Module):
    def __init__(self, variant: str, dim: int = 16) -> None:
        super().__init__()
        self.variant = variant
        self.weight, self.bias = nn.Parameter(torch.rand(dim) + 0.5), nn.Parameter(torch.randn(dim))

    def forward(self, x):
        eps = 1e-5
        if self.variant == "pow-sqrt-div":  # the old BERT / ConvNeXt-channels-last style
            u = x.mean(-1, keepdim=True)
            s = (x - u).pow(2).mean(-1, keepdim=True)
            return self.weight * ((x - u) / torch.sqrt(s + eps)) + self.bias
        if self.variant == "var-rsqrt":
            mean = x.mean(dim=-1, keepdim=True)
            var = x.var(dim=-1, keepdim=True, unbiased=False)
            return (x - mean) * torch.rsqrt(var + eps) * self.weight + self.bias
        if self.variant == "no-affine":
            d = x - x.mean(-1, keepdim=True)
            return d * torch.rsqrt((d * d).mean(-1, keepdim=True) + eps)
        if self.variant == "rms":  # T5 / LLaMA RMSNorm
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        if self.variant == "channels-first":  # ConvNeXt LayerNorm over dim 1
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            return (x - u) / torch.sqrt(s + eps)
        if self.variant == "unbiased":
            mean = x.mean(dim=-1, keepdim=True)
            return (x - mean) * torch.rsqrt(x.var(dim=-1, keepdim=True) + eps)
        raise ValueError(self.variant)


@pytest.mark.parametrize(("variant", "op"), [
    ("pow-sqrt-div", "aten.layer_norm.default"),
    ("var-rsqrt", "aten.layer_norm.default"),
    ("no-affine", "aten.layer_norm.default"),
    ("rms", "aten.rms_norm.default"),
])
def test_hand_written_norm_becomes_one_op(variant: str, op: str) -> None:
    torch.manual_seed(0)
    model = HandLayerNorm(variant).eval()
    x = torch.randn(2, 5, 16) * 3 + 1
    fast = graphopt.optimize(model, (x,), passes=PIPELINE)
    assert count_ops(fast.graph_module) == {op: 1}
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("variant", "reason"), [
    ("channels-first", "layer_norm over dims [1] of a rank-3 tensor, not the trailing dims"),
    ("unbiased", "unbiased variance (correction=1): layer_norm uses the biased one"),
])
def test_norm_near_misses(variant: str, reason: str) -> None:
    fast = graphopt.optimize(HandLayerNorm(variant).eval(), (torch.randn(2, 5, 16),), passes=PIPELINE)
    record = next(r for r in fast.report.records if r.name == "fuse-norms")
    assert record.status == "unchanged"
    assert record.near_misses == {"fuse-norms": {reason: 1}}


def test_model_without_decomposed_ops_is_unchanged() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4), nn.Sigmoid()).eval()
    x = torch.randn(3, 16)
    before = graphopt.optimize(model, (x,), passes=["remove-identity"]).graph_module.code
    fast = graphopt.optimize(model, (x,), passes=["remove-identity", "fuse-activations", "fuse-norms"])
    assert fast.graph_module.code == before
    mine = [r for r in fast.report.records if r.name in ("fuse-activations", "fuse-norms")]
    assert len(mine) == 2 and all(r.status == "unchanged" and not r.near_misses for r in mine)
