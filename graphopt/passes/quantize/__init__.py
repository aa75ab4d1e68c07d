"""Quantization passes: int8 static / dynamic / weight-only, int4 group-wise, K-means clustering.

    graphopt.optimize(model, x, target="onnx", quantize="int8", calibration=batches)   # static PTQ
    graphopt.optimize(model, x, quantize="int8-dynamic")                               # no data needed
    graphopt.optimize(model, x, compress=[graphopt.Int8Static(observer="entropy")], calibration=loader)
    graphopt.optimize(model, x, compress=[graphopt.WeightOnly(bits=4, group_size=32)])

One class per scheme, at once the typed config and the lossy pass, with exactly that scheme's
options: ``Int8Static`` (``static``), ``Int8Dynamic`` (``dynamic``), ``WeightOnly``
(``weight_only``: int8 per channel, int4 group-wise) and ``KMeans`` (``kmeans``). Each is in
the pass registry (``SCHEME_PASSES``). ``Quantize(scheme=..., **options)`` builds one of them
by scheme name, for code written before they existed.

Every scheme rewrites the graph with explicit quantize / dequantize nodes (see
``placement``); the graph before lowering is the fake-quantized reference the pass manager
checks against the fidelity budget, and each target lowers the QDQ patterns to int8 kernels
(``lower_cpu``, ``lower_onnx``). See docs/quantization.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from graphopt.errors import InputError
from graphopt.passes.base import get_pass
from graphopt.passes.lossy.base import LossyPass

__all__ = ["SCHEMES", "SCHEME_PASSES", "Quantize", "quantize_pass"]

SCHEME_PASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "int8": ("quantize", {}),
    "int8-dynamic": ("quantize-dynamic", {}),
    "int8-weight-only": ("weight-only-quantize", {"bits": 8}),
    "int4-weight-only": ("weight-only-quantize", {"bits": 4}),
    "kmeans": ("kmeans-quantize", {}),
}
"""Each scheme name: the registered pass that runs it, and the options the name sets (a registered pass of yours
under one of these names runs the scheme instead)."""

SCHEMES = tuple(SCHEME_PASSES)
"""Names ``optimize(quantize=...)`` and ``Quantize(scheme=...)`` accept."""


# Capitalised: it was the quantization pass class, and existing code calls it by that name.
def Quantize(scheme: str = "int8", **options: Any) -> LossyPass:
    """The pass of quantization ``scheme`` with ``options``: ``Quantize(scheme="int8-dynamic", skip="head")``.

    Kept for code written before each scheme had its own class: ``Quantize(scheme="int8",
    observer="entropy")`` is ``Int8Static(observer="entropy")``, ``"int8-dynamic"`` builds
    ``Int8Dynamic``, ``"int8-weight-only"`` / ``"int4-weight-only"`` ``WeightOnly(bits=8 / 4)``,
    ``"kmeans"`` ``KMeans`` (``SCHEME_PASSES``). The scheme's class checks the options; one it
    does not have (``observer`` with ``"int8-dynamic"``) is an ``InputError`` naming the class
    to use. New code can use the classes themselves (``graphopt.Int8Static``...).
    """
    if scheme not in SCHEME_PASSES:
        raise InputError(f"unknown quantization scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    pass_name, preset = SCHEME_PASSES[scheme]
    cls = get_pass(pass_name)
    assert issubclass(cls, LossyPass), f"{pass_name!r} is registered as {cls.__name__}, not a lossy pass"
    own = {f.name for f in dataclasses.fields(cls)} - set(preset)
    unused = [name for name in options if name not in own]
    if unused:
        config = cls.__name__ + (f"({', '.join(f'{k}={v!r}' for k, v in preset.items())}, ...)" if preset else "")
        raise InputError(f"Quantize(scheme={scheme!r}) has no use for {', '.join(f'{n}=' for n in unused)}; "
                         f"leave {'them' if len(unused) > 1 else 'it'} unset, or use "
                         f"{'graphopt.' if cls.__module__.startswith('graphopt.') else ''}{config}, which takes "
                         "exactly that scheme's options")
    return cls(**preset, **options)


def quantize_pass(spec: str | LossyPass) -> LossyPass:
    """The lossy pass for ``optimize(quantize=spec)``: a scheme name (``SCHEMES``) or a pass instance."""
    if isinstance(spec, LossyPass):
        return spec
    if isinstance(spec, str):
        if spec in SCHEME_PASSES:
            return Quantize(scheme=spec)
        raise InputError(f"unknown quantization {spec!r}; choose one of: {', '.join(SCHEMES)}, "
                         "or pass a graphopt.Int8Static(...), WeightOnly(...)... / other LossyPass instance")
    raise InputError(f"quantize= takes a scheme name ({', '.join(SCHEMES)}) or a LossyPass instance, "
                     f"got {type(spec).__name__}")
