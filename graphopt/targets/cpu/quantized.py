"""Lower a quantized graph's QDQ patterns to real int8 CPU kernels (PyTorch's oneDNN ops).

The quantized IR computes in float (the fake-quantized reference). The ``cpu`` target runs a
lowered copy in which every quantized op becomes an int8 kernel:

- static conv  ``DQ(x_u8) ⊛ DQ(w_i8) [+ b] [→ relu] → Q`` → ``onednn.qconv_pointwise`` (uint8 in,
  uint8 out, requantization and the fused activation inside the kernel; float out when the
  output is not quantized); with a residual add after it, ``qconv2d_pointwise.binary``;
- static linear / addmm → ``onednn.qlinear_pointwise`` the same way, GELU fused too (weights
  prepacked once), and a float residual add after a float output in its ``binary`` epilogue;
- dynamic linear / addmm / matmul-by-weight → ``dynamic_int8_linear`` (the activation quantized
  at run time by one kernel, oneDNN's int8 GEMM with a fused ReLU / GELU, float out);
- pass-through ops between int8 ops (max pooling, reshapes, transposes, ReLU) run on the uint8
  tensor itself: ``Q(P(DQ(a)))`` with equal parameters becomes ``P(a)``.

What is left of the QDQ nodes sits around the cheap ops that have no int8 kernel here (add,
concat, average pooling, attention): they read uint8 tensors, compute in float and requantize,
as PyTorch's own quantized add does.

``INT8_LOWERING`` is the ordered list of these rewrites (then the weight-only ones of
``graphopt.targets.cpu.weight_only`` and ``graphopt.targets.common.weight_only_kernels``, then
dead-code elimination): ``CpuTarget`` runs it through the pass manager, each rewrite verified
against the graph before it. The int8 kernels round once where the QDQ reference rounds twice,
so they are ``KernelSubstitution`` passes, held to the fidelity budget
(``graphopt.targets.common.lowering``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt.ir.op_args import argument
from graphopt.passes.base import NodeRewrite, Pass, PassResult
from graphopt.passes.cleanup import DeadCodeElimination
from graphopt.passes.quantize.observers import ACTIVATION_QMAX, ACTIVATION_QMIN
from graphopt.passes.quantize.patterns import constant_bias, int8_weight, static_activation
from graphopt.passes.quantize.placement import PASS_THROUGH, is_dequantize
from graphopt.targets.common.lowering import KernelSubstitution
from graphopt.targets.common.patterns import dynamic_int8_gemm, residual_operand
from graphopt.targets.common.weight_only_kernels import (
    ExpandCompressedWeights,
    GatherCodebookEmbeddings,
    GatherQuantizedEmbeddings,
    copy_meta,
)
from graphopt.targets.cpu.weight_only import CpuWeightOnlyKernels

__all__ = [
    "INT8_LOWERING",
    "OnednnConvAdd",
    "OnednnDynamicLinear",
    "OnednnInt8Kernels",
    "OnednnLinearResidual",
    "QdqKernels",
    "Uint8PassThrough",
    "WEIGHT_ONLY_LOWERING",
    "dynamic_int8_linear",
]

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

_SHAPE_OPS = PASS_THROUGH - {aten.relu.default, aten.hardtanh.default}


def _packed_stay_plain(copy: fx.GraphModule) -> None:
    """A deepcopy hook: fx registers every tensor attribute of a copied graph module as a buffer.

    Packed oneDNN weights have no storage (nothing reads their bytes, a state dict cannot hold
    them): in the pass manager's rollback copies they stay plain attributes, as in the original.
    """
    for name, value in list(copy._buffers.items()):
        if isinstance(value, torch.Tensor) and value.is_mkldnn:
            del copy._buffers[name]
            object.__setattr__(copy, name, value)


def _store(gm: fx.GraphModule, stem: str, value: object, before: fx.Node) -> fx.Node:
    """Keep ``value`` (a packed weight: opaque, not a buffer) as a plain attribute and read it.

    The node records the value itself (as ``register_constant`` does), so the pass manager's
    rollback copies share it (an opaque tensor cannot be copied) instead of copying it before
    each pass.
    """
    name, index = f"_go_{stem}", 0
    while hasattr(gm, name):
        index += 1
        name = f"_go_{stem}_{index}"
    setattr(gm, name, value)
    if _packed_stay_plain not in gm._deepcopy_hooks:
        gm._register_deepcopy_hook(_packed_stay_plain)
    with gm.graph.inserting_before(before), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fx warns about attributes that are not buffers
        node = gm.graph.get_attr(name)
    node.meta["val"] = value
    return node


@dataclass(frozen=True)
class _FusedOutput:
    """Where an int8 kernel's result ends: ``end`` (the op or its fused activation), the post-op, the quantize after."""

    end: fx.Node
    post_op: str = "none"
    post_args: tuple[float, ...] = ()
    algorithm: str = ""
    quantize: fx.Node | None = None


def _fused_output(node: fx.Node, gelu: bool = False) -> _FusedOutput:
    """The value ending ``node`` (itself or a fused ReLU / ReLU6 / GELU) and the uint8 quantize after it, if any.

    ``gelu``: the kernel takes GELU as a post-op (oneDNN's int8 linear does; its int8 conv is not asked to).
    """
    fused = _FusedOutput(node)
    users = list(node.users)
    if len(users) == 1 and users[0].args[0] is node:
        user = users[0]
        if user.target == aten.relu.default:
            fused = _FusedOutput(user, "relu")
        elif user.target == aten.hardtanh.default:
            low = user.args[1] if len(user.args) > 1 else -1.0
            high = user.args[2] if len(user.args) > 2 else 1.0
            if low == 0:
                fused = _FusedOutput(user, "hardtanh", (float(low), float(high)))
        elif gelu and user.target == aten.gelu.default:
            fused = _FusedOutput(user, "gelu", algorithm=str(argument(user, "approximate", "none")))
    end = fused.end
    quantizers = [u for u in end.users if u.target == qd.quantize_per_tensor.default and u.args[5] == torch.uint8]
    if len(end.users) == 1 and quantizers:
        return dataclasses.replace(fused, quantize=quantizers[0])
    if fused.post_op == "gelu":  # a float output: oneDNN's fused GELU in float32 (as a separate op would run it)
        return fused
    if end is not node:  # a float output: keep the activation as its own op
        return _FusedOutput(node)
    return fused


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


def _replace_output(gm: fx.GraphModule, node: fx.Node, end: fx.Node, quantize: fx.Node | None, new: fx.Node) -> None:
    target = quantize if quantize is not None else end
    new.meta["val"] = target.meta.get("val")
    if "tensor_meta" in target.meta:
        new.meta["tensor_meta"] = target.meta["tensor_meta"]
    target.replace_all_uses_with(new)


@dataclass(frozen=True)
class _WeightedOperands:
    """What an int8 conv / linear kernel needs from a ``conv2d`` / ``linear`` / ``addmm`` node of the QDQ graph."""

    family: str  # "qconv" or "qlinear"
    source: fx.Node  # the uint8 activation
    x_scale: float
    x_zero_point: int
    q_weight: torch.Tensor  # int8, output channels on dim 0
    w_scales: torch.Tensor
    bias: torch.Tensor | None


def _weighted_operands(gm: fx.GraphModule, node: fx.Node) -> _WeightedOperands | None:
    """The int8 operands of a static conv2d / linear / addmm reading a uint8 activation, or None."""
    if node.op != "call_function":
        return None
    if node.target == aten.conv2d.default:  # oneDNN's int8 convolution here is 2-D
        family, x_arg, w_arg, axis = "qconv", node.args[0], node.args[1], 0
        bias_arg = node.args[2] if len(node.args) > 2 else None
    elif node.target == aten.linear.default:
        family, x_arg, w_arg, axis = "qlinear", node.args[0], node.args[1], 0
        bias_arg = node.args[2] if len(node.args) > 2 else None
    elif node.target == aten.addmm.default and not node.kwargs:
        family, x_arg, w_arg, axis, bias_arg = "qlinear", node.args[1], node.args[2], 1, node.args[0]
    else:
        return None
    activation = static_activation(x_arg)
    weight = int8_weight(gm, w_arg, axis)
    bias = constant_bias(gm, bias_arg)
    if activation is None or weight is None or bias is False:
        return None
    return _WeightedOperands(family, *activation, *weight, bias)


def _packed_conv(gm: fx.GraphModule, node: fx.Node, ops: _WeightedOperands) -> tuple[object, ...]:
    """The leading arguments every oneDNN int8 conv call takes (input, packed weight, scales, bias, geometry).

    The weight is packed for the input's static shape: packed without it, oneDNN reorders some
    weights again on every call (20x slower convolutions for 1x1 convolutions of ResNet-50).
    """
    stride, padding, dilation, groups = _conv_defaults(node)
    packed = torch.ops.onednn.qconv_prepack(ops.q_weight, ops.w_scales, ops.x_scale, ops.x_zero_point, stride,
                                            padding, dilation, groups, _input_shape(ops.source))
    scales, zero_points, bias = _weight_nodes(gm, node, ops)
    packed_node = _store(gm, f"{node.name}_packed", packed, node)
    return ops.source, ops.x_scale, ops.x_zero_point, packed_node, scales, zero_points, bias, stride, padding, \
        dilation, groups


def _weight_nodes(gm: fx.GraphModule, node: fx.Node, ops: _WeightedOperands) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """Attributes holding the per-channel weight scales, their (zero) zero points and the float bias."""
    zero_points = torch.zeros(ops.w_scales.shape, dtype=torch.int64)
    return (_store(gm, f"{node.name}_w_scales", ops.w_scales, node),
            _store(gm, f"{node.name}_w_zps", zero_points, node),
            _store(gm, f"{node.name}constant_bias", ops.bias, node) if ops.bias is not None else None)


@dataclass(frozen=True)
class OnednnInt8Kernels(KernelSubstitution):
    """Static conv / linear / addmm with uint8 input and int8 weights → oneDNN int8 kernels."""

    name = "onednn-int8-kernels"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite every static int8 conv / linear in place."""
        counts = {"qconv": 0, "qlinear": 0}
        graph = gm.graph
        for node in list(graph.nodes):
            ops = _weighted_operands(gm, node)
            if ops is None:
                continue
            fused = _fused_output(node, gelu=ops.family == "qlinear")
            end, post_op, post_args, quantize = fused.end, fused.post_op, list(fused.post_args), fused.quantize
            out_scale, out_zp, out_dtype = 1.0, 0, torch.float32
            float_readers: list[fx.Node] = []
            if quantize is not None and not _read_as_int8(quantize):
                # only float ops read the result: the kernel writes float directly (no requantize + dequantize)
                float_readers, quantize = list(quantize.users), None
            elif quantize is not None:
                out_scale, out_zp, out_dtype = float(quantize.args[1]), int(quantize.args[2]), torch.uint8
            if ops.family == "qlinear":
                scales, zero_points, bias = _weight_nodes(gm, node, ops)
                packed_node = _store(gm, f"{node.name}_packed", _packed_linear(ops.q_weight, ops.source), node)
                args = (ops.source, ops.x_scale, ops.x_zero_point, packed_node, scales, zero_points, bias, out_scale,
                        out_zp, out_dtype, post_op, post_args, fused.algorithm)
                target = torch.ops.onednn.qlinear_pointwise.default
            else:
                args = (*_packed_conv(gm, node, ops), out_scale, out_zp, out_dtype, post_op, post_args, "")
                target = torch.ops.onednn.qconv_pointwise.default
            with graph.inserting_before(end if quantize is None else quantize):
                new = graph.call_function(target, args)
            _replace_output(gm, node, end, quantize, new)
            for reader in float_readers:
                reader.replace_all_uses_with(new)
            counts[ops.family] += 1
        return PassResult(any(counts.values()), counts)


def _residual_conv(add: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(conv, other input)`` of ``add(DQ(Q(conv2d(...))), DQ(other))`` where the conv's codes feed only the add."""
    if add.target != aten.add.Tensor or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2 \
            or add.args[0] is add.args[1]:
        return None
    for mine, other in (add.args, tuple(reversed(add.args))):
        if static_activation(mine) is None or static_activation(other) is None:
            continue
        quantize = mine.args[0]
        conv = quantize.args[0] if isinstance(quantize, fx.Node) else None
        if (quantize.target == qd.quantize_per_tensor.default and len(quantize.users) == 1 and len(mine.users) == 1
                and isinstance(conv, fx.Node) and conv.target == aten.conv2d.default and len(conv.users) == 1):
            return conv, other
    return None


_FRESH_CODES = frozenset({
    qd.quantize_per_tensor.default, aten.int_repr.default, aten.clamp_min.default, aten.clamp.default,
    torch.ops.onednn.qconv2d_pointwise.binary,  # its accumulator, whose readers were all checked to run before
})
"""uint8 producers whose output is no view of a tensor read elsewhere (an accumulator may overwrite it)."""


def _accumulator(graph: fx.Graph, codes: fx.Node, add: fx.Node, at: fx.Node) -> fx.Node:
    """A channels-last uint8 tensor the fused kernel may overwrite, holding ``codes``.

    The kernel accumulates into it in place: ``codes`` itself when it is a fresh tensor whose
    other readers all run before ``at``, a copy otherwise.
    """
    order = {node: index for index, node in enumerate(graph.nodes)}
    fresh = codes.target in _FRESH_CODES
    readers = [reader for user in codes.users
               for reader in (list(user.users) if is_dequantize(user) else [user]) if reader is not add]
    in_place = fresh and all(order[reader] < order[at] for reader in readers) and all(
        reader.target not in PASS_THROUGH for reader in readers)
    op = aten.contiguous.default if in_place else aten.clone.default
    with graph.inserting_before(at):
        return graph.call_function(op, (codes,), {"memory_format": torch.channels_last})


@dataclass(frozen=True)
class OnednnConvAdd(NodeRewrite, KernelSubstitution):
    """``Q(relu?(DQ(Q(conv2d(x))) + DQ(r)))`` → one oneDNN int8 conv that adds ``r`` and requantizes (ResNet blocks).

    The sum is the convolution's post-op: the conv's own requantization and the float add between
    them go away (the conv result is added before rounding, which is closer to float than the QDQ
    reference).
    """

    name = "onednn-int8-conv-add"
    stat = "qconv_add"
    dead_code_after = True  # the float conv and add it replaced: no later rewrite should lower them
    in_place_kernels = frozenset({torch.ops.onednn.qconv2d_pointwise.binary})  # it accumulates into its residual

    def rewrite(self, gm: fx.GraphModule, add: fx.Node) -> bool:
        """Rewrite an int8 conv + residual add in place."""
        match = _residual_conv(add)
        if match is None:
            return False
        conv, other = match
        ops = _weighted_operands(gm, conv)
        fused = _fused_output(add)
        end, post_op, quantize = fused.end, fused.post_op, fused.quantize
        batched = isinstance(conv.meta.get("val"), torch.Tensor) and conv.meta["val"].dim() == 4
        if ops is None or quantize is None or post_op not in ("none", "relu") or not batched:
            return False
        graph = gm.graph
        codes, accum_scale, accum_zp = static_activation(other)
        accum = _accumulator(graph, codes, add, quantize)
        conv_args = _packed_conv(gm, conv, ops)  # the accumulator goes between the weight and the bias
        output = (float(quantize.args[1]), int(quantize.args[2]), torch.uint8)
        with graph.inserting_before(quantize):
            new = graph.call_function(torch.ops.onednn.qconv2d_pointwise.binary, (
                *conv_args[:6], accum, *conv_args[6:], *output, accum_scale, accum_zp, "sum", 1.0, post_op, [], ""))
        _replace_output(gm, add, end, quantize, new)
        return True


def _input_shape(value: fx.Node) -> list[int] | None:
    """The static shape of ``value`` (oneDNN picks the weight layout for it when packing), or None."""
    val = value.meta.get("val")
    if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
        return None
    return list(val.shape)


def _packed_linear(q_weight: torch.Tensor, source: fx.Node) -> torch.Tensor:
    """The int8 weight packed by oneDNN for the GEMM's static ``[rows, in]`` input when known (as for convs)."""
    shape = _input_shape(source)
    return torch.ops.onednn.qlinear_prepack(q_weight, [math.prod(shape[:-1]), shape[-1]] if shape else None)


def _conv_defaults(node: fx.Node) -> tuple[list[int], list[int], list[int], int]:
    """stride, padding, dilation, groups of an ``aten.conv2d`` call with trailing defaults omitted."""
    dims = 2 if node.target == aten.conv2d.default else 1
    defaults: list[object] = [[1] * dims, [0] * dims, [1] * dims, 1]
    given = list(node.args[3:7])
    values = given + defaults[len(given):]
    stride, padding, dilation, groups = values
    expand = lambda v: list(v) if isinstance(v, (list, tuple)) else [int(v)] * dims  # noqa: E731
    return expand(stride), expand(padding), expand(dilation), int(groups)


@dataclass(frozen=True)
class Uint8PassThrough(NodeRewrite, KernelSubstitution):
    """``Q(P(DQ(a)))`` with equal parameters → ``P(a)`` on the uint8 tensor (reshapes, max pooling, ReLU)."""

    name = "uint8-pass-through"
    stat = "int8_pass_through"

    def rewrite(self, gm: fx.GraphModule, quantize: fx.Node) -> bool:
        """Rewrite a pass-through op between int8 ops in place."""
        if quantize.target != qd.quantize_per_tensor.default:
            return False
        middle = quantize.args[0]
        if not (isinstance(middle, fx.Node) and middle.op == "call_function" and middle.target in PASS_THROUGH):
            return False
        activation = static_activation(middle.args[0])
        if activation is None:
            return False
        source, scale, zero_point = activation
        if (float(quantize.args[1]), int(quantize.args[2]), quantize.args[5]) != (scale, zero_point, torch.uint8):
            return False
        graph = gm.graph
        with graph.inserting_before(quantize):
            if middle.target == aten.max_pool2d.default:
                # ATen's uint8 max pooling rejects channels-last input and is 20x slower on NCHW; the
                # quantized kernel runs on the codes in place of either (the scale does not matter to a max)
                codes = graph.call_function(aten._make_per_tensor_quantized_tensor.default,
                                            (source, scale, zero_point))
                pooled = graph.call_function(torch.ops.quantized.max_pool2d.default,
                                             (codes, *_max_pool_args(middle)))
                new = graph.call_function(aten.int_repr.default, (pooled,))
            elif middle.target in _SHAPE_OPS:
                new = graph.call_function(middle.target, (source, *middle.args[1:]), dict(middle.kwargs))
            elif middle.target == aten.relu.default:
                new = graph.call_function(aten.clamp_min.default, (source, zero_point))
            else:  # hardtanh(low, high) on the codes
                low = middle.args[1] if len(middle.args) > 1 else -1.0
                high = middle.args[2] if len(middle.args) > 2 else 1.0
                codes = [min(max(round(v / scale) + zero_point, ACTIVATION_QMIN), ACTIVATION_QMAX)
                         for v in (low, high)]
                new = graph.call_function(aten.clamp.default, (source, *codes))
        new.meta["val"] = quantize.meta.get("val")
        quantize.replace_all_uses_with(new)
        return True


def _max_pool_args(node: fx.Node) -> tuple[list[int], list[int], list[int], list[int], bool]:
    """kernel_size, stride, padding, dilation, ceil_mode of an ``aten.max_pool2d`` call, defaults filled in."""
    pair = lambda v: [int(v)] * 2 if isinstance(v, int) else [int(i) for i in v]  # noqa: E731
    kernel = pair(node.args[1])
    given = list(node.args[2:6])
    stride, padding, dilation, ceil_mode = given + [kernel, [0, 0], [1, 1], False][len(given):]
    stride = pair(stride) or kernel  # an empty stride means the kernel size
    return kernel, stride, pair(padding), pair(dilation), bool(ceil_mode)


def dynamic_int8_linear(x: torch.Tensor, packed: torch.Tensor, w_scales: torch.Tensor, w_zero_points: torch.Tensor,
                        bias: torch.Tensor | None, post_op: str, algorithm: str,
                        residual: torch.Tensor | None = None) -> torch.Tensor:
    """``post_op(x @ Wᵀ + b)`` (or ``x @ Wᵀ + b + residual``) with ``x`` quantized to uint8 per tensor at run time.

    One kernel picks the activation's scale and quantizes it (``quantize_per_tensor_dynamic``; its
    codes are read in place, not copied by ``int_repr``), then oneDNN multiplies in int8 and applies
    the bias and the activation (GELU, ReLU) or the residual add in its epilogue, writing float.
    """
    flat = x.reshape(-1, x.shape[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quint8 tensors are deprecated; this one lives for one call
        codes = torch.quantize_per_tensor_dynamic(flat, torch.quint8, False)
    if residual is None:
        out = torch.ops.onednn.qlinear_pointwise.default(
            codes.view(torch.uint8), codes.q_scale(), codes.q_zero_point(), packed, w_scales, w_zero_points, bias,
            1.0, 0, torch.float32, post_op, [], algorithm)
    else:  # "add" writes a new tensor ("sum" would accumulate into the residual, which others may read)
        out = torch.ops.onednn.qlinear_pointwise.binary(
            codes.view(torch.uint8), codes.q_scale(), codes.q_zero_point(), packed, w_scales, w_zero_points,
            residual.reshape(flat.shape[0], -1), bias, 1.0, 0, torch.float32, 1.0, 0, "add", 1.0, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


_EPILOGUES = {aten.relu.default: ("relu", ""), aten.gelu.default: ("gelu", "none")}


def _dynamic_epilogue(node: fx.Node) -> tuple[fx.Node, str, str]:
    """The node ending the GEMM (itself or its only reader when that is ReLU / GELU), the post-op and its algorithm."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in _EPILOGUES and \
            users[0].args[0] is node:
        post_op, algorithm = _EPILOGUES[users[0].target]
        if users[0].target == aten.gelu.default:
            algorithm = str(argument(users[0], "approximate", "none"))
        return users[0], post_op, algorithm
    return node, "none", ""


def _residual_add(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(add, residual)`` when the GEMM's only reader adds a float32 tensor of its own shape to it, else None."""
    users = list(node.users)
    if len(users) != 1:
        return None
    residual = residual_operand(users[0], node)
    if not isinstance(residual, fx.Node) or residual.meta["val"].dtype != torch.float32:
        return None
    return users[0], residual


@dataclass(frozen=True)
class OnednnDynamicLinear(NodeRewrite, KernelSubstitution):
    """Dynamic linear / addmm / matmul-by-weight → oneDNN int8 GEMM with the activation quantized at run time.

    A ReLU or GELU that is the GEMM's only reader runs in the kernel's epilogue, and so does a
    residual add of a float32 tensor of the GEMM's shape (oneDNN's binary ``add``: a transformer's
    attention output and FFN down projections; 0.17 ms of 4.0 on MiniLM's FFN at batch 8). oneDNN's VNNI
    GEMM with a fused GELU measured 1.19 ms against 1.40 ms for FBGEMM's ``linear_dynamic`` alone
    (plus 0.57 ms for the GELU after it) on MiniLM's FFN at batch 8 (1024 x 384 x 1536).
    """

    name = "onednn-dynamic-int8-linear"
    stat = "dynamic_linear"
    dead_code_after = True

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """Rewrite a dynamic int8 GEMM in place."""
        match = dynamic_int8_gemm(gm, node)
        if match is None:
            return False
        source, q_weight, scales, bias_arg = match
        bias = constant_bias(gm, bias_arg)
        if bias is False:
            return False
        packed = _packed_linear(q_weight, source)
        end, post_op, algorithm = _dynamic_epilogue(node)
        residual = None
        if end is node and (fused_add := _residual_add(node)) is not None:
            end, residual = fused_add
        stored = [_store(gm, f"{node.name}_{stem}", value, node) for stem, value in (
            ("packed", packed), ("w_scales", scales), ("w_zps", torch.zeros(scales.shape, dtype=torch.int64)))]
        bias_node = _store(gm, f"{node.name}_bias", bias, node) if bias is not None else None
        with gm.graph.inserting_before(end):
            new = gm.graph.call_function(dynamic_int8_linear, (source, *stored, bias_node, post_op, algorithm,
                                                               residual))
        copy_meta(new, end)
        end.replace_all_uses_with(new)
        return True


@dataclass(frozen=True)
class OnednnLinearResidual(NodeRewrite, KernelSubstitution):
    """A static int8 linear writing float whose only reader adds a float residual → oneDNN's ``add`` epilogue.

    A transformer block's residual add (BERT's ``LayerNorm(x + dense(h))``) runs inside the GEMM:
    the same float32 operations, bitwise equal, one pass over the output fewer (840 → 744 µs on
    MiniLM's output projection at batch 8 x 128). ``add`` writes a new tensor (``sum`` would
    accumulate into the residual, which the next block reads).
    """

    name = "onednn-linear-residual"
    stat = "int8_linear_residual"
    dead_code_after = True

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """Fold the residual add after a float-output static int8 linear into it, in place."""
        if node.target != torch.ops.onednn.qlinear_pointwise.default:
            return False
        x, x_scale, x_zp, packed, scales, zero_points, bias, _, _, out_dtype, post_op = node.args[:11]
        fused = _residual_add(node) if out_dtype == torch.float32 and post_op == "none" else None
        if fused is None:
            return False
        add, residual = fused
        with gm.graph.inserting_before(add):
            new = gm.graph.call_function(torch.ops.onednn.qlinear_pointwise.binary, (
                x, x_scale, x_zp, packed, scales, zero_points, residual, bias, 1.0, 0, torch.float32, 1.0, 0, "add",
                1.0, "none", [], ""))
        copy_meta(new, add)
        add.replace_all_uses_with(new)
        return True


_LIBRARY = torch.library.Library("graphopt_cpu", "FRAGMENT")  # beside graphopt_cpu::attention
_LIBRARY.define("quantize_uint8(Tensor x, float scale, int zero_point) -> Tensor")


def _quantize_uint8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``x`` as uint8 codes per tensor: torch's quantize kernel, its codes read in place.

    ``int_repr`` would copy them, single-threaded (about 4x the quantization itself on a
    transformer's activations); the uint8 tensor shares the quantized tensor's storage.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quint8 tensors are deprecated; this one lives for one call
        codes = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    return torch.empty(0, dtype=torch.uint8).set_(codes.untyped_storage(), codes.storage_offset(), codes.shape,
                                                  codes.stride())


def _quantize_uint8_fake(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.uint8, memory_format=torch.contiguous_format)


_LIBRARY.impl("quantize_uint8", _quantize_uint8, "CompositeExplicitAutograd")
torch.library.register_fake("graphopt_cpu::quantize_uint8")(_quantize_uint8_fake)
QUANTIZE_UINT8 = torch.ops.graphopt_cpu.quantize_uint8.default


@dataclass(frozen=True)
class QdqKernels(NodeRewrite, KernelSubstitution):
    """The static quantize / dequantize nodes left → one fused kernel each (the decomposed forms take 4-5).

    Quantize: ``graphopt_cpu::quantize_uint8`` (codes read in place); dequantize: ATen's ``dequantize``.
    """

    name = "int8-qdq-kernels"
    stat = "int8_qdq_kernels"

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """Rewrite a static quantize / dequantize in place."""
        if node.target not in (qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default):
            return False
        if node.args[3:6] != (ACTIVATION_QMIN, ACTIVATION_QMAX, torch.uint8) or node.kwargs:
            return False
        value, scale, zero_point = node.args[:3]
        graph = gm.graph
        with graph.inserting_before(node):
            if node.target == qd.quantize_per_tensor.default:
                new = graph.call_function(QUANTIZE_UINT8, (value, float(scale), int(zero_point)))
            else:
                quantized = graph.call_function(aten._make_per_tensor_quantized_tensor.default,
                                                (value, float(scale), int(zero_point)))
                new = graph.call_function(aten.dequantize.self, (quantized,))
        copy_meta(new, node)
        node.replace_all_uses_with(new)
        return True


WEIGHT_ONLY_LOWERING: tuple[Pass, ...] = (
    GatherQuantizedEmbeddings(), GatherCodebookEmbeddings(), CpuWeightOnlyKernels(), ExpandCompressedWeights(),
)
"""The rewrites of compressed weights (weight-only int8/int4 kernels, K-means), in order."""

INT8_LOWERING: tuple[Pass, ...] = (
    Uint8PassThrough(), OnednnConvAdd(), OnednnInt8Kernels(), OnednnLinearResidual(), OnednnDynamicLinear(),
    QdqKernels(),
    *WEIGHT_ONLY_LOWERING, DeadCodeElimination(),
)
"""The rewrites ``CpuTarget`` runs on a quantized graph, in order (then the float lowering, when only ATen is left)."""
