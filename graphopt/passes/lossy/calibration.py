"""Turning the user's calibration data (a DataLoader, a list of batches) into the graph's flat inputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from graphopt.errors import InputError
from graphopt.ir.capture import CapturedModel, flatten_inputs
from graphopt.report.progress import progress

__all__ = ["calibration_batches"]


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
    calibration: Iterable[Any] | None, captured: CapturedModel
) -> tuple[list[tuple[Any, ...]], list[str]]:
    """The calibration batches as flat graph inputs, and notes for the report.

    Batches whose shapes the graph cannot take (a DataLoader's smaller last batch on a graph
    with a static batch dim) are skipped and counted in a note; when none fits, ``InputError``
    says how to fix it.
    """
    if calibration is None:
        return [], []
    if isinstance(calibration, (torch.Tensor, Mapping)):
        raise InputError(
            "calibration must be an iterable of batches (a list of input tuples or a DataLoader), not a single "
            f"{type(calibration).__name__}; wrap one batch as [(x,)]"
        )
    signature = [(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else None for v in captured.flat_inputs]
    gm = captured.graph_module
    flats: list[tuple[Any, ...]] = []
    refused: list[str] = []
    for batch in progress(calibration, desc="reading calibration data"):
        args, kwargs = _as_call(batch, captured.example_kwargs)
        try:
            flat = flatten_inputs(gm, args, kwargs)
            captured.dynamic.check(flat, signature)
        except InputError as error:
            refused.append(str(error))
            continue
        flats.append(tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in flat))
    if refused and not flats:
        raise InputError(
            f"none of the {len(refused)} calibration batch(es) fits the graph: {refused[0]} "
            "Give batches shaped like the example inputs, or declare varying dims (dynamic_batch=True)."
        )
    notes = []
    if refused:
        notes.append(f"{len(refused)} calibration batch(es) skipped: their shapes do not fit the graph ({refused[0]})")
    if not flats:
        notes.append("the calibration data was empty")
    return flats, notes
