"""The IR toolkit: meta inference (``ir.meta``), argument normalisation (``ir.op_args``), op sets (``ir.ops``)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

from graphopt.ir.capture import capture
from graphopt.ir.graph import register_constant, run_and_record
from graphopt.ir.meta import copy_meta, fake_mode_of, infer_meta, propagate_meta, tensor_metadata
from graphopt.ir.op_args import ConvArguments, argument, conv_arguments, given_argument, normalized_args, set_argument
from graphopt.ir.ops import CONV_OPS, LINEAR_OPS, STRING_PADDING_CONV_OPS

aten = torch.ops.aten


class ConvLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        return self.fc(self.norm(y)).relu()


def _captured(dynamic_batch: bool = False, batch: int = 2) -> tuple[fx.GraphModule, tuple]:
    torch.manual_seed(0)
    captured = capture(ConvLinear().eval(), (torch.randn(batch, 3, 8, 8),), dynamic_batch=dynamic_batch)
    return captured.graph_module, captured.flat_inputs


def _node(gm: fx.GraphModule, target: object) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target == target)


def _add_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """New nodes a rewrite might make: a product with a new constant, a cast, a tuple op and its item."""
    linear = _node(gm, aten.linear.default)
    weight = register_constant(gm, "extra_weight", torch.randn(3, 5), before=linear)
    graph = gm.graph
    with graph.inserting_after(linear):
        product = graph.call_function(aten.linear.default, (linear, weight))
    with graph.inserting_after(product):
        half = graph.call_function(aten._to_copy.default, (product,), {"dtype": torch.float16})
    with graph.inserting_after(half):
        pieces = graph.call_function(aten.split.Tensor, (product, 2, 1))
    with graph.inserting_after(pieces):
        first = graph.call_function(operator.getitem, (pieces, 0))
    gm.recompile()  # nothing reads them: the interpreter still runs every node
    return [product, half, pieces, first]


def test_inferred_shapes_and_dtypes_equal_a_real_run():
    gm, inputs = _captured()
    new = _add_nodes(gm)
    for node in new:
        assert infer_meta(node), node.name
    _, values = run_and_record(gm, inputs, keep_values=True)
    for node in (new[0], new[1], new[3]):
        real = values[node.name]
        assert node.meta["val"].shape == real.shape and node.meta["val"].dtype == real.dtype
        assert isinstance(node.meta["val"], FakeTensor)  # no real computation, even on a real constant
        assert tuple(node.meta["tensor_meta"].shape) == tuple(real.shape)
        assert node.meta["tensor_meta"].dtype == real.dtype
    assert [v.shape for v in new[2].meta["val"]] == [v.shape for v in values[new[2].name]]
    assert "tensor_meta" not in new[2].meta  # a tuple of tensors has none, as after a real run


def test_inferred_meta_matches_what_a_real_run_records():
    gm, inputs = _captured()
    new = _add_nodes(gm)
    for node in new:
        infer_meta(node)
    inferred = {n.name: n.meta.get("tensor_meta") for n in new}
    run_and_record(gm, inputs)  # capture's (and the pass manager's) way of recording tensor_meta
    for node in new:
        assert inferred[node.name] == node.meta.get("tensor_meta"), node.name


def test_dynamic_dims_stay_symbolic_and_tensor_meta_takes_the_example_size():
    gm, _ = _captured(dynamic_batch=True, batch=3)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    batch = x.meta["val"].shape[0]
    assert isinstance(batch, torch.SymInt)
    product, half, pieces, first = _add_nodes(gm)
    assert all([infer_meta(node) for node in (product, half, pieces, first)])
    for node in (product, half, first):
        size = node.meta["val"].shape[0]
        assert isinstance(size, torch.SymInt) and size.node.expr == batch.node.expr
        assert node.meta["tensor_meta"].shape[0] == 3
        assert node.meta["val"].fake_mode is x.meta["val"].fake_mode
    assert tuple(product.meta["val"].shape[1:]) == (3,)


def test_infer_meta_declines_when_an_input_has_no_value():
    gm, _ = _captured()
    linear = _node(gm, aten.linear.default)
    with gm.graph.inserting_after(linear):
        unknown = gm.graph.call_function(aten.neg.default, (linear,))
        later = gm.graph.call_function(aten.relu.default, (unknown,))
    assert infer_meta(unknown)
    del unknown.meta["val"]
    assert not infer_meta(later)
    assert "val" not in later.meta and "tensor_meta" not in later.meta


def test_infer_meta_declines_an_op_that_fails_on_its_inputs():
    gm, _ = _captured()
    linear = _node(gm, aten.linear.default)
    with gm.graph.inserting_after(linear):
        wrong = gm.graph.call_function(aten.mm.default, (linear, linear))  # [2, 5] @ [2, 5]
    assert not infer_meta(wrong)
    assert "val" not in wrong.meta


def test_propagate_meta_follows_a_shrunk_constant_and_keeps_the_rest_as_captured():
    gm, inputs = _captured(dynamic_batch=True)
    captured = {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}
    propagate_meta(gm)
    for node in gm.graph.nodes:
        assert node.meta.get("tensor_meta") == captured[node.name], node.name
    # Shrink the linear layer to 4 outputs: the relu after it has 4 columns now.
    linear = _node(gm, aten.linear.default)
    weight = register_constant(gm, "fc_small", torch.randn(4, 8), before=linear)
    bias = register_constant(gm, "fc_small_bias", torch.randn(4), before=linear)
    linear.args = (linear.args[0], weight, bias)
    gm.recompile()
    propagate_meta(gm)
    relu = _node(gm, aten.relu.default)
    assert relu.meta["val"].shape[1] == 4 and isinstance(relu.meta["val"].shape[0], torch.SymInt)
    assert isinstance(weight.meta["val"], FakeTensor)
    _, values = run_and_record(gm, inputs, keep_values=True)
    assert tuple(relu.meta["tensor_meta"].shape) == tuple(values[relu.name].shape) == (2, 4)


def test_propagate_meta_raises_when_the_graph_no_longer_fits():
    gm, _ = _captured()
    linear = _node(gm, aten.linear.default)
    linear.args = (linear.args[0], register_constant(gm, "bad", torch.randn(4, 7), before=linear), None)
    with pytest.raises(RuntimeError):
        propagate_meta(gm)


def test_copy_meta_and_fake_mode_of():
    gm, _ = _captured()
    linear = _node(gm, aten.linear.default)
    with gm.graph.inserting_after(linear):
        twin = gm.graph.call_function(aten.clone.default, (linear,))
    copy_meta(twin, linear)
    assert twin.meta["val"] is linear.meta["val"] and twin.meta["tensor_meta"] is linear.meta["tensor_meta"]
    assert "nn_module_stack" not in twin.meta
    assert fake_mode_of([twin]) is linear.meta["val"].fake_mode
    assert fake_mode_of([n for n in gm.graph.nodes if n.op == "output"]) is None


def test_tensor_metadata_of_a_static_tensor_is_torchs():
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    value = torch.randn(4, 6).t()
    assert tensor_metadata(value) == _extract_tensor_metadata(value)


# ------------------------------------------------------------------------------------ op_args


def _conv_node(target: object, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """The single node of a graph calling ``target``; the strings "x", "w", "b" in ``args`` become placeholders."""
    graph = fx.Graph()
    inputs = {name: graph.placeholder(name) for name in "xwb"}
    node = graph.call_function(target, tuple(inputs.get(a, a) if isinstance(a, str) else a for a in args),
                               kwargs or {})
    graph.output(node)
    return node


@pytest.mark.parametrize(("target", "args", "kwargs"), [
    (aten.conv2d.default, ("x", "w"), {}),
    (aten.conv2d.default, ("x", "w", None, [1, 1], [0, 0], [1, 1], 1), {}),
    (aten.conv2d.default, ("x", "w"), {"groups": 1, "stride": 1}),
    (aten.convolution.default, ("x", "w", None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1), {}),
])
def test_conv_arguments_read_every_spelling_of_the_default_conv2d(target, args, kwargs):
    args = conv_arguments(_conv_node(target, args, kwargs))
    assert args == ConvArguments(input=args.input, weight=args.weight, bias=None, stride=(1, 1), padding=(0, 0),
                                 dilation=(1, 1), groups=1, transposed=False, output_padding=(0, 0))
    assert args.input.name == "x" and args.weight.name == "w" and args.spatial_dims == 2


def test_conv_arguments_positional_keyword_and_transposed():
    args = conv_arguments(_conv_node(aten.conv2d.default, ("x", "w", "b", [2, 1]), {"padding": 1, "groups": 4}))
    assert (args.bias.name, args.stride, args.padding, args.dilation, args.groups) == ("b", (2, 1), (1, 1), (1, 1), 4)
    args = conv_arguments(_conv_node(aten.convolution.default, ("x", "w", "b", [2], [1], [1], True, [1], 1)))
    assert args.transposed and args.stride == (2,) and args.output_padding == (1,)
    args = conv_arguments(_conv_node(aten.conv_transpose2d.input, ("x", "w")))
    assert args.transposed and args.stride == (1, 1)
    args = conv_arguments(_conv_node(aten.conv1d.padding, ("x", "w", None, 1, "same")))
    assert args.padding == "same" and args.stride == (1,)
    assert conv_arguments(_conv_node(aten.linear.default, ("x", "w"))) is None


@pytest.mark.parametrize("module", [nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2),
                                    nn.Conv2d(4, 6, (3, 1), dilation=(2, 1), bias=False),
                                    nn.Conv3d(4, 4, 1, groups=4)])
def test_conv_arguments_of_captured_convolutions_are_the_modules(module):
    rank = len(module.kernel_size)
    gm = capture(module.eval(), (torch.randn(1, 4, *([8] * rank)),)).graph_module
    (node,) = [n for n in gm.graph.nodes if n.target in CONV_OPS | STRING_PADDING_CONV_OPS]
    args = conv_arguments(node)
    assert (args.stride, args.padding, args.dilation, args.groups) == (
        module.stride, module.padding, module.dilation, module.groups)
    assert (args.bias is None) == (module.bias is None) and not args.transposed


def test_normalized_args_fill_keyword_only_defaults_and_set_argument_keeps_the_spelling():
    graph = fx.Graph()
    b, x, w = (graph.placeholder(n) for n in "bxw")
    addmm = graph.call_function(aten.addmm.default, (b, x, w), {"beta": 2})
    assert normalized_args(addmm) == {"input": b, "mat1": x, "mat2": w, "beta": 2, "alpha": 1}
    assert argument(addmm, "alpha") == 1 and argument(addmm, "nothing", "n/a") == "n/a"
    set_argument(addmm, "beta", 1)
    set_argument(addmm, "mat2", x)
    assert addmm.args == (b, x, x) and addmm.kwargs == {"beta": 1}
    # the schema's ``self`` is ``input`` to every reader and writer, as normalize_function names it
    set_argument(addmm, "input", w)
    assert addmm.args == (w, x, x) and given_argument(addmm, "input") is w and argument(addmm, "input") is w
    assert argument(addmm, "self") is w and given_argument(addmm, "self") is w
    keyword = graph.call_function(aten.addmm.default, (), {"self": b, "mat1": x, "mat2": w})
    set_argument(keyword, "input", x)
    assert keyword.kwargs["self"] is x and "input" not in keyword.kwargs
    conv = graph.call_function(aten.conv2d.default, (x, w))
    set_argument(conv, "groups", 2)  # left out: given by keyword (stride... stay defaults)
    assert conv.args == (x, w) and conv.kwargs == {"groups": 2}
    set_argument(conv, "bias", b)  # right after the last positional one: appended
    assert conv.args == (x, w, b) and conv_arguments(conv).groups == 2
    with pytest.raises(KeyError, match="no argument 'group'"):
        set_argument(conv, "group", 2)
    assert normalized_args(graph.call_function(operator.getitem, (conv, 0))) is None


def test_linear_ops_are_what_capture_writes_for_linear_layers():
    gm = capture(nn.Linear(4, 3).eval(), (torch.randn(2, 4),)).graph_module
    assert any(n.target in LINEAR_OPS for n in gm.graph.nodes)
