"""fuse-attention: hand-written attention chains become scaled_dot_product_attention, exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.ir.graph import count_ops
from graphopt.passes.fusion import FuseAttention

SDPA = "aten.scaled_dot_product_attention.default"
PIPELINE = ["remove-dropout", "remove-identity", "fuse-attention", "dce"]
MIN = torch.finfo(torch.float32).min


class SelfAttention(nn.Module):
    """Multi-head self-attention written by hand; ``variant`` picks how scores are scaled and masked."""

    def __init__(self, variant: str, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.variant, self.heads, self.head_dim = variant, heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.drop = nn.Dropout(0.1)
        self.bias = nn.Parameter(torch.randn(1, heads, 8, 8))

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        variant, d = self.variant, self.head_dim
        if variant == "mul-scale-additive-mask":
            scores = q @ k.transpose(-1, -2) * (1 / math.sqrt(d)) + mask
        elif variant == "div-sqrt-d":
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(d)
        elif variant == "scale-on-q":
            scores = (q * d**-0.5) @ k.permute(0, 1, 3, 2)
        elif variant == "t5-position-bias":
            scores = q @ k.transpose(3, 2) + self.bias + mask
        elif variant == "masked-fill-min":
            scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(mask < -1, MIN)
        elif variant == "masked-fill-inf":
            scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(mask < -1, float("-inf"))
        elif variant == "where-causal":
            causal = torch.ones(8, 8, dtype=torch.bool).tril()
            scores = torch.where(causal, q @ k.transpose(-1, -2) / math.sqrt(d), torch.tensor(MIN))
        else:
            raise ValueError(variant)
        weights = self.drop(torch.softmax(scores, dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(x.shape)
        return self.o(out)


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(batch, 8, 32)
    mask = torch.zeros(batch, 1, 1, 8)
    mask[1, ..., 6:] = MIN  # the second sequence is padded: masking matters
    return x, mask


def _fuse(model: nn.Module, inputs: tuple, passes: list | None = None) -> graphopt.OptimizedModel:
    return graphopt.optimize(model.eval(), inputs, passes=passes or PIPELINE)


def _sdpa_nodes(fast: graphopt.OptimizedModel) -> list:
    return [n for n in fast.graph_module.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]


def _record(fast: graphopt.OptimizedModel, name: str = "fuse-attention"):
    return next(r for r in fast.report.records if r.name == name)


@pytest.mark.parametrize("variant", [
    "mul-scale-additive-mask", "div-sqrt-d", "scale-on-q", "t5-position-bias", "masked-fill-min",
    "masked-fill-inf", "where-causal",
])
def test_hand_written_attention_becomes_sdpa(variant: str) -> None:
    torch.manual_seed(0)
    model = SelfAttention(variant).eval()
    inputs = _inputs()
    fast = _fuse(model, inputs)
    ops = count_ops(fast.graph_module)
    assert ops[SDPA] == 1 and ops["aten.softmax.int"] == 0
    assert _record(fast).rule_hits == {"attention": 1}
    with torch.no_grad():
        torch.testing.assert_close(fast(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)


def test_scale_and_mask_become_sdpa_arguments() -> None:
    model = SelfAttention("scale-on-q").eval()
    fast = _fuse(model, _inputs())
    (sdpa,) = _sdpa_nodes(fast)
    assert sdpa.kwargs["scale"] == pytest.approx(8 ** -0.5)
    assert count_ops(fast.graph_module)["aten.mul.Tensor"] == 0  # the q scaling was folded into scale=

    fast = _fuse(SelfAttention("t5-position-bias").eval(), _inputs())
    (sdpa,) = _sdpa_nodes(fast)
    assert sdpa.kwargs["scale"] == 1.0 and sdpa.args[3] is not None  # T5: no scaling, bias + mask as attn_mask


def test_constant_causal_fill_becomes_is_causal() -> None:
    model = SelfAttention("where-causal").eval()
    inputs = _inputs()
    passes = ["remove-dropout", "remove-identity", "constant-folding", "fuse-attention", "dce"]
    fast = _fuse(model, inputs, passes=passes)
    (sdpa,) = _sdpa_nodes(fast)
    assert sdpa.args[3] is None and sdpa.args[5] is True
    with torch.no_grad():
        torch.testing.assert_close(fast(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)


def test_gpt2_constant_causal_mask_becomes_is_causal() -> None:
    from graphopt.bench import zoo

    entry = zoo.load("gpt2", size="small", batch=2)
    model = _eager(entry.model)
    fast = graphopt.optimize(model, entry.example_inputs, target="cpu")
    sdpas = _sdpa_nodes(fast)
    assert len(sdpas) == 2 and all(n.args[3] is None and n.args[5] is True for n in sdpas)
    assert _record(fast).stats["causal"] == 2
    assert fast.report.rule_hits["gelu-tanh"] == 2  # GPT-2's NewGELU, written op by op
    with torch.no_grad():
        torch.testing.assert_close(fast(*entry.example_inputs), model(*entry.example_inputs), rtol=1e-4, atol=1e-5)


class NearMiss(nn.Module):
    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        scores = q @ k.transpose(-1, -2)
        if self.variant == "softcap":
            scores = torch.tanh(scores / 8) * 8
        elif self.variant == "scale-after-mask":
            scores = (scores + mask) * 0.25
        elif self.variant == "fill-1e4":
            scores = scores.masked_fill(mask < -1, -1e4)
        elif self.variant == "softmax-dim":
            return torch.softmax(scores, dim=-2) @ v
        weights = torch.softmax(scores, dim=-1)
        if self.variant == "weights-returned":
            return weights @ v, weights
        return weights @ v


@pytest.mark.parametrize(("variant", "reason"), [
    ("softcap", "aten.tanh.default between the scores and the softmax"),
    ("scale-after-mask", "the scores are scaled after the mask is applied"),
    ("fill-1e4", "masked-fill value -10000 does not dominate"),
    ("softmax-dim", "softmax over dim -2, not the last (key) dim"),
    ("weights-returned", "the attention weights are also used elsewhere"),
])
def test_near_misses_are_reported_with_a_reason(variant: str, reason: str) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    mask = torch.zeros(2, 1, 1, 8)
    mask[1, ..., 6:] = MIN
    fast = _fuse(NearMiss(variant), (q, k, v, mask))
    record = _record(fast)
    assert record.status == "unchanged"
    assert count_ops(fast.graph_module)[SDPA] == 0
    (found,) = record.near_misses["fuse-attention"]
    assert found.startswith(reason)


def test_inf_fill_refused_when_nan_rows_must_stay() -> None:
    model = SelfAttention("masked-fill-inf").eval()
    fast = _fuse(model, _inputs(), passes=["remove-dropout", "remove-identity", FuseAttention(keep_nan_rows=True)])
    assert count_ops(fast.graph_module)[SDPA] == 0
    assert any("-inf" in reason for reason in _record(fast).near_misses["fuse-attention"])


def test_batched_matmul_broadcast_is_refused() -> None:
    class Broadcast(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v

    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(1, 4, 8, 16), torch.randn(1, 4, 8, 16)
    fast = _fuse(Broadcast(), (q, k, v))
    assert count_ops(fast.graph_module)[SDPA] == 0
    assert "batch dims differ" in next(iter(_record(fast).near_misses["fuse-attention"]))


def test_model_without_attention_is_unchanged() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10), nn.Softmax(dim=-1)).eval()
    x = torch.randn(4, 16)
    before = graphopt.optimize(model, (x,), passes=["remove-dropout"]).graph_module.code
    fast = _fuse(model, (x,), passes=["remove-dropout", "fuse-attention"])
    record = _record(fast)
    assert record.status == "unchanged" and not record.near_misses
    assert fast.graph_module.code == before


def _eager(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "eager"
    return model.eval()


def test_transformers_bert_eager_attention_is_fused_at_every_layer() -> None:
    from graphopt.bench import zoo

    entry = zoo.load("bert", size="small", batch=2)
    model = _eager(entry.model)
    fast = graphopt.optimize(model, entry.example_inputs, target="cpu", dynamic_batch=True)
    assert count_ops(fast.graph_module)[SDPA] == 2  # two layers
    assert fast.report.rule_hits["attention"] == 2
    with torch.no_grad():
        reference = model(*entry.example_inputs)
        torch.testing.assert_close(fast(*entry.example_inputs), reference, rtol=1e-4, atol=1e-5)
        ids, mask = entry.example_inputs
        bigger = (ids.repeat(2, 1), mask.repeat(2, 1))
        torch.testing.assert_close(fast(*bigger), model(*bigger), rtol=1e-4, atol=1e-5)


def test_transformers_t5_position_bias_attention_is_fused() -> None:
    from transformers import T5Config, T5EncoderModel

    from graphopt.bench.zoo import LastHiddenState

    torch.manual_seed(0)
    config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      attn_implementation="eager")
    model = LastHiddenState(T5EncoderModel(config)).eval()
    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    fast = graphopt.optimize(model, (ids, mask), target="cpu")
    assert count_ops(fast.graph_module)[SDPA] == 2
    assert count_ops(fast.graph_module)["aten.rms_norm.default"] == 5  # fuse-norms: T5LayerNorm is RMSNorm
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, mask), model(ids, mask), rtol=1e-4, atol=1e-5)
