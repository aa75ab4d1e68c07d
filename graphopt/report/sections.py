"""Report building blocks that are plain data: plots, extra sections and cell formatting.

``graphopt.report.records`` (the per-pass report) and ``graphopt.report.html`` (its renderer) both
build on these.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tabulate import tabulate

__all__ = ["PLOT_KINDS", "PlotSpec", "ReportSection", "build_dataclass", "bytes_text", "diff_text", "format_cell"]

PLOT_KINDS = ("bar", "barh", "line")
"""The ``PlotSpec.kind`` values the renderers draw."""

_PLAIN = (str, int, float, bool, type(None))
_T = TypeVar("_T")


@dataclass
class PlotSpec:
    """A plot as pure data: what to draw, not how (the HTML renderer draws it with matplotlib).

    ``series`` maps a legend name to one value per entry of ``x_labels``; ``None`` is a missing
    value. ``log_scale`` puts the value axis on a log scale (values ``<= 0`` or ``None`` are then
    labelled instead of drawn). ``stacked`` stacks the series of a bar plot instead of grouping
    them. ``marked`` holds indices into ``x_labels`` drawn in the warning colour, with
    ``marked_label`` as their legend entry (e.g. rolled-back passes).
    """

    kind: str  # "bar" | "barh" | "line"
    title: str
    x_labels: list[str]
    series: dict[str, list[float | None]]
    x_label: str = ""
    y_label: str = ""
    log_scale: bool = False
    stacked: bool = False
    marked: list[int] = field(default_factory=list)
    marked_label: str = "marked"

    def __post_init__(self) -> None:
        if self.kind not in PLOT_KINDS:
            raise ValueError(f"PlotSpec kind must be one of {', '.join(PLOT_KINDS)}, got {self.kind!r}")
        self.x_labels = [str(label) for label in self.x_labels]
        self.series = {str(name): [None if v is None else float(v) for v in values]
                       for name, values in self.series.items()}
        for name, values in self.series.items():
            if len(values) != len(self.x_labels):
                raise ValueError(f"plot {self.title!r}: series {name!r} has {len(values)} values "
                                 f"for {len(self.x_labels)} x labels")
        self.marked = [int(i) for i in self.marked]
        if any(not 0 <= i < len(self.x_labels) for i in self.marked):
            raise ValueError(f"plot {self.title!r}: marked indices {self.marked} out of range")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlotSpec:
        """Rebuild a plot from ``dataclasses.asdict`` output (or its JSON)."""
        return build_dataclass(cls, data)


@dataclass
class ReportSection:
    """An extra part of a report (per-layer quantization, pruning, partitioning...): a table and plots.

    ``rows`` hold plain values only (str, int, float, bool, None), one per header, so the
    section stays JSON-serialisable; every renderer prints the table and the HTML one draws
    the plots.
    """

    title: str
    description: str | None = None
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    plots: list[PlotSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.headers = [str(h) for h in self.headers]
        self.rows = [list(row) for row in self.rows]
        for index, row in enumerate(self.rows):
            if self.headers and len(row) != len(self.headers):
                raise ValueError(f"section {self.title!r}: row {index} has {len(row)} cells "
                                 f"for {len(self.headers)} headers")
            bad = [v for v in row if not isinstance(v, _PLAIN)]
            if bad:
                raise TypeError(f"section {self.title!r}: row {index} holds {type(bad[0]).__name__}; "
                                "use str, int, float, bool or None")
        self.plots = [PlotSpec.from_dict(p) if isinstance(p, Mapping) else p for p in self.plots]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReportSection:
        """Rebuild a section, with its plots, from ``dataclasses.asdict`` output (or its JSON)."""
        return build_dataclass(cls, data)  # __post_init__ turns the plot dicts back into PlotSpecs

    def text_table(self, tablefmt: str = "simple") -> str:
        """The section's table formatted by ``tabulate`` (empty when there are no rows)."""
        if not self.rows:
            return ""
        rows = [[format_cell(v) for v in row] for row in self.rows]
        return tabulate(rows, headers=self.headers, tablefmt=tablefmt, disable_numparse=True)


def build_dataclass(cls: type[_T], data: Mapping[str, Any]) -> _T:
    """``cls(**data)`` with deep-copied values; unknown keys (from a newer version) are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: copy.deepcopy(v) for k, v in data.items() if k in names})


def format_cell(value: Any) -> str:
    """A table cell as text: floats to 4 significant digits, ``None`` as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def bytes_text(n: int) -> str:
    """A byte count in B / KiB / MiB / GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def diff_text(value: float | None) -> str:
    """A max |Δ| in scientific notation, or a dash."""
    return "-" if value is None else f"{value:.2e}"
