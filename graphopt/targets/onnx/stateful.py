"""ONNX models that carry state from call to call: named inputs/outputs, and a session runner that keeps it in place.

A state-lifted graph (``graphopt.ir.state``) exports as ``(inputs..., state...) -> (outputs...,
new_state...)``. :func:`rename_io` gives such a model readable input and output names (a
decoder's ``past_key_values.0.key`` / ``present.0.key``). :class:`StatefulOnnxRunner` runs it
with onnxruntime's IO binding: every input is bound by its tensor's address (no copy), and each
new state is written straight into a preallocated torch tensor of a pool of two that the runner
alternates between, so a generation loop's key/value cache never goes through numpy and no
state buffer is allocated per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import onnx
import torch

from graphopt.errors import LoweringError
from graphopt.targets.onnx.export import OnnxRuntimeModule

__all__ = ["StatefulOnnxRunner", "in_place_state", "rename_io"]


def _rename_everywhere(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename value ``old`` to ``new`` in ``graph``'s nodes (and in their subgraphs), value infos and outputs."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs]:
                _rename_everywhere(sub, old, new)
    for info in [*graph.value_info, *graph.output]:
        if info.name == old:
            info.name = new


def _rename_output(graph: onnx.GraphProto, index: int, new: str, inputs: set[str]) -> None:
    """Give output ``index`` the name ``new``: its producer's value renamed, or an ``Identity`` for a pass-through."""
    old = graph.output[index].name
    if old == new:
        return
    produced = any(old in node.output for node in graph.node)
    repeated = sum(o.name == old for o in graph.output) > 1
    if produced and not repeated and old not in inputs:
        _rename_everywhere(graph, old, new)
        return
    graph.node.append(onnx.helper.make_node("Identity", [old], [new], name=f"output_{new}"))
    graph.output[index].name = new


def rename_io(model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
    """``model`` (changed in place, and returned) with its graph inputs and outputs renamed, in order.

    Raises ``LoweringError`` when the counts differ from the model's or a name repeats.
    """
    graph = model.graph
    if len(inputs) != len(graph.input) or len(outputs) != len(graph.output):
        raise LoweringError(f"the ONNX model has {len(graph.input)} inputs and {len(graph.output)} outputs; "
                            f"{len(inputs)} and {len(outputs)} names were given")
    if len(set(inputs) | set(outputs)) != len(inputs) + len(outputs):
        raise LoweringError("input and output names must be distinct")
    clashes = {v.name for v in graph.value_info} | {o for n in graph.node for o in n.output}
    taken = clashes - {i.name for i in graph.input} - {o.name for o in graph.output}
    if taken & (set(inputs) | set(outputs)):
        raise LoweringError(f"names already used inside the model: {sorted(taken & (set(inputs) | set(outputs)))}")
    for info, new in zip(graph.input, inputs, strict=True):
        if info.name != new:
            _rename_everywhere(graph, info.name, new)
            info.name = new
    for index, new in enumerate(outputs):
        _rename_output(graph, index, new, set(inputs))
    return model


_IN_PLACE_OPS: dict[tuple[str, str], dict[int, int]] = {
    ("", "ScatterND"): {0: 0},
    ("", "ScatterElements"): {0: 0},
    ("com.microsoft", "GroupQueryAttention"): {3: 1, 4: 2},
}
"""Ops whose onnxruntime CPU kernel writes an output into the buffer of an input (input index -> output index)
when both are bound to it: the scatters skip copying their data, ``GroupQueryAttention`` shares its
past and present key/value buffers."""


def in_place_state(model: onnx.ModelProto, count: int) -> list[bool]:
    """Which of the last ``count`` inputs may have their new value (the matching output) written into them.

    True where the input's only reader is one of ``_IN_PLACE_OPS`` reading it at an in-place
    position whose matching output is the graph's matching output: the kernel updates the buffer
    where both are bound to it, and nothing else reads the old value (a key/value cache gets its
    new positions written, nothing copied).
    """
    graph = model.graph
    inputs, outputs = [i.name for i in graph.input][-count:], [o.name for o in graph.output][-count:]
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)
    result = []
    for past, present in zip(inputs, outputs, strict=True):
        nodes = readers.get(past, [])
        node = nodes[0] if len(nodes) == 1 else None
        pairs = _IN_PLACE_OPS.get(("" if node is None or node.domain == "ai.onnx" else node.domain,
                                   "" if node is None else node.op_type), {})
        result.append(node is not None and list(node.input).count(past) == 1 and any(
            node.input[i] == past and len(node.output) > o and node.output[o] == present for i, o in pairs.items()))
    return result


_CACHED_BINDINGS = 4
"""IO bindings a runner keeps, one per set of state buffers it was called with."""

_TORCH_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
                 "tensor(double)": torch.float64, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
                 "tensor(bool)": torch.bool}
"""onnxruntime's type names of the outputs a runner allocates itself."""


@cache
def _numpy_dtype(dtype: torch.dtype) -> Any:
    return torch.empty(0, dtype=dtype).numpy().dtype


class StatefulOnnxRunner:
    """Runs an :class:`OnnxRuntimeModule` whose last ``count`` inputs are state, its last ``count`` outputs the new one.

    Called like the module (``runner(*inputs, *state)`` returns ``(*outputs, *new_state)``), it
    binds every input by address. Each new state tensor is written into the state tensor passed in
    where that is safe (``in_place_state``: a key/value cache updated by ``ScatterND``), else into
    one of two preallocated torch tensors, the one the given state is not in. The state passed in
    is donated: the caller feeds the returned state back on the next call and keeps neither. The
    other outputs (a decoder's logits) are returned as fresh tensors.
    """

    runs_outside_torch = True
    """Its work runs on onnxruntime's threads, not torch's (a generation loop keeps torch to one thread)."""

    def __init__(self, module: OnnxRuntimeModule, count: int, in_place: bool = True) -> None:
        self.module = module
        self.session = module.session
        self.count = count
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        if count < 1 or count > min(len(self.input_names), len(self.output_names)):
            raise LoweringError(f"the model has {len(self.input_names)} inputs and {len(self.output_names)} outputs: "
                                f"it cannot carry {count} state tensors")
        self.in_place = in_place_state(module.model, count) if in_place else [False] * count
        self._pools: list[list[torch.Tensor]] = []
        self._bindings: dict[tuple[Any, ...], tuple[Any, list[torch.Tensor]]] = {}
        outputs = self.session.get_outputs()[:len(self.output_names) - count]
        self._output_shapes = [list(o.shape) for o in outputs]
        self._output_dtypes = [_TORCH_DTYPES.get(o.type) for o in outputs]
        if None in self._output_dtypes:
            self._output_shapes = [[None] for _ in outputs]  # unknown dtype: let onnxruntime allocate
        self._input_dims = {dim: (position, axis) for position, i in enumerate(self.session.get_inputs())
                            for axis, dim in enumerate(i.shape) if isinstance(dim, str)}

    def _pool_for(self, state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The preallocated set of state tensors that shares no memory with ``state``."""
        if not self._pools or any(p.shape != s.shape or p.dtype != s.dtype for p, s in zip(self._pools[0], state,
                                                                                            strict=True)):
            self._pools = [[torch.empty_like(s, memory_format=torch.contiguous_format) for s in state]
                           for _ in range(2)]
        used = {s.data_ptr() for s in state}
        return next(pool for pool in self._pools if not used & {t.data_ptr() for t in pool})

    def _new_state(self, state: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Where each new state tensor goes: the old one (in place) or a tensor of the free pool."""
        pool = self._pool_for(state)
        return [old if same else fresh for old, fresh, same in zip(state, pool, self.in_place, strict=True)]

    def _state_binding(self, state: Sequence[torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
        """An IO binding with ``state`` and the new state bound (made once per set of state buffers), and the new state.

        A generation loop alternates between two sets of state buffers (the in-place ones stay),
        so binding the hundred-odd state tensors of a decoder is done twice per batch of prompts
        instead of on every token.
        """
        key = tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in state)
        cached = self._bindings.get(key)
        if cached is not None:
            return cached
        binding = self.session.io_binding()
        for name, tensor in zip(self.input_names[-self.count:], state, strict=True):
            binding.bind_input(name, "cpu", 0, _numpy_dtype(tensor.dtype), list(tensor.shape), tensor.data_ptr())
        new_state = self._new_state(state)
        for name, tensor in zip(self.output_names[-self.count:], new_state, strict=True):
            binding.bind_output(name, "cpu", 0, _numpy_dtype(tensor.dtype), list(tensor.shape), tensor.data_ptr())
        if len(self._bindings) >= _CACHED_BINDINGS:
            self._bindings.pop(next(iter(self._bindings)))
        self._bindings[key] = (binding, new_state)
        return binding, new_state

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run one call: ``(*inputs, *state) -> (*outputs, *new_state)``."""
        if len(args) != len(self.input_names):
            raise LoweringError(f"the ONNX model takes {len(self.input_names)} tensors, got {len(args)}")
        tensors = [t if t.is_contiguous() and not t.requires_grad else t.detach().contiguous() for t in args]
        binding, new_state = self._state_binding(tensors[-self.count:])
        for name, tensor in zip(self.input_names[:-self.count], tensors, strict=False):
            binding.bind_input(name, "cpu", 0, _numpy_dtype(tensor.dtype), list(tensor.shape), tensor.data_ptr())
        outputs = [self._output_tensor(index, tensors) for index in range(len(self.output_names) - self.count)]
        for name, tensor in zip(self.output_names, outputs, strict=False):
            if tensor is None:
                binding.bind_output(name, "cpu")
            else:
                binding.bind_output(name, "cpu", 0, _numpy_dtype(tensor.dtype), list(tensor.shape), tensor.data_ptr())
        self.session.run_with_iobinding(binding)
        if any(tensor is None for tensor in outputs):
            values = binding.get_outputs()
            outputs = [torch.from_numpy(values[i].numpy()) if t is None else t for i, t in enumerate(outputs)]
        return (*outputs, *new_state)

    def _output_tensor(self, index: int, inputs: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """A fresh tensor for non-state output ``index`` when its shape follows from the inputs', else None."""
        shape = []
        for dim in self._output_shapes[index]:
            if isinstance(dim, int):
                shape.append(dim)
            elif dim in self._input_dims:
                position, axis = self._input_dims[dim]
                shape.append(int(inputs[position].shape[axis]))
            else:
                return None
        return torch.empty(shape, dtype=self._output_dtypes[index])
