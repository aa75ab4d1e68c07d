"""ONNX models sized and checked without serializing their weights (graphopt.targets.onnx.model_size)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.targets.onnx.model_size import approximate_bytes, check_structure


def _model(weight_type: int = TensorProto.FLOAT, out_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32), "weight")
    weight.data_type = weight_type  # a mismatch the checker must still see
    shape = numpy_helper.from_array(np.array([-1, 64], dtype=np.int64), "shape")
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [256], np.ones(256, np.float32))
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"]),
             helper.make_node("Constant", [], ["offset"], value=bias),
             helper.make_node("Gemm", ["flat", "weight"], ["gemm"], transB=0),
             helper.make_node("Add", ["gemm", "offset"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", out_type, ["n", 256])], [weight, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_approximate_bytes_counts_the_tensors_and_stays_close_to_the_serialized_size() -> None:
    model = _model()
    estimate, actual = approximate_bytes(model), model.ByteSize()
    assert estimate >= 64 * 256 * 4 + 256 * 4  # the weight and the Constant node's tensor
    assert abs(estimate - actual) < 0.05 * actual


def test_check_structure_passes_a_valid_model_and_leaves_it_unchanged() -> None:
    model = _model()
    before = model.SerializeToString()
    check_structure(model)
    assert model.SerializeToString() == before
    assert [t.name for t in model.graph.initializer] == ["weight", "shape"]


@pytest.mark.parametrize("broken", ["output type", "unknown op"])
def test_check_structure_still_catches_type_and_op_errors(broken: str) -> None:
    model = _model(out_type=TensorProto.INT64) if broken == "output type" else _model()
    if broken == "unknown op":
        model.graph.node[2].op_type = "NoSuchOp"
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
        check_structure(model)
