"""Decoder attention over the cache on graphopt's own kernel: ``graphopt.DecodeAttention``.

onnxruntime's CPU ``GroupQueryAttention`` treats every query head on its own (a GEMM for the
scores, a softmax, a GEMM with the values), so on a decode step each key/value head's cache is
read once per query head of its group, in tasks of one head each. ``graphopt.DecodeAttention``
(``decode_attention.cc``, built into the library of :mod:`~graphopt.targets.onnx.native_kernels`)
computes the same thing the way a decode step wants it: one task reads a stretch of a key/value
head's cache for all the query heads that share it, and long caches are split into stretches so
both threads have work. A prompt (several tokens per row) takes one task per share of a row's
tokens. Measured per layer, SmolLM2's shapes, 2 threads: one token at 577 filled slots 32 us
against 88; four rows, 105 against 344; a 512-token prompt 4.8 ms against 8.8.

The swap is made for the session only: the saved and exported model keeps ``GroupQueryAttention``
(a copy of the model where graphopt's int4 kernels already made one; otherwise the nodes are
swapped while the session is built and put back, :func:`decode_attention_while`, since a float
decoder's weights are too large to copy for it). The op takes the node's inputs as they are, and
its attributes as two constant inputs (heads, scale).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.targets.onnx.native_kernels import NATIVE_DOMAIN
from graphopt.targets.onnx.swiglu import constant_value, value_shapes

__all__ = ["DECODE_ATTENTION", "decode_attention_nodes", "decode_attention_while", "use_decode_attention"]

DECODE_ATTENTION = "DecodeAttention"
"""The op's name in the ``graphopt`` domain."""

MAX_GROUP = 16
"""Query heads per key/value head the kernel takes (``kMaxGroup``)."""

MAX_HEAD_SIZE = 256
"""The largest head size it takes (``kMaxHeadSize``); head sizes are multiples of 16."""

_INPUTS = 11
"""``GroupQueryAttention``'s inputs through ``attention_bias``; a node with more (a head sink) keeps onnxruntime's."""

_ATTRIBUTE_DEFAULTS = {"rotary_interleaved": 0, "local_window_size": -1, "softcap": 0.0, "smooth_softmax": 0,
                       "qk_output": 0}
"""Attributes the kernel has no other value for: a node that sets any of them otherwise keeps onnxruntime's op."""


def _attributes(node: onnx.NodeProto) -> dict[str, float | int]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _head_size(node: onnx.NodeProto, shapes: dict[str, tuple[int | str, ...]]) -> int | None:
    """The node's head size when its query's last dim is static (``[B, S, width]``), else None."""
    attributes = _attributes(node)
    heads, kv_heads = attributes.get("num_heads"), attributes.get("kv_num_heads")
    query = shapes.get(node.input[0])
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads <= 0 or kv_heads <= 0:
        return None
    if query is None or len(query) != 3 or not isinstance(query[2], int):
        return None
    packed = len(node.input) < 2 or not node.input[1]
    width = query[2]
    per_token = heads + 2 * kv_heads if packed else heads
    return width // per_token if width % per_token == 0 else None


def _eligible(node: onnx.NodeProto, shapes: dict[str, tuple[int | str, ...]]) -> bool:
    if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
        return False
    attributes = _attributes(node)
    if any(attributes.get(name, default) != default for name, default in _ATTRIBUTE_DEFAULTS.items()):
        return False
    if len(node.input) > _INPUTS or len(node.output) != 3 or not all(node.output):
        return False
    heads, kv_heads = int(attributes["num_heads"]), int(attributes["kv_num_heads"])
    head_size = _head_size(node, shapes)
    rotary = int(attributes.get("do_rotary", 0)) == 1
    inputs = [*node.input, *[""] * (_INPUTS - len(node.input))]
    return (head_size is not None and head_size % 16 == 0 and 0 < head_size <= MAX_HEAD_SIZE
            and heads % kv_heads == 0 and heads // kv_heads <= MAX_GROUP
            and bool(inputs[3]) and bool(inputs[4])  # the cache comes in (never a cache built by the node)
            and (not rotary or (bool(inputs[7]) and bool(inputs[8]))))


def decode_attention_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The ``GroupQueryAttention`` nodes of ``model`` that ``graphopt.DecodeAttention`` can run.

    Those whose query's width is static (any batch and sequence length: decode and prompt steps),
    whose cache comes in as past key and value, with a head size that is a multiple of 16 (at most
    ``MAX_HEAD_SIZE``), at most ``MAX_GROUP`` query heads per key/value head, half-split rotary if
    any, and no sliding window, soft cap, smooth softmax or extra inputs and outputs.
    """
    shapes = value_shapes(model.graph)
    return [node for node in model.graph.node if _eligible(node, shapes)]


@dataclass(frozen=True)
class _PackedRotary:
    """A node's queries and keys rotated apart from one packed projection, as the kernel can take them whole."""

    packed: str  # the projection [B, S, (H + 2Hk) * D]
    position_ids: str
    cos: str
    sin: str
    replaced: tuple[onnx.NodeProto, ...]  # the slices and RotaryEmbedding nodes it reads through


def _last_axis_slice(node: onnx.NodeProto | None, producers: dict[str, onnx.NodeProto],
                     initializers: dict[str, onnx.TensorProto]) -> tuple[str, int, int] | None:
    """``(input, start, end)`` when ``node`` slices its input's last axis (rank 3) with step 1, else None."""
    if node is None or node.op_type != "Slice" or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
        return None
    values = [constant_value(name, producers, initializers) if name else None for name in node.input[1:5]]
    starts, ends = values[0], values[1]
    axes = values[2] if len(values) > 2 and values[2] is not None else np.array([0])
    steps = values[3] if len(values) > 3 and values[3] is not None else np.array([1])
    if starts is None or ends is None or starts.size != 1 or int(axes.reshape(-1)[0]) not in (-1, 2):
        return None
    if int(steps.reshape(-1)[0]) != 1:
        return None
    return node.input[0], int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])


def _packed_rotary(node: onnx.NodeProto, heads: int, kv_heads: int, producers: dict[str, onnx.NodeProto],
                   initializers: dict[str, onnx.TensorProto], shapes: dict[str, tuple[int | str, ...]]
                   ) -> _PackedRotary | None:
    """Queries and keys rotated by ``RotaryEmbedding`` from slices of one projection, values sliced from it.

    onnxruntime's ``GroupQueryAttention`` can take that projection whole with the rotary inside
    only for one row (on a first prompt it rotates token ``s`` of every row by table row ``s``),
    so graphopt's export keeps them apart for batches; the kernel reads ``position_ids`` for
    every row, so it takes them whole at any batch size.
    """
    if len(node.input) < 3 or not node.input[1] or not node.input[2]:
        return None
    rotations = [producers.get(name) for name in node.input[:2]]
    if any(r is None or r.op_type != "RotaryEmbedding" or r.domain != "com.microsoft" or len(r.input) != 4
           for r in rotations):
        return None
    query, key = rotations
    plain = {"interleaved": 0, "scale": 1.0}  # and num_heads; any other attribute (a partial rotary dim): apart
    if tuple(query.input[1:]) != tuple(key.input[1:]) or any(
            set(_attributes(r)) - {*plain, "num_heads"} or any(_attributes(r).get(k, v) != v for k, v in plain.items())
            for r in rotations):
        return None
    slices = [_last_axis_slice(producers.get(name), producers, initializers)
              for name in (query.input[0], key.input[0], node.input[2])]
    if any(piece is None for piece in slices) or len({piece[0] for piece in slices}) != 1:
        return None
    packed = slices[0][0]
    width = shapes.get(packed, ())[-1:]
    if not width or not isinstance(width[0], int) or width[0] % (heads + 2 * kv_heads):
        return None
    size = width[0] // (heads + 2 * kv_heads)
    ranges = [(start, min(end, width[0])) for _, start, end in slices]  # an end past the width: to the end
    if ranges != [(0, heads * size), (heads * size, (heads + kv_heads) * size), ((heads + kv_heads) * size, width[0])]:
        return None
    if len(shapes.get(query.input[1], ())) != 2:  # positions per token [B, S], as the kernel reads them
        return None
    replaced = (query, key, *(producers[name] for name in (query.input[0], key.input[0], node.input[2])))
    return _PackedRotary(packed, query.input[1], query.input[2], query.input[3], replaced)


def use_decode_attention(model: onnx.ModelProto) -> int:
    """Swap, in place, each node :func:`decode_attention_nodes` finds for ``graphopt.DecodeAttention``; how many.

    Where a node's queries and keys were rotated apart from slices of one packed projection
    (graphopt's export for batches), the kernel takes the projection whole and rotates inside
    (:func:`_packed_rotary`), and the slices and rotations nothing else reads leave the graph.
    """
    graph = model.graph
    shapes = value_shapes(graph)
    nodes = [node for node in graph.node if _eligible(node, shapes)]  # decode_attention_nodes, shapes read once
    producers = {name: node for node in graph.node for name in node.output if name}
    initializers = {t.name: t for t in graph.initializer}
    folded: list[onnx.NodeProto] = []
    for index, node in enumerate(nodes):
        attributes = _attributes(node)
        heads, kv_heads = int(attributes["num_heads"]), int(attributes["kv_num_heads"])
        head_size = _head_size(node, shapes)
        assert head_size is not None  # _eligible checked it
        scale = float(attributes.get("scale", 0.0)) or 1.0 / math.sqrt(head_size)
        stem = f"{node.name or 'gqa'}_graphopt_decode_attention_{index}"
        rotary = int(attributes.get("do_rotary", 0))
        inputs = [*node.input, *[""] * (_INPUTS - len(node.input))]
        packed = None if rotary else _packed_rotary(node, heads, kv_heads, producers, initializers, shapes)
        if packed is not None:
            inputs[:3] = [packed.packed, "", ""]
            inputs[7:10] = [packed.cos, packed.sin, packed.position_ids]
            rotary = 1
            folded.extend(packed.replaced)
        graph.initializer.extend([
            numpy_helper.from_array(np.array([heads, kv_heads, rotary], dtype=np.int64), f"{stem}_heads"),
            numpy_helper.from_array(np.array([scale], dtype=np.float32), f"{stem}_scale")])
        replacement = onnx.helper.make_node(DECODE_ATTENTION, [*inputs, f"{stem}_heads", f"{stem}_scale"],
                                            list(node.output), name=stem, domain=NATIVE_DOMAIN)
        node.CopyFrom(replacement)
    _remove_unread(graph, folded)
    if nodes and not any(opset.domain == NATIVE_DOMAIN for opset in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(NATIVE_DOMAIN, 1))
    return len(nodes)


def _remove_unread(graph: onnx.GraphProto, candidates: list[onnx.NodeProto]) -> None:
    """Remove those of ``candidates`` (known by their outputs) that nothing reads any more; chains go too."""
    removable = {node.output[0] for node in candidates if node.output}
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        unread = [index for index, node in enumerate(graph.node)
                  if node.output and node.output[0] in removable and not any(o in read for o in node.output)]
        if not unread:
            return
        for index in reversed(unread):
            del graph.node[index]


@contextmanager
def decode_attention_while(model: onnx.ModelProto) -> Iterator[int]:
    """``model`` with :func:`use_decode_attention` applied inside the block (yields how many), then as it was.

    For a session built inside the block when the model is too large to copy for it (a float
    decoder's weights): the nodes (a few hundred small messages), the constants they added and the
    opset come back as they were.
    """
    graph = model.graph
    nodes = [onnx.NodeProto() for _ in graph.node]
    for copy, node in zip(nodes, graph.node, strict=True):
        copy.CopyFrom(node)
    initializers, opsets = len(graph.initializer), len(model.opset_import)
    try:
        yield use_decode_attention(model)
    finally:
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[initializers:]
        del model.opset_import[opsets:]
