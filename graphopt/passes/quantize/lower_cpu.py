"""Lower a quantized graph's QDQ patterns to real int8 CPU kernels (PyTorch's oneDNN / FBGEMM ops).

The quantized IR computes in float (the fake-quantized reference). The ``cpu`` target runs a
lowered copy in which every quantized op becomes an int8 kernel:

- static conv  ``DQ(x_u8) ⊛ DQ(w_i8) [+ b] [→ relu] → Q`` → ``onednn.qconv_pointwise`` (uint8 in,
  uint8 out, requantization and the fused activation inside the kernel; float out when the
  output is not quantized);
- static linear / addmm → ``onednn.qlinear_pointwise`` the same way (weights prepacked once);
- dynamic linear / addmm / matmul-by-weight → ``quantized.linear_dynamic`` (FBGEMM: the
  activation is quantized inside the kernel, int8 GEMM, float out);
- pass-through ops between int8 ops (max pooling, reshapes, transposes, ReLU) run on the uint8
  tensor itself: ``Q(P(DQ(a)))`` with equal parameters becomes ``P(a)``.

What is left of the QDQ nodes sits around the cheap ops that have no int8 kernel here (add,
concat, average pooling, attention): they read uint8 tensors, compute in float and requantize,
as PyTorch's own quantized add does. ``LOWERINGS`` is the list of rewrite functions run in
order (other quantization schemes append theirs); each takes the graph and returns counts.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable

import torch
import torch.fx as fx

from graphopt.ir import attribute_value, prune_unused_attributes
from graphopt.passes.quantize.lower_weight_only import WEIGHT_ONLY_LOWERINGS
from graphopt.passes.quantize.observers import ACTIVATION_QMAX, ACTIVATION_QMIN
from graphopt.passes.quantize.placement import PASS_THROUGH, is_dequantize

__all__ = ["LOWERINGS", "has_quantized_ops", "lower_quantized_for_cpu"]

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
Lowering = Callable[[fx.GraphModule], dict[str, int]]

_SHAPE_OPS = PASS_THROUGH - {aten.relu.default, aten.hardtanh.default}


def has_quantized_ops(gm: fx.GraphModule) -> bool:
    """True when ``gm`` holds quantize/dequantize nodes (or another scheme's quantized ops)."""
    return any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
        and n.target.namespace in ("quantized_decomposed", "graphopt_weights")
        for n in gm.graph.nodes
    )


def _store(gm: fx.GraphModule, stem: str, value: object, before: fx.Node) -> fx.Node:
    """Keep ``value`` (a packed weight: opaque, not a buffer) as a plain attribute and read it."""
    name, index = f"_go_{stem}", 0
    while hasattr(gm, name):
        index += 1
        name = f"_go_{stem}_{index}"
    setattr(gm, name, value)
    with gm.graph.inserting_before(before), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fx warns about attributes that are not buffers
        return gm.graph.get_attr(name)


def _static_activation(node: object) -> tuple[fx.Node, float, int] | None:
    """``(uint8 tensor, scale, zero point)`` when ``node`` is a static uint8 per-tensor dequantize."""
    if not (isinstance(node, fx.Node) and node.target == qd.dequantize_per_tensor.default):
        return None
    source, scale, zero_point, _, _, dtype = node.args[:6]
    if dtype != torch.uint8:
        return None
    return source, float(scale), int(zero_point)


def _int8_weight(gm: fx.GraphModule, node: object, axis: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(int8 weight with channels on dim 0, float scales per channel)`` behind a weight dequantize."""
    if not is_dequantize(node):
        return None
    q_weight = attribute_value(gm, node.args[0])
    if q_weight is None or q_weight.dtype != torch.int8:
        return None
    if node.target == qd.dequantize_per_channel.default:
        scales = attribute_value(gm, node.args[1])
        if scales is None or node.args[3] != axis:
            return None
    elif node.target == qd.dequantize_per_tensor.default:
        scales = torch.full((q_weight.shape[axis],), float(node.args[1]))
    else:
        return None
    if axis != 0:
        q_weight = q_weight.transpose(0, axis).contiguous()
    return q_weight, scales.float()


def _fused_output(node: fx.Node) -> tuple[fx.Node, str, list[float], fx.Node | None]:
    """The value ending ``node`` (itself or a fused ReLU/ReLU6), the post-op, its args, and the quantize after it."""
    end, post_op, post_args = node, "none", []
    users = list(node.users)
    if len(users) == 1 and users[0].args[0] is node:
        user = users[0]
        if user.target == aten.relu.default:
            end, post_op = user, "relu"
        elif user.target == aten.hardtanh.default:
            low = user.args[1] if len(user.args) > 1 else -1.0
            high = user.args[2] if len(user.args) > 2 else 1.0
            if low == 0:
                end, post_op, post_args = user, "hardtanh", [float(low), float(high)]
    quantizers = [u for u in end.users if u.target == qd.quantize_per_tensor.default and u.args[5] == torch.uint8]
    if len(end.users) == 1 and quantizers:
        return end, post_op, post_args, quantizers[0]
    if end is not node:  # a float output: keep the activation as its own op
        return node, "none", [], None
    return node, post_op, post_args, None


def _read_as_int8(quantize: fx.Node) -> bool:
    """True when an op that runs on int8 data (conv, linear, a pass-through op) reads ``quantize``'s codes.

    Anything else than dequantize nodes reading it, or a dequantize read by such an op, counts.
    """
    int8_readers = {aten.conv2d.default, aten.linear.default, aten.addmm.default} | PASS_THROUGH
    for user in quantize.users:
        if user.target != qd.dequantize_per_tensor.default:
            return True
        if any(reader.op == "call_function" and reader.target in int8_readers for reader in user.users):
            return True
    return False


def _bias(gm: fx.GraphModule, node: object) -> torch.Tensor | bool | None:
    """The constant float bias, None for no bias, False when the bias is computed at run time."""
    if node is None:
        return None
    value = attribute_value(gm, node)
    return value.float() if value is not None else False


def _replace_output(gm: fx.GraphModule, node: fx.Node, end: fx.Node, quantize: fx.Node | None, new: fx.Node) -> None:
    target = quantize if quantize is not None else end
    new.meta["val"] = target.meta.get("val")
    if "tensor_meta" in target.meta:
        new.meta["tensor_meta"] = target.meta["tensor_meta"]
    target.replace_all_uses_with(new)


def lower_static_weighted(gm: fx.GraphModule) -> dict[str, int]:
    """Static conv / linear / addmm with uint8 input and int8 weights → oneDNN int8 kernels."""
    counts = {"qconv": 0, "qlinear": 0}
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (aten.conv2d.default, aten.conv1d.default):
            family, x_arg, w_arg, axis = "qconv", node.args[0], node.args[1], 0
            bias_arg = node.args[2] if len(node.args) > 2 else None
        elif node.target == aten.linear.default:
            family, x_arg, w_arg, axis = "qlinear", node.args[0], node.args[1], 0
            bias_arg = node.args[2] if len(node.args) > 2 else None
        elif node.target == aten.addmm.default and not node.kwargs:
            family, x_arg, w_arg, axis, bias_arg = "qlinear", node.args[1], node.args[2], 1, node.args[0]
        else:
            continue
        activation = _static_activation(x_arg)
        weight = _int8_weight(gm, w_arg, axis)
        bias = _bias(gm, bias_arg)
        if activation is None or weight is None or bias is False:
            continue
        if family == "qconv" and node.target == aten.conv1d.default:
            continue  # oneDNN's int8 convolution here is 2-D
        source, x_scale, x_zp = activation
        q_weight, w_scales = weight
        end, post_op, post_args, quantize = _fused_output(node)
        out_scale, out_zp, out_dtype = 1.0, 0, torch.float32
        float_readers: list[fx.Node] = []
        if quantize is not None and not _read_as_int8(quantize):
            # only float ops read the result: the kernel writes float directly (no requantize + dequantize)
            float_readers, quantize = list(quantize.users), None
        elif quantize is not None:
            out_scale, out_zp, out_dtype = float(quantize.args[1]), int(quantize.args[2]), torch.uint8
        w_zps = torch.zeros(w_scales.shape, dtype=torch.int64)
        scales_node = _store(gm, f"{node.name}_w_scales", w_scales, node)
        zps_node = _store(gm, f"{node.name}_w_zps", w_zps, node)
        bias_node = _store(gm, f"{node.name}_bias", bias, node) if bias is not None else None
        if family == "qlinear":
            packed = torch.ops.onednn.qlinear_prepack(q_weight, None)
            packed_node = _store(gm, f"{node.name}_packed", packed, node)
            args = (source, x_scale, x_zp, packed_node, scales_node, zps_node, bias_node, out_scale, out_zp,
                    out_dtype, post_op, post_args, "")
            target = torch.ops.onednn.qlinear_pointwise.default
        else:
            stride, padding, dilation, groups = _conv_defaults(node)
            packed = torch.ops.onednn.qconv_prepack(q_weight, w_scales, x_scale, x_zp, stride, padding, dilation,
                                                    groups, None)
            packed_node = _store(gm, f"{node.name}_packed", packed, node)
            args = (source, x_scale, x_zp, packed_node, scales_node, zps_node, bias_node, stride, padding, dilation,
                    groups, out_scale, out_zp, out_dtype, post_op, post_args, "")
            target = torch.ops.onednn.qconv_pointwise.default
        with graph.inserting_before(end if quantize is None else quantize):
            new = graph.call_function(target, args)
        _replace_output(gm, node, end, quantize, new)
        for reader in float_readers:
            reader.replace_all_uses_with(new)
        counts[family] += 1
    return counts


def _conv_defaults(node: fx.Node) -> tuple[list[int], list[int], list[int], int]:
    """stride, padding, dilation, groups of an ``aten.conv2d`` call with trailing defaults omitted."""
    dims = 2 if node.target == aten.conv2d.default else 1
    defaults: list[object] = [[1] * dims, [0] * dims, [1] * dims, 1]
    given = list(node.args[3:7])
    values = given + defaults[len(given):]
    stride, padding, dilation, groups = values
    expand = lambda v: list(v) if isinstance(v, (list, tuple)) else [int(v)] * dims  # noqa: E731
    return expand(stride), expand(padding), expand(dilation), int(groups)


def lower_pass_through(gm: fx.GraphModule) -> dict[str, int]:
    """``Q(P(DQ(a)))`` with equal parameters → ``P(a)`` on the uint8 tensor (reshapes, max pooling, ReLU)."""
    count = 0
    graph = gm.graph
    for quantize in list(graph.nodes):
        if quantize.target != qd.quantize_per_tensor.default:
            continue
        middle = quantize.args[0]
        if not (isinstance(middle, fx.Node) and middle.op == "call_function" and middle.target in PASS_THROUGH):
            continue
        activation = _static_activation(middle.args[0])
        if activation is None:
            continue
        source, scale, zero_point = activation
        if (float(quantize.args[1]), int(quantize.args[2]), quantize.args[5]) != (scale, zero_point, torch.uint8):
            continue
        with graph.inserting_before(quantize):
            if middle.target == aten.max_pool2d.default:  # uint8 max pooling fails on channels-last input here
                dense = graph.call_function(aten.contiguous.default, (source,))
                new = graph.call_function(middle.target, (dense, *middle.args[1:]), dict(middle.kwargs))
            elif middle.target in _SHAPE_OPS:
                new = graph.call_function(middle.target, (source, *middle.args[1:]), dict(middle.kwargs))
            elif middle.target == aten.relu.default:
                new = graph.call_function(aten.clamp_min.default, (source, zero_point))
            else:  # hardtanh(low, high) on the codes
                low = middle.args[1] if len(middle.args) > 1 else -1.0
                high = middle.args[2] if len(middle.args) > 2 else 1.0
                codes = [min(max(round(v / scale) + zero_point, ACTIVATION_QMIN), ACTIVATION_QMAX) for v in (low, high)]
                new = graph.call_function(aten.clamp.default, (source, *codes))
        new.meta["val"] = quantize.meta.get("val")
        quantize.replace_all_uses_with(new)
        count += 1
    return {"int8_pass_through": count}


def _dynamic_source(node: object) -> fx.Node | None:
    """The float input of a run-time quantized activation ``DQ(Q(x, choose_qparams(x)))``."""
    if not (isinstance(node, fx.Node) and node.target == qd.dequantize_per_tensor.tensor):
        return None
    quantize = node.args[0]
    if not (isinstance(quantize, fx.Node) and quantize.target == qd.quantize_per_tensor.tensor):
        return None
    scale = quantize.args[1]
    if not (isinstance(scale, fx.Node) and scale.target == operator.getitem):
        return None
    choose = scale.args[0]
    if not (isinstance(choose, fx.Node) and choose.target == qd.choose_qparams.tensor):
        return None
    return quantize.args[0]


def lower_dynamic_linear(gm: fx.GraphModule) -> dict[str, int]:
    """Dynamic linear / addmm / matmul-by-weight → ``quantized.linear_dynamic`` (FBGEMM int8 GEMM)."""
    count = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.linear.default:
            x_arg, w_arg, axis = node.args[0], node.args[1], 0
            bias_arg = node.args[2] if len(node.args) > 2 else None
        elif node.target == aten.addmm.default and not node.kwargs:
            x_arg, w_arg, axis, bias_arg = node.args[1], node.args[2], 1, node.args[0]
        elif node.target == aten.matmul.default:
            x_arg, w_arg, axis, bias_arg = node.args[0], node.args[1], 1, None
        else:
            continue
        source = _dynamic_source(x_arg)
        weight = _int8_weight(gm, w_arg, axis)
        bias = _bias(gm, bias_arg)
        if source is None or weight is None or bias is False:
            continue
        q_weight, scales = weight
        quantized = torch._make_per_channel_quantized_tensor(
            q_weight, scales.double(), torch.zeros(scales.shape, dtype=torch.int64), 0)
        packed = torch.ops.quantized.linear_prepack(quantized, bias)
        packed_node = _store(gm, f"{node.name}_packed", packed, node)
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.quantized.linear_dynamic.default, (source, packed_node, False))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
        node.replace_all_uses_with(new)
        count += 1
    return {"dynamic_linear": count}


def lower_remaining_qdq(gm: fx.GraphModule) -> dict[str, int]:
    """The static quantize / dequantize nodes left → one fused ATen kernel each (the decomposed forms take 4-5)."""
    count = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target not in (qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default):
            continue
        if node.args[3:6] != (ACTIVATION_QMIN, ACTIVATION_QMAX, torch.uint8) or node.kwargs:
            continue
        value, scale, zero_point = node.args[:3]
        with graph.inserting_before(node):
            if node.target == qd.quantize_per_tensor.default:
                quantized = graph.call_function(aten.quantize_per_tensor.default,
                                                (value, float(scale), int(zero_point), torch.quint8))
                new = graph.call_function(aten.int_repr.default, (quantized,))
            else:
                quantized = graph.call_function(aten._make_per_tensor_quantized_tensor.default,
                                                (value, float(scale), int(zero_point)))
                new = graph.call_function(aten.dequantize.self, (quantized,))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta")})
        node.replace_all_uses_with(new)
        count += 1
    return {"int8_qdq_kernels": count}


LOWERINGS: list[Lowering] = [lower_pass_through, lower_static_weighted, lower_dynamic_linear, lower_remaining_qdq]
"""The rewrites ``lower_quantized_for_cpu`` runs, in order; other schemes append theirs."""
LOWERINGS += WEIGHT_ONLY_LOWERINGS  # compressed weights: weight-only int8/int4 kernels, K-means (lower_weight_only)


def lower_quantized_for_cpu(gm: fx.GraphModule) -> dict[str, int]:
    """Rewrite ``gm`` in place so its quantized ops run int8 kernels; returns counts per kernel kind."""
    counts: dict[str, int] = {}
    for lowering in LOWERINGS:
        for key, value in lowering(gm).items():
            counts[key] = counts.get(key, 0) + value
    gm.graph.eliminate_dead_code()
    prune_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()
    return counts
