"""Compressed weights (``graphopt_weights.dequantize_*`` nodes): readers and rewrites several targets share.

- ``GatherQuantizedEmbeddings`` (cpu, gpu, onnx): ``embedding(dequantize_int8(q, s), ids)``
  gathers the int8 rows and their scales and scales only those (``embedding(q, ids) *
  embedding(s, ids)``): the table stays int8 in memory (and in the ONNX file) and no call
  dequantizes it whole.
- ``GatherCodebookEmbeddings`` (cpu, gpu, onnx): the same for K-means tables, gathering rows of
  indices and decoding only them.
- ``ExpandCompressedWeights`` (cpu, gpu; int4 only on onnx): any other dequantize of a constant
  (int8 conv weights, K-means codebooks, layers no kernel took) is computed once at lowering.

The linear layers get each target's own kernels: ``graphopt.targets.cpu.weight_only`` (PyTorch's
weight-only CPU kernels), ``graphopt.targets.gpu.quantized`` (CUDA kernels),
``graphopt.targets.onnx.weight_only`` (onnxruntime's ``MatMulNBits``). All of them are exact
rewrites except the kernels themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value, register_constant
from graphopt.ir.meta import infer_meta
from graphopt.passes.base import NodeRewrite, Pass, PassResult
from graphopt.passes.quantize.weight_ops import DEQUANTIZE_CODEBOOK, DEQUANTIZE_INT4, DEQUANTIZE_INT8, DEQUANTIZE_OPS

__all__ = [
    "DEQUANTIZE_OPS",
    "ExpandCompressedWeights",
    "GatherCodebookEmbeddings",
    "GatherQuantizedEmbeddings",
    "copy_meta",
    "dequantize_constants",
    "dequantized_weight",
    "has_weight_only_ops",
    "replace_node",
    "weight_only_linears",
    "weight_only_dequantize",
]

aten = torch.ops.aten


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


def copy_meta(new: fx.Node, old: fx.Node) -> None:
    """Give ``new`` (which replaces ``old``) ``old``'s recorded value and shape."""
    new.meta.update({k: v for k, v in old.meta.items() if k in ("val", "tensor_meta")})


def replace_node(node: fx.Node, new: fx.Node) -> None:
    """Put ``new`` (given ``node``'s recorded value and shape) in place of ``node`` for its readers; erase ``node``."""
    copy_meta(new, node)
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def weight_only_dequantize(node: fx.Node) -> fx.Node | None:
    """The ``dequantize_int8``/``dequantize_int4`` node ``node`` reads as its weight when it is a ``linear``."""
    if node.target != aten.linear.default or not isinstance(node.args[1], fx.Node):
        return None
    return node.args[1] if node.args[1].target in (DEQUANTIZE_INT8, DEQUANTIZE_INT4) else None


def weight_only_linears(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """Every ``linear`` whose weight is a ``dequantize_int8``/``dequantize_int4`` node, with that node."""
    return [(node, weight) for node in graph.nodes if (weight := weight_only_dequantize(node)) is not None]


def _embedding_lookup(gm: fx.GraphModule, node: fx.Node, dequantize: Any) -> list[Any] | None:
    """The arguments of the constant ``dequantize`` call ``node`` reads its table through, if an ``embedding``.

    (``padding_idx``, ``scale_grad_by_freq`` and ``sparse`` only matter for gradients.)
    """
    table = node.args[0] if node.target == aten.embedding.default else None
    if isinstance(table, fx.Node) and table.target == dequantize:
        return dequantize_constants(gm, table)
    return None


@dataclass(frozen=True)
class GatherQuantizedEmbeddings(NodeRewrite):
    """``embedding(dequantize_int8(q, s), ids)`` -> ``embedding(q, ids).to(float) * embedding(s[:, None], ids)``.

    Group-wise scales ``s [V, D/g]`` scale each group of ``g`` columns of the gathered rows.
    """

    name = "int8-embedding-gather"
    stat = "int8_embedding_gathers"

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """Rewrite an int8 embedding lookup in place."""
        values = _embedding_lookup(gm, node, DEQUANTIZE_INT8)
        if values is None or values[0].dim() != 2:
            return False
        graph = gm.graph
        dequant = node.args[0]
        scale = values[1]
        groups = scale.shape[1] if scale.dim() == 2 else 1
        scale_table = register_constant(gm, f"{node.name}_row_scale", scale.reshape(scale.shape[0], groups),
                                        before=node)
        with graph.inserting_before(node):
            rows = graph.call_function(aten.embedding.default, (dequant.args[0], node.args[1]))
            widened = graph.call_function(aten._to_copy.default, (rows,), {"dtype": scale.dtype})
            scales = graph.call_function(aten.embedding.default, (scale_table, node.args[1]))
            created = [rows, widened, scales]
            if groups == 1:
                new = graph.call_function(aten.mul.Tensor, (widened, scales))
            else:  # one scale per group of columns: [..., G, D/G] * [..., G, 1]
                width = values[0].shape[1]
                grouped = graph.call_function(aten.unflatten.int, (widened, -1, [groups, width // groups]))
                column = graph.call_function(aten.unsqueeze.default, (scales, -1))
                scaled = graph.call_function(aten.mul.Tensor, (grouped, column))
                created += [grouped, column, scaled]
                new = graph.call_function(aten.flatten.using_ints, (scaled, -2, -1))
        for made in created:
            infer_meta(made)
        replace_node(node, new)
        return True


@dataclass(frozen=True)
class GatherCodebookEmbeddings(NodeRewrite):
    """``embedding(dequantize_codebook(idx, codebook), ids)`` -> gather the rows of indices, then decode only them.

    The table stays as its uint8 (or nibble-packed) indices in memory and in the ONNX file, and
    no call decodes it whole.
    """

    name = "codebook-embedding-gather"
    stat = "codebook_embedding_gathers"

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """Rewrite a codebook embedding lookup in place."""
        values = _embedding_lookup(gm, node, DEQUANTIZE_CODEBOOK)
        if values is None:
            return False
        indices, codebook, bits, shape = values
        if len(shape) != 2 or (bits == 4 and shape[1] % 2):
            return False
        graph = gm.graph
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
                created += [high, scaled, low, pairs,
                            graph.call_function(aten.flatten.using_ints, (pairs, -2, -1))]
            created.append(graph.call_function(aten.embedding.default, (column, created[-1])))
            new = graph.call_function(aten.squeeze.dim, (created[-1], -1))
        for item in created:
            infer_meta(item)
        replace_node(node, new)
        return True


@dataclass(frozen=True)
class ExpandCompressedWeights(Pass):
    """Every other dequantize of constants (int8 conv weights, codebooks) -> its float value, computed once.

    ``ops``: the dequantize ops it expands (default: all of them; the onnx target expands only
    int4 weights, which ONNX has no op for, and exports the others on the compressed weights).
    """

    name = "expand-compressed-weights"
    ops: tuple[Any, ...] = DEQUANTIZE_OPS

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Replace the remaining dequantize nodes in place."""
        count, erased = 0, 0
        for node in list(gm.graph.nodes):
            if node.target not in self.ops:
                continue
            if not node.users:  # its layer was lowered to a kernel reading the compressed weight
                gm.graph.erase_node(node)
                erased += 1
                continue
            weight = dequantized_weight(gm, node)
            if weight is None:
                continue
            replacement = register_constant(gm, f"{node.name}_float", weight, before=node)
            node.replace_all_uses_with(replacement)
            gm.graph.erase_node(node)
            count += 1
        return PassResult(bool(count or erased), {"weights_dequantized_once": count})
