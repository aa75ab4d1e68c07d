"""Helpers over the IR: a ``torch.fx.GraphModule`` of ATen ops with shape/dtype meta on each node.

torch.fx is the IR. These helpers only add the few queries and edits that passes keep needing:
reading constants, registering new ones, dropping unused ones, and recording shapes.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

__all__ = [
    "annotate_tensor_meta",
    "attribute_value",
    "clone_graph_module",
    "count_ops",
    "iter_ops",
    "node_dtype",
    "node_shape",
    "op_name",
    "parameter_bytes",
    "prune_unused_attributes",
    "register_constant",
    "run_and_record",
]


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


def attribute_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node, or None when ``node`` is not a constant."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value if isinstance(value, torch.Tensor) else None


def register_constant(gm: fx.GraphModule, base_name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    """Store ``value`` as a new buffer on ``gm`` and insert a ``get_attr`` node for it before ``before``."""
    stem = "".join(c if c.isalnum() else "_" for c in base_name) or "const"
    name, index = f"_go_{stem}", 0
    while hasattr(gm, name):
        index += 1
        name = f"_go_{stem}_{index}"
    gm.register_buffer(name, value.detach().contiguous())
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["tensor_meta"] = _extract_tensor_metadata(value)
    node.meta["val"] = value
    return node


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


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of ``gm`` (weights included), without torch's pytree deprecation chatter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
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


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The recorded output shape of ``node``, or None when it is not a single tensor."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return tuple(int(d) for d in meta.shape)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(d) for d in val.shape)
    return None


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


def run_and_record(
    gm: fx.GraphModule, flat_inputs: tuple[Any, ...], keep_values: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Run ``gm`` on flat inputs; annotate every node with ``tensor_meta``.

    Returns the graph's flat output and, when ``keep_values``, every node's value by node name.
    """
    recorder = _Recorder(gm, keep_values)
    with torch.no_grad():
        output = recorder.run(*flat_inputs)
    return output, recorder.values


def annotate_tensor_meta(gm: fx.GraphModule, flat_inputs: tuple[Any, ...]) -> None:
    """Record shape and dtype on every node of ``gm`` by running it on ``flat_inputs``."""
    run_and_record(gm, flat_inputs)
