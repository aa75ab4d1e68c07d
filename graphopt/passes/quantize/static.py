"""Static int8 post-training quantization: calibrate activation ranges, then insert QDQ nodes.

``Int8Static`` is the pass; its fields are its options. Its ``plan`` runs the graph on the
calibration batches (with a progress line), feeding every activation that may be quantized to
an observer, and quantizes each weight (symmetric int8, per channel by default). The plan's
units are the quantizable ops (``placement.find_sites``) less the weightless ones that would hand
nothing on in int8 (``handing_on_int8``); ``StaticPlan.apply`` quantizes the ones not skipped,
placing QDQ pairs by the rules in ``placement`` so that no needless dequantize/quantize pair is
left between int8 ops, and outputs no int8 op reads stay float. A linear unit that breaks the
budget steps down to dynamic int8 before it falls back to float (``dynamic_fallback``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from graphopt.errors import InputError
from graphopt.ir.graph import attribute_value, module_path, prune_unused_attributes
from graphopt.passes.base import PassResult
from graphopt.passes.lossy.base import CalibrationData, LossyPlan, LossyUnit
from graphopt.passes.lossy.calibration import watch_values
from graphopt.passes.quantize.dynamic import insert_dynamic_qdq
from graphopt.passes.quantize.embedding import (
    QuantizedTable,
    check_embedding_bits,
    embedding_units,
    quantize_embeddings,
)
from graphopt.passes.quantize.observers import OBSERVERS, Observer, QParams, make_observer, quantize_weight
from graphopt.passes.quantize.placement import (
    PASS_THROUGH,
    QUANTIZABLE,
    QuantSite,
    activation_inputs,
    find_sites,
    insert_activation_qdq,
    insert_weight_dequantize,
    output_point,
)
from graphopt.passes.quantize.scheme import QuantizationScheme, check_count, check_flags, check_ops, names_option
from graphopt.passes.quantize.selection import SKIPPED, SkipList

__all__ = ["HANDING_ON", "Int8Static", "StaticPlan", "calibrate", "handing_on_int8"]

HANDING_ON = ("add", "concat", "pooling")
"""Weightless op families: quantized only where their output goes on to an int8 op."""


def calibrate(gm: fx.GraphModule, batches: Sequence[tuple[Any, ...]], observers: dict[str, Observer]) -> None:
    """Run ``gm`` on every batch (flat graph inputs), updating ``observers`` by node name; shows progress."""
    watch_values(gm, batches, observers, f"calibrating {len(observers)} int8 activations")


@dataclass
class StaticPlan(LossyPlan):
    """Static int8 decisions for one graph: observed activation ranges and int8 weights per site."""

    sites: list[QuantSite]
    activation_qparams: dict[str, QParams]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    units: list[LossyUnit] = field(default_factory=list)
    unquantizable: list[str] = field(default_factory=list)
    embeddings: dict[str, QuantizedTable] = field(default_factory=dict)

    def apply(self, gm: fx.GraphModule, skip: frozenset[str] = frozenset(),
              milder: Mapping[str, int] | None = None) -> PassResult:
        """Insert QDQ nodes for every site not in ``skip`` (names are node names of the planned graph).

        Sites in ``milder`` (at level 1, the only one) keep their int8 weights but quantize their
        activation inputs at run time, as ``Int8Dynamic`` does; their outputs stay float.
        """
        nodes = {n.name: n for n in gm.graph.nodes}
        active = [s for s in self.sites if s.node not in skip and s.node in nodes]
        dynamic = [s for s in active if (milder or {}).get(s.node)]
        site_nodes = {nodes[s.node]: s for s in active if s not in dynamic}
        decided = self._decide(gm, site_nodes)
        pairs = 0
        for value, (params, readers) in decided.items():
            insert_activation_qdq(gm, value, params, readers)
            pairs += 1
        readers: dict[fx.Node, set[fx.Node]] = {}
        for site in dynamic:
            for value in activation_inputs(nodes[site.node], site.weight_index):
                readers.setdefault(value, set()).add(nodes[site.node])
        for value, users in readers.items():
            insert_dynamic_qdq(gm, value, users)
        saved = 0
        for node, site in [*site_nodes.items(), *((nodes[s.node], s) for s in dynamic)]:
            if site.weight_index is None:
                continue
            q_weight, scales = self.weights[site.node]
            original = attribute_value(gm, node.args[site.weight_index])
            insert_weight_dequantize(gm, node, site.weight_index, q_weight, scales, site.weight_axis)
            if original is not None:
                saved += original.numel() * original.element_size() - q_weight.numel() - scales.numel() * 12
        tables, table_bytes_saved = quantize_embeddings(gm, self.embeddings, nodes, skip)
        saved += table_bytes_saved
        prune_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
        fell_back = len(self.sites) + len(self.embeddings) - len(active) - tables
        stats = {"quantized": len(active), "embeddings": tables, "fell_back": fell_back, "qdq_pairs": pairs,
                 "dynamic_activations": len(readers), "weight_bytes_saved": saved}
        near = {"int8": {"kept float (fell back)": stats["fell_back"]}} if stats["fell_back"] else {}
        if self.unquantizable:
            near.setdefault("int8", {})[SKIPPED] = len(self.unquantizable)
        return PassResult(changed=bool(active), stats=stats, near_misses=near)

    def _decide(self, gm: fx.GraphModule, site_nodes: dict[fx.Node, QuantSite]) -> dict[fx.Node, tuple[QParams, Any]]:
        """Which values get a QDQ pair, with which parameters, read by which users (see ``placement``).

        An output is quantized only where an int8 op reads it (directly or through pass-through
        ops): a GEMM that only float ops read writes float, and an add, concat or pooling that
        hands nothing on in int8 is left in float (quantizing it would only add error).
        """
        site_nodes = handing_on_int8(site_nodes)
        outputs = {output_point(n): n for n in site_nodes}
        residual = {output_point(n) for n in _conv_residual_adds(site_nodes)}  # the fused kernel writes int8
        inputs = {v for n, s in site_nodes.items() for v in activation_inputs(n, s.weight_index)}
        reads_int8, needs_int8 = _int8_readers(site_nodes)
        decided: dict[fx.Node, tuple[QParams, Any]] = {}
        shared: dict[fx.Node, QParams] = {}
        for node in list(gm.graph.nodes):
            if node in outputs and (needs_int8(node) or node in residual):
                params = self.activation_qparams[node.name]
                decided[node] = (params, None)
                shared[node] = params
            elif (node.op == "call_function" and node.target in PASS_THROUGH and isinstance(node.args[0], fx.Node)
                  and node.args[0] in shared and needs_int8(node)):
                shared[node] = shared[node.args[0]]
                decided[node] = (shared[node], lambda user, v=node: reads_int8(user, v))
            elif node in inputs and node.name in self.activation_qparams:
                shared[node] = self.activation_qparams[node.name]
                decided[node] = (shared[node], lambda user, v=node: reads_int8(user, v))
        return decided


def _int8_readers(site_nodes: dict[fx.Node, QuantSite]) -> tuple[Any, Any]:
    """``reads_int8(user, value)`` and ``needs_int8(value)`` for the quantized ops ``site_nodes``."""
    needs: dict[fx.Node, bool] = {}

    def reads_int8(user: fx.Node, value: fx.Node) -> bool:
        site = site_nodes.get(user)
        if site is not None:
            return value in activation_inputs(user, site.weight_index)
        passes_through = user.op == "call_function" and user.target in PASS_THROUGH and user.args[0] is value
        return passes_through and needs_int8(user)

    def needs_int8(value: fx.Node) -> bool:
        if value not in needs:
            needs[value] = False  # no cycles in a DAG; guards recursion
            needs[value] = any(reads_int8(user, value) for user in value.users)
        return needs[value]

    return reads_int8, needs_int8


def _conv_residual_adds(site_nodes: dict[fx.Node, QuantSite]) -> set[fx.Node]:
    """The quantized adds of a quantized convolution's output (a residual block's), which targets fuse into it."""
    conv_outputs = {output_point(n) for n, s in site_nodes.items() if s.family == "conv"}
    return {n for n, s in site_nodes.items() if s.family == "add" and conv_outputs.intersection(n.all_input_nodes)}


def handing_on_int8(site_nodes: dict[fx.Node, QuantSite]) -> dict[fx.Node, QuantSite]:
    """``site_nodes`` less the weightless ops (add, concat, pooling) whose output no int8 op reads.

    Such an op has no int8 kernel to gain: it is quantized only so that int8 flows on. The
    exception is a residual add of a convolution's output, which targets fuse into the int8
    convolution. Dropping one can leave another without an int8 reader, so this repeats until
    nothing changes.
    """
    kept = dict(site_nodes)
    while True:
        _, needs_int8 = _int8_readers(kept)
        fused = _conv_residual_adds(kept)
        idle = [n for n, s in kept.items() if s.weight_index is None and s.family in HANDING_ON
                and not needs_int8(output_point(n)) and n not in fused]
        if not idle:
            return kept
        for node in idle:
            del kept[node]


@dataclass(frozen=True)
class Int8Static(QuantizationScheme):
    """Static int8 post-training quantization: activation ranges observed on calibration data.

    ``observer``: how activation ranges are chosen, ``"minmax"``, ``"moving-average"``,
    ``"percentile"`` or ``"entropy"`` (KL). ``per_channel``: one weight scale per output channel
    (else one per tensor). ``ops``: the op families quantized (``conv``, ``linear``, ``matmul``,
    ``add``, ``concat``, ``pooling``). ``skip``: node names or module paths kept in float.
    ``max_calibration_batches``: cap on the batches observed (all when None). ``embeddings``:
    store embedding tables quantized, ``embedding_bits`` wide (8, 4 or 3, as ``Int8Dynamic``).
    ``dynamic_fallback``: a linear layer (or product by a constant) whose static activation ranges
    break the budget first steps down to dynamic int8 (int8 weights, activation scales chosen per
    call: the GELU outputs of a transformer's feed-forward layer, whose range one calibrated scale
    serves badly), and falls back to float only if that still breaks it.
    Needs ``optimize(..., calibration=batches)``.
    Registered as ``quantize``, the scheme ``Quantize()`` has always meant.
    """

    name: ClassVar[str] = "quantize"

    observer: str = "minmax"
    per_channel: bool = True
    ops: tuple[str, ...] = tuple(QUANTIZABLE)
    skip: tuple[str, ...] = ()
    max_calibration_batches: int | None = None
    embeddings: bool = True
    embedding_bits: int = 8
    dynamic_fallback: bool = True

    def __post_init__(self) -> None:
        names_option(self, "ops")
        names_option(self, "skip")
        if self.observer not in OBSERVERS:
            raise InputError(f"Int8Static(observer=...) names how activation ranges are chosen; choose one of: "
                             f"{', '.join(OBSERVERS)}; got {self.observer!r}")
        check_ops(self)
        check_flags(self, "per_channel", "embeddings", "dynamic_fallback")
        check_embedding_bits(self)
        check_count(self, "max_calibration_batches", 1, ", or None for every batch", optional=True)

    @property
    def scheme(self) -> str:
        """``"int8"``."""
        return "int8"

    def plan(self, gm: fx.GraphModule, data: CalibrationData) -> StaticPlan:
        """Calibrate ``gm`` on ``data`` and plan static int8 for the ops of ``self.ops``."""
        if not data.batches:
            raise InputError(
                "static int8 quantization needs calibration data to choose activation ranges: pass "
                "optimize(..., quantize='int8', calibration=batches) with a few hundred representative samples "
                "(an iterable of input tuples; a DataLoader works), or use quantize='int8-dynamic', which needs none"
            )
        all_sites = find_sites(gm, self.ops)
        skipped = SkipList.checked(gm, self.skip, "Int8Static(skip=...)")
        nodes = {n.name: n for n in gm.graph.nodes}
        sites = [s for s in all_sites if nodes[s.node] not in skipped]
        handing_on = handing_on_int8({nodes[s.node]: s for s in sites})
        sites = [s for s in sites if nodes[s.node] in handing_on]
        watched: set[str] = set()
        for site in sites:
            node = nodes[site.node]
            watched.add(output_point(node).name)
            watched.update(v.name for v in activation_inputs(node, site.weight_index))
        observers = {name: make_observer(self.observer) for name in watched}
        limit = self.max_calibration_batches
        calibrate(gm, data.all if limit is None else data.all[: limit + 1], observers)
        activation_qparams = {name: obs.qparams() for name, obs in observers.items() if obs.count}
        weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        units = []
        for site in sites:
            node = nodes[site.node]
            details: dict[str, Any] = {"module": module_path(node), "op": str(node.target).split(".")[-2]}
            scheme = "int8 static"
            if site.weight_index is not None:
                weight = attribute_value(gm, node.args[site.weight_index])
                weights[site.node] = quantize_weight(weight, self.per_channel, site.weight_axis)
                details["weight_shape"] = list(weight.shape)
                scheme += ", per-channel weights" if self.per_channel else ", per-tensor weights"
            out = output_point(node)
            if out is not node:
                details["fused"] = str(out.target).split(".")[-2]
            dynamic_ok = self.dynamic_fallback and site.weight_index is not None and site.family != "conv"
            milder = (scheme.replace("int8 static", "int8 dynamic"),) if dynamic_ok else ()
            units.append(LossyUnit(site.node, site.family, scheme, details, milder))
        tables = embedding_units(gm, nodes, skipped, units, self.embedding_bits) if self.embeddings else {}
        unquantizable = [f"{s.node}: {SKIPPED}" for s in all_sites if nodes[s.node] in skipped]
        return StaticPlan(sites, activation_qparams, weights, units, unquantizable, tables)
