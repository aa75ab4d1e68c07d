"""Activation observers: watch calibration values and choose int8 quantization parameters.

Activations are quantized asymmetrically to ``uint8`` (``[0, 255]``, one scale and zero point
per tensor): that is the layout both the oneDNN int8 kernels of the ``cpu`` target and
onnxruntime's QLinear/QGemm kernels run fastest. Weights are quantized symmetrically to
``int8`` (``[-127, 127]``, zero point 0), per output channel by default
(``weight_qparams``).

Observers (``make_observer(name)``):

- ``minmax``: the running minimum and maximum of every value seen;
- ``moving-average``: an exponential moving average of each batch's minimum and maximum
  (``averaging_constant``), which forgets a single outlier batch;
- ``percentile``: the range holding ``percentile`` percent of the values (from a histogram),
  clipping rare outliers;
- ``entropy``: the clipping threshold minimizing the KL divergence between the histogram of
  the values and that of their quantized form (TensorRT's calibration).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from graphopt.errors import InputError

__all__ = [
    "ACTIVATION_QMAX",
    "ACTIVATION_QMIN",
    "OBSERVERS",
    "WEIGHT_QMAX",
    "WEIGHT_QMIN",
    "EntropyObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "QParams",
    "make_observer",
    "qparams_from_range",
    "quantize_weight",
]

ACTIVATION_QMIN, ACTIVATION_QMAX = 0, 255
"""Activations: asymmetric uint8."""
WEIGHT_QMIN, WEIGHT_QMAX = -127, 127
"""Weights: symmetric int8 (the -128 code is left unused so the range is symmetric)."""
_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class QParams:
    """One tensor's activation quantization: ``q = clamp(round(x / scale) + zero_point, 0, 255)``."""

    scale: float
    zero_point: int


def qparams_from_range(low: float, high: float) -> QParams:
    """Asymmetric uint8 parameters for values in ``[low, high]`` (the range always includes 0)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InputError(
            f"an activation took non-finite values (range [{low}, {high}]) during calibration: check the "
            "calibration data for NaN/inf, or leave that layer in float (Int8Static(skip=[...]))"
        )
    scale = max((high - low) / (ACTIVATION_QMAX - ACTIVATION_QMIN), _EPS)
    zero_point = round(ACTIVATION_QMIN - low / scale)
    return QParams(scale, min(max(zero_point, ACTIVATION_QMIN), ACTIVATION_QMAX))


class Observer(ABC):
    """Records the values one activation takes during calibration; ``qparams()`` picks its range."""

    def __init__(self) -> None:
        self.count = 0

    @abstractmethod
    def update(self, value: torch.Tensor) -> None:
        """Take one more calibration value of the activation."""

    @abstractmethod
    def range(self) -> tuple[float, float]:
        """The ``(low, high)`` range to quantize to."""

    def qparams(self) -> QParams:
        """Asymmetric uint8 scale and zero point for the chosen range."""
        if self.count == 0:
            raise InputError("an observer saw no calibration values; the layer was never reached on the data")
        return qparams_from_range(*self.range())


class MinMaxObserver(Observer):
    """Range = the minimum and maximum over every calibration value."""

    def __init__(self) -> None:
        super().__init__()
        self.low, self.high = math.inf, -math.inf

    def update(self, value: torch.Tensor) -> None:
        """Widen the range to the value's minimum and maximum."""
        low, high = torch.aminmax(value.detach().float())
        self.low, self.high = min(self.low, float(low)), max(self.high, float(high))
        self.count += 1

    def range(self) -> tuple[float, float]:
        """The smallest and largest value seen."""
        return self.low, self.high


class MovingAverageMinMaxObserver(Observer):
    """Range = an exponential moving average of each batch's minimum and maximum."""

    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        self.averaging_constant = averaging_constant
        self.low, self.high = 0.0, 0.0

    def update(self, value: torch.Tensor) -> None:
        """Move the averaged range towards this value's minimum and maximum."""
        low, high = (float(v) for v in torch.aminmax(value.detach().float()))
        if self.count == 0:
            self.low, self.high = low, high
        else:
            c = self.averaging_constant
            self.low += c * (low - self.low)
            self.high += c * (high - self.high)
        self.count += 1

    def range(self) -> tuple[float, float]:
        """The averaged minimum and maximum."""
        return self.low, self.high


class _HistogramObserver(Observer):
    """Keeps a histogram of the values over a range that widens (re-binning) as new values arrive."""

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        self.bins = bins
        self.histogram = torch.zeros(bins, dtype=torch.float64)
        self.low, self.high = 0.0, 0.0

    def update(self, value: torch.Tensor) -> None:
        """Add the value to the histogram, widening (re-binning) it when the value falls outside."""
        data = value.detach().float().flatten()
        low, high = (float(v) for v in torch.aminmax(data))
        low, high = min(low, self.low), max(high, self.high)
        if high <= low:
            high = low + _EPS
        if self.count and (low < self.low or high > self.high):
            self.histogram = self._rebin(low, high)
        self.low, self.high = low, high
        self.histogram += torch.histc(data, self.bins, low, high).double()
        self.count += 1

    def _rebin(self, low: float, high: float) -> torch.Tensor:
        """Move the old counts into bins over the wider range ``[low, high]`` (each to its bin centre)."""
        width = (self.high - self.low) / self.bins
        centres = self.low + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)
        index = ((centres - low) / (high - low) * self.bins).long().clamp(0, self.bins - 1)
        return torch.zeros(self.bins, dtype=torch.float64).index_add_(0, index, self.histogram)

    def edges(self) -> torch.Tensor:
        """The ``bins + 1`` bin edges."""
        return torch.linspace(self.low, self.high, self.bins + 1, dtype=torch.float64)


class PercentileObserver(_HistogramObserver):
    """Range = the central ``percentile`` percent of the values (rare outliers are clipped)."""

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        if not 50.0 < percentile <= 100.0:
            raise InputError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        """The range between the lower and upper tail percentiles of the histogram."""
        cumulative = torch.cumsum(self.histogram, 0)
        total = float(cumulative[-1])
        tail = total * (100.0 - self.percentile) / 100.0 / 2
        edges = self.edges()
        lower = int(torch.searchsorted(cumulative, torch.tensor(tail, dtype=torch.float64)))
        upper = int(torch.searchsorted(cumulative, torch.tensor(total - tail, dtype=torch.float64)))
        return float(edges[lower]), float(edges[min(upper + 1, self.bins)])


class EntropyObserver(_HistogramObserver):
    """Range = the clipping that minimizes the KL divergence between values and their quantized form.

    Candidate ranges keep the zero point of the full range and shrink both ends together
    (``candidates`` steps); for each, the clipped histogram is merged into 256 levels and
    expanded back, and the range whose distribution stays closest (KL) to the clipped
    original is chosen.
    """

    def __init__(self, bins: int = 2048, candidates: int = 64) -> None:
        super().__init__(bins)
        self.candidates = candidates

    def range(self) -> tuple[float, float]:
        """The candidate clipping range with the smallest KL divergence."""
        hist = self.histogram
        levels = ACTIVATION_QMAX - ACTIVATION_QMIN + 1
        zero_bin = round(-self.low / (self.high - self.low) * self.bins) if self.high > self.low else 0
        zero_bin = min(max(zero_bin, 0), self.bins)
        best, best_range = math.inf, (self.low, self.high)
        width = (self.high - self.low) / self.bins
        for step in range(self.candidates):
            keep = 1.0 - step / (self.candidates * 1.25)  # shrink down to 20% of the full range
            start = max(0, int(zero_bin - zero_bin * keep))
            stop = min(self.bins, math.ceil(zero_bin + (self.bins - zero_bin) * keep))
            if stop - start < levels:
                break
            divergence = _clipped_kl(hist, start, stop, levels)
            if divergence < best:
                best = divergence
                best_range = (self.low + start * width, self.low + stop * width)
        return best_range


def _clipped_kl(hist: torch.Tensor, start: int, stop: int, levels: int) -> float:
    """KL(P || Q): P = hist clipped to bins [start, stop) (outliers folded into the ends), Q = P quantized."""
    reference = hist[start:stop].clone()
    reference[0] += hist[:start].sum()
    reference[-1] += hist[stop:].sum()
    span = stop - start
    owner = (torch.arange(span, dtype=torch.float64) * levels / span).long().clamp(max=levels - 1)
    level_sum = torch.zeros(levels, dtype=torch.float64).index_add_(0, owner, hist[start:stop])
    nonzero = (hist[start:stop] > 0).double()
    level_count = torch.zeros(levels, dtype=torch.float64).index_add_(0, owner, nonzero)
    expanded = torch.where(nonzero > 0, level_sum[owner] / level_count[owner].clamp_min(1), 0.0)
    p = reference / reference.sum().clamp_min(1e-12)
    q = expanded / expanded.sum().clamp_min(1e-12)
    mask = p > 0
    q = q.clamp_min(1e-12)
    return float((p[mask] * (p[mask] / q[mask]).log()).sum())


OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving-average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
}
"""Observer names accepted by ``Int8Static(observer=...)``."""


def make_observer(name: str) -> Observer:
    """A fresh observer by name (one of ``OBSERVERS``); unknown names get an ``InputError`` listing them."""
    try:
        return OBSERVERS[name]()
    except KeyError:
        raise InputError(f"unknown observer {name!r}; choose one of: {', '.join(OBSERVERS)}") from None


def quantize_weight(weight: torch.Tensor, per_channel: bool, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights: ``(int8 values, float32 scales)``; one scale per slice along ``axis`` or one in all.

    The scales tensor has one entry per channel (per-channel) or a single entry (per-tensor).
    """
    w = weight.detach().float()
    if per_channel:
        reduce_dims = [d for d in range(w.dim()) if d != axis]
        amax = w.abs().amax(dim=reduce_dims) if reduce_dims else w.abs()
        scales = (amax / WEIGHT_QMAX).clamp_min(_EPS)
        shape = [1] * w.dim()
        shape[axis] = -1
        q = torch.round(w / scales.reshape(shape)).clamp(WEIGHT_QMIN, WEIGHT_QMAX).to(torch.int8)
        return q, scales.float()
    scale = (w.abs().max() / WEIGHT_QMAX).clamp_min(_EPS)
    q = torch.round(w / scale).clamp(WEIGHT_QMIN, WEIGHT_QMAX).to(torch.int8)
    return q, scale.reshape(1).float()
