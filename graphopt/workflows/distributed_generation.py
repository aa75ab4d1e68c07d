r"""Generate with saved generation stages on torch.distributed.pipelining, one stage per process.

    torchrun --nproc-per-node 2 -m graphopt.pipeline stages/ --generate --inputs ids.pt --max-new-tokens 32 \\
        --output out.pt

Each rank loads its stage (written by ``PartitionedGenerator.save``) and keeps its layers' cache,
one per micro-batch (``partitioned.CachedStage``). Every step (the prompt, then each token) is one
``ScheduleGPipe`` step over ``torch.distributed.pipelining.PipelineStage`` s: the batch is cut into
micro-batches, so stage ``s`` works on one micro-batch while stage ``s + 1`` works on the one
before. The last rank drives: it reads ``ids.pt`` (``input_ids``, or ``(input_ids,
attention_mask)``), runs graphopt's generation loop (``loop.run_generation``: the same padding,
stopping and sampling rules as in one process) on the logits its stage returns, and before
every step tells the others what comes (a broadcast) and hands rank 0 the step's inputs. It writes
the prompt plus the new ids to ``out.pt`` and, with ``--timing``, the decode speed as JSON. gloo
on CPU; with CUDA, rank ``r`` on ``cuda:<local rank>`` over NCCL (``--device cpu`` forces gloo).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from graphopt.analysis.balanced_split import PartitionError
from graphopt.errors import InputError
from graphopt.targets.gpu.target import retarget_device_constants
from graphopt.workflows.generation.loop import generate_with
from graphopt.workflows.generation.partitioned import CachedStage, is_generation_manifest, saved_state
from graphopt.workflows.generation.sampling import GenerationDefaults
from graphopt.workflows.stage_files import load_stage, read_manifest

__all__ = ["run_generation_pipeline"]

_STOP, _STEP = 0, 1


class _Pipeline:
    """The stage of this rank on torch.distributed.pipelining: one GPipe schedule per step shape."""

    def __init__(self, stage: CachedStage, rank: int, world: int, device: torch.device) -> None:
        self.stage, self.rank, self.world, self.device = stage, rank, world, device
        self._schedules: dict[tuple[int, int], Any] = {}

    def step(self, batch: int, length: int, microbatches: int, inputs: tuple[torch.Tensor, ...] = ()) -> Any:
        """One schedule step; rank 0 gives the step's inputs, the last rank gets the merged outputs."""
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        key = (batch, length)
        if key not in self._schedules:  # a schedule learns its stages' shapes on its first step
            stage = PipelineStage(self.stage, self.rank, self.world, self.device)
            self._schedules[key] = ScheduleGPipe(stage, n_microbatches=microbatches)
            self.stage.shape_run_next = True
        schedule = self._schedules[key]
        with torch.no_grad():
            return schedule.step(*inputs) if self.rank == 0 else schedule.step()


class _DriverSteps:
    """The last rank's :class:`~graphopt.workflows.generation.loop.DecoderSteps`: each call is one pipeline step.

    Before a step it broadcasts ``(STEP, batch, length, reset)`` and sends rank 0 the step's
    inputs; its own stage's merged outputs give the logits. Decode steps are timed.
    """

    host_threads = None

    def __init__(self, pipeline: _Pipeline, rows: int, max_cache_len: int) -> None:
        self.pipeline, self.rows, self.max_cache_len = pipeline, rows, max_cache_len
        self.batch_size = rows
        self._reset = True
        self.decode_seconds: list[float] = []
        self.prefill_seconds = 0.0

    def reset(self) -> None:
        """The next step starts from empty caches (on every rank)."""
        self._reset = True

    def _step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
              ) -> torch.Tensor:
        import torch.distributed as dist

        batch, length = input_ids.shape
        if batch % self.rows:
            raise InputError(f"the stages were built for micro-batches of {self.rows} row(s): a batch of {batch} rows "
                             "does not split into them")
        device = self.pipeline.device
        dist.broadcast(torch.tensor([_STEP, batch, length, int(self._reset)], device=device),
                       src=self.pipeline.world - 1)
        if self._reset:
            self.pipeline.stage.reset()
        self._reset = False
        inputs = tuple(t.to(device) for t in (input_ids, attention_mask, position_ids, torch.arange(batch)))
        if self.pipeline.rank == 0:
            outputs = self.pipeline.step(batch, length, batch // self.rows, inputs)
        else:
            for tensor in inputs[:3]:
                dist.send(tensor.contiguous(), dst=0)
            outputs = self.pipeline.step(batch, length, batch // self.rows)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's time covers its kernels, not only their launch
        return outputs[0] if isinstance(outputs, (tuple, list)) else outputs

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
                ) -> torch.Tensor:
        """The prompt through the pipeline."""
        started = time.perf_counter()
        logits = self._step(input_ids, attention_mask, position_ids)
        self.prefill_seconds = time.perf_counter() - started
        return logits

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
               ) -> torch.Tensor:
        """One token per row through the pipeline."""
        started = time.perf_counter()
        logits = self._step(input_ids, attention_mask, position_ids)
        self.decode_seconds.append(time.perf_counter() - started)
        return logits


def _follow(pipeline: _Pipeline, max_cache_len: int, rows: int) -> None:
    """A rank other than the last: run pipeline steps as the driver announces them, until it says stop."""
    import torch.distributed as dist

    device = pipeline.device
    while True:
        command = torch.zeros(4, dtype=torch.long, device=device)
        dist.broadcast(command, src=pipeline.world - 1)
        kind, batch, length, reset = (int(v) for v in command)
        if kind == _STOP:
            return
        if reset:
            pipeline.stage.reset()
        inputs: tuple[torch.Tensor, ...] = ()
        if pipeline.rank == 0:
            ids = torch.empty(batch, length, dtype=torch.long, device=device)
            positions = torch.empty(batch, length, dtype=torch.long, device=device)
            mask = torch.empty(batch, max_cache_len, dtype=torch.long, device=device)
            for tensor in (ids, mask, positions):
                dist.recv(tensor, src=pipeline.world - 1)
            inputs = (ids, mask, positions, torch.arange(batch, device=device))
        pipeline.step(batch, length, batch // rows, inputs)


def _read_prompt(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not path.is_file():
        raise InputError(f"--inputs {path}: no such file; write it with torch.save(input_ids, path) or "
                         "torch.save((input_ids, attention_mask), path)")
    value = torch.load(path, weights_only=True)
    values = (value,) if isinstance(value, torch.Tensor) else tuple(value)
    if not 1 <= len(values) <= 2 or not all(isinstance(v, torch.Tensor) and v.dim() == 2 for v in values):
        raise InputError(f"--inputs {path} must hold input_ids [batch, prompt] or (input_ids, attention_mask)")
    return values[0].long(), (values[1].long() if len(values) == 2 else None)


def run_generation_pipeline(directory: str | Path, inputs_path: str | Path | None, output_path: str | Path | None, *,
                            max_new_tokens: int, do_sample: bool = False, seed: int | None = None,
                            eos_token_id: Sequence[int] | None = None, timing_path: str | Path | None = None,
                            device: str | None = None) -> int:
    """Run this process's stage of saved generation stages (call it under torchrun); returns an exit status.

    ``eos_token_id`` replaces the model's eos ids (``[]``: always ``max_new_tokens``); ``seed``
    seeds sampling (``do_sample``) on the last rank, where tokens are chosen. With CUDA (unless
    ``device="cpu"``) rank ``r`` runs on ``cuda:<local rank>`` over NCCL, else on CPU over gloo.
    """
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    manifest = read_manifest(directory)
    if not is_generation_manifest(manifest):
        raise InputError(f"{directory} holds the stages of a one-shot model: run it without --generate")
    if world != len(manifest["stages"]):
        raise PartitionError(f"{directory} holds {len(manifest['stages'])} stages but {world} processes were started: "
                             f"run torchrun --nproc-per-node {len(manifest['stages'])}")
    generation = manifest["generation"]
    rows, max_cache_len = generation["rows"], generation["max_cache_len"]
    _, initial = saved_state(directory, manifest)
    held = manifest["stages"][rank]["state"]
    use_cuda = device != "cpu" and torch.cuda.is_available()
    target = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}") if use_cuda else torch.device("cpu")
    module = load_stage(directory, rank, manifest).to(target)
    if use_cuda:
        torch.cuda.set_device(target)
        retarget_device_constants(module, target)
    stage = CachedStage(module, [initial[i] for i in held], rows, target)
    driver = rank == world - 1
    prompt = None
    if driver:
        if inputs_path is None:
            raise InputError("--generate needs --inputs ids.pt (read by the last rank)")
        prompt = _read_prompt(Path(inputs_path))
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=target if use_cuda else None)
    try:
        pipeline = _Pipeline(stage, rank, world, target)
        if not driver:
            _follow(pipeline, max_cache_len, rows)
            return 0
        assert prompt is not None
        steps = _DriverSteps(pipeline, rows, max_cache_len)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        try:
            started = time.perf_counter()
            ids = generate_with(steps, GenerationDefaults.from_dict(generation["defaults"]), prompt[0], max_new_tokens,
                                prompt[1], do_sample, None, None, None,
                                list(eos_token_id) if eos_token_id is not None else None, None, 0, None, generator)
            total = time.perf_counter() - started
        finally:
            dist.broadcast(torch.tensor([_STOP, 0, 0, 0], device=target), src=world - 1)
        if output_path is not None:
            Path(output_path).parent.mkdir(parents=True, exist_ok=True)
            torch.save(ids, output_path)
        if timing_path is not None:
            Path(timing_path).write_text(json.dumps(_timing(steps, ids.shape[0], world, total)))
        return 0
    finally:
        dist.destroy_process_group()


def _timing(steps: _DriverSteps, batch: int, world: int, total: float) -> dict[str, Any]:
    decode = steps.decode_seconds
    median = statistics.median(decode) if decode else 0.0
    return {"stages": world, "batch": batch, "rows": steps.rows, "microbatches": batch // steps.rows,
            "prefill_seconds": steps.prefill_seconds, "decode_step_seconds": decode,
            "median_decode_step_seconds": median, "decode_tokens_per_second": batch / median if median else 0.0,
            "total_seconds": total, "threads": torch.get_num_threads()}
