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
from graphopt.ir.meta import infer_meta
from graphopt.ir.op_args import argument, set_argument
from graphopt.ir.ops import ACTIVATION_OPS
from graphopt.passes.base import PassResult
from graphopt.passes.lossy.base import CalibrationData, Fidelity, LossyPass, LossyPlan, LossyUnit

__all__ = ["DTYPES", "ReducedPrecision", "precision_pass"]

aten = torch.ops.aten

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
"""Names ``optimize(precision=...)`` accepts, and the dtype each stands for."""

_LAYER_ARGUMENTS: dict[Any, tuple[str, str, str | None]] = {
    aten.linear.default: ("input", "weight", "bias"),
    aten.conv2d.default: ("input", "weight", "bias"),
    aten.convolution.default: ("input", "weight", "bias"),
    aten.addmm.default: ("mat1", "mat2", "input"),
    aten.mm.default: ("self", "mat2", None),
}
"""The layers the pass reduces: the names of their (input, weight, bias) arguments."""


def _layer_arguments(node: fx.Node) -> tuple[str, str, str | None] | None:
    """Names of a layer node's (input, weight, bias) arguments, or None if it is not a layer."""
    names = _LAYER_ARGUMENTS.get(node.target) if node.op == "call_function" else None
    if node.target is aten.addmm.default and (argument(node, "beta") != 1 or argument(node, "alpha") != 1):
        return None
    return names


def _kind(node: fx.Node) -> str:
    return {aten.linear.default: "linear", aten.addmm.default: "linear", aten.mm.default: "linear"}.get(
        node.target, "conv2d")  # type: ignore[arg-type]


def _layers(gm: fx.GraphModule) -> list[fx.Node]:
    """Layer nodes with a constant float32 weight and float32 input, in graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        names = _layer_arguments(node)
        if names is None:
            continue
        x, w = argument(node, names[0]), argument(node, names[1])
        weight = attribute_value(gm, w) if isinstance(w, fx.Node) else None
        value = x.meta.get("val") if isinstance(x, fx.Node) else None
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
            weight = attribute_value(gm, argument(node, _layer_arguments(node)[1]))  # type: ignore[index]
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
        infer_meta(cast)
        return cast

    def apply(self, gm: fx.GraphModule, skip: frozenset[str] = frozenset()) -> PassResult:
        wanted = {u.name for u in self.units} - set(skip)
        converted: dict[str, fx.Node] = {}
        changed = 0
        with_activation = 0
        for node in list(gm.graph.nodes):
            if node.name not in wanted or node.op != "call_function":
                continue
            x_name, w_name, b_name = _layer_arguments(node)  # type: ignore[misc]
            set_argument(node, x_name, self._cast(gm, argument(node, x_name), self.dtype, node))
            set_argument(node, w_name, self._reduced(gm, argument(node, w_name), converted))
            bias = argument(node, b_name) if b_name is not None else None
            if isinstance(bias, fx.Node):
                set_argument(node, b_name, self._reduced(gm, bias, converted))  # type: ignore[arg-type]
            infer_meta(node)
            last = node
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_function" and users[0].target in ACTIVATION_OPS \
                    and users[0].args[0] is node:
                last = users[0]
                with_activation += 1
                infer_meta(last)
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
                         "the onnx target with OpenVINO (lowering=OnnxLowering(runtime='openvino')), or "
                         "quantize='int8' for a smaller, faster ONNX model.")
    if isinstance(spec, ReducedPrecision):
        return spec
    if not isinstance(spec, str):
        raise InputError(f"precision must be 'bf16', 'fp16' or a ReducedPrecision pass, got {type(spec).__name__}")
    return ReducedPrecision(dtype=spec.lower())
