"""The grouped options of ``graphopt.optimize``, and the flat keywords that stand for them.

    graphopt.optimize(model, x, dynamic=Dynamic(batch=True),
                      pipeline=PassPipeline(disabled=["fuse-horizontal"]),
                      verify=Verify(on_error="raise", tolerance_scale=4))

Each group is a frozen dataclass whose fields are its options, checked on construction:
``Dynamic`` (which input dims vary), ``PassPipeline`` (which exact passes run, and how) and
``Verify`` (how every pass and the lowered model are checked). The flat keywords of earlier
releases still work and mean the same (``SHORTCUTS``): ``dynamic_shapes=``/``dynamic_batch=``
fill ``Dynamic``, ``passes=``/``disabled=``/``fixed_point=``/``instruments=`` fill
``PassPipeline``, ``on_error=``/``tolerance_scale=`` fill ``Verify``; giving a group and one of its
keywords together is an ``InputError``, and so is a keyword ``optimize`` does not know.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphopt.errors import InputError, UnknownPassError
from graphopt.passes.base import Pass, resolve_pass
from graphopt.passes.instruments import Instrument
from graphopt.passes.manager import OnError
from graphopt.targets.base import Target

__all__ = [
    "COMPRESSION_SHORTCUTS",
    "SHORTCUTS",
    "Dynamic",
    "OptimizeOptions",
    "PassPipeline",
    "Verify",
    "default_on_error",
    "is_graphopt_pipeline",
    "resolve_options",
    "with_lowering",
]


def default_on_error() -> OnError:
    """``rollback`` unless the environment asks for strict runs (``GRAPHOPT_ON_ERROR=raise``, as the tests do)."""
    value = os.environ.get("GRAPHOPT_ON_ERROR", "rollback")
    if value not in ("raise", "rollback"):
        raise InputError(f"GRAPHOPT_ON_ERROR must be 'raise' or 'rollback', got {value!r}")
    return value  # type: ignore[return-value]


def is_graphopt_pipeline(pipeline: Sequence[Pass]) -> bool:
    """True when every pass is graphopt's own: they never write into weights, so weights may be shared.

    A pipeline with a pass of the user's runs on a private copy of the weights, so that a bug
    in that pass cannot reach the user's model.
    """
    return all(type(p).__module__.startswith("graphopt.passes.") for p in pipeline)


def _names(value: str | Sequence[Any], option: str) -> tuple[Any, ...]:
    """A list option given as one item or any sequence (one string is one name, not its characters)."""
    if isinstance(value, (str, Pass)):
        return (value,)
    if isinstance(value, Sequence) or isinstance(value, (set, frozenset)):
        return tuple(value)
    raise InputError(f"{option} takes a list, got {type(value).__name__}")


@dataclass(frozen=True)
class Dynamic:
    """Which input dims may vary between calls (all static by default).

    ``shapes``: torch.export's ``dynamic_shapes`` format, e.g.
    ``{"input_ids": {0: Dim("batch"), 1: Dim("seq", max=512)}}``; ``batch=True``: dim 0 of every
    tensor input. The optimized model (and its ONNX file) then accepts any size of those dims,
    and the final check compares it with eager at several of them. Give one of the two.
    """

    shapes: Any = None
    batch: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.batch, bool):
            raise InputError(f"Dynamic(batch=...) must be True or False, got {self.batch!r}")
        if self.batch and self.shapes is not None:
            raise InputError("Dynamic: give either shapes=... (torch.export's dynamic_shapes) or batch=True, not both")
        if self.shapes is not None and not isinstance(self.shapes, (Mapping, tuple, list)):
            raise InputError("Dynamic(shapes=...) takes torch.export's dynamic_shapes: a dict by input name "
                             "({'x': {0: Dim('batch')}}) or a tuple/list per positional input, got "
                             f"{type(self.shapes).__name__}")


@dataclass(frozen=True)
class PassPipeline:
    """Which exact (verified) passes run before lowering, and how.

    ``passes``: replaces the target's default pipeline (pass names or ``Pass`` objects, e.g.
    ``[*graphopt.DEFAULT_PIPELINE, MyPass()]``). ``disabled``: names of passes to drop from it.
    ``fixed_point``: run the pipeline again until no pass changes the graph. ``instruments``:
    hooks called around every pass (timing, IR dumps, your own).
    """

    passes: tuple[str | Pass, ...] | None = None
    disabled: tuple[str, ...] = ()
    fixed_point: bool = False
    instruments: tuple[Instrument, ...] = ()

    def __post_init__(self) -> None:
        if self.passes is not None:
            object.__setattr__(self, "passes", _names(self.passes, "PassPipeline(passes=...)"))
        object.__setattr__(self, "disabled", _names(self.disabled, "PassPipeline(disabled=...)"))
        object.__setattr__(self, "instruments", _names(self.instruments, "PassPipeline(instruments=...)"))
        if not isinstance(self.fixed_point, bool):
            raise InputError(f"PassPipeline(fixed_point=...) must be True or False, got {self.fixed_point!r}")
        wrong = [i for i in self.instruments if not isinstance(i, Instrument)]
        if wrong:
            raise InputError(f"PassPipeline(instruments=...) takes graphopt.Instrument objects, got "
                             f"{type(wrong[0]).__name__}")

    def build(self, target: Target) -> list[Pass]:
        """The passes to run for ``target``: ``passes`` (else the target's defaults) minus ``disabled``."""
        chosen = [resolve_pass(p) for p in (self.passes if self.passes is not None else target.default_passes)]
        unknown = set(self.disabled) - {p.name for p in chosen}
        if unknown:
            raise UnknownPassError(
                f"disabled= names passes that are not in the pipeline: {', '.join(sorted(unknown))}; "
                f"pipeline: {', '.join(p.name for p in chosen)}"
            )
        return [p for p in chosen if p.name not in set(self.disabled)]


@dataclass(frozen=True)
class Verify:
    """How every pass, and the lowered model, are checked against the original.

    ``enabled``: run every pass's check on the example inputs (``False`` skips them, and a
    failed final check is reported instead of raised). ``on_error``: what a pass that breaks
    the outputs does: ``"rollback"`` (undone, reported, ``RollbackWarning``) or ``"raise"``
    (``VerificationError`` naming it); ``None`` reads ``GRAPHOPT_ON_ERROR`` (default rollback).
    ``tolerance_scale`` multiplies the dtype's tolerance (for passes that approximate on purpose).
    """

    enabled: bool = True
    on_error: OnError | None = None
    tolerance_scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise InputError(f"Verify(enabled=...) must be True or False, got {self.enabled!r}")
        if self.on_error not in (None, "raise", "rollback"):
            raise InputError(f"on_error must be 'raise' or 'rollback' (or None for GRAPHOPT_ON_ERROR), "
                             f"got {self.on_error!r}")
        if isinstance(self.tolerance_scale, bool) or not isinstance(self.tolerance_scale, (int, float)) \
                or not self.tolerance_scale > 0:
            raise InputError(f"tolerance_scale must be a number > 0, got {self.tolerance_scale!r}")

    @property
    def effective_on_error(self) -> OnError:
        """``on_error``, or the environment's default when it is None."""
        return self.on_error if self.on_error is not None else default_on_error()


SHORTCUTS: dict[str, tuple[str, str]] = {
    "dynamic_shapes": ("dynamic", "shapes"),
    "dynamic_batch": ("dynamic", "batch"),
    "passes": ("pipeline", "passes"),
    "disabled": ("pipeline", "disabled"),
    "fixed_point": ("pipeline", "fixed_point"),
    "instruments": ("pipeline", "instruments"),
    "on_error": ("verify", "on_error"),
    "tolerance_scale": ("verify", "tolerance_scale"),
}
"""Flat ``optimize`` keyword -> (grouped option, its field)."""

COMPRESSION_SHORTCUTS = ("prune", "quantize", "precision")
"""Flat ``optimize`` keywords that each add one compression step (see ``graphopt.passes.compress``)."""

_GROUPS: dict[str, type] = {"dynamic": Dynamic, "pipeline": PassPipeline, "verify": Verify}


@dataclass(frozen=True)
class OptimizeOptions:
    """``optimize``'s grouped options with every shortcut keyword folded in."""

    dynamic: Dynamic = field(default_factory=Dynamic)
    pipeline: PassPipeline = field(default_factory=PassPipeline)
    verify: Verify = field(default_factory=Verify)
    compression: dict[str, Any] = field(default_factory=dict)  # prune= / quantize= / precision=


def _unknown_keyword(name: str, known: Sequence[str]) -> InputError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return InputError(f"optimize() got an unknown keyword argument {name!r}{hint}. It takes: {', '.join(known)}")


def resolve_options(dynamic: Dynamic | None, pipeline: PassPipeline | None, verify: bool | Verify,
                    shortcuts: Mapping[str, Any], explicit: Sequence[str] = ()) -> OptimizeOptions:
    """Fold ``optimize``'s flat keywords (``shortcuts``) into its grouped options.

    ``explicit`` are the keywords ``optimize`` takes by name, listed in the error for an unknown
    keyword. Raises ``InputError`` for an unknown keyword, a group given with one of its own
    keywords, or a group of the wrong type.
    """
    known = [*explicit, *SHORTCUTS, *COMPRESSION_SHORTCUTS]
    for name in shortcuts:
        if name not in SHORTCUTS and name not in COMPRESSION_SHORTCUTS:
            raise _unknown_keyword(name, known)
    groups: dict[str, Any] = {"dynamic": dynamic, "pipeline": pipeline,
                              "verify": None if isinstance(verify, bool) else verify}
    values: dict[str, dict[str, Any]] = {group: {} for group in _GROUPS}
    if isinstance(verify, bool):
        values["verify"]["enabled"] = verify
    for name, value in shortcuts.items():
        if name in SHORTCUTS:
            group, option = SHORTCUTS[name]
            values[group][option] = value
    resolved: dict[str, Any] = {}
    for group, cls in _GROUPS.items():
        given = groups[group]
        flat = [k for k, (g, _) in SHORTCUTS.items() if g == group and k in shortcuts]
        if given is not None and not isinstance(given, cls):
            hint = " (or True / False)" if group == "verify" else ""
            raise InputError(f"optimize({group}=...) takes a graphopt.{cls.__name__}(...){hint}, got "
                             f"{type(given).__name__}")
        if given is not None and flat:
            raise InputError(f"optimize() got {group}={cls.__name__}(...) and {', '.join(f'{k}=' for k in flat)}, "
                             f"which is part of it: give {'them' if len(flat) > 1 else 'it'} inside "
                             f"{cls.__name__}({', '.join(f'{SHORTCUTS[k][1]}=...' for k in flat)})")
        resolved[group] = given if given is not None else cls(**values[group])
    compression = {k: v for k, v in shortcuts.items() if k in COMPRESSION_SHORTCUTS}
    return OptimizeOptions(compression=compression, **resolved)


def with_lowering(target: Target, lowering: object | None) -> Target:
    """``target`` with its lowering config replaced by ``lowering`` (a copy; ``target`` itself is unchanged).

    ``lowering`` must be the target's own config type (``CpuLowering`` for ``cpu``,
    ``GpuLowering`` for ``gpu``, ``OnnxLowering`` for ``onnx``).
    """
    if lowering is None:
        return target
    current = target.lowering
    if current is None:
        raise InputError(f"target {target.name!r} has no lowering options; drop lowering=")
    if type(lowering) is not type(current):
        raise InputError(f"target {target.name!r} takes lowering={type(current).__name__}(...), got "
                         f"{type(lowering).__name__}; pick the target that goes with it, or that target's config")
    return target.with_lowering(lowering)  # type: ignore[arg-type]
