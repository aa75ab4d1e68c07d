"""Finding the layers whose constant weight a weight-compressing pass can replace, and replacing it.

Shared by ``WeightOnly`` and ``KMeans``. A *site* is one layer with a constant
float weight: ``aten.linear`` (weight ``[N, K]``), a convolution (weight ``[N, C/groups, *k]``),
an embedding table (``aten.embedding``, weight ``[V, D]``: one row per token), or a matrix
product with a constant 2-D right operand (``mm``, ``addmm`` with default
``beta``/``alpha`` and a 1-D bias, ``matmul``; weight ``[K, N]``, as in GPT-2's ``Conv1D``).
Products are rewritten to ``aten.linear`` on the transposed weight so that every compressed
matrix product in the IR, and so every lowering, has the one form
``linear(x, dequantize(...), bias)``; the values are unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value, constant_uses, prune_unused_attributes, register_constant
from graphopt.ir.meta import PROVENANCE_META, SHAPE_META, copy_meta, infer_meta
from graphopt.ir.op_args import argument, conv_arguments
from graphopt.ir.ops import CONV_OPS
from graphopt.passes.quantize.selection import SKIPPED, SkipList

__all__ = ["WeightSite", "find_weight_sites", "finish", "is_product_kind", "product_input", "replace_weight",
           "tensor_bytes"]

aten = torch.ops.aten

_CONV_KINDS = frozenset(op._opname for op in CONV_OPS)  # "conv2d", "convolution", ...


@dataclass(frozen=True)
class WeightSite:
    """One layer with a constant float weight.

    ``matrix`` is the weight as the pass should compress it, output channels first
    (``[N, K]`` for products, the conv weight as it is); ``transposed`` says a product's weight
    was ``[K, N]`` in the graph (the rewrite then turns the product into ``linear``).
    """

    node: str
    kind: str  # "linear" | "conv2d" ... | "mm" | "addmm" | "matmul" | "embedding"
    weight_target: str
    weight_index: int  # which argument of the layer is the weight
    matrix: torch.Tensor
    transposed: bool
    shared: bool  # the same weight tensor is read elsewhere too (e.g. tied embeddings)

    @property
    def is_product(self) -> bool:
        """A matrix product (becomes ``linear``), not a convolution."""
        return is_product_kind(self.kind)


def is_product_kind(kind: str) -> bool:
    """True for a site kind that is a matrix product (``linear``, ``mm``...), not a convolution or an embedding."""
    return kind not in _CONV_KINDS and kind != "embedding"


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of ``tensor``'s elements."""
    return tensor.numel() * tensor.element_size()


def _constant_weight(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    value = attribute_value(gm, node) if isinstance(node, fx.Node) else None
    return value if value is not None and value.is_floating_point() else None


def _product_site(gm: fx.GraphModule, node: fx.Node) -> tuple[str, fx.Node, str | None] | None:
    """(kind, weight node, refusal) for mm/addmm/matmul with a constant right operand, else None."""
    if node.target == aten.mm.default:
        return "mm", node.args[1], None
    if node.target == aten.addmm.default:
        refusal = None
        if argument(node, "beta") != 1 or argument(node, "alpha") != 1:
            refusal = "addmm with beta/alpha != 1"
        bias = _constant_weight(gm, node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if bias is None or bias.dim() != 1:
            refusal = refusal or "addmm bias is not a constant 1-D tensor"
        return "addmm", node.args[2], refusal
    if node.target == aten.matmul.default:
        return "matmul", node.args[1], None
    return None


def find_weight_sites(gm: fx.GraphModule, min_elements: int = 1,
                      skip: SkipList | None = None) -> Iterator[WeightSite | tuple[str, str]]:
    """Yield each compressible layer as a ``WeightSite``, or ``(node name, reason)`` for a near miss.

    Layers in ``skip`` (the user's ``skip=``) are near misses too.
    """
    readers = constant_uses(gm)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        index = 1
        if node.target == aten.linear.default:
            kind, weight_node, refusal, transposed = "linear", node.args[1], None, False
        elif node.target == aten.embedding.default:
            kind, weight_node, refusal, transposed, index = "embedding", node.args[0], None, False, 0
        elif node.target in CONV_OPS:
            conv = conv_arguments(node)
            assert conv is not None
            kind, weight_node, transposed = node.target._opname, conv.weight, False
            refusal = "transposed convolution" if conv.transposed else None
        else:
            product = _product_site(gm, node)
            if product is None:
                continue
            kind, weight_node, refusal = product
            transposed, index = True, 2 if kind == "addmm" else 1
        weight = _constant_weight(gm, weight_node)
        if weight is None:
            if kind in ("linear", "embedding") or kind in _CONV_KINDS:
                yield node.name, f"{kind} weight is not a constant float tensor"
            continue  # products of two activations are not weight sites
        if transposed and weight.dim() != 2:
            yield node.name, f"{kind} with a {weight.dim()}-D constant operand (only 2-D weights)"
            continue
        if refusal:
            yield node.name, refusal
            continue
        if skip is not None and node in skip:
            yield node.name, SKIPPED
            continue
        if weight.numel() < min_elements:
            yield node.name, f"weight has {weight.numel()} elements (< {min_elements})"
            continue
        matrix = weight.t() if transposed else weight
        shared = readers.get(str(weight_node.target), 0) > 1
        yield WeightSite(node.name, kind, str(weight_node.target), index, matrix, transposed, shared)


def replace_weight(
    gm: fx.GraphModule,
    site: WeightSite,
    constants: dict[str, torch.Tensor],
    build: Callable[[fx.Graph, dict[str, fx.Node]], fx.Node],
) -> fx.Node:
    """Swap a layer's float weight for a dequantize node reading the compact ``constants``.

    The constants are registered, ``build(graph, their get_attr nodes)`` makes the dequantize
    node before the layer, and the layer reads it instead of its float weight. Products become
    ``linear(x, dequantized [N, K] weight, bias)``. Returns the dequantize node.
    """
    node = next(n for n in gm.graph.nodes if n.name == site.node)
    attrs = {key: register_constant(gm, f"{site.node}_{key}", value, node) for key, value in constants.items()}
    with gm.graph.inserting_before(node):
        dequant = build(gm.graph, attrs)
    infer_meta(dequant)
    if not site.transposed:
        node.replace_input_with(node.args[site.weight_index], dequant)
    else:
        x = product_input(node, site.kind)
        bias = node.args[0] if site.kind == "addmm" else None
        with gm.graph.inserting_before(node):
            linear = gm.graph.call_function(aten.linear.default, (x, dequant, bias))
        copy_meta(linear, node, SHAPE_META + PROVENANCE_META)
        node.replace_all_uses_with(linear)
        gm.graph.erase_node(node)
    return dequant


def product_input(node: fx.Node, kind: str) -> Any:
    """The activation a matrix-product site multiplies by its weight.

    ``linear``, ``mm`` and ``matmul``: their first argument; ``addmm``: its second.
    """
    return node.args[1] if kind == "addmm" else node.args[0]


def finish(gm: fx.GraphModule) -> None:
    """Drop the float weights nothing reads any more and recompile."""
    prune_unused_attributes(gm)
    gm.graph.lint()
    gm.recompile()


def near_misses_by_reason(pass_label: str, reasons: Iterable[str]) -> dict[str, dict[str, int]]:
    """``PassResult.near_misses`` for layers left alone: how many for each reason, under ``pass_label``."""
    counts = Counter(reasons)
    return {pass_label: dict(counts)} if counts else {}
