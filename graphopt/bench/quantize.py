"""``graphopt bench --quantize int8,int8-dynamic [--compound 0.5]``: what int8 buys, measured side by side.

For every model, in one process and timed round-robin with ``graphopt bench``'s harness:
eager PyTorch; onnxruntime on a plain export (fp32) and onnxruntime's own dynamic int8
(``onnxruntime.quantization.quantize_dynamic`` of that export, default settings); graphopt's
fp32 lowering and one graphopt int8 model per scheme, on ``cpu`` and ``onnx``. Each row has
the size on disk, latency, speed-ups over eager, over graphopt's fp32 lowering on the same
target and over onnxruntime's own dynamic int8, and fidelity: the worst per-sample output
cosine against eager (and, for embedding models, whether each sentence with a clearly nearest
neighbour keeps it and the ranking of pairwise similarities stays, Spearman >= 0.97). Static
int8 calibrates on the zoo's example inputs. ``--compound RATIO`` adds OpenVINO and, per target
and scheme, the model pruned by RATIO, distilled and quantized (``graphopt.bench.compound``).

    >>> from graphopt.bench.quantize import run_quantize_benchmark
    >>> print(run_quantize_benchmark(["resnet18"], schemes=("int8",), size="small"))
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
from tabulate import tabulate
from torch import nn

from graphopt.bench import zoo
from graphopt.bench.compound import Compound, CompoundBackend
from graphopt.bench.openvino_peer import OpenVinoBackend
from graphopt.bench.report import machine_info, versions, write_result_files
from graphopt.bench.runner import (
    Backend,
    GraphoptBackend,
    MemoryProbe,
    OnnxRuntimeBackend,
    OrtRunner,
    TimingPlan,
    flatten_outputs,
    setup_backend,
    time_into_rows,
)
from graphopt.bench.table import TableResult
from graphopt.workflows.recipe import STAGE_HEADERS, STAGES_TITLE

__all__ = ["QuantizeBenchResult", "QuantizeRow", "run_quantize_benchmark"]


class _OrtDynamicRunner(OrtRunner):
    """A plain ONNX export quantized by onnxruntime's own ``quantize_dynamic`` (default settings)."""

    def __init__(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...], threads: int) -> None:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        super().__init__(model, example_inputs, threads, ["CPUExecutionProvider"])
        quantized = self.path.with_name("model.int8.onnx")
        quantize_dynamic(str(self.path), str(quantized), weight_type=QuantType.QInt8)
        for path in self.path.parent.iterdir():
            if path != quantized:
                path.unlink()
        self.path = quantized
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(quantized), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class _OrtDynamicBackend(OnnxRuntimeBackend):
    name: str = "onnxruntime dynamic int8"

    def prepare(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Any:
        """Export, quantize with onnxruntime.quantization.quantize_dynamic, open a session."""
        return _OrtDynamicRunner(model, example_inputs, self.threads)


@dataclass(frozen=True)
class _QuantizedBackend(GraphoptBackend):
    """``graphopt.optimize(model, x, target, quantize=scheme, calibration=[x])``."""

    scheme: str | None = None

    def prepare(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Any:
        """Optimize and quantize (static int8 calibrates on the example inputs)."""
        from graphopt import optimize

        if self.scheme is None:
            return optimize(model, example_inputs, target=self.target)
        return optimize(model, example_inputs, target=self.target, quantize=self.scheme,
                        calibration=[example_inputs])


@dataclass
class QuantizeRow:
    """One model x backend (``scheme`` None: float)."""

    model: str
    backend: str
    target: str | None
    scheme: str | None
    size_mb: float | None = None
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_fp32: float | None = None
    speedup_vs_ort_int8: float | None = None
    min_cosine: float | None = None
    ranking_kept: bool | None = None
    rho: float | None = None
    fallen_back: str | None = None
    error: str | None = None
    stages: list[list[Any]] | None = None
    """A compound row's ``recipe: stages`` table (``STAGE_HEADERS``): each stage measured where it was made."""



@dataclass
class QuantizeBenchResult(TableResult):
    """Rows and how they were measured; ``str()`` is a table, ``to_markdown()`` / ``to_dict()`` for files."""

    rows: list[QuantizeRow]
    meta: dict[str, Any] = field(default_factory=dict)

    _HEADERS: ClassVar[tuple[str, ...]] = (
        "model", "backend", "size MB", "median ms", "p10-p90 ms", "vs eager", "vs fp32 same target",
        "vs ORT dyn int8", "cosine vs eager", "ranking kept (rho)", "int8 units fallen back", "error",
    )

    def _table(self) -> list[list[Any]]:
        def ratio(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}x"

        return [[
            r.model, r.backend, "-" if r.size_mb is None else f"{r.size_mb:.1f}",
            "-" if r.median_ms is None else f"{r.median_ms:.1f}",
            "-" if r.p10_ms is None else f"{r.p10_ms:.1f}-{r.p90_ms:.1f}",
            ratio(r.speedup_vs_eager), ratio(r.speedup_vs_fp32), ratio(r.speedup_vs_ort_int8),
            "-" if r.min_cosine is None else f"{r.min_cosine:.4f}",
            "-" if r.ranking_kept is None else f"{'yes' if r.ranking_kept else 'NO'} ({r.rho:.3f})",
            r.fallen_back or "-",
            r.error or "",
        ] for r in self.rows]

    def to_markdown(self) -> str:
        """The table, then each compound row's stages (size, speed and fidelity after each step)."""
        parts = [super().to_markdown()]
        for row in self.rows:
            if row.stages:
                parts.append(f"\nStages of {row.model} / {row.backend} (measured as the recipe ran them):\n\n"
                             + tabulate(row.stages, headers=STAGE_HEADERS, tablefmt="github") + "\n")
        return "".join(parts)


def run_quantize_benchmark(
    models: Sequence[str | tuple[str, nn.Module, tuple[torch.Tensor, ...]]],
    schemes: Sequence[str] = ("int8", "int8-dynamic"),
    targets: Sequence[str] = ("cpu", "onnx"),
    compound: Compound | float | None = None,
    size: str = "full",
    batch: int = 1,
    threads: int | None = None,
    min_repeats: int = 7,
    max_seconds: float = 10.0,
    progress: bool = True,
    command: str | None = None,
) -> QuantizeBenchResult:
    """Float vs int8 per model: eager, onnxruntime fp32 / dynamic int8, graphopt fp32 / int8 per target.

    ``compound``: a ``Compound`` (or a pruning ratio); adds OpenVINO (f32 and its default precision) and, per target
    and scheme, prune -> distill -> quantize (``graphopt.bench.compound``).
    """
    from graphopt.bench import default_threads

    threads = threads or default_threads()
    if isinstance(compound, (int, float)):
        compound = Compound(float(compound))
    plan = TimingPlan(min_repeats=min_repeats, max_seconds=max_seconds)
    probe = MemoryProbe("cpu")

    def report(message: str) -> None:
        if progress:
            print(f"[bench --quantize {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[QuantizeRow] = []
    started = time.perf_counter()
    try:
        for entry in models:
            if isinstance(entry, str):
                built = zoo.load(entry, size=size, batch=batch)
                name, model, inputs, kind = entry, built.model, built.example_inputs, built.output_kind
            else:
                (name, model, inputs), kind = entry, "logits"
            rows += _measure(name, model.eval(), inputs, kind, schemes, targets, threads, plan, probe, report,
                             compound)
    finally:
        torch.set_num_threads(previous)
    meta = {"size": size, "batch": batch, "threads": threads, "schemes": list(schemes), "targets": list(targets),
            "compound": None if compound is None else compound.describe(),
            "timing": plan.describe(), "machine": machine_info(), "versions": versions(),
            "command": command or (f"graphopt bench --quantize {','.join(schemes)} "
                                   + (f"{compound.describe()} " if compound else "")
                                   + f"{' '.join(m if isinstance(m, str) else m[0] for m in models)} --size {size} "
                                   f"--batch {batch}"
                                   + (f" --min-repeats {min_repeats}" if min_repeats != 7 else "")
                                   + (f" --max-seconds {max_seconds:g}" if max_seconds != 10.0 else "")),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "total_seconds": round(time.perf_counter() - started, 1)}
    return QuantizeBenchResult(rows, meta)


def _ranking_kept(outputs: Any, reference: list[torch.Tensor]) -> tuple[bool, float] | None:
    """For embeddings: whether sentences keep a clearly nearest neighbour and the pair ranking barely moves, and rho.

    The ranking check: Spearman correlation (rho) >= 0.97 between the eager and the quantized
    ranks of all pairwise similarities (near-ties among unrelated sentences may swap).
    """
    got = flatten_outputs(outputs)
    if len(got) != 1 or got[0].dim() != 2 or got[0].shape[0] < 3:
        return None
    count = got[0].shape[0]
    pairs = torch.triu_indices(count, count, offset=1)
    eye = torch.eye(count, dtype=torch.bool)
    top2, ranks = [], []
    for embeddings in (reference[0], got[0]):
        unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
        similarity = unit @ unit.T
        top2.append(similarity.masked_fill(eye, -2).topk(2, dim=1))
        ranks.append(similarity[pairs[0], pairs[1]].argsort().argsort().double())
    clear = (top2[0].values[:, 0] - top2[0].values[:, 1]) > 0.1  # a clearly nearest neighbour (not a near-tie)
    spearman = float(torch.corrcoef(torch.stack(ranks))[0, 1])
    return bool(torch.equal(top2[0].indices[clear, 0], top2[1].indices[clear, 0]) and spearman >= 0.97), spearman


def _measure(name: str, model: nn.Module, inputs: tuple[torch.Tensor, ...], kind: str, schemes: Sequence[str],
             targets: Sequence[str], threads: int, plan: TimingPlan, probe: MemoryProbe,
             report: Any, compound: Compound | None = None) -> list[QuantizeRow]:
    with torch.no_grad():
        reference = flatten_outputs(model(*inputs))
    backends: list[tuple[Backend, str | None, str | None]] = [
        (Backend(), None, None),
        (OnnxRuntimeBackend(name="onnxruntime fp32", threads=threads), None, None),
        (_OrtDynamicBackend(threads=threads), None, "ort-dynamic"),
    ]
    if compound is not None:
        backends += [(OpenVinoBackend(name="openvino f32", threads=threads, precision="f32"), None, "openvino"),
                     (OpenVinoBackend(name="openvino (default precision)", threads=threads), None, "openvino")]
    for target in targets:
        for scheme in (None, *schemes):
            label = f"graphopt-{target} {scheme or 'fp32'}"
            backends.append((_QuantizedBackend(name=label, target=target, scheme=scheme), target, scheme))
        for scheme in schemes if compound is not None else ():
            label = f"graphopt-{target} prune {compound.amount:g} + distill + {scheme}"
            if compound.text is not None:  # the rows say what they learned from
                label += f" (text: {Path(compound.text).name})"
            backend = CompoundBackend(name=label, target=target, compound=compound, scheme=scheme,
                                      loss="kl" if kind == "logits" else "cosine")
            backends.append((backend, target, f"compound {scheme}"))
    prepared, rows = [], []
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-quantize-") as tmp:
        for backend, target, scheme in backends:
            report(f"{name}: {backend.name}: setup")
            result = setup_backend(backend, name, model, inputs, reference, probe, Path(tmp))
            row = QuantizeRow(name, backend.name, target, scheme)
            rows.append(row)
            if hasattr(result, "runner"):
                row.size_mb, row.min_cosine = result.row.size_mb, result.row.min_cosine
                if kind == "embedding":
                    with torch.no_grad():
                        ranking = _ranking_kept(result.runner(*inputs), reference)
                    if ranking is not None:
                        row.ranking_kept, row.rho = ranking
                row.fallen_back = _fallen_back(result.runner)
                row.stages = _recipe_stages(result.runner)
                prepared.append((row, result))
            else:
                row.error = result.error
    time_into_rows(name, prepared, plan, report)
    _ratios(rows)
    return rows


def _recipe_stages(runner: Any) -> list[list[Any]] | None:
    """The rows of ``runner``'s ``recipe: stages`` report section, when ``graphopt.recipe`` made it."""
    for section in getattr(getattr(runner, "report", None), "sections", []):
        if section.title == STAGES_TITLE and tuple(section.headers) == STAGE_HEADERS:
            return [list(row) for row in section.rows]
    return None


def _fallen_back(runner: Any) -> str | None:
    """``"k/n"`` int8 units that fell back to float (``"k/n, m dynamic"`` with static units that ran dynamic)."""
    from graphopt.passes.quantize.dynamic import Int8Dynamic
    from graphopt.passes.quantize.static import Int8Static

    report = getattr(runner, "report", None)
    for record in getattr(report, "records", []):
        if record.name in (Int8Static.name, Int8Dynamic.name) and record.fidelity:
            milder = record.fidelity.get("milder")
            return (f"{record.fidelity.get('fallen_back', 0)}/{record.fidelity.get('units', 0)}"
                    + (f", {milder} dynamic" if milder else ""))
    return None


def _ratios(rows: list[QuantizeRow]) -> None:
    eager = next((r.median_ms for r in rows if r.backend == "eager"), None)
    ort_int8 = next((r.median_ms for r in rows if r.scheme == "ort-dynamic"), None)
    fp32 = {r.target: r.median_ms for r in rows if r.target and r.scheme is None}
    for row in rows:
        if not row.median_ms:
            continue
        row.speedup_vs_eager = eager / row.median_ms if eager else None
        if row.target and row.scheme and fp32.get(row.target):
            row.speedup_vs_fp32 = fp32[row.target] / row.median_ms
        if row.scheme and row.scheme not in ("ort-dynamic", "openvino") and ort_int8:
            row.speedup_vs_ort_int8 = ort_int8 / row.median_ms


def _compound(args: Any) -> Compound | None:
    if getattr(args, "compound", None) is None:
        return None
    return Compound(args.compound, sentences=args.distill_sentences, epochs=args.distill_epochs,
                    embedding_bits=args.embedding_bits, min_cosine=args.compound_cosine,
                    text=None if args.distill_text is None else str(args.distill_text))


def run_quantize_bench_command(args: Any, models: Sequence[str], threads: int) -> int:
    """``graphopt bench --quantize ...`` from parsed arguments."""
    result = run_quantize_benchmark(models, schemes=args.quantize, size=args.size, batch=args.batch[0],
                                    compound=_compound(args), threads=threads,
                                    min_repeats=args.min_repeats, max_seconds=args.max_seconds,
                                    progress=not args.quiet)
    print(result)
    write_result_files(result, args.json, args.markdown)
    return 0
