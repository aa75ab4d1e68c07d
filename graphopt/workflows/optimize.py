"""``graphopt.optimize``: capture, run verified passes (exact, then compression), lower to a target.

The result is an ``OptimizedModel`` (``graphopt.workflows.optimized_model``); the grouped
options (``Dynamic``, ``PassPipeline``, ``Verify``) and the flat keywords they stand for are in
``graphopt.workflows.options``, the compression configs and their order in
``graphopt.passes.compress``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.errors import FidelityError, GraphoptError, InputError, VerificationError
from graphopt.ir.capture import CapturedModel, capture, eval_twin
from graphopt.ir.graph import preserved_state, run_and_record, snapshot_graph_module
from graphopt.ir.shapes import resize_inputs
from graphopt.ir.verify import compare_outputs
from graphopt.passes.base import Pass, resolve_pass
from graphopt.passes.compress import CompressionSpec, CompressionStep, compression_steps, stage_of
from graphopt.passes.lossy.base import MIN_BATCHES_TO_HOLD_OUT, CalibrationData, Fidelity, is_lossy
from graphopt.passes.lossy.calibration import calibration_batches
from graphopt.passes.lossy.runner import LossyRunner
from graphopt.passes.manager import OnError, PassManager
from graphopt.report import Report
from graphopt.targets.base import Target, get_target
from graphopt.targets.tune import lower_model
from graphopt.workflows.collector import with_eased_collector
from graphopt.workflows.generation import (
    GenerativeModel,
    generation_compression,
    generation_target,
    is_causal_lm,
    optimize_for_generation,
)
from graphopt.workflows.lowering_fallback import lowered_or_fallback
from graphopt.workflows.optimized_model import OptimizedModel, budget_comparison
from graphopt.workflows.options import (
    Dynamic,
    PassPipeline,
    Verify,
    is_graphopt_pipeline,
    resolve_options,
    with_lowering,
)

if TYPE_CHECKING:
    from graphopt.targets.cpu.lowering import CpuLowering
    from graphopt.targets.gpu.lowering import GpuLowering
    from graphopt.targets.onnx.options import OnnxLowering

__all__ = ["optimize"]

log = logging.getLogger("graphopt")

_KEYWORDS = ("example_kwargs", "dynamic", "compress", "calibration", "validation", "fidelity", "pipeline", "verify",
             "lowering", "tune", "max_cache_len")
"""The keywords ``optimize`` takes by name (the flat shortcuts come on top, see ``options.SHORTCUTS``)."""


def _budgets(lossy: Sequence[Pass], fidelity: Fidelity | None, measured_only: set[str]) -> dict[str, Fidelity]:
    """Each lossy pass's budget: the user's, else measured-only for pruning (distill follows), else its default."""
    if fidelity is not None:
        return {p.name: fidelity for p in lossy}
    return {p.name: Fidelity(enforce=False) if p.name in measured_only else getattr(p, "default_fidelity", Fidelity())
            for p in lossy}


def _check_once_per_stage(pipeline: Sequence[Pass], steps: Sequence[CompressionStep]) -> None:
    """A compression stage asked for in ``compress=`` (or a shortcut) must not also be in ``passes=``."""
    asked = {step.stage: step for step in steps}
    for p in pipeline:
        stage = stage_of(p)
        if stage in asked:
            raise InputError(f"passes= already holds a {stage} pass ({p.name}) and {asked[stage].source} asks for "
                             f"another: a graph is compressed once per stage. Keep one of the two.")


class _GraphCaller(torch.nn.Module):
    """A graph module called like the user's model, for ``Fidelity.metric``."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            return self.graph_module(*args, **kwargs)


@with_eased_collector
def optimize(
    model: torch.nn.Module,
    example_inputs: Any,
    target: str | Target = "cpu",
    *,
    example_kwargs: dict[str, Any] | None = None,
    dynamic: Dynamic | None = None,
    compress: CompressionSpec | Sequence[CompressionSpec] = (),
    calibration: Iterable[Any] | None = None,
    validation: Iterable[Any] | None = None,
    fidelity: Fidelity | None = None,
    pipeline: PassPipeline | None = None,
    verify: bool | Verify = True,
    lowering: CpuLowering | GpuLowering | OnnxLowering | None = None,
    tune: bool = False,
    max_cache_len: int | None = None,
    **shortcuts: Any,
) -> OptimizedModel | GenerativeModel:
    """Optimize ``model`` for ``target`` ("cpu", "gpu" or "onnx") and return a module computing the same.

    **Inputs.** ``example_inputs`` (a tensor or a tuple) and ``example_kwargs`` are what the
    model is captured and checked on. ``dynamic=Dynamic(shapes=..., batch=...)`` declares input
    dims that may vary between calls (torch.export's ``dynamic_shapes`` format, or dim 0 of every
    tensor input); the final check then also runs the optimized model at other sizes of them.

    **Exact passes.** ``pipeline=PassPipeline(passes=..., disabled=..., fixed_point=...,
    instruments=...)`` chooses them (default: the target's pipeline). Each is verified on the
    example inputs, as ``verify=Verify(enabled=..., on_error=..., tolerance_scale=...)`` says: a
    pass that breaks the outputs is undone, reported and announced with a ``RollbackWarning``
    (``on_error="rollback"``, the default), or raises ``VerificationError`` naming it
    (``"raise"``; ``GRAPHOPT_ON_ERROR`` sets the default). ``verify=False`` skips the checks.

    **Compression.** ``compress=[...]`` takes one config per scheme (``graphopt.passes.compress``):
    ``Prune``, one of ``Int8Static`` / ``Int8Dynamic`` / ``WeightOnly`` / ``KMeans``, and
    ``ReducedPrecision``. They run after the exact passes, always in the order prune ->
    quantize -> reduced precision, whatever order they are given in; two schemes of one stage
    are an ``InputError``. Lossy passes answer to a ``fidelity`` budget instead of the exact
    tolerance: ``Fidelity(min_cosine=0.99)``, enforced, by default (0.999 for reduced
    precision); pruning without ``fidelity`` is measured and reported, not enforced
    (``graphopt.distill`` recovers it). Layers that break the budget fall back, most sensitive
    first; the report lists every layer and the final check compares the lowered model with
    eager by the budget. When the lowered model misses a budget the graph met (the target's
    kernels lose more than the graph simulates), the lossy passes run again holding the graph to
    a tighter budget (its distance to cosine 1 halved, up to ``LOWERING_BUDGET_RETRIES`` times),
    so that more layers stay in float; ``VerificationError`` only when that does not help.
    ``calibration`` is an iterable of input batches (tuples like ``example_inputs``, a tensor, or
    a dict of keyword inputs; a DataLoader works) that observers and the budget run on;
    ``Int8Static`` needs it. Budgets are judged on data the layers were not chosen on:
    ``validation`` (batches like ``calibration``), else the last ``Fidelity.held_out`` share
    (0.25) of the calibration batches when there are at least 3; the lossy passes and the final
    check hold the model to the budget on those too, and the report shows both figures.

    **Lowering.** ``lowering`` replaces the target's lowering config (``CpuLowering(...)`` for
    ``cpu``, ``GpuLowering(...)`` for ``gpu``, ``OnnxLowering(...)`` for ``onnx``). A target named
    without one picks it for the optimized graph (``Target.for_graph``: on ``cpu`` a bfloat16 graph
    runs in OpenVINO where it is installed and the CPU has bfloat16 instructions), and measures the
    runtimes no rule decides between (``Target.runtime_candidates``: on ``cpu``, PyTorch and
    OpenVINO for a large float32 graph), keeping the faster. ``tune=True`` builds every candidate
    lowering of the target, checks each against eager and keeps the fastest on the example inputs
    (the report lists every candidate's time).

    **Shortcuts.** The flat keywords of earlier releases still work: ``dynamic_shapes=`` and
    ``dynamic_batch=`` (``Dynamic``), ``passes=``, ``disabled=``, ``fixed_point=``,
    ``instruments=`` (``PassPipeline``), ``on_error=``, ``tolerance_scale=`` (``Verify``), and
    ``prune=`` (a ratio, or a ``Prune``), ``quantize=`` (``"int8"``, ``"int8-dynamic"``,
    ``"int8-weight-only"``, ``"int4-weight-only"``, ``"kmeans"``, or a lossy pass) and
    ``precision=`` (``"bf16"``, ``"fp16"``), each one step of ``compress``. Any other keyword
    is an ``InputError``.

    **Generation.** A causal language model (a transformers ``...ForCausalLM`` built with its
    cache) comes back as a ``GenerativeModel`` with ``generate(...)``: its prefill and decode
    steps are captured with a static key/value cache of ``max_cache_len`` positions (default: the
    model's maximum, at most 1024) as declared state, optimized, verified and lowered
    (``graphopt.workflows.generation``). ``example_inputs`` is a batch of prompt ids.

    The user's model is never modified. When every pass is graphopt's own, the optimized graph
    shares the weights it leaves untouched with the model (no copy, so no doubled memory), and
    calling it after those weights were changed in place raises ``InputError``; a pipeline with
    passes of your own works on a private copy of the weights. ``model`` may be an
    ``OptimizedModel``: its ``portable_graph`` is optimized again (prune, distill, then quantize).
    """
    options = resolve_options(dynamic, pipeline, verify, shortcuts, explicit=("target", *_KEYWORDS))
    check = options.verify
    on_error = check.effective_on_error
    chosen_by_name = isinstance(target, str) and lowering is None
    target = with_lowering(get_target(target), lowering)
    target.check_available()
    if is_causal_lm(model) and _generates(model, example_kwargs):
        named, target = target, generation_target(target) if chosen_by_name else target
        passes = options.pipeline.build(target)
        compression = generation_compression(compression_steps(compress, target=target.name, **options.compression),
                                             fidelity)
        return optimize_for_generation(model, example_inputs, target, passes, max_cache_len=max_cache_len,
                                       fallback=named if named is not target else None,
                                       verify=check.enabled, on_error=on_error, compression=compression,
                                       refused=_refused_for_generation(calibration, tune, example_kwargs, options,
                                                                       validation))
    passes = options.pipeline.build(target)
    if max_cache_len is not None:
        raise InputError(_not_generative(model, example_kwargs))
    steps = compression_steps(compress, target=_kernels_of(target), **options.compression)
    _check_once_per_stage(passes, steps)
    if steps:
        passes += [*(step.lossy for step in steps), resolve_pass("cse"), resolve_pass("dce")]
    report = Report(target=target.name)
    if isinstance(model, OptimizedModel):  # prune, then distill, then quantize...: each step starts from the last
        model = model.portable_graph
        report.notes.append("the model is an OptimizedModel: its portable graph was optimized "
                            "again, and the outputs are checked against that graph")

    started = time.perf_counter()
    captured = capture(model, example_inputs, example_kwargs, dynamic_shapes=options.dynamic.shapes,
                       dynamic_batch=options.dynamic.batch, share_weights=is_graphopt_pipeline(passes))
    report.capture_seconds = time.perf_counter() - started
    report.notes.extend(captured.notes)
    log.info("captured %d nodes; running %d passes", len(captured.graph_module.graph.nodes), len(passes))

    measured_only = {step.lossy.name for step in steps if step.stage == "prune"}
    budgets, data = _lossy_setup(captured, passes, fidelity, measured_only, calibration, validation, report)
    pristine = snapshot_graph_module(captured.graph_module) if budgets else None
    first_notes, retry = list(report.notes), 0
    while True:  # returns the first lowered model that meets its budget, or raises
        graph_budgets = _tightened(budgets, retry)
        lossy_runner = LossyRunner(graph_budgets, data, call_graph=_GraphCaller) if budgets else None
        manager = PassManager(passes, verify=check.enabled, on_error=on_error,
                              fixed_point=options.pipeline.fixed_point, instruments=options.pipeline.instruments,
                              tolerance_scale=check.tolerance_scale, lossy_runner=lossy_runner)
        gm = manager.run(captured.graph_module, captured.flat_inputs, report, captured.graph_outputs)
        budget = _final_budget(report, budgets)
        lowering_target = target.for_graph(gm) if chosen_by_name else target
        if lowering_target is not target:
            report.notes.append(f"target {target.name!r} named without a lowering: this graph lowers as "
                                f"{lowering_target.label()!r} (Target.for_graph)")
        held_out = data.validation if data is not None else []
        choices = lowering_target.runtime_candidates(gm) if chosen_by_name and not tune else []
        try:
            lower = partial(_lower_and_check, model, gm, manager, captured=captured, report=report, budget=budget,
                            lossy_runner=lossy_runner, check=check, tune=tune, on_error=on_error, held_out=held_out)
            return lowered_or_fallback(_measuring(lower, lowering_target, choices), lowering_target, target,
                                       report.notes)[0]
        except VerificationError as error:
            shortfall = getattr(error, "budget_shortfall", None)
            if shortfall is None or retry == LOWERING_BUDGET_RETRIES or not _tightenable(budget):
                raise
            tighter = _tightened(budgets, retry + 1)
            log.info("the lowered model missed the budget (%s); running the lossy passes again under %s",
                     shortfall, _describe(tighter))
            first_notes.append(f"lowered to {target.name!r}, the model missed its budget ({shortfall}); the lossy "
                               f"passes ran again holding the graph to {_describe(tighter)}, so that more layers "
                               "stay in float")
            report = Report(target=target.name, capture_seconds=report.capture_seconds, notes=list(first_notes))
            captured = dataclasses.replace(captured, graph_module=snapshot_graph_module(pristine))
            retry += 1


def _kernels_of(target: Target) -> str:
    """The name compression checks kernels by: the target's, or the runtime's where it runs another one.

    ``precision=`` is refused on ``onnx`` (onnxruntime's CPU provider has no bfloat16 matrix
    kernels) but not when the onnx target runs OpenVINO, which has.
    """
    return "openvino" if getattr(target.lowering, "runtime", None) == "openvino" else target.name


LOWERING_BUDGET_RETRIES = 3
"""How often ``optimize`` runs the lossy passes again, under a tighter budget, when the lowered model misses it."""


def _tightenable(budget: Fidelity | None) -> bool:
    """True for an enforced output-cosine budget (a tighter one keeps more layers in float)."""
    return (budget is not None and budget.enforce and budget.metric is None and budget.max_perplexity_ratio is None
            and budget.min_token_agreement is None and budget.min_cosine < 1.0)


def _tightened(budgets: dict[str, Fidelity], retry: int) -> dict[str, Fidelity]:
    """The budgets the graph answers to on ``retry``: each cosine budget's distance to 1 halved per retry."""
    return {name: dataclasses.replace(f, min_cosine=1.0 - (1.0 - f.min_cosine) / 2 ** retry)
            if retry and _tightenable(f) else f for name, f in budgets.items()}


def _describe(budgets: dict[str, Fidelity]) -> str:
    return ", ".join(f"{name}: output cosine >= {f.min_cosine:.5g}" for name, f in budgets.items() if _tightenable(f))


def _measuring(lower: Callable[..., OptimizedModel], target: Target,
               choices: Sequence[Target]) -> Callable[[Target], OptimizedModel]:
    """``lower`` that measures ``choices`` (``target``'s runtime candidates) when it lowers for ``target`` itself."""
    return lambda chosen: lower(chosen, choices=choices if chosen is target else ())


def _lower_and_check(model: torch.nn.Module, gm: fx.GraphModule, manager: PassManager, target: Target,
                     captured: CapturedModel, report: Report, budget: Fidelity | None,
                     lossy_runner: LossyRunner | None, check: Verify, *, tune: bool, on_error: OnError,
                     choices: Sequence[Target] = (), held_out: Sequence[tuple[Any, ...]] = ()) -> OptimizedModel:
    """Lower the optimized graph ``gm`` and check the result against eager (or the budget); the optimized model.

    ``choices``: runtimes to measure against each other (``Target.runtime_candidates``; see ``lower_model``).
    ``held_out``: batches (flat inputs) the budget is also checked on, kept apart from calibration.

    Raises ``VerificationError`` when the lowered model differs; one that misses an enforced
    budget carries ``budget_shortfall`` (what it missed), so that ``optimize`` can try again.
    """
    native = target.native_error(model, captured.example_args, captured.example_kwargs, captured.reference_outputs)
    started = time.perf_counter()
    runner, target = lower_model(target, gm, captured, report, tune=tune, choices=choices, budget=budget,
                                 tolerance_scale=check.tolerance_scale, native_error=native, on_error=on_error)
    report.lowering_seconds = time.perf_counter() - started
    optimized = OptimizedModel(gm, runner, target, report, captured, budget=budget)
    reference_model = model
    if _measured_before_enforced(report, budget):
        # Pruning was measured, not charged: the enforced budgets started from the pruned graph,
        # so the lowered model answers to them against the compressed graph, not against eager.
        reference_model = optimized.portable_graph
        outputs, _ = run_and_record(reference_model, captured.flat_inputs)  # leaves no trace in its state
        captured = dataclasses.replace(captured, reference_outputs=pytree.tree_leaves(outputs))
        optimized = OptimizedModel(gm, runner, target, report, captured, budget=budget)
        report.notes.append(f"a measured-only lossy pass (pruning) ran before an enforced budget: the final check "
                            f"holds the lowered model to {budget.describe()} against the compressed graph, not "
                            "against eager")

    if native > 0:
        report.notes.append(f"the original model on {target.name} differs from CPU eager by {native:.2e}; "
                            "the final check allows twice that on top of the usual tolerance")
    # cpu runs the verified graph itself, unless lowering rewrote it (int8 kernels for a quantized graph)
    graph_outputs = manager.outputs if runner is gm and check.enabled and budget is None else None
    _final_check(optimized, reference_model, captured, report, check.tolerance_scale, native, check.enabled,
                 graph_outputs, budget, held_out if budget is not None and budget.metric is None else ())
    if budget is not None and budget.metric is not None and lossy_runner is not None:
        _final_metric(optimized, budget, lossy_runner.baseline_metric, report)
    return optimized


def _not_generative(model: torch.nn.Module, example_kwargs: dict[str, Any] | None) -> str:
    """Why ``max_cache_len=`` does not apply to ``model``, and what to do instead."""
    if not callable(getattr(model, "generate", None)):
        return "max_cache_len= applies to causal language models (generation); this model is not one"
    if is_causal_lm(model):  # it takes a cache, which is switched off
        switched_off_in_call = (example_kwargs or {}).get("use_cache") is False
        where = ("use_cache=False in the example's keyword arguments" if switched_off_in_call
                 else f"its config says use_cache=False (the default of {type(model.config).__name__})")
        return (f"max_cache_len= applies to generation with a key/value cache, and {type(model).__name__} has one, but "
                f"{where}: set model.config.use_cache = True (and drop use_cache=False) to optimize it for generation, "
                "or leave out max_cache_len for its one-shot forward")
    return (f"max_cache_len= applies to generation with a key/value cache: {type(model).__name__} generates, but its "
            "forward takes no past_key_values (its cache is of another kind, e.g. a state-space model's), and graphopt "
            "cannot generate with that yet. Optimize it without max_cache_len, with config.use_cache = False, for its "
            "one-shot forward (the logits of a whole sequence)")


def _generates(model: torch.nn.Module, example_kwargs: dict[str, Any] | None) -> bool:
    """A causal LM is optimized for generation unless its cache is off (``use_cache=False`` in the call or config)."""
    asked = (example_kwargs or {}).get("use_cache")
    if asked is not None:
        return bool(asked)
    return getattr(getattr(model, "config", None), "use_cache", True) is not False


def _refused_for_generation(calibration: Any, tune: bool, example_kwargs: Any, options: Any,
                            validation: Any = None) -> list[str]:
    """The options ``optimize`` takes that generation does not support yet (named in its error)."""
    asked = {"calibration= (the budget's text is Fidelity(text=...))": calibration is not None,
             "validation= (the budget's held-out text is Fidelity(text=...))": validation is not None,
             "tune=True": tune,
             "example_kwargs= (other than use_cache)": bool(set(example_kwargs or {}) - {"use_cache"}),
             "dynamic=": bool(options.dynamic.shapes) or options.dynamic.batch}
    return [name for name, given in asked.items() if given]


def _final_metric(optimized: OptimizedModel, budget: Fidelity, baseline: float | None, report: Report) -> None:
    """Measure the user's fidelity metric on the lowered model; raise when it dropped past the budget."""
    value = float(budget.metric(optimized))  # type: ignore[misc]
    report.final_metric = {"value": value}
    if baseline is None:
        return
    drop = baseline - value
    report.final_metric.update(baseline=baseline, drop=drop)
    if budget.enforce and drop > budget.max_drop:  # type: ignore[operator]
        error = FidelityError(
            f"the model lowered to {optimized.target.name!r} scores {value:.4g} on the fidelity metric, {drop:.4g} "
            f"below the original's {baseline:.4g} (budget: {budget.describe()}); the graph itself was within "
            "budget, so the target's kernels lose the rest. Try another target or a looser budget.",
            f"lower-{optimized.target.name}",
        )
        error.report = report
        raise error


def _lossy_setup(captured: CapturedModel, pipeline: Sequence[Pass], fidelity: Fidelity | None,
                 measured_only: set[str], calibration: Iterable[Any] | None, validation: Iterable[Any] | None,
                 report: Report) -> tuple[dict[str, Fidelity], CalibrationData | None]:
    """Each lossy pass's budget and the data the fidelity machinery runs on (empty and None without lossy passes).

    The calibration (and validation) batches are read once here: a retry under a tighter budget
    reuses them. Without ``validation``, the last ``held_out`` share of the calibration batches is
    kept apart to judge the budgets on.
    """
    if fidelity is not None and not isinstance(fidelity, Fidelity):
        raise InputError(f"fidelity must be a graphopt.Fidelity, got {type(fidelity).__name__}")
    lossy = [p for p in pipeline if is_lossy(p)]
    if not lossy:
        if calibration is not None or fidelity is not None or validation is not None:
            report.notes.append("calibration/validation/fidelity given but no lossy pass (compress=, quantize=, "
                                "prune=) asked for: unused")
        return {}, None
    batches, notes = calibration_batches(calibration, captured)
    report.notes.extend(notes)
    budgets = _budgets(lossy, fidelity, measured_only)
    if validation is not None:
        held, notes = calibration_batches(validation, captured, what="validation")
        report.notes.extend(notes)
        report.notes.append(f"budgets judged on {len(held)} validation batch(es) besides the example and "
                            f"{len(batches)} calibration batch(es)")
        return budgets, CalibrationData(example=captured.flat_inputs, batches=batches, validation=held)
    share = max((f.held_out for f in budgets.values() if f.enforce and f.metric is None
                 and not f.for_language_model), default=0.0)
    if share and len(batches) >= MIN_BATCHES_TO_HOLD_OUT:
        count = max(1, round(len(batches) * share))
        batches, held = batches[:-count], batches[-count:]
        report.notes.append(f"calibration: {len(batches)} batch(es) choose the layers, the last {len(held)} are held "
                            "out to judge the budget on (Fidelity(held_out=...), or give validation=)")
        return budgets, CalibrationData(example=captured.flat_inputs, batches=batches, validation=held)
    if share and batches:
        report.notes.append(f"the budget is judged on the {len(batches)} calibration batch(es) the layers were chosen "
                            f"on (fewer than {MIN_BATCHES_TO_HOLD_OUT} to hold some out): give validation= to judge "
                            "it on other data")
    return budgets, CalibrationData(example=captured.flat_inputs, batches=batches)


def _final_budget(report: Report, budgets: dict[str, Fidelity]) -> Fidelity | None:
    """The budget the final check holds the lowered model to: the strictest enforced one of the lossy passes run.

    None when no lossy pass changed the graph (the exact tolerance applies then). ``budgets`` are
    the passes' own, not the tightened ones a retry holds the graph to.
    """
    if not budgets or not any(r.fidelity and r.status == "changed" for r in report.records):
        return None
    enforced = [f for f in budgets.values() if f.enforce]
    if not enforced:
        return Fidelity(enforce=False)
    return max(enforced, key=lambda f: f.min_cosine)


def _measured_before_enforced(report: Report, budget: Fidelity | None) -> bool:
    """True when a measured-only lossy pass (pruning without ``fidelity=``) changed the graph under an enforced budget.

    The enforced budgets of the passes after it were measured from the graph it left.
    """
    if budget is None or not budget.enforce or budget.metric is not None:
        return False
    return any(r.fidelity and r.status == "changed" and not r.fidelity.get("enforced", True) for r in report.records)


def _final_check(optimized: OptimizedModel, model: torch.nn.Module, captured: CapturedModel, report: Report,
                 tolerance_scale: float, native: float, verify: bool, graph_outputs: Any = None,
                 budget: Fidelity | None = None, held_out: Sequence[tuple[Any, ...]] = ()) -> None:
    """Compare the lowered model with eager on the example, at other sizes of its dynamic dims, and on ``held_out``.

    After lossy passes (``budget`` given) the comparison is by output cosine against the budget
    instead of the exact tolerance; the worst cosine goes into ``report.final_cosine``.

    ``graph_outputs``, when given, are the lowered model's outputs on the example already
    (the pass manager's last verified run, for a target that runs that very graph).
    """
    probes: list[tuple[str, tuple[Any, ...], dict[str, Any], list[Any] | None]] = [
        ("example inputs", captured.example_args, captured.example_kwargs, captured.reference_outputs)
    ]
    for grow in (True, False):
        resized = resize_inputs(captured.example_args, captured.example_kwargs, captured.dynamic, grow)
        if resized is not None:
            args, kwargs, sizes = resized
            label = ", ".join(f"{name}={size}" for name, size in sizes.items())
            probes.append((label, args, kwargs, None))
    if not captured.example_kwargs:  # held-out batches are flat inputs: positional calls
        probes += [(f"held-out batch {i + 1}", tuple(flat), {}, None) for i, flat in enumerate(held_out)]
    results = _run_probes(optimized, model, probes, tolerance_scale, native, graph_outputs, budget)
    report.final_max_abs_diff = max(c.max_abs_diff for _, c in results)
    if budget is not None:
        report.final_cosine = min(c.max_scaled_diff for label, c in results if not label.startswith("held-out"))
    failures = [f"{label}: {c.detail}" for label, c in results if not c.ok]
    report.final_check = "passed" if not failures else f"FAILED ({'; '.join(failures)})"
    resized = [label for label, _ in results[1:] if not label.startswith("held-out")]
    if resized:
        report.notes.append("dynamic dims checked against eager at: " + "; ".join(["example inputs", *resized]))
    held = [c for label, c in results if label.startswith("held-out")]
    if held and budget is not None:
        report.final_held_out_cosine = min(c.max_scaled_diff for c in held)
    if failures and verify:
        error = VerificationError(
            f"the optimized model lowered to {optimized.target.name!r} differs from the original: {failures[0]}",
            f"lower-{optimized.target.name}",
        )
        if budget is not None and budget.enforce:
            error.budget_shortfall = failures[0]  # type: ignore[attr-defined]  # optimize may try a tighter graph
        raise error


def _run_probes(optimized: OptimizedModel, model: torch.nn.Module, probes: list[Any], tolerance_scale: float,
                native: float, graph_outputs: Any, budget: Fidelity | None = None) -> list[tuple[str, Any]]:
    """Run every probe through the lowered model and compare it with eager; state is restored after each.

    With a ``budget`` the comparison is by cosine (carried in ``Comparison.max_scaled_diff``).
    """
    results = []
    for label, args, kwargs, reference in probes:
        if reference is None:
            reference = _eager_outputs(model, args, kwargs)
        if graph_outputs is not None and label == "example inputs":
            outputs = graph_outputs
        else:
            with preserved_state(optimized.graph_module):  # a check must not advance state the model updates
                outputs = _run_lowered(optimized, args, kwargs, label)
        actual = pytree.tree_leaves(outputs)
        if budget is None:
            comparison = compare_outputs(actual, reference, tolerance_scale, extra_atol=2 * native)
        else:
            comparison = budget_comparison(actual, reference, budget)
        results.append((label, comparison))
    return results


def _run_lowered(optimized: OptimizedModel, args: tuple[Any, ...], kwargs: dict[str, Any], label: str) -> Any:
    """Call the lowered model for the final check; a crash there blames the lowering, as a graphopt error."""
    try:
        return optimized(*args, **kwargs)
    except GraphoptError:
        raise
    except Exception as error:
        raise VerificationError(
            f"the model lowered to {optimized.target.name!r} fails on the {label}: {type(error).__name__}: {error}. "
            "Try another target, or declare fewer dims dynamic if it fails only at other sizes.",
            f"lower-{optimized.target.name}",
        ) from error


def _eager_outputs(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """The user's model's outputs on a probe input, computed on a twin so the model is never touched."""
    twin = eval_twin(model, share_weights=True)  # eager code only reads its weights
    with torch.no_grad():
        return pytree.tree_leaves(twin(*args, **kwargs))
