"""Structured pruning: remove whole channels, features and heads, so tensors really shrink.

``plan_structured`` builds the dependency graph (``graphopt.analysis.dependency``), scores the
units of every prunable group, and decides which units each group keeps (a uniform ratio per
group, or one global threshold). Each group is one ``LossyUnit``: the pass manager may let the
most sensitive groups fall back. ``StructuredPlan.apply`` slices every coupled weight with
``index_select`` into new constants, rewrites the size arguments that hold a pruned size
(``view``/``reshape`` shapes, ``split`` sizes, ``slice`` bounds, conv ``groups``, group-norm
``num_groups``) and re-propagates shapes, so every node's ``val`` meta is the new shape.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt.analysis.cost import node_costs
from graphopt.analysis.dependency import Atom, DependencyGraph, Group, Layout, layer_label
from graphopt.errors import InputError
from graphopt.ir.graph import attribute_value, prune_unused_attributes, register_constant
from graphopt.ir.meta import propagate_meta
from graphopt.ir.op_args import argument, set_argument
from graphopt.ir.ops import MATMUL_OPS, WEIGHTED_LAYER_OPS
from graphopt.passes.base import PassResult
from graphopt.passes.lossy.base import CalibrationData, LossyPlan, LossyUnit
from graphopt.passes.prune.importance import (
    check_kind,
    chosen_units,
    cost_keep_counts,
    global_keep_counts,
    group_scores,
    keep_count,
    taylor_gradients,
)
from graphopt.passes.prune.refit import (
    Reader,
    ReaderStatistics,
    Refit,
    collect_statistics,
    find_readers,
    fluctuation_scores,
    solve_refits,
)
from graphopt.report import PlotSpec, ReportSection

__all__ = ["GroupChoice", "StructuredPlan", "layer_section", "plan_structured"]

aten = torch.ops.aten


@dataclass
class GroupChoice:
    """What one group keeps: ``kept`` unit indices out of ``group.units``."""

    name: str
    group: Group
    kept: list[int]
    scores: list[float] = field(default_factory=list)


def _group_kind(deps: DependencyGraph, group: Group) -> str:
    weights = deps.weight_atoms(group)
    producers = [a for a in weights if a.dim == _out_dim(deps, a)]
    layer_ops = {_layer_op(deps, a) for a in producers}
    if any(a.per_unit > 1 for a in producers) and layer_ops & {"linear", "addmm", "matmul", "mm", "bmm"}:
        return "attention-heads"
    if "conv" in " ".join(layer_ops):
        return "conv-channels"
    return "features"


def _layer_op(deps: DependencyGraph, atom: Atom) -> str:
    node = deps.layer_node(atom.target)
    if node is None:
        return ""
    return str(getattr(node.target, "__name__", node.target)).split(".")[0]


def _unit_name(deps: DependencyGraph, group: Group, used: set[str]) -> str:
    """The user's module path of the group's producing layers (their common prefix), else of any of its layers."""
    weights = deps.weight_atoms(group)
    nodes = [(deps.layer_node(a.target), a.dim == _out_dim(deps, a)) for a in weights]
    named = [(n, producer) for n, producer in nodes if n is not None and n.meta.get("nn_module_stack")]
    producers = sorted({layer_label(n) for n, producer in named if producer})
    if not producers:  # e.g. a projection fused by another pass: name the group after its other layers
        producers = sorted({layer_label(n) for n, _ in named})
    if not producers:
        producers = sorted({layer_label(n) for n, _ in nodes if n is not None}) or [weights[0].target]
    prefix = _common_prefix([p.split(".") for p in producers]) if len(producers) > 1 else []
    base = ".".join(prefix) if prefix else producers[0]
    name, index = base, 1
    while name in used:
        index += 1
        name = f"{base}#{index}"
    used.add(name)
    return name


def _common_prefix(paths: list[list[str]]) -> list[str]:
    out = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        out.append(parts[0])
    return out


def _out_dim(deps: DependencyGraph, atom: Atom) -> int:
    """The dim of a layer weight that holds the layer's outputs (1 for addmm's transposed weights)."""
    node = deps.layer_node(atom.target)
    if node is not None and (node.target in MATMUL_OPS or node.target is aten.addmm.default):
        return deps.constant(atom.target).dim() - 1
    if node is not None and node.target is aten.embedding.default:
        return 1
    return 0


def plan_structured(gm: fx.GraphModule, data: CalibrationData, *, amount: float, importance: str,
                    scope: str, protect: Sequence[str], round_to: int, max_group_amount: float,
                    norms: bool = True, refit: bool | None = None) -> StructuredPlan:
    """Decide which units of every prunable group to keep (``gm`` is not changed).

    ``refit``: gather the input statistics the least-squares refit of ``apply`` needs (``None``:
    with ``importance="fluctuation"``).
    """
    check_kind(importance)
    deps = DependencyGraph.build(gm, protect, norms=norms)
    groups = deps.prunable_groups()
    if not groups:
        raise InputError(_nothing_prunable_message(deps))
    refit = importance == "fluctuation" if refit is None else refit
    measure = refit or importance == "fluctuation"  # the readers' input statistics are needed
    if measure and not data.batches:
        raise InputError(_needs_calibration_message(importance))
    readers: list[Reader] = []
    statistics = ReaderStatistics()
    notes: list[str] = []
    if measure:
        readers, notes = find_readers(gm, deps, groups)
        statistics = collect_statistics(gm, readers, data.batches)
    taylor = None
    if importance == "taylor":
        targets = {a.target for g in groups for a in deps.weight_atoms(g)}
        taylor = taylor_gradients(gm, targets, data)
    scored = [_scores(deps, g, importance, taylor, readers, statistics) for g in groups]
    scores = [score for score, _ in scored]
    unread = sum(1 for _, measured in scored if not measured)
    if unread:
        notes.append(f"{unread} group(s) ranked by L2 magnitude: no linear layer reads their units where "
                     "'fluctuation' can measure them (convolutions wider than 1x1, normalized inputs)")
    comparable = importance in ("fluctuation", "taylor") and not unread  # output effects, not magnitudes
    keeps = _keep_counts(gm, deps, groups, scores, scope, amount, round_to, max_group_amount, comparable)
    used: set[str] = set()
    choices = []
    for group, score, keep in zip(groups, scores, keeps, strict=True):
        if keep >= group.units:
            continue
        choices.append(GroupChoice(_unit_name(deps, group, used), group, chosen_units(score, keep),
                                   [float(s) for s in score]))
    plan = StructuredPlan(deps, choices, amount, importance, scope)
    refits = solve_refits(deps, readers, statistics, plan.kept_index, {c.group.id for c in choices}) if refit else []
    plan.use_refits(refits, notes)
    return plan


def _keep_counts(gm: fx.GraphModule, deps: DependencyGraph, groups: list[Group], scores: list[torch.Tensor],
                 scope: str, amount: float, round_to: int, max_group_amount: float, comparable: bool) -> list[int]:
    """Units each group keeps under ``scope`` (``comparable``: scores of different groups compare as they are)."""
    if scope == "global":
        return global_keep_counts(scores, amount, max_group_amount, round_to)
    if scope == "cost":
        costs = node_costs(gm)
        unit_costs = [_group_layer_macs(deps, g, costs) / g.units for g in groups]
        return cost_keep_counts(scores, unit_costs, amount, max_group_amount, round_to, normalize=not comparable)
    return [keep_count(g.units, amount, round_to) for g in groups]


def _group_layer_macs(deps: DependencyGraph, group: Group, costs: dict[str, Any]) -> int:
    """MACs of the layers whose weights the group runs through (what removing all its units would save, at most)."""
    layers = {deps.layer_weights[a.target] for a in deps.weight_atoms(group)}
    return sum(costs[name].macs for name in layers if name in costs)


def _scores(deps: DependencyGraph, group: Group, importance: str, taylor: dict[str, torch.Tensor] | None,
            readers: list[Reader], statistics: ReaderStatistics) -> tuple[torch.Tensor, bool]:
    """The group's unit importances, and False where ``"fluctuation"`` had nothing to measure (L2 instead)."""
    if importance == "fluctuation":
        measured = fluctuation_scores(deps, group, readers, statistics)
        return (measured, True) if measured is not None else (group_scores(deps, group, "l2"), False)
    return group_scores(deps, group, importance, taylor), True


def _needs_calibration_message(importance: str) -> str:
    what = "importance='fluctuation'" if importance == "fluctuation" else "refit=True"
    return (f"Prune({what}) needs calibration data: it measures the inputs of the layers that read the pruned "
            "units, and on the example inputs alone (the inputs the fidelity budget is judged on) the fit would "
            "only learn those. Pass optimize(..., calibration=batches) with representative samples (an iterable "
            "of input tuples; a DataLoader works), or use Prune(importance='l1', refit=False), which need none")


def _nothing_prunable_message(deps: DependencyGraph) -> str:
    reasons: Counter[str] = Counter()
    for group in deps.blocked_groups():
        reasons.update(group.reasons[:1])
    detail = "; ".join(f"{reason} ({count} group{'s' if count > 1 else ''})"
                       for reason, count in reasons.most_common(5))
    return ("structured pruning found nothing it can shrink safely in this model: "
            + (detail if detail else "it has no conv/linear/matmul weights with prunable output channels")
            + ". Graph outputs and protected layers keep their shapes. Try unstructured pruning "
            "(Prune(structured=False)), protect fewer layers, or prune a model with hidden layers.")


class StructuredPlan(LossyPlan):
    """The channels/heads each group keeps, and how to shrink the graph to them."""

    def __init__(self, deps: DependencyGraph, choices: list[GroupChoice], amount: float, importance: str,
                 scope: str) -> None:
        self.deps = deps
        self.choices = choices
        self.amount = amount
        self.importance = importance
        self.scope = scope
        self.refits: list[Refit] = []  # solved with every group pruned; used where all their input groups are
        self.refit_notes: list[str] = []
        self._all_pruned_atoms: dict[str, dict[int, list[Atom]]] | None = None  # kept_index's, built on first use
        self.last_section: ReportSection | None = None
        self.units = [self._unit(c) for c in choices]

    def _unit(self, choice: GroupChoice) -> LossyUnit:
        deps, group = self.deps, choice.group
        kind = _group_kind(deps, group)
        noun = {"attention-heads": "heads", "conv-channels": "channels"}.get(kind, "features")
        layers = sorted({f"{a.target}[{a.dim}]" for a in deps.weight_atoms(group)})
        fraction = len(choice.kept) / group.units
        params_before = params_after = 0
        for numel in self._touched_numels(group).values():
            params_before += numel
            params_after += round(numel * fraction)
        macs_before, macs_after = self._group_macs(group, fraction)
        return LossyUnit(
            choice.name, kind,
            f"keep {len(choice.kept)} of {group.units} {noun} ({self.importance}, {self.scope}"
            + (", readers refit)" if self._refits(group) else ")"),
            {"layers": ", ".join(layers[:6]) + (f" (+{len(layers) - 6})" if len(layers) > 6 else ""),
             "units before": group.units, "units after": len(choice.kept),
             "params before": params_before, "params after": params_after,
             "MACs before": macs_before, "MACs after": macs_after,
             "kept ratio": round(fraction, 4)},
        )

    def use_refits(self, refits: list[Refit], notes: list[str]) -> None:
        """Refit these readers where ``apply`` prunes all their input groups; ``notes`` go to the report."""
        self.refits = refits
        self.refit_notes = notes
        self.units = [self._unit(c) for c in self.choices]

    def _refits(self, group: Group) -> bool:
        """Whether a layer reading the group's units is refit when it shrinks."""
        return any(group.id in refit.groups for refit in self.refits)

    def _touched_numels(self, group: Group) -> dict[str, int]:
        """Elements of each constant the group runs through that belong to the group's slices."""
        out: dict[str, int] = defaultdict(int)
        for atom_id in group.atoms:
            atom = self.deps.atoms[atom_id]
            value = self.deps.constant(atom.target)
            out[f"{atom.target}:{atom.dim}:{atom.offset}"] += value.numel() // value.shape[atom.dim] * atom.size
        return out

    def _group_macs(self, group: Group, fraction: float) -> tuple[int, int]:
        """MACs of the layers whose weights the group runs through: before, and with this group alone pruned."""
        costs = getattr(self, "_costs", None)
        if costs is None:
            costs = self._costs = node_costs(self.deps.gm)
        before = _group_layer_macs(self.deps, group, costs)
        return before, round(before * fraction)

    def notes(self) -> list[str]:
        """Groups left as they are, with why (from the dependency analysis), and readers left unrefit."""
        reasons: Counter[str] = Counter()
        for group in self.deps.blocked_groups():
            reasons.update(group.reasons[:1])
        notes = list(self.refit_notes)
        if reasons:
            notes.insert(0, "kept at full size: " + "; ".join(f"{count} group(s): {reason}" for reason, count
                                                              in reasons.most_common(6)))
        return notes

    def sections(self) -> list[ReportSection]:
        """The per-layer table of the last ``apply`` (shapes, params, MACs before and after), with a plot."""
        return [self.last_section] if self.last_section is not None else []

    # ------------------------------------------------------------------ apply

    def apply(self, gm: fx.GraphModule, skip: frozenset[str] = frozenset()) -> PassResult:
        """Shrink ``gm`` (a structure copy of the planned graph) to the kept units of every group not in ``skip``."""
        active = {c.group.id: c for c in self.choices if c.name not in skip}
        if not active:
            return PassResult(False, {"groups_pruned": 0}, near_misses=self._near_misses())
        before = _layer_facts(gm)
        refits = self._refit_readers(active)
        replaced = self._slice_constants(gm, active, refits)
        self._rewrite_sizes(gm, active)
        gm.graph.lint()
        gm.recompile()
        propagate_meta(gm)
        prune_unused_attributes(gm)
        gm.recompile()
        after = _layer_facts(gm)
        self.last_section = layer_section(before, after)
        params_before = sum(f["params"] for f in before.values())
        params_after = sum(f["params"] for f in after.values())
        stats: dict[str, int | float] = {
            "groups_pruned": len(active),
            "units_removed": sum(c.group.units - len(c.kept) for c in active.values()),
            "constants_sliced": replaced,
            "layers_refit": sum(1 for refit in self.refits if refit.reader.weight in refits),
            "layer_params_before": params_before,
            "layer_params_after": params_after,
            "layer_macs_before": sum(f["macs"] for f in before.values()),
            "layer_macs_after": sum(f["macs"] for f in after.values()),
        }
        return PassResult(True, stats, near_misses=self._near_misses())

    def _near_misses(self) -> dict[str, dict[str, int]]:
        reasons: Counter[str] = Counter()
        for group in self.deps.blocked_groups():
            reasons.update(group.reasons[:1])
        return {"prune": dict(reasons)} if reasons else {}

    def _kept_elements(self, atom: Atom, active: dict[int, GroupChoice]) -> torch.Tensor:
        group = self.deps.group_of(atom.id)
        choice = active.get(group.id)
        if choice is None:
            return torch.arange(atom.offset, atom.offset + atom.size)
        units = torch.tensor(choice.kept, dtype=torch.long)
        within = torch.arange(atom.per_unit)
        return (atom.offset + (units[:, None] * atom.per_unit + within[None, :]).reshape(-1))

    def _atoms_by_target(self, active: dict[int, GroupChoice]) -> tuple[dict[str, dict[int, list[Atom]]], set[str]]:
        """Every constant's atoms by dim, and the constants an active group runs through."""
        by_target: dict[str, dict[int, list[Atom]]] = defaultdict(lambda: defaultdict(list))
        touched: set[str] = set()
        for atom in self.deps.atoms:
            if atom.pieces is not None:
                continue
            by_target[atom.target][atom.dim].append(atom)
            if self.deps.group_of(atom.id).id in active:
                touched.add(atom.target)
        return by_target, touched

    def kept_index(self, target: str, dim: int) -> torch.Tensor | None:
        """The indices dim ``dim`` of constant ``target`` keeps with every planned group pruned (None: no atoms)."""
        active = {c.group.id: c for c in self.choices}
        if self._all_pruned_atoms is None:  # one pass over the atoms for every reader's call
            self._all_pruned_atoms, _ = self._atoms_by_target(active)
        atoms = self._all_pruned_atoms.get(target, {}).get(dim)
        return self._kept_index(atoms, active) if atoms else None

    def _kept_index(self, atoms: list[Atom], active: dict[int, GroupChoice]) -> torch.Tensor:
        """The indices a constant's dim keeps, made of its ``atoms``."""
        return torch.cat([self._kept_elements(a, active) for a in sorted(atoms, key=lambda a: a.offset)])

    def _refit_readers(self, active: dict[int, GroupChoice]) -> dict[str, torch.Tensor]:
        """The refit weights and biases (by constant, all outputs) of readers whose every input group is active.

        A reader with only some of its input groups active (a concat of two pruned groups, one
        falling back) is sliced: its refit was solved for all of them.
        """
        out: dict[str, torch.Tensor] = {}
        for refit in self.refits:
            if refit.groups <= active.keys():
                out.update(refit.tensors)
        return out

    def _slice_constants(self, gm: fx.GraphModule, active: dict[int, GroupChoice],
                         refits: dict[str, torch.Tensor] | None = None) -> int:
        """Replace every constant an active group runs through by its kept slices (a refit's, where given)."""
        by_target, touched = self._atoms_by_target(active)
        refits = refits or {}
        touched |= set(refits)
        readers: dict[str, list[fx.Node]] = defaultdict(list)
        for node in gm.graph.nodes:
            if node.op == "get_attr" and str(node.target) in touched:
                readers[str(node.target)].append(node)
        for target in sorted(touched):
            nodes = readers.get(target)
            if not nodes:
                continue
            value = attribute_value(gm, nodes[0])
            if value is None:
                raise InputError(f"pruning planned to slice {target}, which this graph no longer stores")
            new = refits[target].to(value.device) if target in refits else value.detach()
            for dim, atoms in sorted(by_target[target].items()):  # a refit weight's input dim is already kept-size
                index = self._kept_index(atoms, active)
                if len(index) != new.shape[dim]:
                    new = new.index_select(dim, index.to(new.device))
            replacement = register_constant(gm, f"pruned_{target}", new.contiguous(), before=nodes[0])
            for node in nodes:
                node.replace_all_uses_with(replacement)
                gm.graph.erase_node(node)
        return len(touched)

    def new_length(self, layout: Layout, active: dict[int, GroupChoice]) -> Any:
        """The size a dim with ``layout`` has once the active groups are pruned."""
        total: Any = 0
        for seg in self.deps.resolve(layout):
            if seg.atom is None:
                total = total + seg.length
                continue
            group = self.deps.group_of(seg.atom)
            choice = active.get(group.id)
            if choice is None:
                total = total + seg.length
            else:
                total = total + int(len(choice.kept) * self.deps.atoms[seg.atom].per_unit * seg.scale)
        return total

    def _rewrite_sizes(self, gm: fx.GraphModule, active: dict[int, GroupChoice]) -> None:
        deps = self.deps
        for node in list(gm.graph.nodes):
            kind = deps.rewrites.get(node.name)
            if kind is None or node.op != "call_function":
                continue
            layouts = deps.layouts[node.name]
            if kind == "shape":
                node.args = (node.args[0], self._sizes(node.args[1], layouts, active), *node.args[2:])
            elif kind == "unflatten":  # the dim is counted in the input, which has len(sizes) - 1 dims fewer
                dim = node.args[1] % (len(layouts) - len(node.args[2]) + 1)
                sizes = self._sizes(node.args[2], layouts[dim: dim + len(node.args[2])], active)
                node.args = (node.args[0], node.args[1], sizes, *node.args[3:])
            elif kind in ("groups", "num_groups"):  # the conv's / group norm's argument of that name
                set_argument(node, kind, int(self.new_length(deps.virtual[(node.name, "groups")], active)))
            elif kind == "split":
                self._rewrite_split(node, layouts, active)
            elif kind == "normalized_shape":
                self._rewrite_norm(gm, node, layouts, active)
            elif kind == "slice":
                dim = (node.args[1] if len(node.args) > 1 else 0) % len(layouts)
                start = self.new_length(deps.virtual[(node.name, "before")], active)
                end = start + self.new_length(layouts[dim], active)
                args = list(node.args) + [None] * (4 - len(node.args))
                args[2], args[3] = int(start), int(end)
                node.args = tuple(args)

    def _sizes(self, sizes: Sequence[Any], layouts: Sequence[Layout], active: dict[int, GroupChoice]) -> list[Any]:
        out = list(sizes)
        for i, (size, layout) in enumerate(zip(sizes, layouts, strict=False)):
            if isinstance(size, int) and size != -1:
                new = self.new_length(layout, active)
                if new != size and isinstance(new, int):
                    out[i] = new
        return out

    def _rewrite_norm(self, gm: fx.GraphModule, node: fx.Node, layouts: list[Layout],
                      active: dict[int, GroupChoice]) -> None:
        """A layer / RMS norm over shrunk features: its normalized shape, and for RMS norm its scale.

        RMS norm over the kept features of a vector whose removed features were zero is the
        original times sqrt(kept / all): the weight (times sqrt(all / kept)) and eps (times
        all / kept) undo that, so removing zero features stays exact.
        """
        normalized = layouts[len(layouts) - len(node.args[1]):]
        before = math.prod(int(sum(seg.length for seg in layout)) for layout in normalized)
        sizes = [int(self.new_length(layout, active)) for layout in normalized]
        node.args = (node.args[0], sizes, *node.args[2:])
        after = math.prod(sizes)
        if after == before or self.deps.shrinking_norms.get(node.name) != "rms":
            return
        weight = node.args[2] if len(node.args) > 2 else None
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            return
        ratio = before / after
        value = attribute_value(gm, weight)
        scaled = register_constant(gm, f"{weight.target}_rescaled", (value * math.sqrt(ratio)).contiguous(),
                                   before=weight)
        node.replace_input_with(weight, scaled)
        eps = node.args[3] if len(node.args) > 3 else None
        if isinstance(eps, float):
            node.args = (*node.args[:3], eps * ratio, *node.args[4:])

    def _rewrite_split(self, node: fx.Node, outputs: list[list[Layout]], active: dict[int, GroupChoice]) -> None:
        dim = argument(node, "dim", 0) % len(outputs[0])
        sizes = [int(self.new_length(out[dim], active)) for out in outputs]
        node.target = aten.split_with_sizes.default
        node.args = (node.args[0], sizes, dim)
        node.kwargs = {}


# ---------------------------------------------------------------------- per-layer report

_LAYER_OPS = WEIGHTED_LAYER_OPS | {aten.embedding.default}


def _layer_facts(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """Per layer node (conv, linear, matmul with a stored weight): weight shape, params, MACs."""
    costs = node_costs(gm)
    facts: dict[str, dict[str, Any]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LAYER_OPS:
            continue
        weights = [a for a in node.all_input_nodes if a.op == "get_attr"]
        if not weights:
            continue
        shapes = [tuple(attribute_value(gm, w).shape) for w in weights if attribute_value(gm, w) is not None]
        main = max(shapes, key=len) if shapes else ()
        facts[node.name] = {
            "weight": layer_label(node),
            "shape": main,
            "params": sum(int(torch.Size(s).numel()) for s in shapes),
            "macs": costs[node.name].macs if node.name in costs else 0,
        }
    return facts


def layer_section(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> ReportSection:
    """Per layer: weight shape, parameters and MACs before and after pruning, with a plot of kept ratios."""
    rows = []
    labels, param_ratio, mac_ratio = [], [], []
    for name, old in before.items():
        new = after.get(name)
        if new is None:
            continue
        ratio = new["params"] / old["params"] if old["params"] else 1.0
        macs = new["macs"] / old["macs"] if old["macs"] else 1.0
        rows.append([name, old["weight"], "x".join(map(str, old["shape"])), "x".join(map(str, new["shape"])),
                     old["params"], new["params"], old["macs"], new["macs"], round(ratio, 4)])
        labels.append(name)
        param_ratio.append(round(ratio, 4))
        mac_ratio.append(round(macs, 4))
    total_before = sum(f["params"] for f in before.values())
    total_after = sum(f["params"] for f in after.values())
    macs_before = sum(f["macs"] for f in before.values())
    macs_after = sum(f["macs"] for f in after.values())
    description = (f"layer parameters {total_before:,} -> {total_after:,} "
                   f"({total_after / max(total_before, 1):.1%}), layer MACs {macs_before:,} -> {macs_after:,} "
                   f"({macs_after / max(macs_before, 1):.1%})")
    plot = PlotSpec(kind="barh", title="prune: kept fraction per layer", x_labels=labels,
                    series={"params kept": param_ratio, "MACs kept": mac_ratio}, y_label="fraction kept")
    return ReportSection("prune: per layer", description,
                         ["layer", "weight", "shape before", "shape after", "params before", "params after",
                          "MACs before", "MACs after", "params kept"], rows, [plot])

