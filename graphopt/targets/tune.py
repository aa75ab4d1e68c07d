"""Lowering with a measured choice: ``optimize(..., tune=True)``.

Without ``tune`` the target lowers the optimized graph its default way. With it, every
candidate lowering of the target is built, checked against the eager outputs on the example
inputs (the exact tolerance, or the fidelity budget after lossy passes), and timed on the
example inputs round-robin (so drifts of the machine hit every candidate alike); the fastest
that passes is kept. Timing is a race: after the first rounds, a candidate whose fastest call is
clearly slower than the leader's median stops being timed, and the rounds left go to the close
contenders, so that the choice between near-equal lowerings rests on more than three calls
each. The report gets a section with every candidate's median time, status and setup time, and
a bar plot of the times.

Candidates: the target's ``candidates()``, one per variant of its config (``cpu``: oneDNN-fused
with channels-last or NCHW, plain ATen, torch.compile/Inductor; ``onnx``: with and without fused
attention, with onnxruntime's offline transformer optimizer; ``gpu``: with and without CUDA
graphs). The ``cpu`` candidates include onnxruntime's CPU execution provider, another runtime on
the same device. A candidate is measured as its label says: one whose lowering pass fails
verification fails as a candidate (it is lowered with ``on_error="raise"``) instead of being
timed without that pass.

Without ``tune``, a target may still list a few runtimes for a graph where no rule settles which
is faster (``Target.runtime_candidates``: on ``cpu``, PyTorch and OpenVINO for a large float32
graph). ``optimize`` then measures those alone, the same way for a shorter time
(``MEASURED_PLAN``), and the report gets the same section.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.errors import LoweringError
from graphopt.ir.capture import CapturedModel
from graphopt.ir.verify import compare_outputs
from graphopt.passes.lossy.base import Fidelity, output_cosine
from graphopt.passes.manager import OnError
from graphopt.report import PlotSpec, Report, ReportSection
from graphopt.targets.base import LoweringContext, Target

__all__ = ["MEASURED_PLAN", "Candidate", "TunePlan", "lower_model", "tune_candidates"]


@dataclass(frozen=True)
class TunePlan:
    """How long ``tune`` measures: warm-up calls, then rounds until ``min_rounds`` and ``max_seconds``.

    ``gap_s`` idles between two calls: thread pools (onnxruntime's, OpenMP's) spin for a while after
    a call, and would otherwise steal the cores of whichever candidate runs next (onnxruntime's
    spin for 30-60 ms: see ``graphopt.bench.runner.TimingPlan``).
    """

    warmup: int = 1
    min_rounds: int = 3
    max_rounds: int = 30
    max_seconds: float = 6.0
    """At 3 s the finalists of a 9-candidate race on ConvNeXt got 6 calls each, and one kept at 18.8 ms in the race
    ran 25.1 ms in the bench beside the default lowering's 21.7: six calls do not outweigh this machine's noise."""
    gap_s: float = 0.1
    drop_margin: float = 0.1
    """After ``min_rounds``, a candidate whose fastest call is slower than the leader's median by more than
    this fraction leaves the race; the contenders left get at least ``min_rounds`` more rounds."""


MEASURED_PLAN = TunePlan(warmup=3, min_rounds=5, max_rounds=15, max_seconds=2.0)
"""How long ``optimize`` times the runtimes a target lists (``Target.runtime_candidates``) without ``tune``.

Three warm-up calls and five timed ones each at least: with one and three, ConvNeXt's OpenVINO
lowering once timed 34.1 ms in its first calls (21-22 ms after) and lost to PyTorch's 26.2."""


@dataclass
class Candidate:
    """One way of lowering the graph, with what measuring it found."""

    label: str
    target: Target
    runner: Any = None
    setup_s: float = 0.0
    samples: list[float] | None = None
    status: str = "pending"
    detail: str = ""

    @property
    def median_ms(self) -> float | None:
        """Median call time in milliseconds (None when not timed)."""
        return statistics.median(self.samples) * 1e3 if self.samples else None


def _lower(target: Target, gm: fx.GraphModule, context: LoweringContext) -> Any:
    """``target.lower`` (one place, so that a test can stand in for every candidate's lowering)."""
    return target.lower(gm, context)


def tune_candidates(target: Target, budget: Fidelity | None = None) -> list[Candidate]:
    """The candidate lowerings ``tune`` measures for ``target`` (the target's own lowering first).

    Lowerings that compute beyond the graph (``lossy``: OpenVINO's bfloat16 inference) only for a
    graph with a fidelity ``budget``; an exact graph is held to the float32 tolerance.
    """
    return [Candidate(candidate.label(), candidate) for candidate in target.candidates()
            if budget is not None or not getattr(candidate.lowering, "lossy", False)]


def _check(candidate: Candidate, captured: Any, budget: Fidelity | None, tolerance_scale: float,
           native_error: float) -> None:
    args, kwargs = candidate.target.move_inputs(captured.example_args, captured.example_kwargs)
    with torch.inference_mode():
        outputs = pytree.tree_leaves(candidate.runner(*args, **kwargs))
    if budget is not None:
        cosine = output_cosine(captured.reference_outputs, outputs)
        ok = cosine >= budget.min_cosine or not budget.enforce
        candidate.status, candidate.detail = ("ok" if ok else "failed"), f"cosine {cosine:.6f}"
        return
    comparison = compare_outputs(outputs, captured.reference_outputs, tolerance_scale, extra_atol=2 * native_error)
    candidate.status = "ok" if comparison.ok else "failed"
    candidate.detail = f"max |diff| {comparison.max_abs_diff:.1e}" if comparison.ok else comparison.detail


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _contenders(racing: list[Candidate], margin: float) -> list[Candidate]:
    """The candidates whose fastest call is within ``margin`` of the leader's median (the leader included)."""
    leader = min(statistics.median(c.samples) for c in racing if c.samples)
    return [c for c in racing if c.samples and min(c.samples) <= leader * (1 + margin)]


def _time_round_robin(candidates: list[Candidate], captured: Any, plan: TunePlan) -> list[Candidate]:
    """Time every candidate round-robin for ``plan.min_rounds``, then race the close contenders (see ``TunePlan``).

    Returns the candidates still in the race at the end: the choice is among them, on medians of
    the same rounds (a candidate that left keeps the median of its first calls, for the report).
    """
    calls = {}
    for candidate in candidates:
        calls[candidate.label] = candidate.target.move_inputs(captured.example_args, captured.example_kwargs)
        candidate.samples = []
    racing, narrowed_at = list(candidates), None
    with torch.inference_mode():
        for _ in range(plan.warmup):
            for candidate in candidates:
                args, kwargs = calls[candidate.label]
                candidate.runner(*args, **kwargs)
        started = time.perf_counter()
        for rounds in range(1, plan.max_rounds + 1):
            for candidate in racing[rounds % len(racing):] + racing[:rounds % len(racing)]:
                args, kwargs = calls[candidate.label]
                time.sleep(plan.gap_s)  # let the previous runtime's spinning threads go idle first
                _sync()
                begin = time.perf_counter()
                candidate.runner(*args, **kwargs)
                _sync()
                candidate.samples.append(time.perf_counter() - begin)  # type: ignore[union-attr]
            if rounds < plan.min_rounds:
                continue
            narrowed = _contenders(racing, plan.drop_margin)
            for candidate in racing:
                if candidate not in narrowed:
                    candidate.detail += f"; left the race after {len(candidate.samples or [])} calls"
            racing = narrowed
            if narrowed_at is None and len(racing) < len(candidates):
                narrowed_at = rounds  # the contenders left get min_rounds more rounds from here
            if len(racing) == 1 or (time.perf_counter() - started >= plan.max_seconds
                                    and (narrowed_at is None or rounds - narrowed_at >= plan.min_rounds)):
                break
    return racing


def _section(candidates: list[Candidate], chosen: Candidate, tune: bool) -> ReportSection:
    default = candidates[0].median_ms
    rows = []
    for c in candidates:
        status = "chosen" if c is chosen else c.status
        speed = None if c.median_ms is None or default is None else round(default / c.median_ms, 3)
        rows.append([c.label, None if c.median_ms is None else round(c.median_ms, 3), speed, round(c.setup_s, 2),
                     status, c.detail, len(c.samples or [])])
    timed = [c for c in candidates if c.median_ms is not None]
    plots = [PlotSpec("barh", "median time per call on the example inputs", [c.label for c in timed],
                      {"ms": [c.median_ms for c in timed]}, x_label="candidate", y_label="ms",
                      marked=[i for i, c in enumerate(timed) if c is chosen], marked_label="chosen")] if timed else []
    what = "each candidate" if tune else "each runtime the target measures for this kind of graph"
    return ReportSection(
        title="tune: candidate lowerings" if tune else "runtime: measured choice",
        description=(f"{what} checked against eager on the example inputs, then timed round-robin (the "
                     f"clearly slower ones leave the race after the first rounds); kept: {chosen.label}"),
        headers=["candidate", "median ms", "x default", "setup s", "status", "check", "timed calls"],
        rows=rows,
        plots=plots,
    )


def lower_model(target: Target, gm: fx.GraphModule, captured: CapturedModel, report: Report | None, *,
                tune: bool = False, choices: Sequence[Target] = (), budget: Fidelity | None = None,
                tolerance_scale: float = 1.0, plan: TunePlan | None = None, native_error: float = 0.0,
                on_error: OnError = "rollback") -> tuple[Any, Target]:
    """Lower ``gm`` for ``target``; with ``tune`` measure every candidate and keep the fastest that passes.

    The lowering's passes are verified on the captured example call (``tolerance_scale`` for the
    exact ones, ``budget`` for kernel substitutions); one that fails is rolled back and reported,
    or raises with ``on_error="raise"``. With ``tune``, each candidate is lowered with
    ``on_error="raise"`` and checked against eager like the final check: to tolerance, plus twice
    ``native_error`` (how far the unoptimized model on the target's device is from CPU eager).

    ``choices`` (without ``tune``; ``Target.runtime_candidates``, ``target`` first): two or more
    runtimes to measure the same way, each lowered as ``target`` would be (``on_error`` as given),
    for ``MEASURED_PLAN``'s shorter time. When none passes its check, ``target``'s own lowering is
    returned for the final check to judge, as without ``choices``.

    Returns ``(runner, target)``: the target carries the lowering tuning chose.
    """
    context = LoweringContext.from_captured(captured, report=report, on_error=on_error,
                                            tolerance_scale=tolerance_scale, fidelity=budget)
    if not tune and len(choices) < 2:
        return _lower(target, gm, context), target
    candidates = tune_candidates(target, budget) if tune else [Candidate(choice.label(), choice) for choice in choices]
    for candidate in candidates:
        scratch = Report(target=target.name)
        started = time.perf_counter()
        try:
            candidate.runner = _lower(candidate.target, gm,
                                      replace(context, report=scratch, on_error="raise" if tune else on_error))
            candidate.setup_s = time.perf_counter() - started
            _check(candidate, captured, budget, tolerance_scale, native_error)
        except Exception as error:  # a candidate that cannot lower is a result, not a failure of optimize
            candidate.setup_s = time.perf_counter() - started
            candidate.status, candidate.detail = "failed", f"{type(error).__name__}: {str(error)[:160]}"
            candidate.runner = None
        candidate.report = scratch  # type: ignore[attr-defined]
    passing = [c for c in candidates if c.status == "ok"]
    if not passing and not tune:
        own = candidates[0]
        if own.runner is None:
            return _lower(target, gm, context), target
        _keep_report_of(own, report)
        return own.runner, own.target
    if not passing:
        error_lines = "; ".join(f"{c.label}: {c.detail}" for c in candidates)
        raise LoweringError(f"tune: no candidate lowering of target {target.name!r} passed its check ({error_lines})")
    finalists = _time_round_robin(passing, captured, plan or (TunePlan() if tune else MEASURED_PLAN))
    chosen = min(finalists, key=lambda c: c.median_ms or float("inf"))
    for candidate in passing:
        if candidate is not chosen:
            candidate.runner = None  # free what the losers hold (sessions, packed weights)
    if report is not None:
        _keep_report_of(chosen, report)
        report.sections.append(_section(candidates, chosen, tune))
        times = ", ".join(f"{c.label} {c.median_ms:.2f} ms" for c in candidates if c.median_ms is not None)
        report.notes.append(f"tune: kept {chosen.label} ({chosen.median_ms:.2f} ms per call on the example inputs)"
                            if tune else f"runtime measured on the example inputs ({times} per call): kept "
                            f"{chosen.label}")
    return chosen.runner, chosen.target


def _keep_report_of(candidate: Candidate, report: Report | None) -> None:
    """Copy what ``candidate``'s lowering wrote in its own report (notes, sections) into ``report``."""
    if report is not None:
        own: Report = candidate.report  # type: ignore[attr-defined]
        report.notes.extend(own.notes)
        report.sections.extend(own.sections)
