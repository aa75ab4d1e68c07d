"""Compression schemes as typed configs, and the order ``optimize(compress=[...])`` applies them in.

    graphopt.optimize(model, x, compress=[Prune(0.5), Int8Dynamic()])
    graphopt.optimize(model, x, compress=[WeightOnly(bits=4, group_size=32)], target="onnx")
    graphopt.optimize(model, x, compress=[Int8Static(observer="entropy")], calibration=loader)

One config per scheme, each with only the options that scheme has, checked when it is built
(a bad value is an ``InputError`` that lists what is allowed). Each config is the lossy pass
that applies it, defined with its family:

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

The quantization schemes live in ``graphopt.passes.quantize`` (``static``, ``dynamic``,
``weight_only``, ``kmeans``); this module says which stage each belongs to and in which order
the stages run.

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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from graphopt.errors import InputError
from graphopt.passes.lossy.base import LossyPass
from graphopt.passes.precision import ReducedPrecision, precision_pass
from graphopt.passes.prune import Prune, prune_pass
from graphopt.passes.quantize import SCHEMES, quantize_pass
from graphopt.passes.quantize.dynamic import Int8Dynamic
from graphopt.passes.quantize.kmeans import KMeans
from graphopt.passes.quantize.scheme import QuantizationScheme
from graphopt.passes.quantize.static import Int8Static
from graphopt.passes.quantize.weight_only import WeightOnly

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

Compression = QuantizationScheme
"""Base of the quantization configs (``Int8Static``, ``Int8Dynamic``, ``WeightOnly``, ``KMeans``)."""

CompressionSpec: TypeAlias = "Compression | Prune | ReducedPrecision"
"""What ``optimize(compress=[...])`` takes: a quantization config, a ``Prune`` or a ``ReducedPrecision``."""

SCHEME_CONFIGS: dict[str, LossyPass] = {name: quantize_pass(name) for name in SCHEMES}
"""The config each ``optimize(quantize="...")`` scheme name stands for (``quantize.SCHEME_PASSES``)."""


def stage_of(spec: object) -> Stage | None:
    """The stage a config or lossy pass of graphopt's belongs to (None for anything else, e.g. a pass of yours)."""
    if isinstance(spec, Prune):
        return "prune"
    if isinstance(spec, QuantizationScheme):
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
    items = [compress] if isinstance(compress, LossyPass) else compress
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
        steps.append(CompressionStep(stage, _describe(item), item))
    return steps


def _from_shortcuts(prune: Any, quantize: Any, precision: Any) -> list[CompressionStep]:
    steps = []
    if prune is not None:
        steps.append(CompressionStep("prune", f"prune={prune!r}", prune_pass(prune)))
    if quantize is not None:
        steps.append(CompressionStep("quantize", f"quantize={_describe(quantize)}", quantize_pass(quantize)))
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
