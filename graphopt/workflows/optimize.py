"""``graphopt.optimize``: capture, run verified passes, lower to a target."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.errors import FidelityError, GraphoptError, InputError, UnknownPassError, VerificationError
from graphopt.ir.capture import CapturedModel, capture, eval_twin, flatten_inputs
from graphopt.ir.graph import clone_graph_module, preserved_state, tensor_versions, written_since
from graphopt.ir.shapes import resize_inputs
from graphopt.ir.verify import Comparison, compare_outputs
from graphopt.passes.base import Pass, resolve_pass
from graphopt.passes.instruments import Instrument
from graphopt.passes.lossy.base import CalibrationData, Fidelity, LossyPass, is_lossy, output_cosine
from graphopt.passes.lossy.calibration import calibration_batches
from graphopt.passes.lossy.runner import LossyRunner
from graphopt.passes.manager import OnError, PassManager
from graphopt.report import Report
from graphopt.targets.base import LoweringContext, Target, get_target
from graphopt.targets.tune import lower_model

__all__ = ["OptimizedModel", "optimize"]

log = logging.getLogger("graphopt")


Signature = list[tuple[tuple[int, ...], torch.dtype] | None]
"""Per flat input: the example's shape and dtype (None for a non-tensor input)."""


def _signature(values: Sequence[Any]) -> Signature:
    return [(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None for v in values]


def _dim_order(example: torch.Tensor) -> list[int] | None:
    """The order of ``example``'s dims in memory (outermost first), or None when it is not dense."""
    if example.dim() == 0:
        return None
    order = sorted(range(example.dim()), key=lambda d: -example.stride(d))
    return order if example.permute(order).is_contiguous() else None


def _relayout(value: torch.Tensor, order: list[int]) -> torch.Tensor:
    """``value`` laid out densely with its dims in memory in ``order`` (itself when it already is)."""
    if value.dim() != len(order) or value.permute(order).is_contiguous():
        return value
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return value.permute(order).contiguous().permute(inverse)


def _default_on_error() -> OnError:
    """``rollback`` unless the environment asks for strict runs (``GRAPHOPT_ON_ERROR=raise``, as the tests do)."""
    value = os.environ.get("GRAPHOPT_ON_ERROR", "rollback")
    if value not in ("raise", "rollback"):
        raise InputError(f"GRAPHOPT_ON_ERROR must be 'raise' or 'rollback', got {value!r}")
    return value  # type: ignore[return-value]


class OptimizedModel(torch.nn.Module):
    """The result of ``optimize``: call it like the original model.

    ``graph_module`` is the optimized, portable ATen fx graph (what ``save`` and ``export_onnx``
    use), ``runner`` what the target lowered it to (a lowered copy with oneDNN / int8 / cuBLASLt
    kernels for ``cpu``/``gpu``, or the graph module itself when nothing applied; an
    onnxruntime session for ``onnx``),
    ``report`` what every pass did, ``dynamic`` which input dims may vary between calls.
    """

    def __init__(self, graph_module: fx.GraphModule, runner: Any, target: Target, report: Report,
                 captured: CapturedModel) -> None:
        super().__init__()
        self.graph_module = graph_module
        if runner is graph_module:
            self.__dict__["runner"] = runner  # one module, registered once: no duplicate state_dict keys
        else:
            self.runner = runner
        self.target = target
        self.report = report
        self._example_args = captured.example_args
        self._example_kwargs = captured.example_kwargs
        self._reference = captured.reference_outputs
        self.budget: Fidelity | None = None  # after lossy passes: what outputs are held to instead of tolerance
        self._signature = _signature(captured.flat_inputs)
        self.dynamic = captured.dynamic
        # torch.export specializes the graph on the example's strides (``reshape`` of a contiguous
        # tensor becomes ``view``...), so calls are laid out in memory like the example.
        self._dim_orders = [_dim_order(v) if isinstance(v, torch.Tensor) else None for v in captured.flat_inputs]
        self._plain_args = not captured.example_kwargs and all(
            isinstance(a, torch.Tensor) for a in captured.example_args
        )
        # On the CPU the graph shares untouched weights with the user's model (no copy): remember
        # their versions, so that changing them in place afterwards is an error, not a silent mix
        # of new weights and weights folded from the old ones.
        self._weights = {name: (tensor.detach(), version) for name, (tensor, version)
                         in tensor_versions(graph_module).items() if isinstance(tensor, torch.nn.Parameter)}

    def _check_weights_unchanged(self) -> None:
        changed = written_since(self._weights)
        if changed:
            raise InputError(
                f"weights of the original model were changed in place after optimize ({', '.join(changed[:3])}"
                f"{', ...' if len(changed) > 3 else ''}); the optimized model shares them with it, and weights "
                "folded from the old values would no longer match. Run graphopt.optimize again."
            )

    def _flat_call_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        if self._plain_args and not kwargs and len(args) == len(self._signature):
            return args  # the common call, tensors only: no pytree work
        return flatten_inputs(self.graph_module, args, kwargs)

    def _check_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        flat = self._flat_call_inputs(args, kwargs)
        self.dynamic.check(flat, self._signature)
        return flat

    def _like_example_layout(
        self, flat: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's arguments laid out in memory like the example's (untouched when they already are)."""
        moved = [
            _relayout(value, order) if order is not None and isinstance(value, torch.Tensor) else value
            for value, order in zip(flat, self._dim_orders, strict=False)
        ]
        if all(a is b for a, b in zip(moved, flat, strict=True)):
            return args, kwargs
        if flat is args:
            return tuple(moved), kwargs
        spec = getattr(self.graph_module, "_in_spec", None)
        if spec is None:
            return args, kwargs
        new_args, new_kwargs = pytree.tree_unflatten(moved, spec)
        return tuple(new_args), dict(new_kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the optimized model (inputs are moved to the target's device, in the example's layout)."""
        flat = self._check_call(args, kwargs)
        if self.runner is self.graph_module:
            self._check_weights_unchanged()
        args, kwargs = self._like_example_layout(flat, args, kwargs)
        args, kwargs = self.target.move_inputs(args, kwargs)
        with torch.inference_mode():
            return self.runner(*args, **kwargs)

    def _cpu_graph(self) -> fx.GraphModule:
        """The optimized graph with its weights on the CPU (a copy when it lives on another device)."""
        on_cpu = all(t.device.type == "cpu" for t in [*self.graph_module.parameters(), *self.graph_module.buffers()])
        if on_cpu:
            return self.graph_module
        from graphopt.targets.gpu.target import retarget_device_constants, retarget_meta_values

        copy_on_cpu = clone_graph_module(self.graph_module).to("cpu")
        retarget_device_constants(copy_on_cpu, torch.device("cpu"))
        retarget_meta_values(copy_on_cpu, torch.device("cpu"))
        return copy_on_cpu

    def export_onnx(self, path: str | Path) -> Path:
        """Write the optimized graph as an ONNX file, checked and compared in onnxruntime.

        Raises ``VerificationError`` when onnxruntime's outputs differ from the original model's.
        """
        from graphopt.targets.onnx.target import OnnxRuntimeModule, export_graph_to_onnx

        if isinstance(self.runner, OnnxRuntimeModule):
            session = self.runner
        else:
            self._check_weights_unchanged()
            model = export_graph_to_onnx(self._cpu_graph(), self._example_args, self._example_kwargs, self.dynamic)
            session = OnnxRuntimeModule(model, getattr(self.graph_module, "_out_spec", None))
        outputs = session(*self._example_args, **self._example_kwargs)
        if self.budget is None:
            comparison = compare_outputs(outputs, self._reference)
        else:
            comparison = _budget_comparison(pytree.tree_leaves(outputs), self._reference, self.budget)
        if not comparison.ok:
            raise VerificationError(f"the ONNX export computes different outputs: {comparison.detail}", "export-onnx")
        log.info("ONNX outputs match (max |Δ| %.2e); writing %s", comparison.max_abs_diff, path)
        return session.save(path)

    def save(self, path: str | Path) -> Path:
        """Write the optimized model as a torch.export ``.pt2`` file with graphopt's metadata.

        ``graphopt.load(path)`` gives it back in another process (no pickled code is run).
        """
        from graphopt.workflows.save_load import save_optimized

        self._check_weights_unchanged()
        return save_optimized(self, path)


def _trusted(pipeline: Sequence[Pass]) -> bool:
    """True when every pass is graphopt's own: they never write into weights, so weights may be shared.

    A pipeline with a pass of the user's runs on a private copy of the weights, so that a bug
    in that pass cannot reach the user's model.
    """
    return all(type(p).__module__.startswith(("graphopt.passes.", "graphopt.passes.rules")) for p in pipeline)


def _pipeline(target: Target, passes: Sequence[str | Pass] | None, disabled: Sequence[str]) -> list[Pass]:
    chosen = [resolve_pass(p) for p in (passes if passes is not None else target.default_passes)]
    unknown = set(disabled) - {p.name for p in chosen}
    if unknown:
        raise UnknownPassError(
            f"disabled= names passes that are not in the pipeline: {', '.join(sorted(unknown))}; "
            f"pipeline: {', '.join(p.name for p in chosen)}"
        )
    return [p for p in chosen if p.name not in set(disabled)]


def _lossy_passes(prune: Any, quantize: Any) -> list[LossyPass]:
    """The lossy passes asked for, in the order they compose: prune, then quantize."""
    chosen: list[LossyPass] = []
    if prune is not None:
        from graphopt.passes.prune import prune_pass

        chosen.append(prune_pass(prune))
    if quantize is not None:
        from graphopt.passes.quantize import quantize_pass

        chosen.append(quantize_pass(quantize))
    return chosen


def _budgets(lossy: Sequence[Pass], fidelity: Fidelity | None, prune_pass: Pass | None) -> dict[str, Fidelity]:
    """Each lossy pass's budget: the user's, else measured-only for ``prune=`` (distill follows), else the default."""
    if fidelity is not None:
        return {p.name: fidelity for p in lossy}
    return {p.name: Fidelity(enforce=False) if p is prune_pass else getattr(p, "default_fidelity", Fidelity())
            for p in lossy}


class _GraphCaller(torch.nn.Module):
    """A graph module called like the user's model, for ``Fidelity.metric``."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            return self.graph_module(*args, **kwargs)


def optimize(
    model: torch.nn.Module,
    example_inputs: Any,
    target: str | Target = "cpu",
    *,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    dynamic_batch: bool = False,
    passes: Sequence[str | Pass] | None = None,
    disabled: Sequence[str] = (),
    verify: bool = True,
    on_error: OnError | None = None,
    fixed_point: bool = False,
    instruments: Sequence[Instrument] = (),
    tolerance_scale: float = 1.0,
    quantize: str | LossyPass | None = None,
    prune: float | LossyPass | None = None,
    calibration: Iterable[Any] | None = None,
    fidelity: Fidelity | None = None,
    tune: bool = False,
    precision: str | LossyPass | None = None,
) -> OptimizedModel:
    """Optimize ``model`` for ``target`` ("cpu", "gpu" or "onnx") and return a module computing the same.

    ``dynamic_shapes`` declares input dims that may vary between calls, in torch.export's
    format (``{"x": {0: Dim("batch")}}``); ``dynamic_batch=True`` marks dim 0 of every tensor
    input. ``passes`` replaces the target's default pipeline (pass names or ``Pass`` objects);
    ``disabled`` drops passes by name. Every pass is verified on ``example_inputs`` unless
    ``verify=False``. A pass that breaks the outputs is undone, reported and announced with a
    ``RollbackWarning`` (``on_error="rollback"``, the default), or raises ``VerificationError``
    naming it (``on_error="raise"``; ``GRAPHOPT_ON_ERROR`` sets the default). With dynamic dims
    the final check also runs the optimized model at other sizes of those dims.

    Lossy passes change numerics on purpose and answer to a ``fidelity`` budget instead of the
    exact tolerance: ``prune`` (a ratio such as ``0.5`` or a ``graphopt.passes.Prune``), then
    ``quantize`` (``"int8"``, ``"int8-dynamic"``, ``"int8-weight-only"``, ``"int4-weight-only"``,
    ``"kmeans"`` or a ``graphopt.passes.Quantize``). ``calibration`` is an iterable of input
    batches (tuples like ``example_inputs``, a tensor, or a dict of keyword inputs; a DataLoader
    works) that observers and the budget run on. ``fidelity`` defaults to
    ``Fidelity(min_cosine=0.99)``, enforced, for quantization; with ``prune`` and no
    ``fidelity`` the pruning loss is measured and reported, not enforced (``graphopt.distill``
    recovers it). Layers that break the budget fall back, most sensitive first; the report
    lists every layer and the final check compares the lowered model with eager by the budget.

    The user's model is never modified. When every pass is graphopt's own, the optimized graph
    shares the weights it leaves untouched with the model (no copy, so no doubled memory), and
    calling it after those weights were changed in place raises ``InputError``; a pipeline with
    passes of your own works on a private copy of the weights.

    ``tune=True`` builds every candidate lowering of the target, checks each against eager and
    keeps the fastest on the example inputs (the report lists every candidate's time; see
    ``graphopt.targets.tune``). ``precision="bf16"`` or ``"fp16"`` runs matrix layers in reduced precision
    (``graphopt.passes.precision``), checked against ``fidelity`` (default output cosine >= 0.999).
    """
    on_error = on_error if on_error is not None else _default_on_error()
    target = get_target(target)
    target.check_available()
    pipeline = _pipeline(target, passes, disabled)
    lossy = _lossy_passes(prune, quantize)
    if precision is not None:
        from graphopt.passes.precision import precision_pass

        lossy.append(precision_pass(precision, target.name))
    if lossy:
        pipeline += [*lossy, resolve_pass("cse"), resolve_pass("dce")]
    report = Report(target=target.name)
    if isinstance(model, OptimizedModel):  # prune, then distill, then quantize...: each step starts from the last
        model = model._cpu_graph()
        report.notes.append("the model is an OptimizedModel: its portable graph (graph_module) was optimized "
                            "again, and the outputs are checked against that graph")

    started = time.perf_counter()
    captured = capture(model, example_inputs, example_kwargs, dynamic_shapes=dynamic_shapes,
                       dynamic_batch=dynamic_batch, share_weights=_trusted(pipeline))
    report.capture_seconds = time.perf_counter() - started
    report.notes.extend(captured.notes)
    log.info("captured %d nodes; running %d passes", len(captured.graph_module.graph.nodes), len(pipeline))

    prune_pass = lossy[0] if prune is not None else None
    lossy_runner = _lossy_runner(captured, pipeline, fidelity, prune_pass, calibration, report)
    manager = PassManager(pipeline, verify=verify, on_error=on_error, fixed_point=fixed_point,
                          instruments=instruments, tolerance_scale=tolerance_scale, lossy_runner=lossy_runner)
    gm = manager.run(captured.graph_module, captured.flat_inputs, report, captured.graph_outputs)
    budget = _final_budget(report, lossy_runner)

    native = target.native_error(model, captured.example_args, captured.example_kwargs, captured.reference_outputs)
    started = time.perf_counter()
    runner, target = lower_model(target, gm, captured, report, tune=tune, budget=budget,
                                 tolerance_scale=tolerance_scale, native_error=native, on_error=on_error)
    report.lowering_seconds = time.perf_counter() - started
    optimized = OptimizedModel(gm, runner, target, report, captured)
    optimized.budget = budget

    if native > 0:
        report.notes.append(f"the original model on {target.name} differs from CPU eager by {native:.2e}; "
                            "the final check allows twice that on top of the usual tolerance")
    # cpu runs the verified graph itself, unless lowering rewrote it (int8 kernels for a quantized graph)
    graph_outputs = manager.outputs if runner is gm and verify and budget is None else None
    _final_check(optimized, model, captured, report, tolerance_scale, native, verify, graph_outputs, budget)
    if budget is not None and budget.metric is not None and lossy_runner is not None:
        _final_metric(optimized, budget, lossy_runner.baseline_metric, report)
    return optimized


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


def _lossy_runner(captured: CapturedModel, pipeline: Sequence[Pass], fidelity: Fidelity | None,
                  prune_pass: Pass | None, calibration: Iterable[Any] | None, report: Report) -> LossyRunner | None:
    """The fidelity machinery for the pipeline's lossy passes (None when it has none)."""
    if fidelity is not None and not isinstance(fidelity, Fidelity):
        raise InputError(f"fidelity must be a graphopt.Fidelity, got {type(fidelity).__name__}")
    lossy = [p for p in pipeline if is_lossy(p)]
    if not lossy:
        if calibration is not None or fidelity is not None:
            report.notes.append("calibration/fidelity given but no lossy pass (quantize=, prune=) asked for: unused")
        return None
    batches, notes = calibration_batches(calibration, captured)
    report.notes.extend(notes)
    data = CalibrationData(example=captured.flat_inputs, batches=batches)
    return LossyRunner(_budgets(lossy, fidelity, prune_pass), data, call_graph=_GraphCaller)


def _final_budget(report: Report, runner: LossyRunner | None) -> Fidelity | None:
    """The budget the final check holds the lowered model to: the strictest enforced one of the lossy passes run.

    None when no lossy pass changed the graph (the exact tolerance applies then).
    """
    if runner is None or not any(r.fidelity and r.status == "changed" for r in report.records):
        return None
    enforced = [f for f in runner.fidelities.values() if f.enforce]
    if not enforced:
        return Fidelity(enforce=False)
    return max(enforced, key=lambda f: f.min_cosine)


def _final_check(optimized: OptimizedModel, model: torch.nn.Module, captured: CapturedModel, report: Report,
                 tolerance_scale: float, native: float, verify: bool, graph_outputs: Any = None,
                 budget: Fidelity | None = None) -> None:
    """Compare the lowered model with eager on the example, and at other sizes of its dynamic dims.

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
    results = _run_probes(optimized, model, probes, tolerance_scale, native, graph_outputs, budget)
    report.final_max_abs_diff = max(c.max_abs_diff for _, c in results)
    if budget is not None:
        report.final_cosine = min(c.max_scaled_diff for _, c in results)
    failures = [f"{label}: {c.detail}" for label, c in results if not c.ok]
    report.final_check = "passed" if not failures else f"FAILED ({'; '.join(failures)})"
    if len(results) > 1:
        report.notes.append("dynamic dims checked against eager at: " + "; ".join(label for label, _ in results))
    if failures and verify:
        raise VerificationError(
            f"the optimized model lowered to {optimized.target.name!r} differs from the original: {failures[0]}",
            f"lower-{optimized.target.name}",
        )


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
            comparison = _budget_comparison(actual, reference, budget)
        results.append((label, comparison))
    return results


def _budget_comparison(actual: list[Any], reference: list[Any], budget: Fidelity) -> Comparison:
    """Compare lossy outputs with eager by cosine; ``max_scaled_diff`` carries the cosine."""
    exact = compare_outputs(actual, reference)
    cosine = output_cosine(reference, actual)
    ok = cosine >= budget.min_cosine or not budget.enforce or budget.metric is not None
    detail = "" if ok else f"output cosine {cosine:.5f} < {budget.min_cosine:g} (the fidelity budget)"
    return Comparison(ok, exact.max_abs_diff, cosine, detail)


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


def rebuild_optimized(previous: OptimizedModel, graph_module: fx.GraphModule, report: Report) -> OptimizedModel:
    """A new ``OptimizedModel`` for ``graph_module`` (e.g. fine-tuned by ``distill``), lowered like ``previous``.

    It keeps ``previous``'s target, example inputs and dynamic dims. Its reference outputs are
    the new graph's own on the example, so the lowered model (and ``export_onnx``) is checked
    against what this graph computes; a lowering that differs raises ``VerificationError``.
    """
    from graphopt.ir.graph import run_and_record

    flat = flatten_inputs(graph_module, previous._example_args, previous._example_kwargs)
    outputs, _ = run_and_record(graph_module, flat)
    captured = CapturedModel(graph_module, previous._example_args, previous._example_kwargs, flat,
                             pytree.tree_leaves(outputs), dynamic=previous.dynamic)
    started = time.perf_counter()
    runner = previous.target.lower(graph_module, LoweringContext.from_captured(captured))
    report.lowering_seconds = time.perf_counter() - started
    rebuilt = OptimizedModel(graph_module, runner, previous.target, report, captured)
    if runner is not graph_module:
        with preserved_state(graph_module):
            lowered = rebuilt(*previous._example_args, **previous._example_kwargs)
        comparison = compare_outputs(pytree.tree_leaves(lowered), captured.reference_outputs)
        if not comparison.ok:
            raise VerificationError(f"the rebuilt model lowered to {previous.target.name!r} differs from its graph: "
                                    f"{comparison.detail}", f"lower-{previous.target.name}")
    return rebuilt
