"""Instruments: hooks the pass manager calls around every pass (timing, IR dumps, your own)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TextIO

import torch.fx as fx

from graphopt.passes.base import Pass, PassResult

__all__ = ["IRDumpInstrument", "Instrument", "TimingInstrument"]


class Instrument:
    """Base instrument: override any of the hooks; each does nothing by default."""

    def before_pass(self, pass_: Pass, gm: fx.GraphModule) -> None:
        """Called just before ``pass_`` runs on ``gm``."""

    def after_pass(self, pass_: Pass, gm: fx.GraphModule, result: PassResult) -> None:
        """Called after ``pass_`` ran and its result was verified."""

    def after_pass_failed(self, pass_: Pass, gm: fx.GraphModule, error: BaseException) -> None:
        """Called when ``pass_`` raised or failed verification (``gm`` is the failed graph)."""


class TimingInstrument(Instrument):
    """Wall time of each pass run, in seconds, in pipeline order."""

    def __init__(self) -> None:
        self.seconds: list[tuple[str, float]] = []
        self._started = 0.0

    def before_pass(self, pass_: Pass, gm: fx.GraphModule) -> None:
        """Start the clock."""
        self._started = time.perf_counter()

    def _stop(self, pass_: Pass) -> None:
        self.seconds.append((pass_.name, time.perf_counter() - self._started))

    def after_pass(self, pass_: Pass, gm: fx.GraphModule, result: PassResult) -> None:
        """Record the time of a successful pass."""
        self._stop(pass_)

    def after_pass_failed(self, pass_: Pass, gm: fx.GraphModule, error: BaseException) -> None:
        """Record the time of a failed pass."""
        self._stop(pass_)

    @property
    def last(self) -> float:
        """Seconds taken by the most recent pass."""
        return self.seconds[-1][1] if self.seconds else 0.0


class IRDumpInstrument(Instrument):
    """Write the graph's Python code after every pass, to a folder (one file per pass) or a stream."""

    def __init__(self, target: str | Path | TextIO) -> None:
        self.target = target
        self._count = 0

    def _write(self, label: str, gm: fx.GraphModule) -> None:
        self._count += 1
        text = f"# after {label}\n{gm.code}"
        if isinstance(self.target, (str, Path)):
            folder = Path(self.target)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{self._count:02d}-{label}.py").write_text(text)
        else:
            self.target.write(text + "\n")

    def after_pass(self, pass_: Pass, gm: fx.GraphModule, result: PassResult) -> None:
        """Dump the graph a pass produced."""
        self._write(pass_.name, gm)

    def after_pass_failed(self, pass_: Pass, gm: fx.GraphModule, error: BaseException) -> None:
        """Dump the graph a failing pass left behind, for debugging."""
        self._write(f"{pass_.name}-FAILED", gm)
