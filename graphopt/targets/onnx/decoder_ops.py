"""The fused decoder ops (``graphopt_decoder``: swiglu, geglu, rotary) written back as ATen ops before export.

torch.onnx has no translation for them; their ATen chains export to the standard ops (``Sigmoid``/
``Mul``, ``Gelu`` or its formula, ``Slice``/``Neg``/``Concat``), which onnxruntime fuses in its
session as it would have without graphopt's fusions. Grouped-query attention needs nothing:
the exporter writes ``scaled_dot_product_attention(..., enable_gqa=True)`` as ONNX ``Attention``
with fewer key/value heads at opset 23, and repeats the heads itself at older opsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from graphopt.passes.base import NodeRewrite
from graphopt.passes.fusion.decoder_ops import DECODER_OPS, decompose

__all__ = ["DecomposeDecoderOps", "has_decoder_ops"]


def has_decoder_ops(gm: fx.GraphModule) -> bool:
    """True when ``gm`` calls a ``graphopt_decoder`` op."""
    return any(n.op == "call_function" and n.target in DECODER_OPS for n in gm.graph.nodes)


@dataclass(frozen=True)
class DecomposeDecoderOps(NodeRewrite):
    """Each ``graphopt_decoder`` op → the ATen ops it stands for (exact: the same ops the fusion replaced)."""

    name = "onnx-decompose-decoder-ops"
    stat = "decomposed"

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """Write one fused decoder op back as ATen ops."""
        if node.op != "call_function" or node.target not in DECODER_OPS:
            return False
        node.replace_all_uses_with(decompose(gm, node))
        gm.graph.erase_node(node)
        return True
