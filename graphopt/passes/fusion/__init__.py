"""Target-neutral fusion passes: exact rewrites of hand-written op chains into single fused ATen ops.

- ``fuse-attention`` (:class:`FuseAttention`): ``softmax(q @ k^T * scale + mask) @ v`` →
  ``scaled_dot_product_attention``;
- ``fuse-activations`` (:class:`FuseActivations`): tanh/erf GELU, SiLU, hardswish, hardsigmoid
  written op by op → ``gelu`` / ``silu`` / ``hardswish`` / ``hardsigmoid``;
- ``fuse-norms`` (:class:`FuseNorms`): hand-written LayerNorm / RMSNorm → ``layer_norm`` / ``rms_norm``;
- ``fuse-horizontal`` (:class:`FuseHorizontal`): sibling linears reading one input → one linear
  with concatenated weights and a split;
- ``fuse-gqa`` (:class:`FuseGroupedQueryAttention`): SDPA on ``repeat_kv``-ed keys/values → SDPA
  with ``enable_gqa=True`` on the key/value heads;
- ``fuse-rotary`` (:class:`FuseRotary`): ``x * cos + rotate_half(x) * sin`` → ``graphopt_decoder::rotary``;
- ``fuse-gated-mlp`` (:class:`FuseGatedActivations`): ``silu(gate) * up`` / ``gelu(gate) * up`` →
  ``graphopt_decoder::swiglu`` / ``geglu`` (ops in ``graphopt.passes.fusion.decoder_ops``);
- ``unpack-attention`` (:class:`UnpackAttention`): ``nn.MultiheadAttention``'s packed q/k/v picking
  and batch-folded heads → slices and ``[N, H, S, d]`` heads (no fusion: the standard form the
  other passes and the pruning analysis understand).

Every pass reports what it fused and, as near-misses, the reasons it refused look-alikes.
See docs/fusion.md.
"""

from graphopt.passes.fusion.activations import FuseActivations
from graphopt.passes.fusion.attention import FuseAttention
from graphopt.passes.fusion.gated import FuseGatedActivations
from graphopt.passes.fusion.gqa import FuseGroupedQueryAttention
from graphopt.passes.fusion.horizontal import FuseHorizontal
from graphopt.passes.fusion.norms import FuseNorms
from graphopt.passes.fusion.packed_attention import UnpackAttention
from graphopt.passes.fusion.rotary import FuseRotary

__all__ = ["FuseActivations", "FuseAttention", "FuseGatedActivations", "FuseGroupedQueryAttention", "FuseHorizontal",
           "FuseNorms", "FuseRotary", "UnpackAttention"]
