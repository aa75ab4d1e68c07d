"""Render a ``Report`` as one self-contained HTML page: facts, per-pass table, sections, inline SVG plots.

The page needs nothing but itself: the CSS is inline and every plot is an SVG drawn by
matplotlib and embedded in the page. matplotlib is imported only when a plot is drawn, and
only through ``matplotlib.figure.Figure`` (no ``pyplot``), so rendering never switches the
backend of the caller's process.
"""

from __future__ import annotations

import html
import io
import math
import os
import re
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.report.sections import PlotSpec, ReportSection, bytes_text, diff_text, format_cell
from graphopt.version import __version__

if TYPE_CHECKING:  # the report module imports this renderer
    from graphopt.report.records import PassRecord, Report

__all__ = ["pass_plots", "render_html", "render_plot_svg", "write_html"]

_FAILED = ("rolled back", "failed")
_SERIES_COLOURS = ("#3b6ea8", "#e0a040", "#5a9e6f", "#8c6bb1", "#6b7785")
_MARK_COLOURS = ("#c0392b", "#e8a09a", "#d96a5f", "#b03a2e", "#f1c4bf")
_TEXT_COLOUR = "#2b2f36"
_GRID_COLOUR = "#e3e6ea"
_MARKED_TEXT = "rolled back / failed"
_PASS_TABLE_NUMERIC = frozenset(range(2, 7))  # nodes, param bytes, pass ms, verify ms, max |Δ|


# ---------------------------------------------------------------------------------------------
# entry points


def write_html(report: Report, path: str | os.PathLike[str]) -> Path:
    """Write ``render_html(report)`` to ``path`` (UTF-8) and return the path."""
    path = Path(path)
    path.write_text(render_html(report), encoding="utf-8")
    return path


def render_html(report: Report, title: str = "graphopt optimization report") -> str:
    """The whole report as one HTML document (a string), with inline CSS and inline SVG plots."""
    body = [
        _header_html(report, title),
        _facts_html(report),
        _problems_html(report),
        _near_misses_html(report),
        _notes_html(report),
        _panel("Passes", _pass_table_html(report)),
        _panel("Per-pass plots", _plots_html(pass_plots(report), "pass")),
        *(_section_html(section, index) for index, section in enumerate(report.sections)),
        _footer_html(),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_esc(title)} — {_esc(report.target)}</title>\n<style>{_CSS}</style>\n</head>\n"
        "<body>\n<main>\n" + "\n".join(part for part in body if part) + "\n</main>\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------------------------
# the built-in per-pass plots, as data


def _pass_labels(records: Sequence[PassRecord]) -> list[str]:
    """One x label per record; the iteration is added when a pipeline ran more than once."""
    repeated = any(r.iteration > 1 for r in records)
    return [f"{r.name} #{r.iteration}" if repeated else r.name for r in records]


def _marked(records: Sequence[PassRecord], offset: int = 0) -> list[int]:
    return [i + offset for i, r in enumerate(records) if r.status in _FAILED]


def _byte_unit(largest: float) -> tuple[str, float]:
    for unit, scale in (("GiB", 1024.0**3), ("MiB", 1024.0**2), ("KiB", 1024.0)):
        if largest >= scale:
            return unit, scale
    return "B", 1.0


def pass_plots(report: Report) -> list[PlotSpec]:
    """The four per-pass plots (nodes, parameter bytes, time, max |Δ|) as ``PlotSpec`` data.

    Empty when the report has no pass records. Rolled-back and failed passes are marked.
    """
    records = report.records
    if not records:
        return []
    labels = _pass_labels(records)
    start = ["(captured)", *labels]
    unit, scale = _byte_unit(max(records[0].param_bytes_before, *(r.param_bytes_after for r in records)))
    common = {"marked_label": _MARKED_TEXT}
    return [
        PlotSpec("line", "Graph nodes after each pass", start,
                 {"nodes": [records[0].nodes_before, *(r.nodes_after for r in records)]},
                 y_label="nodes", marked=_marked(records, offset=1), **common),
        PlotSpec("line", "Parameter size after each pass", start,
                 {"parameters": [records[0].param_bytes_before / scale,
                                 *(r.param_bytes_after / scale for r in records)]},
                 y_label=unit, marked=_marked(records, offset=1), **common),
        PlotSpec("barh", "Time per pass", labels,
                 {"pass": [r.seconds * 1000 for r in records],
                  "verify": [r.verify_seconds * 1000 for r in records]},
                 x_label="milliseconds", stacked=True, marked=_marked(records), **common),
        PlotSpec("barh", "Max |Δ| vs. the graph before the pass", labels,
                 {"max |Δ|": [r.max_abs_diff for r in records]},
                 x_label="max |Δ| (log scale)", log_scale=True, marked=_marked(records), **common),
    ]


# ---------------------------------------------------------------------------------------------
# plots: PlotSpec → SVG


_RC = {
    "font.family": ["DejaVu Sans"],
    "font.size": 9.0,
    "axes.edgecolor": "#b8bec6",
    "axes.labelcolor": _TEXT_COLOUR,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "xtick.color": "#4a5059",
    "ytick.color": "#4a5059",
    "legend.frameon": False,
    "legend.fontsize": 8.5,
    "svg.hashsalt": "graphopt",  # stable ids: the same report renders to the same page
    "svg.fonttype": "path",  # glyphs as paths: identical in every browser, no font needed
}


def render_plot_svg(spec: PlotSpec, scope: str = "plot") -> str:
    """Draw ``spec`` with matplotlib and return an ``<svg>`` element to inline in HTML.

    The title is not drawn (the page shows it as the figure caption) but names the SVG for
    screen readers. ``scope`` prefixes every id inside the SVG, so several plots can share one page.
    """
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC):
        figure = Figure(figsize=_figure_size(spec), layout="constrained")
        axes = figure.add_subplot()
        if spec.log_scale:
            (axes.set_xscale if spec.kind == "barh" else axes.set_yscale)("log")
        _DRAWERS[spec.kind](axes, spec)
        _decorate(axes, spec)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    return _inline_svg(buffer.getvalue(), scope, spec.title)


_CROWDED = 16  # more categories than this: denser bars, or a full-width figure with upright labels


def _crowded(spec: PlotSpec) -> bool:
    return len(spec.x_labels) > _CROWDED


def _is_wide(spec: PlotSpec) -> bool:
    """Whether the figure should span the whole row of the page (many categories along x)."""
    return spec.kind != "barh" and _crowded(spec)


def _figure_size(spec: PlotSpec) -> tuple[float, float]:
    count = len(spec.x_labels)
    if spec.kind == "barh":
        return 6.4, max(2.2, 0.75 + (0.21 if _crowded(spec) else 0.27) * count)
    if _is_wide(spec):
        return min(13.0, max(6.4, 1.5 + 0.2 * count)), 3.6
    return 6.4, 3.2


def _short(label: str, limit: int = 26) -> str:
    """Shorten a long tick label in the middle ("experimental-cr…long-name"); the tables keep the full text."""
    if len(label) <= limit:
        return label
    head = (limit - 1) // 2
    return label[:head] + "…" + label[-(limit - 1 - head):]


def _colour(series_index: int, marked: bool) -> str:
    palette = _MARK_COLOURS if marked else _SERIES_COLOURS
    return palette[series_index % len(palette)]


def _values(values: Sequence[float | None], log: bool) -> list[float]:
    """Numbers matplotlib can draw: missing values (and ``<= 0`` on a log axis) become 0-height bars."""
    return [0.0 if v is None or (log and v <= 0) else v for v in values]


def _draw_bars(axes: Any, spec: PlotSpec, horizontal: bool) -> None:
    positions = list(range(len(spec.x_labels)))
    count = len(spec.series)
    width = 0.7 if spec.stacked or count == 1 else 0.8 / count
    base = [0.0] * len(positions)
    if spec.log_scale:
        _log_limits(axes, spec, horizontal)
    for index, (name, raw) in enumerate(spec.series.items()):
        values = _values(raw, spec.log_scale)
        offset = 0.0 if spec.stacked or count == 1 else (index - (count - 1) / 2) * width
        where = [p + offset for p in positions]
        colours = [_colour(index, i in spec.marked) for i in positions]
        bottom = base if spec.stacked else None
        if horizontal:
            axes.barh(where, values, height=width, left=bottom, color=colours, label=name, zorder=2)
        else:
            axes.bar(where, values, width=width, bottom=bottom, color=colours, label=name, zorder=2)
        if spec.stacked:
            base = [b + v for b, v in zip(base, values, strict=True)]
    if spec.log_scale:
        _label_log_values(axes, spec, horizontal)


def _log_limits(axes: Any, spec: PlotSpec, horizontal: bool) -> None:
    """Fix a log value axis from a decade below the smallest value, so small bars stay visible.

    Set before the bars are drawn (and not autoscaled), so 0-length bars never meet the log scale.
    """
    values = list(spec.series.values())
    if spec.stacked:  # the top of a stack is the sum of its parts
        values.append([sum(_values(column, log=True)) for column in zip(*values, strict=True)])
    drawable = [v for series in values for v in series if v is not None and v > 0]
    low = 10 ** (math.floor(math.log10(min(drawable))) - 1) if drawable else 1e-9
    high = 10 ** (math.ceil(math.log10(max(drawable))) + 0.3) if drawable else 1e-3
    (axes.set_xlim if horizontal else axes.set_ylim)(low, high)


def _label_log_values(axes: Any, spec: PlotSpec, horizontal: bool) -> None:
    """Write each value of a single-series log plot by its bar; "0 (exact)" or "n/a" where none is drawn."""
    if len(spec.series) != 1:
        return
    style = {"fontsize": 7.5, "color": "#59606b"}
    for position, value in enumerate(next(iter(spec.series.values()))):
        drawn = value is not None and value > 0
        text = f"{value:.2e}" if drawn else "n/a" if value is None else "0 (exact)"
        style["fontstyle"] = "normal" if drawn else "italic"
        if horizontal:
            x, transform = (value, axes.transData) if drawn else (0.01, axes.get_yaxis_transform())
            axes.text(x, position, f" {text}", transform=transform, va="center", **style)
        else:
            y, transform = (value, axes.transData) if drawn else (0.02, axes.get_xaxis_transform())
            axes.text(position, y, text, transform=transform, ha="center", va="bottom", **style)


def _draw_line(axes: Any, spec: PlotSpec) -> None:
    positions = list(range(len(spec.x_labels)))
    for index, (name, raw) in enumerate(spec.series.items()):
        values = [float("nan") if v is None or (spec.log_scale and v <= 0) else v for v in raw]
        axes.plot(positions, values, marker="o", markersize=4.5, linewidth=1.8, color=_colour(index, False),
                  label=name, zorder=2)
        flagged = [i for i in spec.marked if values[i] == values[i]]  # skip NaN
        if flagged:
            axes.scatter(flagged, [values[i] for i in flagged], s=60, color=_MARK_COLOURS[0], zorder=3,
                         edgecolors="white", linewidths=0.8)


def _draw_bar(axes: Any, spec: PlotSpec) -> None:
    _draw_bars(axes, spec, horizontal=False)


def _draw_barh(axes: Any, spec: PlotSpec) -> None:
    _draw_bars(axes, spec, horizontal=True)


_DRAWERS = {"bar": _draw_bar, "barh": _draw_barh, "line": _draw_line}


def _decorate(axes: Any, spec: PlotSpec) -> None:
    """Axis labels, category ticks (marked ones in red), grid and legend (with the marked entry)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    horizontal = spec.kind == "barh"
    axes.set_xlabel(spec.x_label)
    axes.set_ylabel(spec.y_label)
    positions = list(range(len(spec.x_labels)))
    labels = [_short(label) for label in spec.x_labels]
    if horizontal:
        axes.set_yticks(positions, labels)
        axes.invert_yaxis()  # first pass at the top, like the table
        axes.grid(axis="x", color=_GRID_COLOUR, zorder=0)
        ticks = axes.get_yticklabels()
    else:
        rotation = _rotation(labels)
        axes.set_xticks(positions, labels, rotation=rotation, ha="right" if rotation else "center",
                        va="center" if rotation == 90 else "top", rotation_mode="anchor",
                        fontsize=7.5 if _crowded(spec) else None)
        axes.set_xlim(-0.6, len(positions) - 0.4)
        axes.grid(axis="y", color=_GRID_COLOUR, zorder=0)
        ticks = axes.get_xticklabels()
    axes.tick_params(length=0 if horizontal else 3)
    axes.set_axisbelow(True)
    for index in spec.marked:
        ticks[index].set_color(_MARK_COLOURS[0])
        ticks[index].set_fontweight("bold")
    handles, labels = axes.get_legend_handles_labels()
    if spec.marked:
        handles.append(Line2D([], [], marker="o", linestyle="", markersize=7, color=_MARK_COLOURS[0])
                       if spec.kind == "line" else Patch(color=_MARK_COLOURS[0]))
        labels.append(spec.marked_label)
    if len(handles) > 1:
        axes.legend(handles, labels, loc="best")


def _rotation(labels: Sequence[str]) -> int:
    """Tick label rotation: none for a few short labels, 30° for more, upright when crowded."""
    if sum(len(label) + 2 for label in labels) <= 60:
        return 0
    return 30 if len(labels) <= _CROWDED else 90


_SVG_ID = re.compile(r'\bid="([^"]+)"')
_SVG_ID_USE = re.compile(r'(\bid="|\bhref="#|url\(#)([^")]+)')


def _inline_svg(svg: str, scope: str, title: str) -> str:
    """Strip the XML prolog, prefix every id (and reference to it) with ``scope``, name the SVG for readers."""
    svg = svg[svg.index("<svg"):]
    ids = set(_SVG_ID.findall(svg))
    svg = _SVG_ID_USE.sub(lambda m: f"{m[1]}{scope}-{m[2]}" if m[2] in ids else m[0], svg)
    return svg.replace("<svg ", f'<svg role="img" aria-label="{_esc(title)}" ', 1).strip()


# ---------------------------------------------------------------------------------------------
# HTML pieces


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _panel(title: str, content: str, description: str | None = None, *, level: int = 2) -> str:
    """A titled card; empty when there is no content."""
    if not content:
        return ""
    about = f"<p class=\"description\">{_esc(description)}</p>" if description else ""
    return f"<section class=\"panel\"><h{level}>{_esc(title)}</h{level}>{about}{content}</section>"


def _header_html(report: Report, title: str) -> str:
    check = report.final_check
    failed = check.lower().startswith("fail")
    state = "ok" if check == "passed" else "bad" if failed else "neutral"
    verdict = "FAILED" if failed else check  # the full text is in the facts below
    return (
        f"<header><div><h1>{_esc(title)}</h1><p class=\"subtitle\">target <b>{_esc(report.target)}</b> · "
        f"{len(report.records)} pass runs</p></div>"
        f"<span class=\"badge big {state}\">final check: {_esc(verdict)}</span></header>"
    )


def _facts(report: Report) -> list[tuple[str, str]]:
    """The header facts as (label, value) pairs."""
    records = report.records
    facts = [("target", report.target), ("final check vs eager", report.final_check),
             ("final max |Δ|", diff_text(report.final_max_abs_diff))]
    if records:
        first, last = records[0], records[-1]
        facts += [
            ("nodes", f"{first.nodes_before} → {last.nodes_after}"),
            ("parameters", f"{bytes_text(first.param_bytes_before)} → {bytes_text(last.param_bytes_after)}"),
            ("pass time", f"{sum(r.seconds for r in records) * 1000:.1f} ms"),
            ("verify time", f"{sum(r.verify_seconds for r in records) * 1000:.1f} ms"),
        ]
    facts += [("capture", f"{report.capture_seconds:.2f} s"), ("lowering", f"{report.lowering_seconds:.2f} s"),
              ("rolled back", str(len(report.rolled_back)))]
    return facts


def _facts_html(report: Report) -> str:
    bad = {"rolled back": bool(report.rolled_back),
           "final check vs eager": report.final_check.lower().startswith("fail")}
    items = "".join(
        f"<div class=\"fact{' bad' if bad.get(label) else ''}\"><div class=\"label\">{_esc(label)}</div>"
        f"<div class=\"value\">{_esc(value)}</div></div>"
        for label, value in _facts(report)
    )
    return f"<section class=\"facts\">{items}</section>"


def _problems_html(report: Report) -> str:
    """Rolled-back and failed passes with their error text."""
    failed = [r for r in report.records if r.status in _FAILED or r.error]
    if not failed:
        return ""
    items = "".join(
        f"<li><span class=\"badge {_status_class(r.status)}\">{_esc(r.status)}</span> <b>{_esc(r.name)}</b>"
        f"<pre>{_esc(r.error or 'no error text')}</pre></li>"
        for r in failed
    )
    return f"<section class=\"alert bad\"><h2>Rolled back or failed passes</h2><ul>{items}</ul></section>"


def _near_misses_html(report: Report) -> str:
    rows = [[rule, reason, count] for rule, reasons in report.near_misses.items() for reason, count in reasons.items()]
    if not rows:
        return ""
    table = _table_html(["rule or pass", "not applied because", "times"], rows)
    return _panel("Near-misses", table, "Places where a rewrite matched but was refused, and why.")


def _notes_html(report: Report) -> str:
    if not report.notes:
        return ""
    items = "".join(f"<li>{_esc(note)}</li>" for note in report.notes)
    return f"<section class=\"alert note\"><h2>Notes</h2><ul>{items}</ul></section>"


def _status_class(status: str) -> str:
    return re.sub(r"[^a-z]+", "-", status.lower()).strip("-")


def _pass_table_html(report: Report) -> str:
    """The per-pass table, same columns as ``str(report)``; rolled-back/failed rows are marked."""
    headers, rows = report.pass_table()
    if not rows:
        return "<p class=\"description\">No passes ran.</p>"
    body = []
    for record, row in zip(report.records, rows, strict=True):
        status = _status_class(record.status)
        cells = [f"<td class=\"name\">{_esc(row[0])}</td>",
                 f"<td><span class=\"badge {status}\" title=\"{_esc(record.error or '')}\">{_esc(row[1])}</span></td>",
                 *(_td(cell, numeric=i in _PASS_TABLE_NUMERIC) for i, cell in enumerate(row) if i >= 2)]
        body.append(f"<tr class=\"status-{status}\">{''.join(cells)}</tr>")
    return _table(headers, body, _PASS_TABLE_NUMERIC)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _td(value: Any, numeric: bool | None = None) -> str:
    """One cell; numbers (or cells of a numeric column) right-aligned."""
    numeric = _is_number(value) if numeric is None else numeric
    text = _esc(format_cell(value))
    return f"<td class=\"num\">{text}</td>" if numeric else f"<td>{text}</td>"


def _table(headers: Sequence[str], body_rows: Iterable[str], numeric: Collection[int] = ()) -> str:
    head = "".join(f"<th class=\"num\">{_esc(h)}</th>" if i in numeric else f"<th>{_esc(h)}</th>"
                   for i, h in enumerate(headers))
    return (f"<div class=\"table-wrap\"><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body_rows)}</tbody></table></div>")


def _table_html(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain table of plain values; columns holding only numbers (or None) are right-aligned."""
    if not rows:
        return ""
    numeric = {i for i in range(len(headers))
               if any(_is_number(row[i]) for row in rows) and all(_is_number(row[i]) or row[i] is None for row in rows)}
    body = (f"<tr>{''.join(_td(v, i in numeric) for i, v in enumerate(row))}</tr>" for row in rows)
    return _table(headers, body, numeric)


def _figure_html(spec: PlotSpec, scope: str) -> str:
    """One plot: its title as the caption, then the inline SVG; crowded plots take a full row."""
    css_class = ' class="wide"' if _is_wide(spec) else ""
    return f"<figure{css_class}><figcaption>{_esc(spec.title)}</figcaption>{render_plot_svg(spec, scope)}</figure>"


def _plots_html(specs: Sequence[PlotSpec], scope: str) -> str:
    """A grid of figures, one inline SVG each."""
    if not specs:
        return ""
    figures = "".join(_figure_html(spec, f"{scope}{i}") for i, spec in enumerate(specs))
    return f"<div class=\"plots\">{figures}</div>"


def _section_html(section: ReportSection, index: int) -> str:
    """One extra section: its table, then its plots."""
    content = _table_html(section.headers, section.rows) + _plots_html(section.plots, f"section{index}-")
    return _panel(section.title, content or "<p class=\"description\">(empty)</p>", section.description)


def _footer_html() -> str:
    return f"<footer>generated by graphopt {_esc(__version__)}</footer>"


_CSS = """
:root { --text: #2b2f36; --muted: #6b7280; --line: #e3e6ea; --bg: #f5f6f8; --card: #fff;
        --ok: #2e7d4f; --ok-bg: #e6f4ea; --bad: #c0392b; --bad-bg: #fdecea; --note-bg: #fff8e1; --note: #8a6d00; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--text);
       font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 28px 40px; }
header { display: flex; justify-content: space-between; align-items: center; gap: 16px;
         border-bottom: 2px solid var(--line); padding-bottom: 14px; margin-bottom: 18px; }
h1 { font-size: 22px; margin: 0; font-weight: 650; }
h2 { font-size: 16px; margin: 0 0 10px; font-weight: 650; }
.subtitle { margin: 4px 0 0; color: var(--muted); }
.description { color: var(--muted); margin: -4px 0 12px; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 10px; margin-bottom: 18px; }
.fact { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 9px 12px; }
.fact .label { color: var(--muted); font-size: 11.5px; text-transform: uppercase; letter-spacing: .04em; }
.fact .value { font-size: 15px; font-weight: 600; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
.panel { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 16px 18px;
         margin-bottom: 18px; }
.alert { border-radius: 6px; padding: 12px 18px; margin-bottom: 18px; border: 1px solid; }
.alert ul { margin: 0; padding-left: 0; list-style: none; }
.alert li { margin: 6px 0; }
.alert.bad { background: var(--bad-bg); border-color: #f3b8b1; }
.alert.bad h2 { color: var(--bad); }
.alert.note { background: var(--note-bg); border-color: #f0dc9c; }
.alert.note h2 { color: var(--note); }
.alert.note li::before { content: "• "; color: var(--note); }
pre { margin: 4px 0 0; padding: 8px 10px; background: #fff; border: 1px solid #f3b8b1; border-radius: 4px;
      white-space: pre-wrap; overflow-wrap: anywhere; font: 12px/1.4 ui-monospace, Menlo, Consolas, monospace; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th.num { text-align: right; }
th { text-align: left; font-weight: 600; color: var(--muted); border-bottom: 2px solid var(--line);
     padding: 7px 10px; white-space: nowrap; }
td { border-bottom: 1px solid var(--line); padding: 6px 10px; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.name { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; white-space: nowrap; }
tbody tr:hover { background: #f8f9fb; }
tr.status-unchanged td { color: var(--muted); }
tr.status-rolled-back td, tr.status-failed td { background: var(--bad-bg); }
tr.status-rolled-back td.name, tr.status-failed td.name { color: var(--bad); font-weight: 600;
                                                           box-shadow: inset 3px 0 0 var(--bad); }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         white-space: nowrap; background: #eef0f3; color: var(--muted); }
.badge.changed, .badge.ok { background: var(--ok-bg); color: var(--ok); }
.badge.rolled-back, .badge.failed, .badge.bad { background: var(--bad); color: #fff; }
.badge.big { font-size: 14px; padding: 5px 14px; border-radius: 14px; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 14px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 10px 8px 6px; background: #fff; }
figure.wide { grid-column: 1 / -1; }
figure.wide svg { max-width: 1200px; margin: 0 auto; }
figcaption { font-weight: 600; font-size: 13.5px; padding: 0 6px 4px; }
.fact.bad { border-color: #f3b8b1; background: var(--bad-bg); }
.fact.bad .value { color: var(--bad); }
figure svg { display: block; width: 100%; height: auto; }
.panel .plots { margin-top: 14px; }
.panel .table-wrap + .plots { margin-top: 16px; }
footer { color: var(--muted); font-size: 12px; text-align: right; }
@media print { body { background: #fff; } .panel, figure { break-inside: avoid; } }
"""
