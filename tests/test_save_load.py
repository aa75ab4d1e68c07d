"""Save and load: a .pt2 archive with graphopt's metadata, loaded in a fresh process; large ONNX files."""

import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphopt
import graphopt.targets.onnx.export as onnx_export
from graphopt.cli.main import main
from graphopt.workflows.save_load import weights_only_loading

from helpers import SmallCNN, randomize_batchnorm

transformers = pytest.importorskip("transformers")


def _cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(SmallCNN()).eval()


def _run_in_fresh_process(code: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_saved_model_loads_in_a_fresh_process(tmp_path):
    model = _cnn()
    fast = graphopt.optimize(model, (torch.randn(2, 3, 8, 8),), target="cpu", dynamic_batch=True)
    fast.save(tmp_path / "cnn.pt2")
    x = torch.randn(5, 3, 8, 8)  # another batch size: the dynamic dim survives saving
    torch.save({"x": x, "expected": model(x).detach()}, tmp_path / "io.pt")
    out = _run_in_fresh_process("""
        import torch, graphopt
        model = graphopt.load("cnn.pt2")
        data = torch.load("io.pt")
        error = (model(data["x"]) - data["expected"]).abs().max().item()
        print(model.target.name, model.dynamic.dims, len(model.report.records), error)
    """, tmp_path)
    target, _, rest = out.strip().partition(" ")
    assert target == "cpu"
    assert "[{0: 'batch'}]" in rest
    records, error = rest.rsplit(" ", 2)[-2:]
    assert int(records) == len(fast.report.records)  # the report came along
    assert float(error) < 1e-5


def test_transformers_outputs_keep_their_class_after_loading(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    fast = graphopt.optimize(model, (ids, torch.ones_like(ids)), target="cpu")
    fast.save(tmp_path / "bert.pt2")
    torch.save({"ids": ids, "expected": model(ids, torch.ones_like(ids)).last_hidden_state.detach()},
               tmp_path / "io.pt")
    out = _run_in_fresh_process("""
        import torch, graphopt
        model = graphopt.load("bert.pt2", target="onnx")
        data = torch.load("io.pt")
        result = model(data["ids"], torch.ones_like(data["ids"]))
        print(type(result).__name__, (result.last_hidden_state - data["expected"]).abs().max().item())
    """, tmp_path)
    name, error = out.split()
    assert name == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert float(error) < 1e-4


@pytest.fixture
def saved_cnn(tmp_path) -> Path:
    fast = graphopt.optimize(_cnn(), (torch.randn(2, 3, 8, 8),))
    return fast.save(tmp_path / "cnn.pt2")


def test_truncated_file_is_named_in_the_error(saved_cnn):
    data = saved_cnn.read_bytes()
    saved_cnn.write_bytes(data[: len(data) // 2])
    with pytest.raises(graphopt.SaveFileError, match=r"cnn\.pt2.*(truncated or corrupt|could not be read)"):
        graphopt.load(saved_cnn)


def test_garbage_and_missing_files_are_graphopt_errors(tmp_path):
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip archive at all" * 10)
    with pytest.raises(graphopt.SaveFileError, match=r"garbage\.pt2 is truncated or corrupt"):
        graphopt.load(garbage)
    with pytest.raises(graphopt.SaveFileError, match=r"missing\.pt2: no such file"):
        graphopt.load(tmp_path / "missing.pt2")


def test_plain_torch_export_file_is_not_a_graphopt_save(tmp_path):
    program = torch.export.export(_cnn(), (torch.randn(2, 3, 8, 8),))
    torch.export.save(program, tmp_path / "plain.pt2")
    with pytest.raises(graphopt.SaveFileError, match=r"plain\.pt2 is not a graphopt save.*torch\.export\.load"):
        graphopt.load(tmp_path / "plain.pt2")


def test_corrupt_metadata_is_named(saved_cnn, tmp_path):
    broken = tmp_path / "broken.pt2"
    with zipfile.ZipFile(saved_cnn) as source, zipfile.ZipFile(broken, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            target.writestr(item, b"{not json" if item.filename.endswith("graphopt.json") else data)
    with pytest.raises(graphopt.SaveFileError, match=r"broken\.pt2: graphopt metadata is corrupt"):
        graphopt.load(broken)


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_loading_never_runs_pickled_code(tmp_path):
    path = tmp_path / "payload.pt"
    path.write_bytes(pickle.dumps(_Payload()))
    with weights_only_loading(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)  # the loader forces weights_only=True even when asked otherwise


def test_cli_writes_a_loadable_pt2(tmp_path, capsys):
    model_file = tmp_path / "model.py"
    model_file.write_text(textwrap.dedent("""
        import torch
        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    """))
    output = tmp_path / "out.pt2"
    assert main(["optimize", f"{model_file}:build", "--input-shape", "3,4", "--dynamic-batch", "-o", str(output)]) == 0
    loaded = graphopt.load(output)
    x = torch.randn(7, 4)
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    torch.testing.assert_close(loaded(x), reference(x))


@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_large_onnx_models_keep_weights_in_external_data(tmp_path, monkeypatch, target):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 10_000)  # stands in for protobuf's 2 GB limit
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).eval()
    x = torch.randn(2, 64)
    fast = graphopt.optimize(model, (x,), target=target)
    path = fast.export_onnx(tmp_path / "big.onnx")
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and data.stat().st_size > path.stat().st_size  # weights went to the side file
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(str(path), load_external_data=False)
               .graph.initializer if t.ByteSize() > 1024)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-5, rtol=1e-4)
