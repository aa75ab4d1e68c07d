"""onnxruntime sessions opened with the weights handed over in memory: same outputs, graph bytes only serialized."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from graphopt.targets.onnx.session_weights import WEIGHT_APART_MIN_BYTES, open_session, weights_apart


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "bias")  # 128 bytes: stays
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["y"]), helper.make_node("Add", ["y", "bias"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 32])], [weight, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_session_reads_the_weights_in_memory_and_computes_the_same():
    model = _model()
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    whole = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session, apart = open_session(model, ort.SessionOptions())
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], whole.run(None, {"x": x})[0])
    assert apart.names == ["weight"]  # the bias is under WEIGHT_APART_MIN_BYTES
    assert 64 * 32 * 4 >= WEIGHT_APART_MIN_BYTES > 32 * 4
    assert len(apart.graph.SerializeToString()) < 1000 < 8000 < len(model.SerializeToString())


def test_the_model_itself_is_left_as_it_was():
    model = _model()
    before = model.SerializeToString()
    stub = next(i for i in weights_apart(model).graph.graph.initializer if i.name == "weight")
    assert stub.data_location == TensorProto.EXTERNAL and list(stub.dims) == [64, 32] and not stub.raw_data
    assert model.SerializeToString() == before


def test_types_numpy_cannot_hold_as_onnxruntime_does_stay_in_the_graph():
    rng = np.random.default_rng(2)
    values = rng.standard_normal((64, 32)).astype(np.float32)
    bfloat16 = helper.make_tensor("weight", TensorProto.BFLOAT16, [64, 32],
                                  (values.view(np.uint32) >> 16).astype(np.uint16).tobytes(), raw=True)
    half = numpy_helper.from_array(values.astype(np.float16), "half")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["weight"], ["w"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["half"], ["h"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["w", "h"], ["s"]), helper.make_node("MatMul", ["x", "s"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])], [bfloat16, half])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((3, 64)).astype(np.float32)
    whole = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session, apart = open_session(model, ort.SessionOptions())
    assert apart.names == ["half"]  # float16 goes as an OrtValue; bfloat16 stays in the graph as it was
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], whole.run(None, {"x": x})[0])
