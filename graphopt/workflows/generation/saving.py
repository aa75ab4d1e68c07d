"""Saving a generation model in graphopt's ``.pt2`` archive and reading it back, lowered for a target.

What is saved per batch size is the verified, state-lifted step graph (``BuiltSteps.lifted``:
``(input_ids, attention_mask, position_ids, *state) -> (logits, *new_state)``, before any target
lowering), written with :func:`~graphopt.workflows.save_load.write_archive` like a one-shot
model: its example inputs are the prefill step's inputs followed by the **initial (empty) state**,
and its dynamic dims the step's sequence length (1 to ``max_cache_len``). The archive's
``graphopt.json`` gets a ``"generation"`` section (:data:`SECTION`) with what ``generate`` needs
besides the graph: ``max_cache_len``, the batch size, the state's names, shapes and dtypes, how
many outputs come before the state, and the eos / pad ids and sampling defaults.

An archive holds one program, so each batch size is its own file: the first batch size built
goes in the file asked for (``lm.pt2``), every other one beside it (``lm.batch4.pt2``), listed in
the first file's section (``batch_sizes``, ``files``). Each file is a complete save of its batch
size. Reading lowers every graph again for the chosen target with the same helper a fresh build
uses (:func:`~graphopt.workflows.generation.build.lower_steps`) and checks the lowered steps
against the saved graph itself over a few greedy steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graphopt.errors import SaveFileError, StateError
from graphopt.ir.state import LiftedState, StateSpec, relift_state
from graphopt.report import Report
from graphopt.targets.base import Target
from graphopt.targets.common.weight_only_kernels import has_weight_only_ops
from graphopt.workflows.generation.build import (
    LOWERED_MIN_COSINE,
    BuiltSteps,
    GraphStep,
    check_steps,
    lower_steps,
)
from graphopt.workflows.generation.decoder import STEP_INPUTS
from graphopt.workflows.generation.sampling import GenerationDefaults
from graphopt.workflows.save_load import Archive, read_archive, write_archive

__all__ = ["SECTION", "SavedSteps", "batch_path", "is_generation", "read_generation", "write_generation"]

SECTION = "generation"
"""The key of the generation section in a ``.pt2`` file's graphopt metadata."""


@dataclass
class SavedSteps:
    """A generation save read back: the steps per batch size, lowered for ``target``, and what ``generate`` needs."""

    built: dict[int, BuiltSteps]
    max_cache_len: int
    defaults: GenerationDefaults
    report: Report
    path: Path


def batch_path(path: Path, batch_size: int) -> Path:
    """Where the steps for another ``batch_size`` are saved beside ``path``: ``lm.pt2`` -> ``lm.batch4.pt2``."""
    return path.with_name(f"{path.stem}.batch{batch_size}{path.suffix}")


def is_generation(metadata: dict[str, Any]) -> bool:
    """True when the metadata of a ``.pt2`` file is that of a generation model."""
    return isinstance(metadata.get(SECTION), dict)


# --- writing --------------------------------------------------------------------------------------------------------


def _section(built: BuiltSteps, max_cache_len: int, defaults: GenerationDefaults) -> dict[str, Any]:
    """The generation section of one batch size's file."""
    lifted = built.lifted
    return {
        "batch_size": built.steps.batch_size,
        "max_cache_len": max_cache_len,
        "inputs": list(STEP_INPUTS),
        "state": [{"name": spec.name, "shape": list(spec.shape), "dtype": str(spec.dtype).removeprefix("torch.")}
                  for spec in lifted.state],
        "num_outputs": lifted.num_outputs,
        "defaults": defaults.to_dict(),
        "weight_fallback": built.weight_fallback,
    }


def _write_steps(path: Path, built: BuiltSteps, section: dict[str, Any], target: str, report: Report) -> Path:
    """One batch size's step graph, its example inputs and initial state, and ``section``, written to ``path``."""
    lifted = built.lifted
    args = (*built.example, *(t.detach().cpu().clone() for t in lifted.initial))
    return write_archive(path, lifted.graph_module, args, {}, dynamic=built.dynamic, target=target, report=report,
                         sections={SECTION: section})


def write_generation(path: str | Path, built: dict[int, BuiltSteps], *, target: str, report: Report,
                     max_cache_len: int, defaults: GenerationDefaults) -> Path:
    """Write the step graphs of every batch size in ``built`` (at least one) at ``path``; return ``path``.

    The first batch size goes in ``path``, the others in :func:`batch_path` files beside it,
    which ``path``'s section lists. Raises ``LoweringError`` when a graph cannot be re-exported.
    """
    path = Path(path)
    first, *others = built
    files = {}
    for batch_size in others:
        section = _section(built[batch_size], max_cache_len, defaults)
        files[str(batch_size)] = _write_steps(batch_path(path, batch_size), built[batch_size], section, target,
                                              report).name
    section = {**_section(built[first], max_cache_len, defaults), "batch_sizes": list(built), "files": files}
    return _write_steps(path, built[first], section, target, report)


# --- reading --------------------------------------------------------------------------------------------------------


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def _state(section: dict[str, Any]) -> list[StateSpec]:
    return [StateSpec(str(s["name"]), tuple(int(d) for d in s["shape"]), _dtype(s["dtype"])) for s in section["state"]]


def _incomplete(path: Path, error: Exception) -> SaveFileError:
    return SaveFileError(f"{path}: the generation metadata is incomplete ({type(error).__name__}: {error}); "
                         "save the model again")


def _lifted_graph(archive: Archive, section: dict[str, Any]) -> tuple[LiftedState, tuple[torch.Tensor, ...]]:
    """The archive's graph as a ``LiftedState`` with its initial state, and the prefill example inputs."""
    try:
        state = _state(section)
        num_outputs = int(section["num_outputs"])
    except (KeyError, TypeError, ValueError) as error:
        raise _incomplete(archive.path, error) from error
    args = archive.example_args
    if len(args) != len(STEP_INPUTS) + len(state) or not all(isinstance(a, torch.Tensor) for a in args):
        raise SaveFileError(f"{archive.path}: the saved step has {len(args)} example inputs, not the "
                            f"{len(STEP_INPUTS)} step inputs and {len(state)} state tensors its metadata lists; "
                            "save the model again")
    example, initial = tuple(args[: len(STEP_INPUTS)]), [t.clone() for t in args[len(STEP_INPUTS):]]
    try:
        lifted = relift_state(archive.graph_module, state, initial, num_outputs)
        with torch.no_grad():
            lifted.graph_module(*example, *[t.clone() for t in initial])
    except Exception as error:
        kind = "does not fit its metadata" if isinstance(error, StateError) else "fails on its own example inputs"
        raise SaveFileError(f"{archive.path}: the saved step graph {kind}: {error}") from error
    return lifted, example


def _steps(archive: Archive, section: dict[str, Any], target: Target, report: Report) -> BuiltSteps:
    """One file's step graph, lowered for ``target`` and checked against the graph itself.

    Weight-only kernels start where ``optimize``'s budget left them (``weight_fallback``: the first
    lowering down ``Target.exact_weight_lowering`` with that label), then go on down to kernels
    exact to the graph or rounding within a bound: a loaded model has no float model to judge
    others by its budget.
    """
    lifted, example = _lifted_graph(archive, section)
    graph = lifted.graph_module
    compressed = has_weight_only_ops(graph)
    fallback = section.get("weight_fallback") if compressed else None
    step: Target | None = target
    while fallback is not None and step is not None and step.label() != fallback:
        step = step.exact_weight_lowering()
    if step is not None and step is not target:
        report.notes.append(f"compressed weights loaded: steps lowered as '{fallback}', where optimize's budget "
                            "left them")
        target = step
    exact = target
    while compressed and not exact.weight_kernels_round_within_bound(graph) \
            and (more := exact.exact_weight_lowering()) is not None:
        exact = more
    if exact is not target:
        report.notes.append(f"compressed weights loaded: steps lowered as '{exact.lowering.label()}', exact to the "
                            "saved graph (a loaded model has no float model to hold less exact weight kernels, int8 "
                            "activations or PyTorch's bfloat16 int8/int4 kernels, to its budget); target='cpu' runs "
                            "onnxruntime's compressed kernels")
        target = exact
    bounded = compressed and target.weight_kernels_round_within_bound(graph)
    started = time.perf_counter()
    steps = lower_steps(lifted, example, archive.dynamic, target, None)
    lowering = time.perf_counter() - started
    started = time.perf_counter()
    reference = GraphStep(lifted, steps.batch_size, steps.max_cache_len)
    check_steps(steps, reference, example[0], report, target.name, against="the saved step graph",
                min_cosine=LOWERED_MIN_COSINE if bounded else None)  # graphopt's kernels: rounding within a bound
    seconds = {"lowering": lowering, "check": time.perf_counter() - started}
    return BuiltSteps(steps, lifted, example, archive.dynamic, seconds, fallback)


def _batch_archive(path: Path, name: str, batch_size: int, max_cache_len: int) -> tuple[Archive, dict[str, Any]]:
    """The file ``name`` listed beside ``path`` for ``batch_size`` rows, read and checked to belong to it."""
    other = path.with_name(Path(name).name)
    if not other.is_file():
        raise SaveFileError(f"{path} keeps the steps for batch size {batch_size} in {other.name}, which is missing: "
                            "keep the files save() wrote together, or save the model again")
    archive = read_archive(other)
    section = archive.metadata.get(SECTION) if is_generation(archive.metadata) else {}
    if (section.get("batch_size"), section.get("max_cache_len")) != (batch_size, max_cache_len):
        raise SaveFileError(f"{other} is not the batch-size-{batch_size} save that {path.name} lists; "
                            "save the model again")
    return archive, section


def read_generation(archive: Archive, target: Target) -> SavedSteps:
    """The generation model saved in ``archive`` (and the files beside it), lowered for ``target``.

    Raises ``SaveFileError`` naming the file when the metadata is incomplete, a listed file is
    missing or does not belong, or a graph does not run on its example; ``VerificationError``
    when the lowered steps differ from the saved graph.
    """
    section = archive.metadata[SECTION]
    try:
        max_cache_len = int(section["max_cache_len"])
        batch_size = int(section["batch_size"])
        defaults = GenerationDefaults.from_dict(section["defaults"])
        files = {int(size): str(name) for size, name in section.get("files", {}).items()}
    except (KeyError, TypeError, ValueError) as error:
        raise _incomplete(archive.path, error) from error
    report = archive.report
    built = {batch_size: _steps(archive, section, target, report)}
    for size, name in files.items():
        other, other_section = _batch_archive(archive.path, name, size, max_cache_len)
        built[size] = _steps(other, other_section, target, report)
    return SavedSteps(built, max_cache_len, defaults, report, archive.path)
