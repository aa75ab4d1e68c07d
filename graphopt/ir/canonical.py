"""One spelling per op: ATen overloads and forms the passes would miss, rewritten as the ones they match.

- **String padding.** ``nn.Conv2d(..., padding="same")`` (models ported from TensorFlow:
  EfficientNet in transformers, many timm and Keras ports) captures as ``aten.conv2d.padding``,
  an overload every pass and lowering that matches ``aten.conv2d.default`` would miss: no
  batch-norm folding, no quantization, no pruning. :func:`explicit_conv_padding` rewrites it as
  the ``.default`` overload with the padding spelled out: ``"valid"`` is zero; ``"same"`` pads
  ``dilation * (kernel - 1)`` per spatial dim, half on each side, and when that is odd (an even
  kernel) the extra element after the input, as PyTorch does, by an explicit ``constant_pad_nd``.
- **Global pooling as a window.** ``nn.AvgPool2d(1280, ceil_mode=True)`` on a 7 x 7 map
  (EfficientNet's pooler) averages the whole map through a window larger than it, which
  OpenVINO refuses and the passes do not read as global pooling. :func:`global_average_pools`
  rewrites an average pool with one output position whose window covers its whole input as
  ``adaptive_avg_pool2d(x, [1, 1])``, the mean over the spatial dims.

:func:`canonicalize` runs both; capture calls it on every graph.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value
from graphopt.ir.meta import infer_meta

__all__ = ["canonicalize", "explicit_conv_padding", "global_average_pools"]

aten = torch.ops.aten

_OVERLOADS = {aten.conv1d.padding: aten.conv1d.default, aten.conv2d.padding: aten.conv2d.default,
              aten.conv3d.padding: aten.conv3d.default}


def canonicalize(gm: fx.GraphModule) -> int:
    """Every rewrite of this module on ``gm``, in place; how many ops changed."""
    count = explicit_conv_padding(gm) + global_average_pools(gm)
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def explicit_conv_padding(gm: fx.GraphModule) -> int:
    """Rewrite every string-padded convolution of ``gm`` with numeric padding, in place (not recompiled); how many.

    A convolution whose weight is neither a stored tensor nor has a known shape stays as it is.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _OVERLOADS:
            continue
        args = [*node.args, *[None, 1, "valid", 1, 1][len(node.args) - 2:]]
        x, weight, bias, stride, padding, dilation, groups = args[:7]
        bias, padding = node.kwargs.get("bias", bias), node.kwargs.get("padding", padding)
        kernel = weight.meta.get("val") if isinstance(weight, fx.Node) else None
        if kernel is None and isinstance(weight, fx.Node) and weight.op == "get_attr":
            kernel = attribute_value(gm, weight)
        if not isinstance(kernel, torch.Tensor) or padding not in ("same", "valid"):
            continue
        spatial = kernel.dim() - 2
        dilation = _per_dim(node.kwargs.get("dilation", dilation), spatial)
        totals = [0] * spatial if padding == "valid" else [d * (k - 1) for d, k in zip(dilation, kernel.shape[2:],
                                                                                    strict=True)]
        before = [total // 2 for total in totals]
        graph = gm.graph
        with graph.inserting_before(node):
            source = x
            if any(total % 2 for total in totals):  # the odd element after the input (last dim first)
                extra = [value for total in reversed(totals) for value in (0, total % 2)]
                source = graph.call_function(aten.constant_pad_nd.default, (x, extra, 0.0))
                infer_meta(source)
            new = graph.call_function(_OVERLOADS[node.target], (
                source, weight, bias, _per_dim(node.kwargs.get("stride", stride), spatial), before, dilation,
                int(node.kwargs.get("groups", groups))))
        _replace(gm, node, new)
        count += 1
    return count


def global_average_pools(gm: fx.GraphModule) -> int:
    """Rewrite each ``avg_pool2d`` whose one window covers its whole input as a global mean, in place; how many.

    The window starts at the input's first element (no padding) and reaches past its last in
    both spatial dims, and there is one output position: the average is over every input
    element (a window clipped to the input divides by what it covers), which is
    ``adaptive_avg_pool2d(x, [1, 1])``. Shapes must be static.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.avg_pool2d.default:
            continue
        source, kernel = node.args[0], _per_dim(node.args[1], 2)
        padding = _per_dim(node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0), 2)
        divisor = node.args[6] if len(node.args) > 6 else node.kwargs.get("divisor_override")
        before, after = source.meta.get("val"), node.meta.get("val")
        if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)) or divisor is not None:
            continue
        if not all(isinstance(d, int) for d in (*before.shape[-2:], *after.shape[-2:])):
            continue
        if padding != [0, 0] or list(after.shape[-2:]) != [1, 1] or any(
                k < size for k, size in zip(kernel, before.shape[-2:], strict=True)):
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(aten.adaptive_avg_pool2d.default, (source, [1, 1]))
        _replace(gm, node, new)
        count += 1
    return count


def _replace(gm: fx.GraphModule, old: fx.Node, new: fx.Node) -> None:
    """Put ``new``, which computes what ``old`` did, in ``old``'s place, with all of its meta (value, provenance)."""
    new.meta.update(old.meta)
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)


def _per_dim(value: int | list[int] | tuple[int, ...], dims: int) -> list[int]:
    """An ATen ``int[dims]`` argument per dim: one value (bare or in a list of one) stands for every dim."""
    values = [int(value)] if isinstance(value, int) else [int(v) for v in value]
    return values * dims if len(values) == 1 else values
