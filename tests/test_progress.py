"""``graphopt.report.progress``: the start and end lines, also for a loop that stops early."""

from __future__ import annotations

import io

import pytest

from graphopt.report.progress import progress


@pytest.fixture(autouse=True)
def summary_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAPHOPT_PROGRESS", raising=False)  # a StringIO is no terminal: start and end lines only


def test_a_whole_loop_prints_its_start_and_end() -> None:
    stream = io.StringIO()
    assert list(progress(range(3), "counting", stream=stream)) == [0, 1, 2]
    lines = stream.getvalue().splitlines()
    assert lines[0] == "graphopt: counting (3 steps)..." and lines[1].startswith("graphopt: counting done: 3 steps")


def test_a_loop_that_stops_early_still_ends_its_line() -> None:
    stream = io.StringIO()
    for item in progress(iter(range(10)), "searching", stream=stream):
        if item == 2:
            break
    lines = stream.getvalue().splitlines()
    assert lines[0] == "graphopt: searching (? steps)..."
    assert lines[1].startswith("graphopt: searching done: 3 steps")
