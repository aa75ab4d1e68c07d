"""The command line: demo, optimize FILE.py:FACTORY, and its errors."""

import textwrap

import onnx
import pytest

from graphopt.cli.main import main

MODEL_FILE = textwrap.dedent("""
    import torch.nn as nn

    def build():
        layers = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)]
        return nn.Sequential(*layers).eval()
""")


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(MODEL_FILE)
    return path


def test_optimize_a_user_file_to_onnx(model_file, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code = main(["optimize", f"{model_file}:build", "--input-shape", "1,3,8,8", "--target", "onnx", "-o", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "fold-conv-batchnorm" in text and "final check vs eager: passed" in text
    op_types = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "Conv" in op_types and "BatchNormalization" not in op_types


def test_optimize_errors_are_one_clear_line(model_file, capsys):
    assert main(["optimize", f"{model_file}:missing", "--input-shape", "1,3,8,8"]) == 2
    assert "has no 'missing'; callables there: build" in capsys.readouterr().err
    assert main(["optimize", f"{model_file}:build", "--input-shape", "1,5,8,8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the model fails on the example inputs (torch.float32[1, 5, 8, 8])")
    assert main(["optimize", "nowhere.py:build", "--input-shape", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_prints_report_and_speedup(capsys):
    assert main(["demo", "--batch", "2"]) == 0
    text = capsys.readouterr().out
    assert "fold-conv-batchnorm" in text
    assert "eager" in text and "graphopt-cpu" in text
