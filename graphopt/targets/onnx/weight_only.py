"""Compressed weights for onnxruntime: ``MatMulNBits`` and the translations to export them with.

Before export (on a copy), ``MatMulNBitsLinears`` turns compressed linear layers into
``graphopt_weights::matmul_nbits``, a custom op whose PyTorch body is the reference of
onnxruntime's contrib op ``com.microsoft.MatMulNBits`` (bits 8 or 4, the compressed weights as
its initializers) and whose translation writes that op. Embeddings gather int8 rows
(``graphopt.targets.common.weight_only_kernels``); int4 weights outside linears (none are
planned) become float once (``ExpandCompressedWeights(ops=(DEQUANTIZE_INT4,))``); other int8 weights export as
``DequantizeLinear`` (per axis) and codebooks as an index unpack + ``Gather``, all on the
compressed initializers, so the file carries the compressed weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx
import torch
import torch.fx as fx

from graphopt.ir.graph import read_constant, register_constant
from graphopt.ir.meta import infer_meta
from graphopt.passes.base import NodeRewrite, PassResult
from graphopt.passes.quantize.weight_ops import DEQUANTIZE_CODEBOOK, DEQUANTIZE_INT8, pack_nibbles, unpack_nibbles
from graphopt.targets.common.weight_only_kernels import dequantize_constants, weight_only_dequantize
from graphopt.targets.onnx.contrib_ops import ensure_schema

__all__ = ["MatMulNBitsLinears", "matmul_nbits", "translation_table"]

aten = torch.ops.aten


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


def _matmul_nbits_schema() -> onnx.defs.OpSchema:
    """The signature of onnxruntime's contrib op ``com.microsoft.MatMulNBits``, for onnx (and so onnxscript)."""
    schema = onnx.defs.OpSchema
    optional = schema.FormalParameterOption.Optional
    return schema(
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
    )


def _matmul_nbits_onnx(x: Any, packed: Any, scales: Any, zero_points: Any = None, in_features: int = 0,
                       out_features: int = 0, bits: int = 4, block_size: int = 128) -> Any:
    from onnxscript.values import Opset  # onnxscript takes about 1.4 s to import: only while exporting

    ensure_schema("MatMulNBits", _matmul_nbits_schema)
    microsoft = Opset("com.microsoft", 1)
    inputs = [x, packed, scales] + ([zero_points] if zero_points is not None else [])
    return microsoft.MatMulNBits(*inputs, K=in_features, N=out_features, bits=bits, block_size=block_size)


def _dequantize_int8_onnx(q_weight: Any, scale: Any) -> Any:
    from onnxscript import opset18 as op  # onnxscript takes about 1.4 s to import: only while exporting

    return op.DequantizeLinear(q_weight, scale, axis=0)


def _dequantize_codebook_onnx(indices: Any, codebook: Any, bits: int = 8, shape: Any = ()) -> Any:
    from onnxscript import opset18 as op  # onnxscript takes about 1.4 s to import: only while exporting

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


def translation_table() -> dict[Any, Callable[..., Any]]:
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
    if zero_point.is_floating_point():  # float zero points: MatMulNBits's zero point 8, then an offset per group
        return packed.reshape(out_features, blocks, group // 2), scale.reshape(-1), None, 4, group
    zp = zero_point if blocks % 2 == 0 else torch.cat([zero_point, zero_point.new_zeros(out_features, 1)], 1)
    zp_packed = (zp[:, 0::2] & 0x0F) | ((zp[:, 1::2] & 0x0F) << 4)
    return packed.reshape(out_features, blocks, group // 2), scale.reshape(-1), zp_packed.reshape(-1), 4, group


def _group_offsets(values: list[Any]) -> torch.Tensor | None:
    """``[K/g, N]`` offsets ``(8 - zero_point) * scale`` of int4 weights with float zero points, else None.

    ``(q - zp) * s == (q - 8) * s + (8 - zp) * s``: ``MatMulNBits`` without zero points computes the
    first term with its fast kernels (a float zero point sends it to a path about 17x slower), and
    ``x @ w`` gains ``sum over each group of x`` times the second.
    """
    _, scale, zero_point, _ = values
    if not zero_point.is_floating_point():
        return None
    return ((8 - zero_point.float()) * scale.float()).to(scale.dtype).t().contiguous()


def _add_group_offsets(gm: fx.GraphModule, node: fx.Node, product: fx.Node, offsets: torch.Tensor,
                       block: int) -> fx.Node:
    """``product + (x summed per group of block features) @ offsets`` (inserted before ``node``).

    The group sums are one product with a constant ``[K, K/block]`` indicator matrix rather than
    an unflatten and a sum: with a dynamic sequence length the unflatten exports as Shape, Slice,
    Concat and Reshape, and those four small ops per layer cost a decode step more than the sums.
    """
    graph = gm.graph
    x = node.args[0]
    indicator_node = _group_indicator(gm, offsets.shape[0], block, offsets.dtype, before=node)
    offsets_node = register_constant(gm, f"{node.name}_nbits_offsets", offsets, before=node)
    sums = graph.call_function(aten.matmul.default, (x, indicator_node))
    infer_meta(sums)
    correction = graph.call_function(aten.matmul.default, (sums, offsets_node))
    infer_meta(correction)
    total = graph.call_function(aten.add.Tensor, (product, correction))
    infer_meta(total)
    return total


def _group_indicator(gm: fx.GraphModule, groups: int, block: int, dtype: torch.dtype, before: fx.Node) -> fx.Node:
    """A read of the ``[groups * block, groups]`` 0/1 matrix summing each block of features (one per shape in gm)."""
    name = f"_go_nbits_groups_{groups}x{block}_{str(dtype).removeprefix('torch.')}"
    if not hasattr(gm, name):
        features = torch.arange(groups * block)
        indicator = torch.zeros(groups * block, groups, dtype=dtype)
        indicator[features, features // block] = 1
        gm.register_buffer(name, indicator)
    return read_constant(gm, name, before)


@dataclass(frozen=True)
class MatMulNBitsLinears(NodeRewrite):
    """Compressed linear layers -> ``graphopt_weights::matmul_nbits`` (onnxruntime's ``MatMulNBits``) + bias."""

    name = "onnx-matmul-nbits"
    stat = "matmul_nbits"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite every weight-only linear in place."""
        for node in gm.graph.nodes:  # the custom op's value is inferred from its inputs' recorded values
            if node.op == "call_function" and "val" not in node.meta:
                infer_meta(node)
        return super().run(gm)

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """Rewrite a weight-only linear in place."""
        dequant = weight_only_dequantize(node)
        values = dequantize_constants(gm, dequant) if dequant is not None else None
        if values is None:
            return False
        graph = gm.graph
        with graph.inserting_before(node):
            int8_groups = _int8_groups(values) if dequant.target == DEQUANTIZE_INT8 else None
            if int8_groups is not None:
                new = _groupwise_int8_product(gm, node, values[0], int8_groups)
            else:
                new = _nbits_product(gm, node, values, dequant.target == DEQUANTIZE_INT8)
            bias = node.args[2] if len(node.args) > 2 else None
            if bias is not None:
                new = graph.call_function(aten.add.Tensor, (new, bias))
                infer_meta(new)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return True


def _matmul_nbits_node(gm: fx.GraphModule, node: fx.Node, name: str, packed: torch.Tensor, scales: torch.Tensor,
                       zero_points: torch.Tensor | None, in_features: int, bits: int, block: int) -> fx.Node:
    """A ``matmul_nbits`` call on ``node``'s input with the given initializers (registered under ``name``)."""
    packed_node = register_constant(gm, f"{node.name}_{name}", packed, before=node)
    scales_node = register_constant(gm, f"{node.name}_{name}_scales", scales, before=node)
    zp_node = register_constant(gm, f"{node.name}_{name}_zp", zero_points, before=node) \
        if zero_points is not None else None
    new = gm.graph.call_function(torch.ops.graphopt_weights.matmul_nbits.default,
                                 (node.args[0], packed_node, scales_node, zp_node, in_features, packed.shape[0],
                                  bits, block))
    infer_meta(new)
    return new


def _nbits_product(gm: fx.GraphModule, node: fx.Node, values: list[Any], int8: bool) -> fx.Node:
    """int4 group-wise or int8 per-channel weights: one ``MatMulNBits`` (plus the float zero points' offsets)."""
    packed, scales, zero_points, bits, block = _nbits_constants(values, int8)
    in_features = values[0].shape[1] * (2 if bits == 4 else 1)
    new = _matmul_nbits_node(gm, node, "nbits", packed, scales, zero_points, in_features, bits, block)
    offsets = _group_offsets(values) if bits == 4 else None
    return _add_group_offsets(gm, node, new, offsets, block) if offsets is not None else new


def _int8_groups(values: list[Any]) -> torch.Tensor | None:
    """An int8 weight's scales as ``[N, K/block]`` (per-channel ones repeated per block), or None (no 4-bit form)."""
    q_weight, scale = values
    if q_weight.dim() != 2:
        return None
    if scale.dim() == 2:
        return scale
    block = _nbits_block(q_weight.shape[1])
    if q_weight.shape[1] % block:
        return None
    return scale.reshape(-1, 1).expand(-1, q_weight.shape[1] // block).contiguous()


def _groupwise_int8_product(gm: fx.GraphModule, node: fx.Node, q_weight: torch.Tensor, scale: torch.Tensor
                            ) -> fx.Node:
    """Group-wise int8 weights as two 4-bit ``MatMulNBits`` on their high and low nibbles, plus group offsets.

    onnxruntime's 8-bit ``MatMulNBits`` is fast only with int8 activations (accuracy level 4: 0.72 ms
    for 49152x576 on this machine; 95 ms without), its 4-bit one is fast on float activations. With
    ``u = q + 128 = 16 * hi + lo``: ``s * q == 16s * (hi - 8) + s * (lo - 8) + 8s``, so the weight
    stays one byte per element and the activations stay float.
    """
    out_features, in_features = q_weight.shape
    groups = scale.shape[1]
    block = in_features // groups
    unsigned = (q_weight.to(torch.int16) + 128).to(torch.uint8)
    graph = gm.graph
    terms = []
    for name, nibbles, factor in (("nbits_high", unsigned >> 4, 16.0), ("nbits_low", unsigned & 0x0F, 1.0)):
        packed = pack_nibbles(nibbles).reshape(out_features, groups, block // 2)
        terms.append(_matmul_nbits_node(gm, node, name, packed, (scale * factor).reshape(-1), None, in_features, 4,
                                        block))
    total = graph.call_function(aten.add.Tensor, tuple(terms))
    infer_meta(total)
    return _add_group_offsets(gm, node, total, (8 * scale).t().contiguous(), block)
