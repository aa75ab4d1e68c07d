"""The fused decoder ops (namespace ``graphopt_decoder``) and how to write them back as ATen ops.

``swiglu(gate, up) -> silu(gate) * up``
    gated MLP of Llama, Mistral, Qwen2, Phi-3 (``fuse-gated-mlp``).
``geglu(gate, up, approximate="none") -> gelu(gate, approximate) * up``
    gated MLP of Gemma (``approximate="tanh"``).
``rotary(x, cos, sin) -> x * cos + rotate_half(x) * sin``
    rotary position embedding, half-split convention: ``rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])``
    (``fuse-rotary``); ``cos`` and ``sin`` broadcast to ``x``'s shape.

Their kernels are PyTorch ops, for any device, and give the same bits as the ATen chains they
replace: ``swiglu`` multiplies in place into the activation; ``rotary`` computes
``rotate_half(x) * sin`` as ``roll(x, d/2) * (sin * sign)`` (``sign`` = -1 on the first half,
a cached constant), 5 kernels instead of 7 and no slices.

They are defined with ``torch.library.Library`` (schema + ``CompositeExplicitAutograd`` kernel +
``register_fake``) rather than ``torch.library.custom_op``: custom_op's Python wrapper costs
about 6 µs per call, more than these ops save on one decode token. ``decompose`` writes a node
of one of them back as the ATen ops it stands for (for exporters that do not know them).
Import this module to register the ops (``graphopt.workflows.save_load`` does, for saved graphs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import node_shape
from graphopt.ir.meta import infer_meta
from graphopt.ir.op_traits import register_broadcasting

__all__ = ["DECODER_OPS", "GEGLU", "NAMESPACE", "ROTARY", "SWIGLU", "decompose", "rotary_reference"]

NAMESPACE = "graphopt_decoder"
aten = torch.ops.aten

_LIBRARY = torch.library.Library(NAMESPACE, "DEF")
_LIBRARY.define("swiglu(Tensor gate, Tensor up) -> Tensor")
_LIBRARY.define("geglu(Tensor gate, Tensor up, str approximate='none') -> Tensor")
_LIBRARY.define("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor")

_SIGNS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _half_signs(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[-1] * (size/2) + [1] * (size/2)``, cached per size, dtype and device (not while a CUDA graph records)."""
    key = (size, dtype, device)
    signs = _SIGNS.get(key)
    if signs is None:
        signs = torch.ones(size, dtype=dtype, device=device)
        signs[: size // 2] = -1
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _SIGNS[key] = signs
    return signs


def _in_place_ok(out: torch.Tensor, other: torch.Tensor) -> bool:
    """``out op= other`` gives what ``out op other`` gives: same shape and dtype (cheap: called on every token)."""
    return other.shape == out.shape and other.dtype == out.dtype


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, multiplied in place into the activation."""
    out = torch.nn.functional.silu(gate)
    return out.mul_(up) if _in_place_ok(out, up) else out * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(gate, approximate) * up``, multiplied in place into the activation."""
    out = torch.nn.functional.gelu(gate, approximate=approximate)
    return out.mul_(up) if _in_place_ok(out, up) else out * up


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (half-split), as ``x * cos + roll(x, d/2) * (sin * sign)``: same bits."""
    size = x.shape[-1]
    out = x * cos
    rotated = x.roll(size // 2, -1) * (sin * _half_signs(size, sin.dtype, sin.device))
    return out.add_(rotated) if _in_place_ok(out, rotated) else out + rotated


_LIBRARY.impl("swiglu", swiglu_reference, "CompositeExplicitAutograd")
_LIBRARY.impl("geglu", geglu_reference, "CompositeExplicitAutograd")
_LIBRARY.impl("rotary", rotary_reference, "CompositeExplicitAutograd")


@torch.library.register_fake(f"{NAMESPACE}::swiglu")
def _swiglu_fake(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gate * up  # the kernel's shape, dtype and memory layout (compilers check strides)


@torch.library.register_fake(f"{NAMESPACE}::geglu")
def _geglu_fake(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return gate * up


@torch.library.register_fake(f"{NAMESPACE}::rotary")
def _rotary_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x * sin


SWIGLU = register_broadcasting(torch.ops.graphopt_decoder.swiglu.default)
GEGLU = register_broadcasting(torch.ops.graphopt_decoder.geglu.default)
ROTARY = register_broadcasting(torch.ops.graphopt_decoder.rotary.default, mixed_last_dims=1,
                              reason="rotary embeddings pair the two halves of the head dim")
DECODER_OPS = (SWIGLU, GEGLU, ROTARY)
"""Every ``graphopt_decoder`` op, for lowering and inspection."""


def _call(graph: fx.Graph, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> fx.Node:
    node = graph.call_function(target, args, kwargs or {})
    infer_meta(node)
    return node


def decompose(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Insert the ATen ops ``node`` (a ``graphopt_decoder`` call) stands for before it; returns their result.

    The caller replaces ``node``'s uses with the result and erases it. Shapes and dtypes are
    recorded on every new node.
    """
    graph = gm.graph
    args = node.args
    with graph.inserting_before(node):
        if node.target is SWIGLU:
            return _call(graph, aten.mul.Tensor, (_call(graph, aten.silu.default, (args[0],)), args[1]))
        if node.target is GEGLU:
            approximate = args[2] if len(args) > 2 else node.kwargs.get("approximate", "none")
            gelu = _call(graph, aten.gelu.default, (args[0],), {"approximate": approximate})
            return _call(graph, aten.mul.Tensor, (gelu, args[1]))
        if node.target is ROTARY:
            x, cos, sin = args
            half = node_shape(x)[-1] // 2
            first = _call(graph, aten.slice.Tensor, (x, -1, 0, half))
            second = _call(graph, aten.slice.Tensor, (x, -1, half, 2 * half))
            rotated = _call(graph, aten.cat.default, ([_call(graph, aten.neg.default, (second,)), first], -1))
            return _call(graph, aten.add.Tensor, (_call(graph, aten.mul.Tensor, (x, cos)),
                                                  _call(graph, aten.mul.Tensor, (rotated, sin))))
    raise ValueError(f"not a graphopt_decoder op: {node.target}")
