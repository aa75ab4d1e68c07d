"""An ONNX model's size and structure, judged without serializing its weights.

protobuf's ``ByteSize`` serializes the whole message to measure it, and ``onnx.checker`` takes a
serialized copy: on SmolLM2's 538 MB decoder step each took 1.2-1.9 s, three of them per
lowering (a quarter of the generation setup's lowering). :func:`approximate_bytes` reads the
size off the tensors' shapes instead, and :func:`check_structure` checks a copy whose large
initializers are graph inputs of the same name, type and shape: every node, type and shape is
checked as before; only the bytes of those tensors, written by the exporter from the graph's own
weights, are not re-read.
"""

from __future__ import annotations

import math
from typing import Any

import onnx

__all__ = ["CHECKED_INITIALIZER_BYTES", "approximate_bytes", "check_structure", "tensor_bytes", "without_initializers"]

CHECKED_INITIALIZER_BYTES = 4096
"""Initializers up to this size stay in the checked copy (shape tensors, axes, scalars: inference reads them)."""

_NODE_BYTES = 256
"""A generous serialized size of one node (op type, names, small attributes)."""


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """The stored size of ``tensor`` in the model itself (0 for external data), from its shape and type."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize if tensor.data_type else 1
    return math.prod(tensor.dims) * itemsize


def _graph_bytes(graph: onnx.GraphProto) -> int:
    total = sum(tensor_bytes(t) for t in graph.initializer) + _NODE_BYTES * len(graph.node)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                total += tensor_bytes(attribute.t)
            total += sum(tensor_bytes(t) for t in attribute.tensors)
            if attribute.HasField("g"):
                total += _graph_bytes(attribute.g)
            total += sum(_graph_bytes(g) for g in attribute.graphs)
    return total


def approximate_bytes(model: onnx.ModelProto) -> int:
    """About how many bytes ``model`` serializes to (at least its tensors' data), without serializing it."""
    return _graph_bytes(model.graph)


def check_structure(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model(..., full_check=True)`` on ``model`` with its large initializers as inputs.

    Raises what the checker raises: ``onnx.checker.ValidationError``, or shape inference's
    ``onnx.shape_inference.InferenceError``.
    """
    checked = without_initializers(model)
    graph, source = checked.graph, model.graph
    listed = {i.name for i in source.input}
    for tensor in source.initializer:
        if tensor_bytes(tensor) <= CHECKED_INITIALIZER_BYTES:
            graph.initializer.append(tensor)
        elif tensor.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    onnx.checker.check_model(checked, full_check=True)


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every field but its graph's initializers (nodes, inputs, outputs, opsets...).

    The nodes and other small messages are copied; no weight is, so this costs milliseconds for
    any model size. Callers add back the initializers they want.
    """
    copy = onnx.ModelProto()
    for descriptor, value in model.ListFields():
        if descriptor.name != "graph":
            _copy_field(copy, descriptor, value)
    for descriptor, value in model.graph.ListFields():
        if descriptor.name != "initializer":
            _copy_field(copy.graph, descriptor, value)
    return copy


def _copy_field(target: Any, descriptor: Any, value: Any) -> None:
    """Copy one set protobuf field (as ``ListFields`` gives it) onto ``target``."""
    if isinstance(value, (str, bytes, int, float, bool)):
        setattr(target, descriptor.name, value)
    elif hasattr(value, "extend"):  # a repeated field
        getattr(target, descriptor.name).extend(value)
    else:
        getattr(target, descriptor.name).CopyFrom(value)
