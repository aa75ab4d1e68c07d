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
needs_library = pytest.mark.skipif(LIBRARY.path is None, reason=f"graphopt's kernels cannot run here: "
                                                                f"{LIBRARY.reason}")
INT4 = {"target": "onnx", "compress": [WeightOnly(bits=4, group_size=32)]}


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 160, bias=False), nn.GELU(), nn.Linear(160, 70)).eval(), torch.randn(5, 96)


def _ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph.node)


def _matmul_nbits_model(n: int, k: int, block: int, rows: int, zero_points: bool, seed: int = 0
                        ) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """One ``MatMulNBits`` (4 bits, uint8 zero points or none), its weight and its codes times scales (float64)."""
    rng = np.random.default_rng(seed)
    blocks = k // block
    q = rng.integers(0, 16, size=(n, blocks, block), dtype=np.uint8)
    scales = (rng.random((n, blocks), dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    zp = rng.integers(0, 16, size=(n, blocks), dtype=np.uint8) if zero_points else np.full((n, blocks), 8, np.uint8)
    weight = ((q.astype(np.float64) - zp[..., None]) * scales[..., None]).reshape(n, k)
    scaled_codes = (q * scales[..., None].astype(np.float64)).reshape(n, k)
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
    return helper.make_model(graph, opset_imports=opsets), weight, scaled_codes


def _kernel_rounding_bound(x: np.ndarray, weight: np.ndarray, scaled_codes: np.ndarray) -> np.ndarray:
    """The most the kernels' roundings can move each output: half a 16-bit step per activation times the
    codes, and float16 scales and offsets (2^-11 relative, plus subnormals' absolute step) times the products."""
    groups = x.reshape(x.shape[0], -1, 32).astype(np.float64)
    half_steps = np.repeat(np.abs(groups).max(axis=2) / 32512 / 2 * 1.01, 32, axis=1)  # [rows, K]
    offsets = np.abs(weight - scaled_codes)  # the offset part of each weight
    half_precision = 2.0 ** -11 * (np.abs(scaled_codes) + offsets) + 2.0 ** -24 * 16
    return half_steps @ np.abs(scaled_codes).T + np.abs(x) @ half_precision.T


def _assert_within_kernel_rounding(ours: torch.Tensor, stock: torch.Tensor, original: torch.Tensor) -> None:
    """``ours`` (graphopt's kernels) differs from ``stock`` (``MatMulNBits`` on float activations), by less than a
    tenth of what the 4-bit weights themselves change (``stock`` against the ``original`` float model)."""
    kernels = (ours - stock).abs().max().item()
    assert 0 < kernels < 0.1 * (stock - original).abs().max().item()


def _session(model: onnx.ModelProto, library: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library:
        options.register_custom_ops_library(str(LIBRARY.path))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@needs_library
@pytest.mark.parametrize(("n", "k", "block", "zero_points"), [(70, 96, 32, True), (33, 192, 64, True),
                                                              (1536, 576, 32, False), (9, 128, 128, True)])
def test_int4_linear_computes_matmul_nbits_within_its_rounding_bound(n: int, k: int, block: int,
                                                                        zero_points: bool) -> None:
    rows = 6
    model, weight, scaled_codes = _matmul_nbits_model(n, k, block, rows, zero_points)
    rewrite = native_int4_model(model)
    assert rewrite.layers == 1 and _ops(rewrite.model) == {"Int4Linear": 1}
    assert rewrite.model.graph.node[0].domain == NATIVE_DOMAIN
    assert _ops(model) == {"MatMulNBits": 1}  # the model given is left as it was
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    expected = x.astype(np.float64) @ weight.T
    ours = _session(rewrite.model, library=True).run(None, {"A": x})[0]
    theirs = _session(model, library=False).run(None, {"A": x})[0]
    scale = np.abs(expected).max()
    error = np.abs(ours - expected)
    assert (error <= _kernel_rounding_bound(x, weight, scaled_codes) + 1e-6 * scale).all()  # + float32 rounding
    assert 0 < error.max() / scale < 1e-3
    assert np.abs(theirs - expected).max() / scale < 1e-6  # MatMulNBits at accuracy level 0: float32 rounding
    for node in model.graph.node:  # MatMulNBits' own fast path (int8 activations) strays several times further
        node.attribute.extend([helper.make_attribute("accuracy_level", 4)])
    int8_activations = _session(model, library=False).run(None, {"A": x})[0]
    assert np.abs(int8_activations - expected).max() > 4 * error.max()
    x[0, 3], x[1, 5] = np.nan, np.inf  # non-finite inputs turn their rows to NaN, never to finite numbers
    spoiled = _session(rewrite.model, library=True).run(None, {"A": x})[0]
    assert np.isnan(spoiled[:2]).all() and np.array_equal(spoiled[2:], ours[2:])


def _silu_times(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    gate = gate.astype(np.float64)
    return gate / (1 + np.exp(-gate)) * up


def _constant_bound(name: str, value: int) -> list[onnx.NodeProto]:
    """``name`` = [value] computed as torch.onnx writes slice bounds: a Constant, cast, then reshaped to [-1]."""
    return [helper.make_node("Constant", [], [f"{name}_c"], value=numpy_helper.from_array(np.array(value, np.int64))),
            helper.make_node("Cast", [f"{name}_c"], [f"{name}_i"], to=TensorProto.INT64),
            helper.make_node("Constant", [], [f"{name}_s"], value_ints=[-1]),
            helper.make_node("Reshape", [f"{name}_i", f"{name}_s"], [name])]


def _swiglu_model(width: int, k: int, rows: int, form: str
                  ) -> tuple[onnx.ModelProto, onnx.ModelProto, list[tuple[np.ndarray, np.ndarray]]]:
    """``SiLU(gate) * up`` over 4-bit layers, the bare layer(s) it reads, and the (weight, codes times scales) of
    gate and up (``_matmul_nbits_model``): gate and up as slices, a split or equal halves of one layer of
    ``2 * width`` features, or as two layers."""
    if form == "two layers":
        gate, *gate_parts = _matmul_nbits_model(width, k, 32, rows, zero_points=True, seed=0)
        up, *up_parts = _matmul_nbits_model(width, k, 32, rows, zero_points=True, seed=1)
        parts = [tuple(gate_parts), tuple(up_parts)]
        for model, name in ((gate, "G"), (up, "U")):
            for tensor in model.graph.initializer:
                tensor.name = f"{name}_{tensor.name}"
            node = model.graph.node[0]
            node.input[1:] = [f"{name}_{i}" for i in node.input[1:]]
            node.output[0] = name
        nodes = [gate.graph.node[0], up.graph.node[0]]
        initializers = [*gate.graph.initializer, *up.graph.initializer]
        bare_outputs = ["G", "U"]
    else:
        layer, *both = _matmul_nbits_model(2 * width, k, 32, rows, zero_points=True)
        parts = [(both[0][:width], both[1][:width]), (both[0][width:], both[1][width:])]
        nodes, initializers, bare_outputs = list(layer.graph.node), list(layer.graph.initializer), ["Y"]
        if form == "split":
            nodes += [helper.make_node("Constant", [], ["sizes"], value_ints=[width, width]),
                      helper.make_node("Split", ["Y", "sizes"], ["G", "U"], axis=-1)]
        elif form == "halves":  # torch's chunk(2): a Split into equal parts, no sizes given
            nodes += [helper.make_node("Split", ["Y"], ["G", "U"], axis=-1, num_outputs=2)]
        else:  # slices along axis 1 (the last), as torch.onnx exports them
            for name, start, stop in (("G", 0, width), ("U", width, 2 * width)):
                nodes += [*_constant_bound(f"{name}_start", start), *_constant_bound(f"{name}_stop", stop),
                          *_constant_bound(f"{name}_axis", 1),
                          helper.make_node("Slice", ["Y", f"{name}_start", f"{name}_stop", f"{name}_axis"], [name])]
    nodes += [helper.make_node("Sigmoid", ["G"], ["sig"]), helper.make_node("Mul", ["G", "sig"], ["silu"]),
              helper.make_node("Mul", ["U", "silu"], ["Z"])]
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [rows, k])
    value_info = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, 2 * width])]
    swiglu = helper.make_model(helper.make_graph(
        nodes, "g", [a], [helper.make_tensor_value_info("Z", TensorProto.FLOAT, [rows, width])], initializers,
        value_info=value_info), opset_imports=opsets)
    bare = helper.make_model(helper.make_graph(
        nodes[:2] if form == "two layers" else nodes[:1], "g", [a],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in bare_outputs], initializers),
        opset_imports=opsets)
    return swiglu, bare, parts


@needs_library
@pytest.mark.parametrize("form", ["slices", "split", "halves", "two layers"])
@pytest.mark.parametrize("width", [64, 40])  # whole tiles of 16 features, and a padded last tile
def test_swiglu_blocks_run_as_one_gated_kernel(form: str, width: int) -> None:
    rows, k = 3, 96
    model, bare, parts = _swiglu_model(width, k, rows, form)
    rewrite = native_int4_model(model)
    assert rewrite.swiglus == 1 and _ops(rewrite.model) == {"Int4SwiGLU": 1}
    assert rewrite.layers == (2 if form == "two layers" else 1)
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    gated = _session(rewrite.model, library=True).run(None, {"A": x})[0]
    linears = _session(native_int4_model(bare).model, library=True).run(None, {"A": x})  # the ungated kernels
    gate, up = (linears[0][:, :width], linears[0][:, width:]) if form != "two layers" else linears
    expected = _silu_times(gate, up)  # the same integer products: only SiLU's exponential and float32 rounding differ
    assert np.abs(gated - expected).max() <= 1e-5 * np.abs(expected).max()
    (gate_bound, exact_gate), (up_bound, exact_up) = ((_kernel_rounding_bound(x, *p), x.astype(np.float64) @ p[0].T)
                                                      for p in parts)
    exact = _silu_times(exact_gate, exact_up)  # SiLU's slope lies within [-0.1, 1.1]
    bound = 1.1 * gate_bound * np.abs(exact_up) + np.abs(_silu_times(exact_gate, 1)) * up_bound + gate_bound * up_bound
    assert (np.abs(gated - exact) <= bound + 1e-6 * np.abs(exact).max()).all()
    stock = _session(model, library=False).run(None, {"A": x})[0]  # MatMulNBits, Sigmoid, Mul: float32 rounding
    assert np.abs(stock - exact).max() < 1e-5 * np.abs(exact).max() < np.abs(gated - stock).max()
    x[1, 7] = np.nan
    spoiled = _session(rewrite.model, library=True).run(None, {"A": x})[0]
    assert np.isnan(spoiled[1]).all() and np.array_equal(spoiled[[0, 2]], gated[[0, 2]])


@needs_library
def test_a_swiglu_whose_parts_are_read_elsewhere_keeps_separate_kernels() -> None:
    model, _, _ = _swiglu_model(64, 96, 2, "slices")
    model.graph.output.append(helper.make_tensor_value_info("sig", TensorProto.FLOAT, None))
    rewrite = native_int4_model(model)
    assert rewrite.swiglus == 0 and _ops(rewrite.model)["Int4Linear"] == 1 and _ops(rewrite.model)["Slice"] == 2
    x = np.random.default_rng(2).standard_normal((2, 96)).astype(np.float32)
    ours, stock = (_session(m, library=lib).run(None, {"A": x}) for m, lib in ((rewrite.model, True), (model, False)))
    assert all(np.abs(a - b).max() < 1e-3 * np.abs(b).max() for a, b in zip(ours, stock, strict=True))


def _skip_norm_model(k: int, n: int, rows: int) -> onnx.ModelProto:
    """onnxruntime's skip-add RMS norm feeding a 4-bit layer; outputs the layer's result and the sum."""
    layer, _, _ = _matmul_nbits_model(n, k, 32, rows, zero_points=True)
    gamma = np.random.default_rng(3).uniform(0.5, 1.5, k).astype(np.float32)
    norm = helper.make_node("SkipSimplifiedLayerNormalization", ["A", "S", "gamma"], ["normed", "", "", "sum"],
                            domain="com.microsoft", epsilon=1e-5)
    matmul = layer.graph.node[0]
    matmul.input[0] = "normed"
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows, k]) for name in ("A", "S")]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, n]),
               helper.make_tensor_value_info("sum", TensorProto.FLOAT, [rows, k])]
    graph = helper.make_graph([norm, matmul], "g", inputs, outputs,
                              [*layer.graph.initializer, numpy_helper.from_array(gamma, "gamma")])
    return helper.make_model(graph, opset_imports=list(layer.opset_import))


@needs_library
def test_a_skip_norm_before_a_kernel_runs_inside_it() -> None:
    rows, k, n = 3, 96, 40
    model = _skip_norm_model(k, n, rows)
    rewrite = native_int4_model(model)
    assert rewrite.skip_norms == 1 and _ops(rewrite.model) == {"SkipNormInt4Linear": 1}
    rng = np.random.default_rng(4)
    feeds = {name: rng.standard_normal((rows, k)).astype(np.float32) for name in ("A", "S")}
    (ours, ours_sum), (stock, stock_sum) = (_session(m, library=lib).run(None, feeds)
                                            for m, lib in ((rewrite.model, True), (model, False)))
    np.testing.assert_allclose(ours_sum, stock_sum, rtol=1e-6, atol=1e-6)
    bare, _, _ = _matmul_nbits_model(n, k, 32, rows, zero_points=True)  # the same layer on onnxruntime's norm
    normed = _session(helper.make_model(helper.make_graph(
        model.graph.node[:1], "g", list(model.graph.input),
        [helper.make_tensor_value_info("normed", TensorProto.FLOAT, None)], list(model.graph.initializer)),
        opset_imports=list(model.opset_import)), library=False).run(None, feeds)[0]
    unfused = _session(native_int4_model(bare).model, library=True).run(None, {"A": normed})[0]
    assert np.abs(ours - unfused).max() < 1e-4 * np.abs(unfused).max()  # the norm's own float rounding
    assert np.abs(ours - stock).max() < 1e-3 * np.abs(stock).max()
    model.graph.output.append(helper.make_tensor_value_info("normed", TensorProto.FLOAT, None))
    assert native_int4_model(model).skip_norms == 0  # the normed values are read outside: the norm stays


class _SwiGLUMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(96, 128, bias=False), nn.Linear(96, 128, bias=False)
        self.down = nn.Linear(128, 96, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


@needs_library
def test_a_swiglu_mlp_runs_its_gated_kernel_through_optimize() -> None:
    torch.manual_seed(0)
    model, x = _SwiGLUMLP().eval(), torch.randn(2, 96)
    fast = graphopt.optimize(model, (x,), **INT4)
    stock = graphopt.optimize(model, (x,), lowering=OnnxLowering(native_kernels=False), **INT4)
    note = next(n for n in fast.report.notes if "graphopt's kernels" in n)
    assert "3 of 3 MatMulNBits layers" in note or "2 of 2 MatMulNBits layers" in note
    assert "1 SwiGLU blocks run their gate and up layers as one kernel" in note
    assert fast.report.final_check == "passed"
    with torch.no_grad():
        other = torch.randn(2, 96)
        _assert_within_kernel_rounding(fast(other), stock(other), model(other))


def test_layers_the_kernel_does_not_take_stay_matmul_nbits() -> None:
    model, _, _ = _matmul_nbits_model(16, 96, 32, 2, zero_points=True)
    node = model.graph.node[0]
    node.attribute.extend([helper.make_attribute("accuracy_level", 4)])  # int8 activations: not what it computes
    assert native_int4_model(model).layers == 0
    odd, _, _ = _matmul_nbits_model(16, 96, 16, 2, zero_points=False)  # blocks of 16 features: not a multiple of 32
    assert native_int4_model(odd).layers == 0
    huge, _, _ = _matmul_nbits_model(16, 96, 32, 2, zero_points=True)  # scales float16 cannot hold
    scales = next(t for t in huge.graph.initializer if t.name == "scales")
    scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales) * 1e7, "scales"))
    assert native_int4_model(huge).layers == 0


@needs_library
@pytest.mark.parametrize("rows", [1, 3, 5, 8, 16])  # every register block of the kernel, its tails, the limit
def test_int4_layers_run_graphopts_kernel_in_the_session_and_the_file_keeps_matmul_nbits(rows: int) -> None:
    model, _ = _mlp()
    x = torch.randn(rows, 96)
    fast = graphopt.optimize(model, (x,), **INT4)
    stock = graphopt.optimize(model, (x,), lowering=OnnxLowering(native_kernels=False), **INT4)
    note = next(n for n in fast.report.notes if "graphopt's kernels" in n)
    assert "2 of 2 MatMulNBits layers" in note and "2 graphopt.Int4Linear (2 with their group offsets" in note
    assert not any("graphopt's kernels" in n for n in stock.report.notes)
    assert _ops(fast.runner.model)["MatMulNBits"] == 2 and "Int4Linear" not in _ops(fast.runner.model)
    assert fast.report.final_check == "passed"
    with torch.no_grad():
        other = torch.randn(rows, 96)
        _assert_within_kernel_rounding(fast(other), stock(other), model(other))
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
        _assert_within_kernel_rounding(fast(other), stock(other), model(other))
    assert fast.report.final_check == "passed"


@needs_library
def test_layers_reading_many_or_dynamic_rows_keep_matmul_nbits() -> None:
    model, x = _mlp()
    dynamic = graphopt.optimize(model, (x,), dynamic_batch=True, **INT4)
    assert any("int4/int8 kernels not used: the weight-only layers read a number of rows fixed only at run time" in n
               for n in dynamic.report.notes)
    many = graphopt.optimize(model, (torch.randn(24, 96),), **INT4)
    assert any("kernels not used: the weight-only layers read 24 rows per call" in n for n in many.report.notes)


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
    assert any("graphopt's int4/int8 kernels not used (GRAPHOPT_NATIVE_KERNELS=0)" in n for n in fast.report.notes)
    assert fast.report.final_check == "passed"



@needs_library
def test_a_missed_budget_falls_back_from_graphopts_kernels_to_onnxruntimes_float_path() -> None:
    from graphopt.targets.cpu.lowering import CpuLowering
    from graphopt.targets.cpu.target import CpuTarget
    from graphopt.targets.onnx.target import OnnxTarget

    onnx_chain = [OnnxTarget(OnnxLowering(weight_only_activations="int8"))]
    while (more := onnx_chain[-1].exact_weight_lowering()) is not None:
        onnx_chain.append(more)
    assert [(t.lowering.weight_only_activations, t.lowering.native_kernels) for t in onnx_chain] == [
        ("int8", True), ("float", True), ("float", False)]
    cpu = CpuTarget(CpuLowering(backend="onnxruntime")).exact_weight_lowering()
    assert cpu is not None and cpu.lowering.onnx_lowering().native_kernels is False
    assert cpu.exact_weight_lowering() is None
    model, x = _mlp()
    graph = graphopt.optimize(model, (x[:1],), **INT4).portable_graph
    assert OnnxTarget().weight_kernels_round_within_bound(graph)  # the kernels a loaded model keeps
    assert not onnx_chain[-1].weight_kernels_round_within_bound(graph)
