"""Reading and writing an op node's arguments by their schema names, defaults filled in.

Captured graphs spell the same call several ways: ``conv2d(x, w)`` with every default left
out, ``conv2d(x, w, b, [2, 2], [1, 1], [1, 1], 2)``, or some arguments as keywords. Passes ask
for an argument by name here instead of by position, so they read every spelling alike.
Built on ``torch.fx.operator_schemas.normalize_function``, which binds a call to the op's schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

__all__ = ["ConvArguments", "argument", "conv_arguments", "given_argument", "normalized_args", "set_argument"]


def normalized_args(node: fx.Node) -> dict[str, Any] | None:
    """Every argument of an ATen call node by its schema name, defaults filled in (in schema order).

    None when ``node`` does not call an op overload, or its arguments do not fit the schema.
    """
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    try:
        bound = normalize_function(target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
    except TypeError:  # too many arguments, or one given twice
        return None
    return dict(bound.kwargs) if bound is not None else None


def _schema_index(target: torch._ops.OpOverload, name: str) -> int | None:
    """Position of argument ``name`` in ``target``'s schema; ``"input"`` also names a ``self`` argument.

    ``normalize_function`` (so ``normalized_args``) calls an op's ``self`` argument ``input``, as
    torch's Python API does; every reader and writer here takes either name.
    """
    names = [a.name for a in target._schema.arguments]
    if name in names:
        return names.index(name)
    return names.index("self") if name == "input" and "self" in names else None


def argument(node: fx.Node, name: str, default: Any = None) -> Any:
    """The argument ``name`` of an ATen call node (its schema default when the call leaves it out).

    ``default`` when the op has no such argument or the node is not an ATen call.
    """
    values = normalized_args(node)
    if values is None:
        return default
    return values.get("input" if name == "self" else name, default)  # normalize_function's name for ``self``


def given_argument(node: fx.Node, name: str, default: Any = None) -> Any:
    """The argument ``name`` as the call spells it, positionally or by keyword; ``default`` when the call leaves it out.

    Unlike ``argument``, the schema's default is not filled in: for ``contiguous(x)`` the memory
    format is "not asked for" (``default``), not ``torch.contiguous_format``. Use this where a
    pass must tell an explicit request from the op's default behaviour.
    """
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return default
    index = _schema_index(target, name)
    if index is None:
        return default
    schema_argument = target._schema.arguments[index]
    if schema_argument.name in node.kwargs:
        return node.kwargs[schema_argument.name]
    return node.args[index] if not schema_argument.kwarg_only and index < len(node.args) else default


def set_argument(node: fx.Node, name: str, value: Any) -> None:
    """Give the argument ``name`` of an ATen call node the value ``value``, wherever the call has it.

    A positional argument stays positional, a keyword one stays a keyword; one the call leaves
    out is appended (positionally when it comes right after the last positional argument).
    Raises ``KeyError`` when the op's schema has no argument ``name``.
    """
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        raise KeyError(f"{node.name} does not call an ATen op, so it has no argument {name!r}")
    schema = target._schema.arguments
    index = _schema_index(target, name)
    if index is None:
        raise KeyError(f"{target} has no argument {name!r}; it has {', '.join(a.name for a in schema)}")
    name = schema[index].name
    if name in node.kwargs:
        node.kwargs = {**node.kwargs, name: value}
    elif index < len(node.args):
        node.args = (*node.args[:index], value, *node.args[index + 1:])
    elif index == len(node.args) and not schema[index].kwarg_only:
        node.args = (*node.args, value)
    else:
        node.kwargs = {**node.kwargs, name: value}


@dataclass(frozen=True)
class ConvArguments:
    """A convolution's arguments, defaults filled in, each window argument one int per spatial dim.

    ``input``/``weight``/``bias`` are what the node passes (``fx.Node``s, or None for no bias).
    ``padding`` is a string (``"same"``, ``"valid"``) for the ``*.padding`` overloads.
    """

    input: Any
    weight: Any
    bias: Any
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    transposed: bool = False
    output_padding: tuple[int, ...] = ()

    @property
    def spatial_dims(self) -> int:
        """How many dims the kernel slides over (2 for ``conv2d``)."""
        return len(self.stride)


def _spatial_rank(target: torch._ops.OpOverload, values: dict[str, Any]) -> int | None:
    name = target._opname
    for rank in (1, 2, 3):
        if name.endswith(f"{rank}d"):
            return rank
    for key in ("stride", "dilation", "padding"):
        given = values.get(key)
        if isinstance(given, (list, tuple)) and len(given) > 1:
            return len(given)
    weight = values.get("weight")
    val = weight.meta.get("val") if isinstance(weight, fx.Node) else weight
    if isinstance(val, torch.Tensor):
        return val.dim() - 2
    stride = values.get("stride")
    return len(stride) if isinstance(stride, (list, tuple)) and stride else None


def _per_dim(value: Any, rank: int) -> tuple[int, ...]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values = values * rank
    return tuple(int(v) for v in values)


def conv_arguments(node: fx.Node) -> ConvArguments | None:
    """The arguments of a convolution node by name, or None when ``node`` is not a convolution.

    Any ATen op with ``weight``, ``stride``, ``padding``, ``dilation`` and ``groups`` arguments
    counts (``conv2d``, ``convolution``, ``conv_transpose2d``, a backend's convolution ...); the
    input is the op's first argument. ``transposed`` comes from the op's argument of that name,
    or from its name (``conv_transpose*``).
    """
    values = normalized_args(node)
    if values is None or not {"weight", "stride", "padding", "dilation", "groups"} <= values.keys():
        return None
    target = node.target
    assert isinstance(target, torch._ops.OpOverload)
    rank = _spatial_rank(target, values)
    if rank is None:
        return None
    padding = values["padding"]
    transposed = bool(values.get("transposed", target._opname.startswith("conv_transpose")))
    output_padding = values.get("output_padding")
    return ConvArguments(
        input=next(iter(values.values())),
        weight=values["weight"],
        bias=values.get("bias"),
        stride=_per_dim(values["stride"], rank),
        padding=padding if isinstance(padding, str) else _per_dim(padding, rank),
        dilation=_per_dim(values["dilation"], rank),
        groups=int(values["groups"]),
        transposed=transposed,
        output_padding=_per_dim(output_padding, rank) if output_padding is not None else (0,) * rank,
    )
