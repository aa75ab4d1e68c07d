"""graphopt's own onnxruntime kernels (``graphopt.targets.onnx.native_kernels``): ``Int4Linear`` vs ``MatMulNBits``."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.passes.compress import WeightOnly
from graphopt.targets.onnx import native_kernels
from graphopt.targets.onnx.native_kernels import NATIVE_DOMAIN, native_int4_library, native_int4_model
from graphopt.targets.onnx.options import OnnxLowering

LIBRARY = native_int4_library()
needs_library = pytest.mark.skipif(LIBRARY.path is None, reason=f"graphopt's int4 kernel cannot run here: "
                                                                f"{LIBRARY.reason}")
INT4 = {"target": "onnx", "compress": [WeightOnly(bits=4, group_size=32)]}


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 160, bias=False), nn.GELU(), nn.Linear(160, 70)).eval(), torch.randn(5, 96)


def _ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph.node)


def _matmul_nbits_model(n: int, k: int, block: int, rows: int, zero_points: bool, seed: int = 0
                        ) -> tuple[onnx.ModelProto, np.ndarray]:
    """One ``MatMulNBits`` (4 bits, uint8 zero points or none) and its weight as float64."""
    rng = np.random.default_rng(seed)
    blocks = k // block
    q = rng.integers(0, 16, size=(n, blocks, block), dtype=np.uint8)
    scales = (rng.random((n, blocks), dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    zp = rng.integers(0, 16, size=(n, blocks), dtype=np.uint8) if zero_points else np.full((n, blocks), 8, np.uint8)
    weight = ((q.astype(np.float64) - zp[..., None]) * scales[..., None]).reshape(n, k)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    initializers = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.reshape(-1), "scales")]
    inputs = ["A", "B", "scales"]
    if zero_points:
        padded = np.concatenate([zp, np.zeros((n, blocks % 2), np.uint8)], axis=1)
        initializers.append(numpy_helper.from_array((padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8), "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, n])], initializers)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets), weight


def _session(model: onnx.ModelProto, library: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library:
        options.register_custom_ops_library(str(LIBRARY.path))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@needs_library
@pytest.mark.parametrize(("n", "k", "block", "zero_points"), [(70, 96, 32, True), (33, 192, 64, True),
                                                              (1536, 576, 32, False), (9, 128, 128, True)])
def test_int4_linear_computes_matmul_nbits_exactly(n: int, k: int, block: int, zero_points: bool) -> None:
    rows = 6
    model, weight = _matmul_nbits_model(n, k, block, rows, zero_points)
    rewrite = native_int4_model(model)
    assert rewrite.layers == 1 and _ops(rewrite.model) == {"Int4Linear": 1}
    assert rewrite.model.graph.node[0].domain == NATIVE_DOMAIN
    assert _ops(model) == {"MatMulNBits": 1}  # the model given is left as it was
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    expected = x.astype(np.float64) @ weight.T
    ours = _session(rewrite.model, library=True).run(None, {"A": x})[0]
    theirs = _session(model, library=False).run(None, {"A": x})[0]
    scale = np.abs(expected).max()
    assert np.abs(ours - expected).max() / scale < 1e-6  # float32 rounding only
    assert np.abs(ours - theirs).max() / scale < 1e-6


def test_layers_the_kernel_does_not_take_stay_matmul_nbits() -> None:
    model, _ = _matmul_nbits_model(16, 96, 32, 2, zero_points=True)
    node = model.graph.node[0]
    node.attribute.extend([helper.make_attribute("accuracy_level", 4)])  # int8 activations: not what it computes
    assert native_int4_model(model).layers == 0
    odd, _ = _matmul_nbits_model(16, 96, 16, 2, zero_points=False)  # blocks of 16 features: not a multiple of 32
    assert native_int4_model(odd).layers == 0


@needs_library
@pytest.mark.parametrize("rows", [1, 3, 5, 8])  # every register block of the kernel and its tails
def test_int4_layers_run_graphopts_kernel_in_the_session_and_the_file_keeps_matmul_nbits(rows: int) -> None:
    model, _ = _mlp()
    x = torch.randn(rows, 96)
    fast = graphopt.optimize(model, (x,), **INT4)
    stock = graphopt.optimize(model, (x,), lowering=OnnxLowering(native_kernels=False), **INT4)
    note = next(n for n in fast.report.notes if "graphopt's exact kernels" in n)
    assert "2 of 2 MatMulNBits layers" in note and "2 graphopt.Int4Linear (2 with their group offsets" in note
    assert not any("graphopt's exact kernels" in n for n in stock.report.notes)
    assert _ops(fast.runner.model)["MatMulNBits"] == 2 and "Int4Linear" not in _ops(fast.runner.model)
    assert fast.report.final_check == "passed"
    with torch.no_grad():
        other = torch.randn(rows, 96)
        torch.testing.assert_close(fast(other), stock(other), rtol=1e-5, atol=1e-5)
    assert OnnxLowering(native_kernels=False).label().endswith("stock-kernels")


@needs_library
def test_int8_layers_exported_as_two_halves_run_one_int8_kernel() -> None:
    model, x = _mlp()
    int8 = {**INT4, "compress": [WeightOnly(bits=8, group_size=32)]}
    fast = graphopt.optimize(model, (x[:2],), **int8)
    stock = graphopt.optimize(model, (x[:2],), lowering=OnnxLowering(native_kernels=False), **int8)
    assert _ops(fast.runner.model)["MatMulNBits"] == 4  # the file: each int8 layer as two 4-bit halves
    assert any("4 of 4 MatMulNBits layers" in n and "2 graphopt.Int8Linear" in n for n in fast.report.notes)
    session_ops = _ops(native_int4_model(fast.runner.model).model)
    assert session_ops == {"Int8Linear": 2, "Gelu": 1, "Add": 1}  # the add left: the second layer's bias
    with torch.no_grad():
        other = torch.randn(2, 96)
        torch.testing.assert_close(fast(other), stock(other), rtol=1e-5, atol=1e-5)
    assert fast.report.final_check == "passed"


@needs_library
def test_layers_reading_many_or_dynamic_rows_keep_matmul_nbits() -> None:
    model, x = _mlp()
    dynamic = graphopt.optimize(model, (x,), dynamic_batch=True, **INT4)
    assert any("int4 kernel not used: the weight-only layers read a number of rows fixed only at run time" in n
               for n in dynamic.report.notes)
    many = graphopt.optimize(model, (torch.randn(16, 96),), **INT4)
    assert any("int4 kernel not used: the weight-only layers read 16 rows per call" in n for n in many.report.notes)


def test_without_the_library_the_session_runs_matmul_nbits_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHOPT_NATIVE_KERNELS", "0")
    native_kernels.native_int4_library.cache_clear()
    try:
        assert native_int4_library().reason == "GRAPHOPT_NATIVE_KERNELS=0"
        model, x = _mlp()
        fast = graphopt.optimize(model, (x[:1],), **INT4)
    finally:
        monkeypatch.undo()
        native_kernels.native_int4_library.cache_clear()
    assert any("graphopt's int4 kernel not used (GRAPHOPT_NATIVE_KERNELS=0)" in n for n in fast.report.notes)
    assert fast.report.final_check == "passed"

