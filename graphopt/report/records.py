"""The optimization report: one row per pass, the final check against the eager model, extra sections.

Everything here is plain data (JSON-serialisable through ``Report.to_dict`` and back through
``Report.from_dict``); rendering to HTML lives in ``graphopt.report.html``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from tabulate import tabulate

from graphopt.report.html import write_html
from graphopt.report.sections import ReportSection, build_dataclass, bytes_text, diff_text

__all__ = ["PassRecord", "Report", "sum_counts", "sum_near_misses"]



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
    fidelity: dict[str, Any] = field(default_factory=dict)  # lossy passes: budget and measured values


Count = TypeVar("Count", bound=float)


def sum_counts(counters: Iterable[Mapping[str, Count]]) -> dict[str, Count]:
    """Counters (a record's ``stats`` or ``rule_hits``) summed key by key, in the order the keys first appear."""
    totals: dict[str, Count] = {}
    for counter in counters:
        for key, value in counter.items():
            totals[key] = totals.get(key, 0) + value
    return totals


def sum_near_misses(records: Iterable[PassRecord]) -> dict[str, dict[str, int]]:
    """The records' near misses summed: ``{rule: {reason: count}}``, in the order they first appear."""
    totals: dict[str, dict[str, int]] = {}
    for record in records:
        for rule, reasons in record.near_misses.items():
            for reason, count in reasons.items():
                group = totals.setdefault(rule, {})
                group[reason] = group.get(reason, 0) + count
    return totals


def _fidelity_text(fidelity: Mapping[str, Any]) -> str:
    """A lossy pass's measured fidelity in a few words: cosine, SQNR, fallbacks, budget."""
    parts = [f"cosine {fidelity.get('cosine', float('nan')):.5f}"]
    if fidelity.get("sqnr_db") is not None:
        parts.append(f"SQNR {fidelity['sqnr_db']:.1f} dB")
    if "metric_drop" in fidelity:
        parts.append(f"metric drop {fidelity['metric_drop']:.4g}")
    parts.append(f"{fidelity.get('fallen_back', 0)}/{fidelity.get('units', 0)} fallen back"
                 + (f", {fidelity['milder']} in a milder scheme" if fidelity.get("milder") else ""))
    parts.append(f"budget {fidelity.get('budget')}" + ("" if fidelity.get("enforced", True) else " (reported only)"))
    return ", ".join(parts)


@dataclass
class Report:
    """Per-pass records and final figures of one ``optimize`` run; ``str()`` is a table."""

    target: str
    records: list[PassRecord] = field(default_factory=list)
    final_max_abs_diff: float | None = None
    final_check: str = "not run"
    final_cosine: float | None = None  # after lossy passes: worst output cosine of the lowered model vs eager
    final_held_out_cosine: float | None = None  # the same on the held-out (validation) batches
    final_metric: dict[str, float] = field(default_factory=dict)  # Fidelity.metric: baseline, value, drop
    lowering_seconds: float = 0.0
    capture_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    sections: list[ReportSection] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """Rebuild a report from ``to_dict()`` output (or that dict saved as JSON and loaded back).

        ``Report.from_dict(report.to_dict()) == report``. Keys this version does not know are
        ignored; missing optional keys take their defaults.
        """
        report = build_dataclass(cls, data)
        report.records = [build_dataclass(PassRecord, r) if isinstance(r, Mapping) else r for r in report.records]
        report.sections = [ReportSection.from_dict(s) if isinstance(s, Mapping) else s for s in report.sections]
        return report

    def to_html(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as one self-contained HTML page (tables, inline SVG plots); returns the path.

        Needs matplotlib (imported only when a plot is drawn, so ``import graphopt`` stays fast).
        """
        return write_html(self, path)

    @property
    def rolled_back(self) -> list[str]:
        """Names of the passes that were undone because they failed."""
        return [r.name for r in self.records if r.status == "rolled back"]

    @property
    def rule_hits(self) -> dict[str, int]:
        """How often each rewrite rule fired, summed over all passes."""
        return sum_counts(record.rule_hits for record in self.records)

    @property
    def near_misses(self) -> dict[str, dict[str, int]]:
        """For each rule or pass, how often a match was refused and why, summed over all passes."""
        return sum_near_misses(self.records)

    def to_dict(self) -> dict[str, Any]:
        """The whole report as plain data (JSON-serialisable)."""
        return asdict(self)

    def pass_table(self) -> tuple[list[str], list[list[str]]]:
        """Headers and rows of the per-pass table, as ``str(report)`` prints them."""
        return list(self._HEADERS), self._rows()

    def _rows(self, raw: bool = False) -> list[list[Any]]:
        rows = []
        for r in self.records:
            hits = ", ".join(f"{k}×{v}" for k, v in r.rule_hits.items()) or ""
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
            if r.fidelity:
                stats = ", ".join(x for x in (_fidelity_text(r.fidelity), stats) if x)
            rows.append([
                r.name,
                r.status + (f": {r.error}" if r.error and raw else ""),
                f"{r.nodes_before} → {r.nodes_after}",
                f"{bytes_text(r.param_bytes_before)} → {bytes_text(r.param_bytes_after)}",
                f"{r.seconds * 1000:.1f}",
                f"{r.verify_seconds * 1000:.1f}",
                diff_text(r.max_abs_diff),
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
            f" (max |Δ| {diff_text(self.final_max_abs_diff)}); capture {self.capture_seconds:.2f} s,"
            f" lowering {self.lowering_seconds:.2f} s"
        ]
        if self.final_cosine is not None:
            held_out = (f", on held-out data {self.final_held_out_cosine:.5f}"
                        if self.final_held_out_cosine is not None else "")
            lines.append(f"lossy passes: final output cosine vs eager {self.final_cosine:.5f}{held_out}")
        if self.final_metric:
            lines.append("fidelity metric: " + ", ".join(f"{k} {v:.4g}" for k, v in self.final_metric.items()))
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

    def _section_texts(self, markdown: bool) -> list[str]:
        parts = []
        for section in self.sections:
            lines = [f"### {section.title}" if markdown else f"\n{section.title}"]
            if section.description:
                lines.append(section.description)
            table = section.text_table("github" if markdown else "simple")
            if table:
                lines.append(table)
            if section.plots:
                lines.append(f"({len(section.plots)} plot(s) in the HTML report)")
            parts.append(("\n\n" if markdown else "\n").join(lines))
        return parts

    def __str__(self) -> str:
        table = tabulate(self._rows(), headers=self._HEADERS, tablefmt="simple",
                         disable_numparse=True)
        return "\n".join([table, *self._footer(), *self._section_texts(markdown=False)])

    def to_markdown(self) -> str:
        """The report as a Markdown table with its footer as a list, then one part per section."""
        table = tabulate(self._rows(), headers=self._HEADERS, tablefmt="github",
                         disable_numparse=True)
        text = table + "\n\n" + "\n".join(f"- {line}" for line in self._footer()) + "\n"
        return text + "".join(f"\n{part}\n" for part in self._section_texts(markdown=True))
