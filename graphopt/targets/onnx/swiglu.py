"""Find SwiGLU blocks in an exported ONNX graph: ``SiLU(gate) * up`` over the outputs of linear layers.

A decoder's MLP (Llama, Mistral, Qwen, Phi-3, SmolLM ...) computes ``SiLU(x W_gate) * (x W_up)``.
Exported, that is ``Mul(Mul(g, Sigmoid(g)), u)``, where ``g`` and ``u`` are either two layers'
outputs or two slices of one layer that holds both (graphopt's horizontal fusion, or a model's own
``gate_up_proj``): ``Slice`` or ``Split`` along the last axis (with sizes, or in equal parts as
torch's ``chunk`` exports it). Their bounds are often computed from
constants (``Cast``, ``Reshape`` of a ``Constant``) rather than written as initializers; a small
constant evaluator (:func:`constant_value`) reads them.

:func:`find_swiglus` only reads the graph: it says which layer outputs feed a SwiGLU, over which
features, and which value the block writes. ``native_kernels`` runs each as one kernel, the SiLU
and the product done on the layer's outputs before they are stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["Features", "SwiGLU", "constant_value", "find_swiglus", "value_shapes"]


@dataclass(frozen=True)
class Features:
    """Output features ``start .. stop - 1`` of the value ``source`` (a layer's output)."""

    source: str
    start: int
    stop: int

    @property
    def width(self) -> int:
        """How many features."""
        return self.stop - self.start


@dataclass(frozen=True)
class SwiGLU:
    """``output = SiLU(gate) * up``, with ``gate`` and ``up`` read from layer outputs."""

    gate: Features
    up: Features
    output: str
    nodes: frozenset[str]
    """The first outputs of the block's nodes (slices, sigmoid, products): none is read outside it."""


def value_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int | str, ...]]:
    """The shape ``graph`` records for each value (value infos, inputs, outputs); ``"?"`` for an unnamed free dim."""
    return {v.name: tuple(d.dim_value or d.dim_param or "?" for d in v.type.tensor_type.shape.dim)
            for v in [*graph.value_info, *graph.input, *graph.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


class _Graph:
    """The lookups the matcher needs: producers, readers, constants, ranks."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.producers = {name: node for node in graph.node for name in node.output if name}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.ranks = {name: len(shape) for name, shape in value_shapes(graph).items()}

    def only_read_by(self, name: str, readers: set[str]) -> bool:
        """Whether every reader of ``name`` is one of the nodes whose first outputs are ``readers``."""
        return name not in self.outputs and all(r.output[0] in readers for r in self.readers.get(name, []))


def constant_value(name: str, producers: dict[str, onnx.NodeProto], initializers: dict[str, onnx.TensorProto],
                   depth: int = 8) -> np.ndarray | None:
    """The value of ``name`` when it is a constant, else None.

    Constants: initializers, ``Constant`` nodes, and ``Cast`` / ``Reshape`` / ``Identity`` /
    ``Squeeze`` / ``Unsqueeze`` / ``Concat`` over them, ``depth`` nodes deep at most.
    """
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    node = producers.get(name)
    if node is None or depth == 0:
        return None
    if node.op_type == "Constant" and node.attribute:
        attribute = node.attribute[0]
        value = onnx.helper.get_attribute_value(attribute)
        return numpy_helper.to_array(value) if attribute.name == "value" else np.asarray(value)
    inputs = [constant_value(i, producers, initializers, depth - 1) if i else None for i in node.input]
    if not inputs or inputs[0] is None:
        return None
    if node.op_type == "Identity":
        return inputs[0]
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        return None if to is None else inputs[0].astype(onnx.helper.tensor_dtype_to_np_dtype(to))
    if node.op_type == "Reshape" and len(inputs) == 2 and inputs[1] is not None and not (inputs[1] == 0).any():
        return inputs[0].reshape(inputs[1])
    if node.op_type in ("Squeeze", "Unsqueeze") and len(inputs) == 2 and inputs[1] is not None:
        axes = [int(a) for a in inputs[1].reshape(-1)]
        return np.squeeze(inputs[0], tuple(axes)) if node.op_type == "Squeeze" else np.expand_dims(inputs[0], axes)
    if node.op_type == "Concat" and all(i is not None for i in inputs):
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        return np.concatenate(inputs, axis=axis)
    return None


def _last_axis(axis: int, data: str, graph: _Graph) -> bool:
    return axis == -1 or graph.ranks.get(data) == axis + 1


def _features(name: str, widths: dict[str, int], graph: _Graph) -> tuple[Features, str | None] | None:
    """Which layer features ``name`` holds (and the slicing node's first output, if any), or None."""
    if name in widths:
        return Features(name, 0, widths[name]), None
    node = graph.producers.get(name)
    if node is None or not node.input or node.input[0] not in widths:
        return None
    source, width = node.input[0], widths[node.input[0]]
    constant = [constant_value(i, graph.producers, graph.initializers) if i else None for i in node.input]
    if node.op_type == "Slice" and len(node.input) >= 4 and all(c is not None for c in constant[1:4]):
        starts, ends, axes = (c.reshape(-1) for c in constant[1:4])
        if len(node.input) > 4 and node.input[4] and constant[4] is None:
            return None  # steps computed at run time
        steps = constant[4].reshape(-1) if len(constant) > 4 and constant[4] is not None else np.ones(1, np.int64)
        if len(axes) != 1 or not _last_axis(int(axes[0]), source, graph) or int(steps[0]) != 1:
            return None
        start, stop = (int(v) + width if v < 0 else min(int(v), width) for v in (starts[0], ends[0]))
        return (Features(source, start, stop), node.output[0]) if 0 <= start < stop <= width else None
    if node.op_type == "Split":
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        sizes = constant[1] if len(constant) > 1 and constant[1] is not None else \
            next((np.asarray(a.ints) for a in node.attribute if a.name == "split"), None)
        if sizes is None and (len(node.input) < 2 or not node.input[1]):  # equal parts, the last one shorter
            chunk = -(-width // len(node.output))
            sizes = np.array([min(chunk, width - chunk * i) for i in range(len(node.output))])
        if sizes is None or not _last_axis(axis, source, graph) or int(sizes.sum()) != width or (sizes <= 0).any():
            return None
        index = list(node.output).index(name)
        start = int(sizes[:index].sum())
        return Features(source, start, start + int(sizes[index])), node.output[0]
    return None


def _silu_input(name: str, graph: _Graph) -> tuple[str, set[str]] | None:
    """``g`` when ``name`` is ``Mul(g, Sigmoid(g))`` (either order), with the two nodes' first outputs."""
    node = graph.producers.get(name)
    if node is None or node.op_type != "Mul" or len(node.input) != 2:
        return None
    for value, other in (node.input, node.input[::-1]):
        sigmoid = graph.producers.get(other)
        if sigmoid is not None and sigmoid.op_type == "Sigmoid" and sigmoid.input[0] == value:
            return value, {node.output[0], sigmoid.output[0]}
    return None


def find_swiglus(graph: onnx.GraphProto, widths: dict[str, int]) -> list[SwiGLU]:
    """The SwiGLU blocks of ``graph`` over the layer outputs ``widths`` (name -> output features).

    A block qualifies when gate and up have the same width and nothing outside the block reads its
    intermediate values; each layer output feeds at most one block, and then nothing else reads it.
    """
    view = _Graph(graph)
    found: list[SwiGLU] = []
    used: set[str] = set()
    for node in graph.node:
        if node.op_type != "Mul" or len(node.input) != 2 or node.domain not in ("", "ai.onnx"):
            continue
        for silu, up_name in (node.input, node.input[::-1]):
            matched = _silu_input(silu, view)
            gate = _features(matched[0], widths, view) if matched else None
            up = _features(up_name, widths, view)
            if matched is None or gate is None or up is None or gate[0].width != up[0].width:
                continue
            block = {node.output[0], *matched[1], *(n for n in (gate[1], up[1]) if n)}
            inner = [*matched[1], matched[0], up_name, *(view.producers[matched[0]].output if gate[1] else ()),
                     *(view.producers[up_name].output if up[1] else ())]
            sources = {gate[0].source, up[0].source}
            if (sources & used or gate[0] == up[0]
                    or not all(view.only_read_by(name, block) for name in {*inner, *sources})):
                continue
            found.append(SwiGLU(gate[0], up[0], node.output[0], frozenset(block)))
            used |= sources
            break
    return found
