"""Int8 embedding tables: the rows are gathered as int8, then scaled (no float copy of the table).

Static and dynamic int8 both store every constant ``aten.embedding`` table as int8 with one
symmetric scale per row; the graph reads ``embedding(int8 table, ids).float() * embedding(scales,
ids)``. Only the looked-up rows are ever dequantized, on every target (ONNX: two ``Gather`` and
a ``Mul``). For a BERT-style model the word embeddings are half of the fp32 file, so this is
what brings an int8 file down to about a quarter of the fp32 size.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value, register_constant
from graphopt.ir.meta import infer_meta
from graphopt.passes.quantize.observers import quantize_weight

__all__ = ["embedding_sites", "plan_embeddings", "quantize_embedding"]

aten = torch.ops.aten


def embedding_sites(gm: fx.GraphModule) -> list[str]:
    """Names of the ``aten.embedding`` nodes that read a constant 2-D float table."""
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.embedding.default and len(node.args) >= 2:
            table = attribute_value(gm, node.args[0])
            if table is not None and table.is_floating_point() and table.dim() == 2:
                names.append(node.name)
    return names


def quantize_embedding(gm: fx.GraphModule, node: fx.Node, q_table: torch.Tensor, scales: torch.Tensor) -> int:
    """Rewrite ``node`` to gather int8 rows and their scales; returns the bytes saved."""
    table = attribute_value(gm, node.args[0])
    graph = gm.graph
    q_node = register_constant(gm, f"{node.name}_table_int8", q_table, before=node)
    s_node = register_constant(gm, f"{node.name}_row_scale", scales.reshape(-1, 1), before=node)
    rest = tuple(node.args[2:])
    with graph.inserting_before(node):
        rows = graph.call_function(aten.embedding.default, (q_node, node.args[1], *rest))
        infer_meta(rows)
        row_scales = graph.call_function(aten.embedding.default, (s_node, node.args[1], *rest))
        infer_meta(row_scales)
        as_float = graph.call_function(aten._to_copy.default, (rows,), {"dtype": table.dtype})
        infer_meta(as_float)
        scaled = graph.call_function(aten.mul.Tensor, (as_float, row_scales))
        infer_meta(scaled)
    node.replace_all_uses_with(scaled)
    graph.erase_node(node)
    return table.numel() * table.element_size() - q_table.numel() - scales.numel() * scales.element_size()


def plan_embeddings(gm: fx.GraphModule) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Int8 rows + per-row scales for every constant embedding table of ``gm``, by node name."""
    nodes = {n.name: n for n in gm.graph.nodes}
    return {name: quantize_weight(attribute_value(gm, nodes[name].args[0]), per_channel=True, axis=0)
            for name in embedding_sites(gm)}


def quantize_embeddings(gm: fx.GraphModule, planned: dict[str, tuple[torch.Tensor, torch.Tensor]],
                        nodes: dict[str, fx.Node], skip: frozenset[str]) -> tuple[int, int]:
    """Apply the planned int8 tables not in ``skip``; returns (tables quantized, bytes saved)."""
    tables = [name for name in planned if name not in skip and name in nodes]
    saved = sum(quantize_embedding(gm, nodes[name], *planned[name]) for name in tables)
    return len(tables), saved
