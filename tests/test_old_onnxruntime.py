"""Files written for an older onnxruntime load and compute the same outputs in that runtime (slow).

The old runtime lives in its own virtual environment (numpy < 2, as onnxruntime 1.17 needs), made
once under ``~/.cache/graphopt-tests`` with pip, or named by ``GRAPHOPT_OLD_ORT_PYTHON``; the test
skips when neither can be had.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_lowering_onnx import _encoder

import graphopt
from graphopt.passes.lossy.base import output_cosine
from graphopt.targets.onnx.opsets import opset_for_onnxruntime

from helpers import SmallCNN, randomize_batchnorm

pytestmark = pytest.mark.slow

OLD_ONNXRUNTIME = "1.17.3"

RUN_IN_OLD_RUNTIME = """
import json, sys
import numpy as np
import onnxruntime as ort
model, inputs, outputs = sys.argv[1:4]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
feed = dict(np.load(inputs))
np.savez(outputs, *session.run(None, {i.name: feed[i.name] for i in session.get_inputs()}))
print(json.dumps({"version": ort.__version__}))
"""


@pytest.fixture(scope="module")
def old_python() -> Path:
    configured = os.environ.get("GRAPHOPT_OLD_ORT_PYTHON")
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "graphopt-tests"
    environment = cache / f"onnxruntime-{OLD_ONNXRUNTIME}"
    python = environment / "bin" / "python"
    if not python.exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(environment)], capture_output=True, text=True)
        installed = made.returncode == 0 and subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"onnxruntime=={OLD_ONNXRUNTIME}", "numpy<2"],
            capture_output=True, text=True, timeout=600).returncode == 0
        if not installed:
            pytest.skip(f"could not make an environment with onnxruntime {OLD_ONNXRUNTIME}")
    return python


def _run_old(python: Path, path: Path, inputs: dict[str, np.ndarray], folder: Path) -> list[np.ndarray]:
    np.savez(folder / "inputs.npz", **inputs)
    result = subprocess.run([str(python), "-c", RUN_IN_OLD_RUNTIME, str(path), str(folder / "inputs.npz"),
                             str(folder / "outputs.npz")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["version"] == OLD_ONNXRUNTIME
    saved = np.load(folder / "outputs.npz")
    return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def _feed(path: Path, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    import onnx

    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    return {name: t.numpy() for name, t in zip(names, inputs, strict=True)}


def _cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return randomize_batchnorm(SmallCNN()).eval(), (torch.randn(2, 3, 8, 8),)


CASES = {
    "cnn": (_cnn, {}),
    "encoder": (_encoder, {}),
    "cnn-int8-static": (_cnn, {"quantize": "int8"}),
    "encoder-int8-dynamic": (_encoder, {"quantize": "int8-dynamic"}),
}


@pytest.mark.parametrize("opset", [17, opset_for_onnxruntime(OLD_ONNXRUNTIME)])
@pytest.mark.parametrize("case", list(CASES))
def test_files_for_an_old_runtime_match_there(old_python: Path, tmp_path: Path, case: str, opset: int) -> None:
    factory, options = CASES[case]
    model, inputs = factory()
    if options.get("quantize") == "int8":
        options = {**options, "calibration": [inputs] * 4}
    fast = graphopt.optimize(model, inputs, target="cpu", **options)
    path = fast.export_onnx(tmp_path / f"{case}.onnx", opset=opset)
    (output,) = _run_old(old_python, path, _feed(path, inputs), tmp_path)
    expected = model(*inputs).detach()
    if "int8" in case:
        assert output_cosine([expected], [torch.from_numpy(output)]) >= 0.99
    else:
        torch.testing.assert_close(torch.from_numpy(output), expected, rtol=1e-4, atol=1e-4)


def test_fp16_file_for_an_old_runtime(old_python: Path, tmp_path: Path) -> None:
    model, inputs = _encoder()
    fast = graphopt.optimize(model, inputs, target="cpu")
    path = fast.export_onnx(tmp_path / "encoder16.onnx", opset=opset_for_onnxruntime(OLD_ONNXRUNTIME),
                            precision="fp16")
    (output,) = _run_old(old_python, path, _feed(path, inputs), tmp_path)
    assert output.dtype == np.float32
    assert output_cosine([model(*inputs).detach()], [torch.from_numpy(output)]) >= 0.999
