"""Targets: cpu, gpu (skipped without CUDA), onnx; export_onnx; errors at lowering and call time."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.ir.graph import count_ops

from helpers import assert_matches

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@torch.library.custom_op("graphopt_test::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    return x.sin() * 2


@wobble.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class UsesCustomOp(nn.Module):
    def forward(self, x):
        return wobble(x) + 1


def test_onnx_target_runs_in_onnxruntime(small_cnn):
    model, inputs = small_cnn
    fast = graphopt.optimize(model, inputs, target="onnx")
    assert type(fast.runner).__name__ == "OnnxRuntimeModule"
    assert fast.report.final_check == "passed"
    assert_matches(fast, model, inputs)


def test_export_onnx_writes_a_checked_file_that_matches(small_cnn, tmp_path):
    model, inputs = small_cnn
    fast = graphopt.optimize(model, inputs, target="cpu")
    path = fast.export_onnx(tmp_path / "model.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: inputs[0].numpy()})
    np.testing.assert_allclose(out, model(*inputs).detach().numpy(), rtol=1e-4, atol=1e-5)
    op_types = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in op_types


def test_unexportable_op_names_op_and_node():
    with pytest.raises(graphopt.UnsupportedOpError) as info:
        graphopt.optimize(UsesCustomOp(), (torch.randn(3),), target="onnx")
    assert info.value.op == "graphopt_test::wobble"
    assert info.value.nodes == ["wobble"]
    assert "graphopt_test::wobble" in str(info.value) and "node wobble" in str(info.value)
    assert "target='cpu'" in str(info.value)
    # the same model is fine on the cpu target
    fast = graphopt.optimize(UsesCustomOp(), (torch.randn(3),), target="cpu")
    assert count_ops(fast.graph_module)["graphopt_test.wobble.default"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_gpu_without_cuda_is_a_clear_error(small_cnn):
    model, inputs = small_cnn
    with pytest.raises(graphopt.DeviceUnavailableError, match="target='cpu'"):
        graphopt.optimize(model, inputs, target="gpu")


def test_unknown_target():
    with pytest.raises(ValueError, match="choose one of cpu, gpu, onnx"):
        graphopt.optimize(nn.ReLU(), (torch.randn(2),), target="tpu")


@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_calling_with_other_shapes_says_what_to_do(small_cnn, target):
    model, inputs = small_cnn
    fast = graphopt.optimize(model, inputs, target=target)
    with pytest.raises(graphopt.InputError, match=r"shape \[4, 3, 8, 8\].*optimized for shape \[2, 3, 8, 8\]"):
        fast(torch.randn(4, 3, 8, 8))
    with pytest.raises(graphopt.InputError, match="do not match the example inputs"):
        fast(torch.randn(2, 3, 8, 8), torch.randn(1))


@pytest.mark.gpu
@needs_cuda
def test_gpu_target_runs_on_cuda(small_cnn):
    model, inputs = small_cnn
    fast = graphopt.optimize(model, inputs, target="gpu")
    out = fast(*inputs)
    assert out.is_cuda
    assert_matches(fast, model, inputs)
    assert all(t.is_cuda for t in fast.graph_module.state_dict().values())


@pytest.mark.gpu
@needs_cuda
def test_gpu_target_runs_a_transformer_with_device_constants():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    fast = graphopt.optimize(model, (ids, torch.ones_like(ids)), target="gpu")
    assert fast(ids, torch.ones_like(ids)).last_hidden_state.is_cuda
    assert_matches(fast, model, (ids, torch.ones_like(ids)))


class TransposeContiguousView(nn.Module):
    def forward(self, x):
        return x.transpose(2, 3).contiguous().view(x.shape[0], -1) * 2


@pytest.mark.parametrize("example_layout", ["contiguous", "column-major"])
def test_inputs_laid_out_unlike_the_example_still_run(example_layout):
    # torch.export specializes the graph on the example's strides; calls in another layout must work too
    base = torch.randn(2, 3, 4, 5)
    column_major = base.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    example, other = (base, column_major) if example_layout == "contiguous" else (column_major, base)
    model = TransposeContiguousView()
    fast = graphopt.optimize(model, (example,))
    torch.testing.assert_close(fast(other), model(other))
    torch.testing.assert_close(fast(example), model(example))


def _linear_stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_cpu_model_shares_untouched_weights_with_the_original():
    model = _linear_stack()
    fast = graphopt.optimize(model, (torch.randn(2, 8),), target="cpu")
    original = {p.data_ptr() for p in model.parameters()}
    shared = [p for p in fast.graph_module.parameters() if p.data_ptr() in original]
    assert len(shared) == 4  # no weight was copied: optimizing never doubles a model's memory
    fast.graph_module.to(torch.float64)  # the optimized model's own Parameter objects: the user's stay
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_changing_the_original_weights_afterwards_is_caught(tmp_path):
    model = _linear_stack()
    x = torch.randn(2, 8)
    fast = graphopt.optimize(model, (x,), target="cpu")
    frozen = graphopt.optimize(model, (x,), target="onnx")
    expected = model(x).detach()
    with torch.no_grad():
        model[0].weight.mul_(2)  # e.g. an optimizer step on the user's model
    with pytest.raises(graphopt.InputError, match=r"changed in place after optimize.*optimize again"):
        fast(x)
    with pytest.raises(graphopt.InputError, match="changed in place"):
        fast.save(tmp_path / "stale.pt2")
    torch.testing.assert_close(frozen(x), expected)  # the ONNX session holds its own copy of the weights


def test_gpu_retargets_recorded_values_so_later_rewrites_infer_on_one_device() -> None:
    """The 'meta' device stands in for cuda here: every recorded value follows the weights."""
    from torch._subclasses.fake_tensor import FakeTensor

    from graphopt.ir.graph import register_constant
    from graphopt.ir.meta import infer_meta
    from graphopt.targets.gpu.target import retarget_meta_values

    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)).eval()
    gm = graphopt.optimize(model, (torch.randint(0, 10, (2, 5)),), target="cpu").graph_module
    embedding = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.embedding.default)
    table = register_constant(gm, "table", torch.randn(10, 4), embedding)  # a constant a pass added: real value
    device = torch.device("meta")
    gm.to(device)
    retarget_meta_values(gm, device)
    values = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert values and all(v.device == device for v in values)
    assert not isinstance(table.meta["val"], FakeTensor)
    with gm.graph.inserting_after(embedding):
        lookup = gm.graph.call_function(torch.ops.aten.embedding.default, (table, embedding.args[1]))
    infer_meta(lookup)  # a fake index tensor and a real table: both on the device now
    assert lookup.meta["val"].shape == embedding.meta["val"].shape


@pytest.mark.parametrize("first_target", ["cpu", "onnx"])
def test_an_optimized_model_can_be_optimized_again(small_cnn, first_target):
    model, inputs = small_cnn
    fast = graphopt.optimize(model, inputs, target=first_target)
    again = graphopt.optimize(fast, inputs, target="cpu")
    assert any("is an OptimizedModel" in note for note in again.report.notes)
    assert_matches(again, model, inputs)
