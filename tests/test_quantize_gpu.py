"""The gpu lowering of quantized graphs (``lower_gpu``): int8 GEMMs through ``torch._int_mm``.

``_int_mm`` also runs on CPU, so the lowered graphs are built and run here; the tests at the end
run ``optimize(target="gpu")`` and skip without CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from quantize_models import ResidualConvNet

import graphopt
from graphopt.ir.graph import count_ops, snapshot_graph_module
from graphopt.passes import Quantize
from graphopt.passes.lossy.base import CalibrationData, output_cosine
from graphopt.passes.quantize.weight_only import WeightOnlyQuantize
from graphopt.targets.base import LoweringContext
from graphopt.targets.common.lowering import LoweringResult, run_lowering
from graphopt.targets.gpu.quantized import INT8_LOWERING, describe_lowering, int_mm_any_rows

FLOAT_GEMMS = {"aten.linear.default", "aten.addmm.default", "aten.matmul.default", "aten.mm.default"}


class MLP(nn.Module):
    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.GELU(),
                                    nn.Linear(width, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Block(nn.Module):
    """A pre-norm transformer block: attention (separate q/k/v projections, SDPA) and a GELU FFN."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        h = self.norm1(x)
        split = lambda t: t.view(batch, seq, self.heads, dim // self.heads).transpose(1, 2)  # noqa: E731
        attention = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        x = x + self.out(attention.transpose(1, 2).reshape(batch, seq, dim))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


def _graphs(model: nn.Module, x: torch.Tensor, pass_: object) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """(float graph, quantized QDQ graph) of ``model``."""
    captured = graphopt.capture(model, (x,))
    gm = captured.graph_module
    calibration = [(x,), (x * 1.1,), (x.flip(0) * 0.9,)]
    plan = pass_.plan(gm, CalibrationData(example=captured.flat_inputs, batches=calibration))
    quantized = snapshot_graph_module(gm)
    plan.apply(quantized)
    return gm, quantized


def _lowered(quantized: torch.fx.GraphModule, x: torch.Tensor) -> tuple[torch.fx.GraphModule, LoweringResult]:
    """The gpu target's int8 lowering of a copy of ``quantized``, every pass verified on ``x``."""
    result = run_lowering(snapshot_graph_module(quantized), INT8_LOWERING, LoweringContext((x,), on_error="raise"))
    return result.graph_module, result


def _fake_quant_ops(ops: dict[str, int]) -> list[str]:
    return [name for name in ops if name.startswith("quantized_decomposed")]


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8"])
@pytest.mark.parametrize("rows", [32, 4])
def test_mlp_runs_every_linear_as_an_int8_gemm(scheme: str, rows: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(rows, 64)
    gm, quantized = _graphs(MLP().eval(), x, Quantize(scheme=scheme))
    lowered, result = _lowered(quantized, x)
    counts = result.stats
    ops = count_ops(lowered)
    assert ops["aten._int_mm.default"] == 3
    assert counts["int8_gemm_dynamic" if scheme == "int8-dynamic" else "int8_gemm_static"] == 3
    assert not FLOAT_GEMMS & set(ops) and not _fake_quant_ops(ops)
    int_mms = [n for n in lowered.graph.nodes if n.target == torch.ops.aten._int_mm.default]
    int_mm_inputs = [n.args[0].meta["val"].dtype for n in int_mms]
    assert int_mm_inputs == [torch.int8] * 3
    if rows <= 16:  # cuBLASLt needs more than 16 rows: padded at run time, sliced back
        assert counts["int8_gemm_padded_rows"] == 3 and ops["aten.constant_pad_nd.default"] == 3
    else:
        assert "aten.constant_pad_nd.default" not in ops
    with torch.no_grad():
        out, reference, exact = lowered(x), quantized(x), gm(x)
    assert out.shape == reference.shape
    assert output_cosine([reference], [out]) > 0.999
    assert output_cosine([exact], [out]) > 0.999


def test_static_int8_gemm_matches_the_calibrated_reference_exactly() -> None:
    """The zero-point correction folded into the bias: same values as the QDQ linear, no re-quantization."""
    torch.manual_seed(0)
    model = nn.Linear(64, 32).eval()
    x = torch.rand(24, 64) * 3 - 0.2  # skewed: the uint8 zero point is far from 128
    _, quantized = _graphs(model, x, Quantize(scheme="int8"))
    qd = torch.ops.quantized_decomposed
    quantize = next(n for n in quantized.graph.nodes if n.target == qd.quantize_per_tensor.default)
    scale, zero_point = float(quantize.args[1]), int(quantize.args[2])
    assert abs(zero_point - 128) > 20
    weight_node = next(n for n in quantized.graph.nodes if n.target == qd.dequantize_per_channel.default)
    weight = weight_node.target(*(getattr(quantized, a.target) if isinstance(a, torch.fx.Node) else a
                                  for a in weight_node.args))
    lowered, result = _lowered(quantized, x)
    counts = result.stats
    assert counts["int8_gemm_static"] == 1
    with torch.no_grad():  # the QDQ reference of the linear itself, before its output is quantized
        codes = qd.quantize_per_tensor(x, scale, zero_point, 0, 255, torch.uint8)
        expected = F.linear(qd.dequantize_per_tensor(codes, scale, zero_point, 0, 255, torch.uint8), weight,
                            model.bias)
        difference = (lowered(x) - expected).abs().max().item()
    assert difference < 1e-4  # float rounding only


def test_transformer_block_int8_dynamic_runs_all_six_projections_int8() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 64)
    gm, quantized = _graphs(Block().eval(), x, Quantize(scheme="int8-dynamic"))
    lowered, result = _lowered(quantized, x)
    counts = result.stats
    ops = count_ops(lowered)
    assert counts["int8_gemm_dynamic"] == 6 and ops["aten._int_mm.default"] == 6
    assert ops["aten.amax.default"] == 4  # q, k and v read the same activation: quantized once for the three
    assert not FLOAT_GEMMS & set(ops) and not _fake_quant_ops(ops)
    with torch.no_grad():
        out = lowered(x)
        assert output_cosine([quantized(x)], [out]) > 0.999 and output_cosine([gm(x)], [out]) > 0.999


def test_conv_net_convs_float_on_gpu_and_an_unaligned_linear_is_a_near_miss() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    gm, quantized = _graphs(ResidualConvNet().eval(), x, Quantize(scheme="int8"))
    lowered, result = _lowered(quantized, x)
    counts = result.stats
    ops = count_ops(lowered)
    assert counts["conv_float_on_gpu"] == 4 and ops["aten.conv2d.default"] == 4
    # the head is Linear(32, 10): N=10 is no multiple of 8, so no _int_mm; float, weight dequantized once
    assert result.near_misses["int8-gemm"]["int8 GEMM: N=10 not a multiple of 8 (cuBLASLt int8), float matmul"] == 1
    assert "aten._int_mm.default" not in ops and ops["aten.linear.default"] == 1
    assert not _fake_quant_ops(ops)  # no quantize + dequantize left computing for nothing
    assert all(t.dtype != torch.int8 for t in lowered.state_dict().values())  # every weight dequantized once
    note = describe_lowering(result)
    assert "4 conv: float on gpu (no int8 conv kernel in PyTorch CUDA)" in note and "N=10" in note
    with torch.no_grad():
        out = lowered(x)
        assert output_cosine([quantized(x)], [out]) > 0.999 and output_cosine([gm(x)], [out]) > 0.999


def test_int_mm_any_rows_pads_short_inputs() -> None:
    torch.manual_seed(0)
    b = torch.randint(-127, 128, (32, 24), dtype=torch.int8)
    for rows in (1, 16, 17, 40):
        a = torch.randint(-127, 128, (rows, 32), dtype=torch.int8)
        assert torch.equal(int_mm_any_rows(a, b), a.int() @ b.int())


def test_weight_only_int8_uses_the_int8pack_kernel_and_int4_falls_back_here() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    model = MLP().eval()
    _, int8 = _graphs(model, x, WeightOnlyQuantize(bits=8))
    lowered, result = _lowered(int8, x)
    counts = result.stats
    ops = count_ops(lowered)
    assert counts["int8_weight_kernels"] == 3 and ops["aten._weight_int8pack_mm.default"] == 3
    with torch.no_grad():
        assert output_cosine([int8(x)], [lowered(x)]) > 0.9999
    _, int4 = _graphs(model, x, WeightOnlyQuantize(bits=4, group_size=32))
    lowered, result = _lowered(int4, x)
    counts = result.stats
    if not torch.cuda.is_available():  # tinygemm is CUDA-only: checked at lowering, float weight instead
        reasons = result.near_misses["gpu-weight-only-kernels"]
        near = [reason for reason in reasons if reason.startswith("int4: tinygemm unavailable here")]
        assert near and reasons[near[0]] == counts["weights_dequantized_once"] > 0
    with torch.no_grad():
        assert output_cosine([int4(x)], [lowered(x)]) > 0.9999


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("model_and_input", ["mlp", "block"])
def test_optimize_gpu_int8_dynamic_runs_int_mm_on_cuda(model_and_input: str) -> None:
    torch.manual_seed(0)
    model, x = (MLP(), torch.randn(64, 64)) if model_and_input == "mlp" else (Block(), torch.randn(4, 32, 64))
    model.eval()
    fast = graphopt.optimize(model, (x,), target="gpu", quantize="int8-dynamic")
    lowered = [m for m in (getattr(fast.runner, "fn", None), fast.runner) if isinstance(m, torch.fx.GraphModule)]
    assert any("gpu lowering: int8 kernels:" in note for note in fast.report.notes)
    if lowered:
        ops = count_ops(lowered[0])
        assert ops["aten._int_mm.default"] >= 3 and not _fake_quant_ops(ops)
    with torch.no_grad():
        assert output_cosine([model(x)], [fast(x).cpu()]) > 0.99
