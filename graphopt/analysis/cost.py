"""A cost model on the IR: FLOPs, MACs, weight and activation bytes per node, and measured time.

Costs come from the shapes recorded on each node (``tensor_meta``, concrete, from the last run;
export's ``val`` otherwise, with dynamic dims taken at the example's size hint). Matrix products
and convolutions are counted exactly (one MAC = one multiply and one add = 2 FLOPs); element-wise
ops, reductions, normalizations and softmax are approximations (a few FLOPs per element); views
and other shape-only ops cost nothing.

    costs = node_costs(gm)                       # {node name: NodeCost}
    seconds = profile_nodes(gm, flat_inputs)     # {node name: median seconds}
"""

from __future__ import annotations

import math
import operator
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

from graphopt.ir.graph import op_name, preserved_state
from graphopt.ir.op_args import conv_arguments

__all__ = [
    "NodeCost",
    "count_parameters",
    "graph_weights",
    "node_costs",
    "node_weight_names",
    "profile_nodes",
    "shared_weights",
    "total_flops",
    "total_macs",
    "value_bytes",
]

aten = torch.ops.aten


@dataclass
class NodeCost:
    """What one node of the graph costs.

    ``flops`` counts floating point operations (a multiply-add is 2), ``macs`` the multiply-adds
    of matrix products and convolutions, ``param_bytes`` the bytes of the weights this node is
    the first in graph order to read (so summing over nodes counts each weight once; a weight
    shared by several nodes is charged to the first), ``activation_bytes`` the bytes of the
    node's output(s). ``seconds`` is the measured time (median over repeats), when profiled.
    """

    name: str
    op: str
    flops: int = 0
    macs: int = 0
    param_bytes: int = 0
    activation_bytes: int = 0
    seconds: float | None = None
    module: str = ""  # the innermost nn.Module the node came from ("" when unknown)
    module_type: str = ""


# ------------------------------------------------------------------------------------ shapes


def _size(value: Any) -> int:
    """A dim as an int: dynamic dims (SymInt) at their example size hint."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        if hint is not None:
            return int(hint)
        try:
            return int(value.node.shape_env.size_hint(value.node.expr))
        except Exception:  # an unbacked dim: count it as 1
            return 1
    return int(value)


def _tensor_infos(node: Any) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each tensor a node produces (tuples of tensors flattened)."""
    if not isinstance(node, fx.Node):
        return []
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return [(tuple(int(d) for d in meta.shape), meta.dtype)]
    val = node.meta.get("val")
    values = val if isinstance(val, (list, tuple)) else [val]
    return [(tuple(_size(d) for d in v.shape), v.dtype) for v in values if isinstance(v, torch.Tensor)]


def _shape(node: Any) -> tuple[int, ...] | None:
    infos = _tensor_infos(node)
    return infos[0][0] if infos else None


def _numel(shape: Iterable[int] | None) -> int:
    return math.prod(shape) if shape is not None else 0


def value_bytes(node: fx.Node) -> int:
    """Bytes of the tensor(s) ``node`` produces (0 for non-tensor values)."""
    return sum(_numel(shape) * _element_size(dtype) for shape, dtype in _tensor_infos(node))


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() if dtype != torch.bool else 1


# ------------------------------------------------------------------------------------- FLOPs

_ZERO_COST_OPS = {
    "view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze",
    "slice", "select", "alias", "detach", "split", "split_with_sizes", "chunk", "unbind", "as_strided",
    "flatten", "unflatten", "sym_size", "sym_numel", "sym_stride", "lift_fresh_copy", "clone", "contiguous",
    "_to_copy", "to", "copy", "cat", "stack", "embedding", "index", "index_select", "gather", "arange",
    "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "empty", "scalar_tensor", "new_zeros",
    "new_ones", "new_full", "new_empty", "constant_pad_nd", "pad", "dropout", "_assert_tensor_metadata",
}
_NORM_OPS = {"layer_norm", "native_layer_norm", "batch_norm", "_native_batch_norm_legit_no_training",
             "native_batch_norm", "group_norm", "native_group_norm", "instance_norm", "rms_norm",
             "_fused_rms_norm", "cudnn_batch_norm"}
_SOFTMAX_OPS = {"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"}
_TRANSCENDENTAL_OPS = {"gelu", "tanh", "sigmoid", "exp", "log", "erf", "silu", "mish", "softplus", "hardswish",
                       "hardsigmoid", "rsqrt", "sqrt", "pow", "elu", "selu", "cos", "sin", "reciprocal"}
_REDUCTION_OPS = {"sum", "mean", "amax", "amin", "max", "min", "prod", "var", "std", "var_mean", "norm",
                  "linalg_vector_norm", "logsumexp", "argmax", "argmin", "avg_pool2d", "max_pool2d",
                  "max_pool2d_with_indices", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "avg_pool1d",
                  "max_pool1d", "adaptive_avg_pool1d", "avg_pool3d", "max_pool3d"}
_CONV_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
             "conv_transpose3d", "mkldnn_convolution", "cudnn_convolution"}


def _packet(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    return getattr(target, "__name__", str(target))


def _conv_macs(node: fx.Node) -> int:
    conv = conv_arguments(node)
    if conv is None:
        return 0
    weight, out, inp = _shape(conv.weight), _shape(node), _shape(conv.input)
    if weight is None or out is None or inp is None:
        return 0
    kernel = math.prod(weight[2:])
    if conv.transposed:  # weight (C_in, C_out / groups, *k): every input element feeds C_out/groups * k outputs
        return _numel(inp) * weight[1] * kernel
    return _numel(out) * weight[1] * kernel  # weight (C_out, C_in / groups, *k)


def _matmul_macs(node: fx.Node) -> int:
    """MACs of a matrix product: output elements times the reduced dim (addbmm also sums over batches)."""
    packet = _packet(node)
    out = _shape(node)
    if out is None:
        return 0
    if packet == "linear":
        weight = _shape(node.args[1])
        return _numel(out) * (weight[-1] if weight else 0)
    if packet == "addbmm":
        batch1, batch2 = _shape(node.args[1]), _shape(node.args[2])
        return _numel(batch1) * batch2[-1] if batch1 and batch2 else 0
    left = _shape(node.args[1] if packet in ("addmm", "baddbmm") else node.args[0])
    return max(_numel(out), 1) * left[-1] if left else 0


def _attention_macs(node: fx.Node) -> tuple[int, int]:
    """MACs of q·kᵀ and attn·v, and the element count of the attention matrix."""
    query, key, value = (_shape(a) for a in node.args[:3])
    if query is None or key is None or value is None:
        return 0, 0
    batch = _numel(query[:-2])
    length, embed, source, value_embed = query[-2], query[-1], key[-2], value[-1]
    scores = batch * length * source
    return scores * embed + scores * value_embed, scores


def _fused_macs(node: fx.Node, packet: str) -> int:
    """MACs of a non-aten convolution or matrix-product kernel (oneDNN, quantized, graphopt's own), from its name.

    Convolutions: output elements times the kernel volume per output (the first 3-5-d weight
    argument); linear/matmul kernels: output elements times the input's last dim.
    """
    out = _shape(node)
    if out is None:
        return 0
    name = packet.lower()
    if "conv" in name:
        for argument in node.args[1:]:
            weight = _shape(argument)
            if weight is not None and 3 <= len(weight) <= 5:
                return _numel(out) * math.prod(weight[1:])
        return 0
    if any(key in name for key in ("linear", "matmul", "mm", "gemm")):
        source = _shape(node.args[0]) if node.args else None
        return _numel(out) * source[-1] if source else 0
    return 0


def _estimate(node: fx.Node) -> tuple[int, int]:
    """(flops, macs) of one call node."""
    packet = _packet(node)
    out_elements = sum(_numel(s) for s, _ in _tensor_infos(node))
    if packet in _CONV_OPS:
        macs = _conv_macs(node)
        has_bias = len(node.args) > 2 and isinstance(node.args[2], fx.Node)
        return 2 * macs + (out_elements if has_bias else 0), macs
    if packet in ("linear", "addmm", "baddbmm", "addbmm", "mm", "bmm", "matmul", "dot", "mv", "_int_mm",
                  "_weight_int8pack_mm"):
        macs = _matmul_macs(node)
        extra = out_elements if packet in ("addmm", "baddbmm", "addbmm") or (
            packet == "linear" and len(node.args) > 2 and node.args[2] is not None) else 0
        return 2 * macs + extra, macs
    if "scaled_dot_product" in packet or packet.startswith("_scaled_dot_product"):
        macs, scores = _attention_macs(node)
        return 2 * macs + 5 * scores, macs
    if packet in _ZERO_COST_OPS or node.target in (operator.getitem,):
        return 0, 0
    input_elements = sum(_numel(_shape(a)) for a in node.all_input_nodes)
    if packet in _NORM_OPS:
        return 5 * _numel(_shape(node.args[0])), 0
    if packet in _SOFTMAX_OPS:
        return 5 * out_elements, 0
    if packet in _REDUCTION_OPS:
        return max(input_elements, out_elements), 0
    if packet in _TRANSCENDENTAL_OPS:
        return 4 * out_elements, 0
    if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace != "aten":
        macs = _fused_macs(node, packet)  # fused / quantized kernels of other libraries, by their name
        if macs:
            return 2 * macs + out_elements, macs
    if isinstance(node.target, torch._ops.OpOverload):
        return out_elements, 0  # element-wise arithmetic, comparisons, where...: one op per output element
    return 0, 0  # Python arithmetic on sizes and other non-tensor work


# -------------------------------------------------------------------------------- weights


def graph_weights(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The tensors behind the graph's ``get_attr`` nodes, by node name."""
    weights = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value: Any = gm
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
            if isinstance(value, torch.Tensor):
                weights[node.name] = value
    return weights


def _storage_key(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)


def node_weight_names(gm: fx.GraphModule) -> dict[str, list[str]]:
    """For each node, the ``get_attr`` nodes it reads directly or through views of weights."""
    reads: dict[str, list[str]] = {}
    weight_of: dict[fx.Node, set[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            weight_of[node] = {node.name}
            continue
        if node.op != "call_function":
            continue
        sources = set().union(*(weight_of.get(a, set()) for a in node.all_input_nodes)) if node.all_input_nodes \
            else set()
        if sources and _packet(node) in _ZERO_COST_OPS and all(a in weight_of for a in node.all_input_nodes):
            weight_of[node] = sources  # a view/cast of a weight: charge the weight to the real consumer
            continue
        if sources:
            reads[node.name] = sorted(sources)
    return reads


def shared_weights(gm: fx.GraphModule) -> list[tuple[list[str], int]]:
    """Every weight storage read by more than one node: the reading nodes' names (graph order) and its bytes.

    (A language model's tied input embedding and LM head is one such weight: a split that puts
    them in different stages holds it twice.)
    """
    weights = graph_weights(gm)
    readers: dict[tuple[int, int, tuple[int, ...]], tuple[list[str], int]] = {}
    for node_name, names in node_weight_names(gm).items():
        for key, tensor in {_storage_key(weights[n]): weights[n] for n in names if n in weights}.items():
            entry = readers.setdefault(key, ([], tensor.numel() * tensor.element_size()))
            entry[0].append(node_name)
    return [entry for entry in readers.values() if len(entry[0]) > 1]


def count_parameters(gm: fx.GraphModule) -> int:
    """Elements of the parameters and buffers the graph reads (storage shared by several names counted once)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = 0
    for tensor in graph_weights(gm).values():
        key = _storage_key(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel()
    return total


# ----------------------------------------------------------------------------------- public


def _module_of(node: fx.Node) -> tuple[str, str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    type_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return str(path), type_name.rsplit(".", 1)[-1]


def node_costs(gm: fx.GraphModule, seconds: Mapping[str, float] | None = None) -> dict[str, NodeCost]:
    """The cost of every node of ``gm`` (placeholders, weights and output included, at zero FLOPs), by node name.

    ``seconds`` (from ``profile_nodes``) fills ``NodeCost.seconds``. Weight bytes are charged to
    the first node (in graph order) that computes with the weight, each storage once.
    """
    weights = graph_weights(gm)
    reads = node_weight_names(gm)
    charged: set[tuple[int, int, tuple[int, ...]]] = set()
    costs: dict[str, NodeCost] = {}
    for node in gm.graph.nodes:
        cost = NodeCost(node.name, op_name(node.target) if node.op == "call_function" else node.op)
        cost.module, cost.module_type = _module_of(node)
        if node.op == "call_function":
            cost.flops, cost.macs = _estimate(node)
            cost.activation_bytes = value_bytes(node)
            for weight_name in reads.get(node.name, []):
                tensor = weights.get(weight_name)
                if tensor is None:
                    continue
                key = _storage_key(tensor)
                if key not in charged:
                    charged.add(key)
                    cost.param_bytes += tensor.numel() * tensor.element_size()
        elif node.op == "placeholder":
            cost.activation_bytes = value_bytes(node)
        if seconds is not None:
            cost.seconds = seconds.get(node.name, 0.0 if node.op != "call_function" else None)
        costs[node.name] = cost
    return costs


def total_macs(gm: fx.GraphModule) -> int:
    """Multiply-accumulates of one run of ``gm`` (matrix products, convolutions, attention)."""
    return sum(c.macs for c in node_costs(gm).values())


def total_flops(gm: fx.GraphModule) -> int:
    """Floating point operations of one run of ``gm`` (exact for products, approximate for the rest)."""
    return sum(c.flops for c in node_costs(gm).values())


class _TimingInterpreter(fx.Interpreter):
    """Runs the graph and times every ``call_function`` node."""

    def __init__(self, gm: fx.GraphModule, sync: Any) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.times: dict[str, float] = {}
        self._sync = sync

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function":
            return super().run_node(n)
        self._sync()
        started = time.perf_counter()
        result = super().run_node(n)
        self._sync()
        self.times[n.name] = time.perf_counter() - started
        return result


def profile_nodes(
    gm: fx.GraphModule, flat_inputs: tuple[Any, ...] | list[Any], repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Measured seconds of every ``call_function`` node of ``gm`` on ``flat_inputs``: median over ``repeats`` runs.

    Each run executes the whole graph in an ``fx.Interpreter`` that times each node (CUDA is
    synchronized around each node when the graph runs on a GPU). Medians make the figures
    robust to a machine shared with other work; use more repeats on a noisy machine.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in flat_inputs) or any(
        t.is_cuda for t in [*gm.parameters(), *gm.buffers()]
    )
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    samples: dict[str, list[float]] = {}
    with preserved_state(gm), torch.inference_mode():
        for index in range(warmup + repeats):
            interpreter = _TimingInterpreter(gm, sync)
            interpreter.run(*flat_inputs)
            if index >= warmup:
                for name, seconds in interpreter.times.items():
                    samples.setdefault(name, []).append(seconds)
    return {name: statistics.median(values) for name, values in samples.items()}
