"""``graphopt.optimize``: capture, run verified passes, lower to a target."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.capture import CapturedModel, capture, flatten_inputs
from graphopt.errors import InputError, UnknownPassError, VerificationError
from graphopt.instruments import Instrument
from graphopt.ir import clone_graph_module
from graphopt.pass_infra import Pass, resolve_pass
from graphopt.pass_manager import OnError, PassManager
from graphopt.report import Report
from graphopt.target import Target, get_target
from graphopt.verify import compare_outputs

__all__ = ["OptimizedModel", "optimize"]

log = logging.getLogger("graphopt")


def _signature(values: Sequence[Any]) -> list[tuple[tuple[int, ...], torch.dtype] | None]:
    return [(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None for v in values]


class OptimizedModel(torch.nn.Module):
    """The result of ``optimize``: call it like the original model.

    ``graph_module`` is the optimized fx graph, ``runner`` what the target lowered it to
    (the graph module itself for ``cpu``/``gpu``, an onnxruntime session for ``onnx``),
    ``report`` what every pass did.
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
        self._signature = _signature(captured.flat_inputs)

    def _check_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        got = _signature(flatten_inputs(self.graph_module, args, kwargs))
        for index, (have, want) in enumerate(zip(got, self._signature, strict=False)):
            if want is not None and have != want:
                raise InputError(
                    f"input {index} has shape {list(have[0]) if have else None} and dtype "
                    f"{have[1] if have else None}, but the model was optimized for shape {list(want[0])} "
                    f"and dtype {want[1]}. Run graphopt.optimize again with example inputs of the new shape."
                )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the optimized model (inputs are moved to the target's device)."""
        self._check_call(args, kwargs)
        args, kwargs = self.target.move_inputs(args, kwargs)
        with torch.inference_mode():
            return self.runner(*args, **kwargs)

    def _cpu_graph(self) -> fx.GraphModule:
        """The optimized graph with its weights on the CPU (a copy when it lives on another device)."""
        on_cpu = all(t.device.type == "cpu" for t in [*self.graph_module.parameters(), *self.graph_module.buffers()])
        if on_cpu:
            return self.graph_module
        from graphopt.targets.gpu import retarget_device_constants

        copy_on_cpu = clone_graph_module(self.graph_module).to("cpu")
        retarget_device_constants(copy_on_cpu, torch.device("cpu"))
        return copy_on_cpu

    def export_onnx(self, path: str | Path) -> Path:
        """Write the optimized graph as an ONNX file, checked and compared in onnxruntime.

        Raises ``VerificationError`` when onnxruntime's outputs differ from the original model's.
        """
        from graphopt.targets.onnx import OnnxRuntimeModule, export_graph_to_onnx

        if isinstance(self.runner, OnnxRuntimeModule):
            session = self.runner
        else:
            model = export_graph_to_onnx(self._cpu_graph(), self._example_args, self._example_kwargs)
            session = OnnxRuntimeModule(model, getattr(self.graph_module, "_out_spec", None))
        comparison = compare_outputs(session(*self._example_args, **self._example_kwargs), self._reference)
        if not comparison.ok:
            raise VerificationError(f"the ONNX export computes different outputs: {comparison.detail}", "export-onnx")
        log.info("ONNX outputs match (max |Δ| %.2e); writing %s", comparison.max_abs_diff, path)
        return session.save(path)


def _pipeline(target: Target, passes: Sequence[str | Pass] | None, disabled: Sequence[str]) -> list[Pass]:
    chosen = [resolve_pass(p) for p in (passes if passes is not None else target.default_passes)]
    unknown = set(disabled) - {p.name for p in chosen}
    if unknown:
        raise UnknownPassError(
            f"disabled= names passes that are not in the pipeline: {', '.join(sorted(unknown))}; "
            f"pipeline: {', '.join(p.name for p in chosen)}"
        )
    return [p for p in chosen if p.name not in set(disabled)]


def optimize(
    model: torch.nn.Module,
    example_inputs: Any,
    target: str | Target = "cpu",
    *,
    example_kwargs: dict[str, Any] | None = None,
    passes: Sequence[str | Pass] | None = None,
    disabled: Sequence[str] = (),
    verify: bool = True,
    on_error: OnError = "raise",
    fixed_point: bool = False,
    instruments: Sequence[Instrument] = (),
    tolerance_scale: float = 1.0,
) -> OptimizedModel:
    """Optimize ``model`` for ``target`` ("cpu", "gpu" or "onnx") and return a module computing the same.

    ``passes`` replaces the target's default pipeline (pass names or ``Pass`` objects);
    ``disabled`` drops passes by name. Every pass is verified on ``example_inputs`` unless
    ``verify=False``; a pass that breaks the outputs raises ``VerificationError`` naming it,
    or with ``on_error="rollback"`` is undone and reported. The user's model is never modified.
    """
    target = get_target(target)
    target.check_available()
    pipeline = _pipeline(target, passes, disabled)
    report = Report(target=target.name)

    started = time.perf_counter()
    captured = capture(model, example_inputs, example_kwargs)
    report.capture_seconds = time.perf_counter() - started
    report.notes.extend(captured.notes)
    log.info("captured %d nodes; running %d passes", len(captured.graph_module.graph.nodes), len(pipeline))

    manager = PassManager(pipeline, verify=verify, on_error=on_error, fixed_point=fixed_point,
                          instruments=instruments, tolerance_scale=tolerance_scale)
    gm = manager.run(captured.graph_module, captured.flat_inputs, report)

    started = time.perf_counter()
    runner = target.lower(gm, captured.example_args, captured.example_kwargs)
    report.lowering_seconds = time.perf_counter() - started
    optimized = OptimizedModel(gm, runner, target, report, captured)

    native = target.native_error(model, captured.example_args, captured.example_kwargs, captured.reference_outputs)
    if native > 0:
        report.notes.append(f"the original model on {target.name} differs from CPU eager by {native:.2e}; "
                            "the final check allows twice that on top of the usual tolerance")
    outputs = optimized(*captured.example_args, **captured.example_kwargs)
    comparison = compare_outputs(pytree.tree_leaves(outputs), captured.reference_outputs, tolerance_scale,
                                 extra_atol=2 * native)
    report.final_max_abs_diff = comparison.max_abs_diff
    report.final_check = "passed" if comparison.ok else f"FAILED ({comparison.detail})"
    if not comparison.ok and verify:
        raise VerificationError(
            f"the optimized model lowered to {target.name!r} differs from the original: {comparison.detail}",
            f"lower-{target.name}",
        )
    return optimized
