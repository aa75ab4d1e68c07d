"""Running a lossy pass under a ``Fidelity`` budget: sensitivity, fallback, and the per-unit report.

The pass manager hands every ``LossyPass`` to a ``LossyRunner``. The runner keeps the
outputs of the graph as it was before the first lossy pass (the reference every budget is
measured against, so the losses of pruning and then quantization add up), plans the pass
once, measures each unit's sensitivity, applies every unit, and while the budget is broken
lets the most sensitive applied unit fall back, one at a time. A unit with milder schemes
(``LossyUnit.milder``) steps down to the next one instead, and its sensitivity is measured again
in that scheme; it falls back only from its mildest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt.errors import FidelityError, GraphoptError, PassError
from graphopt.ir.graph import run_and_record, snapshot_graph_module
from graphopt.passes.base import PassResult
from graphopt.passes.lossy.base import (
    CalibrationData,
    Fidelity,
    LossyPass,
    LossyPlan,
    LossyUnit,
    output_cosine,
    output_sqnr_db,
)
from graphopt.report import PlotSpec, ReportSection, format_cell
from graphopt.report.progress import progress

__all__ = ["FALLEN_BACK", "MILDER", "LossyOutcome", "LossyRunner", "Measurement", "GraphCaller"]

FALLEN_BACK = "fallen back"
MILDER = "milder: "
"""A unit's status when it left the pass, and the start of it when it stepped down to a milder scheme."""

GraphCaller = Callable[[fx.GraphModule], Callable[..., Any]]
"""Turns a graph module into a callable taking the user's own arguments (for ``Fidelity.metric``)."""


@dataclass
class Measurement:
    """How far a candidate graph's outputs are from the reference: cosine, SQNR and the user metric."""

    cosine: float
    sqnr_db: float
    metric: float | None = None
    metric_drop: float | None = None
    held_out_cosine: float | None = None  # on the held-out batches, when there are any

    def meets(self, fidelity: Fidelity) -> bool:
        """True when this measurement is within ``fidelity``'s budget (on held-out data too, when measured)."""
        if fidelity.metric is not None:
            return self.metric_drop is not None and self.metric_drop <= fidelity.max_drop  # type: ignore[operator]
        held_out = self.held_out_cosine if self.held_out_cosine is not None else 1.0
        return self.cosine >= fidelity.min_cosine and held_out >= fidelity.min_cosine

    def headline(self, fidelity: Fidelity) -> str:
        """The measured value the budget is about, in words."""
        if fidelity.metric is not None and self.metric is not None:
            return f"{_metric_name(fidelity)} {self.metric:.4g} (drop {self.metric_drop:.4g})"
        if self.held_out_cosine is not None:
            return f"cosine {self.cosine:.7f} (held-out data: {self.held_out_cosine:.7f})"
        return f"cosine {self.cosine:.7f}"


@dataclass
class UnitOutcome:
    """One unit's sensitivity and fate."""

    unit: LossyUnit
    alone: Measurement | None = None
    status: str = "kept"
    reason: str = ""


@dataclass
class LossyOutcome:
    """The accepted graph of a lossy pass with what was measured on the way."""

    gm: fx.GraphModule
    result: PassResult
    outputs: Any
    measurement: Measurement
    units: list[UnitOutcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sections: list[ReportSection] = field(default_factory=list)  # the plan's own, about the accepted graph

    def record_fields(self, fidelity: Fidelity) -> dict[str, Any]:
        """Plain values for ``PassRecord.fidelity``."""
        fallen = sum(1 for u in self.units if u.status == FALLEN_BACK)
        fields: dict[str, Any] = {
            "budget": fidelity.describe(),
            "enforced": fidelity.enforce,
            "cosine": self.measurement.cosine,
            "sqnr_db": self.measurement.sqnr_db,
            "units": len(self.units),
            "fallen_back": fallen,
        }
        milder = sum(1 for u in self.units if u.status.startswith(MILDER))
        if milder:
            fields["milder"] = milder
        if self.measurement.metric is not None:
            fields["metric"] = self.measurement.metric
            fields["metric_drop"] = self.measurement.metric_drop
        if self.measurement.held_out_cosine is not None:
            fields["held_out_cosine"] = self.measurement.held_out_cosine
        return fields


def _metric_name(fidelity: Fidelity) -> str:
    return getattr(fidelity.metric, "__name__", "metric")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class LossyRunner:
    """Applies lossy passes within their ``Fidelity`` budgets, measured against the pre-lossy graph.

    ``fidelity`` is one budget for every lossy pass, or one per pass name. The reference is
    the graph before the first lossy pass, so losses add up across passes; a pass whose budget
    is not enforced (pruning that ``distill`` will recover) is reported only, and the graph
    after it becomes the reference of the passes that follow.
    """

    def __init__(self, fidelity: Fidelity | dict[str, Fidelity], data: CalibrationData,
                 call_graph: GraphCaller | None = None) -> None:
        self.fidelities = fidelity if isinstance(fidelity, dict) else {}
        self.default = fidelity if isinstance(fidelity, Fidelity) else Fidelity()
        self.fidelity = self.default  # the budget of the pass being run
        self.data = data
        self.call_graph = call_graph
        batches = max([f.max_batches for f in self.fidelities.values()] + [self.default.max_batches])
        self._inputs = data.all[: 1 + batches] if data.example is not None else []
        self._held_out = list(data.validation[:batches])
        self._reference: list[Any] | None = None
        self._held_out_reference: list[Any] = []
        self.baseline_metric: float | None = None

    def fidelity_for(self, pass_name: str) -> Fidelity:
        """The budget that pass ``pass_name`` answers to."""
        return self.fidelities.get(pass_name, self.default)

    def run(self, pass_: LossyPass, gm: fx.GraphModule, example_outputs: Any) -> LossyOutcome:
        """Plan, measure, apply and fall back; returns the accepted candidate (``gm`` is left as it was)."""
        if not self._inputs:
            raise PassError(f"pass {pass_.name!r} is lossy and needs the example inputs to be measured on", pass_.name)
        self.fidelity = self.fidelity_for(pass_.name)
        if self._reference is None:
            self._reference = [example_outputs] + [self._run(gm, flat) for flat in self._inputs[1:]]
            self._held_out_reference = [self._run(gm, flat) for flat in self._held_out]
            if self.fidelity.metric is not None:
                self.baseline_metric = self._metric(gm)
        plan = self._plan(pass_, gm)
        outcomes = [UnitOutcome(unit) for unit in plan.units]
        if not outcomes:
            result = plan.apply(snapshot_graph_module(gm), frozenset())
            return LossyOutcome(gm, PassResult(False, result.stats, near_misses=result.near_misses),
                                example_outputs, Measurement(1.0, math.inf), [], plan.notes())
        if self.fidelity.enforce:
            self._measure_sensitivity(pass_, plan, outcomes, gm, example_outputs)
        skip: set[str] = set()
        levels: dict[str, int] = {}
        while True:
            candidate, result = self._apply(pass_, plan, gm, frozenset(skip), levels)
            measurement, outputs = self._evaluate(candidate)
            if not self.fidelity.enforce or measurement.meets(self.fidelity):
                break
            victim = self._most_sensitive(outcomes, skip)
            broke = f"while {measurement.headline(self.fidelity)} broke the budget ({self.fidelity.describe()})"
            level = levels.get(victim.unit.name, 0) if victim is not None else 0
            if victim is not None and level < len(victim.unit.milder):
                levels[victim.unit.name] = level + 1
                victim.status = MILDER + victim.unit.milder[level]
                victim.reason = f"most sensitive unit {broke}"
                victim.alone = self._alone(pass_, plan, outcomes, gm, example_outputs, victim.unit.name, levels)
                continue
            if victim is None or len(skip) + 1 == len(outcomes):
                raise self._unmeetable(pass_, outcomes, measurement, len(skip))
            victim.status = FALLEN_BACK
            victim.reason = f"most sensitive kept unit {broke}" + (
                f" (in its mildest scheme, {victim.unit.milder[-1]})" if victim.unit.milder else "")
            skip.add(victim.unit.name)
            levels.pop(victim.unit.name, None)
        if not self.fidelity.enforce:
            self._reference = None  # reported, not charged: later budgets start from this graph
        return LossyOutcome(candidate, result, outputs, measurement, outcomes, plan.notes(), plan.sections())

    def _plan(self, pass_: LossyPass, gm: fx.GraphModule) -> LossyPlan:
        try:
            return pass_.plan(gm, self.data)
        except GraphoptError:
            raise  # e.g. InputError: static quantization without calibration data
        except Exception as error:
            raise PassError(f"pass {pass_.name!r} failed to plan: {type(error).__name__}: {error}",
                            pass_.name) from error

    @staticmethod
    def _apply(pass_: LossyPass, plan: LossyPlan, gm: fx.GraphModule, skip: frozenset[str],
               levels: dict[str, int] | None = None) -> tuple[fx.GraphModule, PassResult]:
        """``plan`` applied to a copy of ``gm``; ``levels``: the units stepped down to a milder scheme."""
        candidate = snapshot_graph_module(gm)
        try:
            result = plan.apply(candidate, skip, dict(levels)) if levels else plan.apply(candidate, skip)
            candidate.recompile()
        except PassError:
            raise
        except Exception as error:
            raise PassError(f"pass {pass_.name!r} raised {type(error).__name__}: {error}", pass_.name) from error
        return candidate, result

    @staticmethod
    def _run(gm: fx.GraphModule, flat: tuple[Any, ...]) -> Any:
        outputs, _ = run_and_record(gm, flat)
        return outputs

    def _evaluate(self, candidate: fx.GraphModule) -> tuple[Measurement, Any]:
        """Measure ``candidate`` on the example first; on the calibration batches only if that passes."""
        assert self._reference is not None
        example_outputs = self._run(candidate, self._inputs[0])
        cosine = output_cosine(self._reference[0], example_outputs)
        sqnr = output_sqnr_db(self._reference[0], example_outputs)
        if not self.fidelity.enforce or cosine >= self.fidelity.min_cosine or self.fidelity.metric is not None:
            used = 1 + self.fidelity.max_batches  # this pass's budget may look at fewer batches than the reference has
            pairs = zip(self._inputs[1:used], self._reference[1:used], strict=False)
            for flat, reference in pairs:
                outputs = self._run(candidate, flat)
                cosine = min(cosine, output_cosine(reference, outputs))
                sqnr = min(sqnr, output_sqnr_db(reference, outputs))
        measurement = Measurement(cosine, sqnr)
        if self._held_out and self.fidelity.metric is None and (not self.fidelity.enforce
                                                                 or cosine >= self.fidelity.min_cosine):
            measurement.held_out_cosine = min(
                output_cosine(reference, self._run(candidate, flat))
                for flat, reference in zip(self._held_out, self._held_out_reference, strict=True))
        if self.fidelity.metric is not None:
            measurement.metric = self._metric(candidate)
            measurement.metric_drop = self.baseline_metric - measurement.metric  # type: ignore[operator]
        return measurement, example_outputs

    def _metric(self, gm: fx.GraphModule) -> float:
        if self.call_graph is None:
            raise PassError("Fidelity(metric=...) needs the model's calling convention; run through optimize()",
                            "fidelity")
        return float(self.fidelity.metric(self.call_graph(gm)))  # type: ignore[misc]

    def _measure_sensitivity(self, pass_: LossyPass, plan: LossyPlan, outcomes: list[UnitOutcome],
                             gm: fx.GraphModule, example_outputs: Any) -> None:
        """Each unit alone: output cosine and SQNR on the example (against this pass's input graph)."""
        for outcome in progress(outcomes, desc=f"{pass_.name}: sensitivity per unit"):
            outcome.alone = self._alone(pass_, plan, outcomes, gm, example_outputs, outcome.unit.name, {})

    def _alone(self, pass_: LossyPass, plan: LossyPlan, outcomes: Sequence[UnitOutcome], gm: fx.GraphModule,
               example_outputs: Any, name: str, levels: dict[str, int]) -> Measurement:
        """Output cosine and SQNR on the example with unit ``name`` alone applied (at its level in ``levels``)."""
        others = frozenset(o.unit.name for o in outcomes) - {name}
        candidate, _ = self._apply(pass_, plan, gm, others, {name: levels[name]} if levels.get(name) else None)
        outputs = self._run(candidate, self._inputs[0])
        return Measurement(output_cosine(example_outputs, outputs), output_sqnr_db(example_outputs, outputs))

    @staticmethod
    def _most_sensitive(outcomes: Sequence[UnitOutcome], skip: set[str]) -> UnitOutcome | None:
        kept = [o for o in outcomes if o.unit.name not in skip]
        if not kept:
            return None
        return min(kept, key=lambda o: (o.alone.sqnr_db, o.alone.cosine) if o.alone else (math.inf, 1.0))

    def _unmeetable(self, pass_: LossyPass, outcomes: Sequence[UnitOutcome], last: Measurement,
                    fallen: int) -> FidelityError:
        best = max((o for o in outcomes if o.alone), key=lambda o: o.alone.sqnr_db, default=None)  # type: ignore[union-attr]
        best_text = (f"; the least sensitive unit alone ({best.unit.name}) gives cosine {best.alone.cosine:.5f}, "
                     f"SQNR {best.alone.sqnr_db:.1f} dB" if best and best.alone else "")
        error = FidelityError(
            f"pass {pass_.name!r} cannot meet the budget {self.fidelity.describe()}: with {fallen} of its "
            f"{len(outcomes)} unit(s) fallen back it still reaches only {last.headline(self.fidelity)}{best_text}, "
            "and falling back the last unit would leave the pass with nothing to do. Loosen the budget "
            "(graphopt.Fidelity(min_cosine=...)), give more representative calibration data, choose a milder "
            "setting (more bits, a lower pruning ratio), or protect the sensitive layers.",
            pass_.name,
        )
        error.recoverable = False
        error.best = last
        return error


def unit_section(pass_name: str, outcome: LossyOutcome) -> ReportSection:
    """The per-unit table and SQNR plot of one lossy pass, for the report."""
    detail_keys: list[str] = []
    for o in outcome.units:
        detail_keys.extend(k for k in o.unit.details if k not in detail_keys)
    headers = ["unit", "kind", "scheme", "SQNR dB (alone)", "cosine (alone)", "status", *detail_keys, "why"]
    rows = []
    for o in outcome.units:
        rows.append([
            o.unit.name, o.unit.kind, o.unit.scheme,
            None if o.alone is None else _finite(round(o.alone.sqnr_db, 2)),
            None if o.alone is None else round(o.alone.cosine, 6),
            o.status,
            *[_plain(o.unit.details.get(k)) for k in detail_keys],
            o.reason,
        ])
    plots = []
    measured = [o for o in outcome.units if o.alone is not None]
    if measured:
        plots.append(PlotSpec(
            kind="barh", title=f"{pass_name}: output SQNR with each unit alone (higher is safer)",
            x_labels=[o.unit.name for o in measured],
            series={"SQNR dB": [_finite(o.alone.sqnr_db) for o in measured]},  # type: ignore[union-attr]
            y_label="dB", marked=[i for i, o in enumerate(measured) if o.status != "kept"],
            marked_label="fallen back or milder",
        ))
    fallen = sum(1 for o in outcome.units if o.status == FALLEN_BACK)
    milder = sum(1 for o in outcome.units if o.status.startswith(MILDER))
    sqnr = format_cell(_finite(outcome.measurement.sqnr_db))
    description = (f"{len(outcome.units)} unit(s), {fallen} fallen back"
                   + (f", {milder} in a milder scheme" if milder else "") + "; whole model: "
                   f"cosine {outcome.measurement.cosine:.5f}, SQNR {sqnr} dB"
                   + "".join(f". {note}" for note in outcome.notes))
    return ReportSection(f"{pass_name}: per unit", description, headers, rows, plots)


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Size):
        return "x".join(str(v) for v in value)
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return str(value)
