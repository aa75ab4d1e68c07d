"""Where quantize / dequantize (QDQ) nodes go, and how they are inserted.

The quantized graph is an ordinary ATen graph with explicit QDQ nodes, using PyTorch's
standard ``quantized_decomposed`` ops:

- an activation ``v`` quantized with scale ``s`` and zero point ``z`` becomes
  ``dequantize_per_tensor(quantize_per_tensor(v, s, z, 0, 255, uint8), s, z, 0, 255, uint8)``;
- an int8 weight is an ``int8`` buffer read through ``dequantize_per_channel``
  (per-channel scales, zero points 0) or ``dequantize_per_tensor``;
- dynamic quantization reads its scale at run time: ``choose_qparams.tensor`` feeds the
  ``.tensor`` overloads of quantize/dequantize.

Run as it is, the graph computes the fake-quantized reference in float (what the pass manager
checks against its fidelity budget); each target's lowering turns the QDQ patterns into int8
kernels.

Placement rules (static int8):

- *Quantized ops* (``QUANTIZABLE``): conv, linear (``aten.linear``/``aten.addmm`` with a
  constant weight), matmul/bmm of two activations, add of two activations, concat, average
  pooling. Their activation inputs are read through a QDQ pair; their output gets one where an
  int8 op reads it (``static.StaticPlan`` decides: a GEMM read only by float ops writes float).
- A ReLU / ReLU6 that is the only user of a quantized op is fused into it: the output QDQ goes
  after the activation (the kernels apply it before requantizing).
- *Pass-through ops* (``PASS_THROUGH``: max pooling, reshapes, transposes, ReLU...) keep the
  int8 domain: when their input is quantized and their output feeds a quantized op, the output
  is quantized with the *same* scale and zero point (exact; lowering runs them on int8 data).
- Every value is quantized at most once and every reader of a quantized op's output reads the
  same dequantize: no dequantize → quantize pair is left between two int8 ops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed
import torch.fx as fx

from graphopt.ir.graph import attribute_value, node_dtype, register_constant
from graphopt.ir.meta import copy_meta, infer_meta
from graphopt.ir.op_args import argument
from graphopt.ir.ops import BATCHED_MATMUL_OPS, LINEAR_OPS
from graphopt.passes.quantize.observers import ACTIVATION_QMAX, ACTIVATION_QMIN, WEIGHT_QMAX, WEIGHT_QMIN, QParams

__all__ = [
    "DEQUANTIZE_OPS",
    "FUSABLE_ACTIVATIONS",
    "PASS_THROUGH",
    "QUANTIZABLE",
    "QUANTIZE_OPS",
    "QuantSite",
    "activation_inputs",
    "find_sites",
    "insert_activation_qdq",
    "insert_weight_dequantize",
    "is_dequantize",
    "is_quantize",
    "output_point",
    "redundant_pairs",
]

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

QUANTIZE_OPS = frozenset({
    qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor, qd.quantize_per_channel.default,
})
DEQUANTIZE_OPS = frozenset({
    qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor, qd.dequantize_per_channel.default,
})

QUANTIZABLE: dict[str, frozenset] = {
    "conv": frozenset({aten.conv1d.default, aten.conv2d.default}),
    "linear": LINEAR_OPS,
    "matmul": BATCHED_MATMUL_OPS,
    "add": frozenset({aten.add.Tensor}),
    "concat": frozenset({aten.cat.default}),
    "pooling": frozenset({aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default}),
}
"""Op families static int8 can quantize, by the names ``Int8Static(ops=...)`` takes."""

FUSABLE_ACTIVATIONS = frozenset({aten.relu.default, aten.hardtanh.default})
"""Activations fused into the quantized op before them (relu; hardtanh only as ReLU6 / clamp from 0)."""

PASS_THROUGH = frozenset({
    aten.relu.default, aten.hardtanh.default, aten.max_pool2d.default, aten.flatten.using_ints,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.contiguous.default, aten.clone.default, aten.t.default,
})
"""Ops whose int8 output keeps the scale and zero point of their int8 input."""


def is_quantize(node: object) -> bool:
    """True for a ``quantized_decomposed.quantize_*`` call."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in QUANTIZE_OPS


def is_dequantize(node: object) -> bool:
    """True for a ``quantized_decomposed.dequantize_*`` call."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in DEQUANTIZE_OPS


def _is_float_activation(gm: fx.GraphModule, value: object) -> bool:
    return (
        isinstance(value, fx.Node)
        and node_dtype(value) in (torch.float32, torch.float16, torch.bfloat16)
        and attribute_value(gm, value) is None
    )


@dataclass(frozen=True)
class QuantSite:
    """One op static/dynamic quantization may rewrite: its family, weight (if any) and weight axis."""

    node: str
    family: str
    weight_index: int | None  # position of the constant weight in node.args
    weight_axis: int  # the weight's output-channel axis


def _weight_site(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int] | None:
    """(argument index, output-channel axis) of ``node``'s constant float weight, or None."""
    if node.target in (aten.linear.default, aten.conv1d.default, aten.conv2d.default):
        index, axis = 1, 0
    elif node.target == aten.addmm.default:
        index, axis = 2, 1
    elif node.target == aten.matmul.default:
        index, axis = 1, 1
    else:
        return None
    if len(node.args) <= index:
        return None
    weight = attribute_value(gm, node.args[index])
    if weight is None or not weight.is_floating_point():
        return None
    if node.target == aten.matmul.default and weight.dim() != 2:
        return None
    if node.target == aten.addmm.default and (argument(node, "beta") != 1 or argument(node, "alpha") != 1):
        return None
    return index, axis


def find_sites(gm: fx.GraphModule, families: Iterable[str], need_weight: bool = False) -> list[QuantSite]:
    """The ops of ``families`` that can be quantized, in graph order.

    Weighted ops (conv, linear, ``matmul`` by a constant) need a constant float weight; the
    others need every tensor input to be a float activation. ``need_weight`` keeps only ops
    with a constant weight (dynamic quantization).
    """
    targets: dict[object, str] = {}
    for family in families:
        for target in QUANTIZABLE[family]:
            targets[target] = family
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in targets:
            continue
        if not isinstance(node.meta.get("val"), torch.Tensor) or not node.meta["val"].is_floating_point():
            continue
        family = targets[node.target]
        weight = _weight_site(gm, node)
        if weight is not None:
            if not _is_float_activation(gm, node.args[0 if node.target != aten.addmm.default else 1]):
                continue
            sites.append(QuantSite(node.name, "matmul-weight" if family == "matmul" else family, *weight))
        elif family in ("conv", "linear") or need_weight:
            continue  # a conv/linear whose weight is computed at run time stays float
        else:
            inputs = activation_inputs(node, None)
            if node.target == aten.add.Tensor and (len(inputs) != 2 or len(node.args) != 2 or node.kwargs):
                continue
            if not inputs or not all(_is_float_activation(gm, v) for v in inputs):
                continue
            if node.target == aten.cat.default and len(inputs) != len(node.args[0]):
                continue
            sites.append(QuantSite(node.name, family, None, 0))
    return sites


def activation_inputs(node: fx.Node, weight_index: int | None) -> list[fx.Node]:
    """The activation tensors ``node`` reads (its inputs other than the weight and the bias)."""
    if node.target == aten.cat.default:
        return [v for v in node.args[0] if isinstance(v, fx.Node)]
    if node.target == aten.addmm.default:
        return [node.args[1]]
    if weight_index is not None:
        return [node.args[0]]
    if node.target in (aten.add.Tensor, aten.matmul.default, aten.bmm.default):
        return [v for v in node.args[:2] if isinstance(v, fx.Node)]
    return [node.args[0]] if isinstance(node.args[0], fx.Node) else []


def _is_relu_like(node: fx.Node) -> bool:
    if node.target == aten.relu.default:
        return True
    if node.target == aten.hardtanh.default:
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        return low == 0
    return False


def output_point(node: fx.Node) -> fx.Node:
    """The value whose quantization ends ``node``: a ReLU/ReLU6 that is its only user, else ``node``."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and _is_relu_like(users[0]) and users[0].args[0] is node:
        return users[0]
    return node


def _make_qdq(gm: fx.GraphModule, value: fx.Node, params: QParams) -> fx.Node:
    """Insert ``dequantize(quantize(value))`` right after ``value``; returns the dequantize node."""
    graph = gm.graph
    qargs = (params.scale, params.zero_point, ACTIVATION_QMIN, ACTIVATION_QMAX, torch.uint8)
    with graph.inserting_after(value):
        quantize = graph.call_function(qd.quantize_per_tensor.default, (value, *qargs))
    with graph.inserting_after(quantize):
        dequantize = graph.call_function(qd.dequantize_per_tensor.default, (quantize, *qargs))
    infer_meta(quantize)
    infer_meta(dequantize)
    return dequantize


def insert_activation_qdq(
    gm: fx.GraphModule, value: fx.Node, params: QParams, readers: Callable[[fx.Node], bool] | None
) -> fx.Node:
    """Quantize ``value`` once; the users for which ``readers(user)`` holds (all when None) read the dequantize."""
    dequantize = _make_qdq(gm, value, params)
    quantize = dequantize.args[0]
    for user in list(value.users):
        if user is quantize or (readers is not None and not readers(user)):
            continue
        user.replace_input_with(value, dequantize)
    return dequantize


def insert_weight_dequantize(
    gm: fx.GraphModule, node: fx.Node, weight_index: int, q_weight: torch.Tensor, scales: torch.Tensor, axis: int
) -> fx.Node:
    """Make ``node`` read its weight as int8 values + scales through a dequantize node.

    ``scales`` with one entry per channel gives ``dequantize_per_channel`` along ``axis``; a
    single entry gives ``dequantize_per_tensor``.
    """
    graph = gm.graph
    original = node.args[weight_index]
    stem = f"{node.name}_weight_int8"
    q_node = register_constant(gm, stem, q_weight, before=node)
    if scales.numel() > 1:
        scale_node = register_constant(gm, f"{node.name}_weight_scale", scales, before=node)
        zero_node = register_constant(gm, f"{node.name}_weight_zero_point", torch.zeros_like(scales, dtype=torch.int64),
                                      before=node)
        with graph.inserting_before(node):
            dequantize = graph.call_function(
                qd.dequantize_per_channel.default,
                (q_node, scale_node, zero_node, axis, WEIGHT_QMIN, WEIGHT_QMAX, torch.int8),
            )
    else:
        with graph.inserting_before(node):
            dequantize = graph.call_function(
                qd.dequantize_per_tensor.default,
                (q_node, float(scales.item()), 0, WEIGHT_QMIN, WEIGHT_QMAX, torch.int8),
            )
    copy_meta(dequantize, original)  # the weight's values, in float again
    node.replace_input_with(original, dequantize)
    return dequantize


def redundant_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Dequantize nodes feeding a quantize directly, and values quantized more than once.

    A well-placed graph has none: each is a needless int8 → float → int8 round trip.
    """
    found = []
    for node in gm.graph.nodes:
        if is_dequantize(node):
            found += [(node.name, user.name) for user in node.users if is_quantize(user)]
        quantizers = [user for user in node.users if is_quantize(user)]
        if len(quantizers) > 1:
            found.append((node.name, quantizers[1].name))
    return found

