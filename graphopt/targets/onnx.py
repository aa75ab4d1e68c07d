"""The ``onnx`` target: export through ``torch.onnx``, check the model, run it in onnxruntime."""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.errors import LoweringError, UnsupportedOpError
from graphopt.target import Target

__all__ = ["OnnxRuntimeModule", "OnnxTarget", "export_graph_to_onnx"]

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
def _quiet_exporter_logs() -> Iterator[None]:
    """Silence the exporter's INFO/WARNING chatter (e.g. skipped torchvision ops) during export."""
    exporter_log = logging.getLogger("torch.onnx")
    previous = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        exporter_log.setLevel(previous)


def export_graph_to_onnx(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> onnx.ModelProto:
    """Export ``gm`` with ``torch.onnx`` (dynamo exporter) and check the result with ``onnx.checker``.

    Raises ``UnsupportedOpError`` naming the op and node when an op has no ONNX translation.
    """
    log.info("exporting to ONNX (%d graph nodes)", len(gm.graph.nodes))
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), _quiet_exporter_logs():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(gm, args, kwargs=kwargs or None, dynamo=True, verbose=False,
                                        report=False, optimize=True)
    except Exception as error:
        unsupported = _unsupported_op(gm, error)
        if unsupported is not None:
            raise unsupported from error
        raise LoweringError(
            f"torch.onnx could not export the optimized graph: {type(error).__name__}: {error}"
        ) from error
    model = program.model_proto
    try:
        onnx.checker.check_model(model, full_check=model.ByteSize() < 2**31 - 1)
    except onnx.checker.ValidationError as error:
        raise LoweringError(f"the exported ONNX model fails onnx.checker: {error}") from error
    return model


class OnnxRuntimeModule(torch.nn.Module):
    """Runs an ONNX model in onnxruntime behind the original model's calling convention."""

    def __init__(self, model: onnx.ModelProto, out_spec: pytree.TreeSpec | None, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.model_bytes = model.SerializeToString()
        self.session = ort.InferenceSession(self.model_bytes, options, providers=["CPUExecutionProvider"])
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

    def save(self, path: str | Path) -> Path:
        """Write the ONNX model to ``path``."""
        path = Path(path)
        path.write_bytes(self.model_bytes)
        return path


class OnnxTarget(Target):
    """Export to ONNX and run with onnxruntime (CPU execution provider), for edge runtimes."""

    name = "onnx"

    def lower(
        self, gm: fx.GraphModule, example_args: tuple[Any, ...], example_kwargs: dict[str, Any]
    ) -> Callable[..., Any]:
        """Export, check, and open an onnxruntime session for the optimized graph."""
        model = export_graph_to_onnx(gm, example_args, example_kwargs)
        return OnnxRuntimeModule(model, getattr(gm, "_out_spec", None), threads=torch.get_num_threads())

