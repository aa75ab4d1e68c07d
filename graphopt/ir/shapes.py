"""Dynamic shapes: which input dims may vary, checking calls against them, and specs for re-export.

``optimize(..., dynamic_shapes=...)`` takes torch.export's own format; ``dynamic_batch=True``
builds that spec for dim 0 of every tensor input. After capture, :class:`DynamicDims` records,
per flat graph input, the dims that are symbolic and the name and range of each, read from the
exported graph itself (so what torch.export specialised is never claimed dynamic).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim

from graphopt.errors import InputError

__all__ = ["DynamicDims", "batch_dynamic_shapes", "describe_dims", "resize_inputs", "user_dim_names"]

_MAX = None  # unbounded upper end of a range


@dataclass
class DynamicDims:
    """The dims of each flat input that may vary: ``dims[i] = {dim: name}``; ``ranges[name] = (min, max)``."""

    dims: list[dict[int, str]] = field(default_factory=list)
    ranges: dict[str, tuple[int, int | None]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(self.dims)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data (dim indices become strings, as JSON keys must)."""
        return {
            "dims": [{str(k): v for k, v in d.items()} for d in self.dims],
            "ranges": {k: list(v) for k, v in self.ranges.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DynamicDims:
        """Rebuild from :meth:`to_dict` output."""
        dims = [{int(k): v for k, v in d.items()} for d in data.get("dims", [])]
        ranges = {k: (int(v[0]), None if v[1] is None else int(v[1])) for k, v in data.get("ranges", {}).items()}
        return cls(dims, ranges)

    def check(self, values: tuple[Any, ...], expected: list[tuple[tuple[int, ...], torch.dtype] | None]) -> None:
        """Raise ``InputError`` when a call's flat inputs do not fit the optimized signature.

        Static dims must equal the example's; dynamic dims must lie in their range, and dims
        that share a name (the batch of ``input_ids`` and of ``attention_mask``) must agree.
        """
        seen: dict[str, tuple[int, int, int]] = {}
        for index, (value, want) in enumerate(zip(values, expected, strict=False)):
            if want is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise InputError(f"input {index} must be a tensor of shape {list(want[0])}, got {type(value).__name__}")
            shape, dtype = want
            dynamic = self.dims[index] if index < len(self.dims) else {}
            if value.dtype != dtype or value.dim() != len(shape):
                raise InputError(
                    f"input {index} has shape {list(value.shape)} and dtype {value.dtype}, but the model was "
                    f"optimized for shape {describe_dims(shape, dynamic)} and dtype {dtype}. "
                    + _RETRY_HINT
                )
            for axis, (size, example) in enumerate(zip(value.shape, shape, strict=True)):
                name = dynamic.get(axis)
                if name is None:
                    if size != example:
                        raise InputError(
                            f"input {index} has shape {list(value.shape)}, but the model was optimized for shape "
                            f"{describe_dims(shape, dynamic)}: dim {axis} is static ({example}). " + _RETRY_HINT
                        )
                    continue
                low, high = self.ranges.get(name, (0, _MAX))
                if size < low or (high is not None and size > high):
                    bound = f"[{low}, {'inf' if high is None else high}]"
                    raise InputError(f"input {index} dim {axis} ({name}) is {size}, outside its range {bound}")
                first = seen.setdefault(name, (int(size), index, axis))
                if first[0] != size:
                    raise InputError(
                        f"dim {name!r} must be the same for every input: input {first[1]} dim {first[2]} is "
                        f"{first[0]} but input {index} dim {axis} is {size}"
                    )

    def per_input_specs(self, kind: str) -> list[dict[int, Any] | None]:
        """One spec per flat input: ``{dim: name}`` for ``kind="onnx"``, ``{dim: Dim}`` for ``"export"``."""
        dims_by_name: dict[str, Any] = {}
        specs: list[dict[int, Any] | None] = []
        for per_input in self.dims:
            if not per_input:
                specs.append(None)
                continue
            spec = {}
            for axis, name in per_input.items():
                if kind == "onnx":
                    spec[axis] = name
                elif name.isidentifier():
                    low, high = self.ranges.get(name, (0, _MAX))
                    dims_by_name.setdefault(name, Dim(name, min=max(low, 0), max=high))
                    spec[axis] = dims_by_name[name]
                else:
                    spec[axis] = Dim.AUTO
            specs.append(spec)
        return specs

    def spec_for(self, kind: str, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A ``dynamic_shapes`` argument for re-exporting ``fn`` (the optimized graph) on ``(args, kwargs)``.

        Returns None when nothing is dynamic. The spec is keyed by ``fn``'s argument names.
        """
        if not self:
            return None
        leaves, tree = pytree.tree_flatten((tuple(args), dict(kwargs)))
        specs = iter(self.per_input_specs(kind))
        leaf_specs = [next(specs, None) if isinstance(leaf, torch.Tensor) else None for leaf in leaves]
        spec_args, spec_kwargs = pytree.tree_unflatten(leaf_specs, tree)
        named = _by_parameter_name(fn, args, kwargs, spec_args, spec_kwargs)
        return named if named is not None else (*spec_args, *spec_kwargs.values())


def _by_parameter_name(
    fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], spec_args: tuple[Any, ...], spec_kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """Key per-argument specs by ``fn``'s parameter names (torch.export's preferred form); None if unbindable."""
    try:
        signature = inspect.signature(fn)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    named: dict[str, Any] = {}
    positional = iter(spec_args)
    for name, parameter in signature.parameters.items():
        if name not in bound.arguments:
            continue
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            named[name] = tuple(positional)
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            named[name] = {k: spec_kwargs[k] for k in bound.arguments[name]}
        elif name in spec_kwargs:
            named[name] = spec_kwargs[name]
        else:
            named[name] = next(positional)
    return named


_RETRY_HINT = (
    "Run graphopt.optimize again with example inputs of the new shape, or declare the dims that vary with "
    "dynamic_shapes=... (or dynamic_batch=True for the batch dim)."
)


def describe_dims(shape: tuple[int, ...], dynamic: dict[int, str]) -> str:
    """``[batch, 128]``-style text for a shape whose dynamic dims are shown by name."""
    return "[" + ", ".join(dynamic.get(axis, str(size)) for axis, size in enumerate(shape)) + "]"


def batch_dynamic_shapes(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """torch.export ``dynamic_shapes`` marking dim 0 of every tensor input as one shared ``batch`` dim."""
    batch = Dim("batch", min=1)

    def mark(value: Any) -> Any:
        return {0: batch} if isinstance(value, torch.Tensor) and value.dim() > 0 else None

    args_spec, kwargs_spec = pytree.tree_map(mark, (tuple(args), dict(kwargs)))
    named = _by_parameter_name(model.forward, args, kwargs, args_spec, kwargs_spec)
    if named is None:
        raise InputError(f"the example inputs do not fit {type(model).__name__}.forward's signature")
    return named


def _dim_name(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    name = getattr(value, "__name__", None)
    return name if isinstance(name, str) and name.isidentifier() and name not in ("AUTO", "DYNAMIC") else None


def _per_tensor_names(spec: Any) -> dict[int, str]:
    if isinstance(spec, dict) and all(isinstance(k, int) for k in spec):
        items = spec.items()
    elif isinstance(spec, (list, tuple)) and not any(isinstance(s, (dict, list, tuple)) for s in spec):
        items = enumerate(spec)
    else:
        return {}
    return {axis: name for axis, value in items if (name := _dim_name(value)) is not None}


def user_dim_names(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_shapes: Any
) -> dict[tuple[int, int], str]:
    """The names the user gave dynamic dims, as ``{(id(example tensor), dim): name}`` (best effort)."""
    names: dict[tuple[int, int], str] = {}

    def visit(value: Any, spec: Any) -> None:
        if spec is None:
            return
        if isinstance(value, torch.Tensor):
            for axis, name in _per_tensor_names(spec).items():
                names[(id(value), axis)] = name
        elif isinstance(value, (list, tuple)) and isinstance(spec, (list, tuple)):
            for v, s in zip(value, spec, strict=False):
                visit(v, s)
        elif isinstance(value, dict) and isinstance(spec, dict):
            for key, v in value.items():
                visit(v, spec.get(key))

    if isinstance(dynamic_shapes, dict):
        try:
            bound = inspect.signature(model.forward).bind(*args, **kwargs)
        except TypeError:
            return names
        for name, value in bound.arguments.items():
            visit(value, dynamic_shapes.get(name))
    elif isinstance(dynamic_shapes, (list, tuple)):
        visit((*args, *kwargs.values()), dynamic_shapes)
    return names


_SANITIZE = re.compile(r"[^0-9A-Za-z_]+")


def dims_from_graph(
    gm: fx.GraphModule,
    flat_inputs: tuple[Any, ...],
    range_constraints: dict[Any, Any],
    user_names: dict[tuple[int, int], str],
) -> DynamicDims:
    """Read which dims of each placeholder are symbolic in the exported graph, with names and ranges."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    symbol_names: dict[str, str] = {}
    dims: list[dict[int, str]] = []
    for node, value in zip(placeholders, flat_inputs, strict=False):
        fake = node.meta.get("val")
        per_input: dict[int, str] = {}
        if isinstance(fake, torch.Tensor):
            for axis, size in enumerate(fake.shape):
                if not isinstance(size, torch.SymInt) or size.node.maybe_as_int() is not None:
                    continue
                expr = str(size.node.expr)
                wanted = user_names.get((id(value), axis))
                name = symbol_names.setdefault(expr, wanted or _SANITIZE.sub("_", expr))
                per_input[axis] = name
        dims.append(per_input)
    ranges: dict[str, tuple[int, int | None]] = {}
    for symbol, value_range in range_constraints.items():
        name = symbol_names.get(str(symbol))
        if name is None:
            continue
        lower, upper = value_range.lower, value_range.upper
        high = int(upper) if getattr(upper, "is_Integer", False) else None  # int_oo: unbounded
        ranges[name] = (int(lower) if getattr(lower, "is_Integer", False) else 0, high)
    return DynamicDims(dims, ranges)


def resize_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: DynamicDims, grow: bool
) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, int]] | None:
    """Example inputs with every dynamic dim resized (repeating or cutting the real data along it).

    ``grow`` picks a larger size (about 1.5x), otherwise a smaller one (about half). Returns
    the new ``(args, kwargs, sizes by dim name)``, or None when no size other than the
    example's fits the dims' ranges.
    """
    leaves, tree = pytree.tree_flatten((tuple(args), dict(kwargs)))
    tensor_index = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    sizes: dict[str, int] = {}
    for position, per_input in zip(tensor_index, dynamic.dims, strict=False):
        for axis, name in per_input.items():
            if name in sizes:
                continue
            old = int(leaves[position].shape[axis])
            low, high = dynamic.ranges.get(name, (0, _MAX))
            new = old + max(1, old // 2) if grow else old - old // 2
            new = max(new, low, 1)
            if high is not None:
                new = min(new, high)
            sizes[name] = new
    if not sizes or all(
        sizes[name] == int(leaves[p].shape[a])
        for p, d in zip(tensor_index, dynamic.dims, strict=False)
        for a, name in d.items()
    ):
        return None
    new_leaves = list(leaves)
    for position, per_input in zip(tensor_index, dynamic.dims, strict=False):
        tensor = new_leaves[position]
        for axis, name in per_input.items():
            tensor = _resize_along(tensor, axis, sizes[name])
        new_leaves[position] = tensor
    new_args, new_kwargs = pytree.tree_unflatten(new_leaves, tree)
    return new_args, new_kwargs, sizes


def _resize_along(tensor: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    current = tensor.shape[axis]
    if size <= current:
        return tensor.narrow(axis, 0, size).contiguous()
    repeats = -(-size // current)
    return torch.cat([tensor] * repeats, dim=axis).narrow(axis, 0, size).contiguous()
