"""``OptimizedModel``: what ``graphopt.optimize`` returns and ``graphopt.load`` reads back.

It holds two forms of the optimized model: the **portable graph** (the target-independent
ATen ``fx.GraphModule`` the passes produced and verified; what ``save``, ``export_onnx``,
``graphopt.distill``, ``graphopt.analyze`` and optimizing again start from) and the
**runner** the target lowered it to. Its example inputs are public too (``example_inputs``,
``example_kwargs``), so that every workflow reads the same documented properties.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.errors import InputError, SaveFileError, VerificationError
from graphopt.ir.capture import CapturedModel, flatten_inputs
from graphopt.ir.graph import clone_graph_module, preserved_state, run_and_record, tensor_versions, written_since
from graphopt.ir.verify import Comparison, compare_outputs
from graphopt.passes.lossy.base import Fidelity, output_cosine
from graphopt.report import Report, ReportSection
from graphopt.targets.base import LoweringContext, Target, get_target
from graphopt.targets.gpu.target import retarget_device_constants, retarget_meta_values
from graphopt.targets.tune import lower_model
from graphopt.workflows.generation import GenerativeModel, generation_target, is_generation, load_generative
from graphopt.workflows.lowering_fallback import lowered_or_fallback
from graphopt.workflows.save_load import read_archive, write_archive

if TYPE_CHECKING:
    from graphopt.targets.onnx.packaging import OrtFiles, OrtPlatform

__all__ = ["EXPORTS_SECTION", "FP16_EXPORT_MIN_COSINE", "OnnxPrecision", "OptimizedModel", "Signature",
           "budget_comparison", "input_signature", "load"]

log = logging.getLogger("graphopt")

OnnxPrecision = Literal["fp32", "fp16"]
"""What ``export_onnx`` stores weights and activations in."""

FP16_EXPORT_MIN_COSINE = 0.999
"""Output cosine to eager an fp16 ONNX file keeps when the model has no fidelity budget of its own."""

EXPORTS_SECTION = "exported files"
"""Title of the report section listing what ``export_onnx`` / ``export_ort`` wrote."""

Signature = list[tuple[tuple[int, ...], torch.dtype] | None]
"""Per flat input: the example's shape and dtype (None for a non-tensor input)."""


def _to_half(value: Any) -> Any:
    """A float32 tensor as float16 (what a float16 file without float32 inputs takes); anything else as it is."""
    return value.half() if isinstance(value, torch.Tensor) and value.dtype == torch.float32 else value


def input_signature(values: Sequence[Any]) -> Signature:
    """The ``Signature`` of flat input values."""
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


def budget_comparison(actual: list[Any], reference: list[Any], budget: Fidelity) -> Comparison:
    """Compare lossy outputs with eager by cosine; ``max_scaled_diff`` carries the cosine."""
    exact = compare_outputs(actual, reference)
    cosine = output_cosine(reference, actual)
    ok = cosine >= budget.min_cosine or not budget.enforce or budget.metric is not None
    detail = "" if ok else f"output cosine {cosine:.5f} < {budget.min_cosine:g} (the fidelity budget)"
    return Comparison(ok, exact.max_abs_diff, cosine, detail)


class OptimizedModel(torch.nn.Module):
    """The result of ``optimize``: call it like the original model.

    ``graph_module`` is the optimized ATen fx graph, on the target's device; ``portable_graph``
    the same with its weights on the CPU (what ``save``, ``export_onnx``, ``distill`` and
    optimizing again use). ``runner`` is what the target lowered it to (a lowered copy with
    oneDNN / int8 / cuBLASLt kernels for ``cpu``/``gpu``, or the graph module itself when nothing
    applied; an onnxruntime session for ``onnx``). ``report`` says what every pass did,
    ``dynamic`` which input dims may vary between calls, ``budget`` the fidelity budget the
    outputs are held to after lossy passes (None: the exact tolerance). ``example_inputs`` and
    ``example_kwargs`` are the inputs it was captured and checked on.
    """

    def __init__(self, graph_module: fx.GraphModule, runner: Any, target: Target, report: Report,
                 captured: CapturedModel, budget: Fidelity | None = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        if runner is graph_module:
            self.__dict__["runner"] = runner  # one module, registered once: no duplicate state_dict keys
        else:
            self.runner = runner
        self.target = target
        self.report = report
        self._example_args = tuple(captured.example_args)
        self._example_kwargs = dict(captured.example_kwargs)
        self._reference = captured.reference_outputs
        self.budget = budget  # after lossy passes: what outputs are held to instead of tolerance
        self._signature = input_signature(captured.flat_inputs)
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

    # -- the public object model ------------------------------------------------------------

    @property
    def portable_graph(self) -> fx.GraphModule:
        """The optimized, target-independent ATen graph with its weights on the CPU.

        What ``save``, ``export_onnx``, ``graphopt.distill``, ``graphopt.analyze``,
        ``graphopt.partition`` and ``graphopt.optimize(fast, ...)`` start from: no target
        lowering is in it (a quantized graph holds explicit quantize / dequantize nodes). It is
        ``graph_module`` itself on the CPU, and a fresh CPU copy on every access when the model
        lives on another device. Treat it as read-only: it may share weights with your model.
        """
        on_cpu = all(t.device.type == "cpu" for t in [*self.graph_module.parameters(), *self.graph_module.buffers()])
        if on_cpu:
            return self.graph_module
        copy_on_cpu = clone_graph_module(self.graph_module).to("cpu")
        retarget_device_constants(copy_on_cpu, torch.device("cpu"))
        retarget_meta_values(copy_on_cpu, torch.device("cpu"))
        return copy_on_cpu

    @property
    def example_inputs(self) -> tuple[Any, ...]:
        """The positional example inputs, as a tuple: ``fast(*fast.example_inputs, **fast.example_kwargs)``."""
        return self._example_args

    @property
    def example_kwargs(self) -> dict[str, Any]:
        """The keyword example inputs (a new dict on every access; empty when there were none)."""
        return dict(self._example_kwargs)

    @property
    def signature(self) -> Signature:
        """Per flat input (positional, then keyword): the example's shape and dtype; None for a non-tensor input."""
        return list(self._signature)

    def check_inputs(self, *args: Any, **kwargs: Any) -> None:
        """Raise ``InputError`` when a call with these inputs would not fit the model.

        Inputs must have the example's structure, dtypes and sizes, except the dims declared
        dynamic (which may take any size in their range).
        """
        self._check_call(args, kwargs)

    def with_graph(self, graph_module: fx.GraphModule, report: Report) -> OptimizedModel:
        """A new model for ``graph_module`` (e.g. fine-tuned by ``distill``), lowered like this one.

        It keeps this model's target, example inputs and dynamic dims. Its reference outputs are
        the new graph's own on the example, so the lowered model (and ``export_onnx``) is checked
        against what that graph computes; a lowering that differs raises ``VerificationError``.
        """
        args, kwargs = self._example_args, self._example_kwargs
        flat = flatten_inputs(graph_module, args, kwargs)
        outputs, _ = run_and_record(graph_module, flat)
        captured = CapturedModel(graph_module, args, dict(kwargs), flat, pytree.tree_leaves(outputs),
                                 dynamic=self.dynamic)
        started = time.perf_counter()
        runner = self.target.lower(graph_module, LoweringContext.from_captured(captured))
        report.lowering_seconds = time.perf_counter() - started
        rebuilt = OptimizedModel(graph_module, runner, self.target, report, captured)
        if runner is not graph_module:
            with preserved_state(graph_module):
                lowered = rebuilt(*args, **kwargs)
            comparison = compare_outputs(pytree.tree_leaves(lowered), captured.reference_outputs)
            if not comparison.ok:
                raise VerificationError(f"the rebuilt model lowered to {self.target.name!r} differs from its graph: "
                                        f"{comparison.detail}", f"lower-{self.target.name}")
        return rebuilt

    # -- calling ---------------------------------------------------------------------------

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

    # -- writing ---------------------------------------------------------------------------

    def export_onnx(self, path: str | Path, opset: int | None = None, precision: OnnxPrecision = "fp32",
                    keep_io_types: bool = True) -> Path:
        """Write the optimized graph as an ONNX file, checked and compared in the runtime that runs it.

        The model the ``onnx`` target (or ``CpuLowering(backend="onnxruntime" / "openvino")``) runs is
        written as it is, checked in its runtime; other files are exported and checked in onnxruntime.

        ``opset``: the ONNX opset, ``MIN_OPSET`` to ``MAX_OPSET`` of ``graphopt.targets.onnx.opsets``
        (``opset_for_onnxruntime("1.17")`` gives the newest a runtime reads; default: the model the
        onnx target runs, else the exporter's default). Attention is one ``Attention`` node from
        opset 23, standard ops below. ``precision="fp16"`` stores weights and activations as float16
        (about half the file), held to the model's fidelity budget (``Fidelity(min_cosine=0.999)``
        when it has none); ``keep_io_types`` keeps the inputs and outputs float32 (onnxruntime's x86
        CPU kernels compute most float16 operators in float32, so the check here can be kinder than
        a device with float16 arithmetic). The file, its size and its measured error go into the
        report's "exported files" section. Raises ``VerificationError`` when the runtime's outputs
        differ from the original model's (or miss the budget).
        """
        session, budget = self._onnx_session(opset, precision, keep_io_types)
        half_io = precision == "fp16" and not keep_io_types
        error = self._check_export(session, budget, f"{precision} ONNX", half_io=half_io)
        path = session.save(path)
        self._record_export(path, "onnx", session.model, precision, error)
        return path

    def export_ort(self, path: str | Path, opset: int | None = None, platform: OrtPlatform = "arm") -> OrtFiles:
        """Write the model in onnxruntime's ORT format (mobile and minimal builds) and its operator list.

        The ONNX model (as ``export_onnx`` checks it) is converted by onnxruntime's own tool,
        optimized for ``platform`` (``"arm"``, or ``"amd64"`` for x86 devices); the ``.ort`` file
        is loaded back and compared again. Beside it, ``<name>.required_operators.config`` is
        what onnxruntime's build script takes (``--include_ops_by_config``) to build a runtime
        holding only these operators. Returns both paths (``OrtFiles``).
        """
        from graphopt.targets.onnx.packaging import write_ort_format
        from graphopt.targets.onnx.target import OnnxRuntimeModule

        session, budget = self._onnx_session(opset, "fp32", True)
        self._check_export(session, budget, "ONNX")
        path = Path(path)
        with tempfile.TemporaryDirectory() as folder:
            files = write_ort_format(session.save(Path(folder) / f"{path.stem}.onnx"), path, platform)
        converted = OnnxRuntimeModule.from_file(files.model, getattr(self.graph_module, "_out_spec", None))
        error = self._check_export(converted, budget, "ORT-format")
        self._record_export(files.model, "ort", session.model, "fp32", error)
        return files

    def _onnx_session(self, opset: int | None, precision: OnnxPrecision, keep_io_types: bool) -> tuple[Any, Any]:
        """A runtime module over the file to write (the lowered model's own when it fits), and its budget."""
        # onnx and onnxruntime take about a second to import: only when exporting
        from graphopt.targets.onnx.export import tidy_model
        from graphopt.targets.onnx.openvino_runtime import OpenVinoModule
        from graphopt.targets.onnx.opsets import check_opset, opset_of, stamp_ir_version
        from graphopt.targets.onnx.packaging import float16_model
        from graphopt.targets.onnx.target import OnnxRuntimeModule, export_onnx_model

        check_opset(opset)
        if precision not in ("fp32", "fp16"):
            raise InputError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
        out_spec = getattr(self.graph_module, "_out_spec", None)
        own = self._onnx_runner()
        if own is not None and (opset is None or opset_of(own.model) == opset):
            model = own.model
            if isinstance(own, OpenVinoModule):  # exported for OpenVINO alone, untidied: the file gets it, and is
                model = tidy_model(model)         # checked in OpenVINO (onnxruntime lacks bfloat16 convolutions)
                own = OpenVinoModule(model, own.out_spec, own.precision, own.threads)
            if opset is not None:  # asked for an opset: the oldest IR version it allows, as a fresh export has
                model, own = stamp_ir_version(copy.deepcopy(model) if own is not None else model), None
        else:
            self._check_weights_unchanged()
            model = export_onnx_model(self.portable_graph, self.example_inputs, self.example_kwargs, self.dynamic,
                                      opset)
            own = None
        budget = self.budget
        if precision == "fp16":
            model, own = float16_model(model, keep_io_types), None
            budget = budget or Fidelity(min_cosine=FP16_EXPORT_MIN_COSINE)
        return own or OnnxRuntimeModule(model, out_spec), budget

    def _onnx_runner(self) -> Any:
        """The runner when it runs an ONNX export (onnxruntime's session, OpenVINO's compiled model), else None.

        Its file is what it ran and was checked, and it checks a copy of itself in its own runtime.
        """
        from graphopt.targets.onnx.openvino_runtime import OpenVinoModule
        from graphopt.targets.onnx.target import OnnxRuntimeModule

        return self.runner if isinstance(self.runner, OnnxRuntimeModule | OpenVinoModule) else None

    def _check_export(self, session: Any, budget: Fidelity | None, kind: str,
                      half_io: bool = False) -> tuple[float, float]:
        """Run the exported model on the example: its max |Δ| and output cosine to eager.

        ``half_io``: the file takes and returns float16 where the model has float32. Raises
        ``VerificationError`` unless it matches eager (exact tolerance) or the ``budget``.
        """
        args, kwargs = self.example_inputs, self.example_kwargs
        if half_io:
            args, kwargs = pytree.tree_map(_to_half, (args, kwargs))
        outputs = pytree.tree_leaves(session(*args, **kwargs))
        if half_io:
            outputs = [o.float() if isinstance(o, torch.Tensor) and o.dtype == torch.float16 else o for o in outputs]
        if budget is None:
            comparison = compare_outputs(outputs, self._reference)
        else:
            comparison = budget_comparison(outputs, self._reference, budget)
        if not comparison.ok:
            raise VerificationError(f"the {kind} export computes different outputs: {comparison.detail}",
                                    "export-onnx")
        log.info("%s outputs match (max |Δ| %.2e)", kind, comparison.max_abs_diff)
        return comparison.max_abs_diff, output_cosine(self._reference, outputs)

    def _record_export(self, path: Path, kind: str, model: Any, precision: str, error: tuple[float, float]) -> None:
        """A row of the report's "exported files" section: file, format, opset, precision, size, error."""
        from graphopt.targets.onnx.opsets import opset_of

        size = sum(p.stat().st_size for p in (path, Path(str(path) + ".data")) if p.exists())
        section = next((s for s in self.report.sections if s.title == EXPORTS_SECTION), None)
        if section is None:
            section = ReportSection(EXPORTS_SECTION, "files written by export_onnx / export_ort, each run in "
                                    "onnxruntime and compared with the original model on the example",
                                    ["file", "format", "opset", "precision", "MB", "max |Δ|", "cosine"])
            self.report.sections.append(section)
        section.rows.append([path.name, kind, opset_of(model), precision, round(size / 1e6, 3), float(error[0]),
                             round(float(error[1]), 6)])

    def save(self, path: str | Path) -> Path:
        """Write the optimized model as a torch.export ``.pt2`` file with graphopt's metadata.

        ``graphopt.load(path)`` gives it back in another process (no pickled code is run).
        """
        self._check_weights_unchanged()
        return write_archive(path, self.portable_graph, self.example_inputs, self.example_kwargs,
                             dynamic=self.dynamic, target=self.target.name, report=self.report)


def load(path: str | Path, target: str | Target | None = None) -> OptimizedModel | GenerativeModel:
    """Load a model written by ``save``, lowered to its target (or to ``target``).

    What ``OptimizedModel.save`` wrote comes back as an ``OptimizedModel``, what
    ``GenerativeModel.save`` wrote as a ``GenerativeModel`` with the steps of the batch sizes it
    was saved with. Raises ``SaveFileError`` naming the file when it is missing, truncated,
    corrupt or not a graphopt save. A target given by name (or the saved one) lowers the way
    ``optimize`` would pick for the graph (``Target.for_graph``: OpenVINO for a bfloat16 or static
    int8 convolution graph on ``cpu`` where it is installed, at its f32 hint, since the budget is
    not saved; ``Target.runtime_candidates`` measured on the saved example inputs), falling back
    to the target's own lowering when that one cannot lower it. No pickled code is executed. When
    the outputs are classes of an installed package (a transformers ``ModelOutput``), that package
    is imported so their structure can be rebuilt.
    """
    archive = read_archive(path)
    if is_generation(archive.metadata):
        named = chosen = get_target(target or archive.target)
        if not isinstance(target, Target):  # asked for by name: the generation default lowering, as optimize does
            chosen = generation_target(named)
        chosen.check_available()
        return load_generative(archive, chosen, fallback=named if named is not chosen else None)
    gm = archive.graph_module
    flat_inputs = flatten_inputs(gm, archive.example_args, archive.example_kwargs)
    try:
        outputs, _ = run_and_record(gm, flat_inputs)
    except Exception as error:
        raise SaveFileError(f"{archive.path}: the loaded graph fails on its own example inputs: {error}") from error
    named = get_target(target or archive.target)
    named.check_available()
    chosen = named if isinstance(target, Target) else named.for_graph(gm)  # by name: the lowering optimize picks
    captured = CapturedModel(
        graph_module=gm,
        example_args=archive.example_args,
        example_kwargs=archive.example_kwargs,
        flat_inputs=flat_inputs,
        reference_outputs=pytree.tree_leaves(outputs),
        notes=[],
        dynamic=archive.dynamic,
    )
    choices = [] if isinstance(target, Target) else chosen.runtime_candidates(gm)  # measured, as optimize does
    (runner, chosen), _ = lowered_or_fallback(
        lambda target: lower_model(target, gm, captured, None, choices=choices if target is chosen else []),
        chosen, named, archive.report.notes, "the loaded graph")
    return OptimizedModel(gm, runner, chosen, archive.report, captured)
