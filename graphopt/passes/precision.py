"""Mixed precision: run the matrix layers in bfloat16 or float16, everything else in float32.

A lossy pass (``graphopt.passes.lossy.base.LossyPass``), so the fidelity machinery decides what is kept:
each *unit* is one layer (linear, convolution, ``addmm``/``mm`` with a constant weight), and the
pass manager measures every layer's sensitivity, checks the whole model against the budget
(default: output cosine >= 0.999) and keeps the most sensitive layers in float32 until the budget
holds. A budget no fallback can meet raises ``FidelityError`` naming the budget and the value
reached.

Per layer the rewrite casts the input to the reduced type, reads a reduced copy of the weight
and bias (registered once, shared by every use), runs the layer and the activation that
directly follows it (ReLU, GELU, SiLU... which oneDNN applies in the kernel's epilogue) in the
reduced type, and casts the result back to float32. Softmax, normalizations, reductions,
residual adds and attention stay in float32. The CPU lowering then fuses the reduced layers into
oneDNN's bfloat16 kernels (this machine's AVX512-BF16); on the GPU they run on tensor cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from graphopt.errors import InputError
from graphopt.ir.graph import attribute_value, prune_unused_attributes, register_constant
from graphopt.passes.base import PassResult
from graphopt.passes.lossy.base import CalibrationData, Fidelity, LossyPass, LossyPlan, LossyUnit

__all__ = ["DTYPES", "ReducedPrecision", "precision_pass"]

aten = torch.ops.aten

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
"""Names ``optimize(precision=...)`` accepts, and the dtype each stands for."""

_ACTIVATIONS = frozenset({
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.hardtanh.default, aten.sigmoid.default,
    aten.tanh.default, aten.hardswish.default, aten.leaky_relu.default, aten.hardsigmoid.default,
})
"""Elementwise activations a reduced layer takes along (they are fused into its kernel)."""


def _weight_positions(node: fx.Node) -> tuple[int, int, int | None] | None:
    """(input index, weight index, bias index) of a layer node's arguments, or None if it is not a layer."""
    target = node.target
    if target in (aten.linear.default, aten.conv2d.default, aten.convolution.default):
        bias = 2 if len(node.args) > 2 and node.args[2] is not None else None
        return 0, 1, bias
    if target == aten.addmm.default and len(node.args) == 3 and not node.kwargs:
        return 1, 2, 0
    if target == aten.mm.default:
        return 0, 1, None
    return None


def _kind(node: fx.Node) -> str:
    return {aten.linear.default: "linear", aten.addmm.default: "linear", aten.mm.default: "linear"}.get(
        node.target, "conv2d")  # type: ignore[arg-type]


def _retyped(value: Any, dtype: torch.dtype) -> Any:
    """A fake/meta value like ``value`` with ``dtype`` (shape meta for the nodes the pass creates)."""
    if not isinstance(value, torch.Tensor):
        return None
    mode = getattr(value, "fake_mode", None)
    if mode is not None:
        with mode:
            return torch.empty_strided(value.shape, value.stride(), dtype=dtype, device=value.device)
    return torch.empty_strided(value.shape, value.stride(), dtype=dtype, device="meta")


def _layers(gm: fx.GraphModule) -> list[fx.Node]:
    """Layer nodes with a constant float32 weight and float32 input, in graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        positions = _weight_positions(node)
        if positions is None:
            continue
        x, w, _ = positions
        weight = attribute_value(gm, node.args[w]) if isinstance(node.args[w], fx.Node) else None
        value = node.args[x].meta.get("val") if isinstance(node.args[x], fx.Node) else None
        if weight is None or weight.dtype != torch.float32:
            continue
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            continue
        found.append(node)
    return found


class _PrecisionPlan(LossyPlan):
    def __init__(self, gm: fx.GraphModule, dtype: torch.dtype) -> None:
        self.dtype = dtype
        short = "bf16" if dtype == torch.bfloat16 else "fp16"
        self.units = []
        for node in _layers(gm):
            weight = attribute_value(gm, node.args[_weight_positions(node)[1]])  # type: ignore[index]
            assert weight is not None
            self.units.append(LossyUnit(node.name, _kind(node), f"{short} compute, fp32 around",
                                        {"weight shape": "x".join(map(str, weight.shape))}))
        self._cache: dict[tuple[int, str], torch.Tensor] = {}

    def _reduced(self, gm: fx.GraphModule, node: fx.Node, converted: dict[str, fx.Node]) -> fx.Node:
        """A get_attr node for the reduced copy of constant ``node`` (one copy per tensor, reused across applies)."""
        if node.name in converted:
            return converted[node.name]
        tensor = attribute_value(gm, node)
        assert tensor is not None
        key = (id(tensor), str(self.dtype))
        if key not in self._cache:
            self._cache[key] = tensor.detach().to(self.dtype)
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")  # before every layer that may share it
        new = register_constant(gm, f"{node.target}_{str(self.dtype).removeprefix('torch.')}", self._cache[key], first)
        converted[node.name] = new
        return new

    def _cast(self, gm: fx.GraphModule, value: fx.Node, dtype: torch.dtype, before: fx.Node) -> fx.Node:
        with gm.graph.inserting_before(before):
            cast = gm.graph.call_function(aten._to_copy.default, (value,), {"dtype": dtype})
        cast.meta["val"] = _retyped(value.meta.get("val"), dtype)
        return cast

    def apply(self, gm: fx.GraphModule, skip: frozenset[str] = frozenset()) -> PassResult:
        wanted = {u.name for u in self.units} - set(skip)
        converted: dict[str, fx.Node] = {}
        changed = 0
        with_activation = 0
        for node in list(gm.graph.nodes):
            if node.name not in wanted or node.op != "call_function":
                continue
            x_index, w_index, b_index = _weight_positions(node)  # type: ignore[misc]
            args = list(node.args)
            args[x_index] = self._cast(gm, args[x_index], self.dtype, node)
            args[w_index] = self._reduced(gm, args[w_index], converted)
            if b_index is not None and isinstance(args[b_index], fx.Node):
                args[b_index] = self._reduced(gm, args[b_index], converted)
            node.args = tuple(args)
            last = node
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_function" and users[0].target in _ACTIVATIONS \
                    and users[0].args[0] is node:
                last = users[0]
                with_activation += 1
            for reduced in {node, last}:
                reduced.meta["val"] = _retyped(reduced.meta.get("val"), self.dtype)
                reduced.meta.pop("tensor_meta", None)
            consumers = list(last.users)
            back = self._cast(gm, last, torch.float32, last.next)
            for consumer in consumers:
                consumer.replace_input_with(last, back)
            changed += 1
        prune_unused_attributes(gm)
        gm.recompile()
        return PassResult(changed > 0, {"reduced layers": changed, "with activation": with_activation})

    def notes(self) -> list[str]:
        return ["softmax, normalizations, reductions, residual adds and attention stay in float32"]


@dataclass(frozen=True)
class ReducedPrecision(LossyPass):
    """Run matrix layers (linear, conv, addmm/mm with constant weights) in ``dtype`` ("bf16" or "fp16").

    Checked against a fidelity budget (default ``Fidelity(min_cosine=0.999)``) instead of the
    float32 tolerance; sensitive layers fall back to float32.
    """

    name = "reduced-precision"
    dtype: str = "bf16"
    default_fidelity: ClassVar[Fidelity] = Fidelity(min_cosine=0.999)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InputError(f"precision must be one of {', '.join(sorted(DTYPES))} (precision= or "
                             f"ReducedPrecision(dtype=...)), got {self.dtype!r}")

    def plan(self, gm: fx.GraphModule, data: CalibrationData) -> LossyPlan:
        """One unit per layer with a constant float32 weight."""
        return _PrecisionPlan(gm, DTYPES[self.dtype])


def precision_pass(spec: str | ReducedPrecision, target: str | None = None) -> ReducedPrecision:
    """The pass for ``optimize(precision=spec)``: a name ("bf16", "fp16") or a ``ReducedPrecision``.

    ``target`` is the target's name: onnxruntime's CPU provider has no bfloat16/float16 matrix
    kernels, so ``onnx`` is refused with what to use instead.
    """
    if target == "onnx":
        raise InputError("precision= lowers to reduced-precision kernels on target='cpu' (oneDNN bfloat16) and "
                         "target='gpu'; onnxruntime's CPU provider has no such kernels. Use target='cpu' or 'gpu', "
                         "or quantize='int8' for a smaller, faster ONNX model.")
    if isinstance(spec, ReducedPrecision):
        return spec
    if not isinstance(spec, str):
        raise InputError(f"precision must be 'bf16', 'fp16' or a ReducedPrecision pass, got {type(spec).__name__}")
    return ReducedPrecision(dtype=spec.lower())
