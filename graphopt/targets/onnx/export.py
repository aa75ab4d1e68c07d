"""Export to ONNX and run in onnxruntime: the ``onnx`` target's export, checks and session module.

``export_graph_to_onnx`` runs the rewrites a graph needs first (``export_passes``: custom ops for
int8 and compressed weights, verified one by one on the example call), exports with the dynamo
exporter and checks the file with ``onnx.checker``; ``OnnxRuntimeModule`` runs a model in
onnxruntime behind the original model's calling convention.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.errors import LoweringError, UnsupportedOpError
from graphopt.ir.graph import snapshot_graph_module, state_update_nodes
from graphopt.ir.shapes import DynamicDims
from graphopt.ir.state import state_inputs
from graphopt.passes.base import Pass
from graphopt.passes.cleanup import DeadCodeElimination
from graphopt.passes.quantize.patterns import has_quantized_ops
from graphopt.passes.quantize.weight_ops import DEQUANTIZE_INT4
from graphopt.targets.base import LoweringContext
from graphopt.targets.common.lowering import LoweringResult, run_lowering
from graphopt.targets.common.weight_only_kernels import (
    ExpandCompressedWeights,
    GatherCodebookEmbeddings,
    GatherQuantizedEmbeddings,
    has_weight_only_ops,
)
from graphopt.targets.onnx.cache_writes import IndexCopyAsScatter, has_index_copy
from graphopt.targets.onnx.cached_attention import GroupQueryAttentionOverCache, has_cached_attention
from graphopt.targets.onnx.cached_attention import translation_table as attention_translations
from graphopt.targets.onnx.decoder_norms import SkipRmsNorm, clear_unused_outputs, has_rms_norm
from graphopt.targets.onnx.decoder_norms import translation_table as norm_translations
from graphopt.targets.onnx.decoder_ops import DecomposeDecoderOps, has_decoder_ops
from graphopt.targets.onnx.direct_export import export_translated_directly
from graphopt.targets.onnx.model_size import approximate_bytes, check_structure
from graphopt.targets.onnx.opsets import MAX_OPSET, opset_of, stamp_ir_version
from graphopt.targets.onnx.quantized import DynamicLinearOp, StaticLinearAsMatmul, StaticLinearFloatOutput
from graphopt.targets.onnx.quantized import translation_table as quantized_translations
from graphopt.targets.onnx.session_weights import open_session
from graphopt.targets.onnx.slice_linears import LinearPerSlice
from graphopt.targets.onnx.weight_only import MatMulNBitsLinears
from graphopt.targets.onnx.weight_only import translation_table as weight_only_translations

__all__ = ["EXTERNAL_DATA_THRESHOLD", "OnnxRuntimeModule", "export_graph_to_onnx", "export_passes", "export_prepared",
           "prepare_for_export", "quiet_loggers", "tidy_model", "write_model"]

log = logging.getLogger("graphopt")

_OP_IN_MESSAGE = re.compile(r"(?:OpOverload\(op='|\b)([A-Za-z_][\w]*)(?:\.|::|', overload=')([A-Za-z_]\w*)")


def _unsupported_op(gm: fx.GraphModule, error: BaseException) -> UnsupportedOpError | None:
    """Find the graph node whose op the exporter could not translate, from the exporter's message."""
    text = "".join(str(e) for e in (error, error.__cause__, error.__context__) if e is not None)
    by_name: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            by_name.setdefault(f"{node.target.namespace}.{node.target._opname}", []).append(node.name)
    for namespace, opname in _OP_IN_MESSAGE.findall(text):
        nodes = by_name.get(f"{namespace}.{opname}")
        if nodes and ("No ONNX function" in text or "not supported" in text.lower() or "DispatchError" in text):
            op = f"{namespace}::{opname}"
            return UnsupportedOpError(
                f"the onnx target cannot lower op {op} (node {', '.join(nodes[:5])}): torch.onnx has no "
                "translation for it. Register one with torch.onnx.export(custom_translation_table=...), "
                "replace the op with standard ones, or use target='cpu'.",
                op=op,
                nodes=nodes,
            )
    return None


@contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raise these loggers to ERROR for the duration: the exporters' INFO/WARNING chatter is not the user's concern.

    (torch.onnx reports skipped torchvision ops; onnxscript's constant folding reports every
    shape it could not fold.)
    """
    loggers = [logging.getLogger(name) for name in names]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, previous, strict=True):
            logger.setLevel(level)


def _refuse_state(gm: fx.GraphModule) -> None:
    """ONNX models are stateless: a graph that updates its own buffers on each call cannot be lowered."""
    updates = state_update_nodes(gm)
    if updates:
        names = sorted({str(n.args[0].target) for n in updates})
        raise LoweringError(
            f"the model updates state on every call (buffer(s) {', '.join(names[:5])}), which an ONNX model "
            "cannot hold between runs. Use target='cpu', or move the state out of forward() "
            "(pass it in as an input and return the new value)."
        )


EXTERNAL_DATA_THRESHOLD = 1_800_000_000
"""Models larger than this many bytes keep their weights in a ``.data`` file beside the ``.onnx``
(protobuf cannot serialise a message of 2 GiB or more)."""


def export_passes(gm: fx.GraphModule) -> list[Pass]:
    """The rewrites a graph needs before export, in order: custom ops onnxruntime runs with int8 kernels.

    int8 QDQ graphs: ``graphopt.targets.onnx.quantized``; compressed weights (``MatMulNBits``,
    int8 embedding rows, codebooks): ``graphopt.targets.onnx.weight_only``; ``index_copy`` (a
    static cache's writes) as ``scatter``: ``graphopt.targets.onnx.cache_writes``; a decoder step's
    merged projections read through slices, one linear per slice: ``graphopt.targets.onnx.slice_linears``.
    None for other float graphs.
    """
    passes: list[Pass] = []
    if has_quantized_ops(gm, activations=True):
        passes += [StaticLinearFloatOutput(), StaticLinearAsMatmul(), DynamicLinearOp()]
    if has_weight_only_ops(gm):
        passes += [GatherQuantizedEmbeddings(), GatherCodebookEmbeddings(), MatMulNBitsLinears(),
                   ExpandCompressedWeights(ops=(DEQUANTIZE_INT4,))]  # ONNX has no int4 op but MatMulNBits
    if has_cached_attention(gm):
        passes.append(GroupQueryAttentionOverCache())  # cache writes + attention as onnxruntime's GroupQueryAttention
    if has_rms_norm(gm):
        passes.append(SkipRmsNorm())  # residual add + RMSNorm as onnxruntime's SkipSimplifiedLayerNormalization
    if has_decoder_ops(gm):
        passes.append(DecomposeDecoderOps())  # graphopt_decoder ops (swiglu, geglu, rotary) back to ATen
    if has_index_copy(gm):
        passes.append(IndexCopyAsScatter())  # a cache write as one ScatterElements, not transpose-scatter-transpose
    if state_inputs(gm):
        passes.append(LinearPerSlice())  # a decoder step: gate and up apart again, no Split kernel per layer
    return [*passes, DeadCodeElimination()] if passes else []


def prepare_for_export(gm: fx.GraphModule, context: LoweringContext,
                       passes: list[Pass] | None = None) -> LoweringResult:
    """``gm``, or a copy rewritten by ``passes`` (default ``export_passes(gm)``) verified on the context's inputs.

    Raises ``LoweringError`` for a graph that updates its own state (an ONNX model is stateless).
    """
    _refuse_state(gm)
    passes = export_passes(gm) if passes is None else passes
    return run_lowering(snapshot_graph_module(gm), passes, context) if passes else LoweringResult(gm)


def _translations(gm: fx.GraphModule) -> dict[Any, Any] | None:
    """The custom ONNX translations for graphopt's own ops in ``gm`` (None when it has none)."""
    table = {**quantized_translations(), **weight_only_translations(), **attention_translations(),
             **norm_translations()}
    used = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    return {op: fn for op, fn in table.items() if op in used} or None


def export_prepared(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any],
                    dynamic: DynamicDims | None = None, opset: int | None = None,
                    graph_optimizer: bool = True) -> onnx.ModelProto:
    """Export a graph ``prepare_for_export`` rewrote with ``torch.onnx`` and check it with ``onnx.checker``.

    Dims in ``dynamic`` become symbolic ONNX dims named like them (``batch``, ``seq``...).
    Raises ``UnsupportedOpError`` naming the op and node when an op has no ONNX translation.
    ``opset`` picks the ONNX opset (default: the exporter's) and the oldest IR version it allows;
    ``LoweringError`` when the exporter cannot write that opset. A state-lifted decoder step skips
    onnxscript's graph optimizer: on SmolLM2 it took 14 of the 41 s of lowering and the session
    decoded no faster for it (33.2 vs 32.2 tok/s, onnxruntime optimizes the graph itself).
    ``graph_optimizer=False`` skips it for any graph (a model only OpenVINO will read).
    """
    log.info("exporting to ONNX (%d graph nodes)", len(gm.graph.nodes))
    dynamic_shapes = dynamic.spec_for("onnx", gm.forward, args, kwargs) if dynamic else None
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), quiet_loggers("torch.onnx", "onnxscript"):
            warnings.simplefilter("ignore")
            optimize, translations = graph_optimizer and not state_inputs(gm), _translations(gm)
            program = export_translated_directly(gm, args, kwargs, dynamic_shapes, opset, optimize, translations)
            if program is None:
                program = torch.onnx.export(gm, args, kwargs=kwargs or None, dynamo=True, verbose=False,
                                            report=False, optimize=optimize, dynamic_shapes=dynamic_shapes,
                                            **({"opset_version": opset} if opset else {}),
                                            custom_translation_table=translations)
    except Exception as error:
        unsupported = _unsupported_op(gm, error)
        if unsupported is not None:
            raise unsupported from error
        raise LoweringError(
            f"torch.onnx could not export the optimized graph: {type(error).__name__}: {error}"
        ) from error
    model = clear_unused_outputs(program.model_proto)
    if opset is not None:
        model = _at_opset(model, opset)
        stamp_ir_version(model)  # an older runtime refuses a newer IR version even for operators it has
    try:
        check_structure(model)  # every node, type and shape; not the weights' bytes (seconds for a large model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise LoweringError(f"the exported ONNX model fails onnx.checker: {error}") from error
    return model


def tidy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` through onnxscript's graph optimizer, as ``export_prepared`` runs it by default.

    Constant folding, shape arithmetic folded, dead nodes dropped: BERT's export for OpenVINO
    (``graph_optimizer=False``) goes from 974 nodes to 309 in about 2 s. For files written for
    people and other runtimes.
    """
    from onnxscript.optimizer import optimize  # takes about a second to import: only when a file is written

    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), quiet_loggers("onnxscript"):
        warnings.simplefilter("ignore")
        return optimize(model)  # a new model: ``model`` itself is left as it is


def _at_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` at ``opset``: converted by onnx's version converter when the exporter left another opset.

    The exporter converts before folding constants, and onnx's adapters need some inputs constant
    (a reduction's axes, before opset 18): after folding, the conversion the exporter gave up on
    succeeds. Raises ``LoweringError`` when it still fails.
    """
    written = opset_of(model)
    if written == opset:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, opset)
    except Exception as error:
        raise LoweringError(f"the graph cannot be written at opset {opset} (the exporter wrote opset {written} and "
                            f"onnx's version converter failed: {str(error).splitlines()[-1][:200]}); pick an opset "
                            f"from {written} to {MAX_OPSET}, or export at the default opset") from error
    return _without_newer_reduce_attributes(converted) if opset < 18 else converted


_AXES_INPUT_FROM_18 = frozenset({"ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                                 "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})
"""Reductions that gained the ``noop_with_empty_axes`` attribute in opset 18 (``ReduceSum`` has it since 13)."""


def _without_newer_reduce_attributes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the opset-18 attribute ``noop_with_empty_axes=0`` onnx's converter leaves on older reductions.

    Its value 0 is what the older operators do anyway; a value of 1 has no older form (``LoweringError``).
    """
    for node in model.graph.node:
        if node.op_type not in _AXES_INPUT_FROM_18 or node.domain not in ("", "ai.onnx"):
            continue
        kept = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
        if any(a.name == "noop_with_empty_axes" and a.i for a in node.attribute):
            raise LoweringError(f"node {node.name} ({node.op_type}) reduces nothing when given no axes, which "
                                "opset 17 cannot express; export at opset 18 or newer")
        del node.attribute[:]
        node.attribute.extend(kept)
    return model


def export_graph_to_onnx(
    gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: DynamicDims | None = None,
    opset: int | None = None,
) -> onnx.ModelProto:
    """Export ``gm`` with ``torch.onnx`` (dynamo exporter) and check the result with ``onnx.checker``.

    The rewrites of ``export_passes`` run first on a copy, each verified on ``args`` / ``kwargs``
    (rolled back with a ``RollbackWarning`` when one fails). Dims in ``dynamic`` become symbolic
    ONNX dims named like them (``batch``, ``seq``...). Raises ``UnsupportedOpError`` naming the op
    and node when an op has no ONNX translation. ``opset`` picks the ONNX opset (default: the
    exporter's).
    """
    prepared = prepare_for_export(gm, LoweringContext(tuple(args), dict(kwargs), dynamic)).graph_module
    return export_prepared(prepared, args, kwargs, dynamic, opset)


def write_model(model: onnx.ModelProto, path: Path) -> Path:
    """Write ``model`` to ``path``, its weights in ``path.data`` when it is too large for one protobuf."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if approximate_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        path.write_bytes(model.SerializeToString())
        return path
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # external data is appended to: start from an empty file
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # converting to external data rewrites the tensors of the model in place
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return path


class OnnxRuntimeModule(torch.nn.Module):
    """Runs an ONNX model in onnxruntime behind the original model's calling convention."""

    def __init__(self, model: onnx.ModelProto | None, out_spec: pytree.TreeSpec | None, threads: int | None = None,
                 options: Any = None, session: Any = None, session_model: onnx.ModelProto | None = None) -> None:
        """``model`` is what ``save`` writes; the session runs ``session_model`` (default: ``model``).

        They differ where the session runs graphopt's own kernels (``native_kernels``), which
        ``options`` then registers.
        """
        super().__init__()
        options = options if options is not None else ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.model = model
        runs = session_model if session_model is not None else model
        if session is not None:
            self.session = session
        elif runs is None:
            raise LoweringError("OnnxRuntimeModule needs an ONNX model or an onnxruntime session")
        else:  # the weights go to onnxruntime in memory, not serialized with the graph (any size)
            self.session, self._session_weights = open_session(runs, options)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.out_spec = out_spec

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Feed the call's tensors to onnxruntime and rebuild the model's output structure."""
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if len(tensors) != len(self.input_names):
            raise LoweringError(f"the ONNX model takes {len(self.input_names)} tensors, got {len(tensors)}")
        feed = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, tensors, strict=True)}
        outputs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feed)]
        return pytree.tree_unflatten(outputs, self.out_spec) if self.out_spec is not None else tuple(outputs)

    @classmethod
    def from_file(cls, path: str | Path, out_spec: pytree.TreeSpec | None) -> OnnxRuntimeModule:
        """A module over the model file at ``path`` as onnxruntime reads it (ONNX, or ORT format; no ``model``)."""
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return cls(None, out_spec, session=session)

    def save(self, path: str | Path) -> Path:
        """Write the ONNX model to ``path`` (weights beside it in ``path.data`` when over 1.8 GB)."""
        if self.model is None:
            raise LoweringError("this onnxruntime module was read from a file and holds no ONNX model to save")
        return write_model(self.model, Path(path))
