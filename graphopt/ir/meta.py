"""Shape and dtype meta of nodes a rewrite creates or changes: one way to compute it.

Capture leaves two facts on every node (see ``graphopt.ir.capture``):

- ``meta["val"]``: a fake tensor (or a tuple of them, or a SymInt) from torch.export, in the
  graph's one ``FakeTensorMode``; a dim declared dynamic is a ``SymInt`` (``s0``), so shapes
  compare correctly for every size it may take.
- ``meta["tensor_meta"]``: a ``TensorMetadata`` with concrete shape, stride and dtype, from the
  last real run (the pass manager records it again after every pass). Only single tensors have one.

``infer_meta(node)`` gives a node the same two facts by running its op on its inputs' fake
values; ``propagate_meta(gm)`` does it for every node, after a rewrite that changes sizes
(pruning). Dynamic dims stay symbolic in ``val``; ``tensor_meta`` takes their example sizes,
as a run on the example inputs would. Constants a pass registers keep their real tensor as
``val`` (``register_constant``); they are turned into static fake tensors when read here.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

__all__ = [
    "PROVENANCE_META",
    "SHAPE_META",
    "copy_meta",
    "fake_mode_of",
    "infer_meta",
    "propagate_meta",
    "record_meta",
    "shared_call_outputs",
    "tensor_metadata",
]

SHAPE_META = ("val", "tensor_meta")
"""The ``node.meta`` keys that describe a node's value (what ``infer_meta`` writes)."""

PROVENANCE_META = ("stack_trace", "nn_module_stack", "source_fn_stack")
"""The ``node.meta`` keys that say where a node came from in the user's code."""


def fake_mode_of(nodes: Iterable[fx.Node]) -> FakeTensorMode | None:
    """The fake mode of the first fake tensor among the nodes' ``val`` meta, or None when none has one."""
    for node in nodes:
        for leaf in pytree.tree_leaves(node.meta.get("val")):
            if isinstance(leaf, FakeTensor):
                return leaf.fake_mode
    return None


def _hint(size: Any) -> int | None:
    """A dim as an int: a dynamic dim at its example size (None for a dim with no example size)."""
    if not isinstance(size, torch.SymInt):
        return int(size)
    hint = size.node.hint
    if hint is not None:
        return int(hint)
    try:
        return int(size.node.shape_env.size_hint(size.node.expr))
    except Exception:  # an unbacked dim (data-dependent size): no example size
        return None


def tensor_metadata(value: torch.Tensor) -> TensorMetadata | None:
    """The concrete ``TensorMetadata`` of a (fake) tensor: dynamic dims and strides at their example sizes.

    None when a dim has no example size (a data-dependent one).
    """
    shape = [_hint(d) for d in value.shape]
    stride = [_hint(s) for s in value.stride()]
    if any(d is None for d in shape) or any(s is None for s in stride):
        return None
    if all(isinstance(d, int) for d in value.shape) and all(isinstance(s, int) for s in value.stride()):
        return _extract_tensor_metadata(value)
    like = torch.empty_strided(shape, stride, dtype=value.dtype, device="meta")
    return _extract_tensor_metadata(like)._replace(requires_grad=value.requires_grad)


def record_meta(node: fx.Node, value: Any) -> None:
    """Store ``value`` as ``node``'s ``val``, with the matching ``tensor_meta`` when it is one tensor."""
    node.meta["val"] = value
    metadata = tensor_metadata(value) if isinstance(value, torch.Tensor) else None
    if metadata is not None:
        node.meta["tensor_meta"] = metadata
    else:
        node.meta.pop("tensor_meta", None)


def copy_meta(new: fx.Node, old: fx.Node, keys: Iterable[str] = SHAPE_META) -> None:
    """Give ``new`` the ``keys`` entries of ``old``'s meta (its value's, by default): for a node computing the same."""
    new.meta.update({k: v for k, v in old.meta.items() if k in keys})


def _as_fake(value: Any, mode: FakeTensorMode) -> Any:
    """``value`` with every real tensor in it made a static fake tensor of ``mode``."""
    return pytree.tree_map(
        lambda v: mode.from_tensor(v, static_shapes=True)
        if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor) else v,
        value,
    )


def _attribute(module: torch.nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _input_value(node: fx.Node) -> Any:
    """The value an input node stands for: its ``val``, or the constant behind a ``get_attr`` without one."""
    if "val" in node.meta:
        return node.meta["val"]
    if node.op == "get_attr" and node.graph.owning_module is not None:
        return _attribute(node.graph.owning_module, str(node.target))
    raise LookupError(f"{node.name} has no recorded value")


def _evaluate(node: fx.Node, mode: FakeTensorMode) -> Any:
    """Run ``node``'s op on its inputs' values as fake tensors of ``mode``; raises what the op raises."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), _input_value)
    args, kwargs = _as_fake((args, kwargs), mode)
    with torch.no_grad(), mode:
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "call_module":
            assert node.graph.owning_module is not None
            module = node.graph.owning_module.get_submodule(str(node.target))
            previous, mode.allow_non_fake_inputs = mode.allow_non_fake_inputs, True  # the submodule's weights
            try:
                return module(*args, **kwargs)
            finally:
                mode.allow_non_fake_inputs = previous
    raise ValueError(f"{node.name} is a {node.op} node: it has no op to run")


def _mode_for(node: fx.Node) -> FakeTensorMode:
    """The fake mode ``node``'s inputs live in, else the graph's, else a new one (a graph without fake values)."""
    mode = fake_mode_of(node.all_input_nodes) or fake_mode_of(node.graph.nodes)
    return mode if mode is not None else FakeTensorMode(allow_non_fake_inputs=True)


def infer_meta(node: fx.Node) -> bool:
    """Give a new (or rewritten) node ``val`` and ``tensor_meta`` computed from its inputs' values.

    The op runs on fake tensors in the graph's fake mode, so dynamic dims stay symbolic.
    Returns False when an input has no recorded value or the op cannot run on fake tensors:
    the node then has no ``val``/``tensor_meta`` (none is better than a stale one), and the pass
    manager's next run records its ``tensor_meta``.
    """
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    try:
        value = _evaluate(node, _mode_for(node))
    except Exception:
        for key in SHAPE_META:
            node.meta.pop(key, None)
        return False
    record_meta(node, value)
    return True


def shared_call_outputs(gm: fx.GraphModule, before: fx.Node, target: Any, args: tuple[Any, ...], anchor: fx.Node,
                        count: int) -> list[fx.Node]:
    """The ``count`` outputs (``getitem`` nodes) of ``target(*args)``, called once however many nodes read them.

    The call an earlier rewrite made with the same ``args`` is found among ``anchor``'s users (one
    of the args); else a new call goes before ``before``. Missing ``getitem`` nodes are added after
    the call. Every new node gets its meta from ``infer_meta``.
    """
    for user in anchor.users:
        if user.target is target and user.args == args:
            computed = user
            break
    else:
        with gm.graph.inserting_before(before):
            computed = gm.graph.call_function(target, args)
        infer_meta(computed)
    parts = {user.args[1]: user for user in computed.users if user.target is operator.getitem}
    with gm.graph.inserting_after(computed):
        for index in reversed(range(count)):
            if index not in parts:
                parts[index] = gm.graph.call_function(operator.getitem, (computed, index))
                infer_meta(parts[index])
    return [parts[index] for index in range(count)]


def propagate_meta(gm: fx.GraphModule) -> None:
    """Recompute ``val`` and ``tensor_meta`` of every node from the inputs' values and the constants.

    For rewrites that change sizes along the way (pruning shrinks weights, and every node after
    them). Placeholders keep their ``val``, so dynamic dims stay symbolic; constants are read
    from the module. Raises what an op raises when it cannot run on the new shapes.
    """
    mode = fake_mode_of(n for n in gm.graph.nodes if n.op == "placeholder") or fake_mode_of(gm.graph.nodes)
    if mode is None:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _attribute(gm, str(node.target))  # read again: the pass may have swapped the constant
            if isinstance(value, torch.Tensor):
                record_meta(node, _as_fake(value, mode))
        elif node.op in ("call_function", "call_method", "call_module"):
            record_meta(node, _evaluate(node, mode))
