"""Weight-only quantization: int8 per output channel or group-wise, or int4 group-wise; activations stay float.

``WeightOnly(bits=8)`` stores every linear / matrix-product / convolution weight as
``int8`` with one float scale per output channel (symmetric, ``q`` in [-127, 127],
``scale = max|w_row| / 127``); with ``group_size``, matrix products get one scale per group of
``group_size`` input features instead (GGUF's ``Q8_0`` is group 32). ``WeightOnly(bits=4,
group_size=128)`` stores the weights of matrix products as 4-bit values, two per byte, with a
float scale and zero point per group of ``group_size`` consecutive input features of one
output channel (asymmetric: ``w = (q - zero_point) * scale``, ``q`` in [0, 15], the grid spanning
the group's range; see ``quantize_int4_groupwise``). Asymmetric because a 4-bit grid is coarse:
spending the 16 levels on the group's actual range instead of ``[-max|w|, max|w|]`` halves the
error on skewed groups, and it is the layout onnxruntime's ``MatMulNBits`` and PyTorch's int4
CPU kernel both take. ``int8_layers`` keeps chosen layers of an int4 model in int8 (what a
language model's budget falls back to before float).

In the IR each layer reads its weight through a ``graphopt_weights.dequantize_int8/int4`` node
(``weight_ops``), so the PyTorch graph is the numerical reference; the targets' lowering passes turn
them into int8/int4 kernels (cpu) and ``MatMulNBits`` / ``DequantizeLinear`` (onnx).
One lossy unit per layer. Layers the scheme cannot take are near misses: int4 needs the
input features to be a multiple of ``group_size`` and is for matrix products only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from graphopt.errors import InputError
from graphopt.passes.base import PassResult
from graphopt.passes.lossy.base import CalibrationData, LossyPlan, LossyUnit
from graphopt.passes.lossy.calibration import watch_values
from graphopt.passes.quantize.gptq import HessianWatcher, gptq_int4, gptq_int8
from graphopt.passes.quantize.scheme import QuantizationScheme, check_count, check_flags, names_option
from graphopt.passes.quantize.selection import SkipList
from graphopt.passes.quantize.weight_ops import (
    DEQUANTIZE_INT4,
    DEQUANTIZE_INT8,
    dequantize_int4_reference,
    dequantize_int8_reference,
    pack_nibbles,
)
from graphopt.passes.quantize.weight_sites import (
    WeightSite,
    find_weight_sites,
    finish,
    is_product_kind,
    near_misses_by_reason,
    product_input,
    replace_weight,
    tensor_bytes,
)

__all__ = ["WeightOnly", "WeightOnlyQuantize", "int4_group_grid", "int8_group_grid", "quantize_int4_groupwise",
           "quantize_int8_groupwise", "quantize_int8_per_channel"]

GROUP_SIZES = (32, 64, 128, 256)
ROUNDINGS = ("nearest", "gptq")
"""How ``WeightOnly`` picks each weight's grid point (``rounding=``)."""
AUTO_GROUPS = (128, 64, 32)
"""int4 group sizes tried, largest first, for a layer when ``WeightOnly(bits=4)`` is given none."""


def _largest_group(columns: int) -> int | None:
    """The largest of ``AUTO_GROUPS`` dividing ``columns`` (a layer's input features), or None."""
    return next((group for group in AUTO_GROUPS if columns % group == 0), None)


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (dim 0): returns ``(q int8, scale)`` with ``q * scale ≈ weight``."""
    rows = weight.detach().float().reshape(weight.shape[0], -1)
    scale = rows.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(weight.shape), scale.to(weight.dtype)


def quantize_int8_groupwise(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group of ``group_size`` input features of ``weight [N, K]``.

    Returns ``(q int8 [N, K], scale [N, K/g])``.
    """
    rows, columns = weight.shape
    groups = weight.detach().float().reshape(rows, columns // group_size, group_size)
    scale = groups.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(groups / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(rows, columns), scale.to(weight.dtype)


def quantize_int4_groupwise(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of ``group_size`` input features of ``weight [N, K]``.

    Each group gets the grid ``low + scale * q`` (``q`` in 0..15) with least squared error among
    the grids that start at the group's minimum and end at its maximum in 15, 14, ..., 1 steps:
    15 for most float weights, fewer for a group whose values already sit on a coarser grid
    (weights that were 4-bit quantized before, such as GGUF ``Q4_1`` checkpoints, come back exactly).
    Returns ``(packed uint8 [N, K/2], scale [N, K/g], zero_point [N, K/g])`` in ``w = (q - zero_point) * scale``;
    the zero point is a float (``-low / scale``), as onnxruntime's ``MatMulNBits`` and PyTorch's int4 kernels take it.
    """
    rows, columns = weight.shape
    groups = weight.detach().float().reshape(rows, columns // group_size, group_size)
    low = groups.amin(dim=-1, keepdim=True)
    span = groups.amax(dim=-1, keepdim=True) - low
    best_q = best_scale = best_error = None
    for steps in range(15, 0, -1):
        scale = torch.where(span > 0, span / steps, torch.ones_like(span))
        q = torch.round((groups - low) / scale).clamp(0, steps)
        error = (q * scale + low - groups).pow(2).sum(dim=-1, keepdim=True)
        if best_error is None:
            best_q, best_scale, best_error = q, scale, error
            continue
        better = error < best_error
        best_q = torch.where(better, q, best_q)
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.where(better, error, best_error)
    assert best_q is not None and best_scale is not None
    packed = pack_nibbles(best_q.reshape(rows, columns).to(torch.uint8))
    scale = best_scale.squeeze(-1)
    return packed, scale.to(weight.dtype), (-low.squeeze(-1) / scale).to(weight.dtype)


@dataclass
class _Compressed:
    site: WeightSite
    constants: dict[str, torch.Tensor]
    bits: int
    group_size: int | None


@dataclass
class WeightOnlyPlan(LossyPlan):
    """The quantized weights of every layer, computed once; ``apply`` swaps them in."""

    bits: int
    layers: dict[str, _Compressed]
    near_misses: dict[str, str]
    units: list[LossyUnit] = field(default_factory=list)
    extra_notes: list[str] = field(default_factory=list)

    def apply(self, gm: fx.GraphModule, skip: frozenset[str] = frozenset()) -> PassResult:
        """Make every layer not in ``skip`` read its weight through a dequantize node."""
        applied, before, after = 0, 0, 0
        for name, layer in self.layers.items():
            if name in skip:
                continue
            if layer.bits == 8:
                def build(graph: fx.Graph, attrs: dict[str, fx.Node]) -> fx.Node:
                    return graph.call_function(DEQUANTIZE_INT8, (attrs["qweight"], attrs["scale"]))
            else:
                group = layer.group_size

                def build(graph: fx.Graph, attrs: dict[str, fx.Node], group: int | None = group) -> fx.Node:
                    return graph.call_function(DEQUANTIZE_INT4,
                                               (attrs["qweight"], attrs["scale"], attrs["zero_point"], group))
            replace_weight(gm, layer.site, layer.constants, build)
            applied += 1
            before += tensor_bytes(layer.site.matrix)
            after += sum(tensor_bytes(t) for t in layer.constants.values())
        if applied:
            finish(gm)
        near = near_misses_by_reason("weight-only", self.near_misses.values())
        stats = {"quantized": applied, "skipped": len(skip & set(self.layers)),
                 "weight_bytes_before": before, "weight_bytes_after": after, "bytes_saved": before - after}
        return PassResult(changed=applied > 0, stats=stats, near_misses=near)

    def notes(self) -> list[str]:
        """Facts about the whole plan (what stayed float)."""
        notes = list(self.extra_notes)
        if self.near_misses:
            notes.append(f"{len(self.near_misses)} layer(s) stay float: "
                         + "; ".join(f"{k}: {v}" for k, v in list(self.near_misses.items())[:8]))
        if any(layer.site.shared for layer in self.layers.values()):
            notes.append("some quantized weights are also read elsewhere (tied weights): the float copy stays "
                         "for those readers, so the saving on disk is smaller than the per-layer figures")
        return notes


@dataclass(frozen=True)
class WeightOnly(QuantizationScheme):
    """Weight-only quantization; activations stay float (no data needed).

    ``bits=8``: symmetric int8, one scale per output channel (linear, products by a constant,
    convolutions), or per group of ``group_size`` input features of a matrix product when
    ``group_size`` is given. ``bits=4``: asymmetric 4-bit groups of ``group_size`` input features
    (32, 64, 128 or 256; when not given, per layer the largest of 128, 64 and 32 that divides its
    input features) with a scale and zero point per group, for matrix
    products; layers whose input features are not a multiple of ``group_size``, and
    convolutions, stay float (near misses). ``min_elements``: smaller weights stay float (their
    scales would cost more than they save). ``embeddings``: store embedding tables as int8 rows
    under either setting, one scale per row or per group of ``group_size`` columns (they are
    gathered, not multiplied, so the lowering reads only the rows it needs). ``skip``: node
    names or module paths (and everything under them) kept in float. ``int8_layers``: likewise,
    layers of an int4 model stored as int8 (group-wise, with the same ``group_size``).
    ``rounding``: ``"nearest"`` (default, no data needed) rounds each weight to its nearest grid
    point; ``"gptq"`` rounds the matrix products' weights column by column so that each layer's
    output on the calibration data moves least (``graphopt.passes.quantize.gptq``; the example
    inputs when no ``calibration=`` is given). Same grids and layout, so the same kernels run it;
    it buys most at 4 bits on weights that were not quantized before.
    """

    name: ClassVar[str] = "weight-only-quantize"

    bits: int = 8
    group_size: int | None = None
    min_elements: int = 1024
    embeddings: bool = True
    skip: tuple[str, ...] = ()
    int8_layers: tuple[str, ...] = ()
    rounding: str = "nearest"

    def __post_init__(self) -> None:
        names_option(self, "skip")
        names_option(self, "int8_layers")
        if self.bits not in (4, 8) or isinstance(self.bits, bool):
            raise InputError(f"WeightOnly(bits=...) must be 8 or 4: 8 for int8 per output channel (or group), or 4 "
                             f"for int4 groups of group_size input features; got {self.bits!r}")
        if self.group_size is not None and (self.group_size not in GROUP_SIZES or isinstance(self.group_size, bool)):
            raise InputError(f"WeightOnly(group_size=...) must be one of {', '.join(map(str, GROUP_SIZES))}, "
                             f"got {self.group_size!r}")
        if self.int8_layers and self.bits != 4:
            raise InputError("WeightOnly(int8_layers=...) keeps layers of an int4 model in int8; with bits=8 every "
                             "layer is int8 already")
        check_count(self, "min_elements", 0, " (weights with fewer elements stay float)")
        check_flags(self, "embeddings")
        if self.rounding not in ROUNDINGS:
            raise InputError(f"WeightOnly(rounding=...) must be one of {', '.join(map(repr, ROUNDINGS))}: 'nearest' "
                             f"rounds each weight alone, 'gptq' rounds so each layer's output on the calibration "
                             f"data moves least; got {self.rounding!r}")

    @property
    def scheme(self) -> str:
        """``"int8-weight-only"`` or ``"int4-weight-only"``."""
        return f"int{self.bits}-weight-only"

    def plan(self, gm: fx.GraphModule, data: CalibrationData) -> WeightOnlyPlan:
        """Quantize every eligible weight once (no calibration data needed)."""
        layers: dict[str, _Compressed] = {}
        near: dict[str, str] = {}
        units: list[LossyUnit] = []
        skip = SkipList.checked(gm, self.skip, "WeightOnly(skip=...)")
        int8_layers = SkipList.checked(gm, self.int8_layers, "WeightOnly(int8_layers=...)")
        nodes = {node.name: node for node in gm.graph.nodes}
        chosen: list[tuple[WeightSite, int, int | None]] = []
        for site in find_weight_sites(gm, self.min_elements, skip):
            if isinstance(site, tuple):
                near[site[0]] = site[1]
                continue
            bits = 8 if site.kind == "embedding" or nodes[site.node] in int8_layers else self.bits
            refusal = self._refusal(site, bits)
            if refusal:
                near[site.node] = refusal
                continue
            chosen.append((site, bits, self._group_for(site, bits)))
        hessians = self._hessians(gm, nodes, data, [site for site, _, _ in chosen]) if self.rounding == "gptq" else {}
        for site, bits, group in chosen:
            hessian = hessians.get(site.node)
            constants = (_compress(site.matrix, bits, group) if hessian is None
                         else _compress_gptq(site.matrix, hessian, bits, group))
            layers[site.node] = _Compressed(site, constants, bits, group)
            scheme = _scheme_name(bits, group) + (", GPTQ rounding" if hessian is not None else "")
            units.append(LossyUnit(site.node, site.kind, scheme, self._details(site, constants, bits, group)))
        notes = [] if self.rounding != "gptq" or data.batches else [
            "GPTQ rounding calibrated on the example inputs alone: pass calibration=... (a few hundred rows of "
            "real inputs) for weights that fit the data the model will see"]
        return WeightOnlyPlan(bits=self.bits, layers=layers, near_misses=near, units=units, extra_notes=notes)

    @staticmethod
    def _hessians(gm: fx.GraphModule, nodes: dict[str, fx.Node], data: CalibrationData,
                  sites: list[WeightSite]) -> dict[str, torch.Tensor]:
        """``Σ xᵀx`` of every matrix product's input over the calibration data (the example when none)."""
        watchers: dict[str, HessianWatcher] = {}
        readers: dict[str, list[str]] = {}
        for site in sites:
            if not site.is_product:
                continue
            source = product_input(nodes[site.node], site.kind)
            if not isinstance(source, fx.Node):
                continue
            watchers.setdefault(source.name, HessianWatcher(site.matrix.shape[1]))
            readers.setdefault(source.name, []).append(site.node)
        if not watchers:
            return {}
        if not data.all:
            raise InputError("WeightOnly(rounding='gptq') needs inputs to run the model on: the example inputs "
                             "or calibration=... batches")
        watch_values(gm, data.all, watchers, desc="weight-only: GPTQ statistics")
        return {layer: watcher.hessian for source, watcher in watchers.items() if watcher.rows
                for layer in readers[source]}

    def dequantized(self, matrix: torch.Tensor, kind: str = "linear", bits: int | None = None) -> torch.Tensor:
        """The float weight a layer of ``kind`` computes with under this scheme (``matrix``: output channels first).

        ``bits`` overrides the scheme's (8 for a layer in ``int8_layers``). Scales and groups run
        along each output row, so the rows of a merged weight (a fused Q/K/V projection) come out
        as they would quantized layer by layer.
        """
        bits = 8 if kind == "embedding" else (bits or self.bits)
        rows = matrix.reshape(matrix.shape[0], -1)
        group = self._group(is_product_kind(kind) or kind == "embedding", rows.shape[1], bits)
        values = _dequantize(_compress(rows, bits, group), bits, group)
        return values.reshape(matrix.shape).to(matrix.dtype)

    def _group_for(self, site: WeightSite, bits: int) -> int | None:
        return self._group(site.is_product or site.kind == "embedding", site.matrix.shape[1], bits)

    def group_for(self, features: int, bits: int) -> int | None:
        """The scales' group size of a matrix product with ``features`` input features stored at ``bits``."""
        return self._group(True, features, bits)

    def _group(self, groupable: bool, columns: int, bits: int) -> int | None:
        """The scales' group size: int4 always; int8 for products and tables whose width it divides.

        None: one scale per output channel (or table row).
        """
        if self.group_size is None:  # int4 (and the int8 layers of an int4 model) pick the largest that fits
            return _largest_group(columns) if bits == 4 or self.bits == 4 else None
        if bits == 4:
            return self.group_size
        if not groupable or columns % self.group_size:
            return None
        return self.group_size

    def _refusal(self, site: WeightSite, bits: int) -> str | None:
        if site.kind == "embedding" and not self.embeddings:
            return "embedding tables left float (embeddings=False)"
        if bits == 8:
            return None
        if not site.is_product:
            return f"int4 group-wise is for matrix products; {site.kind} weight kept float (use bits=8)"
        features = site.matrix.shape[1]
        if self.group_size is None and _largest_group(features) is None:
            return f"in-features {features} not divisible by any int4 group size ({', '.join(map(str, AUTO_GROUPS))})"
        if self.group_size is not None and features % self.group_size:
            return (f"in-features {features} not divisible by group_size {self.group_size} "
                    "(choose a group size that divides it)")
        return None

    def _details(self, site: WeightSite, constants: dict[str, torch.Tensor], bits: int,
                 group: int | None) -> dict[str, Any]:
        before = tensor_bytes(site.matrix)
        after = sum(tensor_bytes(t) for t in constants.values())
        dequantized = _dequantize(constants, bits, group)
        error = (dequantized.float() - site.matrix.float().reshape(dequantized.shape)).pow(2).mean().sqrt()
        return {
            "weight": site.weight_target,
            "shape": "x".join(str(s) for s in site.matrix.shape),
            "bits": bits,
            "group_size": group or "per-channel",
            "bytes_before": before,
            "bytes_after": after,
            "size_ratio": round(after / before, 4),
            "weight_rmse": float(error),
            "tied": site.shared,
        }


def _scheme_name(bits: int, group: int | None) -> str:
    if bits == 4:
        return f"int4 weight-only, group {group} asymmetric"
    return f"int8 weight-only, group {group} symmetric" if group else "int8 weight-only, per-channel symmetric"


def _compress(matrix: torch.Tensor, bits: int, group: int | None) -> dict[str, torch.Tensor]:
    """The compact tensors of ``matrix`` (output channels first) at ``bits``, per channel (``group`` None) or group."""
    if bits == 8:
        q, scale = quantize_int8_groupwise(matrix, group) if group else quantize_int8_per_channel(matrix)
        return {"qweight": q, "scale": scale}
    packed, scale, zero_point = quantize_int4_groupwise(matrix, group)  # type: ignore[arg-type]
    return {"qweight": packed, "scale": scale, "zero_point": zero_point}


def int4_group_grid(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest's 4-bit grid for each row of ``values [N, g]``: ``(scale [N], zero point [N])``."""
    _, scale, zero_point = quantize_int4_groupwise(values, values.shape[1])
    return scale[:, 0].float(), zero_point[:, 0].float()


def int8_group_grid(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest's symmetric int8 grid for each row of ``values [N, g]``: ``(scale [N], zeros)``."""
    _, scale = quantize_int8_per_channel(values)
    return scale.float(), torch.zeros(scale.shape)


def _compress_gptq(matrix: torch.Tensor, hessian: torch.Tensor, bits: int,
                   group: int | None) -> dict[str, torch.Tensor]:
    """``_compress``'s tensors, rounded by GPTQ against ``hessian`` (the layer's ``Σ xᵀx``)."""
    if bits == 8:
        q, scale = gptq_int8(matrix, hessian, group, int8_group_grid)
        return {"qweight": q, "scale": scale}
    packed, scale, zero_point = gptq_int4(matrix, hessian, group, int4_group_grid)  # type: ignore[arg-type]
    return {"qweight": packed, "scale": scale, "zero_point": zero_point}


def _dequantize(constants: dict[str, torch.Tensor], bits: int, group: int | None) -> torch.Tensor:
    if bits == 8:
        return dequantize_int8_reference(constants["qweight"], constants["scale"])
    return dequantize_int4_reference(constants["qweight"], constants["scale"], constants["zero_point"], group)


WeightOnlyQuantize = WeightOnly
"""The name ``WeightOnly`` had as a pass alone (registered as ``weight-only-quantize``)."""
