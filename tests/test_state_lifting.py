"""Lifted state (``graphopt.ir.state``): a stateful graph as a pure function, and state that is always equal merged."""

from __future__ import annotations

import torch
from torch import nn

from graphopt.ir.capture import capture
from graphopt.ir.state import LiftedState, lift_state, merge_equal_state, state_inputs


class Counters(nn.Module):
    """Two step counters (like a decoder's per-layer cache lengths) and the input shifted by both."""

    def __init__(self, second_start: float = 0.0, second_step: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("first", torch.zeros(()))
        self.register_buffer("second", torch.full((), second_start))
        self.second_step = second_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.first.add_(1.0)
        self.second.add_(self.second_step)
        return x * self.first + x * self.second


def _lifted(module: nn.Module) -> LiftedState:
    return lift_state(capture(module, (torch.ones(3),)).graph_module)


def _run(lifted: LiftedState, steps: int) -> list[torch.Tensor]:
    """Call the lifted graph ``steps`` times, feeding the new state back; the outputs of each call."""
    state = [t.clone() for t in lifted.initial]
    outputs = []
    for step in range(steps):
        output, *state = lifted.graph_module(torch.full((3,), float(step)), *state)
        outputs.append(output)
    return outputs


def test_lifted_graph_carries_the_state_like_the_module() -> None:
    lifted = _lifted(Counters())
    eager = Counters()
    expected = [eager(torch.full((3,), float(step))) for step in range(4)]
    for got, want in zip(_run(lifted, 4), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_counters_with_one_start_and_one_update_are_merged() -> None:
    lifted = _lifted(Counters())
    before = _run(lifted, 4)
    assert merge_equal_state(lifted) == 1
    assert len(state_inputs(lifted.graph_module)) == len(lifted.initial) == len(lifted.state) == 1  # one counter left
    output = next(node for node in lifted.graph_module.graph.nodes if node.op == "output")
    assert len(output.args[0]) == lifted.num_outputs + 1
    for got, want in zip(_run(lifted, 4), before, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class ThreeCounters(nn.Module):
    """Two counters always equal, then one that steps apart: the merged one sits between the two kept."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("first", "second", "third"):
            self.register_buffer(name, torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.first.add_(1.0)
        self.second.add_(1.0)
        self.third.add_(2.0)
        return x * self.first + x * self.second - x * self.third ** 2


def test_state_after_a_merged_one_keeps_its_place() -> None:
    lifted = lift_state(capture(ThreeCounters(), (torch.ones(3),)).graph_module)
    eager = ThreeCounters()
    expected = [eager(torch.full((3,), float(step))) for step in range(4)]
    assert merge_equal_state(lifted) == 1
    assert [spec.name for spec in lifted.state] == ["first", "third"]
    assert sorted(state_inputs(lifted.graph_module).values()) == [lifted.num_outputs, lifted.num_outputs + 1]
    for got, want in zip(_run(lifted, 4), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_counters_that_start_apart_or_step_apart_stay_apart() -> None:
    for module in (Counters(second_start=1.0), Counters(second_step=2.0)):
        lifted = _lifted(module)
        before = _run(lifted, 3)
        assert merge_equal_state(lifted) == 0
        assert all(node.users for node in state_inputs(lifted.graph_module))
        for got, want in zip(_run(lifted, 3), before, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
