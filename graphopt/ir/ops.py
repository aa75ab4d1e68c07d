"""Named sets of ATen ops, defined once: the op families passes and analyses match on.

Each set holds ``OpOverload``s (``aten.conv2d.default``), as they appear as ``node.target`` in
a captured graph, except ``MAYBE_ALIASING_OPS`` (overload packets). A pass that handles a
narrower family on purpose (what one kernel supports, say) names its own subset, built from
these where it can.
"""

from __future__ import annotations

import torch

__all__ = [
    "ACTIVATION_OPS",
    "ALIAS_OPS",
    "BATCHED_MATMUL_OPS",
    "CONV_OPS",
    "COPY_OPS",
    "DROPOUT_OPS",
    "LINEAR_OPS",
    "LOG_SOFTMAX_OPS",
    "MATMUL_OPS",
    "MAYBE_ALIASING_OPS",
    "RESHAPE_OPS",
    "SOFTMAX_OPS",
    "STRING_PADDING_CONV_OPS",
    "TRANSPOSED_CONV_OPS",
    "WEIGHTED_LAYER_OPS",
]

aten = torch.ops.aten

CONV_OPS = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default})
"""Convolutions with numeric padding: ``conv1d/2d/3d(x, weight, bias, ...)`` and ``convolution``.

``convolution`` may be transposed (its ``transposed`` argument): read it with
``graphopt.ir.op_args.conv_arguments``.
"""

STRING_PADDING_CONV_OPS = frozenset({aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding})
"""Convolutions whose padding is a string (``"same"`` / ``"valid"``); same operands as ``CONV_OPS``."""

TRANSPOSED_CONV_OPS = frozenset({
    aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
})
"""Transposed convolutions (weight ``[C_in, C_out / groups, *k]``)."""

LINEAR_OPS = frozenset({aten.linear.default, aten.addmm.default})
"""Fully connected layers: ``linear(x, W[N, K], b)`` and ``addmm(b, x, W[K, N])`` (``x @ W + b``)."""

MATMUL_OPS = frozenset({aten.mm.default, aten.bmm.default, aten.matmul.default})
"""Products of two operands with no bias: ``mm``, ``bmm``, ``matmul`` (the right one may be a weight)."""

BATCHED_MATMUL_OPS = frozenset({aten.bmm.default, aten.matmul.default})
"""Products that may carry batch dims (attention's ``q @ k^T`` and ``p @ v``)."""

WEIGHTED_LAYER_OPS = CONV_OPS | LINEAR_OPS | MATMUL_OPS
"""Ops whose weight operand may be a stored constant: convolutions, linear layers and products."""

ACTIVATION_OPS = frozenset({
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.hardtanh.default, aten.sigmoid.default,
    aten.tanh.default, aten.hardswish.default, aten.leaky_relu.default, aten.hardsigmoid.default,
})
"""Point-wise activations that usually follow a layer (one input, same shape out)."""

DROPOUT_OPS = frozenset({
    aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
    aten.feature_alpha_dropout.default,
})
"""Dropouts, all ``(input, p, train)``: the identity when ``train`` is False or ``p`` is 0."""

SOFTMAX_OPS = frozenset({aten.softmax.int, aten._softmax.default, aten._safe_softmax.default})
"""Softmax over one dim, ``(input, dim, ...)`` (``_safe_softmax`` gives 0 for fully masked rows)."""

LOG_SOFTMAX_OPS = frozenset({aten.log_softmax.int, aten._log_softmax.default})
"""Log-softmax over one dim, ``(input, dim, ...)``."""

RESHAPE_OPS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
"""``(input, shape)`` reshapes: the same elements in row-major order."""

ALIAS_OPS = frozenset({aten.alias.default, aten.detach.default})
"""Ops that return their input itself (same values, same storage)."""

COPY_OPS = frozenset({aten.clone.default, aten.contiguous.default})
"""Ops that return their input's values (a copy, or the input itself when already contiguous)."""

MAYBE_ALIASING_OPS = frozenset({
    aten.type_as, aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout,
    aten.atleast_1d, aten.atleast_2d, aten.atleast_3d, aten._unsafe_view,
})
"""Op packets whose result may be their input itself although their schema does not say so."""
