"""K-means weight clustering: each layer's weights share ``clusters`` values (a codebook + indices).

``KMeans(clusters=16)`` (or ``KMeans(bits=4)``) replaces every weight of a layer by the nearest
of 16 values learnt for that layer (4-bit indices, two per byte); ``clusters=256`` (the
default) gives 8-bit indices. ``KMeans`` is the pass; its fields are its options. The
codebook is found by 1-D k-means on the layer's weights: k-means++ seeding (on a fixed-seed
sample of at most ``init_sample`` weights, so huge embedding tables seed fast), then at most
``iterations`` Lloyd steps over all weights, stopping early once no centroid moves. In 1-D
the nearest centroid is found by binary search among the midpoints of the sorted codebook,
so one step costs ``O(n log k)``. Deterministic: the same weights and ``seed`` give the same
codebook.

In the IR the layer reads ``graphopt_weights.dequantize_codebook(indices, codebook, bits,
shape)``; the plan's units report per layer the bytes before/after, the size ratio, the number
of distinct values and the weight error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from graphopt.errors import InputError
from graphopt.ir.threads import torch_threads
from graphopt.passes.base import PassResult
from graphopt.passes.lossy.base import CalibrationData, LossyPlan, LossyUnit
from graphopt.passes.quantize.scheme import QuantizationScheme, check_count, names_option
from graphopt.passes.quantize.selection import SkipList
from graphopt.passes.quantize.weight_ops import (
    DEQUANTIZE_CODEBOOK,
    dequantize_codebook_reference,
    pack_nibbles,
    unpack_nibbles,
)
from graphopt.passes.quantize.weight_sites import (
    WeightSite,
    find_weight_sites,
    finish,
    near_misses_by_reason,
    replace_weight,
    tensor_bytes,
)
from graphopt.report.progress import progress

__all__ = ["KMeans", "KMeansQuantize", "kmeans_1d"]


def _kmeans_plus_plus(sample: torch.Tensor, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on 1-D ``sample``: each next centroid drawn with probability ∝ squared distance."""
    first = int(torch.randint(sample.numel(), (1,), generator=generator))
    centroids = [sample[first]]
    distance = (sample - centroids[0]).pow(2)
    for _ in range(1, clusters):
        cumulative = distance.cumsum(0)
        total = float(cumulative[-1])
        if total <= 0:  # fewer distinct values than clusters
            break
        draw = torch.rand((1,), generator=generator, dtype=cumulative.dtype) * total
        pick = min(int(torch.searchsorted(cumulative, draw, right=True)), sample.numel() - 1)
        centroids.append(sample[pick])
        distance = torch.minimum(distance, (sample - sample[pick]).pow(2))
    return torch.stack(centroids).sort().values


def _assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (``centroids`` sorted) for every value."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(values, midpoints)


def _histogram(flat: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bin centres of mass, counts, sums) of ``flat`` over ``bins`` equal-width bins of its range."""
    low, high = flat.min(), flat.max()
    width = (high - low).clamp_min(torch.finfo(flat.dtype).tiny) / bins
    which = ((flat - low) / width).long().clamp_(0, bins - 1)
    counts = torch.bincount(which, minlength=bins).double()
    sums = torch.bincount(which, weights=flat.double(), minlength=bins)
    grid = low.double() + (torch.arange(bins, dtype=torch.float64) + 0.5) * width.double()
    return torch.where(counts > 0, sums / counts.clamp_min(1), grid), counts, sums


def kmeans_1d(values: torch.Tensor, clusters: int, iterations: int = 10, seed: int = 0,
              init_sample: int = 16384, bins: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Cluster 1-D ``values`` into at most ``clusters`` centroids.

    Returns ``(codebook [k] sorted, indices int64 like values, Lloyd iterations run)``; ``k``
    is smaller than ``clusters`` only when ``values`` has fewer distinct values. The Lloyd
    steps run on a ``bins``-bin histogram of the values (each bin moves as a whole, with its
    exact count and sum), so a step costs ``O(bins log k)`` however large the layer; the final
    assignment of every value to its nearest centroid is exact.
    """
    with torch_threads(1):  # many small ops: waking worker threads costs more than they save
        return _kmeans_1d(values.detach().reshape(-1).float(), clusters, iterations, seed, init_sample,
                          min(bins, max(1024, values.numel() // 4)), values.shape)


def _kmeans_1d(flat: torch.Tensor, clusters: int, iterations: int, seed: int, init_sample: int, bins: int,
               shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, int]:
    generator = torch.Generator().manual_seed(seed)
    sample = flat
    if flat.numel() > init_sample:
        sample = flat[torch.randint(flat.numel(), (init_sample,), generator=generator)]
    centroids = _kmeans_plus_plus(sample.double(), clusters, generator)
    centres, counts, sums = _histogram(flat, bins)
    steps = 0
    for steps in range(1, iterations + 1):  # noqa: B007 - the count is returned
        owner = _assign(centres, centroids)
        cluster_sums = torch.zeros_like(centroids).index_add_(0, owner, sums)
        cluster_counts = torch.zeros_like(centroids).index_add_(0, owner, counts)
        updated = torch.where(cluster_counts > 0, cluster_sums / cluster_counts.clamp_min(1), centroids)
        updated = updated.sort().values
        moved = bool((updated - centroids).abs().max() > 0)
        centroids = updated
        if not moved:
            break
    return centroids, _assign(flat, centroids.float()).reshape(shape), steps


@dataclass
class _Clustered:
    site: WeightSite
    indices: torch.Tensor
    codebook: torch.Tensor
    bits: int


def _distinct_values(layer: _Clustered) -> int:
    """How many different values the clustered weight holds (the codebook entries in use)."""
    count = math.prod(layer.site.matrix.shape)
    flat = (unpack_nibbles(layer.indices) if layer.bits == 4 else layer.indices)[:count]
    used = torch.bincount(flat.long(), minlength=layer.codebook.numel()) > 0
    return int(layer.codebook[used].unique().numel())


@dataclass
class KMeansPlan(LossyPlan):
    """The clustered weights of every layer, computed once; ``apply`` swaps them in."""

    layers: dict[str, _Clustered]
    near_misses: dict[str, str]
    units: list[LossyUnit] = field(default_factory=list)

    def apply(self, gm: fx.GraphModule, skip: frozenset[str] = frozenset()) -> PassResult:
        """Make every layer not in ``skip`` read its weight through its codebook."""
        applied, before, after = 0, 0, 0
        for name, layer in self.layers.items():
            if name in skip:
                continue
            shape = [int(s) for s in layer.site.matrix.shape]

            def build(graph: fx.Graph, attrs: dict[str, fx.Node], bits: int = layer.bits,
                      shape: list[int] = shape) -> fx.Node:
                return graph.call_function(DEQUANTIZE_CODEBOOK, (attrs["indices"], attrs["codebook"], bits, shape))

            replace_weight(gm, layer.site, {"indices": layer.indices, "codebook": layer.codebook}, build)
            applied += 1
            before += tensor_bytes(layer.site.matrix)
            after += tensor_bytes(layer.indices) + tensor_bytes(layer.codebook)
        if applied:
            finish(gm)
        near = near_misses_by_reason("kmeans", self.near_misses.values())
        stats = {"clustered": applied, "skipped": len(skip & set(self.layers)),
                 "weight_bytes_before": before, "weight_bytes_after": after, "bytes_saved": before - after}
        return PassResult(changed=applied > 0, stats=stats, near_misses=near)

    def notes(self) -> list[str]:
        """Facts about the whole plan."""
        notes = ["K-means weights have no clustered-matmul kernel in PyTorch or onnxruntime: the targets expand "
                 "each codebook once when the model is loaded, so the gain is size on disk, not speed"]
        if self.near_misses:
            notes.append(f"{len(self.near_misses)} layer(s) stay float: "
                         + "; ".join(f"{k}: {v}" for k, v in list(self.near_misses.items())[:8]))
        return notes


@dataclass(frozen=True)
class KMeans(QuantizationScheme):
    """K-means weight clustering: each layer's weights share ``clusters`` values (a codebook + indices).

    ``clusters``: the codebook size, 2..256. ``bits``: the width of a stored index, 8 (17..256
    clusters) or 4 (2..16 clusters, two indices per byte). Give either: ``clusters`` defaults to
    ``2**bits``, ``bits`` to the width ``clusters`` needs; neither gives 256 clusters, 8 bits.
    ``iterations`` caps the Lloyd steps, ``seed`` fixes the k-means++ seeding, ``init_sample``
    caps the weights it seeds from. ``min_elements``: smaller weights stay float. ``skip``: node
    names or module paths (and everything under them) kept in float.
    """

    name: ClassVar[str] = "kmeans-quantize"

    clusters: int | None = None
    bits: int | None = None
    iterations: int = 10
    seed: int = 0
    init_sample: int = 16384
    min_elements: int = 1024
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names_option(self, "skip")
        if self.bits is not None and (self.bits not in (4, 8) or isinstance(self.bits, bool)):
            raise InputError(f"KMeans(bits=...) is the width of a stored index: 8 (up to 256 clusters) or 4 (up to "
                             f"16), got {self.bits!r}")
        if self.clusters is None:
            object.__setattr__(self, "clusters", 16 if self.bits == 4 else 256)
        elif isinstance(self.clusters, bool) or not isinstance(self.clusters, int) or not 2 <= self.clusters <= 256:
            raise InputError(f"KMeans(clusters=...) must be an integer in 2..256 (16 or 256 are usual), got "
                             f"{self.clusters!r}")
        if self.bits is None:
            object.__setattr__(self, "bits", 4 if self.clusters <= 16 else 8)  # type: ignore[operator]
        low, high = (2, 16) if self.bits == 4 else (17, 256)
        if not low <= self.clusters <= high:  # type: ignore[operator]
            raise InputError(f"KMeans(bits={self.bits}, clusters=...) must be in {low}..{high}, got {self.clusters!r}"
                             + ("; 16 clusters or fewer fit 4-bit indices: use bits=4" if self.bits == 8 else
                                "; more than 16 clusters need bits=8"))
        check_count(self, "iterations", 0)
        check_count(self, "init_sample", 1)
        check_count(self, "min_elements", 0, " (weights with fewer elements stay float)")

    @property
    def scheme(self) -> str:
        """``"kmeans"``."""
        return "kmeans"

    def plan(self, gm: fx.GraphModule, data: CalibrationData) -> KMeansPlan:
        """Cluster every eligible weight once (no calibration data needed)."""
        layers: dict[str, _Clustered] = {}
        near: dict[str, str] = {}
        units: list[LossyUnit] = []
        skip = SkipList.checked(gm, self.skip, "KMeans(skip=...)")
        sites = list(find_weight_sites(gm, self.min_elements, skip))
        for site in progress(sites, desc=f"k-means ({self.clusters} clusters)", total=len(sites)):
            if isinstance(site, tuple):
                near[site[0]] = site[1]
                continue
            codebook, assignment, steps = kmeans_1d(site.matrix, self.clusters, self.iterations, self.seed,
                                                    self.init_sample)
            flat = assignment.reshape(-1).to(torch.uint8)
            if self.bits == 4:
                flat = pack_nibbles(torch.cat([flat, flat.new_zeros(flat.numel() % 2)]))
            layer = _Clustered(site, flat, codebook.to(site.matrix.dtype), self.bits)
            layers[site.node] = layer
            units.append(LossyUnit(site.node, site.kind, f"k-means {self.clusters} ({self.bits}-bit indices)",
                                   self._details(layer, steps)))
        return KMeansPlan(layers=layers, near_misses=near, units=units)

    def _details(self, layer: _Clustered, steps: int) -> dict[str, Any]:
        weight = layer.site.matrix
        shape = list(weight.shape)
        rebuilt = dequantize_codebook_reference(layer.indices, layer.codebook, layer.bits, shape)
        before = tensor_bytes(weight)
        after = tensor_bytes(layer.indices) + tensor_bytes(layer.codebook)
        error = (rebuilt.float() - weight.float()).pow(2).mean().sqrt()
        return {
            "weight": layer.site.weight_target,
            "shape": "x".join(str(s) for s in shape),
            "clusters": int(layer.codebook.numel()),
            "distinct_values": _distinct_values(layer),
            "index_bits": layer.bits,
            "bytes_before": before,
            "bytes_after": after,
            "size_ratio": round(after / before, 4),
            "weight_rmse": float(error),
            "lloyd_iterations": steps,
            "bits_per_weight": round(8 * after / max(1, math.prod(shape)), 3),
        }


KMeansQuantize = KMeans
"""The name ``KMeans`` had as a pass alone (registered as ``kmeans-quantize``); ``KMeansQuantize(16)``: 16 clusters."""
