"""How the ``cpu`` target turns the verified graph into fast code.

The optimized ATen graph (``OptimizedModel.graph_module``) stays as it is: portable, savable,
exportable to ONNX. Lowering works on a structure copy that shares its weights:

1. ``channels-last`` (``graphopt.targets.common.channels_last``): convolution-heavy graphs run NHWC, converted
   once at the entry;
2. ``epilogue-fusion`` (``graphopt.targets.cpu.epilogue``): conv / linear + bias + activation
   (+ residual add) become oneDNN's fused kernels;
3. both run through a ``PassManager`` of their own, so each is verified against the graph before
   it; their records (counts, near-misses) form a report section and ``LoweredGraph.records``;
4. prepacking: convolution weights are reordered once into oneDNN's blocked layout for the
   example's input size (the kernels accept other sizes too), so no call reorders them again.
   Packed weights are opaque oneDNN tensors held by the lowered module only; they are not part
   of any state dict.

``CpuLowering(backend="inductor")`` instead compiles the (unfused) optimized graph with
``torch.compile`` (Inductor, with weight freezing, which does its own oneDNN fusion and
packing). It takes tens of seconds of compile time and wins on some models; ``optimize(...,
tune=True)`` measures it against the others.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.fx as fx

from graphopt.errors import InputError
from graphopt.ir.graph import node_shape, snapshot_graph_module, state_update_nodes, tensor_versions, written_since
from graphopt.passes.base import Pass
from graphopt.report import PassRecord, Report, ReportSection

__all__ = ["CpuLowering", "LoweredGraph", "lower_graph", "lowering_passes", "prepack_weights", "records_section",
           "reduced_precision"]

Layout = Literal["auto", "channels_last", "contiguous"]
Backend = Literal["graph", "inductor", "onnxruntime"]


@dataclass(frozen=True)
class CpuLowering:
    """Options of the CPU lowering (``CpuTarget(lowering=...)``).

    ``fuse``: oneDNN epilogue fusion. ``layout``: ``"auto"`` picks channels-last where
    convolutions do most of the work, ``"channels_last"`` forces it for any graph with
    convolutions, ``"contiguous"`` keeps NCHW. ``prepack``: reorder convolution weights into
    oneDNN's blocked layout once. ``backend="inductor"`` compiles with ``torch.compile`` instead.
    ``threads``: intra-op threads while the model runs (default: PyTorch's setting).
    ``backend="onnxruntime"`` runs the graph in onnxruntime's CPU provider (``onnx_lowering``),
    another runtime on the same device, which ``tune`` measures too.
    """

    fuse: bool = True
    layout: Layout = "auto"
    prepack: bool = True
    backend: Backend = "graph"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.layout not in ("auto", "channels_last", "contiguous"):
            raise ValueError(f"layout must be 'auto', 'channels_last' or 'contiguous', got {self.layout!r}")
        if self.backend not in ("graph", "inductor", "onnxruntime"):
            raise ValueError(f"backend must be 'graph', 'inductor' or 'onnxruntime', got {self.backend!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")

    def label(self) -> str:
        """Short name of this lowering, for reports and ``tune``."""
        if self.backend != "graph":
            return self.backend
        if not self.fuse and self.layout != "channels_last":
            return "aten"
        parts = ["onednn" if self.fuse else "aten"]
        if self.layout == "channels_last":
            parts.append("channels-last")
        elif self.layout == "contiguous":
            parts.append("nchw")
        return "-".join(parts)

    def candidates(self) -> list[CpuLowering]:
        """The variants ``tune`` measures: this one, plain ATen, NCHW/NHWC, Inductor and onnxruntime."""
        options = [self, replace(self, fuse=False, layout="contiguous", prepack=False),
                   replace(self, layout="channels_last"), replace(self, layout="contiguous"),
                   replace(self, backend="inductor"), replace(self, backend="onnxruntime")]
        unique: list[CpuLowering] = []
        for option in options:
            if option not in unique:
                unique.append(option)
        return unique


def lowering_passes(options: CpuLowering) -> list[Pass]:
    """The verified rewrites the graph lowering runs, in order."""
    from graphopt.targets.common.channels_last import ChannelsLast
    from graphopt.targets.cpu.epilogue import EpilogueFusion

    passes: list[Pass] = []
    if options.layout != "contiguous":
        passes.append(ChannelsLast(min_conv_share=0.0 if options.layout == "channels_last" else 0.5))
    if options.fuse:
        passes.append(EpilogueFusion())
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


def reduced_precision(gm: fx.GraphModule) -> bool:
    """True when some node of ``gm`` computes in bfloat16 or float16 (after ``precision=``)."""
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dtype in (torch.bfloat16, torch.float16):
            return True
    return False


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

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        wanted = self.options.threads
        if wanted is None or wanted == torch.get_num_threads():
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(wanted)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the lowered graph (refused once the user changed the weights it shares in place)."""
        self._check_weights_unchanged()
        with self._threads():
            return self.graph_module(*args, **kwargs)

    def extra_repr(self) -> str:
        """The lowering's label, in the module's repr."""
        return f"lowering={self.options.label()}"


def _compile_inductor(gm: fx.GraphModule, example_args: tuple[Any, ...], example_kwargs: dict[str, Any],
                      dynamic: bool = False) -> Any:
    """``torch.compile`` of the graph with Inductor and weight freezing; compiles on a first call here.

    ``dynamic``: the graph has dynamic dims, so the kernels are compiled for symbolic sizes.
    """
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(gm, backend="inductor", dynamic=dynamic)
        compiled(*example_args, **example_kwargs)
    return compiled


def lower_graph(gm: fx.GraphModule, example_args: tuple[Any, ...], example_kwargs: dict[str, Any],
                flat_inputs: tuple[Any, ...], options: CpuLowering, report: Report | None = None,
                on_error: str = "raise", tolerance_scale: float | None = None, dynamic: Any = None) -> Any:
    """Lower the verified graph ``gm`` for the CPU; ``gm`` itself is left as it is.

    The rewrites run through a ``PassManager`` (verified on ``flat_inputs``, recorded in
    ``report`` when given); weights are then prepacked. ``tolerance_scale`` defaults to 1 for
    float32 graphs and to 50 for graphs computing in bfloat16/float16 (oneDNN rounds such kernels
    differently from ATen; the final check holds the result to the fidelity budget).
    """
    from graphopt.passes.manager import PassManager

    if options.backend == "onnxruntime":
        from graphopt.targets.onnx.lowering import OnnxLowering, lower_onnx

        return lower_onnx(gm, example_args, example_kwargs, dynamic, OnnxLowering(threads=options.threads), report)
    started = time.perf_counter()
    shared = {name: entry for name, entry in tensor_versions(gm).items() if isinstance(entry[0], torch.nn.Parameter)}
    lowered = snapshot_graph_module(gm)
    if options.backend == "inductor":
        runner = _compile_inductor(lowered, example_args, example_kwargs, dynamic=bool(dynamic))
        if report is not None:
            seconds = time.perf_counter() - started
            report.notes.append(f"cpu lowering: torch.compile (Inductor, freezing) in {seconds:.1f} s")
        return LoweredGraph(runner, options, shared)
    passes = lowering_passes(options)
    scratch = Report(target="cpu")
    if passes and state_update_nodes(gm):
        passes = []
        scratch.notes.append("cpu lowering: the graph updates state on every call; it runs unfused")
    if passes:
        if tolerance_scale is None:
            tolerance_scale = 50.0 if reduced_precision(gm) else 1.0
        manager = PassManager(passes, on_error=on_error, tolerance_scale=tolerance_scale)  # type: ignore[arg-type]
        lowered = manager.run(lowered, flat_inputs, scratch)
    packed = prepack_weights(lowered) if options.fuse and options.prepack else 0
    runner = LoweredGraph(lowered, options, shared, scratch.records)
    if report is not None:
        summary = (f"{packed} convolution weights prepacked for oneDNN"
                   + (f", {options.threads} threads" if options.threads else ""))
        report.notes.extend(scratch.notes)
        report.sections.append(records_section(f"cpu lowering '{options.label()}'", scratch.records, summary))
    return runner


def records_section(title: str, records: list[PassRecord], summary: str = "") -> ReportSection:
    """The lowering's verified rewrites as a report section: one row per rewrite, like the pass table."""
    rows = []
    for record in records:
        details = ", ".join(f"{k}={v}" for k, v in record.stats.items())
        misses = "; ".join(f"{reason} ({count})" for group in record.near_misses.values()
                           for reason, count in group.items())
        rows.append([record.name, record.status, f"{record.nodes_before} → {record.nodes_after}",
                     round(record.seconds * 1e3, 1), round(record.verify_seconds * 1e3, 1), record.max_abs_diff,
                     details, misses])
    return ReportSection(title=title, description=summary or None,
                         headers=["rewrite", "status", "nodes", "ms", "verify ms", "max |Δ|", "details", "near-misses"],
                         rows=rows)
