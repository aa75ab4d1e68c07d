"""Weight-only int8 / int4 linear layers on the CPU: PyTorch's weight-only kernels, or float weights once.

``CpuWeightOnlyKernels``: ``linear(x, dequantize_int8/int4(...), b)`` runs, per layer shape,
whichever of two forms is faster on this machine, timed once at lowering
(``CPU_KERNEL_CHOICE`` forces one): PyTorch's weight-only kernels
``aten._weight_int8pack_mm`` / ``aten._weight_int4pack_mm_for_cpu`` (int8/int4 weights stay
compressed in memory; these kernels are fast only for bfloat16 activations on CPU, so the
activation is rounded to bfloat16 around them), or the weight dequantized once at lowering and a
float ``linear`` (float weights in memory; the faster one on compute-bound shapes, e.g. a batch
of 1024 tokens, since weight-only quantization saves memory traffic, not arithmetic).

The kernel form rounds the activations to bfloat16: the pass is a kernel substitution, held to
the fidelity budget against the graph before it (``graphopt.targets.common.lowering``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import register_constant
from graphopt.passes.base import PassResult
from graphopt.passes.quantize.weight_ops import DEQUANTIZE_INT8, unpack_nibbles
from graphopt.targets.common.lowering import KernelSubstitution
from graphopt.targets.common.weight_only_kernels import (
    dequantize_constants,
    dequantized_weight,
    replace_node,
    weight_only_linears,
)

__all__ = ["CPU_KERNEL_CHOICE", "INT8_KERNEL_K_MULTIPLE", "KERNEL_MARGIN", "CpuWeightOnlyKernels", "int4_weight_linear",
           "int8_weight_linear"]

log = logging.getLogger("graphopt")

CPU_KERNEL_CHOICE = os.environ.get("GRAPHOPT_WEIGHT_ONLY_KERNEL", "auto")
"""``auto`` (time both forms per layer shape at lowering), ``kernel`` (always the int8/int4 weight
kernels) or ``dequantize-once`` (always float weights computed at lowering). Env var
``GRAPHOPT_WEIGHT_ONLY_KERNEL``."""

INT8_KERNEL_K_MULTIPLE = 16
"""``aten._weight_int8pack_mm`` takes only weights whose in-features are a multiple of this."""

KERNEL_MARGIN = 0.9
"""The weight-only kernel is chosen only when it takes under this fraction of the float time."""


def _rows(node: fx.Node) -> int | None:
    """Rows of the 2-D product ``node`` (a linear) computes, from its last recorded run."""
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    if meta is None:
        return None
    rows = 1
    for size in meta.shape[:-1]:
        rows *= int(size)
    return rows


def _best_times_ms(first: Callable[[], Any], second: Callable[[], Any], rounds: int = 7) -> tuple[float, float]:
    """The fastest of ``rounds`` timed calls of each of two functions.

    The calls alternate, so that other work on the machine disturbs both alike.
    """
    first()
    second()
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for index, fn in enumerate((first, second)):
            start = time.perf_counter()
            fn()
            best[index] = min(best[index], time.perf_counter() - start)
    return best[0] * 1e3, best[1] * 1e3


def int8_weight_linear(x: torch.Tensor, q_weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """``linear`` on an int8 weight with ``aten._weight_int8pack_mm`` (bfloat16 activations)."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    out = torch.ops.aten._weight_int8pack_mm(flat, q_weight, scale).to(x.dtype)
    out = out.reshape(*x.shape[:-1], q_weight.shape[0])
    return out + bias if bias is not None else out


def int4_weight_linear(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zeros: torch.Tensor,
                       out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear`` on a 4-bit weight with ``aten._weight_int4pack_mm_for_cpu`` (bfloat16 activations)."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, group_size, scale_and_zeros).to(x.dtype)
    out = out.reshape(*x.shape[:-1], out_features)
    return out + bias if bias is not None else out


Kernel = tuple[Callable[..., torch.Tensor], tuple[Any, ...]]
"""A weight-only kernel call: (function, its constant arguments after the activation)."""


def _kernel_form(gm: fx.GraphModule, node: fx.Node) -> Kernel | str:
    """The weight-only kernel call for ``linear(x, dequantize(...), b)``, or why there is none."""
    dequant = node.args[1]
    values = dequantize_constants(gm, dequant)
    if values is None:
        return "weight computed at run time"
    if dequant.target == DEQUANTIZE_INT8:
        q_weight, scale = values
        if scale.dim() == 2:
            return ("group-wise int8 has no PyTorch kernel (aten._weight_int8pack_mm is per channel): weight "
                    "dequantized once")
        if q_weight.shape[1] % INT8_KERNEL_K_MULTIPLE:
            # aten._weight_int8pack_mm reads K in blocks of 16 and crashes the process (torch 2.13, CPU) otherwise
            return (f"no int8 kernel for in-features {q_weight.shape[1]} (not a multiple of {INT8_KERNEL_K_MULTIPLE}):"
                    " weight dequantized once")
        return int8_weight_linear, (q_weight, scale.to(torch.bfloat16))
    packed, scale, zero_point, group = values
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    q = unpack_nibbles(packed).to(torch.int32)
    try:
        kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except RuntimeError as error:  # e.g. "expect N to be dividable by 16"
        return f"no int4 kernel for this shape ({str(error).splitlines()[0][:80]}): weight dequantized once"
    # w = (q - zp) * s  ==  (q - 8) * s + (8 - zp) * s: the kernel's (scale, zero) per group
    zeros = (8 - zero_point.float()) * scale.float()
    scale_and_zeros = torch.stack([scale.float(), zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    assert scale_and_zeros.shape == (in_features // group, out_features, 2)
    return int4_weight_linear, (kernel_weight, group, scale_and_zeros, out_features)


def _faster_form(node: fx.Node, kernel: Kernel, weight: torch.Tensor, timings: dict[tuple[Any, ...], str],
                 choice: str = "auto") -> str:
    """``kernel`` or ``dequantize-once``: ``choice`` when not ``auto``, else the faster on this layer's shape."""
    rows = _rows(node)
    choice = choice if choice != "auto" else CPU_KERNEL_CHOICE
    if choice != "auto" or rows is None:
        return choice if choice != "auto" else "dequantize-once"
    function, args = kernel
    key = (function.__name__, rows, *weight.shape)
    if key not in timings:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
        with torch.inference_mode():
            kernel_ms, float_ms = _best_times_ms(lambda: function(x, *args, None),
                                                 lambda: torch.nn.functional.linear(x, weight))
        timings[key] = "kernel" if kernel_ms < KERNEL_MARGIN * float_ms else "dequantize-once"
        log.info("weight-only %s %s: kernel %.2f ms, dequantize-once %.2f ms", function.__name__,
                 "x".join(map(str, (rows, *weight.shape))), kernel_ms, float_ms)
    return timings[key]


@dataclass(frozen=True)
class CpuWeightOnlyKernels(KernelSubstitution):
    """Each ``linear(x, dequantize_int8/int4(...), b)`` -> a weight-only kernel or a dequantized-once weight.

    Which form each layer shape gets follows ``choice`` (``CpuLowering.weight_kernels``), then
    ``CPU_KERNEL_CHOICE`` (read when the pass runs). Near misses name the layers no kernel could take.
    """

    name = "cpu-weight-only-kernels"
    choice: str = "auto"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite every weight-only linear in place."""
        counts = {"int8_weight_kernels": 0, "int4_weight_kernels": 0, "weights_dequantized_once": 0}
        near: dict[str, int] = {}
        timings: dict[tuple[Any, ...], str] = {}
        graph = gm.graph
        for node, dequant in weight_only_linears(graph):
            weight = dequantized_weight(gm, dequant)
            if weight is None:
                continue
            kernel = _kernel_form(gm, node)
            if isinstance(kernel, str):
                near[kernel] = near.get(kernel, 0) + 1
            bias = node.args[2] if len(node.args) > 2 else None
            if isinstance(kernel, str) or _faster_form(node, kernel, weight, timings, self.choice) == "dequantize-once":
                weight_node = register_constant(gm, f"{node.name}_weight", weight, before=node)
                node.replace_input_with(dequant, weight_node)
                counts["weights_dequantized_once"] += 1
                continue
            function, constants = kernel
            nodes = [register_constant(gm, f"{node.name}_{i}", c, before=node) if isinstance(c, torch.Tensor) else c
                     for i, c in enumerate(constants)]
            with graph.inserting_before(node):
                new = graph.call_function(function, (node.args[0], *nodes, bias))
            replace_node(node, new)
            counts["int8_weight_kernels" if dequant.target == DEQUANTIZE_INT8 else "int4_weight_kernels"] += 1
        return PassResult(any(counts.values()), dict(counts), near_misses={self.name: near} if near else {})
