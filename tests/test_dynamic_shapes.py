"""Dynamic shapes: declared dims vary between calls, on every target and in the ONNX file."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from torch.export import Dim

import graphopt
from graphopt.ir.graph import count_ops, same_shape

from helpers import SmallCNN, assert_matches, randomize_batchnorm

transformers = pytest.importorskip("transformers")

BATCHES = (1, 3, 6)
BATCH_AND_SEQ = ((1, 5), (3, 16), (4, 33))  # three sizes of each dim


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(SmallCNN()).eval()


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    return transformers.BertModel(config).eval()


def _tokens(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 100, (batch, seq))
    mask = torch.ones_like(ids)
    mask[:, seq // 2:] = 0 if seq > 2 else 1  # real padding, so the mask matters
    return ids, mask


def _bert_dims() -> dict:
    batch, seq = Dim("batch"), Dim("seq", max=512)
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}


@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_cnn_with_dynamic_batch_runs_every_batch_size(target):
    model = _cnn()
    fast = graphopt.optimize(model, (torch.randn(2, 3, 8, 8),), target=target, dynamic_batch=True)
    assert fast.dynamic.dims == [{0: "batch"}]
    assert count_ops(fast.graph_module)["aten._native_batch_norm_legit_no_training.default"] == 0
    assert "aten.batch_norm.default" not in count_ops(fast.graph_module)  # folding works on symbolic shapes
    for batch in BATCHES:
        assert_matches(fast, model, (torch.randn(batch, 3, 8, 8),))
    assert "batch=3" in " ".join(fast.report.notes)  # the final check ran other sizes too


@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_dynamic_batch_from_an_example_batch_of_one(target):
    # torch.export fixes a dim it sees at 1: the batch is traced at two, the graph checked at one
    model = _cnn()
    fast = graphopt.optimize(model, (torch.randn(1, 3, 8, 8),), target=target, dynamic_batch=True)
    assert fast.dynamic.dims == [{0: "batch"}] and fast.example_inputs[0].shape[0] == 1
    for batch in BATCHES:
        assert_matches(fast, model, (torch.randn(batch, 3, 8, 8),))


def test_a_dim_declared_dynamic_at_size_one_says_so():
    with pytest.raises(graphopt.CaptureError, match="example of size 2 or more"):
        graphopt.optimize(_cnn(), (torch.randn(1, 3, 8, 8),), dynamic_shapes=({0: Dim("batch")},))


@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_bert_with_dynamic_batch_and_sequence(target):
    model = _bert()
    fast = graphopt.optimize(model, _tokens(2, 8), target=target, dynamic_shapes=_bert_dims())
    assert fast.dynamic.dims == [{0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}]
    for batch, seq in BATCH_AND_SEQ:
        inputs = _tokens(batch, seq)
        expected = model(*inputs).last_hidden_state
        torch.testing.assert_close(fast(*inputs).last_hidden_state, expected, atol=1e-5, rtol=1e-4)


def _run_onnx_file(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_onnx_file_has_symbolic_dims_that_onnxruntime_runs(tmp_path):
    model = _bert()
    fast = graphopt.optimize(model, _tokens(2, 8), target="cpu", dynamic_shapes=_bert_dims())
    path = fast.export_onnx(tmp_path / "bert.onnx")
    proto = onnx.load(str(path))
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert dims == [["batch", "seq"], ["batch", "seq"]]
    names = [i.name for i in proto.graph.input]
    for batch, seq in BATCH_AND_SEQ:
        ids, mask = _tokens(batch, seq)
        hidden = _run_onnx_file(path, dict(zip(names, (ids.numpy(), mask.numpy()), strict=True)))[0]
        np.testing.assert_allclose(hidden, model(ids, mask).last_hidden_state.detach().numpy(), atol=1e-5, rtol=1e-4)


def test_cnn_onnx_file_runs_at_several_batch_sizes(tmp_path):
    model = _cnn()
    fast = graphopt.optimize(model, (torch.randn(2, 3, 8, 8),), target="onnx", dynamic_batch=True)
    path = fast.export_onnx(tmp_path / "cnn.onnx")
    for batch in BATCHES:
        x = torch.randn(batch, 3, 8, 8)
        out = _run_onnx_file(path, {onnx.load(str(path)).graph.input[0].name: x.numpy()})[0]
        np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-5, rtol=1e-4)


def test_undeclared_dim_still_gets_a_clear_error():
    fast = graphopt.optimize(_cnn(), (torch.randn(2, 3, 8, 8),), dynamic_batch=True)
    with pytest.raises(graphopt.InputError, match=r"shape \[batch, 3, 8, 8\].*dim 2 is static.*dynamic_shapes"):
        fast(torch.randn(2, 3, 9, 8))


def test_dims_sharing_a_name_must_agree():
    fast = graphopt.optimize(_bert(), _tokens(2, 8), dynamic_shapes=_bert_dims())
    ids, _ = _tokens(2, 8)
    with pytest.raises(graphopt.InputError, match=r"'batch' must be the same for every input"):
        fast(ids, torch.ones(3, 8, dtype=torch.long))


def test_dim_above_its_declared_range_is_refused():
    fast = graphopt.optimize(_bert(), _tokens(2, 8), dynamic_shapes=_bert_dims())
    with pytest.raises(graphopt.InputError, match=r"seq.*outside its range \[.*512\]"):
        fast(*_tokens(2, 513))


class FoldBatchIntoColumns(nn.Module):
    """``(batch, 2) -> (2, batch)``: the same shape as its input at batch 2 only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 2).flatten().view(2, -1) + 1


def test_passes_compare_symbolic_shapes_not_the_example_ones():
    model = FoldBatchIntoColumns()
    captured = graphopt.capture(model, (torch.randn(2, 2),), dynamic_batch=True)
    nodes = {n.target: n for n in captured.graph_module.graph.nodes if n.op == "call_function"}
    scaled, folded = nodes[torch.ops.aten.mul.Tensor], nodes[torch.ops.aten.view.default]
    assert scaled.meta["tensor_meta"].shape == folded.meta["tensor_meta"].shape  # equal at the example ...
    assert not same_shape(scaled, folded)  # ... but not for other batch sizes
    fast = graphopt.optimize(model, (torch.randn(2, 2),), dynamic_batch=True)
    for batch in (1, 4, 5):
        assert_matches(fast, model, (torch.randn(batch, 2),))


def test_dynamic_dim_that_the_model_fixes_is_a_capture_error():
    class FixedBatch(nn.Module):
        def forward(self, x):
            return x.view(2, 6)  # only valid for batch 2

    with pytest.raises(graphopt.CaptureError, match=r"dynamic"):
        graphopt.optimize(FixedBatch(), (torch.randn(2, 6),), dynamic_batch=True)


def test_dynamic_batch_and_dynamic_shapes_together_is_an_input_error():
    with pytest.raises(graphopt.InputError, match="either"):
        graphopt.optimize(_cnn(), (torch.randn(2, 3, 8, 8),), dynamic_batch=True,
                          dynamic_shapes={"x": {0: Dim("batch")}})
