"""Compression schemes as typed configs, and the order ``optimize(compress=[...])`` applies them in.

    graphopt.optimize(model, x, compress=[Prune(0.5), Int8Dynamic()])
    graphopt.optimize(model, x, compress=[WeightOnly(bits=4, group_size=32)], target="onnx")
    graphopt.optimize(model, x, compress=[Int8Static(observer="entropy")], calibration=loader)

One config per scheme, each with only the options that scheme has, checked when it is built
(a bad value is an ``InputError`` that lists what is allowed):

========================  ===========================================================  ==========
config                    scheme                                                       stage
========================  ===========================================================  ==========
``Prune``                 structured / unstructured pruning (``graphopt.passes.prune``)  prune
``Int8Static``            static int8 post-training quantization (needs calibration)     quantize
``Int8Dynamic``           dynamic int8: activations quantized at run time                quantize
``WeightOnly``            int8 per channel / int4 group-wise weights                     quantize
``KMeans``                K-means weight clustering (a codebook per layer)               quantize
``ReducedPrecision``      bf16 / fp16 matrix layers (``graphopt.passes.precision``)      precision
========================  ===========================================================  ==========

``Prune`` and ``ReducedPrecision`` are the lossy passes themselves (their fields are already
exactly their options); the quantization configs build a ``Quantize``, ``WeightOnlyQuantize``
or ``KMeansQuantize`` pass.

**Order.** Whatever order they are given in, the schemes run by stage (``STAGES``): prune
first, so that quantization scales and codebooks are computed on the weights that remain;
then quantize; then reduced precision, which takes the layers still in float (quantized
layers read their weights through dequantize nodes and are left alone). A graph is
compressed at most once per stage: two quantization schemes (or two prunings) in one call are
an ``InputError``. The shortcuts ``optimize(prune=0.5, quantize="int8", precision="bf16")``
become the same configs (``SCHEME_CONFIGS``) and follow the same rules.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeAlias

from graphopt.errors import InputError
from graphopt.passes.lossy.base import LossyPass
from graphopt.passes.precision import ReducedPrecision, precision_pass
from graphopt.passes.prune import Prune, prune_pass
from graphopt.passes.quantize import Quantize, quantize_pass
from graphopt.passes.quantize.kmeans import KMeansQuantize
from graphopt.passes.quantize.observers import OBSERVERS
from graphopt.passes.quantize.placement import QUANTIZABLE
from graphopt.passes.quantize.selection import skip_entries
from graphopt.passes.quantize.weight_only import GROUP_SIZES, WeightOnlyQuantize

__all__ = [
    "SCHEME_CONFIGS",
    "STAGES",
    "Compression",
    "CompressionSpec",
    "CompressionStep",
    "Int8Dynamic",
    "Int8Static",
    "KMeans",
    "Prune",
    "ReducedPrecision",
    "WeightOnly",
    "compression_steps",
    "stage_of",
]

Stage = Literal["prune", "quantize", "precision"]

STAGES: tuple[Stage, ...] = ("prune", "quantize", "precision")
"""The order compression schemes are applied in, whatever order they are given in."""


class Compression(ABC):
    """Base of the quantization configs: a scheme's options, checked on construction; ``lossy_pass()`` runs it."""

    stage: ClassVar[Stage]

    @abstractmethod
    def lossy_pass(self) -> LossyPass:
        """The lossy pass that applies this scheme (checked against the fidelity budget by the pass manager)."""


def _tuple(value: str | Sequence[str]) -> tuple[str, ...]:
    """A tuple-of-names option given as one string or any sequence (one string is one entry)."""
    return skip_entries(value)


def _check_flags(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise InputError(f"{type(config).__name__}({name}=...) must be True or False, got {value!r}")


def _check_ops(config: str, ops: tuple[str, ...]) -> None:
    unknown = [op for op in ops if op not in QUANTIZABLE]
    if unknown:
        raise InputError(f"{config}(ops=...) got unknown op famil{'ies' if len(unknown) > 1 else 'y'} "
                         f"{', '.join(map(repr, unknown))}; choose from: {', '.join(QUANTIZABLE)}")


def _check_min_elements(config: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{config}(min_elements=...) must be an integer >= 0 (weights with fewer elements stay "
                         f"float), got {value!r}")


@dataclass(frozen=True)
class Int8Static(Compression):
    """Static int8 post-training quantization: activation ranges observed on calibration data.

    ``observer``: how activation ranges are chosen, ``"minmax"``, ``"moving-average"``,
    ``"percentile"`` or ``"entropy"`` (KL). ``per_channel``: one weight scale per output channel
    (else one per tensor). ``ops``: the op families quantized (``conv``, ``linear``, ``matmul``,
    ``add``, ``concat``, ``pooling``). ``skip``: node names or module paths kept in float.
    ``max_calibration_batches``: cap on the batches observed (all when None). ``embeddings``:
    store embedding tables as int8 rows. Needs ``optimize(..., calibration=batches)``.
    """

    stage: ClassVar[Stage] = "quantize"

    observer: str = "minmax"
    per_channel: bool = True
    ops: tuple[str, ...] = tuple(QUANTIZABLE)
    skip: tuple[str, ...] = ()
    max_calibration_batches: int | None = None
    embeddings: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", _tuple(self.ops))
        object.__setattr__(self, "skip", _tuple(self.skip))
        if self.observer not in OBSERVERS:
            raise InputError(f"Int8Static(observer=...) must be one of: {', '.join(OBSERVERS)}; got {self.observer!r}")
        _check_ops("Int8Static", self.ops)
        _check_flags(self, "per_channel", "embeddings")
        if self.max_calibration_batches is not None and (
                isinstance(self.max_calibration_batches, bool) or not isinstance(self.max_calibration_batches, int)
                or self.max_calibration_batches < 1):
            raise InputError("Int8Static(max_calibration_batches=...) must be a positive integer, or None for every "
                             f"batch; got {self.max_calibration_batches!r}")

    def lossy_pass(self) -> Quantize:
        """A ``Quantize(scheme="int8")`` pass with these options."""
        return Quantize(scheme="int8", observer=self.observer, per_channel=self.per_channel, ops=self.ops,
                        skip=self.skip, max_calibration_batches=self.max_calibration_batches,
                        embeddings=self.embeddings)


@dataclass(frozen=True)
class Int8Dynamic(Compression):
    """Dynamic int8: int8 weights; activations quantized at run time from each call's range (no data needed).

    Quantizes linear layers and products by a constant weight. ``per_channel``: one weight scale
    per output channel (else one per tensor). ``skip``: node names or module paths kept in
    float. ``embeddings``: store embedding tables as int8 rows.
    """

    stage: ClassVar[Stage] = "quantize"

    per_channel: bool = True
    skip: tuple[str, ...] = ()
    embeddings: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip", _tuple(self.skip))
        _check_flags(self, "per_channel", "embeddings")

    def lossy_pass(self) -> Quantize:
        """A ``Quantize(scheme="int8-dynamic")`` pass with these options."""
        return Quantize(scheme="int8-dynamic", per_channel=self.per_channel, skip=self.skip,
                        embeddings=self.embeddings)


@dataclass(frozen=True)
class WeightOnly(Compression):
    """Weight-only quantization; activations stay float (no data needed).

    ``bits=8``: symmetric int8, one scale per output channel (linear, products by a constant,
    convolutions). ``bits=4``: asymmetric 4-bit groups of ``group_size`` input features (32, 64,
    128 or 256; 128 when not given) with a scale and zero point per group, for matrix
    products; layers whose input features are not a multiple of ``group_size`` stay float.
    ``min_elements``: smaller weights stay float. ``embeddings``: store embedding tables as int8
    rows. ``skip``: node names or module paths kept in float.
    """

    stage: ClassVar[Stage] = "quantize"

    bits: int = 8
    group_size: int | None = None
    min_elements: int = 1024
    embeddings: bool = True
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip", _tuple(self.skip))
        if self.bits not in (4, 8) or isinstance(self.bits, bool):
            raise InputError(f"WeightOnly(bits=...) must be 8 (int8 per output channel) or 4 (int4 groups of "
                             f"group_size input features), got {self.bits!r}")
        if self.bits == 8 and self.group_size is not None:
            raise InputError(f"WeightOnly(group_size={self.group_size!r}) is for bits=4: int8 weights have one scale "
                             "per output channel. Leave group_size unset, or use bits=4.")
        if self.bits == 4:
            if self.group_size is None:
                object.__setattr__(self, "group_size", 128)
            elif self.group_size not in GROUP_SIZES or isinstance(self.group_size, bool):
                raise InputError(f"WeightOnly(group_size=...) must be one of {', '.join(map(str, GROUP_SIZES))}, "
                                 f"got {self.group_size!r}")
        _check_min_elements("WeightOnly", self.min_elements)
        _check_flags(self, "embeddings")

    def lossy_pass(self) -> WeightOnlyQuantize:
        """A ``WeightOnlyQuantize`` pass with these options."""
        return WeightOnlyQuantize(bits=self.bits, group_size=self.group_size, min_elements=self.min_elements,
                                  embeddings=self.embeddings, skip=self.skip)


@dataclass(frozen=True)
class KMeans(Compression):
    """K-means weight clustering: each layer's weights share ``clusters`` values (a codebook + indices).

    ``bits``: the width of a stored index, 8 (up to 256 clusters, the default) or 4 (up to 16,
    two indices per byte). ``clusters``: the codebook size, ``2**bits`` when not given; 2..16
    for ``bits=4``, 17..256 for ``bits=8``. ``iterations`` caps the Lloyd steps, ``seed`` fixes the
    k-means++ seeding, ``init_sample`` caps the weights it seeds from. ``min_elements``: smaller
    weights stay float. ``skip``: node names or module paths kept in float.
    """

    stage: ClassVar[Stage] = "quantize"

    bits: int = 8
    clusters: int | None = None
    iterations: int = 10
    seed: int = 0
    init_sample: int = 16384
    min_elements: int = 1024
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip", _tuple(self.skip))
        if self.bits not in (4, 8) or isinstance(self.bits, bool):
            raise InputError(f"KMeans(bits=...) is the width of a stored index: 8 (up to 256 clusters) or 4 (up to "
                             f"16), got {self.bits!r}")
        low, high = (2, 16) if self.bits == 4 else (17, 256)
        if self.clusters is None:
            object.__setattr__(self, "clusters", high)
        elif isinstance(self.clusters, bool) or not isinstance(self.clusters, int) \
                or not low <= self.clusters <= high:
            raise InputError(f"KMeans(bits={self.bits}, clusters=...) must be in {low}..{high}, got {self.clusters!r}"
                             + ("; 16 clusters or fewer fit 4-bit indices: use bits=4" if self.bits == 8 else
                                "; more than 16 clusters need bits=8"))
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise InputError(f"KMeans(iterations=...) must be an integer >= 0, got {self.iterations!r}")
        if isinstance(self.init_sample, bool) or not isinstance(self.init_sample, int) or self.init_sample < 1:
            raise InputError(f"KMeans(init_sample=...) must be a positive integer, got {self.init_sample!r}")
        _check_min_elements("KMeans", self.min_elements)

    def lossy_pass(self) -> KMeansQuantize:
        """A ``KMeansQuantize`` pass with these options."""
        return KMeansQuantize(clusters=self.clusters, iterations=self.iterations, seed=self.seed,  # type: ignore[arg-type]
                              init_sample=self.init_sample, min_elements=self.min_elements, skip=self.skip)


CompressionSpec: TypeAlias = "Compression | Prune | ReducedPrecision"
"""What ``optimize(compress=[...])`` takes: a quantization config, a ``Prune`` or a ``ReducedPrecision``."""

SCHEME_CONFIGS: dict[str, Compression] = {
    "int8": Int8Static(),
    "int8-dynamic": Int8Dynamic(),
    "int8-weight-only": WeightOnly(bits=8),
    "int4-weight-only": WeightOnly(bits=4),
    "kmeans": KMeans(),
}
"""The config each ``optimize(quantize="...")`` scheme name stands for (one per name of ``quantize.SCHEMES``)."""

_QUANTIZE_PASSES = (Quantize, WeightOnlyQuantize, KMeansQuantize)


def stage_of(spec: object) -> Stage | None:
    """The stage a config or lossy pass of graphopt's belongs to (None for anything else, e.g. a pass of yours)."""
    if isinstance(spec, Compression):
        return spec.stage
    if isinstance(spec, Prune):
        return "prune"
    if isinstance(spec, _QUANTIZE_PASSES):
        return "quantize"
    if isinstance(spec, ReducedPrecision):
        return "precision"
    return None


@dataclass(frozen=True)
class CompressionStep:
    """One scheme of a compression plan: its stage, what the user gave (``source``) and the pass that runs it."""

    stage: Stage
    source: str
    lossy: LossyPass


def _describe(spec: object) -> str:
    """``spec`` for an error message: a config with only the options that differ from the defaults."""
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changed = [f"{f.name}={getattr(spec, f.name)!r}" for f in dataclasses.fields(spec)
                   if f.default is dataclasses.MISSING or getattr(spec, f.name) != f.default]
        return f"{type(spec).__name__}({', '.join(changed)})"
    return repr(spec)


def _from_compress(compress: Any) -> list[CompressionStep]:
    items = [compress] if isinstance(compress, (Compression, LossyPass)) else compress
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise InputError(f"compress= takes a list of compression configs such as [Prune(0.5), Int8Dynamic()], got "
                         f"{compress!r}" + (f"; for a scheme name use quantize={compress!r}"
                                            if isinstance(compress, str) else ""))
    steps = []
    for item in items:
        stage = stage_of(item)
        if stage is None:
            hint = ("; put a lossy pass of your own in passes=[..., MyPass()] (or quantize=MyPass())"
                    if isinstance(item, LossyPass) else
                    f"; for a scheme name use quantize={item!r}" if isinstance(item, str) else "")
            raise InputError(f"compress= got {_describe(item)}; it takes Prune, Int8Static, Int8Dynamic, WeightOnly, "
                             f"KMeans or ReducedPrecision configs{hint}")
        lossy = item.lossy_pass() if isinstance(item, Compression) else item
        steps.append(CompressionStep(stage, _describe(item), lossy))
    return steps


def _from_shortcuts(prune: Any, quantize: Any, precision: Any) -> list[CompressionStep]:
    steps = []
    if prune is not None:
        steps.append(CompressionStep("prune", f"prune={prune!r}", prune_pass(prune)))
    if quantize is not None:
        config = SCHEME_CONFIGS.get(quantize) if isinstance(quantize, str) else None
        lossy = config.lossy_pass() if config is not None else quantize_pass(quantize)
        steps.append(CompressionStep("quantize", f"quantize={_describe(quantize)}", lossy))
    if precision is not None:
        steps.append(CompressionStep("precision", f"precision={precision!r}", precision_pass(precision)))
    return steps


def compression_steps(compress: Any = (), *, prune: Any = None, quantize: Any = None, precision: Any = None,
                      target: str | None = None) -> list[CompressionStep]:
    """The compression asked for, one step per stage, in ``STAGES`` order.

    ``compress`` is a config or a list of them; ``prune``, ``quantize`` and ``precision`` are the
    ``optimize`` shortcuts (a ratio, a scheme name, a dtype name, or a lossy pass). Raises
    ``InputError`` for anything else, and for two schemes of one stage (two quantizations...).
    ``target`` (a target's name) refuses reduced precision on ``onnx``, which has no such kernels.
    """
    steps = _from_compress(compress) + _from_shortcuts(prune, quantize, precision)
    by_stage: dict[str, CompressionStep] = {}
    for step in steps:
        if step.stage in by_stage:
            kind = {"prune": "prunings", "quantize": "quantization schemes", "precision": "reduced precisions"}
            raise InputError(f"two {kind[step.stage]} asked for: {by_stage[step.stage].source} and {step.source}. A "
                             f"graph is compressed once per stage ({', '.join(STAGES)}, in that order): keep one.")
        by_stage[step.stage] = step
    if "precision" in by_stage:
        precision_pass(by_stage["precision"].lossy, target)  # type: ignore[arg-type]
    return [by_stage[stage] for stage in STAGES if stage in by_stage]
