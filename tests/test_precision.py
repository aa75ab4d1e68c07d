"""optimize(..., precision="bf16"): reduced-precision layers under a fidelity budget, fp32 elsewhere."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.errors import FidelityError, InputError
from graphopt.ir.graph import count_ops
from graphopt.passes.precision import ReducedPrecision, precision_pass


class Block(nn.Module):
    """Attention-free transformer block: LayerNorm, MLP with GELU, residual, softmax head."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.down(F.gelu(self.up(self.norm(x))))
        return torch.softmax(self.head(x), dim=-1)


def _block() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Block().eval(), torch.randn(4, 8, 64)


def _record(report: graphopt.Report) -> graphopt.PassRecord:
    return next(r for r in report.records if r.name == "reduced-precision")


def test_bf16_on_cpu_runs_layers_in_bf16_and_keeps_sensitive_ops_in_fp32() -> None:
    model, x = _block()
    # the lowering named: PyTorch's oneDNN kernels (target="cpu" alone may pick OpenVINO for a bf16 graph)
    fast = graphopt.optimize(model, (x,), target="cpu", precision="bf16", lowering=graphopt.CpuLowering())
    record = _record(fast.report)
    assert record.status == "changed" and record.stats["reduced layers"] == 3
    assert record.fidelity["budget"] == "output cosine >= 0.999"  # the default budget, not the fp32 tolerance
    assert fast.report.final_cosine is not None and fast.report.final_cosine >= 0.999
    graph = fast.graph_module.graph
    dtypes = {n.target: n.meta["val"].dtype for n in graph.nodes if n.op == "call_function" and "val" in n.meta
              and isinstance(n.meta["val"], torch.Tensor)}
    assert dtypes[torch.ops.aten.layer_norm.default] == torch.float32
    assert dtypes[torch.ops.aten._softmax.default if torch.ops.aten._softmax.default in dtypes
                  else torch.ops.aten.softmax.int] == torch.float32
    bf16_weights = [t for t in fast.graph_module.buffers() if t.dtype == torch.bfloat16]
    assert len(bf16_weights) == 6  # three weights and three biases
    lowered = count_ops(fast.runner.graph_module)
    assert lowered["mkldnn._linear_pointwise.default"] == 3  # oneDNN bf16 kernels, GELU in the epilogue
    assert "aten.gelu.default" not in lowered
    out = fast(x)
    assert out.dtype == torch.float32
    cosine = F.cosine_similarity(out.flatten(1), model(x).flatten(1)).min()
    assert cosine > 0.999
    assert not torch.equal(out, model(x))  # really reduced: not bit-identical to fp32


def test_too_tight_budget_names_the_budget_and_the_measured_value() -> None:
    model, x = _block()
    message = r"budget output cosine >= 1\b.*reaches only cosine [01]\.\d+.*SQNR"
    with pytest.raises(FidelityError, match=message) as info:
        graphopt.optimize(model, (x,), target="cpu", precision="bf16", fidelity=graphopt.Fidelity(min_cosine=1.0))
    assert "reduced-precision" in str(info.value)


def test_sensitive_layers_fall_back_to_fp32() -> None:
    model, x = _block()
    measured = graphopt.optimize(model, (x,), target="cpu", precision="bf16",
                                 fidelity=graphopt.Fidelity(min_cosine=0.5))  # loose: measures, keeps every layer
    all_applied = _record(measured.report).fidelity["cosine"]
    section = next(s for s in measured.report.sections if s.title == "reduced-precision: per unit")
    column = section.headers.index("cosine (alone)")
    best_alone = max(row[column] for row in section.rows)
    assert all_applied < best_alone
    budget = (all_applied + best_alone) / 2  # broken with every layer reduced, met by the least sensitive alone
    fast = graphopt.optimize(model, (x,), target="cpu", precision="bf16", fidelity=graphopt.Fidelity(min_cosine=budget))
    record = _record(fast.report)
    assert 1 <= record.fidelity["fallen_back"] < record.fidelity["units"]
    assert record.fidelity["cosine"] >= budget
    kept = [row for row in next(s for s in fast.report.sections if s.title == "reduced-precision: per unit").rows
            if row[section.headers.index("status")] == "kept"]
    assert len(kept) == record.stats["reduced layers"]


def test_precision_spec_errors() -> None:
    with pytest.raises(InputError, match="precision must be one of"):
        precision_pass("int3")
    with pytest.raises(InputError, match="target='cpu'"):
        precision_pass("bf16", "onnx")
    assert precision_pass("FP16") == ReducedPrecision(dtype="fp16")
    model, x = _block()
    with pytest.raises(InputError, match="onnxruntime's CPU provider"):
        graphopt.optimize(model, (x,), target="onnx", precision="bf16")


class AddmmMlp(nn.Module):
    """GPT-2's ``Conv1D`` layers: ``addmm(bias, x, weight)`` over the flattened tokens; then ``mm`` and an add."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.up_weight = nn.Parameter(torch.randn(width, 4 * width) * 0.1)
        self.up_bias = nn.Parameter(torch.randn(4 * width))
        self.down_weight = nn.Parameter(torch.randn(4 * width, width) * 0.1)
        self.down_bias = nn.Parameter(torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        hidden = F.gelu(torch.addmm(self.up_bias, flat, self.up_weight))
        return (torch.mm(hidden, self.down_weight) + self.down_bias).reshape(x.shape)


def test_addmm_and_mm_layers_in_bf16() -> None:
    """``addmm`` and ``mm`` name an argument ``self``: their layers are reduced, not the pass rolled back or skipped."""
    torch.manual_seed(0)
    model, x = AddmmMlp().eval(), torch.randn(4, 8, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphopt.RollbackWarning)  # a pass that fails is rolled back with a warning
        fast = graphopt.optimize(model, (x,), target="cpu", precision="bf16", lowering=graphopt.CpuLowering())
    record = _record(fast.report)
    assert record.status == "changed" and record.stats["reduced layers"] == 2
    out = fast(x)
    assert F.cosine_similarity(out.flatten(1), model(x).flatten(1)).min() > 0.999
    assert not torch.equal(out, model(x))


def test_conv_net_in_bf16() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 3, 16, 16)
    fast = graphopt.optimize(model, (x,), target="cpu", precision="bf16", lowering=graphopt.CpuLowering())
    lowered = count_ops(fast.runner.graph_module)
    assert lowered["mkldnn._convolution_pointwise.default"] == 2
    assert F.cosine_similarity(fast(x), model(x)).min() > 0.999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_on_gpu() -> None:
    model, x = _block()
    fast = graphopt.optimize(model, (x,), target="gpu", precision="fp16")
    assert fast.report.final_cosine >= 0.999
