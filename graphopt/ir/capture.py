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
from graphopt.ir.buffer_aliases import bind_buffer_aliases
from graphopt.ir.canonical import canonicalize
from graphopt.ir.functional import outplace_simple_mutations
from graphopt.ir.graph import (
    STATE_UPDATE,
    draws_random_numbers,
    is_mutating,
    run_and_record,
    tensor_versions,
    torch_deprecations_silenced,
    written_since,
)
from graphopt.ir.inference_form import to_inference_form
from graphopt.ir.shapes import DynamicDims, batch_dynamic_shapes, dims_from_graph, user_dim_names
from graphopt.ir.verify import compare_outputs

__all__ = ["CapturedModel", "capture", "eval_twin", "flatten_inputs", "unlift_program", "user_source_line"]

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
    dynamic: DynamicDims = field(default_factory=DynamicDims)
    functionalized: bool = False
    graph_outputs: Any = None  # the captured graph's own outputs on flat_inputs


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


def _usual_layout(value: Any) -> Any:
    """A tensor in a layout kernels and torch.export agree on: as it is when contiguous or channels-last.

    torch.export specializes the graph on the example's strides, and for unusual layouts
    (column-major, transposed views) its stride propagation can disagree with the real kernels,
    giving a graph that cannot run. Calls are laid out like the example anyway.
    """
    if not isinstance(value, torch.Tensor) or value.is_contiguous():
        return value
    for layout, rank in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if value.dim() == rank and value.is_contiguous(memory_format=layout):
            return value
    return value.contiguous()


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


def eval_twin(model: torch.nn.Module, share_weights: bool = True) -> torch.nn.Module:
    """An eval-mode copy of ``model`` that nothing graphopt does can reach the user's module through.

    The copy has its own module objects, its own ``Parameter`` objects (so ``.to(device)`` moves
    only the copy) and its own buffers (so a forward that updates state updates the copy). With
    ``share_weights`` its parameters share storage with the model's instead of duplicating it,
    so optimizing never doubles a model's memory; the storage shares the model's version
    counters, which is how an optimized model notices the user changing those weights later.
    Only code that never writes into weights may run on a shared twin (graphopt's own passes,
    which the pass manager checks); otherwise pass ``share_weights=False``.
    """
    memo: dict[int, Any] = {}
    for parameter in model.parameters():
        data = parameter.detach() if share_weights else parameter.detach().clone()
        memo[id(parameter)] = torch.nn.Parameter(data, requires_grad=False)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach().clone()
    try:
        with torch_deprecations_silenced():
            twin = copy.deepcopy(model, memo)
    except Exception as error:
        raise InputError(
            f"could not copy the model ({type(error).__name__}: {error}); graphopt works on a copy "
            "so that your model is never modified. Make the module deep-copyable."
        ) from error
    return twin.eval()


def _run_eager(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The eager outputs on the example inputs, leaving the model's buffers as they were before the call."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    versions = {name: v for name, v in tensor_versions(model).items() if name in parameters}
    try:
        with torch.no_grad():
            outputs = model(*args, **kwargs)
    except Exception as error:
        where = user_source_line(error)
        raise InputError(
            f"the model fails on the example inputs ({_shapes(args, kwargs)}): "
            f"{type(error).__name__}: {error}"
            + (f"\n  at {where}" if where else "")
            + "\nCheck the number, shapes and dtypes of example_inputs against what forward() expects."
        ) from error
    written = written_since(versions)
    if written:
        raise InputError(
            f"forward() writes into parameter(s) {', '.join(written[:3])} in place; graphopt optimizes "
            "models whose weights are fixed at inference. Keep state that changes per call in buffers."
        )
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])  # the graph must start from the state the user's model is in
    return outputs


def _check_outputs(outputs: Any) -> list[Any]:
    leaves, _ = pytree.tree_flatten(outputs)
    for leaf in leaves:
        if isinstance(leaf, (torch.Tensor, int, float, bool, type(None))):
            continue
        kind = type(leaf).__name__
        hint = (
            " This is a model's cache for generation. graphopt generates with decoders whose forward takes "
            "past_key_values (graphopt.optimize returns a GenerativeModel for them); to optimize this model's "
            "one-shot forward, build it with use_cache=False (e.g. config.use_cache = False) or call it with "
            "use_cache=False."
            if "Cache" in kind
            else " Return tensors (or tuples/dicts of tensors) from forward()."
        )
        raise CaptureError(f"the model returns a {type(leaf).__module__}.{kind} object, not tensors.{hint}")
    return leaves


def _capture_error(error: BaseException, what: str) -> CaptureError:
    where = user_source_line(error)
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    if "data-dependent" in text or "GuardOnDataDependent" in type(error).__name__:
        hint = ("Control flow that depends on tensor values cannot be captured: replace the Python `if` "
                "on a tensor with torch.where / torch.cond, or move it out of forward().")
    elif "Constraints violated" in text or "specialized" in text or "dynamic_shapes" in text:
        detail = "\n".join(line for line in text.splitlines()[1:8] if line.strip())
        first_line += ("\n" + detail) if detail else ""
        hint = ("A dim declared dynamic is fixed (or tied to another dim) by the model's code, or has size 1 in the "
                "example (torch.export fixes every dim it sees at 1: give an example of size 2 or more there). Mark "
                "only the dims that really vary, give them the range the model supports (Dim(name, min=..., "
                "max=...)), or leave that input static.")
    else:
        hint = "Make forward() traceable by torch.export (see the torch.export docs for the construct named above)."
    return CaptureError(
        f"could not {what}: {type(error).__name__}: {first_line}" + (f"\n  at {where}" if where else "") + f"\n{hint}",
        source_line=where,
    )


def _batch_of_two(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """An example batch of one repeated to two along dim 0, for ``dynamic_batch=True``'s trace.

    torch.export fixes every dim it sees at size 1, so a batch traced at 1 could never vary. The
    graph traced at 2 holds for a batch of 1 too (``Dim("batch", min=1)``), and capture checks
    it on the user's own example right after. Other examples are returned as they are.
    """
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors or any(t.shape[0] != 1 for t in tensors):
        return args, kwargs
    widen = lambda t: torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() > 0 else t  # noqa: E731
    return pytree.tree_map(widen, (args, kwargs))


def _export(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_shapes: Any
) -> torch.export.ExportedProgram:
    """Export ``model`` with torch.export (non-strict), as a graphopt error when it fails."""
    try:
        exported = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as error:
        raise _capture_error(error, "capture the model") from error
    return exported


def _functionalize(exported: torch.export.ExportedProgram) -> tuple[torch.export.ExportedProgram, fx.GraphModule]:
    """torch.export's own functionalization, for writes that the cheap rewrite cannot handle."""
    _alias_inference_dropout(exported.graph_module)
    try:
        with torch_deprecations_silenced():
            functional = exported.run_decompositions({})
    except Exception as error:
        raise _capture_error(error, "functionalize the captured graph (remove its in-place ops)") from error
    return functional, unlift_program(functional)


def _alias_inference_dropout(gm: fx.GraphModule) -> None:
    """Make ``dropout(x, train=False)`` an ``alias`` of ``x`` before functionalization.

    Eager inference dropout returns its input itself, so an in-place write through its result
    reaches the input; functionalization would decompose it to a ``clone`` and lose that.
    """
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.dropout.default and node.args[2:3] == (False,):
            node.target, node.args, node.kwargs = torch.ops.aten.alias.default, (node.args[0],), {}
    gm.recompile()


def unlift_program(exported: torch.export.ExportedProgram) -> fx.GraphModule:
    """The program as a module whose weights are attributes; state writes stay explicit ``copy_`` nodes."""
    gm = exported.module()
    _drop_input_guards(gm)
    for parameter in gm.parameters():
        parameter.requires_grad_(False)
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.copy_.default and node.args[0].op in ("get_attr", "placeholder"):
            node.meta[STATE_UPDATE] = True
    return gm


def _drop_input_guards(gm: fx.GraphModule) -> None:
    """Remove export's shape-guard call; graphopt checks call inputs itself with clearer errors."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()


def _resolve_dynamic(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_shapes: Any, dynamic_batch: bool
) -> Any:
    if dynamic_batch and dynamic_shapes is not None:
        raise InputError("give either dynamic_shapes=... or dynamic_batch=True, not both")
    return batch_dynamic_shapes(model, args, kwargs) if dynamic_batch else dynamic_shapes


def capture(
    model: torch.nn.Module,
    example_inputs: Any,
    example_kwargs: dict[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    dynamic_batch: bool = False,
    share_weights: bool = False,
) -> CapturedModel:
    """Capture ``model`` on ``example_inputs`` into a functional fx graph with shape and dtype on every node.

    The graph holds no in-place op: when ``torch.export`` keeps any, the program is
    functionalized; writes to buffers (or inputs) that the user can see stay as explicit
    ``aten.copy_`` nodes at the end, marked ``node.meta[STATE_UPDATE]``.
    ``dynamic_shapes`` (torch.export's format) or ``dynamic_batch=True`` declare dims that
    may vary between calls. With ``share_weights`` the graph's parameters share storage with
    the model's (see ``eval_twin``); by default they are a private copy.

    Raises InputError for inputs the model cannot run on, CaptureError (naming the user's source
    line) for a model torch.export cannot capture.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    args = _normalize_inputs(example_inputs)
    kwargs = dict(example_kwargs or {})
    _check_leaves(args, kwargs)
    args, kwargs = pytree.tree_map(_usual_layout, (args, kwargs))
    twin = eval_twin(model, share_weights)
    aliases = bind_buffer_aliases(twin)
    reference = _check_outputs(_run_eager(twin, args, kwargs))
    spec = _resolve_dynamic(twin, args, kwargs, dynamic_shapes, dynamic_batch)
    exported = _export(twin, *(_batch_of_two(args, kwargs) if dynamic_batch else (args, kwargs)), spec)
    gm = unlift_program(exported)
    functionalized = any(is_mutating(n) for n in gm.graph.nodes)
    if functionalized:
        if outplace_simple_mutations(gm):
            to_inference_form(gm)  # what torch.export's functionalization would also have given
        else:
            exported, gm = _functionalize(exported)
    canonicalize(gm)
    flat_inputs = flatten_inputs(gm, args, kwargs)
    dynamic = dims_from_graph(gm, flat_inputs, exported.range_constraints,
                              user_dim_names(twin, args, kwargs, spec) if spec is not None else {})
    del exported
    graph_outputs = _first_run(gm, flat_inputs)
    comparison = compare_outputs(graph_outputs, reference)
    if not comparison.ok and not any(draws_random_numbers(n) for n in gm.graph.nodes):
        raise CaptureError(
            f"the captured graph computes something else than the model ({comparison.detail}) before any pass "
            "ran. torch.export did not capture this model faithfully (often an in-place write through a view "
            "or alias); rewrite that part of forward() out of place, and report it if the eager code is plain."
        )
    notes = []
    if model.training:
        notes.append("the model was in training mode; graphopt optimized its inference (eval-mode) graph")
    if functionalized:
        notes.append("the captured graph had in-place ops; it was functionalized (no op mutates a value)")
    if aliases:
        notes.append(f"{aliases} reference(s) to buffers held outside the module tree (a cache object) were "
                     "rebound to the buffers on every call, so their in-place updates are captured as state")
    return CapturedModel(gm, args, kwargs, flat_inputs, reference, notes, dynamic, functionalized, graph_outputs)


def _first_run(gm: fx.GraphModule, flat_inputs: tuple[Any, ...]) -> Any:
    """Run the captured graph once (recording shapes); a graph that fails is a capture problem."""
    try:
        outputs, _ = run_and_record(gm, flat_inputs)
    except Exception as error:
        raise CaptureError(
            f"the captured graph fails on the example inputs although the model runs: {type(error).__name__}: "
            f"{error}. Check the model with torch.export.export(model, example_inputs); if that graph runs, "
            "report this as a graphopt bug."
        ) from error
    return outputs
