"""The fast setup paths: decoder caches functionalized without a re-trace, ONNX translated without re-decomposition."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import graphopt
import graphopt.ir.capture as capture_module
from graphopt.ir.graph import STATE_UPDATE, is_mutating
from graphopt.ir.inference_form import to_inference_form
from graphopt.targets.onnx.direct_export import export_translated_directly

transformers = pytest.importorskip("transformers")


def _tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _refuse_full_functionalization(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the graph was functionalized by re-tracing it")

    monkeypatch.setattr(capture_module, "_functionalize", refuse)


def test_decoder_cache_writes_need_no_full_functionalization(monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse_full_functionalization(monkeypatch)
    lm = _tiny_llama()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    fast = graphopt.optimize(lm, (ids,), target="cpu", max_cache_len=32)
    expected = lm.generate(ids, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(fast.generate(ids, max_new_tokens=8), expected, rtol=0, atol=0)


class NoGradRegionAndCasts(nn.Module):
    """A ``torch.no_grad()`` block (a grad-mode region in the training IR) and ``.to()`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("frequencies", torch.linspace(0.1, 1.0, 4))
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            angles = positions.to(torch.float32)[:, None] * self.frequencies.to(x.dtype)
        return self.linear(x).to(torch.float32) * angles.cos()


def test_inference_form_inlines_grad_regions_and_turns_to_into_copies() -> None:
    model, x, positions = NoGradRegionAndCasts().eval(), torch.randn(3, 4), torch.arange(3)
    program = torch.export.export(model, (x, positions), strict=False).module()
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "wrap_with_set_grad_enabled" in targets and any(t.startswith("aten.to.") for t in targets)
    to_inference_form(program)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "wrap_with_set_grad_enabled" not in targets
    assert not any(t.startswith("aten.to.") for t in targets)
    assert targets.count("aten._to_copy.default") == 1  # int positions to float; the same-dtype casts are dropped
    torch.testing.assert_close(program(x, positions), model(x, positions))


class RmsNormPoolMask(nn.Module):
    """Ops torchlib only decomposes below opset 23: RMSNorm, global average pooling, boolean ``&``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.RMSNorm(8, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(self.conv(x), 1).flatten(1)
        keep = (pooled > -1.0) & (pooled < 1.0)
        return torch.where(keep, self.norm(pooled), pooled)


def _onnx_output(program: object, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_direct_translation_matches_the_model() -> None:
    torch.manual_seed(0)
    model, x = RmsNormPoolMask().eval(), torch.randn(2, 3, 8, 8)
    gm = graphopt.capture(model, (x,)).graph_module
    program = export_translated_directly(gm, (x,), {}, None, None, True, None)
    assert program is not None
    np.testing.assert_allclose(_onnx_output(program, x), model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


class PoolsToTwoByTwo(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 2)


def test_graph_needing_decomposition_falls_back_to_the_exporter() -> None:
    x = torch.randn(1, 3, 8, 8)
    gm = graphopt.capture(PoolsToTwoByTwo(), (x,)).graph_module
    assert export_translated_directly(gm, (x,), {}, None, None, True, None) is None  # pooling to 2x2 has no translation
    fast = graphopt.optimize(PoolsToTwoByTwo(), (x,), target="onnx")  # torch.onnx.export decomposes it
    torch.testing.assert_close(fast(x), PoolsToTwoByTwo()(x), rtol=1e-5, atol=1e-5)


def test_state_written_twice_keeps_one_update_with_the_last_value(monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse_full_functionalization(monkeypatch)

    class CountsTwice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("count", torch.zeros(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.count.add_(1)
            y = x * self.count.sum()
            self.count.mul_(2)
            return y + self.count.sum()

    x = torch.randn(3)
    captured = graphopt.capture(CountsTwice(), (x,))
    gm = captured.graph_module
    updates = [n for n in gm.graph.nodes if n.meta.get(STATE_UPDATE)]
    assert len(updates) == 1 and not [n for n in gm.graph.nodes if is_mutating(n) and n not in updates]
    eager = CountsTwice()
    fast = graphopt.optimize(CountsTwice(), (x,), target="cpu")
    for _ in range(3):
        torch.testing.assert_close(fast(x), eager(x))
