"""The dequantize ops of compressed weights (weight-only int8 / int4, K-means codebooks).

A weight-compressing pass stores each weight in its compact form (``int8`` rows, packed
4-bit groups, codebook indices) and inserts one of these ops in front of the layer, so the
IR stays one graph of ordinary layers whose float weight is computed from the compact
tensors. Run as they are, these ops are the numerical reference; the targets lower them to
kernels that read the compact weights (the targets' weight-only lowering passes).

Ops (namespace ``graphopt_weights``, registered on import of this module):

``dequantize_int8(q: int8[N, ...], scale: float[N]) -> float[N, ...]``
    symmetric per-output-channel: ``w = q * scale[n]``, ``q`` in [-127, 127]; or group-wise for
    ``q [N, K]``, ``scale [N, K/g]``: ``w = q * scale[n, k // g]``.
``dequantize_int4(packed: uint8[N, K/2], scale: float[N, K/g], zero_point: float[N, K/g], group_size) -> float[N, K]``
    asymmetric group-wise 4-bit: ``w = (q - zero_point[n, k // g]) * scale[n, k // g]``, ``q`` in
    [0, 15], two per byte, the even ``k`` in the low nibble (onnxruntime's MatMulNBits layout).
``dequantize_codebook(indices: uint8[...], codebook: float[k], bits, shape) -> float[shape]``
    ``w = codebook[index]``; for ``bits == 4`` two indices per byte (even position in the low nibble).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "dequantize_codebook_reference",
    "dequantize_int4_reference",
    "dequantize_int8_reference",
    "pack_nibbles",
    "unpack_nibbles",
]

NAMESPACE = "graphopt_weights"


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values (last dim even) two per byte: element ``2i`` low nibble, ``2i + 1`` high."""
    if values.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dim, got shape {tuple(values.shape)}")
    v = values.to(torch.uint8)
    return (v[..., 0::2] & 0x0F) | ((v[..., 1::2] & 0x0F) << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: uint8 ``[..., n]`` -> uint8 ``[..., 2n]`` of values 0..15."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize_int8_reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale``: ``scale [N]`` per output channel, or ``scale [N, K/g]`` per group of a ``[N, K]`` weight."""
    if scale.dim() == 2 and q.dim() == 2:
        rows, columns = q.shape
        groups = scale.shape[1]
        grouped = q.to(scale.dtype).reshape(rows, groups, columns // groups) * scale.unsqueeze(-1)
        return grouped.reshape(rows, columns)
    view = scale.reshape(-1, *([1] * (q.dim() - 1)))
    return q.to(scale.dtype) * view


def dequantize_int4_reference(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                              group_size: int) -> torch.Tensor:
    """Unpack and dequantize group-wise 4-bit weights to ``[N, K]``."""
    q = unpack_nibbles(packed).to(scale.dtype)
    rows, columns = q.shape
    grouped = q.reshape(rows, columns // group_size, group_size)
    weight = (grouped - zero_point.to(scale.dtype).unsqueeze(-1)) * scale.unsqueeze(-1)
    return weight.reshape(rows, columns)


def dequantize_codebook_reference(indices: torch.Tensor, codebook: torch.Tensor, bits: int,
                                  shape: Sequence[int]) -> torch.Tensor:
    """Look the (possibly nibble-packed) indices up in the codebook and shape the result."""
    flat = unpack_nibbles(indices.reshape(-1)) if bits == 4 else indices.reshape(-1)
    count = 1
    for size in shape:
        count *= size
    return codebook[flat[:count].long()].reshape(list(shape))


@torch.library.custom_op(f"{NAMESPACE}::dequantize_int8", mutates_args=())
def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8 weight to float."""
    return dequantize_int8_reference(q, scale)


@dequantize_int8.register_fake
def _(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty(q.shape, dtype=scale.dtype, device=q.device)


@torch.library.custom_op(f"{NAMESPACE}::dequantize_int4", mutates_args=())
def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """Asymmetric group-wise 4-bit weight (two per byte) to float ``[N, K]``."""
    return dequantize_int4_reference(packed, scale, zero_point, group_size)


@dequantize_int4.register_fake
def _(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int) -> torch.Tensor:
    return torch.empty((packed.shape[0], packed.shape[1] * 2), dtype=scale.dtype, device=packed.device)


@torch.library.custom_op(f"{NAMESPACE}::dequantize_codebook", mutates_args=())
def dequantize_codebook(indices: torch.Tensor, codebook: torch.Tensor, bits: int,
                        shape: Sequence[int]) -> torch.Tensor:
    """Codebook lookup of K-means clustered weights."""
    return dequantize_codebook_reference(indices, codebook, bits, shape)


@dequantize_codebook.register_fake
def _(indices: torch.Tensor, codebook: torch.Tensor, bits: int, shape: Sequence[int]) -> torch.Tensor:
    return torch.empty(list(shape), dtype=codebook.dtype, device=indices.device)


DEQUANTIZE_INT8 = torch.ops.graphopt_weights.dequantize_int8.default
DEQUANTIZE_INT4 = torch.ops.graphopt_weights.dequantize_int4.default
DEQUANTIZE_CODEBOOK = torch.ops.graphopt_weights.dequantize_codebook.default
DEQUANTIZE_OPS = (DEQUANTIZE_INT8, DEQUANTIZE_INT4, DEQUANTIZE_CODEBOOK)
"""Every weight dequantize op, for lowering and inspection."""
