"""Partition stages on disk: one torch.export ``.pt2`` per stage plus ``manifest.json``.

``PartitionedModel.save`` and partitioned generation's ``save`` write this layout;
``graphopt.workflows.distributed`` (``torchrun ... -m graphopt.pipeline DIR``) and
``load_stages`` read it back with :func:`read_manifest` and :func:`load_stage`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from graphopt.analysis.balanced_split import PartitionError
from graphopt.errors import LoweringError, SaveFileError
from graphopt.ir.capture import unlift_program
from graphopt.workflows.save_load import load_program

__all__ = ["EXAMPLE_INPUTS", "FORMAT", "MANIFEST", "VERSION", "load_stage", "read_manifest", "save_stage",
           "stage_dynamic_shapes"]

MANIFEST = "manifest.json"
EXAMPLE_INPUTS = "example_inputs.pt"
FORMAT = "graphopt-pipeline-stages"
VERSION = 1


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a stage directory written by ``PartitionedModel.save`` (SaveFileError when absent/bad)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise SaveFileError(f"{path}: no such file; write the stages with parts.save({str(directory)!r})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SaveFileError(f"{path} is corrupt ({error}); save the stages again") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SaveFileError(f"{path} is not a graphopt stage manifest")
    if manifest.get("version", 0) > VERSION:
        raise SaveFileError(f"{path} was written by a newer graphopt; upgrade graphopt")
    return manifest


def load_stage(directory: str | Path, index: int, manifest: dict[str, Any] | None = None) -> fx.GraphModule:
    """Load stage ``index`` of a saved partition (no pickled code runs: weights are read weights_only)."""
    manifest = manifest or read_manifest(directory)
    entries = manifest["stages"]
    if not 0 <= index < len(entries):
        raise PartitionError(f"stage {index} does not exist: {directory} holds {len(entries)} stages")
    path = Path(directory) / entries[index]["file"]
    if not path.is_file():
        raise SaveFileError(f"{path}: stage file missing (stage {index} of {len(entries)}); copy the whole stage "
                            "directory, or write it again with parts.save(...)")
    return unlift_program(load_program(path))


def stage_dynamic_shapes(stage: fx.GraphModule, args: Sequence[Any]) -> tuple[Any, ...]:
    """torch.export dynamic shapes for a stage: the dims recorded as symbolic on its placeholders."""
    specs = []
    placeholders = [n for n in stage.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, args, strict=True):
        val = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not isinstance(val, torch.Tensor):
            specs.append(None)
            continue
        dims = {d: torch.export.Dim.AUTO for d, size in enumerate(val.shape) if isinstance(size, torch.SymInt)}
        specs.append(dims or None)
    return tuple(specs)


def save_stage(stage: fx.GraphModule, args: tuple[Any, ...], directory: Path, index: int,
               dynamic: bool = True) -> None:
    """Export stage ``index`` with torch.export on ``args`` and write it as ``stage_<index>.pt2`` in ``directory``.

    ``dynamic``: keep the dims recorded as symbolic on its inputs (``stage_dynamic_shapes``). Raises
    ``LoweringError`` when torch.export fails.
    """
    dynamic_shapes = stage_dynamic_shapes(stage, args) if dynamic else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(stage, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as error:
        raise LoweringError(f"could not export stage {index} with torch.export: {type(error).__name__}: "
                            f"{str(error).splitlines()[0]}") from error
    torch.export.save(program, directory / f"stage_{index}.pt2")
