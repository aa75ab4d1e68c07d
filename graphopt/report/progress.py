"""Progress of long work (calibration, sensitivity analysis, distillation, benchmarks) on stderr.

``progress(iterable, desc="calibrating", total=n)`` yields the items and draws one line that it
rewrites in place on a terminal; when stderr is not a terminal it prints a line at the start
and at the end only, so logs stay short. ``GRAPHOPT_PROGRESS=0`` silences it, ``=1`` forces
the in-place line even when stderr is not a terminal.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

__all__ = ["progress"]

T = TypeVar("T")


def _mode(stream: TextIO) -> str:
    setting = os.environ.get("GRAPHOPT_PROGRESS", "")
    if setting == "0":
        return "off"
    if setting == "1":
        return "live"
    return "live" if getattr(stream, "isatty", lambda: False)() else "summary"


def _bar(done: int, total: int | None, width: int = 24) -> str:
    if not total:
        return f"{done}"
    filled = round(width * min(done, total) / total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def progress(items: Iterable[T], desc: str, total: int | None = None, stream: TextIO | None = None) -> Iterator[T]:
    """Yield ``items`` while showing ``desc``, a bar (when ``total`` is known) and the elapsed time.

    A loop that stops early (``break`` once it found what it looked for) still ends the line, counting
    the item it stopped on.
    """
    stream = stream if stream is not None else sys.stderr
    mode = _mode(stream)
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    started = time.perf_counter()
    done = 0
    if mode == "summary":
        print(f"graphopt: {desc} ({total if total is not None else '?'} steps)...", file=stream, flush=True)
    try:
        for item in items:
            try:
                yield item
            except GeneratorExit:  # the loop stopped here: the item was taken
                done += 1
                raise
            done += 1
            if mode == "live":
                elapsed = time.perf_counter() - started
                print(f"\rgraphopt: {desc} {_bar(done, total)} {elapsed:.1f}s", end="", file=stream, flush=True)
    finally:
        if mode == "live":
            print(file=stream, flush=True)
        elif mode == "summary":
            print(f"graphopt: {desc} done: {done} steps in {time.perf_counter() - started:.1f}s", file=stream,
                  flush=True)
