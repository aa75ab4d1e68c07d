"""Calibration data: the user's batches (a DataLoader, a list) as flat graph inputs, and running the graph on them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.fx as fx

from graphopt.errors import InputError
from graphopt.ir.capture import CapturedModel, flatten_inputs
from graphopt.report.progress import progress

__all__ = ["ValueWatcher", "calibration_batches", "watch_values"]


class ValueWatcher(Protocol):
    """What :func:`watch_values` hands a watched node's tensor to (an int8 range observer, a pruning statistic)."""

    def update(self, value: torch.Tensor) -> None:
        """Take one more value of the watched node."""
        ...


class _Watching(fx.Interpreter):
    """Runs a graph and hands the tensor value of each watched node to its watcher."""

    def __init__(self, gm: fx.GraphModule, watchers: Mapping[str, ValueWatcher]) -> None:
        super().__init__(gm)
        self.watchers = watchers

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        watcher = self.watchers.get(n.name)
        if watcher is not None and isinstance(result, torch.Tensor):
            watcher.update(result)
        return result


def watch_values(gm: fx.GraphModule, batches: Sequence[tuple[Any, ...]], watchers: Mapping[str, ValueWatcher],
                 desc: str) -> None:
    """Run ``gm`` on every batch (flat graph inputs) without gradients, updating ``watchers`` by node name.

    Shows progress as ``desc``.
    """
    interpreter = _Watching(gm, watchers)
    with torch.no_grad():
        for batch in progress(batches, desc=desc, total=len(batches)):
            interpreter.run(*batch)


def _as_call(batch: Any, example_kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One calibration item as call arguments: a tensor, a tuple/list of inputs, or a dict of keyword inputs."""
    if example_kwargs and not isinstance(batch, Mapping):
        raise InputError(
            f"the model was optimized with keyword inputs ({', '.join(example_kwargs)}), so each calibration batch "
            f"must be a dict holding them (and the positional inputs, in order, under other keys); got "
            f"{type(batch).__name__}"
        )
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        positional = tuple(v for k, v in batch.items() if k not in example_kwargs) if example_kwargs else ()
        if example_kwargs:
            return positional, {k: v for k, v in batch.items() if k in example_kwargs}
        return tuple(batch.values()), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise InputError(
        f"calibration batches must be input tuples (like example_inputs), tensors or dicts of keyword inputs; got "
        f"{type(batch).__name__}. Pass e.g. [(x1,), (x2,)] or a DataLoader that yields input tuples."
    )


def calibration_batches(
    calibration: Iterable[Any] | None, captured: CapturedModel, what: str = "calibration"
) -> tuple[list[tuple[Any, ...]], list[str]]:
    """The calibration batches as flat graph inputs, and notes for the report.

    ``what`` names the data in messages (``"validation"`` for held-out batches).

    Batches that differ from the example only in their batch size (a DataLoader's, on a graph
    with a static batch dim) are regrouped into batches of the example's size. Batches whose
    shapes the graph cannot take otherwise are skipped and counted in a note; when none fits,
    ``InputError`` says how to fix it.
    """
    if calibration is None:
        return [], []
    if isinstance(calibration, (torch.Tensor, Mapping)):
        raise InputError(
            f"{what} must be an iterable of batches (a list of input tuples or a DataLoader), not a single "
            f"{type(calibration).__name__}; wrap one batch as [(x,)]"
        )
    signature = [(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None for v in captured.flat_inputs]
    gm = captured.graph_module
    flats: list[tuple[Any, ...]] = []
    refused: list[str] = []
    other_batch_size: list[tuple[Any, ...]] = []
    for batch in progress(calibration, desc=f"reading {what} data"):
        args, kwargs = _as_call(batch, captured.example_kwargs)
        try:
            flat = tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in flatten_inputs(gm, args, kwargs))
        except InputError as error:
            refused.append(str(error))
            continue
        try:
            captured.dynamic.check(flat, signature)
        except InputError as error:
            if _differs_in_batch_only(flat, signature, captured):
                other_batch_size.append(flat)
            else:
                refused.append(str(error))
            continue
        flats.append(flat)
    notes = []
    if other_batch_size:
        rebatched = _rebatch(other_batch_size, signature)
        flats.extend(rebatched)
        samples = sum(_batch_size(f) for f in other_batch_size)
        notes.append(f"{len(other_batch_size)} {what} batch(es) of another batch size ({samples} samples) were "
                     f"regrouped into {len(rebatched)} batch(es) of the example's size {_batch_size(rebatched[0])}"
                     + (" (repeating samples to fill one)" if samples < _batch_size(rebatched[0]) else ""))
    if refused and not flats:
        raise InputError(
            f"none of the {len(refused)} {what} batch(es) fits the graph: {refused[0]} "
            "Give batches shaped like the example inputs, or declare varying dims (dynamic_batch=True)."
        )
    if refused:
        notes.append(f"{len(refused)} {what} batch(es) skipped: their shapes do not fit the graph ({refused[0]})")
    if not flats:
        notes.append(f"the {what} data was empty")
    return flats, notes


def _batch_size(flat: tuple[Any, ...]) -> int:
    return next(int(v.shape[0]) for v in flat if isinstance(v, torch.Tensor) and v.dim() > 0)


def _differs_in_batch_only(flat: tuple[Any, ...], signature: list[tuple[tuple[int, ...], torch.dtype] | None],
                           captured: CapturedModel) -> bool:
    """Whether a batch fits the graph but for its batch size (dim 0 of every tensor input, static in the graph)."""
    if len(flat) != len(signature) or any(0 in (d or {}) for d in captured.dynamic.dims):
        return False
    sizes = set()
    for value, want in zip(flat, signature, strict=True):
        if want is None:
            continue
        if not isinstance(value, torch.Tensor) or value.dtype != want[1] or value.dim() != len(want[0]):
            return False
        if value.dim() == 0 or tuple(value.shape[1:]) != tuple(want[0][1:]):
            return False
        sizes.add(int(value.shape[0]))
    example_sizes = {want[0][0] for want in signature if want is not None and want[0]}
    return len(sizes) == 1 and len(example_sizes) == 1


def _rebatch(flats: list[tuple[Any, ...]], signature: list[tuple[tuple[int, ...], torch.dtype] | None]
             ) -> list[tuple[Any, ...]]:
    """Batches of another batch size, concatenated and cut into batches of the example's size.

    The samples that do not fill a last batch are dropped, unless there are too few for one: then
    they are repeated until one batch is full.
    """
    size = next(want[0][0] for want in signature if want is not None and want[0])
    columns = [torch.cat([f[i] for f in flats]) if want is not None else flats[0][i]
               for i, want in enumerate(signature)]
    total = next(int(c.shape[0]) for c, want in zip(columns, signature, strict=True) if want is not None)
    if total < size:
        repeats = -(-size // total)
        columns = [torch.cat([c] * repeats)[:size] if want is not None else c
                   for c, want in zip(columns, signature, strict=True)]
        total = size
    return [tuple(c[start:start + size] if want is not None else c for c, want in zip(columns, signature, strict=True))
            for start in range(0, total - size + 1, size)]
