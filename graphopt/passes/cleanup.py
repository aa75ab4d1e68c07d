"""Clean-up passes: dead code, common subexpressions, dropout and identity ops."""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir import (
    MAYBE_ALIASING_OPS,
    draws_random_numbers,
    is_aten,
    is_mutating,
    node_dtype,
    node_shape,
    prune_unused_attributes,
)
from graphopt.pass_infra import Pass, PassResult, register_pass

aten = torch.ops.aten

__all__ = ["CommonSubexpressionElimination", "DeadCodeElimination", "RemoveDropout", "RemoveIdentity"]


def is_pure(node: fx.Node) -> bool:
    """True when ``node`` may be removed or merged: no side effects, no mutation, no randomness."""
    if node.op != "call_function" or node.is_impure():
        return False
    return not is_mutating(node) and not draws_random_numbers(node)


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove nodes whose results nobody uses, and the weights no node reads any more."""

    name = "dce"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Erase unused pure nodes (last to first), then unused attributes."""
        removed = 0
        for node in reversed(list(gm.graph.nodes)):
            if not node.users and is_pure(node):
                gm.graph.erase_node(node)
                removed += 1
        attributes = prune_unused_attributes(gm)
        return PassResult(changed=bool(removed or attributes), stats={"nodes": removed, "weights": attributes})


def _key(node: fx.Node, canonical: dict[fx.Node, fx.Node]) -> Any:
    def freeze(value: Any) -> Any:
        if isinstance(value, fx.Node):
            return ("node", canonical.get(value, value))
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(freeze(v) for v in value))
        if isinstance(value, dict):
            return ("dict", tuple(sorted((k, freeze(v)) for k, v in value.items())))
        if isinstance(value, torch.Tensor):
            return ("tensor", id(value))
        return (type(value).__name__, value)

    return (node.op, node.target, freeze(node.args), freeze(node.kwargs))


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Merge nodes that compute the same pure op on the same inputs (and duplicate weight reads)."""

    name = "cse"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Keep the first of each set of identical nodes and point users of the rest at it."""
        seen: dict[Any, fx.Node] = {}
        canonical: dict[fx.Node, fx.Node] = {}
        merged, kept_apart = 0, 0
        for node in list(gm.graph.nodes):
            if node.op != "get_attr" and not is_pure(node):
                continue
            try:
                key = _key(node, canonical)
                hash(key)
            except TypeError:
                continue
            first = seen.setdefault(key, node)
            if first is node:
                continue
            if _is_returned(node) and _is_returned(first) and node.op != "get_attr":
                kept_apart += 1  # eager returns two tensors: merged, writing into one would change the other
                continue
            node.replace_all_uses_with(first)
            canonical[node] = first
            gm.graph.erase_node(node)
            merged += 1
        misses = {self.name: {"both results are returned as separate outputs": kept_apart}} if kept_apart else {}
        return PassResult(changed=merged > 0, stats={"merged": merged}, near_misses=misses)


def _is_returned(node: fx.Node) -> bool:
    return any(user.op == "output" for user in node.users)


_DROPOUTS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default)


@register_pass
@dataclass(frozen=True)
class RemoveDropout(Pass):
    """Drop inference-mode dropout: with ``train=False`` it returns its input unchanged."""

    name = "remove-dropout"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Replace every non-training dropout by its input."""
        removed = 0
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in _DROPOUTS:
                training = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
                if training is False:
                    node.replace_all_uses_with(node.args[0])
                    gm.graph.erase_node(node)
                    removed += 1
        return PassResult(changed=removed > 0, stats={"removed": removed})


# --- identity removal -------------------------------------------------------------------------
#
# An identity op is either an *alias* of its input (``alias``, ``detach``, a same-shape view, a
# no-op ``to``), which may always go, or a *copy* with the same values (``contiguous``, ``clone``,
# ``lift_fresh_copy``, a same-dtype/device ``_to_copy``, ``x * 1``, ``x + 0``...). A copy is a new
# tensor, often with another layout than its input, so it may only go where nothing depends on
# that: see ``_CopyAnalysis``.


def _ops(*names: str) -> frozenset[Any]:
    return frozenset(getattr(aten, name) for name in names)


_ALIAS_IDENTITY = (aten.alias.default, aten.detach.default)
_SAME_SHAPE_VIEWS = (aten.view.default, aten.reshape.default, aten.expand.default, aten._unsafe_view.default)
_SCALAR_IDENTITY = {
    aten.mul.Tensor: 1, aten.mul.Scalar: 1, aten.div.Tensor: 1, aten.div.Scalar: 1,
    aten.add.Tensor: 0, aten.add.Scalar: 0, aten.sub.Tensor: 0, aten.sub.Scalar: 0,
}
_TO = (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other)
_SAME_VALUE_FORMATS = (None, torch.contiguous_format, torch.preserve_format)

# Views valid on an input of any strides (they only re-index the input's strides).
_LAYOUT_FREE_VIEWS = _ops(
    "alias", "detach", "transpose", "t", "permute", "expand", "expand_as", "broadcast_to", "slice", "select",
    "narrow", "squeeze", "unsqueeze", "split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes",
    "chunk", "unsafe_chunk", "tensor_split", "hsplit", "vsplit", "dsplit", "unbind", "unfold", "diagonal",
    "movedim", "moveaxis", "swapaxes", "swapdims", "reshape", "reshape_as", "flatten", "unflatten", "ravel",
    "view_as_real", "real", "imag", "conj", "_conj", "_neg_view", "resolve_conj", "resolve_neg", "positive",
    "contiguous", "to", "lift_fresh", "type_as", "numpy_T", "mT", "mH", "matrix_H", "adjoint", "dropout",
    "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "atleast_1d", "atleast_2d", "atleast_3d",
)
# Views that need a viewable input, and the op with the same result that copies when it must.
_REWRITABLE_VIEWS = {
    aten.view.default: aten.reshape.default,
    aten._unsafe_view.default: aten.reshape.default,
    aten.view_as.default: aten.reshape_as.default,
}
# Ops whose result depends on the input's strides or storage, not just its values.
_STRIDED = _ops(
    "as_strided", "as_strided_", "as_strided_scatter", "as_strided_copy", "_reshape_alias", "_reshape_alias_copy",
    "set_", "resize_", "resize_as_",
)
_STRIDE_QUERIES = _ops(
    "sym_stride", "stride", "is_contiguous", "is_non_overlapping_and_dense", "is_strides_like_format",
    "sym_storage_offset", "storage_offset",
)
# Ops whose output strides follow from shapes alone (checked: contiguous, transposed, channels-last
# and expanded inputs give the same output strides), so a changed input layout stops there.
_FRESH_LAYOUT = _ops(
    "mm", "bmm", "addmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "linear", "matmul", "embedding",
    "layer_norm", "native_layer_norm",
)


def _schema_args(node: fx.Node) -> Iterator[tuple[Any, Any]]:
    """(schema argument, value) for each argument given to an ``OpOverload`` call."""
    for index, argument in enumerate(node.target._schema.arguments):
        if not argument.kwarg_only and index < len(node.args):
            yield argument, node.args[index]
        elif argument.name in node.kwargs:
            yield argument, node.kwargs[argument.name]


def _argument(node: fx.Node, name: str, default: Any = None) -> Any:
    """The value of argument ``name`` of an ``OpOverload`` call, or ``default`` when it is not given."""
    for argument, value in _schema_args(node):
        if argument.name == name:
            return value
    return default


def _nodes_in(value: Any) -> list[fx.Node]:
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _nodes_in(v)]
    return []


def _aliased_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose storage ``node``'s result may share (it is a view of them, or may return them)."""
    if node.op != "call_function":
        return []
    if node.target is operator.getitem:
        return _nodes_in(node.args[0])
    if getattr(node.target, "overloadpacket", None) in MAYBE_ALIASING_OPS:
        return _nodes_in(node.args[:1])
    if not isinstance(node.target, torch._ops.OpOverload):
        return []
    if all(r.alias_info is None for r in node.target._schema.returns):
        return []
    return [n for argument, value in _schema_args(node) if argument.alias_info is not None for n in _nodes_in(value)]


def _written_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs ``node`` writes in place."""
    if not is_mutating(node):
        return []
    return [
        n
        for argument, value in _schema_args(node)
        if argument.alias_info is not None and argument.alias_info.is_write
        for n in _nodes_in(value)
    ]


def _alias_closure(start: fx.Node) -> set[fx.Node]:
    """``start`` and every node whose result may share its storage, through chains of views."""
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in seen and node in _aliased_inputs(user):
                seen.add(user)
                stack.append(user)
    return seen


def _produces_tensors(node: fx.Node) -> bool:
    """False only when ``node`` is known to return something other than tensors (a size, None...)."""
    if "val" not in node.meta and "tensor_meta" not in node.meta:
        return True
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.Tensor) for v in value)
    return isinstance(value, torch.Tensor) or "tensor_meta" in node.meta


def _device(node: fx.Node) -> torch.device | None:
    value = node.meta.get("val")
    return value.device if isinstance(value, torch.Tensor) else None


def _same_device(node: fx.Node, source: fx.Node, requested: Any) -> bool:
    mine, theirs = _device(node), _device(source)
    if mine is not None and theirs is not None:
        return mine == theirs
    return requested is None


def _copy_kind(memory_format: Any) -> str:
    return "copy" if memory_format in _SAME_VALUE_FORMATS else "format"


def _identity(node: fx.Node) -> tuple[str, fx.Node] | None:
    """How ``node`` passes its input through: ``(kind, input)``, or None when it does real work.

    ``kind`` is ``"alias"`` (returns its input or a same-layout view of it: always removable),
    ``"copy"`` (a new tensor with the same values: removable where nothing needs the copy) or
    ``"format"`` (the same values copied into another memory format: kept, on purpose).
    """
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source, target = node.args[0], node.target
    shape, dtype = node_shape(node), node_dtype(node)
    if shape is None or dtype is None or shape != node_shape(source) or dtype != node_dtype(source):
        return None
    if target in _ALIAS_IDENTITY or target in _SAME_SHAPE_VIEWS:
        return "alias", source
    if target is aten.type_as.default:
        return ("alias", source) if _same_device(node, source, None) else None
    if target is aten.lift_fresh_copy.default:
        return "copy", source
    if target in (aten.contiguous.default, aten.clone.default):
        return _copy_kind(_argument(node, "memory_format")), source
    if target is aten._to_copy.default or target in _TO:
        layout, pinned = _argument(node, "layout"), _argument(node, "pin_memory")
        if layout not in (None, torch.strided) or pinned or not _same_device(node, source, _argument(node, "device")):
            return None
        memory_format = _argument(node, "memory_format")
        if target in _TO and not _argument(node, "copy", False) and memory_format is None:
            return "alias", source  # Tensor.to returns self when nothing changes
        return _copy_kind(memory_format), source
    if target in _SCALAR_IDENTITY and len(node.args) == 2:
        other = node.args[1]
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == _SCALAR_IDENTITY[target]:
            if node.kwargs.get("alpha", 1) == 1:
                return "copy", source
    return None


_EXPLICIT_STRIDES = _STRIDED | _ops("empty_strided", "new_empty_strided")


def _private_result(copy: fx.Node, source: fx.Node) -> bool:
    """True when a returned ``copy`` is indistinguishable from ``source`` itself.

    That is when ``source`` is a fresh result of an aten op that only ``copy`` reads (so no input,
    weight or other output can share its storage) and ``copy`` keeps the source's strides (a
    preserve-format copy of a fresh, hence dense, tensor), as the ``clone`` that functionalization
    makes of an inference dropout before the output.
    """
    if copy.target in (aten.contiguous.default, aten.lift_fresh_copy.default):
        return False
    if _argument(copy, "memory_format") not in (None, torch.preserve_format):
        return False
    if len(source.users) != 1:
        return False
    producer = source.args[0] if source.op == "call_function" and source.target is operator.getitem else source
    if not isinstance(producer, fx.Node) or not is_aten(producer) or is_mutating(producer):
        return False
    return not _aliased_inputs(producer) and producer.target.overloadpacket not in _EXPLICIT_STRIDES


class _CopyAnalysis:
    """Decides whether a copy may be replaced by its input, and which views must become reshapes.

    Dropping a copy ``c = copy(s)`` merges two tensors: ``c``'s users see ``s`` itself, with
    ``s``'s storage and strides. That is only safe when

    - nothing observes ``c``'s identity: no graph output is ``c`` or a view of it (an output must
      not alias an input or another output), and no op writes ``c`` or a view of it in place;
    - ``s`` is not written in place while ``c`` (or a view of it) is still read;
    - nothing depends on ``c``'s layout. The layout flows from ``c`` through views and through
      ops whose output strides follow their input's (elementwise ops, convolutions...) until an
      op that allocates by shape alone (``linear``, ``matmul``, ``layer_norm``...). On that path
      ``view``/``_unsafe_view``/``view_as`` are rewritten to ``reshape``/``reshape_as`` (the same
      result, copying only when a view is impossible); ``as_strided`` and the like, stride
      queries, views that cannot be rewritten, and ops outside ``aten`` (custom kernels may need
      contiguous inputs) keep the copy.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.order = {node: index for index, node in enumerate(gm.graph.nodes)}
        self.mutating = [node for node in gm.graph.nodes if is_mutating(node)]
        self._write_aliases: set[fx.Node] | None = None

    def graph_changed(self) -> None:
        """Forget what was derived from the graph's alias structure (call after each edit)."""
        self._write_aliases = None

    def write_aliases(self) -> set[fx.Node]:
        """Every node that may share storage with a tensor some op writes in place."""
        if self._write_aliases is None:
            written = {n for node in self.mutating for n in _written_inputs(node)}
            self._write_aliases = set().union(*(self._family(n) for n in written))
        return self._write_aliases

    def _family(self, node: fx.Node) -> set[fx.Node]:
        """Every node that may share storage with ``node``: its bases and all their views."""
        roots, stack, seen = set(), [node], {node}
        while stack:
            current = stack.pop()
            bases = _aliased_inputs(current)
            if not bases:
                roots.add(current)
            for base in bases:
                if base not in seen:
                    seen.add(base)
                    stack.append(base)
        return set().union(*(_alias_closure(root) for root in roots))

    def why_keep(self, copy: fx.Node, source: fx.Node) -> tuple[str | None, list[fx.Node]]:
        """The reason ``copy`` must stay, or None and the view nodes to rewrite when it goes."""
        closure = _alias_closure(copy)
        readers, returned = set(closure), False
        for node in closure:
            for user in node.users:
                if is_mutating(user):
                    return "copy feeds a mutating op", []
                returned |= user.op == "output"
                readers.add(user)
        if returned and not _private_result(copy, source):
            return "copy feeds the graph output", []
        if self.mutating:
            last_read = max(self.order[r] for r in readers)
            family = self._family(source)
            for node in self.mutating:
                if self.order[copy] < self.order[node] <= last_read and family.intersection(_written_inputs(node)):
                    return "copy's input is written in place while the copy is in use", []
        return self._layout_users(copy)

    def _layout_users(self, copy: fx.Node) -> tuple[str | None, list[fx.Node]]:
        rewrites: list[fx.Node] = []
        seen, stack = {copy}, [copy]
        while stack:
            node = stack.pop()
            for user in node.users:
                if user in seen or user.op == "output":
                    continue  # an output reached through computation: same values, fresh tensor
                reason = self._layout_reason(user, rewrites)
                if reason is not None:
                    return reason, []
                seen.add(user)
                fresh = is_aten(user) and user.target.overloadpacket in _FRESH_LAYOUT
                if not fresh and _produces_tensors(user):
                    stack.append(user)
        return None, rewrites

    def _layout_reason(self, user: fx.Node, rewrites: list[fx.Node]) -> str | None:
        """Why ``user`` cannot take an input with another layout (None: it can, maybe once rewritten)."""
        if user.op == "call_function" and user.target is operator.getitem:
            return None
        if not is_aten(user):
            return "copy feeds a non-aten op"
        target = user.target
        packet = target.overloadpacket
        if packet in _STRIDED:
            return "copy feeds as_strided"
        if packet in _STRIDE_QUERIES or (target is aten._assert_tensor_metadata.default
                                         and _argument(user, "stride") is not None):
            return "copy feeds an op that reads strides"
        if target in _REWRITABLE_VIEWS:
            if self.mutating and user in self.write_aliases():
                return "copy feeds a view that is written in place"
            rewrites.append(user)
            return None
        if target is aten.view.dtype:
            source_dtype = node_dtype(user.args[0])
            if source_dtype is None or source_dtype.itemsize != user.args[1].itemsize:
                return "copy feeds a view that cannot become reshape"
            return None
        if is_mutating(user):
            return None  # in-place ops accept any strides
        if _aliased_inputs(user) and packet not in _LAYOUT_FREE_VIEWS:
            return "copy feeds a view that cannot become reshape"
        return None


@register_pass
@dataclass(frozen=True)
class RemoveIdentity(Pass):
    """Remove ops that return their input unchanged: no-op reshapes and casts, copies, ``x * 1``, ``x + 0``...

    Aliases of the input (``alias``, ``detach``, same-shape view/reshape/expand, a ``to`` that
    changes nothing) always go. Copies (``contiguous``, ``clone``, ``lift_fresh_copy``,
    same-dtype/device ``_to_copy``/``to(copy=True)``, ``x * 1``, ``x + 0``...) go only where no
    consumer depends on their layout or identity; ``view`` consumers are rewritten to
    ``reshape``. A kept copy is a near-miss with its reason (see ``_CopyAnalysis``).

    Export's ``_assert_tensor_metadata`` checks go too: every node's dtype is fixed at capture.
    """

    name = "remove-identity"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Replace each identity op by its input, rewriting the views that need it."""
        analysis = _CopyAnalysis(gm)
        removed = copies = rewritten = 0
        kept: Counter[str] = Counter()
        for node in list(gm.graph.nodes):
            if node.target is aten._assert_tensor_metadata.default and not node.users:
                gm.graph.erase_node(node)  # export's dtype check: the captured graph is typed already
                removed += 1
                continue
            found = _identity(node)
            if found is None:
                continue
            kind, source = found
            if kind == "format":
                kept["copy changes the memory format"] += 1
                continue
            if kind == "copy":
                reason, views = analysis.why_keep(node, source)
                if reason is not None:
                    kept[reason] += 1
                    continue
                for view in views:
                    view.target = _REWRITABLE_VIEWS[view.target]  # same node: name and meta are kept
                rewritten += len(views)
                copies += 1
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            analysis.graph_changed()
            removed += 1
        return PassResult(
            changed=bool(removed or rewritten),
            stats={"removed": removed, "copies_removed": copies, "views_rewritten": rewritten},
            near_misses={self.name: dict(kept)} if kept else {},
        )
