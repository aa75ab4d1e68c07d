"""The gpu target's lowering: cuBLASLt epilogues, SDPA backends, CUDA graphs (GPU tests skip without CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.ir.graph import attribute_value, count_ops
from graphopt.ir.verify import compare_outputs
from graphopt.targets.base import LoweringContext
from graphopt.targets.cpu.lowering import CpuLowering
from graphopt.targets.cpu.target import CpuTarget
from graphopt.targets.gpu.lowering import (
    CublasLtEpilogue,
    CudnnConvEpilogue,
    GpuLowering,
    lower_for_gpu,
    store_conv_weights_channels_last,
)
from graphopt.targets.gpu.target import GpuTarget

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(approximate="tanh"),
                          nn.Linear(32, 4)).eval()
    return model, torch.randn(2, 5, 16)


def test_cublaslt_epilogue_rewrite_is_exact() -> None:
    """The rewrite runs anywhere (``_addmm_activation`` has a CPU kernel): relu fused, 3-D inputs flattened."""
    model, x = _mlp()
    fast = graphopt.optimize(model, (x,), target=CpuTarget(CpuLowering(fuse=False)), passes=[CublasLtEpilogue()])
    ops = count_ops(fast.graph_module)
    assert ops["aten._addmm_activation.default"] == 2  # relu and tanh-GELU
    assert ops["aten.linear.default"] == 1
    record = next(r for r in fast.report.records if r.name == "cublaslt-epilogue")
    assert record.stats == {"fused": 2}
    assert compare_outputs([fast(x)], [model(x)], tolerance_scale=10).ok


def test_cublaslt_epilogue_keeps_a_dynamic_batch() -> None:
    model, x = _mlp()
    fast = graphopt.optimize(model, (x,), target=CpuTarget(CpuLowering(fuse=False)), passes=[CublasLtEpilogue()],
                             dynamic_batch=True)
    assert count_ops(fast.graph_module)["aten._addmm_activation.default"] == 2
    bigger = torch.randn(7, 5, 16)
    assert compare_outputs([fast(bigger)], [model(bigger)], tolerance_scale=10).ok


def test_gpu_candidates_and_labels() -> None:
    labels = [option.label() for option in GpuLowering().candidates()]
    assert labels == ["cublaslt-cudnn-relu-cudagraphs", "cublaslt-cudnn-relu", "aten-cudnn-relu-cudagraphs",
                      "cublaslt-cudagraphs", "cublaslt-cudnn-relu-contiguous-cudagraphs", "inductor-cudagraphs"]


class _ResidualNet(nn.Module):
    """conv-BN-ReLU, a residual conv-BN + x -> ReLU, a conv + sigmoid and a broadcasting add: 2 fusable, 1 near miss."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.gate = nn.Conv2d(8, 8, 1)
        self.tail = nn.Conv2d(8, 8, 1)
        self.scale = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(self.branch(y) + y)
        y = torch.sigmoid(self.gate(y)) * y
        return torch.relu(self.tail(y) + self.scale)


def _folded_graph(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """``model`` captured with batch norms folded and no CPU lowering: plain aten convs."""
    plain = CpuTarget(CpuLowering(fuse=False, layout="contiguous", prepack=False))
    return graphopt.optimize(model, (x,), target=plain).graph_module


def test_cudnn_conv_epilogue_finds_conv_relu_and_residual_and_names_the_near_miss() -> None:
    torch.manual_seed(0)
    gm = _folded_graph(_ResidualNet().eval(), torch.randn(2, 3, 8, 8))
    result = CudnnConvEpilogue().run(gm)
    ops = count_ops(gm)
    assert result.stats == {"conv+bias+relu": 1, "conv+bias+add+relu": 1}
    assert ops["aten.cudnn_convolution_relu.default"] == 1
    assert ops["aten.cudnn_convolution_add_relu.default"] == 1
    assert ops["aten.conv2d.default"] == 2  # the sigmoid gate and the broadcasting tail stay
    assert result.near_misses == {"cudnn-conv-epilogue": {"residual add broadcasts": 1}}
    gm.graph.lint()


def test_cudnn_conv_epilogue_leaves_a_graph_without_conv_relu_unchanged() -> None:
    model, x = _mlp()
    gm = _folded_graph(model, x)
    before = str(gm.graph)
    assert not CudnnConvEpilogue().run(gm).changed
    assert str(gm.graph) == before


def test_conv_weights_are_stored_channels_last_once_and_outputs_stay() -> None:
    from graphopt.targets.common.channels_last import ChannelsLast

    torch.manual_seed(0)
    model, x = _ResidualNet().eval(), torch.randn(2, 3, 8, 8)
    gm = _folded_graph(model, x)
    ChannelsLast(min_conv_share=0.0).run(gm)
    gm.recompile()
    assert store_conv_weights_channels_last(gm) == 2  # the 3x3 weights; 1x1 ones are channels-last already
    weights = [attribute_value(gm, n.args[1]) for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert len(weights) == 4 and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert compare_outputs([gm(x)], [model(x)]).ok


def test_a_call_that_cannot_be_captured_runs_without_a_cuda_graph_and_says_why() -> None:
    """Without CUDA the capture itself fails: the same fallback a capture error takes on a GPU."""
    from graphopt.report import Report

    model, x = _mlp()
    gm = _folded_graph(model, x)
    report = Report(target="gpu")
    options = GpuLowering(epilogues=False, conv_epilogues=False)
    runner = lower_for_gpu(gm, LoweringContext((x,), report=report), options)
    if not torch.cuda.is_available():
        assert any("could not be captured as a CUDA graph" in note for note in report.notes)
    assert compare_outputs([runner(x)], [model(x)]).ok


@pytest.mark.gpu
@needs_cuda
def test_gpu_lowering_with_cuda_graphs() -> None:
    from graphopt.targets.gpu.lowering import CUDAGraphRunner

    model, x = _mlp()
    fast = graphopt.optimize(model, (x,), target="gpu")
    assert isinstance(fast.runner, CUDAGraphRunner)
    assert compare_outputs([fast(x).cpu()], [model(x)], tolerance_scale=10).ok
    other = torch.randn(2, 5, 16)
    assert compare_outputs([fast(other).cpu()], [model(other)], tolerance_scale=10).ok


@pytest.mark.gpu
@needs_cuda
def test_gpu_dynamic_batch_runs_without_cuda_graphs() -> None:
    model, x = _mlp()
    fast = graphopt.optimize(model, (x,), target="gpu", dynamic_batch=True)
    bigger = torch.randn(7, 5, 16)
    assert compare_outputs([fast(bigger).cpu()], [model(bigger)], tolerance_scale=10).ok


@pytest.mark.gpu
@needs_cuda
def test_gpu_tune() -> None:
    model, x = _mlp()
    fast = graphopt.optimize(model, (x,), target="gpu", tune=True)
    section = next(s for s in fast.report.sections if s.title == "tune: candidate lowerings")
    assert sum(row[4] == "chosen" for row in section.rows) == 1


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("lowering",
                         [GpuLowering(), GpuLowering(conv_epilogues=False), GpuLowering(backend="inductor")],
                         ids=lambda option: option.label())
def test_gpu_conv_net_runs_channels_last_with_each_lowering(lowering: GpuLowering, monkeypatch) -> None:
    from graphopt.targets.gpu.lowering import CUDAGraphRunner

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full fp32: compare to the CPU tightly

    torch.manual_seed(0)
    model, x = _ResidualNet().eval(), torch.randn(4, 3, 16, 16)
    fast = graphopt.optimize(model, (x,), target=GpuTarget(lowering=lowering))
    assert isinstance(fast.runner, CUDAGraphRunner)
    assert compare_outputs([fast(x).cpu()], [model(x)], tolerance_scale=10).ok
    section = next(s for s in fast.report.sections if s.title.startswith("gpu lowering"))
    names = [row[0] for row in section.rows]
    assert "channels-last" in names
    if lowering.conv_epilogues and lowering.backend == "graph":
        ops = count_ops(fast.runner.fn)
        assert ops["aten.cudnn_convolution_relu.default"] == 1
        assert ops["aten.cudnn_convolution_add_relu.default"] == 1
