"""The pass manager: runs a pipeline of passes, verifying the graph after each one."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch.fx as fx

from graphopt.errors import GraphoptError, PassError, RollbackWarning, StateError, VerificationError, warn_caller
from graphopt.ir.backup import GraphBackup, graph_fingerprint, unchanged_since
from graphopt.ir.graph import (
    parameter_bytes,
    run_and_record,
    state_update_nodes,
    tensor_versions,
    written_since,
)
from graphopt.ir.verify import Comparison, compare_outputs, first_divergence, lint
from graphopt.passes.base import Pass, PassResult
from graphopt.passes.instruments import Instrument
from graphopt.passes.lossy.base import LossyPass, is_lossy
from graphopt.passes.lossy.runner import LossyRunner, unit_section
from graphopt.report import PassRecord, Report

__all__ = ["OnError", "PassManager"]

OnError = Literal["raise", "rollback"]


def _node_count(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


def _check_weights_untouched(pass_: Pass, versions: dict[str, tuple[Any, int]]) -> None:
    """Raise when the pass wrote into an existing weight: its backup shares that weight, so no rollback."""
    written = written_since(versions)
    if written:
        error = PassError(
            f"pass {pass_.name!r} wrote into existing weight(s) {', '.join(written[:5])} in place. Passes must "
            "register new tensors (graphopt.ir.graph.register_constant) instead: weights are shared with the rollback "
            "copy, so this change cannot be undone. Fix the pass.",
            pass_.name,
        )
        error.recoverable = False
        raise error


class PassManager:
    """Run passes in order, optionally to a fixed point, verifying after each.

    Verification (on by default) lints the graph (no mutating op may appear), runs it on the
    example inputs, checks that the run left every stored tensor unchanged, and compares its
    outputs with those of the graph before the pass. A pass that reports no change and left
    the code as it was is not re-run. A pass that raises or fails verification raises
    ``PassError``/``VerificationError`` naming the pass, or with ``on_error="rollback"`` is
    undone, recorded, announced with a ``RollbackWarning``, and the pipeline goes on.

    A lossy pass (``graphopt.passes.lossy.base.LossyPass``: quantization, pruning) is checked against the
    ``lossy_runner``'s fidelity budget instead of the exact tolerance (see
    ``graphopt.passes.lossy.runner``), runs once even in fixed-point mode, and adds a per-unit
    section to the report.

    Rollback copies only the graph's structure; weights are shared, so a pass must never write
    into an existing tensor (it registers a new one); the manager checks that after every pass.

    Two hooks serve a target's lowering (``graphopt.targets.common.lowering``), whose passes
    put backend kernels in the graph: ``compare(pass_, actual, expected)``, when given, replaces
    the exact comparison of a pass's outputs with the graph's before it (kernel-substituting
    passes answer to the fidelity budget), and ``in_place_kernels`` names ops the lint lets
    through although they write into an argument (oneDNN's int8 convolution accumulating a
    residual into a buffer of its own).
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify: bool = True,
        on_error: OnError = "raise",
        fixed_point: bool = False,
        max_iterations: int = 5,
        instruments: Sequence[Instrument] = (),
        tolerance_scale: float = 1.0,
        lossy_runner: LossyRunner | None = None,
        compare: Callable[[Pass, Any, Any], Comparison] | None = None,
        in_place_kernels: frozenset[Any] = frozenset(),
    ) -> None:
        if on_error not in ("raise", "rollback"):
            raise ValueError(f"on_error must be 'raise' or 'rollback', got {on_error!r}")
        self.passes = list(passes)
        self.verify = verify
        self.on_error = on_error
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations if fixed_point else 1
        self.instruments = list(instruments)
        self.tolerance_scale = tolerance_scale
        self.lossy_runner = lossy_runner
        self.compare = compare
        self.in_place_kernels = in_place_kernels
        self.outputs: Any = None

    def run(
        self, gm: fx.GraphModule, flat_inputs: tuple[Any, ...], report: Report, outputs: Any = None
    ) -> fx.GraphModule:
        """Run the pipeline on ``gm``; returns the resulting module and appends records to ``report``.

        ``outputs`` are ``gm``'s outputs on ``flat_inputs`` when the caller has them already
        (capture does); after the run, ``self.outputs`` holds the final graph's outputs.
        """
        if outputs is None:
            outputs = self._first_run(gm, flat_inputs)
        for iteration in range(1, self.max_iterations + 1):
            changed_any = False
            for pass_ in self.passes:
                gm, outputs, changed = self._run_one(pass_, gm, flat_inputs, outputs, report, iteration)
                changed_any |= changed
            if not changed_any:
                break
        self.outputs = outputs
        return gm

    @staticmethod
    def _first_run(gm: fx.GraphModule, flat_inputs: tuple[Any, ...]) -> Any:
        try:
            outputs, _ = run_and_record(gm, flat_inputs)
        except Exception as error:
            if isinstance(error, GraphoptError):
                raise
            raise GraphoptError(
                f"the captured graph fails on the example inputs before any pass ran: {type(error).__name__}: "
                f"{error}. This is a capture problem, not a pass problem: check the model with "
                "torch.export.export(model, example_inputs) and report it if eager runs but the export does not."
            ) from error
        return outputs

    def _run_one(
        self,
        pass_: Pass,
        gm: fx.GraphModule,
        flat_inputs: tuple[Any, ...],
        outputs: Any,
        report: Report,
        iteration: int,
    ) -> tuple[fx.GraphModule, Any, bool]:
        if is_lossy(pass_) and iteration > 1:
            return gm, outputs, False  # a lossy pass runs once: re-running it would compound its error
        backup = GraphBackup(gm)
        state = {str(u.args[0].target) for u in state_update_nodes(gm) if u.args[0].op == "get_attr"}
        weights = {name: v for name, v in tensor_versions(gm).items() if name not in state}  # state is meant to change
        nodes, weight_bytes = _node_count(gm), parameter_bytes(gm)
        record = PassRecord(pass_.name, "unchanged", nodes, nodes, weight_bytes, weight_bytes, 0.0, iteration=iteration)
        for instrument in self.instruments:
            instrument.before_pass(pass_, gm)
        try:
            if is_lossy(pass_):
                gm, new_outputs, result = self._attempt_lossy(pass_, gm, outputs, record, report)  # type: ignore[arg-type]
            else:
                new_outputs, result = self._attempt_exact(pass_, gm, backup, flat_inputs, outputs, record)
            _check_weights_untouched(pass_, weights)
        except PassError as error:
            for instrument in self.instruments:
                instrument.after_pass_failed(pass_, gm, error)
            record.error = str(error)
            record.status = "rolled back" if self.on_error == "rollback" and error.recoverable else "failed"
            if record.status == "rolled back":
                try:
                    self._check_backup_intact(pass_, backup.module(), flat_inputs, outputs, error)
                except PassError as fatal:
                    record.status, record.error, error = "failed", str(fatal), fatal
            report.records.append(record)
            if record.status == "failed":
                error.report = report
                raise error
            warn_caller(f"graphopt: pass {pass_.name!r} was rolled back and skipped: {error}", RollbackWarning)
            return backup.module(), outputs, False
        for instrument in self.instruments:
            instrument.after_pass(pass_, gm, result)
        record.status = "changed" if result.changed else "unchanged"
        record.nodes_after, record.param_bytes_after = _node_count(gm), parameter_bytes(gm)
        record.stats, record.rule_hits = dict(result.stats), dict(result.rule_hits)
        record.near_misses = {k: dict(v) for k, v in result.near_misses.items()}
        report.records.append(record)
        return gm, new_outputs, result.changed

    def _attempt_exact(self, pass_: Pass, gm: fx.GraphModule, backup: GraphBackup, flat_inputs: tuple[Any, ...],
                       outputs: Any, record: PassRecord) -> tuple[Any, PassResult]:
        """Run an exact pass in place on ``gm`` and verify it keeps the outputs to tolerance.

        A pass that reports no change and leaves the graph's structure as it was is not verified
        (nothing it could have changed would show), and its graph's code is not regenerated.
        """
        fingerprint = graph_fingerprint(gm.graph)
        started = time.perf_counter()
        try:
            result, untouched = self._apply(pass_, gm, fingerprint)
        finally:
            record.seconds = time.perf_counter() - started
        started = time.perf_counter()
        if self.verify and not untouched:
            new_outputs, record.max_abs_diff = self._check(pass_, gm, backup, flat_inputs, outputs)
        else:
            new_outputs = outputs
            record.max_abs_diff = 0.0 if untouched else None
        record.verify_seconds = time.perf_counter() - started
        return new_outputs, result

    def _attempt_lossy(self, pass_: LossyPass, gm: fx.GraphModule, outputs: Any, record: PassRecord,
                       report: Report) -> tuple[fx.GraphModule, Any, PassResult]:
        """Run a lossy pass under the fidelity budget; returns the accepted copy of the graph."""
        if self.lossy_runner is None:
            raise PassError(
                f"pass {pass_.name!r} changes numerics on purpose (a lossy pass) and needs a fidelity budget and "
                "calibration data: run it through graphopt.optimize(..., fidelity=..., calibration=...) or give "
                "PassManager(lossy_runner=LossyRunner(...))",
                pass_.name,
            )
        started = time.perf_counter()
        outcome = self.lossy_runner.run(pass_, gm, outputs)
        record.seconds = time.perf_counter() - started
        started = time.perf_counter()
        self._lint(pass_, outcome.gm, check_meta=True)
        record.max_abs_diff = compare_outputs(outcome.outputs, outputs, self.tolerance_scale).max_abs_diff
        record.verify_seconds = time.perf_counter() - started
        if outcome.units:
            record.fidelity = outcome.record_fields(self.lossy_runner.fidelity)
            report.sections.append(unit_section(pass_.name, outcome))
            report.sections.extend(outcome.sections)
        report.notes.extend(f"{pass_.name}: {note}" for note in outcome.notes if not outcome.units)
        return outcome.gm, outcome.outputs, outcome.result

    def _lint(self, pass_: Pass, gm: fx.GraphModule, check_meta: bool) -> None:
        problems = lint(gm, check_meta=check_meta, in_place_ops=self.in_place_kernels)
        if problems:
            raise VerificationError(
                f"pass {pass_.name!r} produced a malformed graph: " + "; ".join(problems[:5]), pass_.name
            )

    def _check_backup_intact(
        self, pass_: Pass, backup: fx.GraphModule, flat_inputs: tuple[Any, ...], outputs: Any, cause: PassError
    ) -> None:
        """Before rolling back, prove the backup still computes what it did (weights are shared with it)."""
        if not self.verify:
            return
        try:
            restored, _ = run_and_record(backup, flat_inputs)
            intact = compare_outputs(restored, outputs, self.tolerance_scale).ok
        except Exception:
            intact = False
        if not intact:
            error = PassError(
                f"pass {pass_.name!r} failed ({cause}) and also changed weights it shares with the rollback copy "
                "(for example through tensor.data), so it cannot be undone. Passes must register new tensors "
                "(graphopt.ir.graph.register_constant) instead of writing into existing ones. Fix or disable the pass.",
                pass_.name,
            )
            error.recoverable = False
            raise error from cause

    @staticmethod
    def _apply(pass_: Pass, gm: fx.GraphModule, fingerprint: list[tuple[Any, ...]]) -> tuple[PassResult, bool]:
        """Run the pass on ``gm``; return its result and whether it left ``gm`` untouched.

        Untouched means the pass reported no change and the graph's structure shows none; its code
        is then not regenerated.
        """
        try:
            result = pass_.run(gm)
            untouched = isinstance(result, PassResult) and not result.changed and unchanged_since(gm.graph,
                                                                                                   fingerprint)
            if not untouched:
                gm.recompile()
        except PassError:
            raise
        except Exception as error:
            raise PassError(f"pass {pass_.name!r} raised {type(error).__name__}: {error}", pass_.name) from error
        if not isinstance(result, PassResult):
            raise PassError(f"pass {pass_.name!r} returned {type(result).__name__}, expected PassResult", pass_.name)
        return result, untouched

    def _check(
        self, pass_: Pass, gm: fx.GraphModule, before: GraphBackup, flat_inputs: tuple[Any, ...], expected: Any
    ) -> tuple[Any, float]:
        self._lint(pass_, gm, check_meta=False)  # refuse in-place ops before running anything
        try:
            actual, _ = run_and_record(gm, flat_inputs)
        except StateError as error:
            raise VerificationError(
                f"pass {pass_.name!r} produced a graph whose state changes between calls: {error}. Passes must "
                "keep the graph functional: compute new values instead of writing into existing ones.",
                pass_.name,
            ) from error
        except Exception as error:
            raise VerificationError(
                f"pass {pass_.name!r} produced a graph that fails to run: {type(error).__name__}: {error}",
                pass_.name,
            ) from error
        self._lint(pass_, gm, check_meta=True)
        if self.compare is not None:
            comparison = self.compare(pass_, actual, expected)
        else:
            comparison = compare_outputs(actual, expected, self.tolerance_scale)
        if not comparison.ok:
            try:
                node = first_divergence(before.module(), gm, flat_inputs, self.tolerance_scale)
            except Exception:  # a diagnosis only: values it cannot compare (quantized tensors) must not hide the error
                node = None
            where = f"; first diverging node: {node}" if node else ""
            raise VerificationError(
                f"pass {pass_.name!r} changed the model's outputs ({comparison.detail}){where}. "
                "Fix the pass or disable it (disabled=[...]); with on_error='rollback' (the default) it is undone "
                "and the pipeline goes on.",
                pass_.name,
                node,
            )
        return actual, comparison.max_abs_diff
