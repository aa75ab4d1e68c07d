"""Calibration data from the command line: a ``.npz`` file of inputs, or a Python factory.

``graphopt optimize model.py:build --quantize int8 --calibration data.npz`` reads one array per
model input (in the file's order), samples along dim 0, and cuts them into batches of the
example's batch size; ``--calibration data.py:make_batches`` calls ``make_batches()``, which
returns an iterable of input tuples (a DataLoader works).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt.cli.factory import load_factory
from graphopt.errors import InputError

__all__ = ["load_calibration", "npz_batches"]


def _example_tensors(example_inputs: Any) -> list[torch.Tensor]:
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if len(tensors) != len(inputs):
        raise InputError("--calibration FILE.npz needs example inputs that are all tensors; use a Python factory "
                         "(--calibration data.py:make_batches) for other inputs")
    return tensors


def npz_batches(path: str | Path, example_inputs: Sequence[Any]) -> list[tuple[torch.Tensor, ...]]:
    """Cut the arrays of ``path`` (one per model input, samples on dim 0) into example-sized batches.

    Each array is converted to its example input's dtype. Samples that do not fill a last
    batch are dropped (the graph may be fixed to the example's batch size); fewer samples
    than one batch is an ``InputError``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"calibration file {path} does not exist")
    examples = _example_tensors(example_inputs)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = [archive[name] for name in archive.files]
            names = list(archive.files)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read calibration file {path} as a NumPy .npz archive: {error}") from error
    if len(arrays) != len(examples):
        raise InputError(f"{path} holds {len(arrays)} array(s) ({', '.join(names)}) but the model takes "
                         f"{len(examples)} input(s): save one array per input, in the order the model takes them")
    samples = {a.shape[0] if a.ndim else 0 for a in arrays}
    if len(samples) != 1:
        raise InputError(f"the arrays of {path} hold different numbers of samples on dim 0 "
                         f"({', '.join(f'{n}: {a.shape}' for n, a in zip(names, arrays, strict=True))})")
    for name, array, example in zip(names, arrays, examples, strict=True):
        if array.ndim != example.dim() or tuple(array.shape[1:]) != tuple(example.shape[1:]):
            raise InputError(f"calibration array {name!r} has shape {array.shape}; the model's example input has "
                             f"shape {tuple(example.shape)} (samples on dim 0, the other dims must match)")
    total = samples.pop()
    batch = examples[0].shape[0] if examples[0].dim() else 1
    if total < batch:
        raise InputError(f"{path} holds {total} sample(s), fewer than one batch of the example's size ({batch})")
    tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(e.dtype) for a, e in zip(arrays, examples, strict=True)]
    return [tuple(t[start:start + batch] for t in tensors) for start in range(0, total - batch + 1, batch)]


def load_calibration(spec: str, example_inputs: Sequence[Any]) -> Any:
    """The calibration batches named on the command line: ``FILE.npz`` or ``FILE.py:FACTORY``."""
    if spec.endswith(".npz"):
        return npz_batches(spec, example_inputs)
    if ":" in spec:
        factory = load_factory(spec)
        data = factory() if callable(factory) else factory
        if not hasattr(data, "__iter__"):
            raise InputError(f"{spec} returned {type(data).__name__}; it must return an iterable of input tuples")
        return data
    raise InputError(f"--calibration {spec!r}: give a .npz file (one array per input) or FILE.py:FACTORY")
