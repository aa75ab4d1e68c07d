"""Dynamic int8 quantization: int8 weights, activations quantized at run time.

Every ``linear`` / ``addmm`` / ``matmul`` by a constant weight gets symmetric int8 weights (per
output channel by default); its activation input is quantized to uint8 with a scale chosen
at run time from that call's minimum and maximum (``choose_qparams.tensor`` feeding the
``.tensor`` overloads of quantize/dequantize). Needs no calibration data. Values read by
several quantized ops (the input of the query, key and value projections) are quantized once.
``Int8Dynamic`` is the pass; its fields are its options.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value, module_path, prune_unused_attributes
from graphopt.ir.meta import infer_meta
from graphopt.passes.base import PassResult
from graphopt.passes.lossy.base import CalibrationData, LossyPlan, LossyUnit
from graphopt.passes.quantize.embedding import (
    QuantizedTable,
    check_embedding_bits,
    embedding_units,
    quantize_embeddings,
)
from graphopt.passes.quantize.observers import ACTIVATION_QMAX, ACTIVATION_QMIN, quantize_weight
from graphopt.passes.quantize.placement import (
    QuantSite,
    activation_inputs,
    find_sites,
    insert_weight_dequantize,
)
from graphopt.passes.quantize.scheme import QuantizationScheme, check_flags, names_option
from graphopt.passes.quantize.selection import SKIPPED, SkipList

__all__ = ["DynamicPlan", "Int8Dynamic", "insert_dynamic_qdq"]

qd = torch.ops.quantized_decomposed
_EPS = torch.finfo(torch.float32).eps


def insert_dynamic_qdq(gm: fx.GraphModule, value: fx.Node, readers: set[fx.Node]) -> fx.Node:
    """Quantize ``value`` at run time (per-tensor uint8); ``readers`` read the dequantized value."""
    graph = gm.graph
    with graph.inserting_after(value):
        choose = graph.call_function(qd.choose_qparams.tensor, (value, ACTIVATION_QMIN, ACTIVATION_QMAX, _EPS,
                                                                 torch.uint8))
    with graph.inserting_after(choose):
        scale = graph.call_function(operator.getitem, (choose, 0))
    with graph.inserting_after(scale):
        zero_point = graph.call_function(operator.getitem, (choose, 1))
    qargs = (scale, zero_point, ACTIVATION_QMIN, ACTIVATION_QMAX, torch.uint8)
    with graph.inserting_after(zero_point):
        quantize = graph.call_function(qd.quantize_per_tensor.tensor, (value, *qargs))
    with graph.inserting_after(quantize):
        dequantize = graph.call_function(qd.dequantize_per_tensor.tensor, (quantize, *qargs))
    for node in (choose, scale, zero_point, quantize, dequantize):
        infer_meta(node)
    for user in readers:
        user.replace_input_with(value, dequantize)
    return dequantize


@dataclass
class DynamicPlan(LossyPlan):
    """Dynamic int8 decisions: the int8 weights of every quantizable op."""

    sites: list[QuantSite]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    units: list[LossyUnit] = field(default_factory=list)
    embeddings: dict[str, QuantizedTable] = field(default_factory=dict)
    user_skipped: int = 0

    def apply(self, gm: fx.GraphModule, skip: frozenset[str] = frozenset()) -> PassResult:
        """Quantize every site not in ``skip``: int8 weights, run-time quantized activations."""
        nodes = {n.name: n for n in gm.graph.nodes}
        active = [s for s in self.sites if s.node not in skip and s.node in nodes]
        readers: dict[fx.Node, set[fx.Node]] = {}
        saved = 0
        for site in active:
            node = nodes[site.node]
            for value in activation_inputs(node, site.weight_index):
                readers.setdefault(value, set()).add(node)
            q_weight, scales = self.weights[site.node]
            original = attribute_value(gm, node.args[site.weight_index])
            insert_weight_dequantize(gm, node, site.weight_index, q_weight, scales, site.weight_axis)
            if original is not None:
                saved += original.numel() * original.element_size() - q_weight.numel() - scales.numel() * 12
        for value, users in readers.items():
            insert_dynamic_qdq(gm, value, users)
        tables, table_bytes_saved = quantize_embeddings(gm, self.embeddings, nodes, skip)
        saved += table_bytes_saved
        prune_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
        fell_back = len(self.sites) + len(self.embeddings) - len(active) - tables
        stats = {"quantized": len(active), "embeddings": tables, "fell_back": fell_back,
                 "dynamic_activations": len(readers), "weight_bytes_saved": saved}
        near = {"int8-dynamic": {"kept float (fell back)": stats["fell_back"]}} if stats["fell_back"] else {}
        if self.user_skipped:
            near.setdefault("int8-dynamic", {})[SKIPPED] = self.user_skipped
        return PassResult(changed=bool(active), stats=stats, near_misses=near)


@dataclass(frozen=True)
class Int8Dynamic(QuantizationScheme):
    """Dynamic int8: int8 weights; activations quantized at run time from each call's range (no data needed).

    Quantizes linear layers and products by a constant weight. ``per_channel``: one weight scale
    per output channel (else one per tensor). ``skip``: node names or module paths kept in
    float. ``embeddings``: store embedding tables quantized, ``embedding_bits`` wide (8: int8
    rows; 4: 4-bit codes with a scale and offset per 32 columns, about 0.6x the int8 table; 3: 3-bit
    indices into 8 values per row, about 0.4x; see ``graphopt.passes.quantize.embedding``).
    """

    name: ClassVar[str] = "quantize-dynamic"

    per_channel: bool = True
    skip: tuple[str, ...] = ()
    embeddings: bool = True
    embedding_bits: int = 8

    def __post_init__(self) -> None:
        names_option(self, "skip")
        check_flags(self, "per_channel", "embeddings")
        check_embedding_bits(self)

    @property
    def scheme(self) -> str:
        """``"int8-dynamic"``."""
        return "int8-dynamic"

    def plan(self, gm: fx.GraphModule, data: CalibrationData) -> DynamicPlan:
        """Plan dynamic int8 for every linear/matmul by a constant weight in ``gm`` (``data`` is not needed)."""
        nodes = {n.name: n for n in gm.graph.nodes}
        skipped = SkipList.checked(gm, self.skip, "Int8Dynamic(skip=...)")
        all_sites = find_sites(gm, ("linear", "matmul"), need_weight=True)
        sites = [s for s in all_sites if nodes[s.node] not in skipped]
        weights = {}
        units = []
        for site in sites:
            node = nodes[site.node]
            weight = attribute_value(gm, node.args[site.weight_index])
            weights[site.node] = quantize_weight(weight, self.per_channel, site.weight_axis)
            details: dict[str, Any] = {"module": module_path(node), "weight_shape": list(weight.shape)}
            scheme = "int8 dynamic, " + ("per-channel" if self.per_channel else "per-tensor") + " weights"
            units.append(LossyUnit(site.node, site.family, scheme, details))
        tables = embedding_units(gm, nodes, skipped, units, self.embedding_bits) if self.embeddings else {}
        return DynamicPlan(sites, weights, units, tables, user_skipped=len(all_sites) - len(sites))
