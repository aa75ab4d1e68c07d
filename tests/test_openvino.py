"""OpenVINO as the runtime of the ONNX export: OnnxLowering(runtime="openvino"), CpuLowering(backend="openvino")."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn as nn
from quantize_models import ResidualConvNet
from test_lowering_onnx import _encoder

import graphopt
from graphopt.errors import InputError, LoweringError
from graphopt.ir.verify import compare_outputs
from graphopt.passes.lossy.base import output_cosine
from graphopt.targets.cpu.lowering import CpuLowering
from graphopt.targets.cpu.target import CpuTarget, cpu_has_bfloat16
from graphopt.targets.onnx.openvino_runtime import (
    OpenVinoModule,
    import_openvino,
    refuse_contrib_ops,
    without_bfloat16_casts,
)
from graphopt.targets.onnx.options import OnnxLowering
from graphopt.targets.onnx.target import OnnxTarget

from helpers import SmallCNN, randomize_batchnorm

pytest.importorskip("openvino")

OPENVINO = OnnxLowering(runtime="openvino")


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return randomize_batchnorm(SmallCNN()).eval(), torch.randn(2, 3, 8, 8)


def _conv_mlp() -> tuple[nn.Module, torch.Tensor]:
    """Convolutions and linears wide enough that bfloat16 visibly rounds them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    return model.eval(), torch.randn(4, 3, 16, 16)


def _section(fast: graphopt.OptimizedModel) -> graphopt.ReportSection:
    return next(s for s in fast.report.sections if s.title.startswith("onnx lowering") and "rewrites" not in s.title)


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


def _precision_note(fast: graphopt.OptimizedModel) -> str:
    return next(note for note in fast.report.notes if "OpenVINO inference precision" in note)


def test_cnn_runs_in_openvino_like_eager() -> None:
    model, x = _cnn()
    fast = graphopt.optimize(model, (x,), target="onnx", lowering=OPENVINO)
    assert isinstance(fast.runner, OpenVinoModule) and fast.runner.precision == "f32"
    assert fast.report.final_check == "passed"
    assert compare_outputs([fast(x)], [model(x)]).ok
    other = torch.randn(2, 3, 8, 8)
    assert compare_outputs([fast(other)], [model(other)]).ok  # a second call reuses the infer request
    assert _section(fast).title == "onnx lowering 'openvino'"
    assert "OpenVINO" in _section(fast).description
    assert _precision_note(fast).startswith("onnx lowering: OpenVINO inference precision f32")


def test_encoder_with_fused_attention_and_dynamic_sequence() -> None:
    model, inputs = _encoder()
    seq = torch.export.Dim("seq", min=2, max=64)
    fast = graphopt.optimize(model, inputs, target="onnx", lowering=OPENVINO,
                             dynamic_shapes={"x": {1: seq}, "mask": {1: seq}})
    assert _ops(fast.runner.model)["Attention"] == 1  # OpenVINO reads opset 23's Attention
    assert compare_outputs([fast(*inputs)], [model(*inputs)]).ok
    x, mask = torch.randn(2, 9, 32), torch.ones(2, 9, dtype=torch.bool)
    mask[0, 7:] = False
    assert compare_outputs([fast(x, mask)], [model(x, mask)]).ok


def test_cpu_backend_openvino_with_dynamic_batch() -> None:
    model, x = _cnn()
    fast = graphopt.optimize(model, (x,), target="cpu", lowering=CpuLowering(backend="openvino"), dynamic_batch=True)
    assert isinstance(fast.runner, OpenVinoModule)
    assert fast.target.label() == "cpu:openvino"
    for batch in (1, 5):
        other = torch.randn(batch, 3, 8, 8)
        out = fast(other)
        assert out.shape == (batch, 5) and compare_outputs([out], [model(other)]).ok


def test_bf16_graph_runs_in_bfloat16_within_its_budget() -> None:
    model, x = _conv_mlp()
    fast = graphopt.optimize(model, (x,), target="cpu", lowering=CpuLowering(backend="openvino"), precision="bf16")
    assert fast.runner.precision == "bf16"  # unset openvino_precision on a bf16 graph: the bf16 hint, within budget
    exported = fast.runner.model
    opset = next(o.version for o in exported.opset_import if o.domain == "")
    assert opset >= 22  # Conv takes bfloat16 from opset 22
    assert any(i.data_type == onnx.TensorProto.BFLOAT16 for i in exported.graph.initializer)
    assert _ops(exported)["Cast"] >= 2
    compiled = without_bfloat16_casts(exported)  # what OpenVINO compiles under its bf16 hint: the casts undone
    assert not any(i.data_type == onnx.TensorProto.BFLOAT16 for i in compiled.graph.initializer)
    assert _ops(compiled)["Identity"] == _ops(exported)["Cast"] and "Cast" not in _ops(compiled)
    assert fast.report.final_check == "passed" and fast.report.final_cosine >= 0.999
    other = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert output_cosine([model(other)], [fast(other)]) >= 0.999
        assert not compare_outputs([fast(other)], [model(other)]).ok  # really computed in bfloat16
        (everything,) = OpenVinoModule(exported, None, "bf16")(other)  # every op OpenVINO can in bfloat16
        assert output_cosine([model(other)], [everything]) >= 0.999
    assert "OpenVINO inference precision bf16" in _precision_note(fast)


def test_bf16_graph_keeps_the_f32_hint_when_the_bf16_hint_strays(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bf16 hint must keep within a share of the budget's slack of the graph; else the file runs as written."""
    from graphopt.targets.onnx import openvino_runtime

    monkeypatch.setattr(openvino_runtime, "AUTO_BFLOAT16_SLACK_SHARE", 0.0)  # nothing but the graph's own outputs
    model, x = _conv_mlp()
    fast = graphopt.optimize(model, (x,), target="cpu", lowering=CpuLowering(backend="openvino"), precision="bf16")
    assert fast.runner.precision == "f32"
    assert "precision f32; the graph's bfloat16 layers run in bfloat16" in _precision_note(fast)
    assert any("bf16 hint left the graph" in note for note in fast.report.notes)
    assert fast.report.final_check == "passed" and fast.report.final_cosine >= 0.999


def test_f32_inference_keeps_the_graphs_bfloat16_layers() -> None:
    """OpenVINO's f32 hint runs the file as written: the layers precision="bf16" reduced stay bfloat16."""
    from graphopt.targets.onnx.export import export_graph_to_onnx

    model, x = _conv_mlp()
    reduced = graphopt.optimize(model, (x,), target="cpu", precision="bf16")
    (out,) = OpenVinoModule(export_graph_to_onnx(reduced.portable_graph, (x,), {}, opset=22), None, "f32")(x)
    with torch.no_grad():
        assert output_cosine([reduced.portable_graph(x)], [out]) >= 0.9999
        assert not compare_outputs([out], [model(x)]).ok  # bfloat16 rounding, not float32's
    assert OnnxLowering(runtime="openvino", openvino_precision="f32").label() == "openvino-f32"


def test_explicit_bf16_without_a_budget_is_refused() -> None:
    model, x = _cnn()
    lowering = OnnxLowering(runtime="openvino", openvino_precision="bf16")
    with pytest.raises(InputError, match=r"precision='bf16'"):
        graphopt.optimize(model, (x,), target="onnx", lowering=lowering)


def test_int8_static_qdq_runs_in_openvino_within_budget() -> None:
    torch.manual_seed(0)
    model, x = ResidualConvNet().eval(), torch.randn(4, 3, 16, 16)
    calibration = [(torch.randn(4, 3, 16, 16),) for _ in range(2)]
    fast = graphopt.optimize(model, (x,), target="onnx", lowering=OPENVINO, quantize="int8", calibration=calibration)
    # unset openvino_precision on a graph with int8 activations: the bf16 hint, kept within half the budget's slack
    assert isinstance(fast.runner, OpenVinoModule) and fast.runner.precision == "bf16"
    assert "OpenVINO inference precision bf16" in _precision_note(fast)
    ops = _ops(fast.runner.model)
    assert ops["QuantizeLinear"] >= 5 and ops["DequantizeLinear"] >= 5
    assert fast.report.final_check == "passed"
    other = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert output_cosine([model(other)], [fast(other)]) >= 0.99


def test_int8_graph_keeps_the_f32_hint_when_the_bf16_hint_strays(monkeypatch: pytest.MonkeyPatch) -> None:
    from graphopt.targets.onnx import openvino_runtime

    monkeypatch.setattr(openvino_runtime, "AUTO_BFLOAT16_SLACK_SHARE", 0.0)  # nothing but the graph's own outputs
    torch.manual_seed(0)
    model, x = ResidualConvNet().eval(), torch.randn(4, 3, 16, 16)
    fast = graphopt.optimize(model, (x,), target="onnx", lowering=OPENVINO, quantize="int8",
                             calibration=[(torch.randn(4, 3, 16, 16),) for _ in range(2)])
    assert fast.runner.precision == "f32"
    assert any("bf16 hint left the graph" in note and "float32 between the int8 layers" in note
               for note in fast.report.notes)
    assert fast.report.final_check == "passed"


def test_int8_dynamic_and_explicit_bf16_under_the_int8_budget() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).eval()
    x = torch.randn(8, 64)
    lowering = OnnxLowering(runtime="openvino", openvino_precision="bf16")
    fast = graphopt.optimize(model, (x,), target="onnx", lowering=lowering, quantize="int8-dynamic",
                             calibration=[(torch.randn(8, 64),)])
    assert fast.runner.precision == "bf16"  # allowed: the quantized graph answers to a budget
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= set(_ops(fast.runner.model))  # standard ops, no contrib
    assert fast.report.final_check == "passed"
    with torch.no_grad():
        assert output_cosine([model(x)], [fast(x)]) >= 0.99
    assert _section(fast).title == "onnx lowering 'openvino-bf16'"


def test_weight_only_layers_are_refused_with_what_to_do() -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), torch.randn(2, 64)
    with pytest.raises(LoweringError, match=r"MatMulNBits.*runtime='onnxruntime'"):
        graphopt.optimize(model, (x,), target="onnx", lowering=OPENVINO, quantize="int8-weight-only")


def test_contrib_ops_are_named_in_the_refusal() -> None:
    node = onnx.helper.make_node("GroupQueryAttention", ["q"], ["y"], domain="com.microsoft")
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("q", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    with pytest.raises(LoweringError, match=r"GroupQueryAttention x1 \(attention over a key/value cache"):
        refuse_contrib_ops(onnx.helper.make_model(graph))


def test_decoder_step_with_state_is_refused() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    lm = transformers.LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(1))
    with pytest.raises(LoweringError, match=r"key/value cache as state.*runtime='onnxruntime'"):
        graphopt.optimize(lm, (prompt,), target=OnnxTarget(OPENVINO))


def test_save_writes_the_onnx_file_openvino_ran(tmp_path: Path) -> None:
    model, x = _cnn()
    fast = graphopt.optimize(model, (x,), target="onnx", lowering=OPENVINO)
    path = fast.runner.save(tmp_path / "cnn.onnx")
    reloaded = OpenVinoModule(onnx.load(str(path)), None)
    assert compare_outputs(list(reloaded(x)), [model(x)]).ok


def test_options_are_validated_and_labelled() -> None:
    with pytest.raises(ValueError, match="'onnxruntime' or 'openvino'"):
        OnnxLowering(runtime="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="None, 'f32' or 'bf16'"):
        OnnxLowering(runtime="openvino", openvino_precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="runtime='openvino' only"):
        OnnxLowering(openvino_precision="f32")
    with pytest.raises(ValueError, match="transformer_optimizer"):
        OnnxLowering(runtime="openvino", transformer_optimizer=True)
    with pytest.raises(ValueError, match="backend must be"):
        CpuLowering(backend="tvm")  # type: ignore[arg-type]
    assert [OnnxLowering(runtime="openvino", openvino_precision=p).label() for p in (None, "f32", "bf16")] == [
        "openvino", "openvino-f32", "openvino-bf16"]
    assert OnnxLowering(runtime="openvino", fused_attention=False).label() == "openvino-opset-default"
    assert CpuLowering(backend="openvino").label() == "openvino"


def test_candidates_add_openvino_only_where_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import graphopt.targets.cpu.lowering as cpu_lowering
    import graphopt.targets.onnx.options as onnx_options

    assert OPENVINO in OnnxLowering().candidates()
    assert "cpu:openvino" in [t.label() for t in CpuTarget().candidates()]
    assert OnnxLowering(runtime="onnxruntime") in OPENVINO.candidates()
    monkeypatch.setattr(onnx_options, "openvino_installed", lambda: False)
    monkeypatch.setattr(cpu_lowering, "openvino_installed", lambda: False)
    assert all(c.runtime == "onnxruntime" for c in OnnxLowering().candidates())
    assert all(c.backend != "openvino" for c in CpuLowering().candidates())


def test_missing_openvino_is_a_lowering_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(LoweringError, match="pip install openvino"):
        import_openvino()


def test_bf16_inference_that_misses_the_budget_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    import graphopt.targets.onnx.openvino_runtime as openvino_runtime

    monkeypatch.setattr(openvino_runtime, "_bfloat16_check", lambda *args: "output cosine 0.9 (stand-in)")
    torch.manual_seed(0)
    mlp, inputs = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), torch.randn(8, 64)
    with pytest.raises(LoweringError, match="misses the fidelity budget"):
        graphopt.optimize(mlp, (inputs,), target="onnx", quantize="int8-dynamic", calibration=[(inputs,)],
                          lowering=OnnxLowering(runtime="openvino", openvino_precision="bf16"))


def test_casts_stay_where_bfloat16_is_more_than_the_layers() -> None:
    """A bfloat16 input is the model's own: undoing the casts would change what the model takes."""
    helper, types = onnx.helper, onnx.TensorProto
    nodes = [helper.make_node("Cast", ["z"], ["z16"], to=types.BFLOAT16), helper.make_node("Add", ["x", "z16"], ["s"]),
             helper.make_node("Cast", ["s"], ["y"], to=types.FLOAT)]
    inputs = [helper.make_tensor_value_info("x", types.BFLOAT16, [2]),
              helper.make_tensor_value_info("z", types.FLOAT, [2])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", types.FLOAT, [2])])
    model = helper.make_model(graph)
    assert without_bfloat16_casts(model) is model
    inputs[0] = helper.make_tensor_value_info("x", types.FLOAT, [2])
    nodes.insert(1, helper.make_node("Cast", ["x"], ["x16"], to=types.BFLOAT16))
    nodes[2].input[0] = "x16"
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", types.FLOAT, [2])])
    stripped = without_bfloat16_casts(helper.make_model(graph))  # float32 in and out: every cast undone
    assert [n.op_type for n in stripped.graph.node] == ["Identity", "Identity", "Add", "Identity"]


def test_int8_on_the_cpu_target_with_openvino_runs_in_openvino() -> None:
    torch.manual_seed(0)
    model, x = ResidualConvNet().eval(), torch.randn(4, 3, 16, 16)
    calibration = [(torch.randn(4, 3, 16, 16),) for _ in range(2)]
    fast = graphopt.optimize(model, (x,), target=CpuTarget(CpuLowering(backend="openvino")), quantize="int8",
                             calibration=calibration)
    assert isinstance(fast.runner, OpenVinoModule)  # not PyTorch's int8 kernels under an openvino label
    assert _ops(fast.runner.model)["QuantizeLinear"] >= 5
    assert fast.report.final_check == "passed"


def test_openvino_compiles_an_untidied_export_once_and_writes_a_tidy_file(tmp_path: Path, monkeypatch) -> None:
    import graphopt.targets.onnx.openvino_runtime as runtime

    compiles = []
    compile_model = runtime._compile
    monkeypatch.setattr(runtime, "_compile", lambda *a: compiles.append(a[1:]) or compile_model(*a))
    model, inputs = _encoder()  # attention: the export's trial run compiles it, and the runner reuses that
    fast = graphopt.optimize(model, inputs, target="cpu", lowering=CpuLowering(backend="openvino"))
    assert isinstance(fast.runner, OpenVinoModule) and compiles == [("f32", torch.get_num_threads())]
    ran = fast.runner.model  # onnxscript's optimizer skipped: OpenVINO transforms the graph as it compiles
    written = onnx.load(str(fast.export_onnx(tmp_path / "encoder.onnx")))
    onnx_target = graphopt.optimize(model, inputs, target="onnx").runner.model
    assert len(written.graph.node) == len(onnx_target.graph.node) < len(ran.graph.node)
    assert "Constant" in _ops(ran) and "Constant" not in _ops(written)
    row = next(s for s in fast.report.sections if s.title == "exported files").rows[-1]
    assert row[0] == "encoder.onnx" and row[5] <= 1e-4


def test_export_of_a_bf16_openvino_model_is_the_file_it_ran(tmp_path: Path) -> None:
    model, x = _conv_mlp()
    fast = graphopt.optimize(model, (x,), target="cpu", lowering=CpuLowering(backend="openvino"), precision="bf16")
    path = fast.export_onnx(tmp_path / "bf16.onnx")  # checked in OpenVINO (onnxruntime has no bfloat16 Conv)
    written = onnx.load(str(path))
    assert any(i.data_type == onnx.TensorProto.BFLOAT16 for i in written.graph.initializer)
    row = next(s for s in fast.report.sections if s.title == "exported files").rows[-1]
    assert row[0] == "bf16.onnx" and row[6] >= 0.999


@pytest.mark.skipif(not cpu_has_bfloat16(), reason="needs a CPU with bfloat16 instructions")
def test_cpu_target_by_name_lowers_a_bf16_graph_with_openvino() -> None:
    model, x = _conv_mlp()
    fast = graphopt.optimize(model, (x,), target="cpu", precision="bf16")
    assert isinstance(fast.runner, OpenVinoModule)
    assert any("lowers as 'cpu:openvino'" in note for note in fast.report.notes)
    assert fast.report.final_check == "passed" and fast.report.final_cosine >= 0.999
    named = graphopt.optimize(model, (x,), target="cpu", precision="bf16", lowering=CpuLowering())
    assert not isinstance(named.runner, OpenVinoModule)  # a lowering the user names is kept
    plain = graphopt.optimize(model, (x,), target="cpu")
    assert not isinstance(plain.runner, OpenVinoModule)  # float32 graphs keep PyTorch's kernels


def test_cpu_target_by_name_lowers_a_static_int8_conv_net_with_openvino(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = ResidualConvNet().eval(), torch.randn(4, 3, 16, 16)
    calibration = [(torch.randn(4, 3, 16, 16),) for _ in range(2)]
    fast = graphopt.optimize(model, (x,), target="cpu", quantize="int8", calibration=calibration)
    assert isinstance(fast.runner, OpenVinoModule)
    assert any("lowers as 'cpu:openvino'" in note for note in fast.report.notes)
    assert fast.report.final_check == "passed"
    other = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert output_cosine([model(other)], [fast(other)]) >= 0.99
    loaded = graphopt.load(fast.save(tmp_path / "int8.pt2"))
    assert isinstance(loaded.runner, OpenVinoModule) and loaded.runner.precision == "f32"  # no budget saved
    with torch.no_grad():
        assert output_cosine([model(other)], [loaded(other)]) >= 0.99
    in_pytorch = graphopt.load(tmp_path / "int8.pt2", target=CpuTarget())
    assert not isinstance(in_pytorch.runner, OpenVinoModule)  # a Target object is lowered as given
    named = graphopt.optimize(model, (x,), target="cpu", quantize="int8", calibration=calibration,
                              lowering=CpuLowering())
    assert not isinstance(named.runner, OpenVinoModule)  # a lowering the user names is kept
    dynamic = graphopt.optimize(model, (x,), target="cpu", quantize="int8-dynamic")
    assert not isinstance(dynamic.runner, OpenVinoModule)  # int8 computed at run time: PyTorch's kernels
    mlp, features = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).eval(), torch.randn(8, 64)
    linears = graphopt.optimize(mlp, (features,), target="cpu", quantize="int8", calibration=[(torch.randn(8, 64),)])
    assert not isinstance(linears.runner, OpenVinoModule)  # no convolutions: PyTorch's int8 kernels


def test_a_lowering_picked_for_the_graph_that_fails_falls_back_to_the_named_target(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from graphopt.targets.onnx import lowering as onnx_lowering

    def refuse(*args: object, **kwargs: object) -> None:
        raise LoweringError("this OpenVINO cannot compile the file")

    monkeypatch.setattr(onnx_lowering, "openvino_runner", refuse)
    torch.manual_seed(0)
    model, x = ResidualConvNet().eval(), torch.randn(4, 3, 16, 16)
    fast = graphopt.optimize(model, (x,), target="cpu", quantize="int8",
                             calibration=[(torch.randn(4, 3, 16, 16),) for _ in range(2)])
    assert not isinstance(fast.runner, OpenVinoModule) and fast.target.lowering.backend == "graph"
    assert any(f"'cpu:openvino' could not lower this graph (this OpenVINO cannot compile the file): lowered as "
               f"{CpuTarget().label()!r}" in note for note in fast.report.notes)
    assert fast.report.final_check == "passed"
    with pytest.raises(LoweringError, match="cannot compile"):  # a lowering the user names is not replaced
        graphopt.optimize(model, (x,), target="cpu", quantize="int8", lowering=CpuLowering(backend="openvino"),
                          calibration=[(torch.randn(4, 3, 16, 16),) for _ in range(2)])


def test_tune_measures_openvino_bfloat16_only_for_graphs_with_a_budget() -> None:
    from graphopt.passes.lossy.base import Fidelity
    from graphopt.targets.tune import tune_candidates

    target = CpuTarget()
    exact = [c.label for c in tune_candidates(target)]
    lossy = [c.label for c in tune_candidates(target, Fidelity())]
    assert "cpu:openvino" in exact and "cpu:openvino(openvino-bf16)" not in exact
    assert "cpu:openvino(openvino-bf16)" in lossy
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).eval(), torch.randn(8, 64)
    fast = graphopt.optimize(model, (x,), target="onnx", quantize="int8-dynamic", tune=True)
    section = next(s for s in fast.report.sections if s.title.startswith("tune"))
    assert any("openvino-bf16" in str(row[0]) for row in section.rows)
    assert fast.report.final_check == "passed"


def test_precision_bf16_on_the_onnx_target_with_openvino() -> None:
    model, x = _conv_mlp()
    fast = graphopt.optimize(model, (x,), target="onnx", lowering=OPENVINO, precision="bf16")
    assert isinstance(fast.runner, OpenVinoModule)
    assert any(i.data_type == onnx.TensorProto.BFLOAT16 for i in fast.runner.model.graph.initializer)
    assert fast.report.final_check == "passed" and fast.report.final_cosine >= 0.999
    with pytest.raises(InputError, match="runtime='openvino'"):  # onnxruntime has no bfloat16 matrix kernels
        graphopt.optimize(model, (x,), target="onnx", precision="bf16")
