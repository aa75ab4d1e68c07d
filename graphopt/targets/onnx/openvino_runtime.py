"""Run the ``onnx`` target's export in OpenVINO instead of onnxruntime (``OnnxLowering(runtime="openvino")``).

The export is the one onnxruntime gets (fused ``Attention`` at opset 23, QDQ int8, dynamic dims
as symbolic ONNX dims); ``OpenVinoModule`` reads it from memory, compiles it for the ``CPU``
device (latency hint, one stream, ``threads`` inference threads) and calls it behind the
original model's calling convention. OpenVINO is imported only when a model is compiled
(``pip install openvino``).

**Precision.** ``INFERENCE_PRECISION_HINT`` ``"f32"`` runs the file as written: float32 where the
graph computes in float32, and bfloat16 in the layers ``precision="bf16"`` reduced (their casts
are in the file, which is exported at opset 22 or later, where ``Conv`` takes bfloat16).
``"bf16"`` lets OpenVINO compute every op it can in bfloat16 (on CPUs with AVX512-BF16 or AMX
about twice as fast as float32 on a float graph; on a ``precision="bf16"`` graph 4-6% faster
with AVX512-BF16 and 22-28% with AMX, and on a static int8 graph a third with AMX, which is why
such graphs try it first when ``openvino_precision`` is unset); that changes the outputs beyond the graph, so it needs a
fidelity budget (see :func:`resolve_precision`) and is held to it against the graph like any
kernel substitution (``graphopt.targets.common.lowering.kernel_comparison``); the final check of
``optimize`` then holds the lowered model to the budget against eager. At ``"bf16"`` OpenVINO compiles the export with
the casts of ``precision="bf16"`` undone (:func:`without_bfloat16_casts`): it computes those layers
in bfloat16 anyway, and kept, the conversions around every layer cost 3.5% of ResNet-50's time.

**What OpenVINO does not run.** onnxruntime's contrib operators (domain ``com.microsoft``:
``MatMulNBits`` of weight-only layers, ``GroupQueryAttention`` of decoder steps...) and the
decoder steps that carry their key/value cache as state are refused with a ``LoweringError``;
residual + RMSNorm is exported as standard ops (no ``SkipSimplifiedLayerNormalization``).
"""

from __future__ import annotations

import io
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.errors import InputError, LoweringError
from graphopt.ir.graph import run_and_record
from graphopt.passes.base import Pass
from graphopt.passes.quantize.patterns import has_quantized_ops
from graphopt.targets.base import LoweringContext
from graphopt.targets.common.lowering import computes_in, kernel_comparison
from graphopt.targets.onnx.decoder_norms import SkipRmsNorm
from graphopt.targets.onnx.export import EXTERNAL_DATA_THRESHOLD, export_passes, write_model
from graphopt.targets.onnx.model_size import approximate_bytes
from graphopt.targets.onnx.opsets import FUSED_ATTENTION_OPSET
from graphopt.targets.onnx.options import OnnxLowering, OpenVinoPrecision

__all__ = ["BFLOAT16_OPSET", "CompiledOpenVino", "OpenVinoModule", "import_openvino",
           "openvino_export", "openvino_runner", "refuse_contrib_ops", "resolve_precision", "run_openvino",
           "without_bfloat16_casts"]

BFLOAT16_OPSET = 22
"""The first ONNX opset whose ``Conv`` (and pooling) take bfloat16: a ``precision="bf16"`` graph exports at it."""

CONTRIB_DOMAIN = "com.microsoft"
"""onnxruntime's contrib operators, which OpenVINO does not read."""

_CONTRIB_SOURCES = {
    "MatMulNBits": "weight-only int8/int4 linears (quantize='int8-weight-only' / 'int4-weight-only')",
    "GroupQueryAttention": "attention over a key/value cache (decoder steps)",
    "RotaryEmbedding": "rotary embeddings of decoder steps",
    "SkipSimplifiedLayerNormalization": "residual + RMSNorm",
}
"""Where graphopt's exports get each contrib operator, for the error message."""


def import_openvino() -> ModuleType:
    """The ``openvino`` module; ``LoweringError`` saying how to install it when it is missing."""
    try:
        import openvino
    except ImportError as error:
        raise LoweringError("runtime='openvino' (backend='openvino') needs OpenVINO: pip install openvino "
                            "(or graphopt[openvino]), or use runtime='onnxruntime'") from error
    return openvino


def resolve_precision(options: OnnxLowering, gm: fx.GraphModule, context: LoweringContext) -> OpenVinoPrecision:
    """The ``INFERENCE_PRECISION_HINT`` to compile with: ``options.openvino_precision``, or the rule below.

    Unset: ``"f32"``, the file as written: the layers ``precision="bf16"`` reduced run in bfloat16,
    the ones its budget kept in float32 stay float32 (a budget of cosine 0.999999 keeps layers that
    OpenVINO's ``"bf16"`` would round again); but a bfloat16 graph, and a graph with int8
    activations, is first tried at ``"bf16"`` (``openvino_runner``), kept when it stays within half
    the budget's slack of the graph. The f32 hint cost 4-6% on a CPU with AVX512-BF16 (ResNet-50
    21.5 vs 20.7 ms, MiniLM 8 x 128 67.8 vs 63.6 ms) and 22-28% on one with AMX (ResNet-50 10.9 vs
    8.4 ms); on static int8 ResNet-50 (AMX) 20.0 against 13.3 ms, the float ops between the int8
    layers being most of the difference. ``"bf16"`` on a graph without a
    budget is an ``InputError``: the final check would hold bfloat16 outputs to the exact float32
    tolerance.
    """
    if options.openvino_precision == "bf16" and context.fidelity is None:
        raise InputError(
            "openvino_precision='bf16' computes every op OpenVINO can in bfloat16, which moves the outputs beyond "
            "the exact tolerance a graph without lossy passes is checked to. Optimize with precision='bf16' "
            "instead (target='cpu', lowering=CpuLowering(backend='openvino')): the graph then answers to a fidelity "
            "budget, by default output cosine >= 0.999, and OpenVINO runs it in bfloat16. Or leave "
            "openvino_precision unset or 'f32'.")
    return options.openvino_precision or "f32"


def openvino_export(gm: fx.GraphModule, context: LoweringContext, options: OnnxLowering,
                    passes: list[Pass] | None) -> tuple[OnnxLowering, list[Pass]]:
    """The export options and rewrites of ``gm`` for OpenVINO; refuses what OpenVINO cannot run.

    ``LoweringError`` for a decoder step carrying state (``context.state_inputs``), ``InputError``
    for ``openvino_precision="bf16"`` without a budget. Residual + RMSNorm stays standard ops; a
    bfloat16 graph exports at opset ``BFLOAT16_OPSET`` (23 with fused attention) unless
    ``options.opset`` says otherwise.
    """
    if context.state_inputs:
        raise LoweringError(
            f"OpenVINO cannot run a decoder step that carries its key/value cache as state ({context.state_inputs} "
            "state inputs): graphopt's ONNX steps update it in place through onnxruntime's GroupQueryAttention "
            "and IO binding. Use runtime='onnxruntime' (the onnx target's default) or CpuLowering(backend="
            "'onnxruntime') for generation.")
    resolve_precision(options, gm, context)  # refuses bf16 without a budget before the export
    passes = export_passes(gm) if passes is None else passes
    passes = [p for p in passes if not isinstance(p, SkipRmsNorm)]  # onnxruntime's contrib op: standard ops
    if options.opset is None and computes_in(gm, torch.bfloat16):
        fused = options.fused_attention and any(
            n.target == torch.ops.aten.scaled_dot_product_attention.default for n in gm.graph.nodes)
        options = replace(options, opset=FUSED_ATTENTION_OPSET if fused else BFLOAT16_OPSET)
    return options, passes


OPENVINO_CONTRIB_OPS = frozenset({"MatMulIntegerToFloat"})
"""onnxruntime contrib operators graphopt writes that OpenVINO's ONNX reader runs too (static int8 linears)."""


def refuse_contrib_ops(model: onnx.ModelProto) -> None:
    """``LoweringError`` naming the onnxruntime contrib operators in ``model`` that OpenVINO does not read."""
    contrib = Counter(node.op_type for node in model.graph.node
                      if node.domain == CONTRIB_DOMAIN and node.op_type not in OPENVINO_CONTRIB_OPS)
    if not contrib:
        return
    found = ", ".join(f"{op} x{count}" + (f" ({_CONTRIB_SOURCES[op]})" if op in _CONTRIB_SOURCES else "")
                      for op, count in sorted(contrib.items()))
    raise LoweringError(f"the exported model uses onnxruntime's contrib operators ({CONTRIB_DOMAIN}: {found}), "
                        "which OpenVINO does not read. Use runtime='onnxruntime' (OnnxLowering(runtime="
                        "'onnxruntime') or CpuLowering(backend='onnxruntime')) for this model.")


def _cast_target(node: onnx.NodeProto) -> int | None:
    """The element type a ``Cast`` node casts to (None for other nodes)."""
    if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
        return None
    return next((attribute.i for attribute in node.attribute if attribute.name == "to"), None)


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every value of ``model`` onnx's shape inference knows, by name."""
    typed = onnx.shape_inference.infer_shapes(model)
    values = [*typed.graph.value_info, *typed.graph.input, *typed.graph.output]
    types = {value.name: value.type.tensor_type.elem_type for value in values}
    return types | {initializer.name: initializer.data_type for initializer in typed.graph.initializer}


def _float32_initializer(initializer: onnx.TensorProto) -> onnx.TensorProto:
    """A bfloat16 initializer as float32 (exact: every bfloat16 is a float32)."""
    values = onnx.numpy_helper.to_array(initializer).astype(np.float32)
    return onnx.numpy_helper.from_array(values, initializer.name)


def without_bfloat16_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` that computes in float32 the layers ``precision="bf16"`` cast to bfloat16.

    For OpenVINO's bf16 inference precision, which computes those layers in bfloat16 anyway: kept,
    their casts stay conversions around every layer (3.5% of ResNet-50's time on this CPU's 2
    cores). Casts between float32 and bfloat16 become ``Identity`` and bfloat16 initializers float32
    (exactly). ``model`` itself when it holds no such cast, is too large to type (over 1.8 GB), or
    anything else in it is bfloat16 afterwards (an input, an output, another op's dtype).
    """
    bfloat16, float32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    casts = any(_cast_target(n) == bfloat16 for n in model.graph.node)
    if not casts or approximate_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        return model
    types = _element_types(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        target = _cast_target(node)  # None for other nodes, some of which (Constant) have no input
        if target is not None and {target, types.get(node.input[0])} == {bfloat16, float32}:
            node.op_type = "Identity"
            del node.attribute[:]
    for index, initializer in enumerate(copy.graph.initializer):
        if initializer.data_type == bfloat16:
            copy.graph.initializer[index].CopyFrom(_float32_initializer(initializer))
    del copy.graph.value_info[:]  # the types of the values changed: shape inference recomputes them
    if bfloat16 in _element_types(copy).values():
        return model
    return copy


def _read_model(core: Any, model: onnx.ModelProto, folder: Path) -> Any:
    """``model`` as an OpenVINO model: from memory, or from a file in ``folder`` when it is over 1.8 GB."""
    if approximate_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        return core.read_model(io.BytesIO(model.SerializeToString()))
    return core.read_model(str(write_model(model, folder / "model.onnx")))  # weights in a side file


def _compile(model: onnx.ModelProto, precision: OpenVinoPrecision, threads: int) -> Any:
    """``model`` compiled for OpenVINO's CPU device: latency hint, ``precision``, ``threads`` threads."""
    openvino = import_openvino()
    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    with tempfile.TemporaryDirectory() as folder:  # used only by a model too large for one protobuf
        try:
            return core.compile_model(_read_model(core, model, Path(folder)), "CPU", config)
        except Exception as error:  # OpenVINO's op conversion and compile errors
            raise LoweringError(f"OpenVINO could not compile the exported model: {str(error)[:400]}. "
                                "Use runtime='onnxruntime' for this model.") from error


def _as_array(tensor: torch.Tensor) -> np.ndarray:
    """A call's tensor as OpenVINO takes it (bfloat16 as float32: OpenVINO rounds it back on its input)."""
    tensor = tensor.detach().cpu()
    return np.ascontiguousarray((tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy())


class OpenVinoModule(torch.nn.Module):
    """Runs an ONNX model in OpenVINO (CPU device) behind the original model's calling convention.

    At ``precision="bf16"`` it compiles ``without_bfloat16_casts(model)``; ``save`` writes ``model``.
    One infer request is reused from call to call, so a module serves one caller at a time.
    """

    def __init__(self, model: onnx.ModelProto, out_spec: pytree.TreeSpec | None, precision: OpenVinoPrecision = "f32",
                 threads: int | None = None, compiled: CompiledOpenVino | None = None) -> None:
        super().__init__()
        self.model = model  # what save() writes: the export as it is
        self.out_spec = out_spec
        self.precision = precision
        self.threads = threads or torch.get_num_threads()
        if compiled is not None and compiled.fits(model, precision, self.threads):
            self.compiled = compiled.compiled  # the export's trial compile: reading and compiling BERT takes ~3 s
        else:
            source = without_bfloat16_casts(model) if precision == "bf16" else model  # same layers in bf16, no casts
            self.compiled = _compile(source, precision, self.threads)
        self.request = self.compiled.create_infer_request()
        self.input_names = [next(iter(i.get_names()), str(index)) for index, i in enumerate(self.compiled.inputs)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Feed the call's tensors to OpenVINO and rebuild the model's output structure (copied out of OpenVINO)."""
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if len(tensors) != len(self.input_names):
            raise LoweringError(f"the ONNX model takes {len(self.input_names)} tensors, got {len(tensors)}")
        results = self.request.infer([_as_array(t) for t in tensors], share_inputs=True, share_outputs=False)
        outputs = [torch.from_numpy(np.asarray(results[output])) for output in self.compiled.outputs]
        return pytree.tree_unflatten(outputs, self.out_spec) if self.out_spec is not None else tuple(outputs)

    def save(self, path: str | Path) -> Path:
        """Write the ONNX model to ``path`` (weights beside it in ``path.data`` when over 1.8 GB)."""
        return write_model(self.model, Path(path))

    def extra_repr(self) -> str:
        """The inference precision and threads, in the module's repr."""
        return f"precision={self.precision}, threads={self.threads}"


@dataclass(frozen=True)
class CompiledOpenVino:
    """An ONNX model compiled by OpenVINO at the f32 hint (``run_openvino``), for a runner of that model to reuse."""

    model: onnx.ModelProto
    threads: int
    compiled: Any

    def fits(self, model: onnx.ModelProto, precision: OpenVinoPrecision, threads: int) -> bool:
        """True when it is ``model`` (the same object, unchanged since) compiled at ``precision`` on ``threads``."""
        return model is self.model and precision == "f32" and threads == self.threads


def run_openvino(model: onnx.ModelProto, feed: dict[str, Any]) -> tuple[list[np.ndarray], CompiledOpenVino]:
    """One float32 run of ``model`` in OpenVINO on ``feed`` (numpy arrays in the model's input order).

    Also returns the compiled model, which an ``OpenVinoModule`` of the same model may reuse.
    """
    threads = torch.get_num_threads()
    compiled = _compile(model, "f32", threads)
    results = compiled.create_infer_request().infer(list(feed.values()), share_outputs=False)
    return [np.asarray(results[output]) for output in compiled.outputs], CompiledOpenVino(model, threads, compiled)


AUTO_BFLOAT16_SLACK_SHARE = 0.5
"""A ``precision="bf16"`` or int8 graph with ``openvino_precision`` unset runs at OpenVINO's bf16 hint when its outputs
stay within this share of the budget's slack (``1 - min_cosine``) of the graph's on the example call; the rest of
the slack is the graph's own, which the final check against eager holds as a whole."""


def _bfloat16_check(runner: OpenVinoModule, gm: fx.GraphModule, context: LoweringContext,
                    min_cosine: float | None = None) -> str:
    """Why OpenVINO's bfloat16 outputs cannot stand for the graph's on the example call ("" when they can).

    Held to ``min_cosine`` (default: the budget's).
    """
    assert context.fidelity is not None
    expected, _ = run_and_record(gm, context.flat_inputs(gm))
    actual = runner(*context.example_args, **context.example_kwargs)
    comparison = kernel_comparison(pytree.tree_leaves(actual), pytree.tree_leaves(expected),
                                   context.fidelity.min_cosine if min_cosine is None else min_cosine)
    return "" if comparison.ok else comparison.detail


def _auto_bfloat16(model: onnx.ModelProto, gm: fx.GraphModule, context: LoweringContext, options: OnnxLowering,
                   notes: list[str]) -> OpenVinoModule | None:
    """OpenVINO at its bf16 hint for a lossy graph with ``openvino_precision`` unset, when it keeps close enough.

    Lossy here: computing in bfloat16, or with int8 activations (static QDQ), the graphs whose budget
    already allows rounding. On CPUs with AMX, the f32 hint's casts around every bfloat16 layer cost
    ResNet-50 a quarter of its time (10.9 ms against 8.4 at the bf16 hint, same cosine), and float32
    between its int8 layers a third (20.0 against 13.3 ms). None (and a note) when the outputs leave
    more than ``AUTO_BFLOAT16_SLACK_SHARE`` of the budget's slack.
    """
    lossy = computes_in(gm, torch.bfloat16) or has_quantized_ops(gm, activations=True)
    if options.openvino_precision is not None or context.fidelity is None or not lossy:
        return None
    runner = OpenVinoModule(model, getattr(gm, "_out_spec", None), "bf16", options.threads)
    min_cosine = 1.0 - (1.0 - context.fidelity.min_cosine) * AUTO_BFLOAT16_SLACK_SHARE
    problem = _bfloat16_check(runner, gm, context, min_cosine)
    if not problem:
        return runner
    kept = "the graph's own bfloat16 layers" if computes_in(gm, torch.bfloat16) else "float32 between the int8 layers"
    notes.append(f"OpenVINO's bf16 hint left the graph by more than half the budget ({problem}): f32 hint, {kept}")
    return None


def openvino_runner(model: onnx.ModelProto, gm: fx.GraphModule, context: LoweringContext, options: OnnxLowering,
                    notes: list[str], compiled: CompiledOpenVino | None = None) -> OpenVinoModule:
    """Compile the exported ``model`` of ``gm`` in OpenVINO at the precision ``resolve_precision`` picks.

    bfloat16 inference (asked for with ``openvino_precision="bf16"``) is checked against the graph
    on the example call first, and raises ``LoweringError`` when it misses the budget. Unset on a
    bfloat16 or int8 graph, the bf16 hint is tried and kept within half the budget's slack, else the f32
    hint runs (``_auto_bfloat16``). Appends the precision that ran to ``notes``. ``compiled``: the
    export's trial compile of ``model`` (``run_openvino``), reused where it fits.
    """
    refuse_contrib_ops(model)
    precision = resolve_precision(options, gm, context)
    automatic = _auto_bfloat16(model, gm, context, options, notes)
    if automatic is not None:
        notes.append(_precision_note(automatic, True))
        return automatic
    runner = OpenVinoModule(model, getattr(gm, "_out_spec", None), precision, options.threads, compiled)
    problem = _bfloat16_check(runner, gm, context) if precision == "bf16" else ""
    if problem:
        raise LoweringError(f"OpenVINO's bfloat16 inference misses the fidelity budget against the graph ({problem}); "
                            "use openvino_precision='f32' (the default: the graph's own bfloat16 layers) or a looser "
                            "budget")
    notes.append(_precision_note(runner, computes_in(gm, torch.bfloat16)))
    return runner


def _precision_note(runner: OpenVinoModule, bfloat16_graph: bool) -> str:
    """Which precision OpenVINO ran at, for the report."""
    if runner.precision == "bf16":
        return (f"OpenVINO inference precision bf16 (every op OpenVINO can in bfloat16, held to the fidelity budget), "
                f"{runner.threads} threads")
    layers = "; the graph's bfloat16 layers run in bfloat16 as exported" if bfloat16_graph else ""
    return f"OpenVINO inference precision f32{layers}, {runner.threads} threads"
