"""Lower compressed weights (``graphopt_weights.dequantize_*`` nodes) to kernels for ``cpu`` and ``onnx``.

cpu (appended to ``lower_cpu.LOWERINGS``, so they run on the target's lowered copy):

- ``gather_quantized_embeddings``: ``embedding(dequantize_int8(q, s), ids)`` gathers the int8 rows
  and their scales and scales only those (``embedding(q, ids) * embedding(s, ids)``): the table
  stays int8 in memory and no call dequantizes it whole.
- ``lower_weight_only_linears``: ``linear(x, dequantize_int8/int4(...), b)`` runs, per layer
  shape, whichever of two forms is faster on this machine, timed once at lowering
  (``CPU_KERNEL_CHOICE`` forces one): PyTorch's weight-only kernels
  ``aten._weight_int8pack_mm`` / ``aten._weight_int4pack_mm_for_cpu`` (int8/int4 weights stay
  compressed in memory; these kernels are fast only for bfloat16 activations on CPU, so the
  activation is rounded to bfloat16 around them), or the weight dequantized once at lowering
  and a float ``linear`` (float weights in memory; the faster one on compute-bound shapes, e.g.
  a batch of 1024 tokens, since weight-only quantization saves memory traffic, not arithmetic).
- ``expand_remaining_weights``: any other dequantize of a constant (int8 conv weights, K-means
  codebooks, which no kernel reads directly) is computed once at lowering.

onnx (``prepare_weight_only_for_onnx``, on a copy before export): linear layers become
onnxruntime's ``com.microsoft.MatMulNBits`` (bits 8 or 4, the compressed weights as its
initializers); embeddings gather int8 rows as above; other int8 weights export as
``DequantizeLinear`` (per axis) and codebooks as an index unpack + ``Gather``, all on the
compressed initializers, so the file carries the compressed weights.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value, prune_unused_attributes, register_constant, snapshot_graph_module
from graphopt.passes.quantize.weight_ops import (
    DEQUANTIZE_CODEBOOK,
    DEQUANTIZE_INT4,
    DEQUANTIZE_INT8,
    DEQUANTIZE_OPS,
    unpack_nibbles,
)
from graphopt.targets.common.lowering_registry import run_lowerings

__all__ = [
    "CPU_KERNEL_CHOICE",
    "WEIGHT_ONLY_LOWERINGS",
    "dequantize_constants",
    "dequantized_weight",
    "expand_remaining_weights",
    "gather_codebook_embeddings",
    "gather_quantized_embeddings",
    "has_weight_only_ops",
    "lower_weight_only_for_cpu",
    "lower_weight_only_linears",
    "onnx_translation_table",
    "prepare_weight_only_for_onnx",
    "weight_only_linears",
]

log = logging.getLogger("graphopt")
aten = torch.ops.aten

CPU_KERNEL_CHOICE = os.environ.get("GRAPHOPT_WEIGHT_ONLY_KERNEL", "auto")
"""``auto`` (time both forms per layer shape at lowering), ``kernel`` (always the int8/int4 weight
kernels) or ``dequantize-once`` (always float weights computed at lowering). Env var
``GRAPHOPT_WEIGHT_ONLY_KERNEL``."""

_CHOICES = ("auto", "kernel", "dequantize-once")


def has_weight_only_ops(gm: fx.GraphModule) -> bool:
    """True when ``gm`` reads any weight through a ``graphopt_weights`` dequantize op."""
    return any(n.op == "call_function" and n.target in DEQUANTIZE_OPS for n in gm.graph.nodes)


def dequantize_constants(gm: fx.GraphModule, node: fx.Node) -> list[Any] | None:
    """The dequantize node's tensor arguments as tensors (None when one is not a constant)."""
    values: list[Any] = []
    for arg in node.args:
        if isinstance(arg, fx.Node):
            value = attribute_value(gm, arg)
            if value is None:
                return None
            values.append(value)
        else:
            values.append(arg)
    return values


def dequantized_weight(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The float weight a constant weight-only dequantize node computes (None when an argument is not constant)."""
    values = dequantize_constants(gm, node)
    return None if values is None else node.target(*values)


def _infer_meta(node: fx.Node) -> None:
    from graphopt.passes.quantize.placement import infer_val

    infer_val(node)


def _copy_meta(new: fx.Node, old: fx.Node) -> None:
    new.meta.update({k: v for k, v in old.meta.items() if k in ("val", "tensor_meta")})


# ---------------------------------------------------------------------------------------------- cpu


def _embedding_lookups(gm: fx.GraphModule, dequantize: Any) -> list[tuple[fx.Node, list[Any]]]:
    """Every ``embedding`` reading its table through a constant ``dequantize`` call, with that call's arguments.

    (``padding_idx``, ``scale_grad_by_freq`` and ``sparse`` only matter for gradients.)
    """
    found = []
    for node in gm.graph.nodes:
        table = node.args[0] if node.target == aten.embedding.default else None
        if isinstance(table, fx.Node) and table.target == dequantize:
            values = dequantize_constants(gm, table)
            if values is not None:
                found.append((node, values))
    return found


def gather_quantized_embeddings(gm: fx.GraphModule) -> dict[str, int]:
    """``embedding(dequantize_int8(q, s), ids)`` -> ``embedding(q, ids).to(float) * embedding(s[:, None], ids)``."""
    count = 0
    graph = gm.graph
    for node, values in _embedding_lookups(gm, DEQUANTIZE_INT8):
        if values[0].dim() != 2:
            continue
        dequant = node.args[0]
        scale = values[1]
        scale_column = register_constant(gm, f"{node.name}_row_scale", scale.reshape(-1, 1), before=node)
        with graph.inserting_before(node):
            rows = graph.call_function(aten.embedding.default, (dequant.args[0], node.args[1]))
            widened = graph.call_function(aten._to_copy.default, (rows,), {"dtype": scale.dtype})
            scales = graph.call_function(aten.embedding.default, (scale_column, node.args[1]))
            new = graph.call_function(aten.mul.Tensor, (widened, scales))
        for created in (rows, widened, scales):
            _infer_meta(created)
        _copy_meta(new, node)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return {"int8_embedding_gathers": count}


def gather_codebook_embeddings(gm: fx.GraphModule) -> dict[str, int]:
    """``embedding(dequantize_codebook(idx, codebook), ids)`` -> gather the rows of indices, then decode only them.

    The table stays as its uint8 (or nibble-packed) indices in memory and in the ONNX file, and
    no call decodes it whole.
    """
    count = 0
    graph = gm.graph
    for node, values in _embedding_lookups(gm, DEQUANTIZE_CODEBOOK):
        indices, codebook, bits, shape = values
        if len(shape) != 2 or (bits == 4 and shape[1] % 2):
            continue
        table = register_constant(gm, f"{node.name}_index_rows", indices[: shape[0] * shape[1] * bits // 8]
                                  .reshape(shape[0], shape[1] * bits // 8), before=node)
        column = register_constant(gm, f"{node.name}_codebook_column", codebook.reshape(-1, 1), before=node)
        with graph.inserting_before(node):
            rows = graph.call_function(aten.embedding.default, (table, node.args[1]))
            created = [rows, graph.call_function(aten._to_copy.default, (rows,), {"dtype": torch.int64})]
            if bits == 4:  # two indices per byte, the even position in the low nibble (integer arithmetic:
                # exported as plain Div/Mul/Sub, which every ONNX runtime has)
                codes = created[-1]
                high = graph.call_function(aten.div.Tensor_mode, (codes, 16), {"rounding_mode": "floor"})
                scaled = graph.call_function(aten.mul.Tensor, (high, 16))
                low = graph.call_function(aten.sub.Tensor, (codes, scaled))
                pairs = graph.call_function(aten.stack.default, ([low, high], -1))
                created += [high, scaled, low, pairs, graph.call_function(aten.flatten.using_ints, (pairs, -2, -1))]
            created.append(graph.call_function(aten.embedding.default, (column, created[-1])))
            new = graph.call_function(aten.squeeze.dim, (created[-1], -1))
        for item in created:
            _infer_meta(item)
        _copy_meta(new, node)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return {"codebook_embedding_gathers": count}


def _rows(node: fx.Node) -> int | None:
    """Rows of the 2-D product ``node`` (a linear) computes, from its last recorded run."""
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    if meta is None:
        return None
    rows = 1
    for size in meta.shape[:-1]:
        rows *= int(size)
    return rows


def _best_times_ms(first: Callable[[], Any], second: Callable[[], Any], rounds: int = 7) -> tuple[float, float]:
    """The fastest of ``rounds`` timed calls of each of two functions.

    The calls alternate, so that other work on the machine disturbs both alike.
    """
    first()
    second()
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for index, fn in enumerate((first, second)):
            start = time.perf_counter()
            fn()
            best[index] = min(best[index], time.perf_counter() - start)
    return best[0] * 1e3, best[1] * 1e3


KERNEL_MARGIN = 0.9
"""The weight-only kernel is chosen only when it takes under this fraction of the float time."""


def int8_weight_linear(x: torch.Tensor, q_weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """``linear`` on an int8 weight with ``aten._weight_int8pack_mm`` (bfloat16 activations)."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    out = torch.ops.aten._weight_int8pack_mm(flat, q_weight, scale).to(x.dtype)
    out = out.reshape(*x.shape[:-1], q_weight.shape[0])
    return out + bias if bias is not None else out


def int4_weight_linear(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zeros: torch.Tensor,
                       out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear`` on a 4-bit weight with ``aten._weight_int4pack_mm_for_cpu`` (bfloat16 activations)."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, group_size, scale_and_zeros).to(x.dtype)
    out = out.reshape(*x.shape[:-1], out_features)
    return out + bias if bias is not None else out


def _kernel_form(gm: fx.GraphModule, node: fx.Node) -> tuple[Callable[..., torch.Tensor], tuple[Any, ...]] | None:
    """The weight-only kernel call for ``linear(x, dequantize(...), b)``: (function, constant args)."""
    dequant = node.args[1]
    values = dequantize_constants(gm, dequant)
    if values is None:
        return None
    if dequant.target == DEQUANTIZE_INT8:
        q_weight, scale = values
        return int8_weight_linear, (q_weight, scale.to(torch.bfloat16))
    packed, scale, zero_point, group = values
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    q = unpack_nibbles(packed).to(torch.int32)
    try:
        kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except RuntimeError as error:  # e.g. "expect N to be dividable by 16"
        log.info("no int4 kernel for %s (%s): weight dequantized once", node.name, error)
        return None
    # w = (q - zp) * s  ==  (q - 8) * s + (8 - zp) * s: the kernel's (scale, zero) per group
    zeros = (8 - zero_point.float()) * scale.float()
    scale_and_zeros = torch.stack([scale.float(), zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    assert scale_and_zeros.shape == (in_features // group, out_features, 2)
    return int4_weight_linear, (kernel_weight, group, scale_and_zeros, out_features)


def _faster_form(node: fx.Node, kernel: tuple[Callable[..., torch.Tensor], tuple[Any, ...]],
                 weight: torch.Tensor, timings: dict[tuple[Any, ...], str]) -> str:
    """``kernel`` or ``dequantize-once``: the faster on this layer's shape (timed once per shape)."""
    rows = _rows(node)
    if CPU_KERNEL_CHOICE != "auto" or rows is None:
        return CPU_KERNEL_CHOICE if CPU_KERNEL_CHOICE != "auto" else "dequantize-once"
    function, args = kernel
    key = (function.__name__, rows, *weight.shape)
    if key not in timings:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
        with torch.inference_mode():
            kernel_ms, float_ms = _best_times_ms(lambda: function(x, *args, None),
                                                 lambda: torch.nn.functional.linear(x, weight))
        timings[key] = "kernel" if kernel_ms < KERNEL_MARGIN * float_ms else "dequantize-once"
        log.info("weight-only %s %s: kernel %.2f ms, dequantize-once %.2f ms", function.__name__,
                 "x".join(map(str, (rows, *weight.shape))), kernel_ms, float_ms)
    return timings[key]


def weight_only_linears(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """Every ``linear`` whose weight is a ``dequantize_int8``/``dequantize_int4`` node, with that node."""
    found = []
    for node in graph.nodes:
        if node.target != aten.linear.default or not isinstance(node.args[1], fx.Node):
            continue
        if node.args[1].target in (DEQUANTIZE_INT8, DEQUANTIZE_INT4):
            found.append((node, node.args[1]))
    return found


def lower_weight_only_linears(gm: fx.GraphModule) -> dict[str, int]:
    """Each ``linear(x, dequantize_int8/int4(...), b)`` -> a weight-only kernel or a dequantized-once weight."""
    counts = {"int8_weight_kernels": 0, "int4_weight_kernels": 0, "weights_dequantized_once": 0}
    timings: dict[tuple[Any, ...], str] = {}
    graph = gm.graph
    for node, dequant in weight_only_linears(graph):
        weight = dequantized_weight(gm, dequant)
        kernel = _kernel_form(gm, node) if weight is not None else None
        if weight is None:
            continue
        bias = node.args[2] if len(node.args) > 2 else None
        if kernel is None or _faster_form(node, kernel, weight, timings) == "dequantize-once":
            weight_node = register_constant(gm, f"{node.name}_weight", weight, before=node)
            node.replace_input_with(dequant, weight_node)
            counts["weights_dequantized_once"] += 1
            continue
        function, constants = kernel
        nodes = [register_constant(gm, f"{node.name}_{i}", c, before=node) if isinstance(c, torch.Tensor) else c
                 for i, c in enumerate(constants)]
        with graph.inserting_before(node):
            new = graph.call_function(function, (node.args[0], *nodes, bias))
        _copy_meta(new, node)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        counts["int8_weight_kernels" if dequant.target == DEQUANTIZE_INT8 else "int4_weight_kernels"] += 1
    return counts


def expand_remaining_weights(gm: fx.GraphModule) -> dict[str, int]:
    """Every other dequantize of constants (int8 conv weights, codebooks) -> its float value, computed once."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.target not in DEQUANTIZE_OPS:
            continue
        if not node.users:  # its layer was lowered to a kernel reading the compressed weight
            gm.graph.erase_node(node)
            continue
        weight = dequantized_weight(gm, node)
        if weight is None:
            continue
        replacement = register_constant(gm, f"{node.name}_float", weight, before=node)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        count += 1
    return {"weights_dequantized_once": count}


WEIGHT_ONLY_LOWERINGS = [gather_quantized_embeddings, gather_codebook_embeddings, lower_weight_only_linears,
                         expand_remaining_weights]
"""The cpu rewrites for compressed weights, in order (appended to ``lower_cpu.LOWERINGS``)."""


def lower_weight_only_for_cpu(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, int]]:
    """A copy of ``gm`` with its compressed weights lowered for the CPU, and counts per kernel kind."""
    lowered = snapshot_graph_module(gm)
    return lowered, run_lowerings(lowered, WEIGHT_ONLY_LOWERINGS)


# --------------------------------------------------------------------------------------------- onnx


@torch.library.custom_op("graphopt_weights::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 in_features: int, out_features: int, bits: int, block_size: int) -> torch.Tensor:
    """Reference of onnxruntime's ``MatMulNBits``: ``x @ dequantize(packed)ᵀ``, blocks of ``block_size`` along K.

    ``packed`` uint8 ``[N, K/block, block*bits/8]`` (4-bit: even k in the low nibble), ``scales``
    ``[N * K/block]``, ``zero_points`` packed like ``packed`` per block (None: ``2**(bits-1)``).
    """
    blocks = packed.shape[1]
    q = (unpack_nibbles(packed) if bits == 4 else packed).reshape(out_features, blocks, block_size).to(scales.dtype)
    if zero_points is None:
        zp = torch.full((out_features, blocks), float(2 ** (bits - 1)), dtype=scales.dtype)
    else:
        zp = (unpack_nibbles(zero_points) if bits == 4 else zero_points).reshape(out_features, -1)[:, :blocks]
    weight = ((q - zp.to(scales.dtype).unsqueeze(-1)) * scales.reshape(out_features, blocks, 1))
    return x @ weight.reshape(out_features, -1)[:, :in_features].t()


@matmul_nbits.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
      in_features: int, out_features: int, bits: int, block_size: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _register_matmul_nbits_schema() -> None:
    """Tell onnx (and so onnxscript) the signature of onnxruntime's contrib op ``com.microsoft.MatMulNBits``."""
    import onnx

    try:
        onnx.defs.get_schema("MatMulNBits", 1, "com.microsoft")
        return
    except onnx.defs.SchemaError:
        pass
    schema = onnx.defs.OpSchema
    optional = schema.FormalParameterOption.Optional
    onnx.defs.register_schema(schema(
        "MatMulNBits", "com.microsoft", 1,
        doc="onnxruntime: A @ dequantize(B)^T with B quantized to `bits` in blocks of `block_size` along K",
        inputs=[schema.FormalParameter("A", "T1"), schema.FormalParameter("B", "T2"),
                schema.FormalParameter("scales", "T1"),
                schema.FormalParameter("zero_points", "T3", param_option=optional),
                schema.FormalParameter("g_idx", "T4", param_option=optional),
                schema.FormalParameter("bias", "T1", param_option=optional)],
        outputs=[schema.FormalParameter("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float)", "tensor(float16)"], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[schema.Attribute("K", schema.AttrType.INT, "", required=True),
                    schema.Attribute("N", schema.AttrType.INT, "", required=True),
                    schema.Attribute("bits", schema.AttrType.INT, "", required=True),
                    schema.Attribute("block_size", schema.AttrType.INT, "", required=True),
                    schema.Attribute("accuracy_level", schema.AttrType.INT, "", required=False)],
    ))


def _matmul_nbits_onnx(x: Any, packed: Any, scales: Any, zero_points: Any = None, in_features: int = 0,
                       out_features: int = 0, bits: int = 4, block_size: int = 128) -> Any:
    from onnxscript.values import Opset

    _register_matmul_nbits_schema()
    microsoft = Opset("com.microsoft", 1)
    inputs = [x, packed, scales] + ([zero_points] if zero_points is not None else [])
    return microsoft.MatMulNBits(*inputs, K=in_features, N=out_features, bits=bits, block_size=block_size)


def _dequantize_int8_onnx(q_weight: Any, scale: Any) -> Any:
    from onnxscript import opset18 as op

    return op.DequantizeLinear(q_weight, scale, axis=0)


def _dequantize_codebook_onnx(indices: Any, codebook: Any, bits: int = 8, shape: Any = ()) -> Any:
    from onnxscript import opset18 as op

    # DequantizeLinear first (scale 1, so exact): the exporter's optimizer never constant-folds it, so
    # the file keeps the uint8 indices instead of the decoded float weights.
    codes = op.DequantizeLinear(op.Reshape(indices, op.Constant(value_ints=[-1, 1])), op.Constant(value_float=1.0))
    if bits == 4:  # two indices per byte, the even position in the low nibble
        sixteen = op.Constant(value_float=16.0)
        high = op.Floor(op.Div(codes, sixteen))
        codes = op.Concat(op.Sub(codes, op.Mul(high, sixteen)), high, axis=1)
    count = 1
    for size in shape:
        count *= int(size)
    index = op.Slice(op.Reshape(codes, op.Constant(value_ints=[-1])), op.Constant(value_ints=[0]),
                     op.Constant(value_ints=[count]))
    values = op.Gather(codebook, op.Cast(index, to=7))  # 7: INT64
    return op.Reshape(values, op.Constant(value_ints=[int(s) for s in shape]))


def onnx_translation_table() -> dict[Any, Callable[..., Any]]:
    """Translations of the ``graphopt_weights`` ops for ``torch.onnx.export(custom_translation_table=...)``."""
    return {
        torch.ops.graphopt_weights.matmul_nbits.default: _matmul_nbits_onnx,
        DEQUANTIZE_INT8: _dequantize_int8_onnx,
        DEQUANTIZE_CODEBOOK: _dequantize_codebook_onnx,
    }


def _nbits_block(in_features: int) -> int:
    """The largest power-of-two block (16..128) dividing ``in_features``, else 16 (the last block padded)."""
    for block in (128, 64, 32, 16):
        if in_features % block == 0:
            return block
    return 16


def _nbits_constants(values: list[Any], int8: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int]:
    """MatMulNBits initializers (packed, scales, zero points, bits, block) for a dequantize's constants."""
    if int8:
        q_weight, scale = values
        out_features, in_features = q_weight.shape
        block = _nbits_block(in_features)
        blocks = -(-in_features // block)
        unsigned = (q_weight.to(torch.int16) + 128).to(torch.uint8)
        padded = torch.full((out_features, blocks * block), 128, dtype=torch.uint8)
        padded[:, :in_features] = unsigned
        scales = scale.reshape(-1, 1).expand(out_features, blocks).contiguous()
        return padded.reshape(out_features, blocks, block), scales.reshape(-1), None, 8, block
    packed, scale, zero_point, group = values
    out_features = packed.shape[0]
    blocks = scale.shape[1]
    zp = zero_point if blocks % 2 == 0 else torch.cat([zero_point, zero_point.new_zeros(out_features, 1)], 1)
    zp_packed = (zp[:, 0::2] & 0x0F) | ((zp[:, 1::2] & 0x0F) << 4)
    return packed.reshape(out_features, blocks, group // 2), scale.reshape(-1), zp_packed.reshape(-1), 4, group


def _linears_to_matmul_nbits(gm: fx.GraphModule) -> int:
    from graphopt.passes.quantize.placement import infer_val

    count = 0
    graph = gm.graph
    for node, dequant in weight_only_linears(graph):
        values = dequantize_constants(gm, dequant)
        if values is None:
            continue
        packed, scales, zero_points, bits, block = _nbits_constants(values, dequant.target == DEQUANTIZE_INT8)
        out_features = packed.shape[0]
        in_features = values[0].shape[1] * (2 if bits == 4 else 1)
        packed_node = register_constant(gm, f"{node.name}_nbits", packed, before=node)
        scales_node = register_constant(gm, f"{node.name}_nbits_scales", scales, before=node)
        zp_node = register_constant(gm, f"{node.name}_nbits_zp", zero_points, before=node) \
            if zero_points is not None else None
        bias = node.args[2] if len(node.args) > 2 else None
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.graphopt_weights.matmul_nbits.default,
                                      (node.args[0], packed_node, scales_node, zp_node, in_features, out_features,
                                       bits, block))
            infer_val(new)
            if bias is not None:
                new = graph.call_function(aten.add.Tensor, (new, bias))
                infer_val(new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return count


def prepare_weight_only_for_onnx(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[Any, Callable[..., Any]]]:
    """A copy of ``gm`` ready for ONNX export, and the translation table to export it with.

    In the copy, compressed linears are ``MatMulNBits`` and int8 embeddings gather rows; the table
    goes to ``torch.onnx.export(custom_translation_table=...)``.
    """
    from graphopt.passes.quantize.placement import infer_val

    copy = snapshot_graph_module(gm)
    gather_quantized_embeddings(copy)
    gather_codebook_embeddings(copy)
    for node in copy.graph.nodes:
        if node.op == "call_function" and "val" not in node.meta:
            infer_val(node)
    _linears_to_matmul_nbits(copy)
    for node in list(copy.graph.nodes):  # int4 weights outside linears (none are planned): float, computed once
        if node.target == DEQUANTIZE_INT4:
            value = dequantized_weight(copy, node)
            if value is not None:
                replacement = register_constant(copy, f"{node.name}_float", value, before=node)
                node.replace_all_uses_with(replacement)
                copy.graph.erase_node(node)
    copy.graph.eliminate_dead_code()
    prune_unused_attributes(copy)
    copy.graph.lint()
    copy.recompile()
    return copy, onnx_translation_table()
