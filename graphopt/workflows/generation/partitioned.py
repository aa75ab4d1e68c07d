"""Partitioned generation: a causal LM split into pipeline stages, each keeping its own layers' cache.

    parts = graphopt.partition(lm, (ids,), stages=2)     # a causal LM lands here
    parts.generate(ids, max_new_tokens=32)              # in this process, stage after stage
    parts.save("stages/")                               # then, one process per stage on torch.distributed:
    # torchrun --nproc-per-node 2 -m graphopt.pipeline stages/ --generate --inputs ids.pt --output out.pt

The step is captured and optimized as for ``graphopt.optimize`` (``build.trace_steps``: static
cache, verified exact passes, state lifted), then split by the ``partition`` pass. A lifted graph
keeps each piece of state (a layer's keys, values and fill counter) inside one stage: that stage
takes it and returns its new value (``StageInfo.state``), so a stage module is
``(*values from the previous stage, *its cache) -> (*values for the next stage, *its new cache)``
and only activations cross a cut. The split balances the measured time of a **decode step**
(what generation spends its time on) and, with ``memory_cap``, fits every stage's weights, cache
and activations under the cap.

A batch of ``B`` rows is generated as ``B / rows`` micro-batches of ``rows`` rows (the stages are
built for ``rows``; each micro-batch has its own cache in every stage), which is what lets a
pipeline of processes overlap: stage ``s`` works on one micro-batch while stage ``s + 1`` works
on the one before. ``report.throughput`` predicts the tokens per second of such a pipeline from
the measured stage times, the bytes crossing each cut and the link between processes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphopt.analysis.balanced_split import PartitionError
from graphopt.analysis.cost import count_parameters, profile_nodes
from graphopt.analysis.throughput import PipelineLink, ThroughputPrediction
from graphopt.errors import InputError, SaveFileError
from graphopt.ir.state import StateSpec
from graphopt.passes.base import Pass
from graphopt.passes.manager import PassManager
from graphopt.passes.split_stages import Partition, StageInfo, plan_boundaries, split_stages, stage_modules
from graphopt.version import __version__
from graphopt.workflows.generation.build import GraphStep, check_steps, example_prompt, trace_steps
from graphopt.workflows.generation.compression import GenerationCompression, StepCompression
from graphopt.workflows.generation.decoder import STEP_INPUTS, step_inputs
from graphopt.workflows.generation.loop import generate_with
from graphopt.workflows.generation.sampling import GenerationDefaults
from graphopt.workflows.stage_files import FORMAT, MANIFEST, VERSION, load_stage, read_manifest, save_stage
from graphopt.workflows.stage_report import (
    PartitionReport,
    fill_stage_reports,
    median_stage_seconds,
    stage_section,
)

__all__ = ["INITIAL_STATE", "PROMPT_IDS", "PartitionedGenerator", "PartitionedSteps", "is_generation_manifest",
           "partition_for_generation"]

INITIAL_STATE = "initial_state.pt"
"""The saved stages' initial state values that are not all zeros (index -> tensor)."""
PROMPT_IDS = "prompt_ids.pt"
"""The example prompt ids, saved beside the stages (``--inputs`` for a first run)."""


class PartitionedSteps:
    """:class:`~graphopt.workflows.generation.loop.DecoderSteps` over :class:`CachedStage` s, one after the other.

    A call of ``B`` rows runs as ``B / rows`` micro-batches, each with its own cache in every stage.
    """

    host_threads = None

    def __init__(self, stages: Sequence[CachedStage], rows: int, max_cache_len: int) -> None:
        self.stages = list(stages)
        self.batch_size, self.max_cache_len = rows, max_cache_len

    def reset(self) -> None:
        """Empty every micro-batch's cache."""
        for stage in self.stages:
            stage.reset()

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
             ) -> torch.Tensor:
        batch, rows = input_ids.shape[0], self.batch_size
        if batch % rows:
            raise InputError(f"the stages were built for micro-batches of {rows} row(s); a batch of {batch} rows does "
                             f"not split into them. Generate a multiple of {rows} rows, or partition with an example "
                             f"of {batch} rows")
        logits = []
        with torch.inference_mode():
            for micro in range(batch // rows):
                values: tuple[Any, ...] = tuple(t[micro * rows:(micro + 1) * rows]
                                                for t in (input_ids, attention_mask, position_ids))
                for stage in self.stages:
                    values = stage.run(micro, values)
                logits.append(values[0])
        return torch.cat(logits)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
                ) -> torch.Tensor:
        """Write the prompts into the stages' caches; the last position's logits."""
        return self._run(input_ids, attention_mask, position_ids)

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
               ) -> torch.Tensor:
        """One token per row through the stages; the next-token logits."""
        return self._run(input_ids, attention_mask, position_ids)

    def stage_arguments(self, values: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Each stage's arguments (values, then its empty cache) when ``values`` enter the first; nothing is kept."""
        arguments = []
        with torch.inference_mode():
            for stage in self.stages:
                state = stage.empty_state()
                arguments.append((*values, *state))
                values, _ = run_stage(stage.stage, values, state)
        return arguments


def run_stage(stage: nn.Module, values: Sequence[Any], state: Sequence[torch.Tensor]
              ) -> tuple[tuple[Any, ...], list[torch.Tensor]]:
    """Call a stage of a split step on ``values`` and its ``state``; the values it passes on and its new state."""
    out = stage(*values, *state)
    kept = len(out) - len(state)
    return tuple(out[:kept]), list(out[kept:])


class CachedStage(nn.Module):
    """One stage of a split decoder step keeping its cache, one per micro-batch.

    :meth:`run` steps micro-batch ``micro`` through the stage. Called as a module (what a
    ``torch.distributed.pipelining.PipelineStage`` does) it takes ``(*values, rows)`` and returns
    ``(*values passed on, rows)``: ``rows`` (each micro-batch's row indexes in the batch) travels
    with the values, so the stage knows whose cache a micro-batch uses, whatever order a schedule
    runs micro-batches in.
    """

    def __init__(self, stage: nn.Module, initial: Sequence[torch.Tensor], rows: int,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.stage = stage
        self.device = device or torch.device("cpu")
        self._initial = [t.to(self.device) for t in initial]
        self._rows = rows
        self._state: dict[int, list[torch.Tensor]] = {}
        self.shape_run_next = False

    def reset(self) -> None:
        """Empty every micro-batch's cache."""
        self._state.clear()

    def empty_state(self) -> list[torch.Tensor]:
        """A fresh copy of the stage's empty cache."""
        return [t.clone() for t in self._initial]

    def run(self, micro: int, values: Sequence[Any]) -> tuple[Any, ...]:
        """Step micro-batch ``micro`` through the stage with its cache; keep the new cache, return the values."""
        state = self._state.get(micro) or self.empty_state()
        out, self._state[micro] = run_stage(self.stage, values, state)
        return out

    def forward(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the stage on one micro-batch (told apart by its ``rows``, the last value) with its cache."""
        *inputs, rows = values
        if self.shape_run_next:
            return self._shape_run(inputs, rows)
        out = self.run(int(rows[0]) // self._rows, inputs)
        return (*(o.contiguous() for o in out), rows)  # sent as they are: gloo sends contiguous tensors only

    def _shape_run(self, inputs: Sequence[torch.Tensor], rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Outputs of the right shapes and dtypes, computed on fake tensors: no cache is read or written.

        A new pipeline schedule calls its stage once on placeholder tensors (uninitialized on all
        but the first rank) to learn the shapes it sends; that call must leave the cache alone.
        """
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.shape_run_next = False
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(t) for t in (*inputs, *self._initial)]
            out, _ = run_stage(self.stage, fake[:len(inputs)], fake[len(inputs):])
        return (*(torch.empty(o.shape, dtype=o.dtype, device=self.device) for o in out), rows)


class PartitionedGenerator(nn.Module):
    """A causal LM split into pipeline stages that generate together (what ``graphopt.partition`` returns for one).

    ``stages`` holds one ``fx.GraphModule`` per stage (its weights only), ``held[s]`` the state
    (cache) stage ``s`` keeps, ``rows`` the rows of one micro-batch, ``report`` the
    ``PartitionReport`` (stage times of a decode step, weights, cache, cut bytes, predicted
    pipelined tokens per second). ``generate`` works like transformers' and ``GenerativeModel``'s.
    """

    def __init__(self, stages: Sequence[nn.Module], infos: Sequence[StageInfo] | None, held: Sequence[Sequence[int]],
                 state: Sequence[StateSpec], initial: Sequence[torch.Tensor], *, rows: int, microbatches: int,
                 max_cache_len: int, defaults: GenerationDefaults, report: PartitionReport,
                 example_ids: torch.Tensor) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.held = [list(h) for h in held]
        self.state = list(state)
        self.rows, self.microbatches, self.max_cache_len = rows, microbatches, max_cache_len
        self.defaults = defaults
        self.report = report
        self.example_ids = example_ids
        self._infos = list(infos) if infos is not None else None
        self._initial = list(initial)
        self.steps = PartitionedSteps([CachedStage(stage, [self._initial[i] for i in h], rows)
                                       for stage, h in zip(self.stages, self.held, strict=True)], rows, max_cache_len)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, attention_mask: torch.Tensor | None = None,
                 do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, min_new_tokens: int = 0, streamer: Any = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Generate through the stages in this process, like ``GenerativeModel.generate``.

        The batch must be a multiple of ``rows`` (each ``rows`` rows are one micro-batch).
        """
        return generate_with(self.steps, self.defaults, input_ids, max_new_tokens, attention_mask, do_sample,
                             temperature, top_k, top_p, eos_token_id, pad_token_id, min_new_tokens, streamer, generator)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The next-token logits ``[batch, vocab]`` after each (left-padded) prompt."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self.steps.reset()
        logits = self.steps.prefill(*step_inputs(input_ids.long(), mask.long(), self.max_cache_len))
        self.steps.reset()
        return logits

    @property
    def manifest(self) -> dict[str, Any]:
        """Plain data describing the stages and what ``generate`` needs (written by ``save``)."""
        stages = []
        for index, stage in enumerate(self.stages):
            placeholders = [n.name for n in stage.graph.nodes if n.op == "placeholder"]
            entry: dict[str, Any] = {"index": index, "file": f"stage_{index}.pt2", "state": self.held[index],
                                     "inputs": placeholders[:len(placeholders) - len(self.held[index])],
                                     "parameters": count_parameters(stage)}
            if self._infos is not None:
                entry["outputs"] = self._infos[index].outputs
            stages.append(entry)
        return {
            "format": FORMAT, "version": VERSION, "graphopt": __version__, "torch": torch.__version__,
            "stages": stages, "inputs": list(STEP_INPUTS),
            "generation": {
                "rows": self.rows, "microbatches": self.microbatches, "max_cache_len": self.max_cache_len,
                "state": [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype).removeprefix("torch.")}
                          for s in self.state],
                "defaults": self.defaults.to_dict(),
            },
            "report": self.report.to_dict(),
        }

    def save(self, directory: str | Path) -> Path:
        """Write one torch.export ``.pt2`` per stage, ``manifest.json`` and the initial state into ``directory``.

        ``torchrun --nproc-per-node N -m graphopt.pipeline DIRECTORY --generate --inputs ids.pt``
        generates with one process per stage; ``PartitionedGenerator.load(DIRECTORY)`` loads
        them back into one process.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        prompt = example_prompt(self.example_ids, self.rows, self.max_cache_len)
        arguments = self.steps.stage_arguments(step_inputs(prompt, torch.ones_like(prompt), self.max_cache_len))
        for index, (stage, args) in enumerate(zip(self.stages, arguments, strict=True)):
            save_stage(stage, args, directory, index)
        nonzero = {i: t for i, t in enumerate(self._initial) if bool(t.count_nonzero())}
        torch.save(nonzero, directory / INITIAL_STATE)
        torch.save(self.example_ids, directory / PROMPT_IDS)  # a ready --inputs file
        (directory / MANIFEST).write_text(json.dumps(self.manifest, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> PartitionedGenerator:
        """The stages saved in ``directory``, chained in this process (no pickled code runs)."""
        manifest = read_manifest(directory)
        if not is_generation_manifest(manifest):
            raise InputError(f"{directory} holds the stages of a one-shot model, not of a generator: load it with "
                             "graphopt.workflows.partition.load_stages")
        generation = manifest["generation"]
        modules = [load_stage(directory, i, manifest) for i in range(len(manifest["stages"]))]
        state, initial = saved_state(directory, manifest)
        report = PartitionReport.from_dict(manifest["report"])
        prompt = Path(directory) / PROMPT_IDS
        example_ids = (torch.load(prompt, weights_only=True) if prompt.is_file()
                       else torch.zeros(generation["rows"], 2, dtype=torch.long))
        return cls(modules, None, [s["state"] for s in manifest["stages"]], state, initial,
                   rows=generation["rows"], microbatches=generation["microbatches"],
                   max_cache_len=generation["max_cache_len"],
                   defaults=GenerationDefaults.from_dict(generation["defaults"]), report=report,
                   example_ids=example_ids)


def is_generation_manifest(manifest: dict[str, Any]) -> bool:
    """True for the manifest of a partitioned generator (its stages keep a cache), False for a one-shot model's."""
    return "generation" in manifest


def saved_state(directory: str | Path, manifest: dict[str, Any]) -> tuple[list[StateSpec], list[torch.Tensor]]:
    """The state specs of saved generation stages and their initial values (zeros unless saved otherwise)."""
    path = Path(directory) / INITIAL_STATE
    if not path.is_file():
        raise SaveFileError(f"{path}: no such file; copy the whole stage directory, or save the stages again")
    nonzero = torch.load(path, weights_only=True)
    specs, initial = [], []
    for index, entry in enumerate(manifest["generation"]["state"]):
        spec = StateSpec(entry["name"], tuple(entry["shape"]), getattr(torch, entry["dtype"]))
        specs.append(spec)
        initial.append(nonzero[index] if index in nonzero else torch.zeros(spec.shape, dtype=spec.dtype))
    return specs, initial


# ---------------------------------------------------------------------------------------------- partition


def _microbatches(batch: int, stages: int, asked: int | None) -> int:
    if asked is None:
        return max(m for m in range(1, min(stages, batch) + 1) if batch % m == 0)
    if asked < 1 or batch % asked:
        raise InputError(f"microbatches={asked} must divide the example batch of {batch} rows (each micro-batch is "
                         "batch / microbatches rows)")
    return asked


def partition_for_generation(
    model: nn.Module, input_ids: torch.Tensor, stages: int, *, passes: list[Pass], max_cache_len: int,
    balance: str = "time", memory_cap: float | None = None, microbatches: int | None = None, repeats: int = 7,
    tolerance: float = 0.02, link: PipelineLink | None = None, compression: GenerationCompression | None = None,
) -> PartitionedGenerator:
    """Split causal LM ``model`` into ``stages`` pipeline stages that generate together.

    ``input_ids`` ``[batch, prompt]``: the batch generated at once, cut into ``microbatches``
    micro-batches (default: as many as stages that divide the batch). ``balance`` equalizes the
    stages' decode-step time (``"time"``), FLOPs, weights or memory; ``memory_cap`` bounds every
    stage's weights + cache + peak activations (bytes). ``passes`` run on the step before the
    split (verified); the split itself is verified too, and the stages' greedy tokens checked
    against the unsplit step graph. ``link`` (default ``PipelineLink()``) prices the hops in the
    throughput prediction. ``compression`` compresses the weights within its language budget before
    the split, as ``graphopt.optimize`` does; the stages keep them compressed and expand each
    layer's weights as it runs (memory is what a partition is for).
    """
    if stages < 1:
        raise PartitionError(f"stages must be at least 1, got {stages}")
    batch = int(input_ids.shape[0])
    count = _microbatches(batch, stages, microbatches)
    rows = batch // count
    report = PartitionReport(target="partition", balance_key=balance)
    traced = trace_steps(model, input_ids, rows, max_cache_len, passes, report,
                         compression=StepCompression(compression) if compression is not None else None)
    lifted = traced.lifted
    gm = lifted.graph_module
    one = step_inputs(traced.prompt[:, :1], torch.ones_like(traced.prompt[:, :1]), max_cache_len)
    decode_args = (*one, *lifted.initial)
    seconds = profile_nodes(gm, decode_args, repeats=repeats) if balance == "time" else None
    items, boundaries, costs = plan_boundaries(gm, stages, balance, seconds=seconds, memory_cap=memory_cap,
                                               tolerance=tolerance)
    infos = split_stages(gm, items, boundaries)
    names = tuple(items.nodes[i].name for i in boundaries[1:])
    prefill_args = (*traced.example, *lifted.initial)
    chain = PassManager([Partition(stages=stages, balance=balance, boundaries=names)], on_error="raise").run(
        gm, prefill_args, report)
    modules = stage_modules(chain)
    held = [info.state for info in infos]
    parts = PartitionedGenerator(modules, infos, held, lifted.state, lifted.initial, rows=rows, microbatches=count,
                                 max_cache_len=max_cache_len, defaults=GenerationDefaults.of(model), report=report,
                                 example_ids=input_ids)
    decode = parts.steps.stage_arguments(one)
    measured = median_stage_seconds(modules, decode, max(2 * repeats, 11))
    fill_stage_reports(report, modules, infos, items, boundaries, costs, measured)
    received = [_received(args, h) for args, h in zip(decode, held, strict=True)]
    for stage_report, values in zip(report.stages, received, strict=True):
        stage_report.input_bytes = sum(t.numel() * t.element_size() for t in values)
    report.cut_bytes = [stage_report.input_bytes for stage_report in report.stages[1:]]
    report.throughput, predictions = _predictions(measured, received[1:], count, batch, link or PipelineLink())
    report.sections.append(stage_section(report, predictions))
    check_steps(parts.steps, GraphStep(lifted, rows, max_cache_len), traced.prompt, report, "partition",
                against="the unsplit step graph")
    report.notes.append(f"generation: {stages} stages, each keeping its layers' cache; a batch of {batch} rows runs "
                        f"as {count} micro-batch(es) of {rows}; stage times are one decode step's, measured with "
                        f"{torch.get_num_threads()} thread(s); the throughput prediction gives every stage cores of "
                        "its own (ranks sharing cores run slower: 4 ranks on 2 cores measured 1.3-1.6x below it)")
    report.notes.extend(f"stage {index} keeps the cache of {_cache_owners(lifted.state, h)}"
                        for index, h in enumerate(held))
    return parts


def _cache_owners(state: Sequence[StateSpec], held: Sequence[int]) -> str:
    """``layers 3-7`` for a decoder's per-layer cache (``cache_<layer>_<field>``), else the state's names."""
    names = [state[i].name.split("_") for i in held]
    if names and all(len(n) > 2 and n[0] == "cache" and n[1].isdigit() for n in names):
        layers = sorted({int(n[1]) for n in names})
        return f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
    return ", ".join("_".join(n) for n in names) or "no state"


def _received(args: Sequence[Any], held: Sequence[int]) -> list[torch.Tensor]:
    """The tensors a stage receives (its arguments without its own cache)."""
    return [v for v in args[:len(args) - len(held)] if isinstance(v, torch.Tensor)]


STEP_MESSAGES = 4
"""Messages the driving (last) rank sends before each step: the broadcast of what comes, and the step's three
inputs to rank 0 (``graphopt.workflows.distributed_generation``)."""


def _predictions(seconds: Sequence[float], received: Sequence[Sequence[torch.Tensor]], microbatches: int, batch: int,
                 link: PipelineLink) -> tuple[ThroughputPrediction, list[ThroughputPrediction]]:
    """Decode throughput (tokens/s = rows/s) of the pipeline, for its micro-batches and for 1, 2, 4, 8 of them.

    Every micro-batch has the rows the stages were built for, so stage times hold for any count.
    A hop carries the values a stage receives plus the micro-batch's row indexes; each step also
    costs the driver's messages.
    """
    rows = batch // microbatches
    cut_bytes = [sum(t.numel() * t.element_size() for t in values) + 8 * rows for values in received]
    cut_tensors = [len(values) + 1 for values in received]
    step_overhead = STEP_MESSAGES * link.latency if received else 0.0
    counts = sorted({m for m in (1, 2, 4, 8) if m <= microbatches * 4} | {microbatches})
    predictions = [link.predict(seconds, cut_bytes, count, rows * count, cut_tensors, step_overhead)
                   for count in counts]
    return predictions[counts.index(microbatches)], predictions
