"""Prune, distill, quantize in one call, with each stage's size, speed and fidelity side by side.

    small = graphopt.recipe(model, (ids, mask), data=sentences, prune=0.5,
                            distill={"epochs": 2, "loss": "cosine"}, match=mean_pooled,
                            quantize="int8-dynamic", validation=held_out)
    small.report            # every stage's passes, and "recipe: stages" (a table and a plot)

It is the three documented calls, chained: ``optimize(model, prune=...)``, ``distill(pruned,
teacher=model, data=...)`` and ``optimize(recovered, quantize=...)``. The stages are measured
in one process on the same inputs: stored weight size, latency on the example inputs, and
fidelity to the original model on the ``validation`` batches (or the example), through
``match`` when given (the same function ``distill`` matches, e.g. pooled sentence embeddings).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from graphopt.errors import InputError
from graphopt.ir.capture import eval_twin
from graphopt.ir.graph import parameter_bytes
from graphopt.passes.lossy.base import Fidelity
from graphopt.report import PlotSpec, ReportSection
from graphopt.report.progress import progress
from graphopt.workflows.distill import distill as run_distill
from graphopt.workflows.optimize import optimize
from graphopt.workflows.optimized_model import OptimizedModel

__all__ = ["STAGES_TITLE", "STAGE_HEADERS", "recipe"]

TIMING_SECONDS = 1.0
"""About how long each stage's latency is measured for (at least 3 calls after a warm-up)."""


STAGES_TITLE = "recipe: stages"
"""The title of the report section measuring each stage."""
STAGE_HEADERS = ("stage", "weights MB", "ms", "speed-up", "mean cosine", "worst cosine")
"""Its columns: the stage, stored weight MB, median latency on the example inputs, speed-up over eager,
mean and worst per-sample cosine to the original."""


def recipe(
    model: torch.nn.Module,
    example_inputs: Any,
    data: Iterable[Any],
    *,
    target: str = "cpu",
    prune: Any = 0.5,
    distill: Mapping[str, Any] | None = None,
    quantize: Any = "int8-dynamic",
    fidelity: Fidelity | None = None,
    calibration: Iterable[Any] | None = None,
    validation: Iterable[Any] | None = None,
    match: Callable[[list[Any], tuple[Any, ...]], Any] | None = None,
) -> OptimizedModel:
    """Prune ``model``, recover it by distillation on ``data``, then quantize it; the final optimized model.

    ``prune`` and ``quantize`` take what ``optimize`` takes (a ratio or ``Prune``; a scheme name or
    config); ``None`` skips the stage. ``distill`` holds ``graphopt.distill``'s keywords (``epochs``,
    ``lr``, ``loss``...; ``None``: its defaults); ``data`` is its training data (unlabeled batches
    of inputs). ``fidelity`` is the quantization budget (vs the recovered model), judged on
    ``validation`` when given; ``calibration`` feeds pruning importance and quantization.
    ``match`` picks what distill matches and what the stages' fidelity is measured on.
    """
    example = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if prune is None and quantize is None:
        raise InputError("recipe: prune=None and quantize=None leave nothing to do; give at least one")
    if distill is not None and not isinstance(distill, Mapping):
        raise InputError(f"recipe(distill=...) takes graphopt.distill's keywords as a dict, got "
                         f"{type(distill).__name__}")
    held_out = [_as_inputs(batch) for batch in validation] if validation is not None else []
    calibration = list(calibration) if calibration is not None else None  # read by two stages: not a one-shot
    stages: list[tuple[str, Any]] = [("original (eager)", model)]
    current: Any = model
    if prune is not None:
        current = optimize(model, example, target, prune=prune, calibration=calibration)
        stages.append((f"pruned ({_describe(prune)})", current))
        current = run_distill(current, teacher=model, data=data, match=match, **dict(distill or {}))
        stages.append(("distilled", current))
    if quantize is not None:
        current = optimize(current, example, target, quantize=quantize, calibration=calibration,
                           validation=held_out or None, fidelity=fidelity)
        stages.append((f"quantized ({_describe(quantize)})", current))
    final: OptimizedModel = current
    if prune is not None and quantize is not None:  # quantizing started a new report
        _merge_reports(final, stages[-2][1])
    final.report.sections.append(_stage_section(stages, example, held_out or [example], match))
    return final


def _describe(spec: Any) -> str:
    """A stage's setting in a few words: ``0.5``, ``0.5 taylor``, ``int8-dynamic`` (a scheme's config: its name)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, (int, float)):
        return f"{spec:g}"
    amount = getattr(spec, "amount", None)
    if isinstance(amount, float):
        importance = getattr(spec, "importance", "l1")
        return f"{amount:g}" + (f" {importance}" if importance != "l1" else "")
    return str(getattr(spec, "scheme", None) or getattr(spec, "name", type(spec).__name__))


def _as_inputs(batch: Any) -> tuple[Any, ...]:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    raise InputError(f"recipe(validation=...) batches must be input tuples or tensors, got {type(batch).__name__}")


def _merge_reports(final: OptimizedModel, distilled: OptimizedModel) -> None:
    """Put the distilled model's pass records, sections and notes (pruning's included) ahead of the final's."""
    earlier, report = distilled.report, final.report
    report.records[:0] = list(earlier.records)
    report.sections[:0] = list(earlier.sections)
    report.notes[:0] = list(earlier.notes)


def _stage_section(stages: list[tuple[str, Any]], example: tuple[Any, ...], batches: list[tuple[Any, ...]],
                   match: Any) -> ReportSection:
    original = stages[0][1]
    twin = eval_twin(original, share_weights=True)
    references = [_leaves(twin, batch, match) for batch in batches]
    eager_ms = None
    rows: list[list[Any]] = []
    sizes, speedups, cosines = [], [], []
    for name, stage in progress(stages, desc="recipe: measuring stages"):
        runner = twin if stage is original else stage
        size = parameter_bytes(original if stage is original else stage.portable_graph) / 1e6
        ms = _latency_ms(runner, example)
        eager_ms = eager_ms or ms
        scores = [_cosines(ref, _leaves(runner, batch, match)) for ref, batch in zip(references, batches, strict=True)]
        mean = statistics.fmean(s for per_batch in scores for s in per_batch)
        worst = min(s for per_batch in scores for s in per_batch)
        rows.append([name, round(size, 3), round(ms, 3), round(eager_ms / ms, 2), round(mean, 5), round(worst, 5)])
        sizes.append(size)
        speedups.append(eager_ms / ms)
        cosines.append(worst)
    description = (f"each stage measured in this process: stored weights, median latency on the example inputs, "
                   f"cosine to the original model per sample on {len(batches)} "
                   + ("held-out batch(es)" if batches[0] is not example else "batch (the example)")
                   + (" through match()" if match is not None else ""))
    labels = [name for name, _ in stages]
    plots = [
        PlotSpec(kind="bar", title="recipe: size and speed per stage", x_labels=labels,
                 series={"weights MB": sizes, "speed-up vs eager": speedups}, log_scale=True),
        PlotSpec(kind="line", title="recipe: worst per-sample cosine to the original", x_labels=labels,
                 series={"cosine": cosines}, y_label="cosine"),
    ]
    return ReportSection(STAGES_TITLE, description, list(STAGE_HEADERS), rows, plots)


def _leaves(model: Any, inputs: tuple[Any, ...], match: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        outputs = pytree.tree_leaves(model(*inputs))
        if match is not None:
            outputs = pytree.tree_leaves(match(outputs, inputs))
    return [o.float() for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point()]


def _cosines(reference: list[torch.Tensor], actual: list[torch.Tensor]) -> list[float]:
    """Per-sample cosine of the first output (flattened after the batch dim)."""
    a, b = reference[0], actual[0]
    if a.dim() == 0:
        return [float(F.cosine_similarity(a.reshape(1, 1), b.reshape(1, 1)).item())]
    return F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), dim=1).tolist()


def _latency_ms(model: Any, inputs: tuple[Any, ...]) -> float:
    with torch.no_grad():
        model(*inputs)  # warm-up
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - started < TIMING_SECONDS and len(times) < 50):
            begin = time.perf_counter()
            model(*inputs)
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)
