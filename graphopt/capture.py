"""Capture: turn a ``torch.nn.Module`` and example inputs into the IR (an ATen-level fx graph).

Capture uses ``torch.export`` in non-strict mode, which runs the model's Python as written and
so handles models that ``torch.fx.symbolic_trace`` cannot (Hugging Face transformers, say).
The user's model is never touched: capture works on a deep copy.
"""

from __future__ import annotations

import copy
import linecache
import os
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx._pytree import tree_flatten_spec

from graphopt.errors import CaptureError, InputError
from graphopt.ir import run_and_record

__all__ = ["CapturedModel", "capture", "flatten_inputs", "user_source_line"]

_LIBRARY_ROOTS = (
    *(os.path.dirname(m.__file__) + os.sep for m in (torch, pytree, copy) if getattr(m, "__file__", None)),
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
)


@dataclass
class CapturedModel:
    """A captured model: the graph, its example inputs and the eager model's outputs on them."""

    graph_module: fx.GraphModule
    example_args: tuple[Any, ...]
    example_kwargs: dict[str, Any]
    flat_inputs: tuple[Any, ...]
    reference_outputs: list[Any]
    notes: list[str] = field(default_factory=list)


def user_source_line(error: BaseException) -> str | None:
    """Describe the deepest traceback frame outside torch and graphopt: the user's line at fault."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        filename = os.path.abspath(frame.filename)
        if filename.startswith(_LIBRARY_ROOTS) or filename.startswith("<"):
            continue
        code = (frame.line or linecache.getline(frame.filename, frame.lineno or 0)).strip()
        return f'File "{frame.filename}", line {frame.lineno}, in {frame.name}: {code}'
    return None


def _children(spec: pytree.TreeSpec) -> list[pytree.TreeSpec]:
    """A spec's child specs, across torch versions (``children()`` replaced ``children_specs``)."""
    return list(spec.children()) if hasattr(spec, "children") else list(spec.children_specs)


def flatten_inputs(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Flatten call arguments into the order of the graph's placeholders."""
    expected = getattr(gm, "_in_spec", None)
    if expected is None:
        return tuple(pytree.tree_leaves((args, kwargs)))
    _, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    expected_args, expected_kwargs = _children(expected)
    actual_args, actual_kwargs = _children(spec)
    if actual_args != expected_args or set(actual_kwargs.context) != set(expected_kwargs.context):
        raise InputError(
            f"call arguments do not match the example inputs the model was optimized with: expected "
            f"{expected_args.num_children} positional argument(s) and keyword arguments "
            f"{sorted(expected_kwargs.context)}, got {actual_args.num_children} and {sorted(actual_kwargs.context)}"
        )
    return tuple(tree_flatten_spec((tuple(args), kwargs), expected))


def _normalize_inputs(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise InputError(
            f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}. "
            "Pass e.g. (torch.randn(1, 3, 224, 224),) — note the trailing comma for one input."
        )
    return example_inputs


def _check_leaves(example_args: tuple[Any, ...], example_kwargs: dict[str, Any]) -> None:
    for path, leaf in pytree.tree_flatten_with_path((example_args, example_kwargs))[0]:
        if not isinstance(leaf, (torch.Tensor, int, float, bool, type(None))):
            where = pytree.keystr(path)
            raise InputError(
                f"example input {where} is a {type(leaf).__name__}; graphopt needs tensors "
                "(or plain Python numbers). Convert it with torch.as_tensor(...)."
            )


def _shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    def describe(x: Any) -> str:
        return f"{x.dtype}{list(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)

    parts = [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


def _copy_for_capture(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode deep copy, so neither export nor passes can touch the user's module."""
    try:
        twin = copy.deepcopy(model)
    except Exception as error:
        raise InputError(
            f"could not copy the model ({type(error).__name__}: {error}); graphopt works on a copy "
            "so that your model is never modified. Make the module deep-copyable."
        ) from error
    return twin.eval()


def _run_eager(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as error:
        where = user_source_line(error)
        raise InputError(
            f"the model fails on the example inputs ({_shapes(args, kwargs)}): "
            f"{type(error).__name__}: {error}"
            + (f"\n  at {where}" if where else "")
            + "\nCheck the number, shapes and dtypes of example_inputs against what forward() expects."
        ) from error


def _check_outputs(outputs: Any) -> list[Any]:
    leaves, _ = pytree.tree_flatten(outputs)
    for leaf in leaves:
        if isinstance(leaf, (torch.Tensor, int, float, bool, type(None))):
            continue
        kind = type(leaf).__name__
        hint = (
            " This is a key/value cache: build the model with use_cache=False "
            "(e.g. config.use_cache = False) or call it with use_cache=False."
            if "Cache" in kind
            else " Return tensors (or tuples/dicts of tensors) from forward()."
        )
        raise CaptureError(f"the model returns a {type(leaf).__module__}.{kind} object, not tensors.{hint}")
    return leaves


def _export(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.GraphModule:
    try:
        exported = torch.export.export(model, args, kwargs, strict=False)
    except Exception as error:
        where = user_source_line(error)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = (
            "Control flow that depends on tensor values cannot be captured: replace the Python `if` "
            "on a tensor with torch.where / torch.cond, or move it out of forward()."
            if "data-dependent" in str(error) or "GuardOnDataDependent" in type(error).__name__
            else "Make forward() traceable by torch.export (see the torch.export docs for the construct named above)."
        )
        raise CaptureError(
            f"could not capture the model: {type(error).__name__}: {first_line}"
            + (f"\n  at {where}" if where else "")
            + f"\n{hint}",
            source_line=where,
        ) from error
    gm = exported.module()
    _drop_input_guards(gm)
    for parameter in gm.parameters():
        parameter.requires_grad_(False)
    return gm


def _drop_input_guards(gm: fx.GraphModule) -> None:
    """Remove export's shape-guard call; graphopt checks call inputs itself with clearer errors."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()


def capture(
    model: torch.nn.Module, example_inputs: Any, example_kwargs: dict[str, Any] | None = None
) -> CapturedModel:
    """Capture ``model`` on ``example_inputs`` into an fx graph with shape and dtype on every node.

    Raises InputError for inputs the model cannot run on, CaptureError (naming the user's source
    line) for a model torch.export cannot capture.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    args = _normalize_inputs(example_inputs)
    kwargs = dict(example_kwargs or {})
    _check_leaves(args, kwargs)
    twin = _copy_for_capture(model)
    reference = _check_outputs(_run_eager(twin, args, kwargs))
    gm = _export(twin, args, kwargs)
    flat_inputs = flatten_inputs(gm, args, kwargs)
    run_and_record(gm, flat_inputs)
    notes = []
    if model.training:
        notes.append("the model was in training mode; graphopt optimized its inference (eval-mode) graph")
    return CapturedModel(gm, args, kwargs, flat_inputs, reference, notes)
