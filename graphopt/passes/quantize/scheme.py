"""What the quantization scheme passes share: their base class and the checks of the options they have in common.

Each scheme is one frozen dataclass that is at once the user's typed config and the lossy pass
that runs it (``Int8Static``, ``Int8Dynamic``, ``WeightOnly``, ``KMeans``): its fields are
exactly its options, checked in ``__post_init__``. A bad value is an ``InputError`` that names
the class and the option, and says what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from graphopt.errors import InputError
from graphopt.passes.lossy.base import LossyPass
from graphopt.passes.quantize.placement import QUANTIZABLE
from graphopt.passes.quantize.selection import skip_entries

__all__ = ["QuantizationScheme", "check_count", "check_flags", "check_ops", "names_option"]


@dataclass(frozen=True)
class QuantizationScheme(LossyPass):
    """Base of the quantization passes: the fields are the scheme's options, ``scheme`` its name in ``SCHEMES``."""

    @property
    def scheme(self) -> str:
        """The name ``optimize(quantize=...)`` knows this scheme by (``"int8"``, ``"int4-weight-only"``...)."""
        raise NotImplementedError(f"{type(self).__name__} must say which scheme it runs")


def names_option(config: object, name: str) -> None:
    """Store option ``name`` of ``config`` (a tuple of names, given as one string or any sequence) as a tuple."""
    value: str | Sequence[str] = getattr(config, name)
    object.__setattr__(config, name, skip_entries(value))


def check_flags(config: object, *names: str) -> None:
    """Options ``names`` of ``config`` must be True or False."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise InputError(f"{type(config).__name__}({name}=...) must be True or False, got {value!r}")


def check_ops(config: object) -> None:
    """``config.ops`` must name op families quantization knows (``placement.QUANTIZABLE``)."""
    unknown = [op for op in config.ops if op not in QUANTIZABLE]  # type: ignore[attr-defined]
    if unknown:
        raise InputError(f"{type(config).__name__}(ops=...) got unknown op famil{'ies' if len(unknown) > 1 else 'y'} "
                         f"{', '.join(map(repr, unknown))}; choose from: {', '.join(QUANTIZABLE)}")


def check_count(config: object, name: str, minimum: int, note: str = "", *, optional: bool = False) -> None:
    """Option ``name`` of ``config`` must be an integer >= ``minimum`` (or None when ``optional``).

    ``note`` follows the requirement in the message (what the option means, what None does).
    """
    value = getattr(config, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InputError(f"{type(config).__name__}({name}=...) must be {wanted}{note}, got {value!r}")
