"""Which values of an fx graph may share storage, and when a copy may be replaced by its input.

Shared by the passes that drop copies (``remove-identity``) or reshape values into fused ones
(``fuse-horizontal``): both must know which nodes alias which, which ops write in place, and
which consumers depend on a tensor's layout rather than its values.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import is_aten, is_mutating, node_dtype
from graphopt.ir.op_args import given_argument
from graphopt.ir.ops import MAYBE_ALIASING_OPS

aten = torch.ops.aten

__all__ = ["REWRITABLE_VIEWS", "CopyAnalysis", "alias_closure", "aliased_inputs"]


def _ops(*names: str) -> frozenset[Any]:
    return frozenset(getattr(aten, name) for name in names)


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
REWRITABLE_VIEWS = {
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
    for index, schema_arg in enumerate(node.target._schema.arguments):
        if not schema_arg.kwarg_only and index < len(node.args):
            yield schema_arg, node.args[index]
        elif schema_arg.name in node.kwargs:
            yield schema_arg, node.kwargs[schema_arg.name]


def _nodes_in(value: Any) -> list[fx.Node]:
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _nodes_in(v)]
    return []


def aliased_inputs(node: fx.Node) -> list[fx.Node]:
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
    return [n for arg, value in _schema_args(node) if arg.alias_info is not None for n in _nodes_in(value)]


def _written_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs ``node`` writes in place."""
    if not is_mutating(node):
        return []
    return [
        n
        for schema_arg, value in _schema_args(node)
        if schema_arg.alias_info is not None and schema_arg.alias_info.is_write
        for n in _nodes_in(value)
    ]


def alias_closure(start: fx.Node) -> set[fx.Node]:
    """``start`` and every node whose result may share its storage, through chains of views."""
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user not in seen and node in aliased_inputs(user):
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
    if given_argument(copy, "memory_format") not in (None, torch.preserve_format):
        return False
    if len(source.users) != 1:
        return False
    producer = source.args[0] if source.op == "call_function" and source.target is operator.getitem else source
    if not isinstance(producer, fx.Node) or not is_aten(producer) or is_mutating(producer):
        return False
    return not aliased_inputs(producer) and producer.target.overloadpacket not in _EXPLICIT_STRIDES


class CopyAnalysis:
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
            bases = aliased_inputs(current)
            if not bases:
                roots.add(current)
            for base in bases:
                if base not in seen:
                    seen.add(base)
                    stack.append(base)
        return set().union(*(alias_closure(root) for root in roots))

    def why_keep(self, copy: fx.Node, source: fx.Node) -> tuple[str | None, list[fx.Node]]:
        """The reason ``copy`` must stay, or None and the view nodes to rewrite when it goes."""
        closure = alias_closure(copy)
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
                                         and given_argument(user, "stride") is not None):
            return "copy feeds an op that reads strides"
        if target in REWRITABLE_VIEWS:
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
        if aliased_inputs(user) and packet not in _LAYOUT_FREE_VIEWS:
            return "copy feeds a view that cannot become reshape"
        return None
