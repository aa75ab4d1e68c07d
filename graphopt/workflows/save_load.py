"""The ``.pt2`` archive an optimized model is saved in: a torch.export program plus graphopt's metadata.

The file is torch.export's own archive: the optimized graph re-exported (with its dynamic
dims), its weights, and an extra ``graphopt.json`` entry holding the target, the input
signature, the dynamic dims and the report. Loading refuses every pickled payload: tensors
are read as raw data or through ``torch.load(weights_only=True)``, so no code from the file
ever runs.

This module reads and writes graphs and their metadata (``write_archive``, ``read_archive``);
it knows nothing of ``OptimizedModel``, which saves itself with ``write_archive`` and is built
back by ``graphopt.load`` (``graphopt.workflows.optimized_model``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

import graphopt.passes.fusion.decoder_ops  # registers the graphopt_decoder ops saved graphs call
import graphopt.passes.quantize.weight_ops  # noqa: F401 - registers the graphopt_weights ops saved graphs call
from graphopt.errors import GraphoptError, LoweringError, SaveFileError
from graphopt.ir.capture import flatten_inputs, unlift_program
from graphopt.ir.shapes import DynamicDims
from graphopt.report import Report
from graphopt.version import __version__

__all__ = [
    "FORMAT",
    "Archive",
    "import_output_modules",
    "load_program",
    "output_modules",
    "read_archive",
    "weights_only_loading",
    "write_archive",
]

FORMAT = "graphopt-optimized-model"
_METADATA = "graphopt.json"
_VERSION = 1


@dataclass
class Archive:
    """What a graphopt ``.pt2`` file holds, decoded: the graph, its example inputs and graphopt's metadata."""

    path: Path
    graph_module: fx.GraphModule
    example_args: tuple[Any, ...]
    example_kwargs: dict[str, Any]
    target: str
    dynamic: DynamicDims
    report: Report
    metadata: dict[str, Any]


def write_archive(path: str | Path, graph_module: fx.GraphModule, example_args: tuple[Any, ...],
                  example_kwargs: dict[str, Any], *, dynamic: DynamicDims, target: str, report: Report,
                  sections: dict[str, Any] | None = None) -> Path:
    """Re-export ``graph_module`` (weights on the CPU) with torch.export and write it to ``path`` with metadata.

    ``dynamic`` dims become ``Dim``s of the program; ``target`` (a target's name) and ``report``
    go into the ``graphopt.json`` entry, and so do ``sections``: more JSON data by key, for a
    workflow to store what it needs (``"generation"`` for a generation model; ``Archive.metadata``
    gives them back). Raises ``LoweringError`` when the graph cannot be re-exported.
    """
    path = Path(path)
    sections = dict(sections or {})
    spec = dynamic.spec_for("export", graph_module.forward, example_args, example_kwargs)
    try:
        program = torch.export.export(graph_module, example_args, example_kwargs, dynamic_shapes=spec, strict=False)
    except Exception as error:
        raise LoweringError(
            f"could not re-export the optimized graph for saving: {type(error).__name__}: {error}. "
            "Save the ONNX file instead (export_onnx), or report this as a graphopt bug."
        ) from error
    flat = flatten_inputs(graph_module, example_args, example_kwargs)
    metadata = {
        "format": FORMAT,
        "version": _VERSION,
        "graphopt": __version__,
        "torch": torch.__version__,
        "target": target,
        "dynamic": dynamic.to_dict(),
        "signature": [[list(v.shape), str(v.dtype)] if isinstance(v, torch.Tensor) else None for v in flat],
        "report": report.to_dict(),
        "output_modules": output_modules(graph_module),
    }
    clashing = sorted(metadata.keys() & sections.keys())
    if clashing:
        raise ValueError(f"metadata sections {clashing} would replace graphopt's own entries")
    metadata.update(sections)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path, extra_files={_METADATA: json.dumps(metadata)})
    return path


def output_modules(gm: fx.GraphModule) -> list[str]:
    """Modules whose classes structure the outputs (``transformers.modeling_outputs`` for a ModelOutput)."""
    packages: set[str] = set()
    pending = [getattr(gm, "_out_spec", None)]
    while pending:
        spec = pending.pop()
        if spec is None:
            continue
        module = getattr(spec.type, "__module__", "") or ""
        if spec.type is not None and module.split(".")[0] not in ("builtins", "collections", "torch", "typing"):
            packages.add(module)
        pending.extend(spec.children() if hasattr(spec, "children") else spec.children_specs)
    return sorted(packages)


def import_output_modules(metadata: dict[str, Any]) -> None:
    """Import the installed modules named in ``metadata["output_modules"]``, so their output pytrees are registered."""
    for name in metadata.get("output_modules", []):
        valid = isinstance(name, str) and all(part.isidentifier() for part in name.split("."))
        if valid and name not in sys.modules and find_spec(name.split(".")[0]) is not None:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Force every ``torch.load`` inside the block to ``weights_only=True`` (no pickled code runs)."""
    original = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = weights_only_load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]


def _read_metadata(path: Path) -> dict[str, Any]:
    """The graphopt metadata of the archive at ``path``; SaveFileError when it is not a graphopt save."""
    if not path.is_file():
        raise SaveFileError(f"{path}: no such file. Write one with fast.save({str(path)!r}).")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            entry = next((n for n in names if n.rsplit("/", 1)[-1] == _METADATA), None)
            if entry is None:
                raise SaveFileError(
                    f"{path} is not a graphopt save (it has no {_METADATA}); a plain torch.export file loads "
                    "with torch.export.load, an ONNX file with onnxruntime."
                )
            text = archive.read(entry).decode("utf-8")
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError) as error:
        if isinstance(error, SaveFileError):
            raise
        raise SaveFileError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {error}); save the model again"
        ) from error
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise SaveFileError(f"{path}: graphopt metadata is corrupt ({error}); save the model again") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise SaveFileError(f"{path} is not a graphopt save (its {_METADATA} has no graphopt format tag)")
    if metadata.get("version", 0) > _VERSION:
        raise SaveFileError(
            f"{path} was written by a newer graphopt (format {metadata['version']}, this one reads "
            f"{_VERSION}); upgrade graphopt"
        )
    return metadata


def load_program(path: Path) -> torch.export.ExportedProgram:
    """The torch.export program in the archive at ``path``, read with no pickled code run (``SaveFileError`` if bad)."""
    try:
        with weights_only_loading():
            return torch.export.load(path)
    except GraphoptError:
        raise
    except Exception as error:
        raise SaveFileError(
            f"{path} could not be read as a torch.export program ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). The file is corrupt, holds pickled objects "
            "(which graphopt never loads), or was written by an incompatible torch version "
            "(torch.export files are not portable across releases): save the model again."
        ) from error


def read_archive(path: str | Path) -> Archive:
    """Read a graphopt ``.pt2`` file: check it, import its output modules, load the graph and decode the metadata.

    Raises ``SaveFileError`` naming the file when it is missing, truncated, corrupt, not a
    graphopt save, or has incomplete metadata. No pickled code is executed.
    """
    path = Path(path)
    metadata = _read_metadata(path)
    import_output_modules(metadata)
    program = load_program(path)
    example_args, example_kwargs = program.example_inputs or ((), {})
    gm = unlift_program(program)
    del program
    try:
        report = Report.from_dict(metadata["report"])
        dynamic = DynamicDims.from_dict(metadata.get("dynamic", {}))
        target = metadata["target"]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise SaveFileError(f"{path}: graphopt metadata is incomplete ({type(error).__name__}: {error}); "
                            "save the model again") from error
    return Archive(path, gm, tuple(example_args), dict(example_kwargs), target, dynamic, report, metadata)
