"""Lower a quantized graph's QDQ patterns to int8 GEMMs that PyTorch runs on CUDA (``torch._int_mm``).

The quantized IR computes in float (the fake-quantized reference). The ``gpu`` target runs a
lowered copy, rewritten by the passes of ``INT8_LOWERING`` in order (through the pass manager,
each verified against the graph before it; the kernels are ``KernelSubstitution`` passes, held to
the fidelity budget: ``graphopt.targets.common.lowering``):

- **dynamic int8** linear / addmm / matmul-by-weight (``DQ(Q(x, choose_qparams(x)))`` input):
  the activation is quantized per row, symmetric int8 (``amax / 127``, at run time), multiplied
  with ``aten._int_mm`` (int8 x int8 -> int32, cuBLASLt on CUDA) against the int8 weight stored
  transposed ``[K, N]``, then ``* x_scale[:, None] * w_scale[None, :] (+ bias)``. Per-row scales
  differ from the reference's per-tensor uint8 scale (usually closer to float); the test bounds it.
- **static int8** linear / addmm / matmul-by-weight (calibrated uint8 activation, scale ``s``,
  zero point ``z``): the activation is quantized with the *same* scale straight to int8 codes
  ``a = q_u8 - 128`` (zero point ``z - 128``), so ``x = s (a - z')`` exactly, and
  ``y = s w_s (a·W - z' colsum(W)) + b``: the zero-point correction is a constant per output
  column folded into the bias at lowering. The result equals the calibrated reference up to float
  rounding (no re-quantization, no extra kernel).
- **conv** (static): PyTorch CUDA has no int8 convolution: the weight is dequantized once at
  lowering and the activation QDQ around it dropped; the conv runs in float on cuDNN.
- every **activation QDQ pair** left (around add, concat, pooling, attention, and around the int8
  GEMMs, which quantize their float input themselves) is dropped: those ops compute in float on the
  GPU, so the fake-quantize round trip would cost two kernels and only add rounding error.
- **weight-only** graphs: int8 linears run ``aten._weight_int8pack_mm`` (a CUDA kernel since
  pytorch PR #159325; float activations, weights stay int8); int4 linears run tinygemm
  ``aten._weight_int4pack_mm`` (CUDA only, bfloat16 activations), its packing checked numerically
  at lowering on the device; int8 embeddings gather int8 rows; the rest (K-means codebooks, conv
  weights, kernels that fail their check) is dequantized once at lowering.

All the rewrites are plain ATen nodes rather than one custom op per layer: ``torch.compile``
(``GpuLowering(backend="inductor")``) sees ``_int_mm`` and fuses the per-row quantization and the
scale epilogue into its own kernels, CUDA graphs replay them, and the same graph runs (and is
unit-tested) on CPU, where ``_int_mm`` also exists. Only rows unknown at lowering (dynamic
shapes) go through the small op ``graphopt_quant::int_mm_any_rows``, which pads the rows at run
time when there are 16 or fewer (cuBLASLt's int8 GEMM needs more than 16).

``_int_mm`` on CUDA needs ``M > 16`` and ``K``, ``N`` multiples of 8: a static ``M <= 16`` is padded
to 17 rows at run time; a ``K`` or ``N`` that is not a multiple of 8 falls back to a float matmul
with the weight dequantized once, counted as a near miss of the ``int8-gemm`` pass (with the reason).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value, register_constant
from graphopt.ir.meta import infer_meta
from graphopt.passes.base import NodeRewrite, Pass, PassResult
from graphopt.passes.cleanup import DeadCodeElimination
from graphopt.passes.quantize.patterns import constant_bias, dynamic_source, int8_weight, static_activation
from graphopt.passes.quantize.placement import is_dequantize, is_quantize
from graphopt.passes.quantize.weight_ops import DEQUANTIZE_INT8, unpack_nibbles
from graphopt.targets.common.lowering import KernelSubstitution, LoweringResult
from graphopt.targets.common.patterns import gemm_operands
from graphopt.targets.common.weight_only_kernels import (
    ExpandCompressedWeights,
    GatherCodebookEmbeddings,
    GatherQuantizedEmbeddings,
    dequantize_constants,
    dequantized_weight,
    weight_only_linears,
)

__all__ = [
    "INT8_LOWERING",
    "MIN_INT_MM_ROWS",
    "DequantizeInt8WeightsOnce",
    "DropActivationFakeQuant",
    "GpuWeightOnlyKernels",
    "Int8Gemms",
    "describe_lowering",
    "int_mm_any_rows",
]

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed

MIN_INT_MM_ROWS = 17
"""cuBLASLt's int8 GEMM behind ``torch._int_mm`` on CUDA needs more than 16 rows."""

_EPS = 1e-12


@torch.library.custom_op("graphopt_quant::int_mm_any_rows", mutates_args=())
def int_mm_any_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm(a, b)`` for any number of rows: ``a`` is padded with zero rows up to 17 when shorter."""
    rows = a.shape[0]
    if rows >= MIN_INT_MM_ROWS:
        return torch._int_mm(a, b)
    padded = torch.nn.functional.pad(a, (0, 0, 0, MIN_INT_MM_ROWS - rows))
    return torch._int_mm(padded, b)[:rows].clone()


@int_mm_any_rows.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int32)


class _Builder:
    """Inserts ATen calls before a node and fills in their ``meta["val"]``."""

    def __init__(self, gm: fx.GraphModule, before: fx.Node) -> None:
        self.gm, self.before = gm, before

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        with self.gm.graph.inserting_before(self.before):
            node = self.gm.graph.call_function(target, args, kwargs)
        infer_meta(node)
        return node

    def constant(self, stem: str, value: torch.Tensor) -> fx.Node:
        return register_constant(self.gm, stem, value, before=self.before)


def _static_rows(value: fx.Node) -> int | None:
    """Rows of the 2-D GEMM reading ``value`` (all dims but the last), or None when one is dynamic."""
    val = value.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    dims = val.shape[:-1]
    if not all(isinstance(d, int) for d in dims):
        return None
    return math.prod(dims)


def _flat(build: _Builder, value: fx.Node, in_features: int) -> fx.Node:
    """``value`` as a 2-D ``[rows, in_features]`` tensor (itself when already 2-D)."""
    val = value.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dim() == 2:
        return value
    return build(aten.reshape.default, value, [-1, in_features])


class _CodesCache:
    """The int8 codes (and row scales) of each quantized activation, computed once for all its GEMMs."""

    def __init__(self) -> None:
        self.codes: dict[tuple[Any, ...], tuple[fx.Node, fx.Node | None]] = {}

    def dynamic(self, build: _Builder, source: fx.Node, in_features: int) -> tuple[fx.Node, fx.Node]:
        """Per-row symmetric int8 codes of ``source`` and their float scales ``[rows, 1]``."""
        key = ("dynamic", source)
        if key not in self.codes:
            flat = _flat(build, source, in_features)
            amax = build(aten.amax.default, build(aten.abs.default, flat), [1], True)
            scale = build(aten.div.Tensor, build(aten.clamp_min.default, amax, _EPS), 127.0)
            rounded = build(aten.round.default, build(aten.div.Tensor, flat, scale))
            codes = build(aten._to_copy.default, build(aten.clamp.default, rounded, -127, 127), dtype=torch.int8)
            self.codes[key] = (codes, scale)
        codes, scale = self.codes[key]
        assert scale is not None
        return codes, scale

    def static(self, build: _Builder, codes_u8: fx.Node, scale: float, zero_point: int, in_features: int) -> fx.Node:
        """int8 codes ``q_u8 - 128`` of a uint8 activation with calibrated ``scale`` / ``zero_point``.

        Computed from the float value when the uint8 codes come from a quantize node (the uint8
        codes are then never made), else converted from the uint8 codes.
        """
        key = ("static", codes_u8, scale, zero_point)
        if key not in self.codes:
            if is_quantize(codes_u8) and codes_u8.target == qd.quantize_per_tensor.default:
                flat = _flat(build, codes_u8.args[0], in_features)
                # the reference's arithmetic (quantize_per_tensor: round(x * (1 / s)) + z), shifted by -128
                scaled = build(aten.round.default, build(aten.mul.Tensor, flat, 1.0 / scale))
                shifted = build(aten.add.Tensor, scaled, zero_point - 128)
                codes = build(aten._to_copy.default, build(aten.clamp.default, shifted, -128, 127), dtype=torch.int8)
            else:
                flat = _flat(build, codes_u8, in_features)
                wide = build(aten._to_copy.default, flat, dtype=torch.int16)
                codes = build(aten._to_copy.default, build(aten.sub.Tensor, wide, 128), dtype=torch.int8)
            self.codes[key] = (codes, None)
        return self.codes[key][0]


def _int_mm(build: _Builder, codes: fx.Node, weight_t: fx.Node, rows: int | None) -> fx.Node:
    """``codes @ weight_t`` in int32: ``_int_mm``, padding rows to 17 when there are fewer."""
    if rows is None:
        return build(torch.ops.graphopt_quant.int_mm_any_rows.default, codes, weight_t)
    if rows >= MIN_INT_MM_ROWS:
        return build(aten._int_mm.default, codes, weight_t)
    padded = build(aten.constant_pad_nd.default, codes, [0, 0, 0, MIN_INT_MM_ROWS - rows], 0)
    return build(aten.slice.Tensor, build(aten._int_mm.default, padded, weight_t), 0, 0, rows)


def _replace_gemm(gm: fx.GraphModule, build: _Builder, node: fx.Node, out: fx.Node) -> None:
    """Put the 2-D result ``out`` in place of the GEMM ``node`` (reshaped back to its shape) and erase ``node``."""
    out_val = node.meta["val"]
    if out_val.dim() != 2:
        out = build(aten.reshape.default, out, list(out_val.shape))
    out.meta["val"] = out_val
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def _shape_check(in_features: int, out_features: int) -> str | None:
    if in_features % 8:
        return f"int8 GEMM: K={in_features} not a multiple of 8 (cuBLASLt int8), float matmul"
    if out_features % 8:
        return f"int8 GEMM: N={out_features} not a multiple of 8 (cuBLASLt int8), float matmul"
    return None


def _int_mm_problem(weight_t: torch.Tensor, checked: dict[tuple[Any, ...], str | None]) -> str | None:
    """Run ``_int_mm`` once on the weight's device with its layout (per shape); None when it is exact."""
    key = (weight_t.device, *weight_t.shape)
    if key not in checked:
        a = torch.randint(-127, 128, (MIN_INT_MM_ROWS + 15, weight_t.shape[0]), dtype=torch.int8,
                          generator=torch.Generator().manual_seed(0)).to(weight_t.device)
        try:
            exact = torch.equal(torch._int_mm(a, weight_t).cpu(), a.cpu().int() @ weight_t.cpu().int())
            checked[key] = None if exact else "int8 GEMM: _int_mm result check failed, float matmul"
        except (RuntimeError, NotImplementedError) as error:
            checked[key] = f"int8 GEMM: _int_mm unavailable ({type(error).__name__}), float matmul"
    return checked[key]


@dataclass(frozen=True)
class Int8Gemms(KernelSubstitution):
    """Dynamic and static int8 linear / addmm / matmul-by-weight -> ``aten._int_mm`` with a float epilogue.

    ``_int_mm`` is run once per weight shape at lowering on the weights' device (an unexpected
    device limit becomes a near miss instead of a failure at run time).
    """

    name = "int8-gemm"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite every int8 GEMM in place."""
        near: list[str] = []
        counts = {"int8_gemm_dynamic": 0, "int8_gemm_static": 0, "int8_gemm_padded_rows": 0}
        cache = _CodesCache()
        checked: dict[tuple[Any, ...], str | None] = {}
        for node in list(gm.graph.nodes):
            operands = gemm_operands(node)
            if operands is None:
                continue
            x_arg, w_arg, bias_arg, axis = operands
            run_time_source = dynamic_source(x_arg)
            static = static_activation(x_arg) if run_time_source is None else None
            weight = int8_weight(gm, w_arg, axis)
            bias = constant_bias(gm, bias_arg)
            if (run_time_source is None and static is None) or weight is None or bias is False:
                continue
            q_weight, w_scales = weight  # [N, K] int8, [N]
            out_features, in_features = q_weight.shape
            reason = _shape_check(in_features, out_features) or _int_mm_problem(q_weight.t().contiguous(), checked)
            if reason is not None:
                near.append(reason)  # the generic rewrites below dequantize its weight once
                continue
            out_val = node.meta["val"]
            dtype = out_val.dtype
            rows = _static_rows(x_arg)
            build = _Builder(gm, node)
            weight_t = build.constant(f"{node.name}_weight_int8_t", q_weight.t().contiguous())
            if run_time_source is not None:
                codes, row_scale = cache.dynamic(build, run_time_source, in_features)
                acc = build(aten._to_copy.default, _int_mm(build, codes, weight_t, rows), dtype=dtype)
                column_scale = build.constant(f"{node.name}_w_scale", w_scales.to(dtype))
                out = build(aten.mul.Tensor, build(aten.mul.Tensor, acc, row_scale), column_scale)
                if bias is not None:
                    out = build(aten.add.Tensor, out, build.constant(f"{node.name}constant_bias", bias.to(dtype)))
                counts["int8_gemm_dynamic"] += 1
            else:
                codes_u8, x_scale, x_zero_point = static
                codes = cache.static(build, codes_u8, x_scale, x_zero_point, in_features)
                acc = build(aten._to_copy.default, _int_mm(build, codes, weight_t, rows), dtype=dtype)
                # y = s * w_s * (a.W - z' * colsum(W)) + b, z' = z - 128: the correction is a constant per column
                scale = x_scale * w_scales.double()
                column_sum = q_weight.to(torch.int64).sum(dim=1).double()
                offset = -scale * (x_zero_point - 128) * column_sum
                if bias is not None:
                    offset = offset + bias.double()
                out = build(aten.add.Tensor,
                            build(aten.mul.Tensor, acc, build.constant(f"{node.name}_scale", scale.to(dtype))),
                            build.constant(f"{node.name}_offset", offset.to(dtype)))
                counts["int8_gemm_static"] += 1
            if rows is not None and rows < MIN_INT_MM_ROWS:
                counts["int8_gemm_padded_rows"] += 1
            _replace_gemm(gm, build, node, out)
        return PassResult(any(counts.values()), counts, near_misses={self.name: dict(Counter(near))} if near else {})


def _is_activation_pair(dequantize: fx.Node) -> bool:
    """True for ``DQ(Q(x))`` of an activation (static or dynamic), as opposed to a weight's dequantize."""
    if dequantize.target not in (qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor):
        return False
    quantize = dequantize.args[0]
    return (is_quantize(quantize) and isinstance(quantize.args[0], fx.Node)
            and attribute_value(quantize.graph.owning_module, quantize.args[0]) is None)


@dataclass(frozen=True)
class DropActivationFakeQuant(NodeRewrite, KernelSubstitution):
    """Every activation ``DQ(Q(x))`` left -> ``x``: its readers compute in float on the GPU anyway."""

    name = "drop-activation-fake-quant"
    stat = "fake_quant_pairs_dropped"
    dead_code_after = True  # the quantize and choose_qparams nodes no one reads now

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool:
        """Drop an activation quantize / dequantize pair, in place."""
        if node.op != "call_function" or not _is_activation_pair(node):
            return False
        node.replace_all_uses_with(node.args[0].args[0])
        return True


@dataclass(frozen=True)
class DequantizeInt8WeightsOnce(Pass):
    """Every dequantize of a constant int8 weight -> its float value, computed once at lowering.

    Convolutions reading one are counted apart: PyTorch CUDA has no int8 convolution kernel.
    """

    name = "dequantize-int8-weights-once"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Replace every dequantize of a constant int8 weight in place."""
        counts = {"weights_dequantized_once": 0, "conv_float_on_gpu": 0}
        for node in list(gm.graph.nodes):
            if not is_dequantize(node) or not node.users:
                continue
            values = dequantize_constants(gm, node)
            if values is None or not isinstance(values[0], torch.Tensor) or values[0].dtype != torch.int8:
                continue
            value = node.target(*values)
            replacement = register_constant(gm, f"{node.name}_float", value, before=node)
            convs = [u for u in node.users if u.target in (aten.conv1d.default, aten.conv2d.default)]
            counts["conv_float_on_gpu"] += len(convs)
            counts["weights_dequantized_once"] += 1
            node.replace_all_uses_with(replacement)
            gm.graph.erase_node(node)
        return PassResult(any(counts.values()), counts)


# ------------------------------------------------------------------------------------ weight-only


def _int8pack_linear(build: _Builder, node: fx.Node, q_weight: torch.Tensor, scale: torch.Tensor) -> fx.Node:
    x = node.args[0]
    dtype = node.meta["val"].dtype
    flat = _flat(build, x, q_weight.shape[1])
    out = build(aten._weight_int8pack_mm.default, flat, build.constant(f"{node.name}_qweight", q_weight),
                build.constant(f"{node.name}_scale", scale.to(dtype)))
    return out


def _kernel_works(kernel: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor,
                  atol_scale: float) -> str | None:
    """Run ``kernel`` once on random rows on the weight's device and compare with ``x @ weight.T``; None when right."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(32, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
    try:
        got = kernel(x).float()
    except (RuntimeError, NotImplementedError) as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    want = (x @ weight.t()).float()
    error = (got - want).abs().max().item() / max(want.abs().max().item(), _EPS)
    return None if error < atol_scale else f"kernel check failed (relative error {error:.2g})"


def _tinygemm_form(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group: int,
                   weight: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], str | None]:
    """The tinygemm packed weight and ``[K/g, N, 2]`` bfloat16 (scale, zero), checked on the weight's device."""
    out_features, in_features = q.shape
    tiles = next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), None)
    if tiles is None or out_features % 8 or group not in (32, 64, 128, 256):
        return (q, scale), f"int4: shape {out_features}x{in_features} group {group} outside tinygemm's"
    zeros = (8 - zero_point.float()) * scale.float()  # w = (q - zp) * s == (q - 8) * s + (8 - zp) * s
    scale_and_zeros = torch.stack([scale.float(), zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    last = "int4: no tinygemm kernel"
    for high_first in (True, False):  # the nibble order the packing op expects is checked, not assumed
        pair = (q[:, 0::2], q[:, 1::2]) if high_first else (q[:, 1::2], q[:, 0::2])
        packed_u8 = ((pair[0] << 4) | pair[1]).to(torch.uint8)
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack(packed_u8, tiles)
        except (RuntimeError, NotImplementedError) as error:
            return (q, scale), f"int4: tinygemm unavailable here ({type(error).__name__})"
        problem = _kernel_works(
            lambda x, p=packed: torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), p, group, scale_and_zeros),
            weight, 2e-2)
        if problem is None:
            return (packed, scale_and_zeros), None
        last = f"int4: {problem}"
    return (q, scale), last


@dataclass(frozen=True)
class GpuWeightOnlyKernels(KernelSubstitution):
    """Weight-only int8 / int4 linears -> ``_weight_int8pack_mm`` / tinygemm where they run and check out.

    The kernels are tried once per layer on the device the weights are on; a layer whose kernel
    fails (no kernel for the device, or a result that does not match the dequantized weight) gets
    its weight dequantized once instead (a near miss with the reason).
    """

    name = "gpu-weight-only-kernels"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite every weight-only linear in place."""
        near: list[str] = []
        counts = {"int8_weight_kernels": 0, "int4_weight_kernels": 0}
        for node, dequant in weight_only_linears(gm.graph):
            values = dequantize_constants(gm, dequant)
            weight = dequantized_weight(gm, dequant)
            if values is None or weight is None:
                continue
            dtype = node.meta["val"].dtype
            weight = weight.to(dtype)
            build = _Builder(gm, node)
            if dequant.target == DEQUANTIZE_INT8:
                q_weight, scale = values
                problem = _kernel_works(lambda x, q=q_weight, s=scale: torch._weight_int8pack_mm(x, q, s.to(x.dtype)),
                                        weight, 1e-3)
                if problem is not None:
                    near.append(f"int8 weight-only: {problem}, weight dequantized once")
                    continue
                out = _int8pack_linear(build, node, q_weight, scale)
                counts["int8_weight_kernels"] += 1
            else:
                packed, scale, zero_point, group = values
                (kernel_weight, scale_and_zeros), problem = _tinygemm_form(
                    unpack_nibbles(packed).to(torch.int32), scale, zero_point, group, weight)
                if problem is not None:
                    near.append(f"{problem}, weight dequantized once")
                    continue
                flat = build(aten._to_copy.default, _flat(build, node.args[0], weight.shape[1]), dtype=torch.bfloat16)
                out = build(aten._weight_int4pack_mm.default, flat,
                            build.constant(f"{node.name}_int4pack", kernel_weight), group,
                            build.constant(f"{node.name}_scale_and_zeros", scale_and_zeros))
                out = build(aten._to_copy.default, out, dtype=dtype)
                counts["int4_weight_kernels"] += 1
            bias = node.args[2] if len(node.args) > 2 else None
            if bias is not None:
                out = build(aten.add.Tensor, out, bias)
            _replace_gemm(gm, build, node, out)
        return PassResult(any(counts.values()), counts, near_misses={self.name: dict(Counter(near))} if near else {})


INT8_LOWERING: tuple[Pass, ...] = (
    DeadCodeElimination(),  # layers whose output no one reads (an unused pooler) are not counted
    Int8Gemms(), DropActivationFakeQuant(), DequantizeInt8WeightsOnce(),
    GatherQuantizedEmbeddings(), GatherCodebookEmbeddings(), GpuWeightOnlyKernels(), ExpandCompressedWeights(),
    DeadCodeElimination(),
)
"""The rewrites ``GpuTarget`` runs on a quantized graph, in order, before the float lowering's."""

_FLOAT_ON_GPU = ("weights_dequantized_once", "fake_quant_pairs_dropped")


def describe_lowering(result: LoweringResult) -> str:
    """The report note: ``gpu lowering: int8 kernels: ...; float on gpu: ...; near misses: ...``."""
    counts = result.stats_of({p.name for p in INT8_LOWERING if p.name != DeadCodeElimination.name})
    kernels = ", ".join(f"{n} {k}" for k, n in counts.items() if n and k not in ("conv_float_on_gpu", *_FLOAT_ON_GPU))
    parts = [f"gpu lowering: int8 kernels: {kernels or 'none matched'}"]
    if counts.get("conv_float_on_gpu"):
        parts.append(f"{counts['conv_float_on_gpu']} conv: float on gpu (no int8 conv kernel in PyTorch CUDA)")
    floats = [f"{counts[k]} {k}" for k in _FLOAT_ON_GPU if counts.get(k)]
    if floats:
        parts.append(", ".join(floats))
    int8_rules = {p.name for p in INT8_LOWERING}
    near = [f"{n}x {reason}" for rule, reasons in result.near_misses.items() if rule in int8_rules
            for reason, n in reasons.items() if n]
    if near:
        parts.append("near misses: " + "; ".join(near))
    return "; ".join(parts)
