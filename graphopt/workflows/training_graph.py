"""The graph ``distill`` trains: the optimized graph with the dims its data varies in set free.

A model optimized for one batch size has that size baked into its graph. Training data come in
other sizes: a loader's batch (and its smaller last batch), sentences shorter than the example's.
``training_graph`` looks at the data's shapes and frees the dims that differ from the example
(always the batch dim, when the example's batch is 2 or more), with ``graphopt.ir.free_dims``.
Sizes a table was cut to (a position table, a causal mask) may only shrink below the example's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt.errors import InputError
from graphopt.ir.free_dims import free_dims
from graphopt.ir.shapes import DynamicDims

__all__ = ["TrainingGraph", "training_graph"]

BATCH = "batch"


@dataclass
class TrainingGraph:
    """A graph to train on batches of the data's shapes.

    ``frozen``: attributes that must not be trained (constants the graph reads only in part);
    ``freed``: the freed dims by name with their example size; ``limits``: the sizes per name
    that may not be exceeded.
    """

    graph_module: fx.GraphModule
    dynamic: DynamicDims
    signature: list[tuple[tuple[int, ...], torch.dtype] | None]
    frozen: frozenset[str] = frozenset()
    freed: dict[str, int] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)

    def check(self, inputs: tuple[Any, ...]) -> None:
        """Raise ``InputError`` when a batch does not fit the training graph."""
        try:
            self.dynamic.check(inputs, self.signature)
        except InputError as error:
            raise InputError(f"distill: a batch does not fit the model: {error}") from None

    def describe(self) -> str:
        """One line for the report: which dims vary in training."""
        if not self.freed:
            return "trained at the example's shapes"
        parts = [f"{name} (example {size}" + (f", at most {self.limits[name]})" if name in self.limits else ")")
                 for name, size in self.freed.items()]
        return "trained with free dims: " + ", ".join(parts)


def training_graph(graph: fx.GraphModule, example: Sequence[Any], dynamic: DynamicDims,
                   signature: list[tuple[tuple[int, ...], torch.dtype] | None],
                   samples: Sequence[tuple[Any, ...]]) -> TrainingGraph:
    """``graph`` with the batch dim and every dim the ``samples`` vary in freed.

    ``example``: the flat inputs it was optimized with; ``dynamic``: the dims already dynamic in
    it. When freeing only the batch dim fails and no sample needs it, the graph trains as it is.
    """
    wanted = _dims_to_free(example, dynamic, samples)
    if not wanted:
        return TrainingGraph(graph, dynamic, signature)
    try:
        freed = free_dims(graph, example, wanted)
    except InputError as error:
        if _only_precaution(wanted, example, samples):
            return TrainingGraph(graph, dynamic, signature)
        raise InputError(f"distill: the data's batches differ from the example in shape, and the optimized graph "
                         f"cannot follow: {error}") from None
    merged = DynamicDims([dict(per) for per in dynamic.dims] + [{} for _ in range(len(example) - len(dynamic.dims))],
                         dict(dynamic.ranges))
    sizes: dict[str, int] = {}
    for index, per_dim in wanted.items():
        merged.dims[index].update(per_dim)
        for dim, name in per_dim.items():
            sizes[name] = int(example[index].shape[dim])
    for name in sizes:
        merged.ranges[name] = (1, freed.bounds.get(name))
    return TrainingGraph(freed.graph_module, merged, signature, freed.fitted, sizes, dict(freed.bounds))


def _dims_to_free(example: Sequence[Any], dynamic: DynamicDims, samples: Sequence[tuple[Any, ...]]
                  ) -> dict[int, dict[int, str]]:
    wanted: dict[int, dict[int, str]] = {}
    for index, value in enumerate(example):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        already = dynamic.dims[index] if index < len(dynamic.dims) else {}
        per_dim: dict[int, str] = {}
        if value.shape[0] >= 2 and 0 not in already:
            per_dim[0] = BATCH
        for dim in range(1, value.dim()):
            if dim in already or value.shape[dim] < 2:
                continue
            if any(_size(sample, index, dim) not in (None, value.shape[dim]) for sample in samples):
                per_dim[dim] = f"dim{dim}_{value.shape[dim]}"
        if per_dim:
            wanted[index] = per_dim
    batch_sizes = {int(example[i].shape[0]) for i, d in wanted.items() if d.get(0) == BATCH}
    if len(batch_sizes) > 1:  # inputs of different leading sizes: only the most common one is the batch
        common = max(batch_sizes, key=lambda b: sum(int(example[i].shape[0]) == b for i in wanted))
        for i in list(wanted):
            if wanted[i].get(0) == BATCH and int(example[i].shape[0]) != common:
                del wanted[i][0]
                if not wanted[i]:
                    del wanted[i]
    return wanted


def _size(sample: tuple[Any, ...], index: int, dim: int) -> int | None:
    value = sample[index] if index < len(sample) else None
    return int(value.shape[dim]) if isinstance(value, torch.Tensor) and value.dim() > dim else None


def _only_precaution(wanted: dict[int, dict[int, str]], example: Sequence[Any],
                     samples: Sequence[tuple[Any, ...]]) -> bool:
    """Whether the dims asked for are only the batch dim and every sample has the example's batch size."""
    if any(dim != 0 for per_dim in wanted.values() for dim in per_dim):
        return False
    return all(_size(sample, index, 0) in (None, int(example[index].shape[0]))
               for sample in samples for index in wanted)
