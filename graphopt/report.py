"""The optimization report: one row per pass, plus the final check against the eager model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from tabulate import tabulate

__all__ = ["PassRecord", "Report"]


@dataclass
class PassRecord:
    """What one pass run did to the graph."""

    name: str
    status: str  # "changed" | "unchanged" | "rolled back" | "failed"
    nodes_before: int
    nodes_after: int
    param_bytes_before: int
    param_bytes_after: int
    seconds: float
    max_abs_diff: float | None = None
    stats: dict[str, int | float] = field(default_factory=dict)
    rule_hits: dict[str, int] = field(default_factory=dict)
    near_misses: dict[str, dict[str, int]] = field(default_factory=dict)
    error: str | None = None
    iteration: int = 1
    verify_seconds: float = 0.0


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _diff(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


@dataclass
class Report:
    """Per-pass records and final figures of one ``optimize`` run; ``str()`` is a table."""

    target: str
    records: list[PassRecord] = field(default_factory=list)
    final_max_abs_diff: float | None = None
    final_check: str = "not run"
    lowering_seconds: float = 0.0
    capture_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def rolled_back(self) -> list[str]:
        """Names of the passes that were undone because they failed."""
        return [r.name for r in self.records if r.status == "rolled back"]

    @property
    def rule_hits(self) -> dict[str, int]:
        """How often each rewrite rule fired, summed over all passes."""
        totals: dict[str, int] = {}
        for record in self.records:
            for rule, hits in record.rule_hits.items():
                totals[rule] = totals.get(rule, 0) + hits
        return totals

    @property
    def near_misses(self) -> dict[str, dict[str, int]]:
        """For each rule or pass, how often a match was refused and why, summed over all passes."""
        totals: dict[str, dict[str, int]] = {}
        for record in self.records:
            for rule, reasons in record.near_misses.items():
                for reason, count in reasons.items():
                    totals.setdefault(rule, {})
                    totals[rule][reason] = totals[rule].get(reason, 0) + count
        return totals

    def to_dict(self) -> dict[str, Any]:
        """The whole report as plain data (JSON-serialisable)."""
        return asdict(self)

    def _rows(self, raw: bool = False) -> list[list[Any]]:
        rows = []
        for r in self.records:
            hits = ", ".join(f"{k}×{v}" for k, v in r.rule_hits.items()) or ""
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
            rows.append([
                r.name,
                r.status + (f": {r.error}" if r.error and raw else ""),
                f"{r.nodes_before} → {r.nodes_after}",
                f"{_bytes(r.param_bytes_before)} → {_bytes(r.param_bytes_after)}",
                f"{r.seconds * 1000:.1f}",
                f"{r.verify_seconds * 1000:.1f}",
                _diff(r.max_abs_diff),
                "; ".join(x for x in (stats, hits) if x),
            ])
        return rows

    _HEADERS: ClassVar[list[str]] = [
        "pass", "status", "nodes", "param bytes", "pass ms", "verify ms", "max |Δ|", "details",
    ]

    def _near_miss_lines(self) -> list[str]:
        return [
            f"{rule}: {count}× not applied ({reason})"
            for rule, reasons in self.near_misses.items()
            for reason, count in reasons.items()
        ]

    def _footer(self) -> list[str]:
        lines = [
            f"target: {self.target}; final check vs eager: {self.final_check}"
            f" (max |Δ| {_diff(self.final_max_abs_diff)}); capture {self.capture_seconds:.2f} s,"
            f" lowering {self.lowering_seconds:.2f} s"
        ]
        if self.rolled_back:
            lines.append(f"rolled back: {', '.join(self.rolled_back)}")
        failed = [r for r in self.records if r.error]
        lines.extend(f"{r.name}: {r.error}" for r in failed)
        near = self._near_miss_lines()
        if near:
            lines.append("near-misses:")
            lines.extend(f"  {line}" for line in near)
        lines.extend(self.notes)
        return lines

    def __str__(self) -> str:
        table = tabulate(self._rows(), headers=self._HEADERS, tablefmt="simple",
                         disable_numparse=True)
        return table + "\n" + "\n".join(self._footer())

    def to_markdown(self) -> str:
        """The report as a Markdown table with its footer as a list."""
        table = tabulate(self._rows(), headers=self._HEADERS, tablefmt="github",
                         disable_numparse=True)
        return table + "\n\n" + "\n".join(f"- {line}" for line in self._footer()) + "\n"
