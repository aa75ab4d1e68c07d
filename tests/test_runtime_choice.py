"""The cpu target's measured runtime choice: PyTorch or OpenVINO for a large float32 graph, without ``tune``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.analysis.cost import total_flops
from graphopt.ir.verify import compare_outputs
from graphopt.targets.cpu.target import MEASURED_RUNTIME_MIN_FLOPS, CpuTarget, cpu_has_bfloat16

pytest.importorskip("openvino")

SECTION = "runtime: measured choice"


def _conv_net(side: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    return model, torch.randn(1, 3, side, side)


def _rows(report: graphopt.Report) -> dict[str, list]:
    section = next(s for s in report.sections if s.title == SECTION)
    return {row[0]: row for row in section.rows}


def test_a_large_float_graph_runs_in_the_faster_of_pytorch_and_openvino(tmp_path: Path) -> None:
    model, x = _conv_net(96)
    assert total_flops(graphopt.capture(model, (x,)).graph_module) >= MEASURED_RUNTIME_MIN_FLOPS
    fast = graphopt.optimize(model, (x,), target="cpu")
    rows = _rows(fast.report)
    assert list(rows) == ["cpu:onednn", "cpu:openvino"]
    times = {label: row[1] for label, row in rows.items()}
    assert all(t is not None and t > 0 for t in times.values())
    (chosen,) = [label for label, row in rows.items() if row[4] == "chosen"]
    assert times[chosen] == min(times.values())
    assert fast.target.label() == chosen
    assert any(note.startswith("runtime measured on the example inputs") and note.endswith(f"kept {chosen}")
               for note in fast.report.notes)
    assert compare_outputs([fast(x)], [model(x)]).ok
    loaded = graphopt.load(fast.save(tmp_path / "net.pt2"))  # measured again on the saved example inputs
    assert loaded.target.label() in rows
    assert compare_outputs([loaded(x)], [model(x)]).ok


def test_small_graphs_and_explicit_lowerings_are_not_measured() -> None:
    small, x = _conv_net(8)
    assert total_flops(graphopt.capture(small, (x,)).graph_module) < MEASURED_RUNTIME_MIN_FLOPS
    fast = graphopt.optimize(small, (x,), target="cpu")
    assert fast.target.label() == "cpu:onednn"
    assert not any(s.title == SECTION for s in fast.report.sections)
    large, y = _conv_net(96)
    named = graphopt.optimize(large, (y,), target=CpuTarget())  # a target object: its lowering as given
    assert named.target.label() == "cpu:onednn"
    assert not any(s.title == SECTION for s in named.report.sections)


class _Counter(nn.Module):
    """A large float graph that also writes state (a call counter buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.conv(x).relu().mean() + self.calls


def test_only_float32_graphs_without_state_are_measured() -> None:
    model, x = _conv_net(96)
    float32 = graphopt.capture(model, (x,)).graph_module
    assert [t.label() for t in CpuTarget().runtime_candidates(float32)] == ["cpu:onednn", "cpu:openvino"]
    bfloat16 = graphopt.capture(model.to(torch.bfloat16), (x.to(torch.bfloat16),)).graph_module
    expected = ["cpu:onednn", "cpu:openvino"] if cpu_has_bfloat16() else []  # PyTorch's kernels, OpenVINO's bf16
    assert [t.label() for t in CpuTarget().runtime_candidates(bfloat16)] == expected
    assert CpuTarget().for_graph(bfloat16).label() == "cpu:onednn"  # measured, not sent to OpenVINO by rule
    stateful = graphopt.capture(_Counter().eval(), (torch.randn(1, 3, 192, 192),)).graph_module
    assert total_flops(stateful) >= MEASURED_RUNTIME_MIN_FLOPS
    assert CpuTarget().runtime_candidates(stateful) == []


def test_a_runtime_that_cannot_lower_the_graph_is_reported_and_the_other_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import graphopt.targets.tune as tune

    real = tune._lower

    def lower(target: CpuTarget, gm: torch.fx.GraphModule, context: object) -> object:
        if target.lowering.backend == "openvino":
            raise RuntimeError("no such kernel")
        return real(target, gm, context)

    monkeypatch.setattr(tune, "_lower", lower)
    model, x = _conv_net(96)
    fast = graphopt.optimize(model, (x,), target="cpu")
    rows = _rows(fast.report)
    assert rows["cpu:openvino"][4] == "failed" and "no such kernel" in rows["cpu:openvino"][5]
    assert rows["cpu:onednn"][4] == "chosen" and fast.target.label() == "cpu:onednn"
    assert compare_outputs([fast(x)], [model(x)]).ok
