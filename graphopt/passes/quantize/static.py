"""Static int8 post-training quantization: calibrate activation ranges, then insert QDQ nodes.

``Int8Static`` is the pass; its fields are its options. Its ``plan`` runs the graph on the
calibration batches (with a progress line), feeding every activation that may be quantized to
an observer, and quantizes each weight (symmetric int8, per channel by default). The plan's
units are the quantizable ops (``placement.find_sites``); ``StaticPlan.apply`` quantizes the
ones not skipped, placing QDQ pairs by the rules in ``placement`` so that no needless
dequantize/quantize pair is left between int8 ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from graphopt.errors import InputError
from graphopt.ir.graph import attribute_value, module_path, prune_unused_attributes
from graphopt.passes.base import PassResult
from graphopt.passes.lossy.base import CalibrationData, LossyPlan, LossyUnit
from graphopt.passes.quantize.embedding import (
    QuantizedTable,
    check_embedding_bits,
    plan_embeddings,
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
from graphopt.report.progress import progress

__all__ = ["Int8Static", "StaticPlan", "calibrate", "embedding_units"]


class _Observing(fx.Interpreter):
    """Runs a graph and hands the value of each watched node to its observer."""

    def __init__(self, gm: fx.GraphModule, observers: dict[str, Observer]) -> None:
        super().__init__(gm)
        self.observers = observers

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        observer = self.observers.get(n.name)
        if observer is not None and isinstance(result, torch.Tensor):
            observer.update(result)
        return result


def calibrate(gm: fx.GraphModule, batches: Sequence[tuple[Any, ...]], observers: dict[str, Observer]) -> None:
    """Run ``gm`` on every batch (flat graph inputs), updating ``observers`` by node name; shows progress."""
    interpreter = _Observing(gm, observers)
    with torch.no_grad():
        for batch in progress(batches, desc=f"calibrating {len(observers)} int8 activations", total=len(batches)):
            interpreter.run(*batch)


@dataclass
class StaticPlan(LossyPlan):
    """Static int8 decisions for one graph: observed activation ranges and int8 weights per site."""

    sites: list[QuantSite]
    activation_qparams: dict[str, QParams]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    units: list[LossyUnit] = field(default_factory=list)
    unquantizable: list[str] = field(default_factory=list)
    embeddings: dict[str, QuantizedTable] = field(default_factory=dict)

    def apply(self, gm: fx.GraphModule, skip: frozenset[str] = frozenset()) -> PassResult:
        """Insert QDQ nodes for every site not in ``skip`` (names are node names of the planned graph)."""
        nodes = {n.name: n for n in gm.graph.nodes}
        active = [s for s in self.sites if s.node not in skip and s.node in nodes]
        site_nodes = {nodes[s.node]: s for s in active}
        decided = self._decide(gm, site_nodes)
        pairs = 0
        for value, (params, readers) in decided.items():
            insert_activation_qdq(gm, value, params, readers)
            pairs += 1
        saved = 0
        for node, site in site_nodes.items():
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
                 "weight_bytes_saved": saved}
        near = {"int8": {"kept float (fell back)": stats["fell_back"]}} if stats["fell_back"] else {}
        if self.unquantizable:
            near.setdefault("int8", {})[SKIPPED] = len(self.unquantizable)
        return PassResult(changed=bool(active), stats=stats, near_misses=near)

    def _decide(self, gm: fx.GraphModule, site_nodes: dict[fx.Node, QuantSite]) -> dict[fx.Node, tuple[QParams, Any]]:
        """Which values get a QDQ pair, with which parameters, read by which users (see ``placement``)."""
        outputs = {output_point(n): n for n in site_nodes}
        inputs = {v for n, s in site_nodes.items() for v in activation_inputs(n, s.weight_index)}
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

        decided: dict[fx.Node, tuple[QParams, Any]] = {}
        shared: dict[fx.Node, QParams] = {}
        for node in list(gm.graph.nodes):
            if node in outputs:
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


@dataclass(frozen=True)
class Int8Static(QuantizationScheme):
    """Static int8 post-training quantization: activation ranges observed on calibration data.

    ``observer``: how activation ranges are chosen, ``"minmax"``, ``"moving-average"``,
    ``"percentile"`` or ``"entropy"`` (KL). ``per_channel``: one weight scale per output channel
    (else one per tensor). ``ops``: the op families quantized (``conv``, ``linear``, ``matmul``,
    ``add``, ``concat``, ``pooling``). ``skip``: node names or module paths kept in float.
    ``max_calibration_batches``: cap on the batches observed (all when None). ``embeddings``:
    store embedding tables quantized, ``embedding_bits`` wide (8 or 4, as ``Int8Dynamic``).
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

    def __post_init__(self) -> None:
        names_option(self, "ops")
        names_option(self, "skip")
        if self.observer not in OBSERVERS:
            raise InputError(f"Int8Static(observer=...) names how activation ranges are chosen; choose one of: "
                             f"{', '.join(OBSERVERS)}; got {self.observer!r}")
        check_ops(self)
        check_flags(self, "per_channel", "embeddings")
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
            units.append(LossyUnit(site.node, site.family, scheme, details))
        tables = embedding_units(gm, nodes, skipped, units, self.embedding_bits) if self.embeddings else {}
        unquantizable = [f"{s.node}: {SKIPPED}" for s in all_sites if nodes[s.node] in skipped]
        return StaticPlan(sites, activation_qparams, weights, units, unquantizable, tables)


def embedding_units(gm: fx.GraphModule, nodes: dict[str, fx.Node], skipped: SkipList,
                    units: list[LossyUnit], bits: int = 8) -> dict[str, QuantizedTable]:
    """Plan embedding tables in ``bits`` (weight-only) and add one unit per table to ``units``."""
    tables = {name: value for name, value in plan_embeddings(gm, bits).items() if nodes[name] not in skipped}
    for name, table in tables.items():
        units.append(LossyUnit(name, "embedding", table.scheme,
                               {"module": module_path(nodes[name]), "weight_shape": table.shape}))
    return tables
