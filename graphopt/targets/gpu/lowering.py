"""How the ``gpu`` target makes the optimized graph fast on an NVIDIA GPU.

- **cuBLASLt epilogues** (``CublasLtEpilogue`` pass): ``linear`` + bias + ReLU (or tanh-GELU)
  on a 2-D input becomes ``aten._addmm_activation``, which cuBLASLt runs as one GEMM with the
  bias and activation in its epilogue; 3-D inputs are flattened around it (a view).
- **channels-last** (``layout``): conv nets run their trunk in NHWC, cuDNN's native layout for
  tensor-core convolutions, converted once at the entry (``ChannelsLast`` pass), with the
  convolution weights stored channels-last once at lowering instead of on every call.
- **cuDNN conv epilogues** (``CudnnConvEpilogue`` pass, ``conv_epilogues``): conv + bias + ReLU
  (+ a residual add before the ReLU) becomes ``aten.cudnn_convolution_relu`` /
  ``cudnn_convolution_add_relu``, one cuDNN call instead of a convolution and one or two
  elementwise kernels. On an H100, ResNet-50 at batch 32 ran 2.65 ms with them against 4.91 ms
  without (both channels-last, CUDA graphs).
- **SDPA's fastest backend**: attention runs under ``torch.nn.attention.sdpa_kernel`` with the
  backends in ``sdpa_backends`` order (default: cuDNN, flash, memory-efficient, math), so the
  fastest one that supports the shapes and dtype is taken.
- **CUDA graphs** for static shapes: the whole call is captured once on static input buffers
  and replayed, so a batch-1 call costs one launch instead of one per kernel. Used when no
  input dim is dynamic (``cuda_graphs="auto"``).
- ``backend="inductor"``: ``torch.compile`` of the lowered graph (Triton kernels for the
  elementwise chains), itself replayed as a CUDA graph for static shapes.

A CUDA graph that cannot be captured (a graph that reads a value back to the host, say) is not
an error: the lowering runs without it and the report says why.

The rewrites (``float_lowering_passes``, after the int8 ones of ``graphopt.targets.gpu.quantized``
for a quantized graph) are passes verified through the pass manager on the GPU copy, like the
CPU lowering (``graphopt.targets.common.lowering``), with the tolerance of
``lowering_tolerance_scale`` for the exact ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.nn.attention import SDPBackend, sdpa_kernel

from graphopt.ir.graph import attribute_value, node_shape, prune_unused_attributes, register_constant
from graphopt.ir.verify import tolerance_for
from graphopt.passes.base import Pass, PassResult
from graphopt.passes.quantize.patterns import has_quantized_ops
from graphopt.targets.base import LoweringContext
from graphopt.targets.common.channels_last import ChannelsLast
from graphopt.targets.common.lowering import run_lowering
from graphopt.targets.common.patterns import conv_arguments, residual_operand
from graphopt.targets.gpu.quantized import describe_lowering

__all__ = ["CUDAGraphRunner", "ConvWeightsChannelsLast", "CublasLtEpilogue", "CudnnConvEpilogue", "GpuLowering",
           "float_lowering_passes", "lower_for_gpu", "lowering_tolerance_scale", "sdpa_context",
           "store_conv_weights_channels_last"]

aten = torch.ops.aten
SdpaBackend = Literal["cudnn", "flash", "efficient", "math"]


@dataclass(frozen=True)
class GpuLowering:
    """Options of the GPU lowering (``GpuTarget(lowering=...)``); see the module docstring."""

    epilogues: bool = True
    conv_epilogues: bool = True
    layout: Literal["auto", "channels_last", "contiguous"] = "auto"
    cuda_graphs: bool | Literal["auto"] = "auto"
    sdpa_backends: tuple[SdpaBackend, ...] = ("cudnn", "flash", "efficient", "math")
    backend: Literal["graph", "inductor"] = "graph"

    def label(self) -> str:
        """Short name of this lowering, for reports and ``tune``."""
        parts = ["inductor"] if self.backend == "inductor" else ["cublaslt" if self.epilogues else "aten"]
        if self.conv_epilogues and self.backend != "inductor":
            parts.append("cudnn-relu")
        if self.layout != "auto":
            parts.append(self.layout.replace("_", "-"))
        if self.cuda_graphs is True or self.cuda_graphs == "auto":
            parts.append("cudagraphs")
        return "-".join(parts)

    def candidates(self) -> list[GpuLowering]:
        """The variants ``tune`` measures."""
        options = [self, replace(self, cuda_graphs=False), replace(self, epilogues=False),
                   replace(self, conv_epilogues=not self.conv_epilogues), replace(self, layout="contiguous"),
                   replace(self, backend="inductor")]
        return list(dict.fromkeys(options))


def _reshape_target(node: fx.Node) -> list[int] | None:
    """``node``'s shape as a reshape argument: static dims as they are, one dynamic dim as -1; None otherwise."""
    shape = node_shape(node)
    if shape is None:
        return None
    dims = [d if isinstance(d, int) else -1 for d in shape]
    return dims if dims.count(-1) <= 1 else None


@dataclass(frozen=True)
class CublasLtEpilogue(Pass):
    """``linear`` + bias + ReLU / tanh-GELU becomes ``aten._addmm_activation`` (a cuBLASLt GEMM epilogue)."""

    name = "cublaslt-epilogue"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite every fusable linear in place."""
        fused = 0
        near: dict[str, int] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target != aten.linear.default or len(node.args) < 3:
                continue
            act = _only_user(node)
            use_gelu = None
            if act is not None and act.target == aten.relu.default:
                use_gelu = False
            elif act is not None and act.target == aten.gelu.default and act.kwargs.get("approximate") == "tanh":
                use_gelu = True
            if use_gelu is None:
                continue
            x, weight, bias = node.args[:3]
            shape, out_shape = node_shape(x), _reshape_target(act)
            if bias is None or attribute_value(gm, weight) is None or shape is None:
                near["weight or bias not constant"] = near.get("weight or bias not constant", 0) + 1
                continue
            if len(shape) != 2 and out_shape is None:
                near["more than one dynamic leading dim"] = near.get("more than one dynamic leading dim", 0) + 1
                continue
            with gm.graph.inserting_before(act):
                flat = x if len(shape) == 2 else gm.graph.call_function(aten.reshape.default, (x, [-1, shape[-1]]))
                wt = gm.graph.call_function(aten.t.default, (weight,))
                out = gm.graph.call_function(aten._addmm_activation.default, (bias, flat, wt), {"use_gelu": use_gelu})
                result = out
                if len(shape) != 2:
                    result = gm.graph.call_function(aten.reshape.default, (out, out_shape))
            result.meta.update({k: v for k, v in act.meta.items() if k == "val"})
            act.replace_all_uses_with(result)
            gm.graph.erase_node(act)
            gm.graph.erase_node(node)
            fused += 1
        return PassResult(fused > 0, {"fused": fused}, near_misses={"cublaslt-epilogue": near} if near else {})


_CONVOLUTIONS = (aten.conv2d.default, aten.convolution.default)
_CUDNN_CONVOLUTIONS = (*_CONVOLUTIONS, aten.cudnn_convolution_relu.default, aten.cudnn_convolution_add_relu.default)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].op == "call_function" else None


@dataclass(frozen=True)
class CudnnConvEpilogue(Pass):
    """conv + bias + ReLU (+ a residual add before it) becomes one ``cudnn_convolution_(add_)relu`` call."""

    name = "cudnn-conv-epilogue"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite every fusable convolution in place."""
        stats: dict[str, int] = {}
        near: dict[str, int] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _CONVOLUTIONS:
                continue
            conv = conv_arguments(node)
            value = node.meta.get("val")
            if isinstance(conv, str) or not isinstance(value, torch.Tensor) or value.dim() != 4:
                continue
            user = _only_user(node)
            residual = residual_operand(user, node) if user is not None else None
            add = user if residual is not None else None
            if isinstance(residual, fx.Node):
                user = _only_user(user)
            if user is None or user.target != aten.relu.default or isinstance(residual, str):
                if add is not None:
                    reason = residual if isinstance(residual, str) else "residual add not followed by ReLU"
                    near[reason] = near.get(reason, 0) + 1
                continue
            x, weight, bias, stride, padding, dilation, groups = conv
            with gm.graph.inserting_before(user):
                if residual is None:
                    fused = gm.graph.call_function(aten.cudnn_convolution_relu.default,
                                                   (x, weight, bias, stride, padding, dilation, groups))
                else:
                    fused = gm.graph.call_function(aten.cudnn_convolution_add_relu.default,
                                                   (x, weight, residual, 1.0, bias, stride, padding, dilation, groups))
            fused.meta.update({k: v for k, v in user.meta.items() if k in ("val", "tensor_meta")})
            user.replace_all_uses_with(fused)
            for dead in (user, add, node):
                if dead is not None:
                    gm.graph.erase_node(dead)
            kind = "conv+bias+relu" if residual is None else "conv+bias+add+relu"
            stats[kind] = stats.get(kind, 0) + 1
        return PassResult(bool(stats), stats, near_misses={self.name: near} if near else {})


def store_conv_weights_channels_last(gm: fx.GraphModule) -> int:
    """Give each convolution a channels-last copy of its constant weight; returns how many were stored.

    cuDNN would otherwise re-lay a contiguous weight out on every call of a channels-last
    convolution. The copies are new attributes of ``gm`` (the weights it shares stay as they are).
    """
    stored: dict[str, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _CUDNN_CONVOLUTIONS:
            continue
        weight = node.args[1]
        if not isinstance(weight, fx.Node) or weight.op != "get_attr":
            continue
        if weight.target not in stored:
            value = attribute_value(gm, weight)
            if value is None or value.dim() != 4 or value.is_contiguous(memory_format=torch.channels_last):
                continue
            stored[str(weight.target)] = register_constant(
                gm, f"{weight.target}_nhwc", value.contiguous(memory_format=torch.channels_last), node,
                keep_layout=True)
        node.replace_input_with(weight, stored[str(weight.target)])
    prune_unused_attributes(gm)
    gm.recompile()
    return len(stored)


def _runs_channels_last(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target == aten.clone.default
               and n.kwargs.get("memory_format") == torch.channels_last for n in gm.graph.nodes)


@dataclass(frozen=True)
class ConvWeightsChannelsLast(Pass):
    """In a graph that runs channels-last, each convolution reads a channels-last copy of its weight (exact).

    Stats: ``weights`` stored channels-last (``store_conv_weights_channels_last``).
    """

    name = "conv-weights-channels-last"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Store the weights in place, when the graph converts its activations to channels-last."""
        stored = store_conv_weights_channels_last(gm) if _runs_channels_last(gm) else 0
        return PassResult(stored > 0, {"weights": stored})


_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "math": "MATH"}


@contextlib.contextmanager
def sdpa_context(backends: tuple[SdpaBackend, ...]) -> Iterator[None]:
    """Run SDPA with ``backends`` tried in order (PyTorch takes the first one that supports the call)."""
    chosen = [getattr(SDPBackend, _BACKENDS[b]) for b in backends if hasattr(SDPBackend, _BACKENDS[b])]
    with sdpa_kernel(chosen, set_priority=True):
        yield


class CUDAGraphRunner(torch.nn.Module):
    """Replays one captured CUDA graph of ``fn`` on static input buffers (static shapes only).

    Each call copies the inputs into the captured buffers, replays the graph and returns clones
    of the outputs (the captured output buffers are overwritten by the next replay).
    """

    def __init__(self, fn: Callable[..., Any], example_args: tuple[Any, ...], example_kwargs: dict[str, Any],
                 context: Callable[[], Any] = contextlib.nullcontext) -> None:
        super().__init__()
        self.__dict__["fn"] = fn
        self._context = context
        leaves, self._spec = pytree.tree_flatten((example_args, example_kwargs))
        self._static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        static_args, static_kwargs = pytree.tree_unflatten(self._static, self._spec)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode(), context():
            for _ in range(3):  # warm up: cuBLAS workspaces, autotuned kernels
                fn(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode(), context():
            self._outputs = fn(*static_args, **static_kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Copy the inputs in, replay, return copies of the outputs."""
        leaves, _ = pytree.tree_flatten((args, kwargs))
        for static, value in zip(self._static, leaves, strict=True):
            if isinstance(static, torch.Tensor):
                static.copy_(value, non_blocking=True)
        self.graph.replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self._outputs)


class _WithSdpa(torch.nn.Module):
    def __init__(self, fn: Callable[..., Any], backends: tuple[SdpaBackend, ...]) -> None:
        super().__init__()
        self.__dict__["fn"] = fn
        self.backends = backends

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with sdpa_context(self.backends):
            return self.fn(*args, **kwargs)


def float_lowering_passes(options: GpuLowering) -> list[Pass]:
    """The verified rewrites the GPU lowering runs with ``options`` (after the int8 ones), in order."""
    passes: list[Pass] = []
    if options.layout != "contiguous":
        passes.append(ChannelsLast(min_conv_share=0.0 if options.layout == "channels_last" else 0.5))
    if options.backend == "graph" and options.epilogues:
        passes.append(CublasLtEpilogue())
    if options.backend == "graph" and options.conv_epilogues:
        passes.append(CudnnConvEpilogue())
    passes.append(ConvWeightsChannelsLast())
    return passes


def lowering_tolerance_scale(gm: fx.GraphModule) -> float:
    """How far the exact GPU rewrites may move the outputs, as a multiple of the fp32 tolerance.

    A rewrite changes which kernel runs (a channels-last cuDNN algorithm, a cuBLASLt epilogue),
    and kernels round differently: 10x for fp32 (TF32 convolutions are cuDNN's default), and the
    tolerance of the graph's narrowest float type where it computes in bf16 or fp16.
    """
    dtypes = {n.meta["val"].dtype for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    reduced = [tolerance_for(d).rtol / tolerance_for(torch.float32).rtol
               for d in (torch.bfloat16, torch.float16) if d in dtypes]
    return max([10.0, *reduced])


def _replayed(fn: Callable[..., Any], example_args: tuple[Any, ...], example_kwargs: dict[str, Any],
              options: GpuLowering, report: Any) -> Any:
    """``fn`` replayed as one CUDA graph, or run kernel by kernel when the capture fails (noted in the report)."""
    try:
        return CUDAGraphRunner(fn, example_args, example_kwargs, lambda: sdpa_context(options.sdpa_backends))
    except Exception as error:  # capture fails with torch/CUDA errors of many types; any of them means "no graph"
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if report is not None:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            report.notes.append(f"gpu lowering: the call could not be captured as a CUDA graph ({reason}); "
                                "it runs kernel by kernel")
        return _WithSdpa(fn, options.sdpa_backends)


def lower_for_gpu(gm: fx.GraphModule, context: LoweringContext, options: GpuLowering,
                  passes: list[Pass] | None = None) -> Any:
    """Lower ``gm`` (already on the GPU, the context's inputs too) with ``options``; returns the runnable module.

    ``passes`` (default ``float_lowering_passes(options)``; ``GpuTarget`` puts the int8 ones first
    for a quantized graph) run through the pass manager, each verified on the context's example
    inputs; their records form the report section, and a quantized graph's int8 kernels a note.
    """
    passes = float_lowering_passes(options) if passes is None else passes
    quantized = has_quantized_ops(gm)
    result = run_lowering(gm, passes, context, tolerance_scale=lowering_tolerance_scale(gm))
    if quantized and context.report is not None:
        context.report.notes.append(describe_lowering(result))
    result.report(context.report, f"gpu lowering '{options.label()}'")
    fn: Callable[..., Any] = result.graph_module
    if options.backend == "inductor":
        fn = torch.compile(result.graph_module, dynamic=not context.static)
        with torch.inference_mode(), sdpa_context(options.sdpa_backends):
            fn(*context.example_args, **context.example_kwargs)  # compile now, not on the user's first call
    if options.cuda_graphs is True or (options.cuda_graphs == "auto" and context.static):
        return _replayed(fn, context.example_args, context.example_kwargs, options, context.report)
    return _WithSdpa(fn, options.sdpa_backends)
