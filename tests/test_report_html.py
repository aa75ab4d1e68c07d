"""The HTML report: one self-contained page, marked rollbacks, extra sections, and a report that round-trips."""

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
import warnings
from collections import Counter
from dataclasses import dataclass

import pytest
import torch.fx as fx

import graphopt
from graphopt import Pass, PassResult, PlotSpec, Report, ReportSection
from graphopt.cli.main import main
from graphopt.report.html import pass_plots, render_html, render_plot_svg

MARK_RED = "#c0392b"
EXTERNAL = re.compile(r"""(?:\b(?:src|href)\s*=\s*["']?\s*|url\(\s*["']?\s*|@import\s+["']?)(?:https?:)?//""", re.I)


@dataclass(frozen=True)
class Crashes(Pass):
    name = "crashes-on-purpose"

    def run(self, gm: fx.GraphModule) -> PassResult:
        raise RuntimeError("boom: cannot handle this graph")


def quantization_section() -> ReportSection:
    layers = ["conv1", "layer1.conv", "fc"]
    return ReportSection(
        "Per-layer quantization",
        "int8 weights; the error is measured per layer.",
        headers=["layer", "dtype", "params", "max |Δ|", "skipped"],
        rows=[["conv1", "int8", 216, 3.5e-3, False], ["layer1.conv", "int8", 576, 1.2e-3, False],
              ["fc", "float32", 40, None, True]],
        plots=[PlotSpec("bar", "Quantization error per layer", layers, {"max |Δ|": [3.5e-3, 1.2e-3, None]},
                        y_label="max |Δ|", log_scale=True, marked=[2], marked_label="skipped")],
    )


@pytest.fixture
def report(small_cnn) -> Report:
    model, inputs = small_cnn
    return graphopt.optimize(model, inputs, target="cpu").report


@pytest.fixture
def rolled_back_report(small_cnn) -> Report:
    model, inputs = small_cnn
    passes = ["remove-dropout", Crashes(), "fold-conv-batchnorm", "dce"]
    with warnings.catch_warnings():  # the rollback is the point here, not a surprise worth a warning
        warnings.simplefilter("ignore")
        return graphopt.optimize(model, inputs, target="cpu", passes=passes, on_error="rollback").report


def svg_count(page: str) -> int:
    return page.count("<svg")


def test_html_report_is_one_self_contained_page(report, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    path = report.to_html(out_dir / "report.html")
    assert path == out_dir / "report.html"
    assert [p.name for p in out_dir.iterdir()] == ["report.html"]  # nothing written beside it
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")

    assert not EXTERNAL.findall(page), "the page must not load anything from elsewhere"
    assert "<link" not in page and "<script" not in page and "<img" not in page and "<?xml" not in page
    assert "<style>" in page  # inline CSS

    for name in graphopt.DEFAULT_PIPELINE:
        assert f'<td class="name">{name}</td>' in page
    headers, _ = report.pass_table()
    for header in headers:
        assert f">{header}</th>" in page
    assert svg_count(page) == 4  # nodes, parameter bytes, time, max |Δ|
    for title in ("Graph nodes after each pass", "Parameter size after each pass", "Time per pass", "Max |Δ|"):
        assert f"<figcaption>{title}" in page
    assert "final check: passed" in page and "capture" in page and "lowering" in page

    ids = Counter(re.findall(r'\bid="([^"]+)"', page))
    assert ids and max(ids.values()) == 1, "several inline SVGs must not share ids"
    references = re.findall(r'(?:href="#|url\(#)([^")]+)', page)
    assert references and set(references) <= set(ids), "every in-SVG reference points inside the same page"


def test_header_shows_notes_near_misses_and_final_check(report):
    report.notes.append("a note for <the reader> & co")
    report.records[0].near_misses = {"fold-conv-batchnorm": {"conv has two users": 2}}
    report.final_check = "FAILED (max |Δ| 3.0e-01 > tolerance)"
    page = render_html(report)
    assert "a note for &lt;the reader&gt; &amp; co" in page  # escaped
    assert "conv has two users" in page and "Near-misses" in page
    assert "final check: FAILED" in page and "3.0e-01 &gt; tolerance" in page


def test_rolled_back_pass_is_marked_in_table_and_plots(rolled_back_report):
    report = rolled_back_report
    assert report.rolled_back == ["crashes-on-purpose"]
    page = render_html(report)

    row = re.search(r'<tr class="status-rolled-back">(.*?)</tr>', page)
    assert row and "crashes-on-purpose" in row.group(1) and "rolled back" in row.group(1)
    assert page.count('class="status-rolled-back"') == 1
    assert "Rolled back or failed passes" in page and "boom: cannot handle this graph" in page

    plots = pass_plots(report)
    assert [p.marked for p in plots] == [[2], [2], [1], [1]]  # line plots start with "(captured)"
    assert all(p.marked_label == "rolled back / failed" for p in plots)
    max_diff = plots[3]
    assert max_diff.log_scale and max_diff.series["max |Δ|"][1] is None
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(svgs) == 4
    assert all(MARK_RED in svg and "<!-- rolled back / failed -->" in svg for svg in svgs)
    assert "<!-- n/a -->" in svgs[3] or "<!--  n/a -->" in svgs[3]  # no verified diff for the undone pass


def test_custom_section_renders_its_table_and_plot(report):
    report.sections.append(quantization_section())
    page = render_html(report)
    assert svg_count(page) == 5
    assert "<h2>Per-layer quantization</h2>" in page and "int8 weights; the error" in page
    assert "<figcaption>Quantization error per layer</figcaption>" in page
    assert '<td>layer1.conv</td>' in page and '<td class="num">576</td>' in page
    assert '<th class="num">params</th>' in page and "<td>True</td>" in page

    text = str(report)
    assert "Per-layer quantization" in text and "layer1.conv" in text and "0.0035" in text
    markdown = report.to_markdown()
    assert "### Per-layer quantization" in markdown and "| layer1.conv" in markdown


def test_report_without_sections_prints_as_before(report):
    report = dataclasses.replace(report, sections=[])  # the cpu target adds its lowering section
    assert "in the HTML report" not in str(report)
    markdown = report.to_markdown()
    assert "###" not in markdown and markdown.endswith("\n") and markdown.splitlines()[-1].startswith("- ")


def test_report_round_trips_through_dict_and_json(rolled_back_report):
    report = rolled_back_report
    report.sections.append(quantization_section())
    report.notes.append("saved and loaded")

    again = Report.from_dict(report.to_dict())
    assert again == report
    assert isinstance(again.records[0], graphopt.PassRecord)
    assert isinstance(again.sections[-1], ReportSection) and isinstance(again.sections[-1].plots[0], PlotSpec)

    loaded = Report.from_dict(json.loads(json.dumps(report.to_dict())))
    assert loaded == report
    assert loaded.to_dict() == report.to_dict()
    assert render_html(loaded) == render_html(report)  # rendering is deterministic

    loaded.sections[-1].rows[0][0] = "changed"  # a rebuilt report shares nothing with its source
    assert report.sections[-1].rows[0][0] == "conv1"


def test_from_dict_accepts_older_and_newer_data(report):
    data = report.to_dict()
    del data["sections"]  # saved before sections existed
    data["added_by_a_later_version"] = 1
    assert Report.from_dict(data) == dataclasses.replace(report, sections=[])


def test_plot_specs_are_checked_data():
    with pytest.raises(ValueError, match="kind"):
        PlotSpec("pie", "t", ["a"], {"s": [1]})
    with pytest.raises(ValueError, match="2 values for 1 x labels"):
        PlotSpec("bar", "t", ["a"], {"s": [1, 2]})
    with pytest.raises(ValueError, match="out of range"):
        PlotSpec("bar", "t", ["a"], {"s": [1]}, marked=[3])
    with pytest.raises(ValueError, match="row 0 has 1 cells for 2 headers"):
        ReportSection("s", headers=["a", "b"], rows=[[1]])
    with pytest.raises(TypeError, match="use str, int, float, bool or None"):
        ReportSection("s", headers=["a"], rows=[[object()]])
    spec = PlotSpec("line", "t", ("a", "b"), {"s": (1, None)})
    assert spec.x_labels == ["a", "b"] and spec.series == {"s": [1.0, None]}
    json.dumps(dataclasses.asdict(ReportSection("s", plots=[spec])))


@pytest.mark.parametrize("spec", [
    PlotSpec("bar", "grouped", ["a", "b", "c"], {"before": [3, 2, 1], "after": [1, 1, None]}, marked=[1]),
    PlotSpec("bar", "stacked", ["a", "b"], {"x": [1, 2], "y": [2, 1]}, stacked=True),
    PlotSpec("barh", "log, nothing drawable", ["zero", "missing"], {"v": [0, None]}, log_scale=True),
    PlotSpec("line", "many points", [f"pass-{i}" for i in range(40)], {"v": list(range(40))}, marked=[5]),
    PlotSpec("line", "empty", [], {}),
])
def test_every_plot_kind_renders_to_inline_svg(spec):
    svg = render_plot_svg(spec, scope="t")
    assert svg.startswith("<svg ") and svg.endswith("</svg>") and f'aria-label="{spec.title}"' in svg
    assert all(name.startswith("t-") for name in re.findall(r'\bid="([^"]+)"', svg))
    assert (MARK_RED in svg) == bool(spec.marked)


def test_import_graphopt_does_not_import_matplotlib():
    code = "import sys, graphopt; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_cli_optimize_writes_the_html_report(tmp_path, capsys):
    model_file = tmp_path / "my_model.py"
    model_file.write_text(textwrap.dedent("""
        import torch.nn as nn

        def build():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()).eval()
    """))
    out = tmp_path / "report.html"
    assert main(["optimize", f"{model_file}:build", "--input-shape", "1,3,8,8", "--report", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert "fold-conv-batchnorm" in page and svg_count(page) == 4 and not EXTERNAL.findall(page)
