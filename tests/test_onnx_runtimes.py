"""ONNX files for the runtime a device has: opset choice, IR version, float16 files, ORT format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from test_lowering_onnx import _encoder

import graphopt
from graphopt.errors import InputError, VerificationError
from graphopt.ir.verify import compare_outputs
from graphopt.passes.lossy.base import output_cosine
from graphopt.targets.onnx.opsets import MAX_OPSET, MIN_OPSET, opset_for_onnxruntime
from graphopt.targets.onnx.options import OnnxLowering
from graphopt.targets.onnx.target import OnnxTarget

from helpers import SmallCNN, randomize_batchnorm


@pytest.fixture(scope="module")
def encoder() -> tuple[nn.Module, tuple[torch.Tensor, ...], graphopt.OptimizedModel]:
    model, inputs = _encoder()
    return model, inputs, graphopt.optimize(model, inputs, target="cpu")


def _run_file(path: Path, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feed)


def _standard_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("opset", [17, 18, 20, 21, 22, 23, 25])
def test_every_supported_opset_exports_and_runs(encoder, tmp_path: Path, opset: int) -> None:
    model, inputs, fast = encoder
    path = fast.export_onnx(tmp_path / "encoder.onnx", opset=opset)
    written = onnx.load(str(path))
    assert _standard_opset(written) == opset
    standard = [o for o in written.opset_import if o.domain in ("", "ai.onnx")]
    assert written.ir_version <= onnx.helper.find_min_ir_version_for(standard)  # what a runtime of that age reads
    ops = {node.op_type for node in written.graph.node}
    assert ("Attention" in ops) == (opset >= 23)  # fused attention only where the opset has it
    assert ("Softmax" in ops) == (opset < 23)
    (expected,) = [model(*inputs).detach()]
    assert compare_outputs([torch.from_numpy(_run_file(path, inputs)[0])], [expected]).ok


def test_reductions_are_converted_down_to_opset_17(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = randomize_batchnorm(SmallCNN()).eval(), torch.randn(2, 3, 8, 8)  # global average pool: ReduceMean
    fast = graphopt.optimize(model, (x,), target="onnx")
    path = fast.export_onnx(tmp_path / "cnn17.onnx", opset=17)
    written = onnx.load(str(path))
    onnx.checker.check_model(written, full_check=True)
    assert _standard_opset(written) == 17
    reductions = [n for n in written.graph.node if n.op_type == "ReduceMean"]
    assert reductions and all(a.name != "noop_with_empty_axes" for n in reductions for a in n.attribute)
    assert compare_outputs([torch.from_numpy(_run_file(path, (x,))[0])], [model(x).detach()]).ok


def test_onnx_target_writes_the_opset_it_is_given() -> None:
    model, inputs = _encoder()
    fast = graphopt.optimize(model, inputs, target=OnnxTarget(OnnxLowering(opset=20)))
    assert _standard_opset(fast.runner.model) == 20
    assert "Attention" not in {n.op_type for n in fast.runner.model.graph.node}
    assert compare_outputs([fast(*inputs)], [model(*inputs)]).ok
    section = next(s for s in fast.report.sections if s.title.startswith("onnx lowering"))
    assert "opset20" in section.title and "opset 20" in section.description
    # an opset chosen decides attention: tune does not flip fused_attention under it
    assert all(c.opset == 20 and c.fused_attention for c in OnnxLowering(opset=20).candidates())


@pytest.mark.parametrize("opset", [16, 26, "17", True])
def test_opsets_outside_the_range_are_refused(encoder, tmp_path: Path, opset) -> None:
    _, _, fast = encoder
    with pytest.raises(InputError, match=f"from {MIN_OPSET} to {MAX_OPSET}"):
        fast.export_onnx(tmp_path / "bad.onnx", opset=opset)
    with pytest.raises(ValueError, match="opset"):
        OnnxLowering(opset=opset)


def test_opset_for_an_onnxruntime_release() -> None:
    assert opset_for_onnxruntime("1.17") == 20
    assert opset_for_onnxruntime("1.17.3") == 20
    assert opset_for_onnxruntime("1.14.1") == 18
    assert opset_for_onnxruntime("1.23.0") == 23
    assert opset_for_onnxruntime("2.1") == MAX_OPSET
    with pytest.raises(InputError, match=r"1\.14 or newer"):
        opset_for_onnxruntime("1.10")
    with pytest.raises(InputError, match=r"like '1\.17'"):
        opset_for_onnxruntime("latest")


def test_fp16_file_is_half_the_size_and_keeps_float32_inputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    x = torch.randn(4, 64)
    fast = graphopt.optimize(model, (x,), target="cpu")
    full = fast.export_onnx(tmp_path / "mlp.onnx")
    half = fast.export_onnx(tmp_path / "mlp16.onnx", precision="fp16")
    assert half.stat().st_size < 0.55 * full.stat().st_size
    written = onnx.load(str(half))
    assert written.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert written.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {t.data_type for t in written.graph.initializer} == {onnx.TensorProto.FLOAT16}
    output = torch.from_numpy(_run_file(half, (x,))[0])
    assert output_cosine([model(x).detach()], [output]) >= 0.999
    section = next(s for s in fast.report.sections if s.title == "exported files")
    rows = {row[0]: row for row in section.rows}
    assert rows["mlp16.onnx"][3] == "fp16" and rows["mlp16.onnx"][4] < rows["mlp.onnx"][4]
    both = fast.export_onnx(tmp_path / "mlp16io.onnx", precision="fp16", keep_io_types=False)
    assert onnx.load(str(both)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_fp16_of_a_dynamic_int8_model_keeps_quantization_in_float32(tmp_path: Path) -> None:
    model, inputs = _encoder()
    fast = graphopt.optimize(model, inputs, target="onnx", quantize="int8-dynamic")
    path = fast.export_onnx(tmp_path / "encoder-int8-fp16.onnx", precision="fp16")
    written = onnx.load(str(path))
    quantizers = [n for n in written.graph.node if n.op_type == "DynamicQuantizeLinear"]
    assert quantizers  # int8 kernels are still there, fed float32 through casts
    output = torch.from_numpy(_run_file(path, inputs)[0])
    assert output_cosine([model(*inputs).detach()], [output]) >= 0.99


def test_fp16_that_overflows_is_refused(tmp_path: Path) -> None:
    model = nn.Linear(8, 8).eval()
    with torch.no_grad():
        model.weight.fill_(3000.0)
    x = torch.full((2, 8), 10.0)  # outputs near 240000: beyond float16's 65504
    fast = graphopt.optimize(model, (x,), target="cpu")
    # float16 outputs: onnxruntime's x86 kernels compute in float32, but the file's output itself overflows
    with pytest.raises(VerificationError, match="fp16 ONNX export computes different outputs"):
        fast.export_onnx(tmp_path / "overflow.onnx", precision="fp16", keep_io_types=False)
    with pytest.raises(InputError, match="'fp32' or 'fp16'"):
        fast.export_onnx(tmp_path / "bad.onnx", precision="int8")


def test_ort_format_and_its_operator_list(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = randomize_batchnorm(SmallCNN()).eval(), torch.randn(2, 3, 8, 8)
    fast = graphopt.optimize(model, (x,), target="cpu")
    files = fast.export_ort(tmp_path / "mobile" / "cnn.ort", opset=20)
    assert files.model == tmp_path / "mobile" / "cnn.ort" and files.model.exists()
    assert files.operators.name == "cnn.required_operators.config"
    operators = [line for line in files.operators.read_text().splitlines() if line and not line.startswith("#")]
    assert any(line.startswith("ai.onnx;") and "Conv" in line for line in operators) or any(
        "Conv" in line for line in operators)
    assert compare_outputs([torch.from_numpy(_run_file(files.model, (x,))[0])], [model(x).detach()]).ok
    assert not list((tmp_path / "mobile").glob("*.onnx"))  # the intermediate ONNX file is not left behind
    section = next(s for s in fast.report.sections if s.title == "exported files")
    assert section.rows[-1][:4] == ["cnn.ort", "ort", 20, "fp32"]


def test_cpu_backends_take_the_onnx_export_options() -> None:
    from graphopt.targets.cpu.lowering import TRANSFORMER_OPTIMIZER_EXPORT, CpuLowering

    model, inputs = _encoder()
    lowering = CpuLowering(backend="onnxruntime", onnx=OnnxLowering(opset=20))
    fast = graphopt.optimize(model, inputs, target="cpu", lowering=lowering)
    assert _standard_opset(fast.runner.model) == 20 and fast.target.label() == "cpu:onnxruntime(ort-opset20)"
    assert compare_outputs([fast(*inputs)], [model(*inputs)]).ok
    # tune measures onnxruntime's transformer optimizer on the standard-op attention chains too
    candidates = CpuLowering().candidates()
    assert CpuLowering(backend="onnxruntime", onnx=TRANSFORMER_OPTIMIZER_EXPORT) in candidates
    assert OnnxLowering(fused_attention=False, transformer_optimizer=True) in OnnxLowering().candidates()
    with pytest.raises(ValueError, match="onnx= configures the export"):
        CpuLowering(onnx=OnnxLowering())
