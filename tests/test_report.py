"""The report: a table for people, a dict and Markdown for tools."""

import json

import graphopt


def test_report_formats(small_cnn):
    model, inputs = small_cnn
    fast = graphopt.optimize(model, inputs)
    report = fast.report
    names = [r.name for r in report.records]
    assert names == list(graphopt.DEFAULT_PIPELINE)

    table = str(report)
    header = table.splitlines()[0]
    for column in ("pass", "status", "nodes", "param bytes", "pass ms", "verify ms", "max |Δ|"):
        assert column in header
    assert "fold-conv-batchnorm" in table and "final check vs eager: passed" in table

    data = report.to_dict()
    json.dumps(data)  # serialisable
    fold = next(r for r in data["records"] if r["name"] == "fold-conv-batchnorm")
    assert fold["status"] == "changed" and fold["stats"] == {"folded": 2}
    assert fold["nodes_after"] < fold["nodes_before"]
    assert data["final_check"] == "passed" and data["final_max_abs_diff"] < 1e-4

    markdown = report.to_markdown()
    assert markdown.splitlines()[0].startswith("| pass")
    assert "| fold-conv-batchnorm" in markdown

    total_before = report.records[0].nodes_before
    total_after = report.records[-1].nodes_after
    assert total_after < total_before
    assert report.records[-1].param_bytes_after < report.records[0].param_bytes_before


def test_training_mode_model_gets_a_note(small_cnn):
    model, inputs = small_cnn
    model.train()
    fast = graphopt.optimize(model, inputs)
    assert any("training mode" in note for note in fast.report.notes)
    assert "training mode" in str(fast.report)
