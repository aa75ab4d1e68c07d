"""Every rewrite a target makes is a Pass, verified against the graph before it, rolled back and reported when wrong."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, is_dataclass

import pytest
import torch
import torch.nn as nn
from quantize_models import ResidualConvNet

import graphopt
from graphopt.errors import RollbackWarning, VerificationError
from graphopt.ir.graph import count_ops, register_constant, snapshot_graph_module
from graphopt.passes.base import Pass, PassResult
from graphopt.passes.lossy.base import output_cosine, output_sqnr_db
from graphopt.passes.quantize.patterns import has_quantized_ops
from graphopt.targets import CpuLowering, GpuLowering, LoweringContext, OnnxLowering
from graphopt.targets.common.lowering import KernelSubstitution, LoweringCheck, kernel_comparison, run_lowering
from graphopt.targets.cpu.quantized import INT8_LOWERING, OnednnInt8Kernels
from graphopt.targets.cpu.target import CpuTarget
from graphopt.targets.gpu.quantized import INT8_LOWERING as GPU_INT8_LOWERING
from graphopt.targets.gpu.target import GpuTarget
from graphopt.targets.onnx.target import OnnxTarget

ONEDNN_KERNELS = (torch.ops.onednn.qconv_pointwise.default, torch.ops.onednn.qlinear_pointwise.default)


@dataclass(frozen=True)
class WrongScaleInt8Kernels(KernelSubstitution):
    """oneDNN's int8 conv / linear kernels put in place, each reading its weight scales doubled: a wrong kernel."""

    name = "wrong-scale-int8-kernels"

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        result = OnednnInt8Kernels().run(gm)
        for node in list(gm.graph.nodes):
            if node.target in ONEDNN_KERNELS:
                scales = node.args[4]
                doubled = getattr(gm, str(scales.target)) * 2
                node.update_arg(4, register_constant(gm, f"{scales.target}_doubled", doubled, before=node))
        return result


class WrongScaleCpu(CpuTarget):
    """The cpu target with the wrong kernel substitution just before the right one."""

    def lowering_passes(self, gm: torch.fx.GraphModule) -> list[Pass]:
        passes = super().lowering_passes(gm)
        if not has_quantized_ops(gm):
            return passes
        index = next(i for i, p in enumerate(passes) if isinstance(p, OnednnInt8Kernels))
        return [*passes[:index], WrongScaleInt8Kernels(), *passes[index:]]


def _int8(target: CpuTarget, on_error: str) -> tuple[nn.Module, torch.Tensor, graphopt.OptimizedModel]:
    torch.manual_seed(0)
    model, x = ResidualConvNet().eval(), torch.randn(4, 3, 16, 16)
    fast = graphopt.optimize(model, (x,), target=target, quantize="int8", calibration=[(torch.randn(4, 3, 16, 16),)],
                             on_error=on_error)
    return model, x, fast


def test_a_wrong_int8_kernel_is_caught_rolled_back_and_reported() -> None:
    with pytest.warns(RollbackWarning, match="wrong-scale-int8-kernels"):
        model, x, fast = _int8(WrongScaleCpu(), "rollback")
    section = next(s for s in fast.report.sections if s.title == "cpu lowering: quantized kernels")
    rows = {row[0]: row for row in section.rows}
    assert rows["wrong-scale-int8-kernels"][1] == "rolled back"
    assert rows["onednn-int8-kernels"][1] == "changed"  # the right kernels took the layers after the rollback
    (note,) = [n for n in fast.report.notes if "wrong-scale-int8-kernels" in n]
    assert "rolled back" in note and "SQNR" in note  # the kernel check said why
    ops = count_ops(fast.runner)
    assert ops["onednn.qconv_pointwise.default"] == 3 and ops["onednn.qlinear_pointwise.default"] == 1
    with torch.no_grad():
        lowered, reference = fast(x), fast.graph_module(x)
        assert output_sqnr_db([reference], [lowered]) > 30  # the int8 kernels compute the QDQ graph
        assert output_cosine([model(x)], [lowered]) > 0.99  # and the optimized model is still right vs eager
        broken = snapshot_graph_module(fast.graph_module)  # what the rollback undid would have been far off
        WrongScaleInt8Kernels().run(broken)
        broken.recompile()
        assert output_sqnr_db([reference], [broken(x)]) < 10


def test_a_wrong_int8_kernel_raises_naming_the_pass_in_strict_mode() -> None:
    with pytest.raises(VerificationError, match="wrong-scale-int8-kernels"):
        _int8(WrongScaleCpu(), "raise")


def test_the_kernel_check_takes_rounding_noise_and_refuses_a_wrong_scale() -> None:
    torch.manual_seed(0)
    reference = torch.randn(8, 32)
    noisy = reference + 0.01 * torch.randn(8, 32)  # an int8 kernel rounding differently: SQNR ~40 dB
    assert kernel_comparison([noisy], [reference], 0.99).ok
    scaled = reference * 1.5  # a wrong scale: the cosine stays 1, the SQNR is 6 dB
    assert output_cosine([reference], [scaled]) > 0.9999
    comparison = kernel_comparison([scaled], [reference], 0.99)
    assert not comparison.ok and "SQNR" in comparison.detail
    assert not kernel_comparison([reference[:4]], [reference], 0.99).ok  # another shape
    check = LoweringCheck(tolerance_scale=1.0, min_cosine=0.99)
    assert not check(OnednnInt8Kernels(), [scaled], [reference]).ok
    assert not check(ExactPass(), [noisy], [reference]).ok  # exact passes keep the exact tolerance


@dataclass(frozen=True)
class ExactPass(Pass):
    name = "exact-pass"

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        return PassResult(False)


def test_run_lowering_returns_records_with_counts_and_near_misses() -> None:
    torch.manual_seed(0)
    model, x = ResidualConvNet().eval(), torch.randn(4, 3, 16, 16)
    fast = graphopt.optimize(model, (x,), target="cpu", quantize="int8", calibration=[(torch.randn(4, 3, 16, 16),)])
    result = run_lowering(snapshot_graph_module(fast.graph_module), GPU_INT8_LOWERING,
                          LoweringContext((x,), on_error="raise"))
    assert [r.name for r in result.records] == [p.name for p in GPU_INT8_LOWERING]
    assert result.stats["conv_float_on_gpu"] == 4
    (reason,) = result.near_misses["int8-gemm"]
    assert "N=10" in reason


def _float_graph() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()
    return graphopt.capture(model, (torch.randn(2, 3, 8, 8),)).graph_module


@pytest.mark.parametrize("target", [CpuTarget(), CpuTarget(CpuLowering(layout="channels_last")), GpuTarget(),
                                    OnnxTarget()], ids=["cpu", "cpu-nhwc", "gpu", "onnx"])
def test_every_lowering_pass_is_a_frozen_pass_with_a_kebab_case_name(target: object) -> None:
    passes = [*target.lowering_passes(_float_graph()), *INT8_LOWERING, *GPU_INT8_LOWERING]
    for pass_ in passes:
        assert isinstance(pass_, Pass) and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", pass_.name), pass_
        assert is_dataclass(pass_) and type(pass_).__dataclass_params__.frozen  # options are fields, set once
        assert all(f.name != "name" for f in fields(pass_))


def test_targets_declare_their_candidates_and_labels() -> None:
    cpu = CpuTarget(CpuLowering(layout="channels_last")).candidates()
    assert cpu[0].label() == "cpu:onednn-channels-last" and {t.label() for t in cpu} >= {"cpu:aten", "cpu:inductor"}
    assert [t.label() for t in GpuTarget().candidates()] == [f"gpu:{o.label()}" for o in GpuLowering().candidates()]
    onnx = OnnxTarget().candidates()
    assert [t.lowering for t in onnx] == OnnxLowering().candidates()
    assert all(isinstance(t, OnnxTarget) for t in onnx)
