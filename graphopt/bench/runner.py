"""Benchmark backends and the measurement loop (setup, fidelity, memory, interleaved timing).

A backend is a small object with a ``name``, the ``device`` its inputs live on, and a
``prepare(model, example_inputs)`` that returns a callable; subclass ``Backend`` to add
one (the tests inject a deliberately wrong backend this way).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from graphopt.bench.report import NOISY_IQR_PCT, BenchRow, TimingStats

Runner = Callable[..., Any]


class UnknownBackendError(ValueError):
    """A backend name given to the benchmark is not one it knows (the message lists them)."""


@dataclass(frozen=True)
class Backend:
    """A way of running a model: eager PyTorch unless a subclass overrides ``prepare``.

    ``device`` is where the harness puts the inputs before timed calls ("cpu" or "cuda").
    """

    name: str = "eager"
    device: str = "cpu"

    def skip_reason(self) -> str | None:
        """Why this backend cannot run on this machine, or None when it can."""
        return None

    def prepare(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Runner:
        """Return a callable computing ``model`` (the model is the backend's own copy, on the CPU)."""
        return model.to(self.device)

    def notes(self) -> list[str]:
        """Short facts shown in the row's status column (e.g. what was cold-started)."""
        return []

    def artifact_bytes(self, runner: Runner, workdir: Path) -> int | None:
        """Bytes on disk of what the backend runs: its state_dict when it is a module."""
        if not isinstance(runner, nn.Module):
            return None
        path = workdir / f"{self.name}.pt"
        torch.save(runner.state_dict(), path)
        return path.stat().st_size

    def describe(self, runner: Runner) -> str | None:
        """Extra text kept in the JSON row (graphopt's per-pass report)."""
        return None


@dataclass(frozen=True)
class TorchCompileBackend(Backend):
    """``torch.compile(model)`` with the default (inductor) backend.

    ``prepare`` makes the first call, which is when torch.compile compiles; with
    ``cold_cache`` the inductor caches are disabled so the reported setup time is a
    cold compile that does not depend on earlier runs.
    """

    name: str = "torch.compile"
    cold_cache: bool = True

    def prepare(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Runner:
        """Compile and make the first call (so compile errors surface here)."""
        import torch._dynamo
        import torch._inductor.config as inductor_config

        torch._dynamo.reset()  # copies of one class share code objects: avoid guard-failure recompiles
        compiled = torch.compile(model.to(self.device))
        inputs = tuple(x.to(self.device) for x in example_inputs)
        with inductor_config.patch(force_disable_caches=self.cold_cache), torch.no_grad():
            compiled(*inputs)
        return compiled

    def notes(self) -> list[str]:
        """Say whether setup was a cold compile."""
        return ["cold compile"] if self.cold_cache else []

    def artifact_bytes(self, runner: Runner, workdir: Path) -> int | None:
        """The compiled module's state_dict (same weights as the original)."""
        module = getattr(runner, "_orig_mod", runner)
        return super().artifact_bytes(module, workdir)


class ExportedOnnx:
    """The original model exported with ``torch.onnx.export(dynamo=True)`` into a temp dir, for a peer runtime."""

    def __init__(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...], prefix: str) -> None:
        from graphopt.targets.onnx.export import quiet_loggers  # loads onnx: only for the peers that need it

        self._dir = tempfile.TemporaryDirectory(prefix=prefix)
        self.path = Path(self._dir.name) / "model.onnx"
        with quiet_loggers("torch.onnx", "onnxscript"):  # its constant folding warns of every shape it cannot fold
            torch.onnx.export(model, example_inputs, dynamo=True, verbose=False).save(str(self.path))

    def disk_bytes(self) -> int:
        """Size of the ONNX file plus any external-data files next to it."""
        return sum(p.stat().st_size for p in self.path.parent.iterdir() if p.is_file())


class OrtRunner(ExportedOnnx):
    """Calls an onnxruntime session with torch tensors; keeps its ONNX file in a temp dir."""

    def __init__(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...], threads: int,
                 providers: list[str]) -> None:
        import onnxruntime as ort

        super().__init__(model, example_inputs, "graphopt-bench-ort-")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Run the session on CPU tensors and return its outputs as tensors."""
        feed = {name: x.detach().cpu().numpy() for name, x in zip(self.input_names, inputs, strict=True)}
        return [torch.from_numpy(y) for y in self.session.run(None, feed)]


@dataclass(frozen=True)
class OnnxRuntimeBackend(Backend):
    """``torch.onnx.export(model, dynamo=True)`` of the original model, run in onnxruntime.

    Inputs are host tensors (converted to numpy each call), also with the CUDA provider.
    """

    name: str = "onnxruntime"
    threads: int = 1
    provider: str = "CPUExecutionProvider"

    def skip_reason(self) -> str | None:
        """The requested execution provider must be present in this onnxruntime build."""
        import onnxruntime as ort

        if self.provider not in ort.get_available_providers():
            return f"{self.provider} is not available in this onnxruntime build"
        return None

    def prepare(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Runner:
        """Export to ONNX and open an inference session with ``threads`` intra-op threads."""
        return OrtRunner(model, example_inputs, self.threads, [self.provider])

    def notes(self) -> list[str]:
        """Name the execution provider when it is not the CPU one."""
        return [] if self.provider == "CPUExecutionProvider" else [f"{self.provider}, host I/O"]

    def artifact_bytes(self, runner: Runner, workdir: Path) -> int | None:
        """The exported ONNX file's size."""
        return runner.disk_bytes() if isinstance(runner, OrtRunner) else None


@dataclass(frozen=True)
class GraphoptBackend(Backend):
    """``graphopt.optimize(model, example_inputs, target=..., tune=..., precision=...)``.

    ``tune`` measures the target's candidate lowerings and keeps the fastest; ``precision``
    ("bf16", "fp16") runs matrix layers in reduced precision under the default fidelity budget;
    ``cpu_backend`` picks ``CpuLowering(backend=...)`` (``"openvino"``, ``"onnxruntime"``...).
    """

    name: str = "graphopt-cpu"
    target: str = "cpu"
    tune: bool = False
    precision: str | None = None
    cpu_backend: str | None = None

    def skip_reason(self) -> str | None:
        """graphopt.optimize must be importable."""
        try:
            from graphopt import optimize  # noqa: F401
        except ImportError as exc:
            return f"graphopt.optimize is not importable: {exc}"
        return None

    def prepare(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Runner:
        """Capture, optimize and lower the model for ``target``."""
        from graphopt import optimize

        options: dict[str, Any] = {}
        if self.tune:
            options["tune"] = True
        if self.precision:
            options["precision"] = self.precision
        if self.cpu_backend:
            from graphopt.targets.cpu.lowering import CpuLowering

            options["lowering"] = CpuLowering(backend=self.cpu_backend)
        return optimize(model, example_inputs, target=self.target, **options)

    def artifact_bytes(self, runner: Runner, workdir: Path) -> int | None:
        """The ONNX file for the onnx target and ONNX-running backends, the optimized state_dict otherwise."""
        if self.target == "onnx" or self.cpu_backend in ("onnxruntime", "openvino"):
            return runner.export_onnx(workdir / f"{self.name}.onnx").stat().st_size
        return super().artifact_bytes(runner, workdir)

    def notes(self) -> list[str]:
        """Which lowering ``tune`` kept is in the details; say that setup includes tuning."""
        return ["setup includes tuning"] if self.tune else []

    def describe(self, runner: Runner) -> str | None:
        """The per-pass report table of the optimized model."""
        report = getattr(runner, "report", None)
        return None if report is None else str(report)


# ------------------------------------------------------------------------ measuring


def flatten_outputs(outputs: Any) -> list[torch.Tensor]:
    """Every tensor in a (possibly nested) output, detached, on the CPU, as float64."""
    if hasattr(outputs, "to_tuple"):  # Hugging Face ModelOutput
        outputs = outputs.to_tuple()
    leaves = pytree.tree_leaves(outputs)
    return [torch.as_tensor(x).detach().cpu().to(torch.float64) for x in leaves if hasattr(x, "shape")]


def compare_to_reference(outputs: Any, reference: list[torch.Tensor]) -> tuple[float, float]:
    """(max abs difference, minimum row-wise cosine similarity) of ``outputs`` against ``reference``.

    Raises ValueError when the outputs differ in number or shape.
    """
    got = flatten_outputs(outputs)
    if len(got) != len(reference):
        raise ValueError(f"backend returned {len(got)} output tensors, eager returned {len(reference)}")
    max_diff, min_cos = 0.0, 1.0
    for out, ref in zip(got, reference, strict=True):
        if out.shape != ref.shape:
            raise ValueError(f"backend output shape {tuple(out.shape)} differs from eager {tuple(ref.shape)}")
        if out.numel() == 0:
            continue
        max_diff = max(max_diff, float((out - ref).abs().max()))
        rows = ref.shape[0] if ref.dim() >= 2 else 1
        cos = F.cosine_similarity(out.reshape(rows, -1), ref.reshape(rows, -1), dim=1, eps=1e-12)
        min_cos = min(min_cos, float(cos.min()))
    return max_diff, min_cos


class MemoryProbe:
    """Peak memory growth of a code region on one device, in MiB.

    CPU: the kernel's resident-set high-water mark (VmHWM), reset through
    /proc/self/clear_refs before the region; where that is not allowed, the growth
    of ``resource.getrusage`` max RSS (which only shows growth above earlier peaks).
    CUDA: ``torch.cuda.max_memory_allocated`` (tensors allocated through PyTorch only).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.hwm_reset = device == "cpu" and _reset_hwm()

    @property
    def method(self) -> str:
        """How this probe measures, in words (stored in the run's metadata)."""
        if self.device != "cpu":
            return "CUDA: torch.cuda.max_memory_allocated growth (PyTorch allocations only)"
        if self.hwm_reset:
            return "CPU: peak RSS growth (VmHWM reset via /proc/self/clear_refs)"
        return "CPU: resource.getrusage max RSS growth (only growth above the process's earlier peak)"

    @contextlib.contextmanager
    def measure(self) -> Iterator[list[float]]:
        """Context manager yielding a list that holds the peak growth (MiB) after the block."""
        result: list[float] = []
        if self.device != "cpu":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        elif self.hwm_reset:
            _reset_hwm()
            base = _proc_status_kib("VmRSS") * 1024
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        yield result
        if self.device != "cpu":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.hwm_reset:
            peak = _proc_status_kib("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result.append(max(0, peak - base) / 2**20)


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") > 0


def _proc_status_kib(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class TimingPlan:
    """How long to measure one model x batch: warm-up rounds, then rounds until the budget.

    Rounds go on until at least ``min_repeats`` are done and either ``max_seconds`` have
    passed or ``max_repeats`` are done. One sample times enough back-to-back calls to
    last ``min_sample_s`` (so sub-millisecond calls are not dominated by timer overhead).
    Between two backends' samples the harness idles ``gap_s``: thread pools (onnxruntime's,
    OpenMP's) spin-wait for a while after a call, and without the gap that spinning would
    steal cores from whichever backend runs next. onnxruntime's pool spins for 30-60 ms: on the
    2-core machine, a ResNet-50 call right after an onnxruntime call took 70 ms with no gap,
    60 ms with 10 ms, 37 ms with 60 ms or more (38 ms alone).
    """

    warmup: int = 2
    min_repeats: int = 7
    max_seconds: float = 10.0
    max_repeats: int = 200
    min_sample_s: float = 0.002
    gap_s: float = 0.1

    def __post_init__(self) -> None:
        if self.min_repeats < 2:
            raise ValueError(f"min_repeats must be at least 2 (a spread needs two samples), got {self.min_repeats}")
        if self.max_seconds < 0 or self.warmup < 0 or self.gap_s < 0:
            raise ValueError("max_seconds, warmup and gap_s must not be negative")

    def describe(self) -> str:
        """One line for report headers."""
        return (f"{self.warmup} warm-up rounds, then round-robin rounds until >= {self.min_repeats} and "
                f"({self.max_seconds:g} s or {self.max_repeats} rounds), samples >= {self.min_sample_s * 1e3:g} ms, "
                f"{self.gap_s * 1e3:g} ms idle between backends")


@dataclass
class _Prepared:
    row: BenchRow
    runner: Runner
    inputs: tuple[torch.Tensor, ...]
    inner: int = 1
    samples: list[float] = field(default_factory=list)


Progress = Callable[[str], None]


def _short_error(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:160]}"


def _batch_of(inputs: tuple[torch.Tensor, ...]) -> int:
    return int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_call(item: _Prepared, device: str) -> float:
    """Seconds per call, averaged over ``item.inner`` back-to-back calls."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(item.inner):
        item.runner(*item.inputs)
    _sync(device)
    return (time.perf_counter() - start) / item.inner


def setup_backend(backend: Backend, name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...],
                  reference: list[torch.Tensor], probe: MemoryProbe, workdir: Path) -> _Prepared | BenchRow:
    """Prepare one backend, make its first call, and measure setup time, memory, size and fidelity.

    Returns the prepared runner, or a finished row with ``error`` set when any step failed.
    """
    row = BenchRow(name, _batch_of(inputs), backend.name, backend.device, notes=backend.notes())
    own_model = copy.deepcopy(model)  # before the probe: the copy is not the backend's cost
    device_inputs = tuple(x.to(backend.device) for x in inputs)
    try:  # libraries print progress to stdout, which belongs to the result table
        with contextlib.redirect_stdout(sys.stderr), probe.measure() as peak, torch.no_grad():
            start = time.perf_counter()
            runner = backend.prepare(own_model, inputs)
            row.prepare_s = time.perf_counter() - start
            _sync(backend.device)
            start = time.perf_counter()
            outputs = runner(*device_inputs)
            _sync(backend.device)
            row.first_call_s = time.perf_counter() - start
        row.setup_peak_mib = peak[0]
        del own_model
        row.max_abs_diff, row.min_cosine = compare_to_reference(outputs, reference)
        with contextlib.redirect_stdout(sys.stderr):
            size = backend.artifact_bytes(runner, workdir)
        row.size_mb = None if size is None else size / 1e6
        row.details = backend.describe(runner)
    except Exception as exc:  # a failing backend is a result, not a crash
        row.error = _short_error(exc)
        row.details = f"{type(exc).__name__}: {exc}"
        return row
    return _Prepared(row, runner, device_inputs)


def _each_or_drop(active: list[_Prepared], action: Callable[[_Prepared], None], progress: Progress,
                  start: int = 0) -> None:
    """Apply ``action`` to every item from index ``start`` on, wrapping around.

    An item whose runner raises gets the error in its row and leaves ``active``.
    """
    for item in active[start:] + active[:start]:
        try:
            action(item)
        except Exception as exc:  # a backend failing mid-run is a result, not a crash
            item.row.error = _short_error(exc)
            item.row.details = f"{type(exc).__name__}: {exc}"
            active.remove(item)
            progress(f"{item.row.backend}: failed while timing: {item.row.error}")


def time_interleaved(prepared: list[_Prepared], plan: TimingPlan, progress: Progress) -> None:
    """Warm up, then time every runner round-robin (rotating the start) and fill each row's stats.

    A runner that raises is dropped (its row gets the error); the others go on.
    """
    def warm(item: _Prepared) -> None:
        item.runner(*item.inputs)

    def calibrate(item: _Prepared) -> None:
        one = _timed_call(item, item.row.device)
        item.inner = max(1, min(1000, math.ceil(plan.min_sample_s / max(one, 1e-9))))
        item.samples = []

    def sample(item: _Prepared) -> None:
        if plan.gap_s:
            time.sleep(plan.gap_s)
        item.samples.append(_timed_call(item, item.row.device))

    gc.collect()
    active = list(prepared)
    with torch.no_grad():
        for _ in range(plan.warmup):
            _each_or_drop(active, warm, progress)
        _each_or_drop(active, calibrate, progress)
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a collection inside one sample would be noise attributed to that backend
        try:
            start = last_report = time.perf_counter()
            rounds = 0
            while active:
                _each_or_drop(active, sample, progress, start=rounds % len(active))
                rounds += 1
                now = time.perf_counter()
                if rounds >= plan.min_repeats and (now - start >= plan.max_seconds or rounds >= plan.max_repeats):
                    break
                if now - last_report >= 5.0:
                    progress(f"timing: {rounds} rounds, {now - start:.0f} s")
                    last_report = now
        finally:
            if gc_was_enabled:
                gc.enable()
    for item in active:
        item.row.timing = TimingStats.from_samples(item.samples)
        item.row.noisy = item.row.timing.iqr_pct > NOISY_IQR_PCT


def time_into_rows(name: str, prepared: list[tuple[Any, _Prepared]], plan: TimingPlan, progress: Progress) -> None:
    """Time the prepared variants of model ``name`` round-robin and copy each one's figures into its row.

    ``prepared`` pairs a result row (any object with ``median_ms``, ``p10_ms``, ``p90_ms`` and
    ``error``) with the variant ``setup_backend`` prepared for it; a variant that fails while
    timing leaves its error in the row.
    """
    if not prepared:
        return
    progress(f"{name}: timing {len(prepared)} variants interleaved")
    time_interleaved([item for _, item in prepared], plan, progress)
    for row, item in prepared:
        timing = item.row.timing
        if timing is not None:
            row.median_ms, row.p10_ms, row.p90_ms = timing.median_ms, timing.p10_ms, timing.p90_ms
        row.error = row.error or item.row.error


def measure_model(name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...], backends: Sequence[Backend],
                  plan: TimingPlan, probe: MemoryProbe, progress: Progress) -> list[BenchRow]:
    """All rows for one model x batch: reference outputs, each backend's setup, interleaved timing."""
    model.eval()
    with torch.no_grad():
        reference = flatten_outputs(model(*inputs))
    rows: list[BenchRow] = []
    prepared: list[_Prepared] = []
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:
        for backend in backends:
            reason = backend.skip_reason()
            if reason:
                skipped = BenchRow(name, _batch_of(inputs), backend.name, backend.device, notes=[f"skipped: {reason}"])
                rows.append(skipped)
                progress(f"{backend.name}: skipped ({reason})")
                continue
            progress(f"{backend.name}: setup")
            result = setup_backend(backend, name, model, inputs, reference, probe, Path(tmp))
            if isinstance(result, BenchRow):
                progress(f"{backend.name}: failed: {result.error}")
                rows.append(result)
                continue
            progress(f"{backend.name}: ready in {result.row.setup_s:.2f} s, max |diff| {result.row.max_abs_diff:.1e}")
            rows.append(result.row)
            prepared.append(result)
    if prepared:
        progress(f"timing {len(prepared)} backends interleaved")
        time_interleaved(prepared, plan, progress)
        with torch.no_grad():
            for item in prepared:
                if item.row.error is None:
                    with probe.measure() as peak:
                        item.runner(*item.inputs)
                    item.row.run_peak_mib = peak[0]
    return rows
