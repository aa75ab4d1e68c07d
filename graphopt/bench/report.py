"""Benchmark results: rows, summary statistics, machine facts, and the table / JSON / markdown views."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PEER_BACKENDS = ("eager", "torch.compile", "onnxruntime", "openvino", "openvino-f32")
"""Backends graphopt is compared against in the ``vs best`` column."""

NOISY_IQR_PCT = 10.0
"""A measurement whose interquartile range exceeds this percentage of its median is flagged noisy."""


@dataclass
class TimingStats:
    """Summary of per-call latencies (milliseconds)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    iqr_pct: float
    samples: int

    @classmethod
    def from_samples(cls, seconds: list[float]) -> TimingStats:
        """Summarize per-call latencies given in seconds (needs at least two samples)."""
        ms = sorted(s * 1e3 for s in seconds)
        median = statistics.median(ms)
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        deciles = statistics.quantiles(ms, n=10, method="inclusive")
        iqr_pct = 100.0 * (q3 - q1) / median if median > 0 else 0.0
        return cls(median, deciles[0], deciles[-1], iqr_pct, len(ms))


@dataclass
class BenchRow:
    """One model x batch x backend measurement; fields are None where not measured.

    ``setup_s`` is the time from the untouched model to the first output
    (``prepare_s`` + ``first_call_s``): export/optimize time for ONNX and graphopt,
    compile time for torch.compile (it compiles on the first call), one forward for eager.
    ``setup_peak_mib`` / ``run_peak_mib`` are peak memory growth during setup and during one
    steady-state call (``memory_method`` in the run's metadata says how it was measured).
    ``size_mb`` is the size on disk of what the backend runs (state_dict or ONNX file).
    ``max_abs_diff`` / ``min_cosine`` compare the backend's outputs with eager's on the CPU.
    """

    model: str
    batch: int
    backend: str
    device: str
    timing: TimingStats | None = None
    noisy: bool = False
    speedup_vs_eager: float | None = None
    vs_best_peer: float | None = None
    best_peer: str | None = None
    prepare_s: float | None = None
    first_call_s: float | None = None
    setup_peak_mib: float | None = None
    run_peak_mib: float | None = None
    size_mb: float | None = None
    max_abs_diff: float | None = None
    min_cosine: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    details: str | None = None

    @property
    def setup_s(self) -> float | None:
        """Prepare time plus first-call time, or None if either is missing."""
        if self.prepare_s is None or self.first_call_s is None:
            return None
        return self.prepare_s + self.first_call_s

    @property
    def median_ms(self) -> float | None:
        """Median latency in milliseconds, or None when the backend failed or was skipped."""
        return self.timing.median_ms if self.timing else None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view of the row: timing fields flattened (None when not timed), ``setup_s`` added."""
        data = dataclasses.asdict(self)
        timing = data.pop("timing") or dict.fromkeys(f.name for f in dataclasses.fields(TimingStats))
        data.update(timing)
        data["setup_s"] = self.setup_s
        return data


def compute_ratios(rows: list[BenchRow]) -> None:
    """Fill ``speedup_vs_eager`` and, for graphopt rows, ``vs_best_peer`` within each model x batch.

    Both are ``other_median / this_median``: above 1 means this backend is faster.
    """
    groups: dict[tuple[str, int], list[BenchRow]] = {}
    for row in rows:
        groups.setdefault((row.model, row.batch), []).append(row)
    for group in groups.values():
        timed = {r.backend: r.median_ms for r in group if r.median_ms}
        peers = {name: ms for name, ms in timed.items() if name in PEER_BACKENDS}
        best = min(peers, key=peers.__getitem__) if peers else None
        for row in group:
            if not row.median_ms:
                continue
            if "eager" in timed:
                row.speedup_vs_eager = timed["eager"] / row.median_ms
            if row.backend.startswith("graphopt") and best is not None:
                row.best_peer = best
                row.vs_best_peer = peers[best] / row.median_ms


def _read_proc(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The graphopt source checkout's commit, when it runs from one (None otherwise)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine_info() -> dict[str, Any]:
    """Platform, CPU model, core counts, memory and GPU of this machine."""
    mem = _read_proc("/proc/meminfo", "MemTotal")
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _read_proc("/proc/cpuinfo", "model name") or platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(int(mem.split()[0]) / 2**20, 1) if mem else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def versions(extra: Sequence[str] = ()) -> dict[str, str | None]:
    """Versions of graphopt and the libraries a benchmark depends on, and of the ``extra`` packages (peers)."""
    import graphopt

    found = {name: _version(name) for name in ("onnxruntime", "onnx", "onnxscript", "transformers", *extra)}
    return {
        "graphopt": getattr(graphopt, "__version__", None) or _version("graphopt"),
        "graphopt_commit": _git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **found,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = ("model", "batch", "backend", "median ms", "IQR", "x eager", "vs best",
           "setup s", "peak MiB", "size MB", "max |diff|", "min cos", "status")


def row_cells(row: BenchRow) -> list[str]:
    """The table cells of one row, in ``COLUMNS`` order."""
    t = row.timing
    spread = "-" if t is None else f"{t.iqr_pct:.1f}%" + (" NOISY" if row.noisy else "")
    vs_best = "-" if row.vs_best_peer is None else f"{row.vs_best_peer:.2f}x {row.best_peer}"
    status = f"ERROR: {row.error}" if row.error else "; ".join(row.notes) or "ok"
    return [
        row.model, str(row.batch), row.backend, _fmt(row.median_ms, ".2f"), spread,
        _fmt(row.speedup_vs_eager, ".2f"), vs_best, _fmt(row.setup_s, ".2f"),
        _fmt(row.setup_peak_mib, ".0f"), _fmt(row.size_mb, ".1f"), _fmt(row.max_abs_diff, ".1e"),
        _fmt(row.min_cosine, ".6f"), status,
    ]


LEGEND = (
    "median ms: median latency of one call after warm-up; IQR: interquartile range of the "
    f"latencies as % of the median (NOISY above {NOISY_IQR_PCT:.0f}%); "
    "x eager: eager median / backend median (>1 is faster); vs best: best of "
    f"{'/'.join(PEER_BACKENDS)} median / graphopt median (>1: graphopt is faster); "
    "setup s: model to first output (export/optimize, or torch.compile's first call); "
    "peak MiB: peak memory growth during setup; size MB: what the backend runs, on disk; "
    "max |diff|, min cos: outputs vs eager on the CPU (cosine row-wise, minimum)."
)


def _markdown_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


@dataclass
class BenchResult:
    """All rows of one benchmark run plus the facts needed to reproduce and compare it."""

    rows: list[BenchRow]
    meta: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view: ``meta`` (machine, versions, threads, command, settings) and ``rows``."""
        return {"meta": self.meta, "rows": [row.to_dict() for row in self.rows]}

    def table(self) -> str:
        """Fixed-width text table of every row."""
        cells = [list(COLUMNS)] + [row_cells(r) for r in self.rows]
        widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        meta = self.meta
        head = (f"graphopt bench: target {meta['target']}, {meta['threads']} threads, "
                f"{meta['machine'].get('cpu_model')} ({meta['machine'].get('usable_cores')} cores)")
        return f"{head}\n{self.table()}\n\n{LEGEND}"

    def to_markdown(self) -> str:
        """Markdown report: machine, versions, threads, the reproducing command, then the table."""
        meta, machine = self.meta, self.meta["machine"]
        version_text = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
        header = [
            "# graphopt benchmarks",
            "",
            f"- **Machine:** {machine['platform']}; CPU {machine['cpu_model']}; "
            f"{machine['usable_cores']} usable cores ({machine['logical_cores']} logical); "
            f"{machine['memory_gib']} GiB RAM; GPU {machine['gpu'] or 'none'}",
            f"- **Versions:** {version_text}",
            f"- **Threads:** {meta['threads']} (torch.set_num_threads and onnxruntime intra_op_num_threads)",
            f"- **Target:** {meta['target']}; size {meta['size']}; timing: {meta['timing']}",
            f"- **Memory:** {meta['memory_method']}",
            f"- **Date:** {meta['date']}",
            f"- **Reproduce:** `{meta['command']}`",
            "",
        ]
        table = [_markdown_line(COLUMNS), "|" + "---|" * len(COLUMNS)]
        table += [_markdown_line(row_cells(r)) for r in self.rows]
        return "\n".join(header + table + ["", LEGEND, ""])


def write_result_files(result: Any, json_path: Path | None, markdown_path: Path | None) -> None:
    """Save a bench result (anything with ``to_dict()`` and ``to_markdown()``) where asked, saying so on stderr."""
    if json_path:
        json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {json_path}", file=sys.stderr)
    if markdown_path:
        markdown_path.write_text(result.to_markdown())
        print(f"wrote {markdown_path}", file=sys.stderr)
