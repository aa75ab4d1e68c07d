"""The dependency graph of coupled dimensions: which tensor dims must shrink together.

Structured pruning removes whole channels, features or heads. Removing output channel ``c`` of a
convolution changes every tensor that carries that channel: the bias, the following add (and so
the other branch of a residual), the next layer's input channels, a flatten's block of features,
a concat's offset range. This module finds those couplings on the ATen IR.

**Model.** Every constant dim (a weight's out- or in-dim, a bias, a stored buffer) of size > 1 is
an *atom*: an index range that could shrink. Every tensor dim of every node gets a *layout*: the
sequence of atoms (each scaled: a flatten after a conv maps one channel to ``H*W`` features, a
head reshape maps ``head_dim`` features to one head) and fixed ranges (graph inputs, sizes an op
creates) that it is made of, in order. Op rules propagate layouts forward and *unify* dims that
must stay equal (an add's operands, a matmul's contracted dims, a weight's dim with the dim it
multiplies). Unifying two atoms puts them in one *group*; a group has ``units`` prunable units
(channels, neurons, heads) and each member atom ``per_unit`` elements per unit, so whole heads
stay together. A concat or split that cuts through a group splits the group in two (q/k/v of a
fused projection become separate atoms). A group is *blocked*, with a reason, when anything
coupled to it cannot shrink: a graph input or output, a normalization over it (layer norm,
softmax, mean), an op without a rule, a user-protected layer.

``DependencyGraph.graph`` is a networkx graph: slot nodes ``(node name, dim)`` and atom nodes
``("atom", id)``, an edge where a slot's layout holds an atom, and atom-atom edges where ops
coupled them; the pruning groups are its connected components over atoms.

    deps = DependencyGraph.build(gm)
    for group in deps.prunable_groups(): ...
    deps.coupled_slots("conv2d", 1)     # every (node, dim) that shrinks with conv2d's channels
"""

from __future__ import annotations

import fnmatch
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value, is_mutating, node_shape, op_name
from graphopt.ir.op_args import argument, conv_arguments
from graphopt.ir.op_traits import broadcasting
from graphopt.ir.ops import (
    ALIAS_OPS,
    CONV_OPS,
    COPY_OPS,
    DROPOUT_OPS,
    LOG_SOFTMAX_OPS,
    MATMUL_OPS,
    RESHAPE_OPS,
    SOFTMAX_OPS,
)

__all__ = ["Atom", "DependencyGraph", "Group", "Segment", "layer_label"]

aten = torch.ops.aten


@dataclass
class Atom:
    """A contiguous index range of one constant's dim that may shrink (cut into ``pieces`` when split)."""

    id: int
    target: str  # the get_attr target (attribute name) of the constant
    dim: int
    offset: int  # where the range starts in the constant's dim
    size: int
    group: int
    per_unit: int = 1
    pieces: list[int] | None = None


@dataclass
class Group:
    """Atoms that shrink together, ``units`` prunable units (channels, neurons, heads) each."""

    id: int
    units: int
    atoms: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    quiet: list[str] = field(default_factory=list)  # blocked for reasons not worth reporting (kernel windows)
    parent: int | None = None  # union-find link; None for a root
    dead: bool = False  # cut into two new groups

    @property
    def blocked(self) -> bool:
        """True when some coupled tensor cannot shrink (``reasons`` says why)."""
        return bool(self.reasons or self.quiet)


@dataclass(frozen=True)
class Segment:
    """Part of a dim's layout: ``atom`` scaled by ``scale`` (slot elements per atom element), or fixed."""

    atom: int | None
    scale: Fraction
    length: Any  # int, or a sympy expression for a dynamic (fixed) size


Layout = tuple[Segment, ...]

_IDENTITY_OPS = ALIAS_OPS | COPY_OPS | DROPOUT_OPS | {
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
    aten.lift_fresh_copy.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
    aten.empty_like.default,
}
_POOL_OPS = {
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default, aten.avg_pool1d.default,
    aten.avg_pool2d.default, aten.avg_pool3d.default, aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default, aten.adaptive_max_pool2d.default,
    aten.max_pool2d_with_indices.default, aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec,
    aten.pixel_shuffle.default,
}
_SUM_OPS = {aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.linalg_vector_norm.default,
            aten.norm.ScalarOpt_dim}
_NORMALIZING_REDUCTIONS = {aten.mean.dim, aten.var.correction, aten.std.correction, aten.var.dim,
                           aten.std.dim, aten.var_mean.correction}
_BATCH_NORM_OPS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
                   aten.native_batch_norm.default, aten.instance_norm.default}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class DependencyGraph:
    """Coupled dims of an ATen graph module and the pruning groups they form (see the module doc)."""

    def __init__(self, gm: fx.GraphModule, protect: Sequence[str] = (), norms: bool = False) -> None:
        self.gm = gm
        self.protect = tuple(protect)
        self.norms = norms  # whether the dims a norm normalizes over may shrink
        self.shrinking_norms: dict[str, str] = {}  # layer / RMS norm node -> "layer" or "rms", when norms may shrink
        self.atoms: list[Atom] = []
        self.groups: list[Group] = []
        self.layouts: dict[str, Any] = {}  # node name -> list[Layout] (or list of lists for tuple outputs)
        self.virtual: dict[tuple[str, str], Layout] = {}  # extra layouts an op's arguments depend on
        self.rewrites: dict[str, str] = {}  # node name -> kind of argument rewrite pruning needs
        self.graph = nx.Graph()
        self._target_layouts: dict[str, list[Layout]] = {}
        self.layer_weights: dict[str, str] = {}  # weight target -> node name of the layer reading it
        self._constants: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, gm: fx.GraphModule, protect: Sequence[str] = (), norms: bool = False) -> DependencyGraph:
        """Analyse ``gm`` (not changed).

        ``protect``: fnmatch patterns of attribute names (or their prefixes, e.g. ``"layer4.*"``
        or ``"classifier"``) whose dims must keep their size. ``norms``: let the dims a layer or
        RMS norm (or a mean / variance) normalizes over shrink, such as a transformer's hidden size:
        the norms then normalize over the kept features only (``shrinking_norms`` lists them).
        """
        deps = cls(gm, protect, norms)
        for node in gm.graph.nodes:
            deps._visit(node)
        deps._build_nx()
        return deps

    def _new_group(self, units: int) -> Group:
        group = Group(len(self.groups), units)
        self.groups.append(group)
        return group

    def _new_atom(self, target: str, dim: int, offset: int, size: int, group: Group, per_unit: int) -> Atom:
        atom = Atom(len(self.atoms), target, dim, offset, size, group.id, per_unit)
        self.atoms.append(atom)
        group.atoms.append(atom.id)
        return atom

    def find(self, group_id: int) -> Group:
        """The root group of ``group_id`` (union-find)."""
        group = self.groups[group_id]
        while group.parent is not None:
            group = self.groups[group.parent]
        return group

    def group_of(self, atom_id: int) -> Group:
        """The group the (uncut) atom belongs to."""
        return self.find(self.atoms[atom_id].group)

    def block(self, atom_ids: Iterable[int], reason: str, quiet: bool = False) -> None:
        """Mark the groups of these atoms unprunable, with ``reason`` (``quiet``: not listed in reports)."""
        for atom_id in atom_ids:
            for leaf in self._leaves(atom_id):
                group = self.group_of(leaf)
                reasons = group.quiet if quiet else group.reasons
                if reason not in reasons:
                    reasons.append(reason)

    def _leaves(self, atom_id: int) -> list[int]:
        atom = self.atoms[atom_id]
        if atom.pieces is None:
            return [atom_id]
        return [leaf for piece in atom.pieces for leaf in self._leaves(piece)]

    def resolve(self, layout: Layout) -> Layout:
        """``layout`` with cut atoms replaced by their pieces."""
        if all(s.atom is None or self.atoms[s.atom].pieces is None for s in layout):
            return layout
        out: list[Segment] = []
        for seg in layout:
            if seg.atom is None:
                out.append(seg)
                continue
            for leaf in self._leaves(seg.atom):
                out.append(Segment(leaf, seg.scale, int(self.atoms[leaf].size * seg.scale)))
        return tuple(out)

    @staticmethod
    def fixed(length: Any) -> Layout:
        """A layout that never shrinks."""
        return (Segment(None, Fraction(1), length),)

    def atoms_in(self, layouts: Iterable[Layout]) -> list[int]:
        """Every (uncut) atom that the layouts hold."""
        return [s.atom for layout in layouts for s in self.resolve(layout) if s.atom is not None]

    def _coarsen(self, group: Group, factor: int, why: str) -> bool:
        if factor == 1:
            return True
        if group.units % factor:
            if f"{why}: blocks of {factor} do not divide {group.units} units" not in group.reasons:
                group.reasons.append(f"{why}: blocks of {factor} do not divide {group.units} units")
            return False
        group.units //= factor
        for atom_id in group.atoms:
            self.atoms[atom_id].per_unit *= factor
        return True

    def _cut(self, group: Group, unit: int) -> None:
        """Split ``group`` before ``unit``: every member atom is cut there into two pieces."""
        first, second = self._new_group(unit), self._new_group(group.units - unit)
        first.reasons, second.reasons = list(group.reasons), list(group.reasons)
        first.quiet, second.quiet = list(group.quiet), list(group.quiet)
        for atom_id in list(group.atoms):
            atom = self.atoms[atom_id]
            head = self._new_atom(atom.target, atom.dim, atom.offset, unit * atom.per_unit, first, atom.per_unit)
            tail = self._new_atom(atom.target, atom.dim, atom.offset + head.size, atom.size - head.size, second,
                                  atom.per_unit)
            atom.pieces = [head.id, tail.id]
        group.atoms, group.dead = [], True

    def _slot_per_unit(self, seg: Segment) -> Fraction:
        return seg.scale * self.atoms[seg.atom].per_unit  # type: ignore[index]

    def scaled(self, layout: Layout, factor: Fraction, why: str) -> Layout:
        """``layout`` with every atom segment scaled by ``factor``; groups coarsen so units stay whole."""
        out = []
        for seg in self.resolve(layout):
            if seg.atom is None:
                out.append(Segment(None, Fraction(1), _whole(seg.length * factor)))
                continue
            new = Segment(seg.atom, seg.scale * factor, _whole(seg.length * factor))
            per_unit = self._slot_per_unit(new)
            if per_unit.denominator != 1:
                self._coarsen(self.group_of(seg.atom), per_unit.denominator, why)
            out.append(new)
        return tuple(out)

    def _ensure_boundaries(self, layout: Layout, cuts: Iterable[Any], why: str) -> Layout:
        """Cut the atoms of ``layout`` so that each position in ``cuts`` is a segment boundary."""
        for position in sorted({c for c in cuts if _is_int(c)}):
            layout = self.resolve(layout)
            start = 0
            for seg in layout:
                end = start + seg.length if _is_int(seg.length) else None
                if end is None:
                    break
                if start < position < end:
                    if seg.atom is None:
                        break
                    slot_per_unit = self._slot_per_unit(seg)
                    unit = Fraction(position - start) / slot_per_unit
                    if unit.denominator != 1:
                        self.block([seg.atom], f"{why} cuts through a coupled block")
                        break
                    self._cut(self.group_of(seg.atom), int(unit))
                    break
                start = end if end is not None else start
        return self.resolve(layout)

    def unify(self, a: Layout, b: Layout, why: str) -> None:
        """Couple two layouts that must stay equal element by element (same positions)."""
        a, b = self.resolve(a), self.resolve(b)
        if a == b:
            return
        total_a, total_b = sum(s.length for s in a), sum(s.length for s in b)
        if total_a != total_b:
            self.block(self.atoms_in([a, b]), f"{why}: sizes {total_a} and {total_b} differ")
            return
        positions = lambda layout: list(_prefix_sums(s.length for s in layout))[1:-1]  # noqa: E731
        a = self._ensure_boundaries(a, positions(b), why)
        b = self._ensure_boundaries(b, positions(a), why)
        a = self._ensure_boundaries(a, positions(b), why)
        if [s.length for s in a] != [s.length for s in b]:
            self.block(self.atoms_in([a, b]), f"{why}: incompatible splits")
            return
        for sa, sb in zip(a, b, strict=True):
            self._unify_segments(sa, sb, why)

    def _unify_segments(self, sa: Segment, sb: Segment, why: str) -> None:
        if sa.atom is None and sb.atom is None:
            return
        if sa.atom is None or sb.atom is None:
            atom = sa.atom if sa.atom is not None else sb.atom
            self.block([atom], f"{why}, with a tensor of fixed size (an input, or a size an op creates)")  # type: ignore[list-item]
            return
        self.graph.add_edge(("atom", sa.atom), ("atom", sb.atom), why=why)
        ga, gb = self.group_of(sa.atom), self.group_of(sb.atom)
        pa, pb = self._slot_per_unit(sa), self._slot_per_unit(sb)
        if ga is gb:
            if pa != pb:
                self.block([sa.atom], f"{why}: one group coupled to itself at two granularities")
            return
        common = math.lcm(int(pa), int(pb))
        if sa.length % common:
            self.block([sa.atom, sb.atom], f"{why}: coupled blocks of {pa} and {pb} do not align")
            return
        if not (self._coarsen(ga, common // int(pa), why) and self._coarsen(gb, common // int(pb), why)):
            self.block([sa.atom, sb.atom], why)
            return
        gb.parent = ga.id
        ga.atoms.extend(gb.atoms)
        gb.atoms = []
        ga.reasons.extend(r for r in gb.reasons if r not in ga.reasons)
        ga.quiet.extend(r for r in gb.quiet if r not in ga.quiet)

    # ------------------------------------------------------------------ per node

    def layout_of(self, value: Any) -> list[Layout] | None:
        """Per-dim layouts of an argument (a node producing one tensor), or None."""
        if isinstance(value, fx.Node):
            layouts = self.layouts.get(value.name)
            if layouts is not None and (not layouts or isinstance(layouts[0], tuple)):
                return [self.resolve(layout) for layout in layouts]
        return None

    def _shape(self, node: fx.Node) -> tuple[Any, ...] | None:
        return node_shape(node)

    def _fixed_layouts(self, node: fx.Node) -> Any:
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return [[self.fixed(_dim(d)) for d in v.shape] if isinstance(v, torch.Tensor) else None for v in val]
        shape = self._shape(node)
        return [self.fixed(d) for d in shape] if shape is not None else None

    def _input_nodes(self, node: fx.Node) -> list[fx.Node]:
        return list(node.all_input_nodes)

    def _block_inputs(self, node: fx.Node, reason: str) -> None:
        layouts = [layout for arg in self._input_nodes(node) for layout in (self.layout_of(arg) or [])]
        self.block(self.atoms_in(layouts), reason)

    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self.layouts[node.name] = self._fixed_layouts(node)
        elif node.op == "get_attr":
            self.layouts[node.name] = self._constant_layouts(node)
        elif node.op == "output":
            for arg in _flat_nodes(node.args):
                for layout in self.layout_of(arg) or []:
                    self.block(self.atoms_in([layout]), "graph output keeps its shape")
        elif node.op == "call_function":
            try:
                layouts = self._propagate(node)
            except _NoRule as missing:
                self._block_inputs(node, str(missing))
                layouts = self._fixed_layouts(node)
            self.layouts[node.name] = layouts
        else:
            self._block_inputs(node, f"{node.op} {node.target} has no pruning rule")
            self.layouts[node.name] = self._fixed_layouts(node)

    def _constant_layouts(self, node: fx.Node) -> list[Layout] | None:
        target = str(node.target)
        if target in self._target_layouts:
            return self._target_layouts[target]
        value = attribute_value(self.gm, node)
        if value is None:
            return self._fixed_layouts(node)
        self._constants[target] = value
        layouts: list[Layout] = []
        for dim, size in enumerate(value.shape):
            if size <= 1:
                layouts.append(self.fixed(int(size)))
                continue
            atom = self._new_atom(target, dim, 0, int(size), self._new_group(int(size)), 1)
            layouts.append((Segment(atom.id, Fraction(1), int(size)),))
        if self._protected(target):
            self.block(self.atoms_in(layouts), f"protected: {target}")
        self._target_layouts[target] = layouts
        return layouts

    def _protected(self, target: str) -> bool:
        for pattern in self.protect:
            if fnmatch.fnmatchcase(target, pattern) or target.startswith(pattern.rstrip(".*") + ".") \
                    or fnmatch.fnmatchcase(target, pattern + ".*"):
                return True
        return False

    def _propagate(self, node: fx.Node) -> Any:
        target = node.target
        name = op_name(target)
        args = node.args
        if target is operator.getitem:
            source = self.layouts.get(args[0].name) if isinstance(args[0], fx.Node) else None
            if isinstance(source, list) and source and isinstance(source[0], list):
                return [self.resolve(layout) for layout in source[args[1]]]
            raise _NoRule(f"getitem on {args[0]} has no pruning rule")
        if not isinstance(target, torch._ops.OpOverload):
            raise _NoRule(f"{name} is not an ATen op")
        if is_mutating(node):
            raise _NoRule(f"{name} writes into a tensor (state it keeps must keep its shape)")
        if target is aten.sym_size.int:
            source = self._need(args[0], name)
            self.block(self.atoms_in([source[args[1] % len(source)]]), f"{name} reads this size at run time")
            return None
        shape = self._shape(node)
        if target in _IDENTITY_OPS:
            source = self.layout_of(args[0])
            return source if source is not None else self._fixed_layouts(node)
        traits = broadcasting(target)
        if traits is not None or target in {aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.masked_fill.Tensor}:
            out = self._broadcast(node, [a for a in _flat_nodes(args) + _flat_nodes(node.kwargs)], name)
            if traits is not None and traits.mixed_last_dims:
                self.block(self.atoms_in(out[len(out) - traits.mixed_last_dims:]), f"{name}: {traits.reason}")
            return out
        if target in RESHAPE_OPS or target is aten.flatten.using_ints or target is aten.unflatten.int:
            return self._reshape(node, name)
        if target in (aten.permute.default,):
            source = self._need(args[0], name)
            dims = [d % len(source) for d in args[1]]
            return [source[d] for d in dims]
        if target in (aten.transpose.int, aten.swapaxes.default):
            source = list(self._need(args[0], name))
            i, j = args[1] % len(source), args[2] % len(source)
            source[i], source[j] = source[j], source[i]
            return source
        if target is aten.t.default:
            return list(reversed(self._need(args[0], name)))
        if target is aten.unsqueeze.default:
            source = list(self._need(args[0], name))
            dim = args[1] % (len(source) + 1)
            return [*source[:dim], self.fixed(1), *source[dim:]]
        if target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            source = self._need(args[0], name)
            return self._squeeze(source, shape)
        if target in (aten.expand.default, aten.expand_as.default, aten.broadcast_to.default):
            source = self._need(args[0], name)
            others = [args[1]] if target is aten.expand_as.default else []
            out = self._broadcast(node, [args[0], *others], name, base=source)
            if target is aten.expand.default:
                self.rewrites[node.name] = "shape"
                self._block_symbolic_sizes(args[1], out, name)
            return out
        if target in (aten.linear.default,):
            return self._linear(node, name)
        if target in MATMUL_OPS or target in (aten.addmm.default, aten.baddbmm.default):
            return self._matmul(node, name)
        if target in CONV_OPS:
            return self._conv(node, name)
        if target in _BATCH_NORM_OPS:
            return self._batch_norm(node, name)
        if target in (aten.layer_norm.default, aten.rms_norm.default):  # rms_norm: (x, shape, weight, eps)
            return self._layer_norm(node, name)
        if target is aten.group_norm.default:
            return self._group_norm(node, name)
        if target is aten.embedding.default:
            weight, indices = self._need(args[0], name), self._need(args[1], name)
            self._note_weight(node, args[0])
            self.block(self.atoms_in([weight[0]]), "embedding rows are picked by input values")
            return [*list(indices), weight[1]]
        if target in _POOL_OPS:
            source = self._need(args[0], name)
            spatial = len(shape) - 2 if target is not aten.pixel_shuffle.default else 2
            if target is aten.pixel_shuffle.default:
                raise _NoRule("pixel_shuffle moves channels into space: no pruning rule")
            self.block(self.atoms_in(source[len(source) - spatial:]), f"{name} pools over it")
            out = list(source[: len(source) - spatial]) + [self.fixed(d) for d in shape[len(shape) - spatial:]]
            if target in (aten.max_pool2d_with_indices.default, aten.adaptive_max_pool2d.default):
                return [out, out]
            return out
        if target in _SUM_OPS or target in _NORMALIZING_REDUCTIONS:
            return self._reduce(node, name, normalizing=target in _NORMALIZING_REDUCTIONS)
        if target in SOFTMAX_OPS or target in LOG_SOFTMAX_OPS:
            source = self._need(args[0], name)
            dim = args[1] % len(source)
            self.block(self.atoms_in([source[dim]]), f"{name} normalizes over this dim")
            return source
        if target is aten.scaled_dot_product_attention.default:
            return self._attention(node, name)
        if target is aten.cat.default:
            return self._cat(node, name)
        if target is aten.stack.default:
            tensors = [self._need(t, name) for t in args[0]]
            dim = (args[1] if len(args) > 1 else 0) % (len(tensors[0]) + 1)
            for other in tensors[1:]:
                for la, lb in zip(tensors[0], other, strict=True):
                    self.unify(la, lb, f"{name} stacks them")
            first = [self.resolve(layout) for layout in tensors[0]]
            return [*first[:dim], self.fixed(len(tensors)), *first[dim:]]
        if target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
                      aten.tensor_split.sections):
            return self._split(node, name)
        if target is aten.slice.Tensor:
            return self._slice(node, name)
        if target in (aten.select.int, aten.unbind.int, aten.index.Tensor, aten.index_select.default,
                      aten.gather.default, aten.narrow.default):
            return self._indexing(node, name)
        raise _NoRule(f"{name} has no pruning rule")

    def _note_weight(self, node: fx.Node, value: Any) -> None:
        if isinstance(value, fx.Node) and value.op == "get_attr":
            self.layer_weights.setdefault(str(value.target), node.name)

    def _need(self, value: Any, name: str) -> list[Layout]:
        layouts = self.layout_of(value)
        if layouts is None:
            raise _NoRule(f"{name}: argument {value} has no known layout")
        return layouts

    def _broadcast(self, node: fx.Node, operands: list[Any], name: str, base: list[Layout] | None = None) -> Any:
        shape = self._shape(node)
        if shape is None:
            raise _NoRule(f"{name}: output is not one tensor")
        out: list[Layout | None] = [None] * len(shape)
        inputs = [self.layout_of(o) for o in operands]
        if base is not None:
            inputs[0] = base
        for layouts in inputs:
            if layouts is None:
                continue
            offset = len(shape) - len(layouts)
            for i, layout in enumerate(layouts):
                length = sum(s.length for s in self.resolve(layout))
                if length == 1 and shape[offset + i] != 1:
                    continue  # broadcast
                if out[offset + i] is None:
                    out[offset + i] = layout
                else:
                    self.unify(out[offset + i], layout, f"{name} combines them element-wise")  # type: ignore[arg-type]
        return [self.resolve(layout) if layout is not None else self.fixed(size) for layout, size in zip(out, shape,
                                                                                                          strict=True)]

    def _squeeze(self, source: list[Layout], shape: tuple[Any, ...]) -> list[Layout]:
        out = [layout for layout in source if sum(s.length for s in layout) != 1]
        while len(out) < len(shape):
            out.append(self.fixed(1))  # squeeze of a non-1 dim keeps it; shapes agree by construction
        if len(out) != len(shape):
            raise _NoRule("squeeze: could not match dims")
        return out

    def _reshape(self, node: fx.Node, name: str) -> list[Layout]:
        source = self._need(node.args[0], name)
        shape = self._shape(node)
        in_shape = [sum(s.length for s in layout) for layout in source]
        if shape is None:
            raise _NoRule(f"{name}: unknown output shape")
        groups = _reshape_groups(in_shape, list(shape))
        if groups is None:
            self.block(self.atoms_in(source), f"{name} from {tuple(in_shape)} to {tuple(shape)}: dims do not map")
            raise _NoRule(f"{name} from {tuple(in_shape)} to {tuple(shape)}: dims do not map")
        out: list[Layout | None] = [None] * len(shape)
        for ins, outs in groups:
            merged = self._merge_dims([source[i] for i in ins], name)
            for index, layout in zip(outs, self._split_dim(merged, [shape[o] for o in outs], name), strict=True):
                out[index] = layout
        for index, size in enumerate(shape):
            if out[index] is None:
                out[index] = self.fixed(size)
        if node.target in RESHAPE_OPS:
            self.rewrites[node.name] = "shape"
            self._block_symbolic_sizes(node.args[1], out, name)  # type: ignore[arg-type]
        elif node.target is aten.unflatten.int:
            self.rewrites[node.name] = "unflatten"
            dim = node.args[1] % len(source)
            self._block_symbolic_sizes(node.args[2], out[dim: dim + len(node.args[2])], name)  # type: ignore[arg-type]
        return out  # type: ignore[return-value]

    def _block_symbolic_sizes(self, sizes: Sequence[Any], layouts: Sequence[Layout | None], name: str) -> None:
        for size, layout in zip(sizes, layouts, strict=False):
            if layout is not None and not _is_int(size) and self.atoms_in([layout]):
                self.block(self.atoms_in([layout]), f"{name} takes this size from a run-time value")  # type: ignore[return-value]

    def _merge_dims(self, layouts: list[Layout], name: str) -> Layout:
        if len(layouts) == 1:
            return layouts[0]
        inner = [la for la in layouts[1:]]
        inner_atoms = self.atoms_in(inner)
        if inner_atoms:
            self.block(inner_atoms, f"{name} merges it as an inner dim (its index map is strided)")
        inner_size = math.prod(sum(s.length for s in la) for la in inner)
        if not _is_int(inner_size):
            self.block(self.atoms_in(layouts[:1]), f"{name} merges it with a dynamic dim")
            return self.fixed(sum(s.length for s in layouts[0]) * inner_size)
        return self.scaled(layouts[0], Fraction(inner_size), f"{name} merges dims")

    def _split_dim(self, layout: Layout, sizes: list[Any], name: str) -> list[Layout]:
        if len(sizes) == 1:
            return [layout]
        inner = math.prod(sizes[1:])
        layout = self.resolve(layout)
        atoms = [s.atom for s in layout if s.atom is not None]
        if not atoms:
            return [self.fixed(s) for s in sizes]
        if not _is_int(inner) or any(not _is_int(s.length) or s.length % inner for s in layout):
            self.block(atoms, f"{name} splits it at positions that cut its ranges")
            return [self.fixed(s) for s in sizes]
        outer = self.scaled(layout, Fraction(1, inner), f"{name} splits {sum(s.length for s in layout)} into "
                            f"{tuple(sizes)}")
        return [outer] + [self.fixed(s) for s in sizes[1:]]

    def _linear(self, node: fx.Node, name: str) -> list[Layout]:
        x, weight = self._need(node.args[0], name), self._need(node.args[1], name)
        self._note_weight(node, node.args[1])
        self.unify(x[-1], weight[1], f"{name} contracts input features with weight columns")
        out = [*list(x[:-1]), weight[0]]
        bias = node.args[2] if len(node.args) > 2 else None
        if bias is not None:
            self.unify(out[-1], self._need(bias, name)[-1], f"{name} adds its bias")
        return [self.resolve(layout) for layout in out]

    def _matmul(self, node: fx.Node, name: str) -> list[Layout]:
        target = node.target
        if target in (aten.addmm.default, aten.baddbmm.default):
            bias, a, b = node.args[0], node.args[1], node.args[2]
        else:
            bias, a, b = None, node.args[0], node.args[1]
        la, lb = self._need(a, name), self._need(b, name)
        self._note_weight(node, a)
        self._note_weight(node, b)
        if len(la) < 2 or len(lb) < 2:
            raise _NoRule(f"{name} of vectors has no pruning rule")
        self.unify(la[-1], lb[-2], f"{name} contracts them")
        batch_a, batch_b = la[:-2], lb[:-2]
        batch: list[Layout] = []
        for i in range(max(len(batch_a), len(batch_b))):
            da = batch_a[len(batch_a) - 1 - i] if i < len(batch_a) else None
            db = batch_b[len(batch_b) - 1 - i] if i < len(batch_b) else None
            if da is not None and db is not None:
                size_a, size_b = sum(s.length for s in da), sum(s.length for s in db)
                if size_a == size_b:
                    self.unify(da, db, f"{name} batches over them")
                    batch.insert(0, da)
                else:
                    batch.insert(0, da if size_b == 1 else db)
            else:
                batch.insert(0, da if da is not None else db)  # type: ignore[arg-type]
        out = [*batch, la[-2], lb[-1]]
        if bias is not None:
            bias_layouts = self._need(bias, name)
            offset = len(out) - len(bias_layouts)
            for i, layout in enumerate(bias_layouts):
                if sum(s.length for s in layout) != 1 or sum(s.length for s in out[offset + i]) == 1:
                    self.unify(out[offset + i], layout, f"{name} adds its bias")
        return [self.resolve(layout) for layout in out]

    def _conv(self, node: fx.Node, name: str) -> list[Layout]:
        conv = conv_arguments(node)
        if conv is None:
            raise _NoRule(f"{name}: arguments that do not fit the convolution's schema")
        x, weight = self._need(conv.input, name), self._need(conv.weight, name)
        self._note_weight(node, conv.weight)
        if conv.transposed:
            raise _NoRule(f"{name} (transposed) has no pruning rule")
        bias, groups = conv.bias, conv.groups
        shape = self._shape(node)
        if groups == 1:
            self.unify(x[1], weight[1], f"{name} contracts input channels with weight in-channels")
            out_channels = weight[0]
        else:
            in_outer, in_inner = self._split_dim(x[1], [groups, sum(s.length for s in x[1]) // groups], name)
            w_outer, _w_inner = self._split_dim(weight[0], [groups, sum(s.length for s in weight[0]) // groups], name)
            self.unify(in_outer, w_outer, f"{name} (groups={groups}) ties each input group to its output group")
            self.unify(in_inner, weight[1], f"{name} contracts channels within a group")
            self.virtual[(node.name, "groups")] = self.resolve(in_outer)
            self.rewrites[node.name] = "groups"
            out_channels = weight[0]
        if bias is not None:
            self.unify(out_channels, self._need(bias, name)[0], f"{name} adds its bias")
        self.block(self.atoms_in(x[2:]), f"{name} slides over it")
        self.block(self.atoms_in(weight[2:]), f"{name} kernel window", quiet=True)
        return [x[0], self.resolve(out_channels)] + [self.fixed(d) for d in shape[2:]]

    def _per_channel_params(self, node: fx.Node, params: list[Any], channel: Layout, name: str) -> None:
        for param in params:
            if isinstance(param, fx.Node):
                layouts = self._need(param, name)
                if layouts:
                    self.unify(channel, layouts[0], f"{name} scales each channel")

    def _batch_norm(self, node: fx.Node, name: str) -> Any:
        x = self._need(node.args[0], name)
        params = list(node.args[1:5])
        self._per_channel_params(node, params, x[1], name)
        out = [self.resolve(layout) for layout in x]
        if node.target is aten.batch_norm.default or node.target is aten.instance_norm.default:
            return out
        shape_val = node.meta.get("val")
        count = len(shape_val) if isinstance(shape_val, (tuple, list)) else 3
        stats = [self.resolve(x[1])]
        return [out] + [stats for _ in range(count - 1)]

    def _layer_norm(self, node: fx.Node, name: str) -> list[Layout]:
        x = self._need(node.args[0], name)
        normalized = len(node.args[1])
        if self.norms:
            self.rewrites[node.name] = "normalized_shape"
            self.shrinking_norms[node.name] = "rms" if node.target is aten.rms_norm.default else "layer"
        else:
            self.block(self.atoms_in(x[len(x) - normalized:]),
                       f"{name} normalizes over it (removing features changes every other feature)")
        for param in node.args[2:4]:
            if isinstance(param, fx.Node):
                for la, lb in zip(x[len(x) - normalized:], self._need(param, name), strict=True):
                    self.unify(la, lb, f"{name} scales each feature")
        return [self.resolve(layout) for layout in x]

    def _group_norm(self, node: fx.Node, name: str) -> list[Layout]:
        x = self._need(node.args[0], name)
        num_groups = node.args[1]
        channels = sum(s.length for s in x[1])
        outer, inner = self._split_dim(x[1], [num_groups, channels // num_groups], name)
        self.block(self.atoms_in([inner]), f"{name} normalizes within each group")
        self.virtual[(node.name, "groups")] = self.resolve(outer)
        self.rewrites[node.name] = "num_groups"
        for param in node.args[2:4]:
            if isinstance(param, fx.Node):
                self.unify(x[1], self._need(param, name)[0], f"{name} scales each channel")
        return [self.resolve(layout) for layout in x]

    def _reduce(self, node: fx.Node, name: str, normalizing: bool) -> list[Layout]:
        source = self._need(node.args[0], name)
        dims_arg, keepdim = argument(node, "dim"), bool(argument(node, "keepdim", False))
        if dims_arg is None or dims_arg == []:
            dims = list(range(len(source)))
        else:
            dims = [d % len(source) for d in ([dims_arg] if isinstance(dims_arg, int) else dims_arg)]
        reduced = [source[d] for d in dims]
        if normalizing and not self.norms:
            self.block(self.atoms_in(reduced), f"{name} averages over it (removing entries changes the mean)")
        out = []
        for d, layout in enumerate(source):
            if d in dims:
                if keepdim:
                    out.append(self.fixed(1))
            else:
                out.append(self.resolve(layout))
        if node.target is aten.var_mean.correction:
            return [out, out]
        return out

    def _attention(self, node: fx.Node, name: str) -> list[Layout]:
        q, k, v = (self._need(a, name) for a in node.args[:3])
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        has_scale = (len(node.args) > 6 and node.args[6] is not None) or node.kwargs.get("scale") is not None
        self.unify(q[-1], k[-1], f"{name} contracts queries with keys")
        if not has_scale:
            self.block(self.atoms_in([q[-1]]), f"{name} scales scores by 1/sqrt(head size)")
        self.unify(k[-2], v[-2], f"{name} pairs keys with values")
        batch = [self._broadcast_pair(a, b, name) for a, b in zip(q[:-2], k[:-2], strict=True)]
        batch = [self._broadcast_pair(a, b, name) for a, b in zip(batch, v[:-2], strict=True)]
        if isinstance(mask, fx.Node):
            layouts = self._need(mask, name)
            full = [*batch, q[-2], k[-2]]
            offset = len(full) - len(layouts)
            for i, layout in enumerate(layouts):
                if sum(s.length for s in layout) != 1:
                    self.unify(full[offset + i], layout, f"{name} masks scores")
        return [self.resolve(layout) for layout in [*batch, q[-2], v[-1]]]

    def _broadcast_pair(self, a: Layout, b: Layout, name: str) -> Layout:
        size_a, size_b = sum(s.length for s in a), sum(s.length for s in b)
        if size_a == size_b:
            self.unify(a, b, f"{name} batches over them")
            return self.resolve(a)
        if size_a != 1 and size_b != 1:  # grouped-query attention: query head h reads key head h // ratio
            if _is_int(size_a) and _is_int(size_b) and size_a % size_b == 0:
                # a key/value head goes with the query heads that read it
                outer, _ = self._split_dim(a, [size_b, size_a // size_b], name)
                self.unify(outer, b, f"{name} shares each key/value head between {size_a // size_b} query heads")
                return self.resolve(a)
            self.block(self.atoms_in([a, b]), f"{name} shares key/value heads between query heads")
        return a if size_b == 1 else b

    def _cat(self, node: fx.Node, name: str) -> list[Layout]:
        tensors = [self._need(t, name) for t in node.args[0]]
        dim = argument(node, "dim", 0) % len(tensors[0])
        for other in tensors[1:]:
            for d, (la, lb) in enumerate(zip(tensors[0], other, strict=True)):
                if d != dim:
                    self.unify(la, lb, f"{name} joins them")
        first = [self.resolve(layout) for layout in tensors[0]]
        joined = tuple(s for t in tensors for s in self.resolve(t[dim]))
        first[dim] = joined
        return first

    def _split(self, node: fx.Node, name: str) -> list[list[Layout]]:
        source = self._need(node.args[0], name)
        vals = node.meta.get("val")
        if not isinstance(vals, (list, tuple)):
            raise _NoRule(f"{name}: outputs unknown")
        dim = argument(node, "dim", 0) % len(source)
        sizes = [_dim(v.shape[dim]) for v in vals]
        if not all(_is_int(s) for s in sizes):
            self.block(self.atoms_in([source[dim]]), f"{name} at dynamic sizes")
            raise _NoRule(f"{name} at dynamic sizes")
        bounds = list(_prefix_sums(sizes))
        layout = self._ensure_boundaries(source[dim], bounds[1:-1], name)
        pieces = _slice_layout(layout, bounds)
        if pieces is None:
            self.block(self.atoms_in([layout]), f"{name} cuts through a coupled block")
            raise _NoRule(f"{name} cuts through a coupled block")
        self.rewrites[node.name] = "split"
        outs = []
        for piece in pieces:
            out = [self.resolve(la) for la in source]
            out[dim] = piece
            outs.append(out)
        return outs

    def _slice(self, node: fx.Node, name: str) -> list[Layout]:
        source = self._need(node.args[0], name)
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(source)
        shape = self._shape(node)
        start = node.args[2] if len(node.args) > 2 else None
        step = node.args[4] if len(node.args) > 4 else 1
        total = sum(s.length for s in source[dim])
        if not self.atoms_in([source[dim]]):
            return [self.resolve(la) if d != dim else self.fixed(shape[d]) for d, la in enumerate(source)]
        if step != 1 or not _is_int(total) or (start is not None and not _is_int(start)):
            self.block(self.atoms_in([source[dim]]), f"{name} with step {step} or dynamic bounds")
            raise _NoRule(f"{name}: strided slice")
        begin = 0 if start is None else (start + total if start < 0 else min(start, total))
        end = begin + int(shape[dim])
        layout = self._ensure_boundaries(source[dim], [begin, end], name)
        pieces = _slice_layout(layout, [0, begin, end, total])
        if pieces is None:
            self.block(self.atoms_in([layout]), f"{name} cuts through a coupled block")
            raise _NoRule(f"{name} cuts through a coupled block")
        self.virtual[(node.name, "before")] = pieces[0]
        self.rewrites[node.name] = "slice"
        out = [self.resolve(la) for la in source]
        out[dim] = pieces[1]
        return out

    def _indexing(self, node: fx.Node, name: str) -> Any:
        source = self._need(node.args[0], name)
        target = node.target
        if target is aten.index.Tensor:
            indices = node.args[1]
            indexed = [d for d, idx in enumerate(indices) if idx is not None]
            if len(indexed) == len(source) or not indexed:
                raise _NoRule(f"{name} has no pruning rule here")
            self.block(self.atoms_in([source[d] for d in indexed]), f"{name} picks entries of it")
            raise _NoRule(f"{name} with tensor indices has no pruning rule")
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(source)
        self.block(self.atoms_in([source[dim]]), f"{name} picks entries of it")
        shape = self._shape(node)
        if target is aten.unbind.int:
            rest = [self.resolve(la) for d, la in enumerate(source) if d != dim]
            vals = node.meta.get("val") or []
            return [rest for _ in vals]
        if target is aten.select.int:
            return [self.resolve(la) for d, la in enumerate(source) if d != dim]
        if shape is None:
            raise _NoRule(f"{name}: unknown output")
        return [self.resolve(la) if d != dim else self.fixed(shape[d]) for d, la in enumerate(source)]

    # ------------------------------------------------------------------ results

    def _build_nx(self) -> None:
        for name, layouts in self.layouts.items():
            if not layouts:
                continue
            flat = [layouts] if isinstance(layouts[0], tuple) else [la for la in layouts if la is not None]
            for index, group in enumerate(flat):
                for dim, layout in enumerate(group):
                    slot = (name, dim) if len(flat) == 1 else (f"{name}[{index}]", dim)
                    self.graph.add_node(slot)
                    for seg in self.resolve(layout):
                        if seg.atom is not None:
                            self.graph.add_edge(slot, ("atom", seg.atom))
        for atom in self.atoms:
            if atom.pieces is not None:
                for piece in atom.pieces:
                    self.graph.add_edge(("atom", atom.id), ("atom", piece), why="cut")
        # atoms of one group are coupled even where no single op tied them directly
        for group in self.live_groups():
            for a, b in zip(group.atoms, group.atoms[1:], strict=False):
                if not self.graph.has_edge(("atom", a), ("atom", b)):
                    self.graph.add_edge(("atom", a), ("atom", b), why="same group")

    def live_groups(self) -> list[Group]:
        """Every group that was neither merged into another nor cut."""
        return [g for g in self.groups if g.parent is None and not g.dead and g.atoms]

    def weight_atoms(self, group: Group) -> list[Atom]:
        """The group's atoms in layer weights (convs, linears, matmuls, embeddings): importance is measured on them."""
        return [self.atoms[a] for a in group.atoms if self.atoms[a].target in self.layer_weights]

    def prunable_groups(self) -> list[Group]:
        """Groups that may shrink: not blocked, at least 2 units, and holding a weight."""
        return [g for g in self.live_groups() if not g.blocked and g.units >= 2 and self.weight_atoms(g)]

    def blocked_groups(self) -> list[Group]:
        """Groups holding a weight that must keep their size (``reasons`` says why)."""
        return [g for g in self.live_groups() if g.reasons and self.weight_atoms(g)]

    def constant(self, target: str) -> torch.Tensor:
        """The constant tensor stored under ``target``."""
        return self._constants[target]

    def slot_groups(self, node_name: str, dim: int) -> list[Group]:
        """The groups a node's output dim is made of (empty when it is fixed)."""
        layouts = self.layouts[node_name]
        return [self.group_of(s.atom) for s in self.resolve(layouts[dim]) if s.atom is not None]

    def coupled_slots(self, node_name: str, dim: int) -> set[tuple[str, int]]:
        """Every (node, dim) that holds any part of the groups behind ``(node_name, dim)``."""
        wanted = {g.id for g in self.slot_groups(node_name, dim)}
        out = set()
        for name, layouts in self.layouts.items():
            if not layouts or not isinstance(layouts[0], tuple):
                continue
            for d, layout in enumerate(layouts):
                if any(s.atom is not None and self.group_of(s.atom).id in wanted for s in self.resolve(layout)):
                    out.add((name, d))
        return out

    def weight_groups(self, target: str, dim: int) -> list[Group]:
        """The groups that dim ``dim`` of the constant stored under ``target`` is made of."""
        layouts = self._target_layouts[target]
        return [self.group_of(s.atom) for s in self.resolve(layouts[dim]) if s.atom is not None]

    def coupled_weights(self, target: str, dim: int) -> set[tuple[str, int]]:
        """Every (constant, dim) that shrinks together with some part of ``target``'s dim ``dim``."""
        wanted = {g.id for g in self.weight_groups(target, dim)}
        return {(self.atoms[a].target, self.atoms[a].dim) for g in self.live_groups() if g.id in wanted
                for a in g.atoms}

    def layer_node(self, target: str) -> fx.Node | None:
        """The layer node (conv, linear, matmul, embedding) that reads weight ``target``."""
        name = self.layer_weights.get(target)
        if name is None:
            return None
        if not hasattr(self, "_nodes_by_name"):
            self._nodes_by_name = {n.name: n for n in self.gm.graph.nodes}
        return self._nodes_by_name.get(name)

    def describe_group(self, group: Group) -> str:
        """A short label: the weights whose out-dim (dim 0 of a conv/linear weight) the group holds."""
        names = sorted({f"{self.atoms[a].target}[{self.atoms[a].dim}]" for a in group.atoms})
        return ", ".join(names[:4]) + (f" (+{len(names) - 4})" if len(names) > 4 else "")


def layer_label(node: fx.Node) -> str:
    """The user's module path of a node (``layer1.0.conv1``), from export's module stack; else the node name."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return str(path)
    return node.name


class _NoRule(Exception):
    """An op the dependency analysis cannot map (its inputs' groups are blocked)."""


def _dim(size: Any) -> Any:
    if isinstance(size, torch.SymInt):
        concrete = size.node.maybe_as_int()
        return concrete if concrete is not None else size.node.expr
    return int(size)


def _whole(value: Any) -> Any:
    if isinstance(value, Fraction) and value.denominator == 1:
        return int(value)
    return value


def _flat_nodes(value: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: out.append(n) or n)
    return out


def _prefix_sums(lengths: Iterable[Any]) -> list[Any]:
    total: Any = 0
    out = [0]
    for length in lengths:
        total = total + length
        out.append(total)
    return out


def _slice_layout(layout: Layout, bounds: list[int]) -> list[Layout] | None:
    """Cut ``layout`` (whose segment boundaries include ``bounds``) into the ranges between bounds."""
    pieces: list[list[Segment]] = [[] for _ in bounds[:-1]]
    start = 0
    for seg in layout:
        end = start + seg.length
        index = next((i for i in range(len(bounds) - 1) if bounds[i] <= start and end <= bounds[i + 1]), None)
        if index is None:
            if seg.atom is not None:
                return None
            # a fixed range across bounds: cut it
            for i in range(len(bounds) - 1):
                lo, hi = max(start, bounds[i]), min(end, bounds[i + 1])
                if lo < hi:
                    pieces[i].append(Segment(None, Fraction(1), hi - lo))
        elif seg.length:
            pieces[index].append(seg)
        start = end
    return [tuple(p) if p else (Segment(None, Fraction(1), 0),) for p in pieces]


def _reshape_groups(in_shape: list[Any], out_shape: list[Any]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input dims with runs of output dims of equal product (size-1 dims left out)."""
    ins = [i for i, s in enumerate(in_shape) if s != 1]
    outs = [o for o, s in enumerate(out_shape) if s != 1]
    groups = []
    i = o = 0
    while i < len(ins) and o < len(outs):
        gi, go = [ins[i]], [outs[o]]
        pi, po = in_shape[ins[i]], out_shape[outs[o]]
        i += 1
        o += 1
        while pi != po:
            try:
                grow_in = bool(pi < po)
            except TypeError:
                return None
            if grow_in:
                if i >= len(ins):
                    return None
                gi.append(ins[i])
                pi = pi * in_shape[ins[i]]
                i += 1
            else:
                if o >= len(outs):
                    return None
                go.append(outs[o])
                po = po * out_shape[outs[o]]
                o += 1
        groups.append((gi, go))
    if i != len(ins) or o != len(outs):
        return None
    return groups
