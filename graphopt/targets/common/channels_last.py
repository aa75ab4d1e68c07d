"""Choose channels-last memory layout for convolution-heavy graphs.

oneDNN's (and cuDNN's) convolutions run fastest on NHWC ("channels-last") activations; on NCHW
ones they reorder every input and output. Elementwise ops, pooling and residual adds keep the
layout of their inputs, so converting the image once where it enters the graph keeps the whole
convolution trunk in channels-last with no conversion between layers. This pass converts each
4-D value a convolution reads that is not already channels-last (in practice the graph's image
input once), and converts 4-D graph outputs back to the standard contiguous layout, so callers
see the strides they would get from the original model.

It only acts where convolutions carry most of the work (``min_conv_share`` of the graph's
multiply-adds): a transformer with a patch-embedding convolution stays as it is.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphopt.analysis.cost import node_costs
from graphopt.passes.base import Pass, PassResult

__all__ = ["CONV_OPS", "ChannelsLast", "conv_share"]

aten = torch.ops.aten

CONV_OPS = frozenset({
    aten.conv2d.default,
    aten.convolution.default,
    torch.ops.mkldnn._convolution_pointwise.default,
    torch.ops.mkldnn._convolution_pointwise.binary,
})

_KEEPS_LAYOUT = frozenset({
    aten.relu.default, aten.hardtanh.default, aten.silu.default, aten.sigmoid.default, aten.gelu.default,
    aten.hardswish.default, aten.hardsigmoid.default, aten.leaky_relu.default, aten.tanh.default,
    aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.clamp.default,
    aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
    aten.dropout.default, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
})
"""Ops whose output is channels-last when their 4-D tensor inputs are (PyTorch's CPU kernels keep it)."""


def conv_share(gm: fx.GraphModule) -> float:
    """Fraction of the graph's multiply-adds spent in convolutions (0 when it has none)."""
    costs = node_costs(gm)
    total = sum(c.macs for c in costs.values())
    if total == 0:
        return 0.0
    conv = sum(costs[n.name].macs for n in gm.graph.nodes if n.op == "call_function" and n.target in CONV_OPS)
    return conv / total


def _is_4d(node: object) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dim() == 4


@dataclass(frozen=True)
class ChannelsLast(Pass):
    """Run convolution trunks in channels-last layout, converting once at the entry and at 4-D outputs.

    ``min_conv_share``: act only when convolutions do at least this fraction of the
    multiply-adds. Stats: ``to_channels_last`` and ``to_contiguous`` conversions inserted
    (a ResNet gets one of the first and none of the second).
    """

    name = "channels-last"
    min_conv_share: float = 0.5

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Insert the layout conversions in place."""
        convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONV_OPS and _is_4d(n)]
        if not convs:
            return PassResult(False)
        share = conv_share(gm)
        if share < self.min_conv_share:
            return PassResult(False, near_misses={"channels-last": {
                f"convolutions do {share:.0%} of the work (< {self.min_conv_share:.0%})": 1}})
        stats: Counter[str] = Counter()
        channels_last: set[fx.Node] = set()
        converted: dict[fx.Node, fx.Node] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node in convs:
                source = node.args[0]
                if isinstance(source, fx.Node) and source not in channels_last:
                    if source not in converted:
                        with gm.graph.inserting_after(source):
                            new = gm.graph.call_function(aten.clone.default, (source,),
                                                         {"memory_format": torch.channels_last})
                        new.meta["val"] = source.meta["val"]
                        converted[source] = new
                        channels_last.add(new)
                        stats["to_channels_last"] += 1
                    node.replace_input_with(source, converted[source])
                channels_last.add(node)
            elif node.target in _KEEPS_LAYOUT and _is_4d(node):
                tensors = [a for a in node.args if isinstance(a, fx.Node) and _is_4d(a)]
                if tensors and all(a in channels_last for a in tensors):
                    channels_last.add(node)
        output = next(n for n in gm.graph.nodes if n.op == "output")
        for value in list(output.all_input_nodes):
            if value in channels_last:
                with gm.graph.inserting_before(output):
                    back = gm.graph.call_function(aten.clone.default, (value,),
                                                  {"memory_format": torch.contiguous_format})
                back.meta["val"] = value.meta["val"]
                output.replace_input_with(value, back)
                stats["to_contiguous"] += 1
        return PassResult(bool(stats), dict(stats))
