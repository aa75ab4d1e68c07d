"""The gpu target's lowering: cuBLASLt epilogues, SDPA backends, CUDA graphs (GPU tests skip without CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.ir import count_ops
from graphopt.targets.cpu import CpuTarget
from graphopt.targets.cpu_lowering import CpuLowering
from graphopt.targets.gpu_lowering import CublasLtEpilogue, GpuLowering
from graphopt.verify import compare_outputs

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


def test_gpu_candidates_and_labels() -> None:
    labels = [option.label() for option in GpuLowering().candidates()]
    assert labels == ["cublaslt-cudagraphs", "cublaslt", "aten-cudagraphs", "inductor"]


@pytest.mark.gpu
@needs_cuda
def test_gpu_lowering_with_cuda_graphs() -> None:
    from graphopt.targets.gpu_lowering import CUDAGraphRunner

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
