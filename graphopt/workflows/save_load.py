"""Save an optimized model as a torch.export ``.pt2`` file with graphopt's metadata, and load it back.

The file is torch.export's own archive: the optimized graph re-exported (with its dynamic
dims), its weights, and an extra ``graphopt.json`` entry holding the target, the input
signature, the dynamic dims and the report. Loading refuses every pickled payload: tensors
are read as raw data or through ``torch.load(weights_only=True)``, so no code from the file
ever runs.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import zipfile
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree

from graphopt.errors import GraphoptError, LoweringError, SaveFileError
from graphopt.ir.capture import CapturedModel, flatten_inputs, unlift_program
from graphopt.ir.graph import run_and_record
from graphopt.ir.shapes import DynamicDims
from graphopt.report import Report
from graphopt.targets.base import LoweringContext, get_target
from graphopt.version import __version__

if TYPE_CHECKING:
    from graphopt.workflows.optimize import OptimizedModel

__all__ = ["FORMAT", "load", "save_optimized"]

FORMAT = "graphopt-optimized-model"
_METADATA = "graphopt.json"
_VERSION = 1


def save_optimized(model: OptimizedModel, path: str | Path) -> Path:
    """Write ``model`` (the result of ``graphopt.optimize``) to ``path`` as a ``.pt2`` archive."""
    path = Path(path)
    gm = model._cpu_graph()
    args, kwargs = model._example_args, model._example_kwargs
    dynamic_shapes = model.dynamic.spec_for("export", gm.forward, args, kwargs)
    try:
        program = torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as error:
        raise LoweringError(
            f"could not re-export the optimized graph for saving: {type(error).__name__}: {error}. "
            "Save the ONNX file instead (export_onnx), or report this as a graphopt bug."
        ) from error
    metadata = {
        "format": FORMAT,
        "version": _VERSION,
        "graphopt": __version__,
        "torch": torch.__version__,
        "target": model.target.name,
        "dynamic": model.dynamic.to_dict(),
        "signature": [None if s is None else [list(s[0]), str(s[1])] for s in model._signature],
        "report": model.report.to_dict(),
        "output_modules": _output_modules(gm),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path, extra_files={_METADATA: json.dumps(metadata)})
    return path


def _output_modules(gm: torch.fx.GraphModule) -> list[str]:
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


def _import_output_modules(metadata: dict[str, Any]) -> None:
    """Import the installed modules that define the output classes, so their pytree types are registered."""
    for name in metadata.get("output_modules", []):
        valid = isinstance(name, str) and all(part.isidentifier() for part in name.split("."))
        if valid and name not in sys.modules and find_spec(name.split(".")[0]) is not None:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)


@contextlib.contextmanager
def _weights_only_loading() -> Iterator[None]:
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


def _load_program(path: Path) -> torch.export.ExportedProgram:
    import graphopt.passes.quantize.weight_ops  # noqa: F401 - registers the graphopt_weights ops saved graphs call
    try:
        with _weights_only_loading():
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


def load(path: str | Path, target: str | None = None) -> OptimizedModel:
    """Load a model written by ``OptimizedModel.save``, lowered to its target (or to ``target``).

    Raises ``SaveFileError`` naming the file when it is missing, truncated, corrupt or not a
    graphopt save. No pickled code is executed. When the outputs are classes of an installed
    package (a transformers ``ModelOutput``), that package is imported so their structure
    can be rebuilt.
    """
    from graphopt.workflows.optimize import OptimizedModel

    path = Path(path)
    metadata = _read_metadata(path)
    _import_output_modules(metadata)
    program = _load_program(path)
    example_args, example_kwargs = program.example_inputs or ((), {})
    gm = unlift_program(program)
    del program
    flat_inputs = flatten_inputs(gm, tuple(example_args), dict(example_kwargs))
    try:
        outputs, _ = run_and_record(gm, flat_inputs)
    except Exception as error:
        raise SaveFileError(f"{path}: the loaded graph fails on its own example inputs: {error}") from error
    try:
        report = Report.from_dict(metadata["report"])
        dynamic = DynamicDims.from_dict(metadata.get("dynamic", {}))
        saved_target = metadata["target"]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise SaveFileError(f"{path}: graphopt metadata is incomplete ({type(error).__name__}: {error}); "
                            "save the model again") from error
    chosen = get_target(target or saved_target)
    chosen.check_available()
    captured = CapturedModel(
        graph_module=gm,
        example_args=tuple(example_args),
        example_kwargs=dict(example_kwargs),
        flat_inputs=flat_inputs,
        reference_outputs=pytree.tree_leaves(outputs),
        notes=[],
        dynamic=dynamic,
    )
    runner = chosen.lower(gm, LoweringContext.from_captured(captured))
    return OptimizedModel(gm, runner, chosen, report, captured)
