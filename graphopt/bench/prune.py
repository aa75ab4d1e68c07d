"""``graphopt bench --prune 0.3,0.5``: what structured pruning buys, measured side by side.

For every model and target (``cpu`` and ``onnx`` on a CPU machine, ``gpu`` on a GPU one) the
dense optimized model and one pruned model per ratio are built, then timed round-robin in one
process with ``graphopt bench``'s harness, so the speed-ups are ratios measured under the same
conditions. Each row has parameters, MACs (``graphopt.analysis.cost``), size on disk, latency,
the speed-up over the dense model of the same target, and fidelity: the worst per-sample output
cosine against eager (pruning is measured, not enforced; ``graphopt.distill`` recovers it).

    >>> from graphopt.bench.prune import run_prune_benchmark
    >>> result = run_prune_benchmark(["resnet18"], amounts=(0.5,), size="small")
    >>> print(result)
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from graphopt.bench import zoo
from graphopt.bench.report import machine_info, versions, write_result_files
from graphopt.bench.runner import (
    GraphoptBackend,
    MemoryProbe,
    TimingPlan,
    flatten_outputs,
    setup_backend,
    time_into_rows,
)
from graphopt.bench.table import TableResult

__all__ = ["PruneBenchResult", "PruneRow", "run_prune_benchmark"]


class _PrunedBackend(GraphoptBackend):
    """``graphopt.optimize(model, x, target, prune=amount)``; remembers params and MACs of what it built."""

    def __init__(self, target: str, amount: float | None) -> None:
        label = "dense" if amount is None else f"prune {amount:g}"
        object.__setattr__(self, "name", f"graphopt-{target} {label}")
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "device", "cuda" if target == "gpu" else "cpu")
        object.__setattr__(self, "amount", amount)
        object.__setattr__(self, "facts", {})

    def prepare(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Any:
        """Optimize (and prune) the model, and count what the optimized graph holds."""
        from graphopt import optimize
        from graphopt.analysis.cost import count_parameters, total_macs

        extra = {} if self.amount is None else {"prune": self.amount}
        fast = optimize(model, example_inputs, target=self.target, **extra)
        self.facts.update(params=count_parameters(fast.graph_module), macs=total_macs(fast.graph_module))
        return fast


@dataclass
class PruneRow:
    """One model x target x pruning ratio (``amount`` None: the dense optimized model)."""

    model: str
    target: str
    amount: float | None
    params: int | None = None
    macs: int | None = None
    size_mb: float | None = None
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    speedup_vs_dense: float | None = None
    min_cosine: float | None = None
    error: str | None = None


@dataclass
class PruneBenchResult(TableResult):
    """Rows and how they were measured; ``str()`` is a table, ``to_markdown()`` / ``to_dict()`` for files."""

    rows: list[PruneRow]
    meta: dict[str, Any] = field(default_factory=dict)

    _HEADERS: ClassVar[tuple[str, ...]] = (
        "model", "target", "pruned", "params", "MACs", "size MB", "median ms", "p10-p90 ms",
        "speed-up vs dense", "cosine vs eager", "error",
    )

    def _table(self) -> list[list[Any]]:
        out = []
        for r in self.rows:
            out.append([
                r.model, r.target, "dense" if r.amount is None else f"{r.amount:.0%}",
                "-" if r.params is None else f"{r.params / 1e6:.3f}M",
                "-" if r.macs is None else f"{r.macs / 1e9:.3f}G",
                "-" if r.size_mb is None else f"{r.size_mb:.2f}", "-" if r.median_ms is None else f"{r.median_ms:.2f}",
                "-" if r.p10_ms is None else f"{r.p10_ms:.2f}-{r.p90_ms:.2f}",
                "-" if r.speedup_vs_dense is None else f"{r.speedup_vs_dense:.2f}x",
                "-" if r.min_cosine is None else f"{r.min_cosine:.4f}", r.error or "",
            ])
        return out


def run_prune_benchmark(
    models: Sequence[str | tuple[str, nn.Module, tuple[torch.Tensor, ...]]],
    amounts: Sequence[float] = (0.3, 0.5),
    targets: Sequence[str] = ("cpu", "onnx"),
    size: str = "full",
    batch: int = 1,
    threads: int | None = None,
    min_repeats: int = 7,
    max_seconds: float = 10.0,
    progress: bool = True,
    command: str | None = None,
) -> PruneBenchResult:
    """Dense vs pruned, per model and target, all variants of one model timed round-robin together."""
    from graphopt.bench import default_threads

    threads = threads or default_threads()
    plan = TimingPlan(min_repeats=min_repeats, max_seconds=max_seconds)
    probe = MemoryProbe("cuda" if "gpu" in targets else "cpu")

    def report(message: str) -> None:
        if progress:
            print(f"[bench --prune {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[PruneRow] = []
    started = time.perf_counter()
    try:
        for entry in models:
            if isinstance(entry, str):
                built = zoo.load(entry, size=size, batch=batch)
                name, model, inputs = entry, built.model, built.example_inputs
            else:
                name, model, inputs = entry
            rows += _measure(name, model.eval(), inputs, amounts, targets, plan, probe, report)
    finally:
        torch.set_num_threads(previous)
    meta = {"size": size, "batch": batch, "threads": threads, "amounts": list(amounts), "targets": list(targets),
            "timing": plan.describe(), "machine": machine_info(), "versions": versions(),
            "command": command or f"graphopt bench --prune {','.join(f'{a:g}' for a in amounts)} "
                                  f"{' '.join(m if isinstance(m, str) else m[0] for m in models)} --size {size}",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "total_seconds": round(time.perf_counter() - started, 1)}
    return PruneBenchResult(rows, meta)


def _measure(name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...], amounts: Sequence[float],
             targets: Sequence[str], plan: TimingPlan, probe: MemoryProbe, report: Any) -> list[PruneRow]:
    with torch.no_grad():
        reference = flatten_outputs(model(*inputs))
    backends = [_PrunedBackend(t, a) for t in targets for a in (None, *amounts)]
    prepared, rows = [], []
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-prune-") as tmp:
        for backend in backends:
            report(f"{name}: {backend.name}: setup")
            result = setup_backend(backend, name, model, inputs, reference, probe, Path(tmp))
            row = PruneRow(name, backend.target, backend.amount, **backend.facts)
            rows.append(row)
            if hasattr(result, "runner"):
                row.size_mb, row.min_cosine = result.row.size_mb, result.row.min_cosine
                prepared.append((row, result))
            else:
                row.error = result.error
    time_into_rows(name, prepared, plan, report)
    dense = {r.target: r.median_ms for r in rows if r.amount is None and r.median_ms}
    for row in rows:
        if row.median_ms and row.target in dense:
            row.speedup_vs_dense = dense[row.target] / row.median_ms
    return rows


def run_prune_bench_command(args: Any, models: Sequence[str], threads: int) -> int:
    """``graphopt bench --prune ...`` from parsed arguments."""
    targets = ["gpu"] if args.target == "gpu" else ["cpu", "onnx"]
    command = (f"graphopt bench --prune {','.join(f'{a:g}' for a in args.prune)} {' '.join(models)} "
               f"--target {args.target} --size {args.size} --batch {args.batch[0]} --threads {threads} "
               f"--max-seconds {args.max_seconds:g} --min-repeats {args.min_repeats}")
    result = run_prune_benchmark(models, amounts=args.prune, targets=targets, size=args.size, batch=args.batch[0],
                                 threads=threads, min_repeats=args.min_repeats, max_seconds=args.max_seconds,
                                 progress=not args.quiet, command=command)
    print(result)
    write_result_files(result, args.json, args.markdown)
    return 0
