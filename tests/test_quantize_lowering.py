"""Lowering of quantized graphs: real int8 kernels on ``cpu``, int8 QDQ ONNX that onnxruntime runs with int8 kernels."""

from __future__ import annotations

import collections
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from quantize_models import ResidualConvNet

import graphopt
from graphopt.ir.graph import count_ops, snapshot_graph_module
from graphopt.passes import Quantize
from graphopt.passes.lossy.base import CalibrationData, output_cosine
from graphopt.passes.quantize.patterns import has_quantized_ops
from graphopt.targets.base import LoweringContext
from graphopt.targets.common.lowering import LoweringResult, run_lowering
from graphopt.targets.cpu.quantized import INT8_LOWERING, dynamic_int8_linear
from graphopt.targets.onnx.target import export_graph_to_onnx

FLOAT_COMPUTE = {"aten.conv2d.default", "aten.linear.default", "aten.addmm.default", "aten.matmul.default"}


class MLP(nn.Module):
    def __init__(self, width: int = 512) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.GELU(),
                                    nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _quantized_graph(model: nn.Module, x: torch.Tensor, **options) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    captured = graphopt.capture(model, (x,))
    gm = captured.graph_module
    plan = Quantize(**options).plan(gm, CalibrationData(example=captured.flat_inputs, batches=[(x,)]))
    quantized = snapshot_graph_module(gm)
    plan.apply(quantized)
    return gm, quantized


def lower_quantized_for_cpu(quantized: torch.fx.GraphModule, x: torch.Tensor) -> LoweringResult:
    """The cpu target's int8 lowering of a copy of ``quantized``, every pass verified on ``x``."""
    return run_lowering(snapshot_graph_module(quantized), INT8_LOWERING, LoweringContext((x,), on_error="raise"))


def _ort_optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> collections.Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def test_cpu_lowering_runs_static_conv_and_linear_as_onednn_int8_kernels() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    _, quantized = _quantized_graph(ResidualConvNet().eval(), x)
    result = lower_quantized_for_cpu(quantized, x)
    lowered, counts = result.graph_module, result.stats
    assert counts["qconv"] == 3 and counts["qconv_add"] == 1 and counts["qlinear"] == 1
    ops = count_ops(lowered)
    assert ops["onednn.qconv_pointwise.default"] == 3 and ops["onednn.qlinear_pointwise.default"] == 1
    assert ops["onednn.qconv2d_pointwise.binary"] == 1  # conv_b + the residual add: one kernel
    assert ops["quantized.max_pool2d.default"] == 1  # max pooling runs on the uint8 codes
    assert not FLOAT_COMPUTE & set(ops)  # no float convolution or GEMM is left
    assert not any(name.startswith("quantized_decomposed") for name in ops)  # no fake quantization either
    qconvs = [n for n in lowered.graph.nodes if n.target in (torch.ops.onednn.qconv_pointwise.default,
                                                            torch.ops.onednn.qconv2d_pointwise.binary)]
    activations = {n.args[0].meta["val"].dtype for n in qconvs}
    assert activations == {torch.uint8}  # int8 tensors flow into the kernels
    with torch.no_grad():
        assert output_cosine([quantized(x)], [lowered(x)]) > 0.9999  # the lowered kernels compute the reference


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_cpu_lowering_fuses_gelu_into_static_int8_linears(approximate: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(approximate=approximate),
                          nn.Linear(256, 64), nn.GELU(approximate=approximate)).eval()
    x = torch.randn(32, 64)
    _, quantized = _quantized_graph(model, x)
    lowered = lower_quantized_for_cpu(quantized, x).graph_module
    ops = count_ops(lowered)
    assert ops["onednn.qlinear_pointwise.default"] == 2 and "aten.gelu.default" not in ops
    kernels = [n for n in lowered.graph.nodes if n.target == torch.ops.onednn.qlinear_pointwise.default]
    assert [(n.args[10], n.args[12]) for n in kernels] == [("gelu", approximate)] * 2
    assert kernels[0].meta["val"].dtype == torch.uint8  # GELU's output requantized inside the kernel, for the next
    assert kernels[1].meta["val"].dtype == torch.float32  # the last GELU's output is the model's: float
    with torch.no_grad():
        assert output_cosine([quantized(x)], [lowered(x)]) > 0.9999


class PostNormBlock(nn.Module):
    """BERT's output sublayer: ``LayerNorm(h + dense(h))``, then a second projection reading the norm."""

    def __init__(self) -> None:
        super().__init__()
        self.dense, self.norm, self.head = nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 64)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h + self.dense(h)))


def test_cpu_lowering_adds_the_residual_in_the_int8_linears_epilogue() -> None:
    torch.manual_seed(0)
    model, x = PostNormBlock().eval(), torch.randn(4, 16, 64)
    _, quantized = _quantized_graph(model, x)
    result = lower_quantized_for_cpu(quantized, x)
    lowered = result.graph_module
    ops = count_ops(lowered)
    assert result.stats["int8_linear_residual"] == 1 and ops["onednn.qlinear_pointwise.binary"] == 1
    (fused,) = [n for n in lowered.graph.nodes if n.target == torch.ops.onednn.qlinear_pointwise.binary]
    assert fused.args[6].op == "placeholder"  # the residual is h itself, in float
    assert "aten.add.Tensor" not in ops
    without = run_lowering(snapshot_graph_module(quantized), [p for p in INT8_LOWERING
                                                                 if p.name != "onednn-linear-residual"],
                           LoweringContext((x,), on_error="raise")).graph_module
    with torch.no_grad():
        assert torch.equal(lowered(x), without(x))  # the same float32 operations, in the GEMM's epilogue


class ResidualBlocks(nn.Module):
    """Two ResNet basic blocks; with ``reuse`` the block input is read again after the residual add."""

    def __init__(self, reuse: bool) -> None:
        super().__init__()
        self.reuse = reuse
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        for first in (0, 2):
            block_input = x
            x = torch.relu(self.convs[first + 1](torch.relu(self.convs[first](x))) + block_input)
            if self.reuse:
                x = x * 0.5 + block_input  # the block input is read after the add that accumulates into it
        return x


@pytest.mark.parametrize("reuse", [False, True])
def test_cpu_lowering_fuses_the_residual_add_into_the_int8_conv(reuse: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12)
    _, quantized = _quantized_graph(ResidualBlocks(reuse).eval(), x)
    result = lower_quantized_for_cpu(quantized, x)
    lowered = result.graph_module
    assert result.stats["qconv_add"] == 2
    ops = count_ops(lowered)
    assert ops["onednn.qconv2d_pointwise.binary"] == 2
    # the kernel overwrites its accumulator: in place when nothing reads it later, on a copy otherwise
    assert ops.get("aten.clone.default", 0) == (2 if reuse else 0)
    with torch.no_grad():
        expected = quantized(x)
        for _ in range(2):  # a second call sees the same inputs: nothing was overwritten that is read again
            assert output_cosine([expected], [lowered(x)]) > 0.9999


def test_cpu_lowering_runs_dynamic_linear_as_onednn_int8_with_fused_activations() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 64)
    gm, quantized = _quantized_graph(MLP().eval(), x, scheme="int8-dynamic")
    assert has_quantized_ops(quantized) and not has_quantized_ops(gm)
    result = lower_quantized_for_cpu(quantized, x)
    lowered = result.graph_module
    assert result.stats["dynamic_linear"] == 4
    kernels = [n for n in lowered.graph.nodes if n.target is dynamic_int8_linear]
    assert len(kernels) == 4 and not FLOAT_COMPUTE & set(count_ops(lowered))
    # ReLU, GELU, ReLU after the first three linears run in the int8 GEMM's epilogue
    assert [n.args[5] for n in kernels] == ["relu", "gelu", "relu", "none"]
    assert not {"aten.relu.default", "aten.gelu.default"} & set(count_ops(lowered))
    with torch.no_grad():
        assert output_cosine([gm(x)], [lowered(x)]) > 0.999


class ResidualFeedForward(torch.nn.Module):
    """Two transformer FFN blocks: ``x + down(gelu(up(x)))``, the second block's residual read twice."""

    def __init__(self) -> None:
        super().__init__()
        self.up1, self.down1 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)
        self.up2, self.down2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.down1(torch.nn.functional.gelu(self.up1(x)))
        y = self.down2(torch.nn.functional.gelu(self.up2(x))) + x
        return y * x  # the residual x is read again after the add


def test_cpu_lowering_fuses_residual_adds_into_dynamic_int8_linears() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6, 32)
    gm, quantized = _quantized_graph(ResidualFeedForward().eval(), x, scheme="int8-dynamic")
    lowered = lower_quantized_for_cpu(quantized, x).graph_module
    kernels = [n for n in lowered.graph.nodes if n.target is dynamic_int8_linear]
    assert len(kernels) == 4
    # the down projections take their residual (either operand order); the up projections their GELU
    assert [n.args[5] for n in kernels] == ["gelu", "none", "gelu", "none"]
    assert [n.args[7] is not None for n in kernels] == [False, True, False, True]
    assert "aten.add.Tensor" not in count_ops(lowered)
    with torch.no_grad():
        for _ in range(2):  # the residual is not overwritten: the second call sees the same values
            assert output_cosine([gm(x)], [lowered(x)]) > 0.999


def test_static_quantize_nodes_left_become_uint8_codes_read_in_place() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6, 32)
    # the first block's add hands int8 on to the second block: its quantize nodes stay in the lowered graph
    _, quantized = _quantized_graph(ResidualFeedForward().eval(), x, scheme="int8")
    lowered = lower_quantized_for_cpu(quantized, x).graph_module
    ops = count_ops(lowered)
    assert ops["graphopt_cpu.quantize_uint8.default"] >= 2
    assert "aten.int_repr.default" not in ops and not any(name.startswith("quantized_decomposed") for name in ops)
    with torch.no_grad():
        assert output_cosine([quantized(x)], [lowered(x)]) > 0.9999
    values = torch.randn(3, 5) * 4
    codes = torch.ops.graphopt_cpu.quantize_uint8(values, 0.05, 128)
    assert codes.dtype == torch.uint8 and not codes.is_quantized
    expected = torch.clamp(torch.round(values / 0.05) + 128, 0, 255).to(torch.uint8)
    assert torch.equal(codes.clone(), expected)  # a plain uint8 tensor: copies, views and maths work


def test_optimize_cpu_runs_the_int8_graph_and_keeps_the_portable_one() -> None:
    torch.manual_seed(0)
    model, x = ResidualConvNet().eval(), torch.randn(4, 3, 16, 16)
    # PyTorch's int8 kernels named: by name alone, OpenVINO would run a conv net where it is installed
    fast = graphopt.optimize(model, (x,), target="cpu", quantize="int8", calibration=[(torch.randn(4, 3, 16, 16),)],
                             lowering=graphopt.CpuLowering())
    assert has_quantized_ops(fast.graph_module)  # the QDQ graph (exportable, savable) is kept
    ops = count_ops(fast.runner)
    assert ops["onednn.qconv_pointwise.default"] + ops["onednn.qconv2d_pointwise.binary"] == 4
    assert not FLOAT_COMPUTE & set(ops)
    with torch.no_grad():
        assert output_cosine([model(x)], [fast(x)]) > 0.99


def test_onnx_static_int8_runs_qlinear_kernels_in_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    _gm, quantized = _quantized_graph(ResidualConvNet().eval(), x)
    model = export_graph_to_onnx(quantized, (x,), {})
    exported = collections.Counter(n.op_type for n in model.graph.node)
    # 10 quantized activations (the classifier's output stays float: no int8 op reads it), 4 conv weights
    assert exported["QuantizeLinear"] == 10 and exported["DequantizeLinear"] >= 10 + 3
    assert exported["MatMulIntegerToFloat"] == 1  # the classifier: int8 product, float out
    matrices = [i for i in model.graph.initializer if len(i.dims) >= 2]
    assert len(matrices) == 5 and all(i.data_type == onnx.TensorProto.INT8 for i in matrices)
    optimized = _ort_optimized_ops(model, tmp_path)
    assert optimized["QLinearConv"] == 4 and optimized["MatMulIntegerToFloat"] == 1
    assert optimized["QLinearAdd"] == 1 and optimized["QLinearConcat"] == 1
    assert not {"Conv", "Gemm", "MatMul"} & set(optimized)  # every conv / GEMM runs int8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        assert output_cosine([quantized(x)], [out]) > 0.999


def test_onnx_int8_files_carry_int8_weights_at_a_quarter_of_the_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = MLP(width=512).eval(), torch.randn(8, 64)
    fp32 = graphopt.optimize(model, (x,), target="onnx")
    for scheme in ("int8", "int8-dynamic"):
        int8 = graphopt.optimize(model, (x,), target="onnx", quantize=scheme, calibration=[(torch.randn(8, 64),)])
        paths = [int8.export_onnx(tmp_path / f"{scheme}.onnx"), fp32.export_onnx(tmp_path / "fp32.onnx")]
        ratio = paths[0].stat().st_size / paths[1].stat().st_size
        assert ratio <= 0.27, (scheme, ratio)
        written = onnx.load(str(paths[0]))
        matrices = [i for i in written.graph.initializer if len(i.dims) >= 2]
        assert len(matrices) == 4 and all(i.data_type == onnx.TensorProto.INT8 for i in matrices)
        optimized = _ort_optimized_ops(written, tmp_path)
        if scheme == "int8":  # int8 out where the next layer reads it (through ReLU); float before GELU and at the end
            assert optimized["QGemm"] + optimized["QLinearMatMul"] == 2 and optimized["MatMulIntegerToFloat"] == 2
        else:
            assert optimized["DynamicQuantizeMatMul"] + optimized["MatMulIntegerToFloat"] == 4
        assert not {"Gemm", "MatMul", "FusedMatMul"} & set(optimized)
        with torch.no_grad():
            assert output_cosine([model(x)], [int8(x)]) > 0.99
