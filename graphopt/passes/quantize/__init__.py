"""Quantization passes: int8 static / dynamic / weight-only, int4 group-wise, K-means clustering.

    graphopt.optimize(model, x, target="onnx", quantize="int8", calibration=batches)   # static PTQ
    graphopt.optimize(model, x, quantize="int8-dynamic")                               # no data needed
    graphopt.optimize(model, x, quantize=Quantize(observer="entropy", per_channel=True), calibration=loader)
    graphopt.optimize(model, x, compress=[graphopt.WeightOnly(bits=4, group_size=32)])  # typed, one per scheme

Every scheme rewrites the graph with explicit quantize / dequantize nodes (see
``placement``); the graph before lowering is the fake-quantized reference the pass manager
checks against the fidelity budget, and each target lowers the QDQ patterns to int8 kernels
(``lower_cpu``, ``lower_onnx``). See docs/quantization.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from graphopt.errors import InputError
from graphopt.passes.base import get_pass
from graphopt.passes.lossy.base import CalibrationData, LossyPass, LossyPlan
from graphopt.passes.quantize.observers import OBSERVERS
from graphopt.passes.quantize.placement import QUANTIZABLE

__all__ = ["SCHEMES", "Quantize", "quantize_pass"]

SCHEMES = ("int8", "int8-dynamic", "int8-weight-only", "int4-weight-only", "kmeans")
"""Names ``optimize(quantize=...)`` and ``Quantize(scheme=...)`` accept."""

_UNUSED_OPTIONS = {
    "int8": (),
    "int8-dynamic": ("observer", "ops", "max_calibration_batches"),
    "int8-weight-only": ("observer", "per_channel", "ops", "max_calibration_batches"),
    "int4-weight-only": ("observer", "per_channel", "ops", "max_calibration_batches"),
    "kmeans": ("observer", "per_channel", "ops", "max_calibration_batches", "embeddings"),
}
"""Per scheme, the ``Quantize`` options it has no use for (setting one is an error, not silently ignored)."""

_CONFIGS = {"int8": "Int8Static", "int8-dynamic": "Int8Dynamic", "int8-weight-only": "WeightOnly(bits=8, ...)",
            "int4-weight-only": "WeightOnly(bits=4, group_size=..., ...)", "kmeans": "KMeans"}
"""The typed config (``graphopt.passes.compress``) of each scheme, named in errors."""

_DELEGATES = {
    "int8-weight-only": ("weight-only-quantize", {"bits": 8}),
    "int4-weight-only": ("weight-only-quantize", {"bits": 4}),
    "kmeans": ("kmeans-quantize", {}),
}
"""The schemes other passes run: scheme -> (registered pass name, its options)."""


@dataclass(frozen=True)
class Quantize(LossyPass):
    """Quantize the model; the fields are the options.

    ``scheme``: ``"int8"`` (static post-training quantization: needs ``calibration`` data),
    ``"int8-dynamic"`` (activations quantized at run time), or one of the weight-only schemes
    (``"int8-weight-only"``, ``"int4-weight-only"``, ``"kmeans"``, run by their own passes).
    ``observer`` picks how static int8 chooses activation ranges: ``"minmax"``,
    ``"moving-average"``, ``"percentile"`` or ``"entropy"`` (KL). ``per_channel``: one weight
    scale per output channel (else one per tensor). ``ops``: the op families static int8
    quantizes (``conv``, ``linear``, ``matmul``, ``add``, ``concat``, ``pooling``). ``skip``:
    node names or module paths (``"classifier"``, ``"encoder.layer.11"``: everything under it) to
    keep in float, under every scheme; an entry that matches nothing is an error. ``max_calibration_batches``
    caps the calibration batches observed (all when None). ``embeddings``: store embedding
    tables as int8 rows with per-row scales (weight-only; most of a small transformer's size).
    Setting an option the scheme has no use for (``observer`` with ``"int8-dynamic"``...) is an
    ``InputError``. The typed configs of ``graphopt.passes.compress`` (``Int8Static``,
    ``Int8Dynamic``, ``WeightOnly``, ``KMeans``) carry exactly each scheme's options, including
    those ``Quantize`` cannot reach (weight-only ``group_size``, K-means ``clusters``).
    """

    name: ClassVar[str] = "quantize"

    scheme: str = "int8"
    observer: str = "minmax"
    per_channel: bool = True
    ops: tuple[str, ...] = tuple(QUANTIZABLE)
    skip: tuple[str, ...] = ()
    max_calibration_batches: int | None = None
    embeddings: bool = True

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise InputError(f"unknown quantization scheme {self.scheme!r}; choose one of: {', '.join(SCHEMES)}")
        if self.observer not in OBSERVERS:
            raise InputError(f"unknown observer {self.observer!r}; choose one of: {', '.join(OBSERVERS)}")
        for field_name in ("ops", "skip"):
            value = getattr(self, field_name)
            if isinstance(value, (str, list)):
                object.__setattr__(self, field_name, (value,) if isinstance(value, str) else tuple(value))
        unknown = [op for op in self.ops if op not in QUANTIZABLE]
        if unknown:
            raise InputError(f"Quantize(ops=...) got unknown op famil{'ies' if len(unknown) > 1 else 'y'} "
                             f"{', '.join(map(repr, unknown))}; choose from: {', '.join(QUANTIZABLE)}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        unused = [name for name in _UNUSED_OPTIONS[self.scheme] if getattr(self, name) != defaults[name]]
        if unused:
            raise InputError(f"Quantize(scheme={self.scheme!r}) has no use for {', '.join(f'{n}=' for n in unused)}; "
                             f"leave {'them' if len(unused) > 1 else 'it'} unset, or use "
                             f"graphopt.{_CONFIGS[self.scheme]}, which takes exactly that scheme's options")

    def plan(self, gm: fx.GraphModule, data: CalibrationData) -> LossyPlan:
        """Observe (static int8) and decide the int8 form of every quantizable op of ``gm``."""
        if self.scheme == "int8":
            from graphopt.passes.quantize.static import plan_static

            return plan_static(gm, data, self.ops, self.observer, self.per_channel, self.skip,
                               self.max_calibration_batches, self.embeddings)
        if self.scheme == "int8-dynamic":
            from graphopt.passes.quantize.dynamic import plan_dynamic

            return plan_dynamic(gm, data, self.per_channel, self.skip, self.embeddings)
        return _delegate(self.scheme, embeddings=self.embeddings, skip=self.skip).plan(gm, data)


def _delegate(scheme: str, **shared: object) -> LossyPass:
    """The pass that runs ``scheme``, given those of the ``shared`` options it has a field for."""
    pass_name, options = _DELEGATES[scheme]
    cls = get_pass(pass_name)
    assert issubclass(cls, LossyPass), f"{pass_name!r} is registered as {cls.__name__}, not a lossy pass"
    accepted = {f.name for f in dataclasses.fields(cls)}
    return cls(**options, **{k: v for k, v in shared.items() if k in accepted})


def quantize_pass(spec: str | LossyPass) -> LossyPass:
    """The lossy pass for ``optimize(quantize=spec)``: a scheme name (``SCHEMES``) or a pass instance."""
    if isinstance(spec, LossyPass):
        return spec
    if isinstance(spec, str):
        if spec in ("int8", "int8-dynamic"):
            return Quantize(scheme=spec)
        if spec in _DELEGATES:
            return _delegate(spec)
        raise InputError(f"unknown quantization {spec!r}; choose one of: {', '.join(SCHEMES)}, "
                         "or pass a graphopt.passes.Quantize(...) / other LossyPass instance")
    raise InputError(f"quantize= takes a scheme name ({', '.join(SCHEMES)}) or a LossyPass instance, "
                     f"got {type(spec).__name__}")
