"""Helpers over the IR: a ``torch.fx.GraphModule`` of ATen ops with shape/dtype meta on each node.

torch.fx is the IR. These helpers only add the few queries and edits that passes keep needing:
reading constants, registering new ones, dropping unused ones, and recording shapes.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from graphopt.errors import StateError

__all__ = [
    "fill_output_nodes",
    "FUSED_FROM",
    "STATE_UPDATE",
    "annotate_tensor_meta",
    "attribute_value",
    "clone_graph_module",
    "constant_uses",
    "count_ops",
    "draws_random_numbers",
    "has_attribute",
    "inherit_module_paths",
    "module_paths",
    "is_aten",
    "is_mutating",
    "iter_ops",
    "module_path",
    "node_dtype",
    "node_shape",
    "op_name",
    "parameter_bytes",
    "preserved_state",
    "prune_unused_attributes",
    "read_constant",
    "register_constant",
    "run_and_record",
    "same_shape",
    "shared_by_copies",
    "snapshot_graph_module",
    "state_update_nodes",
    "tensor_versions",
    "torch_deprecations_silenced",
    "written_since",
]

STATE_UPDATE = "graphopt_state_update"
"""``node.meta`` key marking an ``aten.copy_`` that writes a buffer (or input) the user can see."""

FUSED_FROM = "graphopt_fused_from"
"""``node.meta`` key: the module paths of the layers a fusion merged into this node."""


def module_paths(node: fx.Node) -> list[str]:
    """Every module path ``node`` runs inside, outermost first (``encoder``, ``encoder.layer.0``, ...)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [str(entry[0]).removeprefix("L['self'].").replace("L__self___", "") for entry in stack.values()]


def module_path(node: fx.Node) -> str:
    """The user's module path of ``node`` (e.g. ``encoder.layer.0.attention.self.query``), or ''."""
    paths = module_paths(node)
    return paths[-1] if paths else ""


def inherit_module_paths(new: fx.Node, merged: list[fx.Node]) -> None:
    """Give ``new``, made of the ``merged`` nodes, their common module scope and a record of each one's path.

    A fused Q/K/V projection lives in the attention module that held the three linears, and
    remembers the three (``FUSED_FROM``), so asking for one of them by path still finds it.
    """
    stacks = [list(node.meta.get("nn_module_stack", {}).items()) for node in merged]
    common = []
    for entries in zip(*stacks, strict=False):  # stacks of different depths share a prefix at most
        if any(entry != entries[0] for entry in entries):
            break
        common.append(entries[0])
    if common:
        new.meta["nn_module_stack"] = dict(common)
    paths = [path for node in merged for path in (module_path(node), *node.meta.get(FUSED_FROM, ())) if path]
    if paths:
        new.meta[FUSED_FROM] = list(dict.fromkeys(paths))


def op_name(target: Any) -> str:
    """A short readable name for a node target (``aten.conv2d.default``, ``getitem``, ...)."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", repr(target))


def iter_ops(gm: fx.GraphModule, *targets: Any) -> Iterator[fx.Node]:
    """Yield the ``call_function`` nodes whose target is one of ``targets`` (all when none given)."""
    wanted = set(targets)
    for node in gm.graph.nodes:
        if node.op == "call_function" and (not wanted or node.target in wanted):
            yield node


def count_ops(gm: fx.GraphModule) -> Counter[str]:
    """Count the graph's compute nodes by op name."""
    return Counter(op_name(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_module"))


def state_update_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The explicit writes of user-visible state (``copy_`` into a buffer or input) in ``gm``."""
    return [n for n in gm.graph.nodes if n.meta.get(STATE_UPDATE)]


def _is_state(node: fx.Node) -> bool:
    """True when ``node`` reads an attribute that some node of the graph writes (so not a constant)."""
    graph = node.graph
    return any(
        n.meta.get(STATE_UPDATE) and isinstance(n.args[0], fx.Node) and n.args[0].target == node.target
        for n in graph.find_nodes(op="call_function", target=torch.ops.aten.copy_.default)
    )


def attribute_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node, or None when ``node`` is not a constant.

    Buffers that the graph itself updates (explicit state writes) are not constants.
    """
    if not isinstance(node, fx.Node) or node.op != "get_attr" or _is_state(node):
        return None
    value = _resolve_attribute(gm, str(node.target))
    return value if isinstance(value, torch.Tensor) else None


def has_attribute(gm: fx.GraphModule, target: str) -> bool:
    """True when ``gm`` has the (dotted) attribute a ``get_attr`` node names: a tensor, a submodule, anything."""
    return _resolve_attribute(gm, target) is not None


def register_constant(gm: fx.GraphModule, base_name: str, value: torch.Tensor, before: fx.Node,
                      keep_layout: bool = False) -> fx.Node:
    """Store ``value`` as a new buffer on ``gm`` and insert a ``get_attr`` node for it before ``before``.

    The buffer is made contiguous unless ``keep_layout`` (a channels-last weight, say).
    """
    stem = "".join(c if c.isalnum() else "_" for c in base_name) or "const"
    name, index = f"_go_{stem}", 0
    while hasattr(gm, name):
        index += 1
        name = f"_go_{stem}_{index}"
    gm.register_buffer(name, value.detach() if keep_layout else value.detach().contiguous())
    return read_constant(gm, name, before)


def read_constant(gm: fx.GraphModule, name: str, before: fx.Node) -> fx.Node:
    """A ``get_attr`` node for ``gm``'s tensor attribute ``name``, with its metadata, inserted before ``before``."""
    value = getattr(gm, name)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["tensor_meta"] = _extract_tensor_metadata(value)
    node.meta["val"] = value
    return node


def constant_uses(gm: fx.GraphModule) -> dict[str, int]:
    """How many ops read each constant (``get_attr`` target), over every ``get_attr`` node of it."""
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            uses[str(node.target)] = uses.get(str(node.target), 0) + len(node.users)
    return uses


def prune_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete ``get_attr`` nodes without users and the parameters/buffers no node reads any more.

    Returns the number of attributes deleted from the module.
    """
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    used_modules = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    removed = 0
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, _ in named:
        if name in used or any(name.startswith(m + ".") for m in used_modules):
            continue
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if leaf in owner._parameters:
            del owner._parameters[leaf]
            removed += 1
        elif leaf in owner._buffers:
            del owner._buffers[leaf]
            removed += 1
    gm.delete_all_unused_submodules()
    return removed


def fill_output_nodes(template: Any, values: Sequence[Any]) -> Any:
    """An output structure (e.g. an ``output`` node's argument) with its ``fx.Node`` leaves replaced by ``values``.

    ``values`` are taken in order, one per node leaf; constant leaves (``None``, numbers) stay.
    """
    leaves, spec = pytree.tree_flatten(template)
    remaining = iter(values)
    return pytree.tree_unflatten([next(remaining) if isinstance(leaf, fx.Node) else leaf for leaf in leaves], spec)


def snapshot_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm``'s structure (graph, submodules, meta) that shares its weight tensors.

    Cheap enough to take before every pass: no weight is copied. Passes must therefore never
    write into an existing weight; they register a new tensor (``register_constant``) instead,
    and the pass manager checks that they did.
    """
    with torch_deprecations_silenced():
        return copy.deepcopy(gm, shared_by_copies(gm))


def shared_by_copies(gm: fx.GraphModule) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo under which a copy of ``gm`` shares its weights and its nodes' meta values."""
    memo: dict[int, Any] = {}
    for _, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        memo[id(tensor)] = tensor
    for node in gm.graph.nodes:
        for value in node.meta.values():
            memo[id(value)] = value  # meta values are facts about a node: shared, the dicts are copied
    return memo


@contextlib.contextmanager
def torch_deprecations_silenced() -> Iterator[None]:
    """Ignore FutureWarnings for the duration.

    They are torch's own pytree deprecation chatter when it copies graph modules, exported
    programs and their specs: nothing the user can act on.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of ``gm`` (weights included), without torch's pytree deprecation chatter."""
    with torch_deprecations_silenced():
        return copy.deepcopy(gm)


def parameter_bytes(gm: torch.nn.Module) -> int:
    """Bytes held by the module's parameters and buffers (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(gm.parameters()) + list(gm.buffers()):
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


Dimension = Any
"""A dim of a recorded shape: an ``int``, or a sympy expression for a dynamic dim (``s0``, ``2*s0``)."""


def _dimension(size: Any) -> Dimension:
    if isinstance(size, torch.SymInt):
        concrete = size.node.maybe_as_int()
        return concrete if concrete is not None else size.node.expr
    return int(size)


def node_shape(node: fx.Node) -> tuple[Dimension, ...] | None:
    """The output shape of ``node``, or None when it is not a single tensor.

    Dims that are dynamic (captured with ``dynamic_shapes``) are sympy expressions, so two
    shapes compare equal only when they are equal for every size the dims may take.
    """
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(_dimension(d) for d in val.shape)
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return tuple(int(d) for d in meta.shape)
    return None


def same_shape(a: fx.Node, b: fx.Node) -> bool:
    """True when ``a`` and ``b`` are known to have the same shape (for every dynamic size)."""
    shape = node_shape(a)
    return shape is not None and shape == node_shape(b)


def node_dtype(node: fx.Node) -> torch.dtype | None:
    """The recorded output dtype of ``node``, or None when it is not a single tensor."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return meta.dtype
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype
    return None


class _Recorder(fx.Interpreter):
    """Runs a graph, writes shape/dtype meta on each node and optionally keeps every value."""

    def __init__(self, gm: fx.GraphModule, keep_values: bool) -> None:
        super().__init__(gm)
        self.keep_values = keep_values
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        else:
            n.meta.pop("tensor_meta", None)
        if self.keep_values and n.op != "output":
            self.values[n.name] = result
        return result


def is_mutating(node: fx.Node) -> bool:
    """True for a call to an op whose schema writes into one of its arguments (``add_``, ``copy_``...)."""
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


def is_aten(node: fx.Node) -> bool:
    """True for a call to an ``aten`` op overload."""
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"


def draws_random_numbers(node: fx.Node) -> bool:
    """True for a call to an op that samples random numbers (two runs differ)."""
    target = node.target
    return (
        node.op == "call_function"
        and isinstance(target, torch._ops.OpOverload)
        and torch.Tag.nondeterministic_seeded in target.tags
    )


def tensor_versions(gm: torch.nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Every stored tensor of ``gm`` (any module) by name, with its version counter (which in-place writes advance)."""
    versions = {}
    for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        try:
            versions[name] = (tensor, tensor._version)
        except RuntimeError:  # inference tensors keep no version counter
            continue
    return versions


def written_since(versions: dict[str, tuple[torch.Tensor, int]]) -> list[str]:
    """Names of the tensors in ``versions`` (from ``tensor_versions``) written in place since then."""
    return [name for name, (tensor, version) in versions.items() if tensor._version != version]


@contextlib.contextmanager
def preserved_state(gm: fx.GraphModule) -> Iterator[set[str]]:
    """Restore, on leaving, the buffers that ``gm`` updates on every call (yields their names).

    Checks that run an optimized model (verification, the final check) must not advance the
    state the user's next call starts from.
    """
    saved: dict[str, torch.Tensor] = {}
    for update in state_update_nodes(gm):
        destination = update.args[0]
        if destination.op == "get_attr":
            value = _resolve_attribute(gm, str(destination.target))
            if isinstance(value, torch.Tensor):
                saved[str(destination.target)] = value.detach().clone()
    try:
        yield set(saved)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                _resolve_attribute(gm, name).copy_(value.to(_resolve_attribute(gm, name).device))


def run_and_record(
    gm: fx.GraphModule, flat_inputs: tuple[Any, ...], keep_values: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Run ``gm`` on flat inputs; annotate every node with ``tensor_meta``.

    Returns the graph's flat output and, when ``keep_values``, every node's value by node name.
    The run leaves no trace: buffers and inputs that the graph updates on purpose are restored
    afterwards, and a run that writes into any other stored tensor (a weight, a folded
    constant) raises ``StateError`` naming it, since the next call would then compute
    something else.
    """
    inputs = list(flat_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for update in state_update_nodes(gm):
        destination = update.args[0]
        if destination.op == "placeholder" and destination in placeholders:
            index = placeholders.index(destination)
            if isinstance(inputs[index], torch.Tensor):
                inputs[index] = inputs[index].clone()  # the caller's example tensor stays as it is
    recorder = _Recorder(gm, keep_values)
    with preserved_state(gm) as updated:
        versions = {name: v for name, v in tensor_versions(gm).items() if name not in updated}
        with torch.no_grad():
            output = recorder.run(*inputs)
    written = written_since(versions)
    if written:
        raise StateError(
            f"running the graph wrote into stored tensor(s) {', '.join(written[:5])} in place, so every call "
            "would compute something different"
        )
    return output, recorder.values


def _resolve_attribute(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def annotate_tensor_meta(gm: fx.GraphModule, flat_inputs: tuple[Any, ...]) -> None:
    """Record shape and dtype on every node of ``gm`` by running it on ``flat_inputs``."""
    run_and_record(gm, flat_inputs)
