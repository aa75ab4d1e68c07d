"""How the ``cpu`` target turns the verified graph into fast code.

The optimized ATen graph (``OptimizedModel.graph_module``) stays as it is: portable, savable,
exportable to ONNX. Lowering works on a structure copy that shares its weights:

1. ``packed-rows`` (``graphopt.targets.cpu.packed_rows``): an encoder fed a token mask computes its
   token-wise ops (linears, norms, activations) on the tokens the mask keeps, padded rows skipped;
   then ``packed-attention`` (``graphopt.targets.cpu.packed_attention``) computes its attention
   among each sentence's kept tokens;
2. ``trimmed-attention`` (``graphopt.targets.cpu.attention``): masked attention computed over the
   key columns some query may see (padding and unwritten cache slots skipped at run time);
3. ``channels-last`` (``graphopt.targets.common.channels_last``): convolution-heavy graphs run NHWC, converted
   once at the entry;
4. ``epilogue-fusion`` (``graphopt.targets.cpu.epilogue``): conv / linear + bias + activation
   (+ residual add) become oneDNN's fused kernels;
5. ``prepack-weights``: convolution weights are reordered once into oneDNN's blocked layout for
   the example's input size (the kernels accept other sizes too), so no call reorders them again.
   Packed weights are opaque oneDNN tensors held by the lowered module only; they are not part
   of any state dict.

All are passes (``float_lowering_passes``) run through a ``PassManager``
(``graphopt.targets.common.lowering.run_lowering``), so each is verified against the graph
before it; their records (counts, near-misses) form a report section and ``LoweredGraph.records``.

``CpuLowering(backend="inductor")`` instead compiles the (unfused) optimized graph with
``torch.compile`` (Inductor, with weight freezing, which does its own oneDNN fusion and
packing). It takes tens of seconds of compile time and wins on some models; ``optimize(...,
tune=True)`` measures it against the others.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.fx as fx

from graphopt.errors import InputError
from graphopt.ir.graph import node_shape, snapshot_graph_module, state_update_nodes, tensor_versions, written_since
from graphopt.ir.state import state_inputs
from graphopt.ir.threads import torch_threads
from graphopt.passes.base import Pass, PassResult
from graphopt.report import PassRecord
from graphopt.targets.base import LoweringContext
from graphopt.targets.common.channels_last import ChannelsLast
from graphopt.targets.common.donated_state import InplaceStateUpdates
from graphopt.targets.common.lowering import computes_in, run_lowering
from graphopt.targets.cpu.attention import TrimmedAttention
from graphopt.targets.cpu.epilogue import EpilogueFusion
from graphopt.targets.cpu.packed_attention import PackedAttention
from graphopt.targets.cpu.packed_rows import PackedRows
from graphopt.targets.cpu.split_linear import SplitLinears
from graphopt.targets.onnx.options import (
    OnnxLowering,
    WeightOnlyActivations,
    check_weight_only_activations,
    openvino_installed,
)

__all__ = ["CpuLowering", "LoweredGraph", "PrepackWeights", "float_lowering_passes", "lower_graph",
           "prepack_weights", "reduced_precision"]

Layout = Literal["auto", "channels_last", "contiguous"]
Backend = Literal["graph", "inductor", "onnxruntime", "openvino"]
WeightKernels = Literal["auto", "kernel", "dequantize-once"]


@dataclass(frozen=True)
class CpuLowering:
    """Options of the CPU lowering (``CpuTarget(lowering=...)``).

    ``fuse``: oneDNN epilogue fusion. ``layout``: ``"auto"`` picks channels-last where
    convolutions do most of the work, ``"channels_last"`` forces it for any graph with
    convolutions, ``"contiguous"`` keeps NCHW. ``prepack``: reorder convolution weights into
    oneDNN's blocked layout once. ``backend="inductor"`` compiles with ``torch.compile`` instead.
    ``threads``: intra-op threads while the model runs (default: PyTorch's setting).
    ``backend="onnxruntime"`` runs the graph in onnxruntime's CPU provider (``graphopt.targets.onnx``),
    another runtime on the same device, which ``tune`` measures too; ``backend="openvino"`` runs the same
    ONNX export in OpenVINO (``OnnxLowering(runtime="openvino")``, ``pip install openvino``; measured by
    ``tune`` where it is installed). ``weight_kernels``: how
    weight-only int8/int4 layers run in PyTorch: ``"auto"`` (PyTorch's int8/int4 weight kernels
    where they are faster on the layer's shape; they compute in bfloat16), ``"kernel"`` (always
    those kernels) or ``"dequantize-once"`` (float weights computed at lowering: exact, no memory
    saving); the ``GRAPHOPT_WEIGHT_ONLY_KERNEL`` environment variable overrides ``"auto"``.
    ``onnx``: the export and session options of the ``onnxruntime`` / ``openvino`` backends
    (an ``OnnxLowering``: opset, fused attention, transformer optimizer, OpenVINO precision; its
    threads, runtime and weight-only activations come from this config).
    ``weight_only_activations``: ``"int8"`` quantizes those layers' inputs on the fly (W4A8 / W8A8;
    onnxruntime's ``MatMulNBits`` at accuracy level 4, so ``backend="onnxruntime"`` only), see
    ``OnnxLowering``. ``pack_rows``: token-wise ops of an encoder fed a token mask run on the tokens
    it keeps, padding skipped (``graphopt.targets.cpu.packed_rows``; PyTorch backend only).
    """

    fuse: bool = True
    layout: Layout = "auto"
    prepack: bool = True
    backend: Backend = "graph"
    threads: int | None = None
    weight_kernels: WeightKernels = "auto"
    weight_only_activations: WeightOnlyActivations = "float"
    onnx: OnnxLowering | None = None
    pack_rows: bool = True

    def __post_init__(self) -> None:
        if self.onnx is not None and not isinstance(self.onnx, OnnxLowering):
            raise ValueError(f"onnx must be an OnnxLowering, got {type(self.onnx).__name__}")
        if self.onnx is not None and self.backend not in ("onnxruntime", "openvino"):
            raise ValueError("onnx= configures the export of backend='onnxruntime' or 'openvino'; "
                             f"backend is {self.backend!r}")
        if self.layout not in ("auto", "channels_last", "contiguous"):
            raise ValueError(f"layout must be 'auto', 'channels_last' or 'contiguous', got {self.layout!r}")
        if self.backend not in ("graph", "inductor", "onnxruntime", "openvino"):
            raise ValueError(f"backend must be 'graph', 'inductor', 'onnxruntime' or 'openvino', got {self.backend!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.weight_kernels not in ("auto", "kernel", "dequantize-once"):
            raise ValueError(f"weight_kernels must be 'auto', 'kernel' or 'dequantize-once', got "
                             f"{self.weight_kernels!r}")
        check_weight_only_activations(self.weight_only_activations)

    @property
    def packs_rows(self) -> bool:
        """True when the lowering runs ``packed-rows`` and ``packed-attention`` (PyTorch backend, ``pack_rows``)."""
        return self.pack_rows and self.backend == "graph"

    @property
    def lossy(self) -> bool:
        """True when the lowering computes beyond the graph (OpenVINO's bfloat16 inference): it needs a budget."""
        return self.onnx is not None and self.onnx.lossy

    def onnx_lowering(self) -> OnnxLowering:
        """The ``OnnxLowering`` the ``onnxruntime`` / ``openvino`` backends export and run with (``onnx``, or defaults).

        Its threads, runtime and weight-only activations come from this config.
        """
        export = self.onnx or OnnxLowering()
        return replace(export, threads=self.threads or export.threads, runtime=self.backend,
                       weight_only_activations=self.weight_only_activations)

    def label(self) -> str:
        """Short name of this lowering, for reports and ``tune``."""
        weights = [f"weights-{self.weight_kernels}"] if self.weight_kernels != "auto" else []
        activations = ["a8"] if self.weight_only_activations == "int8" else []
        if self.backend != "graph":
            export = [f"({self.onnx.label()})"] if self.onnx is not None else []
            return "-".join([self.backend, *activations]) + "".join(export)
        weights += [] if self.pack_rows else ["padded"]
        if not self.fuse and self.layout != "channels_last":
            return "-".join(["aten", *weights])
        parts = ["onednn" if self.fuse else "aten"]
        if self.layout == "channels_last":
            parts.append("channels-last")
        elif self.layout == "contiguous":
            parts.append("nchw")
        return "-".join([*parts, *weights])

    def on_openvino(self) -> CpuLowering:
        """The OpenVINO variant of this lowering at the f32 hint: the ONNX export, float activations throughout."""
        return replace(self, backend="openvino", weight_only_activations="float", onnx=None)

    def candidates(self) -> list[CpuLowering]:
        """The variants ``tune`` measures: this one, plain ATen, NCHW/NHWC, Inductor, onnxruntime (and OpenVINO).

        onnxruntime twice: as exported, and through its offline transformer optimizer on the export
        with attention as standard ops (the chains it knows how to fuse). OpenVINO only where it is
        installed.
        """
        export = None if self.backend in ("onnxruntime", "openvino") else self.onnx
        options = [self, replace(self, fuse=False, layout="contiguous", prepack=False),
                   replace(self, layout="channels_last"), replace(self, layout="contiguous"),
                   replace(self, backend="inductor", onnx=None), replace(self, backend="onnxruntime", onnx=export),
                   replace(self, backend="onnxruntime", onnx=TRANSFORMER_OPTIMIZER_EXPORT)]
        if openvino_installed():
            openvino = self.on_openvino()
            options += [openvino, replace(openvino, onnx=OPENVINO_BFLOAT16)]  # bf16: tune, for lossy graphs only
        unique: list[CpuLowering] = []
        for option in options:
            if option not in unique:
                unique.append(option)
        return unique


TRANSFORMER_OPTIMIZER_EXPORT = OnnxLowering(fused_attention=False, transformer_optimizer=True)
"""The export ``tune`` also measures onnxruntime with: attention as standard ops, then onnxruntime's transformer
optimizer (on T5- and BERT-like encoders it fuses more than the session does with ONNX's ``Attention``)."""


OPENVINO_BFLOAT16 = OnnxLowering(runtime="openvino", openvino_precision="bf16")
"""OpenVINO computing every op it can in bfloat16: a ``tune`` candidate for graphs with a fidelity budget (on
MiniLM int8, 8 x 128: 56 ms against 75 ms at its f32 hint, output cosine unchanged)."""


def float_lowering_passes(options: CpuLowering) -> list[Pass]:
    """The verified rewrites the lowering of a float graph runs with ``options``, in order."""
    if options.backend != "graph":
        return []  # Inductor and onnxruntime do their own fusion
    passes: list[Pass] = [PackedRows(), PackedAttention()] if options.packs_rows else []
    passes.append(TrimmedAttention())
    if options.layout != "contiguous":
        passes.append(ChannelsLast(min_conv_share=0.0 if options.layout == "channels_last" else 0.5))
    if options.fuse:
        passes.append(EpilogueFusion())
        if options.prepack:
            passes.append(PrepackWeights())
    return passes


def _concrete(shape: Any) -> list[int] | None:
    if shape is None:
        return None
    try:
        return [int(d) for d in shape]
    except TypeError:
        return None


def prepack_weights(gm: fx.GraphModule) -> int:
    """Replace the weights of oneDNN convolutions by prepacked (blocked-layout) copies; returns how many.

    The packed tensors are plain attributes of ``gm`` (not parameters or buffers): opaque
    oneDNN tensors that only these kernels read.
    """
    conv_ops = (torch.ops.mkldnn._convolution_pointwise.default, torch.ops.mkldnn._convolution_pointwise.binary)
    packed = 0
    cache: dict[tuple[Any, ...], str] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in conv_ops:
            continue
        binary = node.target is conv_ops[1]
        x, weight_node = node.args[0], node.args[2 if binary else 1]
        padding, stride, dilation, groups = node.args[4:8] if binary else node.args[3:7]
        if not isinstance(weight_node, fx.Node) or weight_node.op != "get_attr":
            continue
        weight = functools.reduce(getattr, str(weight_node.target).split("."), gm)
        if weight.is_mkldnn:
            continue
        input_size = _concrete(x.meta["tensor_meta"].shape) if "tensor_meta" in x.meta else _concrete(node_shape(x))
        key = (id(weight), tuple(padding), tuple(stride), tuple(dilation), groups, tuple(input_size or ()))
        if key not in cache:
            value = torch.ops.mkldnn._reorder_convolution_weight(weight.detach(), padding, stride, dilation, groups,
                                                                 input_size)
            name = f"_go_packed_{len(cache)}"
            object.__setattr__(gm, name, value)  # an attribute, not a buffer: opaque tensors have no storage
            cache[key] = name
        with gm.graph.inserting_before(node), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fx warns about attributes that are not buffers
            packed_node = gm.graph.get_attr(cache[key])
        packed_node.meta["val"] = weight_node.meta.get("val")
        node.replace_input_with(weight_node, packed_node)
        packed += 1
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    return packed


@dataclass(frozen=True)
class PrepackWeights(Pass):
    """The weights of oneDNN's fused convolutions, reordered once into its blocked layout (``prepack_weights``).

    Exact: the packed weight holds the same values. Stats: ``packed`` convolution weights.
    """

    name = "prepack-weights"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Swap the fused convolutions' weights for packed copies, in place."""
        packed = prepack_weights(gm)
        return PassResult(packed > 0, {"packed": packed})


def reduced_precision(gm: fx.GraphModule) -> bool:
    """True when some node of ``gm`` computes in bfloat16 or float16 (after ``precision=``)."""
    return computes_in(gm, torch.bfloat16, torch.float16)


class LoweredGraph(torch.nn.Module):
    """The CPU-lowered graph: called like the user's model, with its thread setting applied per call."""

    def __init__(self, graph_module: fx.GraphModule | Any, options: CpuLowering,
                 shared_weights: dict[str, tuple[torch.Tensor, int]] | None = None,
                 records: list[PassRecord] | None = None) -> None:
        super().__init__()
        self.__dict__["graph_module"] = graph_module  # not a submodule: its weights are the optimized graph's
        self.options = options
        self.records = list(records or [])  # the lowering's verified rewrites (also a report section)
        self._shared = shared_weights or {}

    def _check_weights_unchanged(self) -> None:
        changed = written_since(self._shared)
        if changed:
            raise InputError(
                f"weights of the original model were changed in place after optimize ({', '.join(changed[:3])}); "
                "the lowered model shares them with it, and weights folded or packed from the old values would "
                "no longer match. Run graphopt.optimize again."
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the lowered graph (refused once the user changed the weights it shares in place)."""
        self._check_weights_unchanged()
        with torch_threads(self.options.threads):
            return self.graph_module(*args, **kwargs)

    def extra_repr(self) -> str:
        """The lowering's label, in the module's repr."""
        return f"lowering={self.options.label()}"


def _compile_inductor(gm: fx.GraphModule, example_args: tuple[Any, ...], example_kwargs: dict[str, Any],
                      dynamic: bool = False) -> Any:
    """``torch.compile`` of the graph with Inductor and weight freezing; compiles on a first call here.

    ``dynamic``: the graph has dynamic dims, so the kernels are compiled for symbolic sizes.
    """
    import torch._inductor.config as inductor_config  # a second to import, for the inductor backend only

    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(gm, backend="inductor", dynamic=dynamic)
        compiled(*example_args, **example_kwargs)
    return compiled


def decoder_step_passes(gm: fx.GraphModule, context: LoweringContext) -> list[Pass]:
    """The passes a state-lifted step graph (a decoder with its cache) gets first.

    Its decode GEMVs split across threads, and in-place state updates when the caller donates the state
    (attention over the cache is ``float_lowering_passes``' ``trimmed-attention``).
    """
    if not state_inputs(gm):
        return []
    return [SplitLinears(), *([InplaceStateUpdates()] if context.state_inputs else [])]


def lower_graph(gm: fx.GraphModule, context: LoweringContext, options: CpuLowering,
                passes: list[Pass] | None = None) -> Any:
    """Lower the verified float graph ``gm`` for the CPU with ``options``; ``gm`` itself is left as it is.

    ``passes`` (default ``float_lowering_passes(options)``) run through a ``PassManager`` on a
    structure copy, verified on the context's example inputs and recorded in its report. Their
    tolerance is the context's times 50 for graphs computing in bfloat16/float16 (oneDNN rounds
    such kernels differently from ATen; the final check holds the result to the fidelity budget).
    """
    if options.backend in ("onnxruntime", "openvino"):
        # imported here: the onnx lowering loads onnx (about a second), which the other backends never need
        from graphopt.targets.onnx.lowering import lower_onnx

        return lower_onnx(gm, context, options.onnx_lowering())
    report = context.report
    started = time.perf_counter()
    shared = {name: entry for name, entry in tensor_versions(gm).items() if isinstance(entry[0], torch.nn.Parameter)}
    lowered = snapshot_graph_module(gm)
    if options.backend == "inductor":
        step_passes = decoder_step_passes(gm, context)
        if step_passes:  # a decoder step: attention over the live cache, written in place, GEMVs split
            step_passes = [TrimmedAttention(), *step_passes]
            lowered = run_lowering(lowered, step_passes, context).graph_module
        example_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in context.example_args)
        runner = _compile_inductor(lowered, example_args, context.example_kwargs, dynamic=not context.static)
        if report is not None:
            seconds = time.perf_counter() - started
            report.notes.append(f"cpu lowering: torch.compile (Inductor, freezing) in {seconds:.1f} s")
        return LoweredGraph(runner, options, shared)
    passes = float_lowering_passes(options) if passes is None else passes
    passes = [*decoder_step_passes(gm, context), *passes]
    if passes and state_update_nodes(gm):
        passes = []
        if report is not None:
            report.notes.append("cpu lowering: the graph updates state on every call; it runs unfused")
    result = run_lowering(lowered, passes, context, tolerance_scale=50.0 if reduced_precision(gm) else 1.0)
    summary = (f"{result.stats.get('packed', 0)} convolution weights prepacked for oneDNN"
               + (f", {options.threads} threads" if options.threads else ""))
    result.report(report, f"cpu lowering '{options.label()}'", summary)
    return LoweredGraph(result.graph_module, options, shared, result.records)
