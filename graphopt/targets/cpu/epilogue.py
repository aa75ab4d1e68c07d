"""Epilogue fusion for the CPU: conv / linear + bias + activation (+ residual add) as one oneDNN kernel.

A convolution or linear layer whose weight is a constant, followed by a residual ``add`` and/or
an activation that nothing else reads in between, becomes one call of oneDNN's fused kernels
(``torch.ops.mkldnn._convolution_pointwise`` / ``_linear_pointwise``, the kernels Inductor's CPU
fusion uses). The activation and the add run in the kernel's epilogue while the output tile is
still in cache, and oneDNN's GEMM/convolution is markedly faster than the default ATen path on
this kind of CPU. ``addmm(bias, x, W)`` and ``mm(x, W)`` with a constant ``W`` (GPT-2's
``Conv1D``) become linears on a transposed copy of ``W``.

The result still runs eagerly with dense weights (so the pass manager verifies it like any
other pass); ``graphopt.targets.cpu.lowering`` then swaps the convolution weights for oneDNN's
prepacked layout. The kernels exist in CPU builds of torch with oneDNN (``torch.backends.mkldnn``);
elsewhere the pass changes nothing and says why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.ir.graph import attribute_value, prune_unused_attributes, register_constant
from graphopt.passes.base import Pass, PassResult
from graphopt.targets.common.patterns import RESIDUAL_BROADCASTS, conv_arguments, residual_operand

__all__ = ["FUSED_OPS", "EpilogueFusion", "onednn_available"]

aten = torch.ops.aten

FUSED_OPS = (
    "mkldnn._convolution_pointwise.default",
    "mkldnn._convolution_pointwise.binary",
    "mkldnn._linear_pointwise.default",
    "mkldnn._linear_pointwise.binary",
)
"""Names (as ``graphopt.ir.graph.op_name`` gives them) of the fused kernels this pass emits."""

_FLOAT_DTYPES = (torch.float32, torch.bfloat16)


def onednn_available() -> bool:
    """True when this torch build has oneDNN and its fused pointwise ops."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _scalars_none(node: fx.Node) -> tuple[list[Any], str]:
    return [], ""


def _hardtanh(node: fx.Node) -> tuple[list[Any], str]:
    low = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
    high = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
    return [float(low), float(high)], ""


def _leaky_relu(node: fx.Node) -> tuple[list[Any], str]:
    return [float(node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01))], ""


def _gelu(node: fx.Node) -> tuple[list[Any], str]:
    return [], str(node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none"))


_UNARY: dict[Any, tuple[str, Callable[[fx.Node], tuple[list[Any], str]]]] = {
    aten.relu.default: ("relu", _scalars_none),
    aten.sigmoid.default: ("sigmoid", _scalars_none),
    aten.tanh.default: ("tanh", _scalars_none),
    aten.silu.default: ("swish", _scalars_none),
    aten.hardswish.default: ("hardswish", _scalars_none),
    aten.hardsigmoid.default: ("hardsigmoid", _scalars_none),
    aten.hardtanh.default: ("hardtanh", _hardtanh),
    aten.leaky_relu.default: ("leaky_relu", _leaky_relu),
    aten.gelu.default: ("gelu", _gelu),
}
"""ATen activations oneDNN can apply in a kernel's epilogue: op -> (oneDNN name, (scalars, algorithm))."""

_UNARY_AFTER_ADD = {"relu"}
"""Activations oneDNN applies after a fused residual add (binary post-op followed by a unary one)."""


@dataclass
class _Layer:
    """A convolution or linear layer the pass may fuse, with its arguments normalised."""

    kind: str  # "conv" | "linear"
    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: Any
    conv_args: tuple[list[int], list[int], list[int], int] | None = None  # padding, stride, dilation, groups
    transpose_weight: bool = False  # addmm/mm: the constant is (in, out) and needs a transposed copy


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


class _Fuser:
    """One run of the pass over a graph: finds layers, grows their epilogues, rewrites them."""

    def __init__(self, gm: fx.GraphModule, pass_: EpilogueFusion) -> None:
        self.gm = gm
        self.pass_ = pass_
        self.stats: Counter[str] = Counter()
        self.near: Counter[str] = Counter()

    # ----------------------------------------------------------------- finding layers

    def _constant(self, node: Any) -> torch.Tensor | None:
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            return None
        return attribute_value(self.gm, node)

    def _layer(self, node: fx.Node) -> _Layer | None:
        target = node.target
        if self.pass_.conv and target in (aten.conv2d.default, aten.convolution.default):
            return self._conv(node)
        if self.pass_.linear and target in (aten.linear.default, aten.addmm.default, aten.mm.default):
            return self._linear(node)
        return None

    def _conv(self, node: fx.Node) -> _Layer | None:
        arguments = conv_arguments(node)
        if isinstance(arguments, str):
            self.near[arguments] += 1
            return None
        x, w, b, stride, padding, dilation, groups = arguments
        return self._checked("conv", node, x, w, b, (padding, stride, dilation, groups))

    def _linear(self, node: fx.Node) -> _Layer | None:
        if node.target == aten.linear.default:
            x, w = node.args[0], node.args[1]
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            return self._checked("linear", node, x, w, b, None)
        if node.target == aten.addmm.default:
            if len(node.args) > 3 or node.kwargs:
                self.near["addmm with beta/alpha"] += 1
                return None
            b, x, w = node.args[:3]
            bias = self._constant(b)
            if bias is None or bias.dim() != 1:
                self.near["addmm whose bias is not a constant vector"] += 1
                return None
        else:
            x, w = node.args[:2]
            b = None
        layer = self._checked("linear", node, x, w, b, None, transposed=True)
        return layer

    def _checked(self, kind: str, node: fx.Node, x: Any, w: Any, b: Any, conv_args: Any,
                 transposed: bool = False) -> _Layer | None:
        weight = self._constant(w)
        if weight is None:
            self.near[f"{kind} weight computed at run time"] += 1
            return None
        expected_dim = 4 if kind == "conv" else 2
        if weight.dim() != expected_dim:
            self.near[f"{kind} weight of rank {weight.dim()}"] += 1
            return None
        value = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not isinstance(value, torch.Tensor) or value.dtype not in _FLOAT_DTYPES or value.dtype != weight.dtype:
            self.near[f"{kind} input is not float32/bfloat16 like its weight"] += 1
            return None
        if kind == "conv" and value.dim() != 4:
            self.near["convolution input is not 4-D"] += 1
            return None
        if kind == "linear" and value.dim() < 2:
            self.near["linear input is 1-D"] += 1
            return None
        if b is not None:
            bias = self._constant(b)
            if bias is None or bias.dtype != weight.dtype:
                self.near[f"{kind} bias computed at run time or of another dtype"] += 1
                return None
        return _Layer(kind, node, x, w, b, conv_args, transposed)

    # ----------------------------------------------------------------- epilogues

    def _residual(self, out: fx.Node) -> tuple[fx.Node, fx.Node] | None:
        """``(add node, other operand)`` when ``out``'s only user adds a same-shaped tensor to it."""
        user = _single_user(out)
        if user is None:
            return None
        other = residual_operand(user, out)
        if other == RESIDUAL_BROADCASTS:
            self.near[RESIDUAL_BROADCASTS] += 1
        return (user, other) if isinstance(other, fx.Node) else None

    def _activation(self, out: fx.Node) -> tuple[fx.Node, str, list[Any], str] | None:
        user = _single_user(out)
        if user is None or user.op != "call_function" or user.target not in _UNARY:
            return None
        if user.args[0] is not out:
            return None
        attr, read = _UNARY[user.target]
        scalars, algorithm = read(user)
        return user, attr, scalars, algorithm

    # ----------------------------------------------------------------- rewriting

    def _weight_for(self, layer: _Layer) -> tuple[fx.Node, fx.Node | None]:
        if not layer.transpose_weight:
            return layer.weight, layer.bias if layer.bias is not None else None
        weight = self._constant(layer.weight)
        assert weight is not None
        copy = weight.t().contiguous()
        new = register_constant(self.gm, f"{layer.weight.target}_t", copy, layer.node)
        new.meta["val"] = torch.empty(copy.shape, dtype=copy.dtype, device="meta")
        self.stats["transposed weights"] += 1
        return new, layer.bias

    def fuse(self, layer: _Layer) -> None:
        out = layer.node
        chain = [out]
        residual = self._residual(out)
        if residual is not None:
            chain.append(residual[0])
        activation = self._activation(chain[-1])
        if activation is not None and residual is not None and activation[1] not in _UNARY_AFTER_ADD:
            self.near[f"{activation[1]} after a residual add (oneDNN fuses only relu there)"] += 1
            activation = None
        if activation is not None and residual is not None and layer.kind == "linear":
            activation = None  # oneDNN's linear has no unary post-op after a binary one
        if activation is not None:
            chain.append(activation[0])
        if len(chain) == 1 and not self.pass_.fuse_alone:
            return
        last = chain[-1]
        with self.gm.graph.inserting_before(last):
            weight, bias = self._weight_for(layer)
            attr, scalars, algorithm = ("none", [], "") if activation is None else activation[1:]
            fused = self._emit(layer, weight, bias, residual[1] if residual else None, attr, scalars, algorithm)
        fused.meta.update({k: v for k, v in last.meta.items() if k in ("val", "tensor_meta", "stack_trace")})
        fused.meta["nn_module_stack"] = out.meta.get("nn_module_stack", {})
        last.replace_all_uses_with(fused)
        for node in reversed(chain):
            self.gm.graph.erase_node(node)
        kind = f"{layer.kind}" + ("+add" if residual else "") + (f"+{activation[1]}" if activation else "")
        self.stats[kind] += 1

    def _emit(self, layer: _Layer, weight: fx.Node, bias: fx.Node | None, other: fx.Node | None, attr: str,
              scalars: list[Any], algorithm: str) -> fx.Node:
        graph = self.gm.graph
        mkldnn = torch.ops.mkldnn
        if layer.kind == "conv":
            padding, stride, dilation, groups = layer.conv_args  # type: ignore[misc]
            if other is None:
                return graph.call_function(mkldnn._convolution_pointwise.default,
                                           (layer.x, weight, bias, padding, stride, dilation, groups, attr, scalars,
                                            algorithm))
            unary = None if attr == "none" else attr
            return graph.call_function(mkldnn._convolution_pointwise.binary,
                                       (layer.x, other, weight, bias, padding, stride, dilation, groups, "add", 1.0,
                                        unary, scalars, algorithm or None))
        if other is None:
            return graph.call_function(mkldnn._linear_pointwise.default,
                                       (layer.x, weight, bias, attr, scalars, algorithm))
        return graph.call_function(mkldnn._linear_pointwise.binary, (layer.x, other, weight, bias, "add"))

    def run(self) -> PassResult:
        if not onednn_available():
            return PassResult(False, near_misses={"epilogue-fusion": {"torch built without oneDNN": 1}})
        for node in list(self.gm.graph.nodes):
            if node.op == "call_function" and not getattr(node, "_erased", False):
                layer = self._layer(node)  # read now: fusing an earlier layer rewired this one's input
                if layer is not None:
                    self.fuse(layer)
        changed = bool(self.stats)
        if changed:
            self.gm.graph.lint()
            prune_unused_attributes(self.gm)
        return PassResult(changed, dict(self.stats), near_misses={"epilogue-fusion": dict(self.near)} if self.near
                          else {})


@dataclass(frozen=True)
class EpilogueFusion(Pass):
    """Fuse conv / linear + bias + activation (+ residual add) into oneDNN's fused CPU kernels.

    ``conv`` and ``linear`` choose the layer kinds. ``fuse_alone`` (default True) also moves
    layers with nothing to fuse onto oneDNN's kernels, which on x86 CPUs are faster than the
    default ATen ones; with ``False`` only layers that gain an epilogue change. Stats count the
    fused patterns (``conv+add+relu``, ``linear+gelu``...); near-misses say why a layer stayed.
    CPU-only: the graph it produces runs on the CPU.
    """

    name = "epilogue-fusion"
    conv: bool = True
    linear: bool = True
    fuse_alone: bool = True

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite every fusable layer of ``gm`` in place."""
        return _Fuser(gm, self).run()
