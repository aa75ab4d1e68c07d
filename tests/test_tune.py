"""optimize(..., tune=True): candidate lowerings checked, timed, the fastest kept, all shown in the report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import LoweringError
from graphopt.ir.verify import compare_outputs
from graphopt.targets.cpu.lowering import CpuLowering
from graphopt.targets.cpu.target import CpuTarget
from graphopt.targets.tune import TunePlan, lower_model, tune_candidates


@dataclass(frozen=True)
class QuickCpuLowering(CpuLowering):
    """The default candidates minus Inductor (tens of seconds of compile) and onnxruntime: quick to tune."""

    def candidates(self) -> list[CpuLowering]:
        return [self, replace(self, fuse=False, layout="contiguous", prepack=False)]


def _net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    return model, torch.randn(2, 3, 16, 16)


def _section(report: graphopt.Report) -> graphopt.ReportSection:
    return next(s for s in report.sections if s.title == "tune: candidate lowerings")


class _QuickCpu(CpuTarget):
    """A cpu target whose tune tries only the quick candidates (no onnxruntime, no Inductor)."""

    def __init__(self) -> None:
        super().__init__(QuickCpuLowering())


def test_tune_times_every_candidate_and_keeps_the_fastest(monkeypatch: pytest.MonkeyPatch) -> None:
    import graphopt.targets.tune as tune

    monkeypatch.setattr(tune, "TunePlan", lambda: TunePlan(min_rounds=3, max_seconds=0.2))
    model, x = _net()
    fast = graphopt.optimize(model, (x,), target=_QuickCpu(), tune=True)
    section = _section(fast.report)
    labels = [row[0] for row in section.rows]
    assert labels == ["cpu:onednn", "cpu:aten"]
    times = {row[0]: row[1] for row in section.rows}
    assert all(t is not None and t > 0 for t in times.values())
    (chosen,) = [row for row in section.rows if row[4] == "chosen"]
    assert chosen[1] == min(times.values())  # the kept lowering is the fastest one measured
    assert section.plots and section.plots[0].marked == [labels.index(chosen[0])]
    assert any(note.startswith(f"tune: kept {chosen[0]}") for note in fast.report.notes)
    assert compare_outputs([fast(x)], [model(x)]).ok


def test_cpu_candidates_include_inductor_and_onnxruntime() -> None:
    labels = [c.label for c in tune_candidates(CpuTarget())]
    assert labels[0] == "cpu:onednn"
    assert {"cpu:aten", "cpu:onednn-channels-last", "cpu:onednn-nchw", "cpu:inductor", "cpu:onnxruntime"} <= set(labels)


def test_a_candidate_that_fails_its_check_is_never_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A candidate computing wrong outputs is reported as failed and another one is kept."""
    import graphopt.targets.cpu.lowering as cpu_lowering

    real = cpu_lowering.prepack_weights

    def broken(gm: torch.fx.GraphModule) -> int:  # packs, then corrupts what the first conv reads
        packed = real(gm)
        for node in gm.graph.nodes:
            if node.op == "get_attr" and "packed" in str(node.target):
                weight = getattr(gm, str(node.target))
                object.__setattr__(gm, str(node.target), weight.to_dense().mul(3).to_mkldnn())
                break
        return packed

    monkeypatch.setattr(cpu_lowering, "prepack_weights", broken)
    model, x = _net()
    captured = graphopt.capture(model, (x,))
    report = graphopt.Report(target="cpu")
    runner, _ = lower_model(_QuickCpu(), captured.graph_module, captured, report, tune=True,
                            plan=TunePlan(min_rounds=2, max_seconds=0.1))
    rows = {row[0]: row for row in _section(report).rows}
    assert rows["cpu:onednn"][4] == "failed" and rows["cpu:onednn"][1] is None
    assert rows["cpu:aten"][4] == "chosen"
    assert compare_outputs([runner(x)], [model(x)]).ok


@dataclass(frozen=True)
class ThreeCpuLowerings(CpuLowering):
    """Three quick candidates, to race."""

    def candidates(self) -> list[CpuLowering]:
        return [self, replace(self, fuse=False, layout="contiguous", prepack=False), replace(self, layout="contiguous")]


def _race(monkeypatch: pytest.MonkeyPatch, seconds: Callable[[str, int], float],
          plan: TunePlan) -> tuple[str, dict[str, list]]:
    """Tune ``ThreeCpuLowerings`` whose runners sleep ``seconds(label, call number)``: the kept label, the rows."""
    import time

    import graphopt.targets.tune as tune

    calls: dict[str, int] = {}

    def lower(target: CpuTarget, gm: torch.fx.GraphModule, context: object) -> object:
        label = target.label()

        def run(*args: torch.Tensor) -> object:
            calls[label] = calls.get(label, 0) + 1
            time.sleep(seconds(label, calls[label]))
            return gm(*args)
        return run

    monkeypatch.setattr(tune, "_lower", lower)
    model, x = _net()
    captured = graphopt.capture(model, (x,))
    report = graphopt.Report(target="cpu")
    _, chosen = lower_model(CpuTarget(ThreeCpuLowerings()), captured.graph_module, captured, report, tune=True,
                            plan=plan)
    return chosen.label(), {row[0]: row for row in _section(report).rows}


def test_tune_races_the_close_candidates_after_the_first_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clearly slower candidate leaves after ``min_rounds``; the two close ones get the rounds left."""
    delays = {"cpu:onednn": 0.010, "cpu:aten": 0.010, "cpu:onednn-nchw": 0.030}
    plan = TunePlan(min_rounds=3, max_seconds=0.0, gap_s=0.0, drop_margin=0.5)  # wide: sleep() jitters
    chosen, rows = _race(monkeypatch, lambda label, call: delays[label], plan)
    assert "left the race after 3 calls" in rows["cpu:onednn-nchw"][5]
    assert chosen in ("cpu:onednn", "cpu:aten") and rows[chosen][4] == "chosen"
    assert rows["cpu:onednn-nchw"][6] == 3
    for label in ("cpu:onednn", "cpu:aten"):  # still racing: three more rounds each
        assert "left the race" not in rows[label][5] and rows[label][6] == 6


def test_tune_keeps_a_candidate_still_in_the_race(monkeypatch: pytest.MonkeyPatch) -> None:
    """One that left after its first calls is never kept, even when their median beats the finalists' later one."""
    # (first three calls, later calls) in seconds: the two leaders slow down once the third has left
    delays = {"cpu:onednn": (0.010, 0.030), "cpu:aten": (0.0104, 0.030), "cpu:onednn-nchw": (0.016, 0.016)}

    def seconds(label: str, call: int) -> float:
        first, later = delays[label]
        return first if call <= 4 else later  # the first call is the check, then the warm-up

    plan = TunePlan(warmup=1, min_rounds=3, max_seconds=0.0, gap_s=0.0, drop_margin=0.3)
    chosen, rows = _race(monkeypatch, seconds, plan)
    assert "left the race after 3 calls" in rows["cpu:onednn-nchw"][5]
    assert rows["cpu:onednn-nchw"][1] < min(rows["cpu:onednn"][1], rows["cpu:aten"][1])
    assert chosen in ("cpu:onednn", "cpu:aten")


def test_no_passing_candidate_is_a_lowering_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import graphopt.targets.tune as tune

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no kernel")

    monkeypatch.setattr(tune, "_lower", fail)
    model, x = _net()
    captured = graphopt.capture(model, (x,))
    with pytest.raises(LoweringError, match=r"no candidate lowering.*no kernel"):
        lower_model(_QuickCpu(), captured.graph_module, captured, graphopt.Report(target="cpu"), tune=True)


@pytest.mark.slow
def test_tune_on_onnx_compares_fused_and_unfused_attention() -> None:
    from test_lowering_onnx import _encoder

    model, inputs = _encoder()
    fast = graphopt.optimize(model, inputs, target="onnx", tune=True)
    labels = [row[0] for row in _section(fast.report).rows]
    assert labels[:2] == ["onnx:ort-attention", "onnx:ort-opset-default"]
    assert compare_outputs([fast(*inputs)], [model(*inputs)]).ok


@pytest.mark.slow
def test_full_cpu_tune_with_inductor_and_onnxruntime() -> None:
    model, x = _net()
    fast = graphopt.optimize(model, (x,), target="cpu", tune=True)
    statuses = {row[0]: row[4] for row in _section(fast.report).rows}
    assert set(statuses.values()) <= {"ok", "chosen"} and "chosen" in statuses.values()
    assert compare_outputs([fast(x)], [model(x)]).ok
