"""GPTQ rounding: quantize a weight column by column, moving each column's rounding error onto the columns left.

Round-to-nearest picks every weight's grid point alone. GPTQ (Frantar et al., 2022) picks them
so the layer's *output* on calibration data moves least: with ``H = Σ xᵀx`` over the layer's
input rows, it rounds column ``k`` and adds to the columns not rounded yet the change that best
makes up for the error, ``ΔW[:, k+1:] = -err_k · H⁻¹[k, k+1:] / H⁻¹[k, k]`` (the inverse taken
through a Cholesky factor, damped by ``DAMPING`` of the mean diagonal). Columns go in blocks of
``BLOCK`` (or of one group, when larger) whose updates reach the rest of the matrix once per
block. A group's grid (scale and zero point) is chosen when its first column is reached, from
the weights as they are updated by then, so the stored layout is exactly round-to-nearest's:
the same kernels run it.

``HessianWatcher`` accumulates ``H`` for one layer from its input values
(``graphopt.passes.lossy.calibration.watch_values``); ``gptq_int4`` and ``gptq_int8`` return the
same tensors as ``quantize_int4_groupwise`` / ``quantize_int8_*`` in ``weight_only``, whose grids
(``int4_group_grid``, ``int8_group_grid``) the caller passes in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from graphopt.passes.quantize.weight_ops import pack_nibbles

__all__ = ["BLOCK", "DAMPING", "HessianWatcher", "gptq_int4", "gptq_int8"]

BLOCK = 128
"""Columns rounded between two updates of the rest of the matrix (a multiple of every group size up to it)."""

DAMPING = 0.01
"""Added to ``H``'s diagonal, as a fraction of its mean, so that the inverse exists and stays tame."""


class HessianWatcher:
    """Accumulates ``H = Σ xᵀx`` over the rows of a layer's input (its last dim is the input features)."""

    def __init__(self, features: int) -> None:
        self.features = features
        self.hessian = torch.zeros(features, features)  # float32, as GPTQ's authors keep it: K² floats per input
        self.rows = 0

    def update(self, value: torch.Tensor) -> None:
        """Add the rows of one input value."""
        if value.shape[-1] != self.features:
            return
        rows = value.detach().reshape(-1, self.features).float()
        self.hessian += rows.T @ rows
        self.rows += rows.shape[0]


# One group's grid from its current weights [N, g]: (scale [N], zero point [N]) in w = (q - zero) * scale.
GridChooser = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int,
              grid: GridChooser) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes per ``group_size`` input features, rounded by GPTQ.

    ``grid`` chooses a group's scale and zero point from its weights (round-to-nearest's own
    choice). Returns ``(packed uint8 [N, K/2], scale [N, K/g], zero_point [N, K/g])``.
    """
    codes, scales, zeros = _gptq(weight, hessian, group_size, grid, low=0, high=15)
    return pack_nibbles(codes.to(torch.uint8)), scales.to(weight.dtype), zeros.to(weight.dtype)


def gptq_int8(weight: torch.Tensor, hessian: torch.Tensor, group_size: int | None,
              grid: GridChooser) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (``group_size`` None) or per group, rounded by GPTQ.

    ``grid`` chooses the scale of each row of the values it is given (round-to-nearest's own
    choice); per channel it is asked once, for the original weights. Returns ``(q int8 [N, K],
    scale)``: ``scale`` is ``[N]`` per channel, ``[N, K/g]`` per group.
    """
    if group_size is None:  # one grid for the whole row, fixed by the original weights
        scale, zero = grid(weight.detach().float())
        fixed: GridChooser = lambda values: (scale, zero)  # noqa: E731
        codes, _, _ = _gptq(weight, hessian, weight.shape[1], fixed, low=-127, high=127, block=BLOCK)
        return codes.to(torch.int8), scale.to(weight.dtype)
    codes, scales, _ = _gptq(weight, hessian, group_size, grid, low=-127, high=127)
    return codes.to(torch.int8), scales.to(weight.dtype)


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, grid: GridChooser,
          low: int, high: int, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes ``[N, K]`` (float), scales and zero points ``[N, K/g]``.

    ``block``: columns per block; by default large enough to hold a group, whose grid is chosen
    from its updated weights (a grid that ignores them, one per row, may span blocks).
    """
    w = weight.detach().to(torch.float32).clone()
    rows, columns = w.shape
    inverse = _inverse_factor(hessian, w)
    codes = torch.zeros_like(w)
    groups = columns // group_size
    scales = torch.zeros(rows, groups)
    zeros = torch.zeros(rows, groups)
    block = block or max(BLOCK, group_size)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        part = w[:, start:end].clone()
        errors = torch.zeros_like(part)
        factor = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % group_size == 0:
                g = column // group_size
                scales[:, g], zeros[:, g] = grid(part[:, i:i + group_size])
            g = column // group_size
            q = torch.clamp(torch.round(part[:, i] / scales[:, g] + zeros[:, g]), low, high)
            codes[:, column] = q
            error = (part[:, i] - (q - zeros[:, g]) * scales[:, g]) / factor[i, i]
            part[:, i:] -= error.unsqueeze(1) * factor[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return codes, scales, zeros


def _inverse_factor(hessian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of the damped ``H⁻¹`` (float32); dead inputs (never non-zero) get weight 0."""
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    h += torch.eye(h.shape[0], dtype=h.dtype) * (DAMPING * float(torch.diagonal(h).mean()))
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).to(torch.float32)
