import numpy as np
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.ir.graph import count_ops, node_dtype, node_shape


def test_every_node_has_shape_and_dtype(small_cnn):
    model, inputs = small_cnn
    captured = graphopt.capture(model, inputs)
    computed = [n for n in captured.graph_module.graph.nodes if n.op in ("placeholder", "call_function", "get_attr")]
    assert computed
    for node in computed:
        assert node_shape(node) is not None, node.name
        assert node_dtype(node) is not None, node.name
    conv = next(n for n in computed if n.target is torch.ops.aten.conv2d.default)
    assert node_shape(conv) == (2, 8, 8, 8)
    assert node_dtype(conv) == torch.float32


def test_capture_hf_bert_returns_structured_output():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    fast = graphopt.optimize(model, (ids, torch.ones_like(ids)))
    out = fast(ids, torch.ones_like(ids))
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    torch.testing.assert_close(out.last_hidden_state, model(ids, torch.ones_like(ids)).last_hidden_state,
                               atol=1e-5, rtol=1e-4)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        if y.sum() > 0:  # value-dependent branch: not capturable
            return y * 2
        return y


def test_untraceable_model_names_the_source_line():
    with pytest.raises(graphopt.CaptureError) as info:
        graphopt.optimize(DataDependent(), (torch.randn(2, 4),))
    message = str(info.value)
    assert "test_capture.py" in message
    assert "if y.sum() > 0" in message
    assert "torch.where" in message  # says what to do
    assert info.value.source_line is not None and "test_capture.py" in info.value.source_line


def test_wrong_input_shape_is_reported_with_shapes():
    with pytest.raises(graphopt.InputError) as info:
        graphopt.optimize(DataDependent(), (torch.randn(2, 5),))
    message = str(info.value)
    assert "torch.float32[2, 5]" in message
    assert "example_inputs" in message
    assert "self.linear(x)" in message


def test_non_tensor_inputs_are_rejected():
    with pytest.raises(graphopt.InputError, match="must be a tuple of tensors"):
        graphopt.optimize(DataDependent(), "not a tensor")
    with pytest.raises(graphopt.InputError, match=r"torch\.as_tensor"):
        graphopt.optimize(DataDependent(), (np.zeros((2, 4)),))
    with pytest.raises(graphopt.InputError, match=r"torch\.nn\.Module"):
        graphopt.optimize(lambda x: x, (torch.randn(1),))


def test_causal_lm_with_cache_generates_and_without_it_is_one_shot():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (1, 8))
    generative = graphopt.optimize(model, (ids,), example_kwargs={"use_cache": True})
    assert hasattr(generative, "generate") and generative.max_cache_len == 16
    fast = graphopt.optimize(model, (ids,), example_kwargs={"use_cache": False})
    assert isinstance(fast, graphopt.OptimizedModel) and fast.report.final_check == "passed"
    assert torch.allclose(fast(ids, use_cache=False).logits, model(ids, use_cache=False).logits, atol=1e-5)


def test_a_model_returning_a_cache_object_explains_use_cache():
    class ReturnsCache(torch.nn.Module):
        def forward(self, x):
            from transformers.cache_utils import DynamicCache

            return x + 1, DynamicCache()

    pytest.importorskip("transformers")
    with pytest.raises(graphopt.CaptureError, match="use_cache=False"):
        graphopt.optimize(ReturnsCache(), (torch.randn(2, 3),))


def test_user_model_is_not_mutated(small_cnn):
    model, inputs = small_cnn
    model.train()  # optimize must not flip the user's mode either
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids_before = {k: id(v) for k, v in model.state_dict(keep_vars=True).items()}
    model.eval()
    graphopt.optimize(model, inputs)
    model.train()
    graphopt.optimize(model, inputs)
    assert model.training
    after = model.state_dict(keep_vars=True)
    assert set(after) == set(before)
    for name, value in after.items():
        assert torch.equal(value.detach(), before[name]), name
        assert id(value) == ids_before[name], name
    assert all(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in (model.bn, model.bn_fc))


def _captured_exactly(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """The op counts of ``model`` captured on ``x``, after checking the graph computes what the model does."""
    captured = graphopt.capture(model, (x,))
    with torch.no_grad():
        assert torch.allclose(captured.graph_module(x), model(x), atol=1e-6)
    return count_ops(captured.graph_module)


@pytest.mark.parametrize(("kernel", "dilation"), [(3, 1), (4, 1), (3, 2), ((2, 5), 1)])
def test_string_padded_convolutions_capture_with_numeric_padding(kernel, dilation) -> None:
    # padding="same" / "valid" (TensorFlow ports: EfficientNet) is its own ATen overload, which the passes
    # matching conv2d.default would miss; an even kernel pads its odd element after the input, as PyTorch does
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, kernel, padding="same", dilation=dilation), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding="valid")).eval()
    x = torch.randn(2, 3, 11, 13)
    ops = _captured_exactly(model, x)
    assert ops["aten.conv2d.default"] == 2 and "aten.conv2d.padding" not in ops
    fast = graphopt.optimize(model, (x,), target="cpu", lowering=graphopt.CpuLowering())
    assert "aten.batch_norm.default" not in count_ops(fast.portable_graph)  # folded into the convolution
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)


def test_string_padded_conv1d_and_conv3d() -> None:
    for conv, x in ((nn.Conv1d(3, 4, 4, padding="same"), torch.randn(2, 3, 9)),
                    (nn.Conv3d(3, 4, (2, 3, 3), padding="same"), torch.randn(1, 3, 5, 6, 7))):
        assert not any(name.endswith(".padding") for name in _captured_exactly(conv.eval(), x))


def test_an_average_pool_over_its_whole_input_captures_as_global_pooling() -> None:
    # EfficientNet's pooler: a window of 1280 over a 7 x 7 map (ceil_mode), which OpenVINO refuses to convert
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AvgPool2d(1280, ceil_mode=True), nn.Flatten()).eval()
    x = torch.randn(2, 3, 9, 9)
    ops = _captured_exactly(model, x)
    assert ops["aten.adaptive_avg_pool2d.default"] == 1 and "aten.avg_pool2d.default" not in ops

    class OneValueKernel(nn.Module):  # ATen's int[2] given one value: it stands for both dims
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.avg_pool2d(x, [9], ceil_mode=True)

    assert _captured_exactly(OneValueKernel().eval(), x)["aten.adaptive_avg_pool2d.default"] == 1
    local = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AvgPool2d(3, stride=1)).eval()
    assert _captured_exactly(local, x)["aten.avg_pool2d.default"] == 1  # windows over part of the map stay
    pytest.importorskip("openvino")
    fast = graphopt.optimize(model, (x,), target="cpu", lowering=graphopt.CpuLowering(backend="openvino"))
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)
