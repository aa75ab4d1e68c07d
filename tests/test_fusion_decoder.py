"""Decoder fusions: grouped-query attention (fuse-gqa), rotary embeddings (fuse-rotary), gated MLPs (fuse-gated-mlp)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.ir.graph import count_ops
from graphopt.passes.fusion.decoder_ops import GEGLU, ROTARY, SWIGLU, rotary_reference

transformers = pytest.importorskip("transformers")

SDPA = "aten.scaled_dot_product_attention.default"


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' repeat_kv."""
    b, kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GroupedAttention(nn.Module):
    """SDPA on keys/values repeated per head (``repeat``: "repeat_kv", "interleave"; or tiled, which must not fuse)."""

    def __init__(self, repeat: str = "repeat_kv") -> None:
        super().__init__()
        self.repeat = repeat

    def forward(self, q, k, v, mask):
        n = q.shape[1] // k.shape[1]
        if self.repeat == "repeat_kv":
            k, v = _repeat_kv(k, n), _repeat_kv(v, n)
        elif self.repeat == "interleave":
            k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        else:
            k, v = k.repeat(1, n, 1, 1), v.repeat(1, n, 1, 1)
        return F.scaled_dot_product_attention(q, k, v, mask, scale=0.3)


class Rotary(nn.Module):
    """HF's apply_rotary_pos_emb on q and k (``style``: "half" fuses; "interleaved" and "swapped" must not)."""

    def __init__(self, style: str = "half") -> None:
        super().__init__()
        self.style = style

    def _rotate(self, x):
        half = x.shape[-1] // 2
        if self.style == "interleaved":  # GPT-J
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        if self.style == "swapped":
            return torch.cat((x[..., half:], -x[..., :half]), dim=-1)
        return _rotate_half(x)

    def forward(self, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + self._rotate(q) * sin, (k * cos) + (sin * self._rotate(k))


class GatedMLP(nn.Module):
    """Llama (silu) / Gemma (gelu tanh) MLP; ``merged`` is Phi-3's gate_up_proj + chunk; ``broadcast`` must not fuse."""

    def __init__(self, act: str = "silu", merged: bool = False, broadcast: bool = False) -> None:
        super().__init__()
        self.act, self.merged, self.broadcast = act, merged, broadcast
        self.gate_up = nn.Linear(16, 64, bias=False)
        self.gate, self.up = nn.Linear(16, 32, bias=False), nn.Linear(16, 1 if broadcast else 32, bias=False)
        self.down = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1) if self.merged else (self.gate(x), self.up(x))
        activation = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate="tanh")
        return self.down(activation * up)


def _record(fast, name):
    return next(r for r in fast.report.records if r.name == name)


def _attention_inputs():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    return q, k, v, torch.randn(2, 1, 5, 7)


@pytest.mark.parametrize("repeat", ["repeat_kv", "interleave"])
def test_repeated_keys_values_become_enable_gqa(repeat: str) -> None:
    model, inputs = GroupedAttention(repeat).eval(), _attention_inputs()
    fast = graphopt.optimize(model, inputs, passes=["remove-identity", "fuse-gqa", "dce"])
    ops = count_ops(fast.graph_module)
    assert ops[SDPA] == 1 and not ops["aten.expand.default"] and not ops["aten.repeat_interleave.self_int"]
    graph = fast.graph_module.graph
    (sdpa,) = graph.find_nodes(op="call_function", target=torch.ops.aten.scaled_dot_product_attention.default)
    assert sdpa.kwargs["enable_gqa"] is True and tuple(sdpa.args[1].meta["val"].shape) == (2, 2, 7, 8)
    assert _record(fast, "fuse-gqa").rule_hits == {"gqa-attention": 1}
    torch.testing.assert_close(fast(*inputs), model(*inputs), rtol=0, atol=1e-6)


def test_tiled_keys_values_are_a_near_miss() -> None:
    model, inputs = GroupedAttention("tile").eval(), _attention_inputs()
    fast = graphopt.optimize(model, inputs, passes=["remove-identity", "fuse-gqa"])
    record = _record(fast, "fuse-gqa")
    assert record.stats["fused"] == 0 and "tiled with repeat" in next(iter(record.near_misses["fuse-gqa"]))
    torch.testing.assert_close(fast(*inputs), model(*inputs))


def _rotary_inputs():
    torch.manual_seed(0)
    return torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 3, 16), torch.randn(1, 3, 16)


def test_rotary_embedding_becomes_one_op() -> None:
    model, inputs = Rotary().eval(), _rotary_inputs()
    before = count_ops(graphopt.optimize(model, inputs, passes=[]).graph_module)
    fast = graphopt.optimize(model, inputs, passes=["fuse-rotary", "dce"])
    ops = count_ops(fast.graph_module)
    assert before["aten.neg.default"] == 2 and before["aten.cat.default"] == 2
    assert ops["graphopt_decoder.rotary.default"] == 2
    assert not ops["aten.neg.default"] and not ops["aten.cat.default"] and not ops["aten.slice.Tensor"]
    assert sum(ops.values()) == sum(before.values()) - 2 * 6
    assert _record(fast, "fuse-rotary").rule_hits == {"rotary": 2}
    for actual, expected in zip(fast(*inputs), model(*inputs), strict=True):
        assert torch.equal(actual, expected)  # same bits as the ATen chain


@pytest.mark.parametrize("style", ["interleaved", "swapped"])
def test_other_rotary_conventions_stay(style: str) -> None:
    model, inputs = Rotary(style).eval(), _rotary_inputs()
    fast = graphopt.optimize(model, inputs, passes=["fuse-rotary"])
    record = _record(fast, "fuse-rotary")
    assert record.stats["fused"] == 0 and not count_ops(fast.graph_module)["graphopt_decoder.rotary.default"]
    if style == "swapped":
        assert "sign on the other half" in next(iter(record.near_misses["fuse-rotary"]))
    for actual, expected in zip(fast(*inputs), model(*inputs), strict=True):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize(("act", "merged", "op"), [("silu", False, "swiglu"), ("gelu", False, "geglu"),
                                                   ("silu", True, "swiglu")])
def test_gated_activation_becomes_one_op(act: str, merged: bool, op: str) -> None:
    torch.manual_seed(0)
    model, x = GatedMLP(act, merged).eval(), torch.randn(2, 5, 16)
    passes = ["fuse-horizontal", "fuse-gated-mlp", "dce"]
    fast = graphopt.optimize(model, (x,), passes=passes)
    ops = count_ops(fast.graph_module)
    assert ops[f"graphopt_decoder.{op}.default"] == 1 and not ops["aten.mul.Tensor"]
    assert not ops["aten.silu.default"] and not ops["aten.gelu.default"]
    assert _record(fast, "fuse-gated-mlp").rule_hits == {op: 1}
    torch.testing.assert_close(fast(x), model(x))  # the merged gate/up GEMM rounds differently


def test_broadcast_gate_is_a_near_miss() -> None:
    torch.manual_seed(0)
    model, x = GatedMLP(broadcast=True).eval(), torch.randn(2, 5, 16)
    fast = graphopt.optimize(model, (x,), passes=["fuse-gated-mlp"])
    assert _record(fast, "fuse-gated-mlp").near_misses == {
        "fuse-gated-mlp": {"gate and up have different shapes (the product broadcasts)": 1}}
    torch.testing.assert_close(fast(x), model(x))


def test_ops_give_the_bits_of_the_aten_chains() -> None:
    torch.manual_seed(0)
    x, cos, sin = torch.randn(1, 4, 1, 64), torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)
    gate, up = torch.randn(3, 40), torch.randn(3, 40)
    assert torch.equal(ROTARY(x, cos, sin), x * cos + _rotate_half(x) * sin)
    assert torch.equal(rotary_reference(x, cos, sin), ROTARY(x, cos, sin))
    assert torch.equal(SWIGLU(gate, up), F.silu(gate) * up)
    assert torch.equal(GEGLU(gate, up, "tanh"), F.gelu(gate, approximate="tanh") * up)


def _tiny_lm(family: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32)
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
              "gemma": transformers.GemmaConfig}[family](**common, **({"head_dim": 8} if family == "gemma" else {}))
    model = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
             "gemma": transformers.GemmaForCausalLM}[family](config)
    return model.eval()


@pytest.mark.parametrize(("family", "target", "gate"), [("llama", "cpu", "swiglu"), ("gemma", "cpu", "geglu"),
                                                        ("qwen2", "onnx", "swiglu")])
def test_generation_with_decoder_fusions_matches_transformers(family: str, target: str, gate: str) -> None:
    lm = _tiny_lm(family)
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(1))
    fast = graphopt.optimize(lm, (ids,), target=target, max_cache_len=16)
    hits = {r.name: r.rule_hits for r in fast.report.records}
    assert hits["fuse-gqa"] == {"gqa-attention": 1} and hits["fuse-rotary"] == {"rotary": 2}
    assert hits["fuse-gated-mlp"] == {gate: 1}
    assert all(r.status != "rolled back" for r in fast.report.records)
    expected = lm.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(fast.generate(ids, max_new_tokens=8), expected)
