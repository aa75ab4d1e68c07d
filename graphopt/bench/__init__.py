"""``graphopt bench``: compare graphopt with eager PyTorch, torch.compile and onnxruntime.

Every model x batch is measured in one process: each backend is set up (timed, with its
memory growth, size on disk and output difference from eager), then all backends are
timed round-robin, one call each per round with a rotating start, so slow drifts of
the machine (thermal, other load) hit every backend alike.

    >>> from graphopt.bench import run_benchmark
    >>> result = run_benchmark(["resnet18"], size="small", backends=["eager", "graphopt-cpu"])
    >>> print(result)                    # table; result.to_markdown(), result.to_dict()

Arbitrary models can be measured too: pass ``(name, model, example_inputs)`` entries.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphopt.bench import zoo
from graphopt.bench.arg_types import positive_int
from graphopt.bench.generation_cli import add_generation_arguments, run_generation_command
from graphopt.bench.openvino_peer import OpenVinoBackend
from graphopt.bench.report import BenchResult, BenchRow, compute_ratios, machine_info, versions, write_result_files
from graphopt.bench.runner import (
    Backend,
    GraphoptBackend,
    MemoryProbe,
    OnnxRuntimeBackend,
    Progress,
    TimingPlan,
    TorchCompileBackend,
    UnknownBackendError,
    measure_model,
)
from graphopt.errors import DeviceUnavailableError

__all__ = [
    "Backend",
    "BenchResult",
    "BenchRow",
    "TimingPlan",
    "UnknownBackendError",
    "add_bench_parser",
    "default_backends",
    "make_backend",
    "run_bench_command",
    "run_benchmark",
]

TARGETS = ("cpu", "gpu")
BACKEND_NAMES = ("eager", "torch.compile", "onnxruntime", "openvino", "openvino-f32", "graphopt-cpu", "graphopt-onnx",
                 "graphopt-gpu",
                 "graphopt-cpu-tune", "graphopt-onnx-tune", "graphopt-gpu-tune", "graphopt-cpu-bf16",
                 "graphopt-cpu-bf16-tune", "graphopt-gpu-bf16", "graphopt-gpu-fp16", "graphopt-gpu-fp16-tune",
                 "graphopt-openvino", "graphopt-openvino-bf16")
"""graphopt rows: ``graphopt-<target>[-<precision>][-tune]`` (``tune=True``, ``precision=``);
``graphopt-openvino[-bf16]``: the cpu target with ``CpuLowering(backend="openvino")``."""

Entry = str | zoo.ZooModel | tuple[str, nn.Module, tuple[torch.Tensor, ...]]
"""A zoo name, a built ZooModel, or ``(name, model, example_inputs)`` for any model."""


def default_threads() -> int:
    """Number of CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_backend(name: str, target: str, threads: int) -> Backend:
    """Backend called ``name`` for ``target`` ("cpu" or "gpu"); raises UnknownBackendError."""
    device = "cuda" if target == "gpu" else "cpu"
    if name == "eager":
        return Backend("eager", device)
    if name == "torch.compile":
        return TorchCompileBackend(device=device)
    if name == "onnxruntime":
        provider = "CUDAExecutionProvider" if target == "gpu" else "CPUExecutionProvider"
        return OnnxRuntimeBackend(threads=threads, provider=provider)
    if name in ("openvino", "openvino-f32"):
        return OpenVinoBackend(name=name, threads=threads, precision="f32" if name == "openvino-f32" else None)
    if name in BACKEND_NAMES and name.startswith("graphopt-"):
        parts = name.removeprefix("graphopt-").split("-")
        graphopt_target = "cpu" if parts[0] == "openvino" else parts[0]
        precision = next((p for p in parts[1:] if p in ("bf16", "fp16")), None)
        return GraphoptBackend(name, "cuda" if graphopt_target == "gpu" else "cpu", graphopt_target,
                               tune="tune" in parts, precision=precision,
                               cpu_backend="openvino" if parts[0] == "openvino" else None)
    raise UnknownBackendError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")


def default_backends(target: str) -> list[str]:
    """Backend names measured when none are given: the peers plus graphopt for ``target``."""
    if target == "gpu":
        return ["eager", "torch.compile", "onnxruntime", "graphopt-gpu"]
    return ["eager", "torch.compile", "onnxruntime", "graphopt-cpu", "graphopt-onnx"]


def _resolve_backends(backends: Sequence[str | Backend] | None, target: str, threads: int) -> list[Backend]:
    chosen = [b if isinstance(b, Backend) else make_backend(b, target, threads)
              for b in (backends if backends is not None else default_backends(target))]
    names = [b.name for b in chosen]
    if "eager" in names and names.index("eager") != 0:  # eager first: its output is also sanity-checked first
        chosen.insert(0, chosen.pop(names.index("eager")))
    return chosen


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "gpu" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            "--target gpu needs a CUDA GPU and a CUDA build of PyTorch, and this machine has neither "
            f"(torch {torch.__version__}); run with --target cpu, or on a machine with a GPU"
        )


def _entries(models: Sequence[Entry], size: str, batches: Sequence[int]) -> list[tuple[str, Any, int | None]]:
    """(name, zoo name or built entry, batch) per measurement; built entries use their own batch."""
    plan: list[tuple[str, Any, int | None]] = []
    for entry in models:
        if isinstance(entry, str):
            zoo.check_name(entry)
            plan += [(entry, entry, b) for b in batches]
        elif isinstance(entry, zoo.ZooModel):
            plan.append((entry.name, (entry.model, entry.example_inputs), None))
        else:
            name, model, inputs = entry
            plan.append((name, (model, tuple(inputs)), None))
    return plan


def _prefixed(report: Progress, label: str) -> Progress:
    def report_for_model(message: str) -> None:
        report(f"{label}: {message}")

    return report_for_model


def _python_command(models: Sequence[Entry], **settings: Any) -> str:
    names = [m if isinstance(m, str) else (m.name if isinstance(m, zoo.ZooModel) else m[0]) for m in models]
    args = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    return f"graphopt.bench.run_benchmark({names!r}, {args})"


def _cli_command(models: Sequence[str], target: str, batches: Sequence[int], size: str, threads: int,
                 backends: Sequence[str]) -> str:
    parts = ["graphopt", "bench", *models, "--target", target, "--batch", ",".join(map(str, batches)),
             "--size", size, "--threads", str(threads), "--backends", ",".join(backends)]
    return shlex.join(parts)


def run_benchmark(
    models: Sequence[Entry],
    target: str = "cpu",
    batches: Sequence[int] = (1,),
    size: str = "full",
    backends: Sequence[str | Backend] | None = None,
    threads: int | None = None,
    min_repeats: int = 7,
    max_seconds: float = 10.0,
    warmup: int = 2,
    gap_s: float = TimingPlan.gap_s,
    progress: bool = True,
    command: str | None = None,
) -> BenchResult:
    """Measure every model x batch on every backend; see the module docstring for the method.

    ``models`` are zoo names (built at ``size`` for each of ``batches``) or built entries.
    ``backends`` are names (see ``BACKEND_NAMES``) or ``Backend`` objects; default: the
    peers plus graphopt for ``target``. ``threads`` (default: all usable cores) is applied
    to PyTorch and onnxruntime and restored afterwards. Timing: ``warmup`` rounds, then
    at least ``min_repeats`` rounds and up to ``max_seconds``, idling ``gap_s`` between
    backends (see ``TimingPlan``). A backend that fails is recorded in its row, never
    raised. ``command`` is stored as the reproducing command.
    """
    _check_target(target)
    threads = threads or default_threads()
    plan = TimingPlan(warmup=warmup, min_repeats=min_repeats, max_seconds=max_seconds, gap_s=gap_s)
    chosen = _resolve_backends(backends, target, threads)
    measurements = _entries(models, size, batches)
    probe = MemoryProbe("cuda" if target == "gpu" else "cpu")

    def report(message: str) -> None:
        if progress:
            print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    if command is None:
        if all(isinstance(m, str) for m in models) and all(isinstance(b, str) for b in backends or ["eager"]):
            command = _cli_command(models, target, batches, size, threads, [b.name for b in chosen])  # type: ignore[arg-type]
        else:
            command = _python_command(models, target=target, batches=tuple(batches), size=size,
                                      backends=[b.name for b in chosen], threads=threads)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[BenchRow] = []
    started = time.perf_counter()
    try:
        for index, (name, source, batch) in enumerate(measurements, 1):
            label = f"{name} batch {batch}" if batch else name
            report(f"[{index}/{len(measurements)}] {label}: building")
            if isinstance(source, str):
                try:
                    built = zoo.load(source, size=size, batch=batch or 1)
                except zoo.ModelUnavailableError as exc:
                    rows.append(BenchRow(name, batch or 1, "*", "-", error=str(exc)))
                    report(f"{label}: unavailable: {exc}")
                    continue
                model, inputs = built.model, built.example_inputs
            else:
                model, inputs = source
            rows += measure_model(name, model, inputs, chosen, plan, probe, _prefixed(report, label))
    finally:
        torch.set_num_threads(previous_threads)
    compute_ratios(rows)
    meta = {
        "target": target,
        "size": size,
        "batches": list(batches),
        "threads": threads,
        "backends": [b.name for b in chosen],
        "timing": plan.describe(),
        "memory_method": probe.method,
        "machine": machine_info(),
        "versions": versions(),
        "command": command,
        "argv": list(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    return BenchResult(rows, meta)


# ------------------------------------------------------------------------------ CLI


def _batches(text: str) -> list[int]:
    message = f"--batch takes comma-separated positive integers like 1,8; got {text!r}"
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(message)
    return values


def _backend_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in BACKEND_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown backend(s) {unknown or text!r}; choose from {', '.join(BACKEND_NAMES)}"
        )
    return names


def add_bench_parser(subparsers: Any) -> None:
    """Register the ``bench`` subcommand on an argparse subparsers object (sets ``func``)."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmark graphopt against eager, torch.compile and onnxruntime",
        description=(
            "Measure zoo models on every backend in one process, interleaved round-robin. "
            "Prints a table; --json / --markdown save it with machine facts and the reproducing command. "
            "Default batch is 1: full-size models at larger batches take minutes per backend on small machines."
        ),
    )
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"zoo models: {', '.join(zoo.list_models())}; outside the zoo (transformers configs, "
                             f"random weights): {', '.join(zoo.list_outside_models())}")
    parser.add_argument("--all", action="store_true", help="benchmark every zoo model")
    parser.add_argument("--outside", action="store_true",
                        help="benchmark every architecture outside the zoo (graphopt.bench.outside_zoo)")
    parser.add_argument("--target", choices=TARGETS, default="cpu", help="device to benchmark on (default cpu)")
    parser.add_argument("--batch", type=_batches, default=[1], help="comma-separated batch sizes (default 1)")
    parser.add_argument("--size", choices=zoo.SIZES, default="full", help="zoo model size (default full)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all usable cores)")
    parser.add_argument("--backends", type=_backend_list, default=None,
                        help=f"comma-separated subset of {','.join(BACKEND_NAMES)} (default: all for the target)")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="timing budget per model x batch (default 10)")
    parser.add_argument("--min-repeats", type=int, default=7, help="minimum timed rounds (default 7)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write all rows and metadata as JSON")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write a markdown report")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--prune", type=_ratios, default=None, metavar="R1,R2",
                        help="instead: dense vs structurally pruned graphopt models (e.g. 0.3,0.5) on cpu and onnx: "
                             "params, MACs, size, latency, speed-up and output cosine")
    parser.add_argument("--quantize", type=_schemes, default=None, metavar="S1,S2",
                        help="instead: float vs int8 (e.g. int8,int8-dynamic) on cpu and onnx, with eager and "
                             "onnxruntime's own dynamic int8 side by side: size, latency, speed-ups, output cosine")
    parser.add_argument("--compound", type=_ratio, default=None, metavar="RATIO",
                        help="with --quantize: add OpenVINO and, per scheme, the model pruned by RATIO, distilled on "
                             "unlabeled data (pydoc sentences for text models) and quantized (graphopt.recipe)")
    parser.add_argument("--distill-sentences", type=positive_int, default=1280, metavar="N",
                        help="with --compound: how many sentences (or random inputs) to distill on (default 1280)")
    parser.add_argument("--distill-text", type=Path, default=None, metavar="FILE",
                        help="with --compound: text models calibrate, distill and validate on this file's lines "
                             "(one sentence each) instead of pydoc's sentences")
    parser.add_argument("--distill-epochs", type=positive_int, default=2, metavar="N",
                        help="with --compound: distillation epochs (default 2)")
    parser.add_argument("--embedding-bits", type=int, choices=(3, 4, 8), default=4,
                        help="with --compound: how the compound rows store embedding tables (default 4)")
    parser.add_argument("--compound-cosine", type=float, default=0.99, metavar="COS",
                        help="with --compound: the quantization step's budget, output cosine against the distilled "
                             "model (default 0.99)")
    add_generation_arguments(parser)
    parser.set_defaults(func=run_bench_command)


def _schemes(text: str) -> list[str]:
    from graphopt.passes.quantize import SCHEMES

    values = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [v for v in values if v not in SCHEMES]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"--quantize takes comma-separated schemes from {', '.join(SCHEMES)}; "
                                         f"got {text!r}")
    return values


def _ratios(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prune takes comma-separated ratios like 0.3,0.5; got {text!r}") from None
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--prune ratios must lie between 0 and 1; got {text!r}")
    return values


def _ratio(text: str) -> float:
    values = _ratios(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"--compound takes one pruning ratio such as 0.5; got {text!r}")
    return values[0]


def run_bench_command(args: argparse.Namespace) -> int:
    """Run ``graphopt bench`` from parsed arguments; returns the process exit code."""
    if getattr(args, "generation", False):
        return run_generation_command(args, args.threads or default_threads())
    models = zoo.list_models() if args.all else []
    models += zoo.list_outside_models() if getattr(args, "outside", False) else []
    models += [name for name in args.models if name not in models]
    if not models:
        print("graphopt bench: name at least one model, or --all / --outside; models: "
              + ", ".join(zoo.list_models() + zoo.list_outside_models()), file=sys.stderr)
        return 2
    try:
        for name in models:
            zoo.check_name(name)
        _check_target(args.target)
    except (zoo.UnknownModelError, DeviceUnavailableError) as exc:
        print(f"graphopt bench: {exc}", file=sys.stderr)
        return 2
    threads = args.threads or default_threads()
    if getattr(args, "compound", None) is not None and not getattr(args, "quantize", None):
        print("graphopt bench: --compound adds rows to --quantize: give the schemes too (--quantize int8-dynamic)",
              file=sys.stderr)
        return 2
    if getattr(args, "quantize", None):
        from graphopt.bench.quantize import run_quantize_bench_command

        return run_quantize_bench_command(args, models, threads)
    if getattr(args, "prune", None):
        from graphopt.bench.prune import run_prune_bench_command

        return run_prune_bench_command(args, models, threads)
    backends = args.backends or default_backends(args.target)
    command = _cli_command(models, args.target, args.batch, args.size, threads, backends)
    command += f" --max-seconds {args.max_seconds:g} --min-repeats {args.min_repeats}"
    result = run_benchmark(models, target=args.target, batches=args.batch, size=args.size, backends=backends,
                           threads=threads, min_repeats=args.min_repeats, max_seconds=args.max_seconds,
                           progress=not args.quiet, command=command)
    print(result)
    write_result_files(result, args.json, args.markdown)
    return 0
