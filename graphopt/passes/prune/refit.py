"""Least-squares refit: the layers that read pruned units learn to do without them.

Removing a neuron, channel or head removes its contribution from every layer that reads it (the
FFN's down projection, attention's output projection). Slicing alone drops that contribution,
mean included. Refitting instead solves, for each such *reader* on calibration inputs ``X``,

    min over W', b'  || X_kept W'^T + b' - (X W^T + b) ||^2

in closed form from the Gram matrix of ``[X, 1]`` (float64, a small ridge term): the kept inputs
take over what the removed ones carried where they are correlated, and the bias absorbs their
mean. The same statistics give the ``"fluctuation"`` importance: the variance of a unit's input
to its readers times the readers' weights on it, the output change its removal causes once the
bias has absorbed its mean.

Readers are linear layers and products whose stored 2-D weight's input dim shrinks
(``linear``, ``addmm``, ``mm``, ``matmul``) and pointwise convolutions (1x1 kernels, no padding,
one group: a linear layer over channels at every (strided) position), with a weight of their own. A reader whose input a
shrinking layer or RMS norm normalizes is left to slicing: its inputs change with the pruning, so
statistics of the original graph would not describe them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt.analysis.dependency import DependencyGraph, Group
from graphopt.ir.graph import attribute_value, constant_uses
from graphopt.ir.op_args import conv_arguments
from graphopt.passes.lossy.calibration import watch_values

__all__ = ["GRAM_BUDGET_BYTES", "MAX_READER_FEATURES", "Reader", "ReaderStatistics", "Refit", "collect_statistics",
           "find_readers", "fluctuation_scores", "refit_reader", "solve_refits"]

aten = torch.ops.aten

MAX_READER_FEATURES = 8192
"""Readers with more input features than this are sliced, not refit (the Gram matrix is features^2 float64)."""

GRAM_BUDGET_BYTES = 4 << 30
"""Memory the Gram matrices of one plan may take together; readers past it are sliced (a note says how many)."""

RIDGE = 1e-6
"""Ridge term of the refit, relative to the mean diagonal of the kept inputs' Gram matrix."""


@dataclass(frozen=True)
class Reader:
    """A layer whose weight's input dim pruning may shrink: what to refit and where its input comes from."""

    node: str  # the layer node's name
    weight: str  # get_attr target of the 2-D weight
    input_dim: int  # the weight's dim that multiplies the input features (1 for linear, 0 for addmm/mm)
    bias: str | None  # get_attr target of the bias added in the layer (addmm, linear), if any
    source: str  # name of the node whose output is the layer's input
    stride: tuple[int, ...] = ()  # a pointwise convolution's stride (its input is channels-first); () for linears

    @property
    def key(self) -> str:
        """What its input statistics are stored under: the source, and the positions a strided convolution reads."""
        return self.source + (f"@{'x'.join(map(str, self.stride))}" if self.stride else "")

    def rows(self, value: torch.Tensor) -> torch.Tensor:
        """The input ``value`` as ``[positions, features]``: what the layer multiplies by its weight."""
        if not self.stride:
            return value.reshape(-1, value.shape[-1])
        positions = tuple(slice(None, None, step) for step in self.stride)  # where a 1x1 kernel lands
        value = value[(slice(None), slice(None), *positions)]
        return value.movedim(1, -1).reshape(-1, value.shape[1])


_LAYOUTS = {
    # op: (index of the activation argument, index of the weight, the weight's input dim, index of the bias)
    aten.linear.default: (0, 1, 1, 2),
    aten.addmm.default: (1, 2, 0, 0),
    aten.mm.default: (0, 1, 0, None),
    aten.matmul.default: (0, 1, 0, None),
}


def find_readers(gm: fx.GraphModule, deps: DependencyGraph,
                 groups: Sequence[Group]) -> tuple[list[Reader], list[str]]:
    """The layers of ``gm`` reading units of ``groups`` whose weights a refit may replace, and notes on any left out."""
    wanted = {g.id for g in groups}
    normalized = {g.id for name in deps.shrinking_norms for g in deps.slot_groups(name, -1)}
    uses = constant_uses(gm)
    readers: list[Reader] = []
    too_wide = over_budget = 0
    budgeted: set[str] = set()  # statistics keys whose Gram matrix the budget holds
    total_bytes = 0
    for node in gm.graph.nodes:
        reader = _reader(gm, node, uses)
        if reader is None:
            continue
        shrinking = {g.id for g in deps.weight_groups(reader.weight, reader.input_dim)}
        if not shrinking & wanted or shrinking & normalized:
            continue
        features = deps.constant(reader.weight).shape[reader.input_dim]
        if features > MAX_READER_FEATURES:
            too_wide += 1
            continue
        size = (features + 1) ** 2 * 8
        if reader.key not in budgeted:
            if total_bytes + size > GRAM_BUDGET_BYTES:
                over_budget += 1
                continue
            budgeted.add(reader.key)
            total_bytes += size
        readers.append(reader)
    notes = []
    if too_wide:
        notes.append(f"{too_wide} layer(s) reading pruned units were sliced, not refit: more than "
                     f"{MAX_READER_FEATURES} input features")
    if over_budget:
        notes.append(f"{over_budget} layer(s) reading pruned units were sliced, not refit: their input statistics "
                     f"would pass {GRAM_BUDGET_BYTES >> 30} GiB")
    return readers, notes


def _reader(gm: fx.GraphModule, node: fx.Node, uses: dict[str, int]) -> Reader | None:
    """``node`` as a reader: a linear layer, product or pointwise convolution with a float weight of its own."""
    if node.op != "call_function":
        return None
    layout = _LAYOUTS.get(node.target)
    stride: tuple[int, ...] = ()
    if layout is not None:
        source_at, weight_at, input_dim, bias_at = layout
        if len(node.args) <= max(source_at, weight_at):
            return None
        source, weight = node.args[source_at], node.args[weight_at]
        bias = node.args[bias_at] if bias_at is not None and len(node.args) > bias_at else None
        dims = 2
    else:
        conv = conv_arguments(node)
        if conv is None or conv.transposed or conv.groups != 1 or isinstance(conv.padding, str) or any(conv.padding):
            return None
        source, weight, bias, input_dim, stride = conv.input, conv.weight, conv.bias, 1, tuple(conv.stride)
        dims = 2 + len(stride)
    value = attribute_value(gm, weight) if isinstance(weight, fx.Node) else None
    if not isinstance(source, fx.Node) or value is None or value.dim() != dims or not value.is_floating_point():
        return None
    if dims > 2 and any(size != 1 for size in value.shape[2:]):
        return None  # a kernel wider than one position mixes neighbours: not a linear map of one position's channels
    if uses.get(str(weight.target), 0) != 1:
        return None
    outputs = value.shape[0] if dims > 2 else value.shape[1 - input_dim]
    bias_value = attribute_value(gm, bias) if isinstance(bias, fx.Node) else None
    own_bias = (bias_value is not None and bias_value.dim() == 1 and uses.get(str(bias.target), 0) == 1
                and bias_value.shape[0] == outputs)
    return Reader(node.name, str(weight.target), input_dim, str(bias.target) if own_bias else None, source.name,
                  stride)


class ReaderStatistics:
    """Gram matrices of ``[x, 1]`` (float64) over every row of each reader's input, on calibration batches."""

    def __init__(self) -> None:
        self.grams: dict[str, torch.Tensor] = {}  # Reader.key -> (features + 1)^2

    def update(self, reader: Reader, value: torch.Tensor) -> None:
        """Add one more batch of the reader's input ``value``."""
        rows = reader.rows(value.detach()).double()
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)
        gram = rows.T @ rows
        if reader.key in self.grams:
            self.grams[reader.key] += gram
        else:
            self.grams[reader.key] = gram

    def mean_and_variance(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per input feature of the readers stored under ``key``: mean and variance over the calibration rows."""
        gram = self.grams[key]
        count = gram[-1, -1]
        mean = gram[-1, :-1] / count
        return mean, (gram.diagonal()[:-1] / count - mean.pow(2)).clamp_min(0.0)


@dataclass(frozen=True)
class _SourceWatcher:
    """Hands a source node's float values to the statistics of each reader of it (one per statistics key)."""

    readers: list[Reader]
    statistics: ReaderStatistics

    def update(self, value: torch.Tensor) -> None:
        """Add ``value`` to every reader's Gram matrix."""
        if value.is_floating_point():
            for reader in self.readers:
                self.statistics.update(reader, value)


def collect_statistics(gm: fx.GraphModule, readers: Iterable[Reader],
                       batches: Sequence[tuple[Any, ...]]) -> ReaderStatistics:
    """Run ``gm`` on ``batches`` (flat graph inputs) and gather the Gram matrix of every reader's input."""
    statistics = ReaderStatistics()
    by_key = {reader.key: reader for reader in readers}
    watched: dict[str, list[Reader]] = {}
    for reader in by_key.values():
        watched.setdefault(reader.source, []).append(reader)
    if watched:
        watch_values(gm, batches, {source: _SourceWatcher(group, statistics) for source, group in watched.items()},
                     f"pruning: input statistics of {len(by_key)} layer input(s)")
    return statistics


def _as_rows_out(weight: torch.Tensor, input_dim: int) -> torch.Tensor:
    """The weight as ``[outputs, inputs]`` (a pointwise convolution's ``[out, in, 1, ...]`` flattened)."""
    if weight.dim() > 2:
        return weight.reshape(weight.shape[0], weight.shape[1])
    return weight if input_dim == 1 else weight.T


def refit_reader(reader: Reader, statistics: ReaderStatistics, weight: torch.Tensor, bias: torch.Tensor | None,
                 kept_inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reader's weight (and bias) on ``kept_inputs`` alone, fitted to its original outputs.

    ``weight`` and ``bias`` are the original tensors; the weight comes back with its input dim
    cut to ``kept_inputs``, both in their dtypes. Without a bias the fit has no intercept.
    """
    gram = statistics.grams[reader.key]
    features = gram.shape[0] - 1
    rows_out = _as_rows_out(weight.detach(), reader.input_dim).double()
    columns = kept_inputs
    if bias is not None:
        rows_out = torch.cat([rows_out, bias.detach().double()[:, None]], dim=1)
        full = torch.arange(features + 1)
        columns = torch.cat([kept_inputs, torch.tensor([features])])
    else:
        full = torch.arange(features)
    kept_gram = gram.index_select(0, columns).index_select(1, columns)
    cross = gram.index_select(0, columns).index_select(1, full)
    ridge = RIDGE * kept_gram.diagonal().mean().clamp_min(1e-30)
    system = kept_gram + ridge * torch.eye(len(columns), dtype=gram.dtype)
    solution = torch.linalg.solve(system, cross @ rows_out.T).T  # [outputs, kept (+1)]
    new_weight = solution[:, : len(kept_inputs)]
    if weight.dim() > 2:
        new_weight = new_weight.reshape(weight.shape[0], len(kept_inputs), *weight.shape[2:])
    elif reader.input_dim == 0:
        new_weight = new_weight.T
    new_weight = new_weight.to(weight.dtype).contiguous()
    new_bias = solution[:, -1].to(bias.dtype).contiguous() if bias is not None else None
    return new_weight, new_bias


@dataclass
class Refit:
    """A reader's refit for one plan: new tensors by constant (all outputs, kept inputs), and the groups it needs."""

    reader: Reader
    groups: frozenset[int]  # the pruned groups in the reader's input dim: the refit holds when all are pruned
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def solve_refits(deps: DependencyGraph, readers: Sequence[Reader], statistics: ReaderStatistics,
                 kept_index: Callable[[str, int], torch.Tensor | None], pruned: set[int]) -> list[Refit]:
    """The refit of every reader whose inputs shrink, given ``kept_index(constant, dim)`` of the plan."""
    refits = []
    for reader in readers:
        if reader.key not in statistics.grams:
            continue
        weight = deps.constant(reader.weight)
        inputs = kept_index(reader.weight, reader.input_dim)
        if inputs is None or len(inputs) == weight.shape[reader.input_dim]:
            continue  # only its outputs shrink: slicing is exact
        bias = deps.constant(reader.bias) if reader.bias is not None else None
        new_weight, new_bias = refit_reader(reader, statistics, weight, bias, inputs)
        groups = frozenset(g.id for g in deps.weight_groups(reader.weight, reader.input_dim)) & pruned
        refit = Refit(reader, groups, {reader.weight: new_weight})
        if reader.bias is not None and new_bias is not None:
            refit.tensors[reader.bias] = new_bias
        refits.append(refit)
    return refits


def fluctuation_scores(deps: DependencyGraph, group: Group, readers: Sequence[Reader],
                       statistics: ReaderStatistics) -> torch.Tensor | None:
    """Per unit of ``group``: input variance x squared reader weights, summed over the readers; None without any."""
    by_weight = {(r.weight, r.input_dim): r for r in readers if r.key in statistics.grams}
    scores = torch.zeros(group.units, dtype=torch.float64)
    found = False
    for atom in deps.weight_atoms(group):
        reader = by_weight.get((atom.target, atom.dim))
        if reader is None:
            continue
        _, variance = statistics.mean_and_variance(reader.key)
        weight = _as_rows_out(deps.constant(reader.weight).detach(), reader.input_dim)
        energy = weight.narrow(1, atom.offset, atom.size).double().pow(2).sum(0) * variance.narrow(
            0, atom.offset, atom.size)  # per input feature of the atom
        scores += energy.reshape(group.units, -1).sum(1)
        found = True
    return scores if found else None
