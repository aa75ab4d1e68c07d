"""The pass manager: runs a pipeline of passes, verifying the graph after each one."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import torch.fx as fx

from graphopt.errors import PassError, VerificationError
from graphopt.instruments import Instrument
from graphopt.ir import clone_graph_module, parameter_bytes, run_and_record
from graphopt.pass_infra import Pass, PassResult
from graphopt.report import PassRecord, Report
from graphopt.verify import compare_outputs, first_divergence, lint

__all__ = ["OnError", "PassManager"]

OnError = Literal["raise", "rollback"]


def _node_count(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


class PassManager:
    """Run passes in order, optionally to a fixed point, verifying after each.

    Verification (on by default) lints the graph and compares its outputs on the example
    inputs with those of the graph before the pass. A pass that raises or fails
    verification raises ``PassError``/``VerificationError`` naming the pass, or with
    ``on_error="rollback"`` is undone and recorded, and the pipeline goes on.
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

    def run(self, gm: fx.GraphModule, flat_inputs: tuple[Any, ...], report: Report) -> fx.GraphModule:
        """Run the pipeline on ``gm``; returns the resulting module and appends records to ``report``."""
        outputs, _ = run_and_record(gm, flat_inputs)
        for iteration in range(1, self.max_iterations + 1):
            changed_any = False
            for pass_ in self.passes:
                gm, outputs, changed = self._run_one(pass_, gm, flat_inputs, outputs, report, iteration)
                changed_any |= changed
            if not changed_any:
                break
        return gm

    def _run_one(
        self,
        pass_: Pass,
        gm: fx.GraphModule,
        flat_inputs: tuple[Any, ...],
        outputs: Any,
        report: Report,
        iteration: int,
    ) -> tuple[fx.GraphModule, Any, bool]:
        backup = clone_graph_module(gm)
        nodes, weight_bytes = _node_count(gm), parameter_bytes(gm)
        record = PassRecord(pass_.name, "unchanged", nodes, nodes, weight_bytes, weight_bytes, 0.0, iteration=iteration)
        for instrument in self.instruments:
            instrument.before_pass(pass_, gm)
        started = time.perf_counter()
        try:
            try:
                result = self._apply(pass_, gm)
            finally:
                record.seconds = time.perf_counter() - started
            started = time.perf_counter()
            new_outputs, record.max_abs_diff = (
                self._check(pass_, gm, backup, flat_inputs, outputs) if self.verify else (outputs, None)
            )
            record.verify_seconds = time.perf_counter() - started
        except PassError as error:
            for instrument in self.instruments:
                instrument.after_pass_failed(pass_, gm, error)
            record.error = str(error)
            record.status = "failed" if self.on_error == "raise" else "rolled back"
            report.records.append(record)
            if self.on_error == "raise":
                error.report = report
                raise
            return backup, outputs, False
        for instrument in self.instruments:
            instrument.after_pass(pass_, gm, result)
        record.status = "changed" if result.changed else "unchanged"
        record.nodes_after, record.param_bytes_after = _node_count(gm), parameter_bytes(gm)
        record.stats, record.rule_hits = dict(result.stats), dict(result.rule_hits)
        record.near_misses = {k: dict(v) for k, v in result.near_misses.items()}
        report.records.append(record)
        return gm, new_outputs, result.changed

    @staticmethod
    def _apply(pass_: Pass, gm: fx.GraphModule) -> PassResult:
        try:
            result = pass_.run(gm)
            gm.recompile()
        except PassError:
            raise
        except Exception as error:
            raise PassError(f"pass {pass_.name!r} raised {type(error).__name__}: {error}", pass_.name) from error
        if not isinstance(result, PassResult):
            raise PassError(f"pass {pass_.name!r} returned {type(result).__name__}, expected PassResult", pass_.name)
        return result

    def _check(
        self, pass_: Pass, gm: fx.GraphModule, before: fx.GraphModule, flat_inputs: tuple[Any, ...], expected: Any
    ) -> tuple[Any, float]:
        try:
            actual, _ = run_and_record(gm, flat_inputs)
        except Exception as error:
            raise VerificationError(
                f"pass {pass_.name!r} produced a graph that fails to run: {type(error).__name__}: {error}",
                pass_.name,
            ) from error
        problems = lint(gm)
        if problems:
            raise VerificationError(
                f"pass {pass_.name!r} produced a malformed graph: " + "; ".join(problems[:5]), pass_.name
            )
        comparison = compare_outputs(actual, expected, self.tolerance_scale)
        if not comparison.ok:
            node = first_divergence(before, gm, flat_inputs, self.tolerance_scale)
            where = f"; first diverging node: {node}" if node else ""
            raise VerificationError(
                f"pass {pass_.name!r} changed the model's outputs ({comparison.detail}){where}. "
                "Fix the pass, disable it (disabled=[...]) or use on_error='rollback'.",
                pass_.name,
                node,
            )
        return actual, comparison.max_abs_diff
