"""Lower for the target picked for a graph, or for the one the user named where the picked one cannot.

A target named without a lowering may lower as another (``Target.for_graph``: OpenVINO for a
bfloat16 graph on ``cpu``; ``generation_target``: onnxruntime for a decoder's steps). When that
one cannot lower the graph (an op its runtime lacks, an export that fails: ``LoweringError``),
the graph is lowered for the target as named instead, and the report says so. ``optimize``,
``graphopt.load`` and generation's step builds all go through :func:`lowered_or_fallback`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from graphopt.errors import LoweringError
from graphopt.targets.base import Target

__all__ = ["lowered_or_fallback"]

log = logging.getLogger("graphopt")
T = TypeVar("T")


def lowered_or_fallback(lower: Callable[[Target], T], target: Target, fallback: Target | None,
                        notes: list[str] | None, what: str = "this graph") -> tuple[T, Target]:
    """``lower(target)``, or ``lower(fallback)`` when ``target`` cannot lower ``what``; and the target used.

    Only a ``LoweringError`` falls back (a lowering that computes wrong still raises), and only to
    a ``fallback`` other than ``target``; the note goes to ``notes`` when given.
    """
    try:
        return lower(target), target
    except LoweringError as error:
        if fallback is None or fallback is target:
            raise
        log.info("lowering %s as %s failed (%s); lowering as %s", what, target.label(), error, fallback.label())
        if notes is not None:
            notes.append(f"{target.label()!r} could not lower {what} ({error}): lowered as {fallback.label()!r} "
                         "instead")
        return lower(fallback), fallback
