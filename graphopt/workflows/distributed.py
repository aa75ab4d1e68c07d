"""Run saved stages as a pipeline on torch.distributed.pipelining, one stage per process.

    torchrun --nproc-per-node 2 -m graphopt.pipeline stages/ --inputs in.pt --microbatches 4 --output out.pt

Each rank loads its stage (``stage_<rank>.pt2`` from the directory ``PartitionedModel.save``
wrote), wraps it in a ``torch.distributed.pipelining.PipelineStage`` and runs a GPipe (or 1F1B)
schedule, forward only. Rank 0 reads ``in.pt`` (the tuple of input tensors, ``torch.save``),
which the schedule cuts into micro-batches along dim 0; the last rank merges the micro-batch
outputs, rebuilds the model's output structure and writes it to ``out.pt``. Both files load
with ``weights_only=True``. gloo on CPU, NCCL when CUDA is available (rank ``r`` on
``cuda:<local rank>``); ``--device cpu`` forces gloo.

``--generate`` runs the stages of a partitioned causal LM instead (``graphopt.workflows.
distributed_generation``): ``--inputs`` holds prompt ids, ``--output`` gets the generated ids.

``--repeats R`` times R extra pipeline steps after the first and writes the measured throughput
(samples per second, median step time) as JSON to ``--timing``. ``--link-benchmark`` (2
processes, no stage directory) measures the latency and bandwidth between two ranks instead,
the figures ``graphopt.partition(link_bandwidth=..., link_latency=...)`` predicts with.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from graphopt.analysis.balanced_split import PartitionError
from graphopt.errors import GraphoptError, InputError
from graphopt.targets.gpu.target import retarget_device_constants
from graphopt.workflows.distributed_generation import run_generation_pipeline
from graphopt.workflows.generation.partitioned import is_generation_manifest
from graphopt.workflows.partition import load_stage, read_manifest, structure_outputs

__all__ = ["main", "run_pipeline"]


def _load_inputs(path: Path) -> tuple[torch.Tensor, ...]:
    if not path.is_file():
        raise InputError(f"--inputs {path}: no such file; write it with torch.save((x1, x2, ...), path)")
    try:
        inputs = torch.load(path, weights_only=True)
    except Exception as error:
        raise InputError(f"--inputs {path} cannot be read with weights_only=True ({type(error).__name__}: {error}); "
                         "save a tensor or a tuple of tensors") from error
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise InputError(f"--inputs {path} must hold a tensor or a tuple of tensors")
    return inputs


def _check_inputs(inputs: Sequence[torch.Tensor], manifest: dict[str, Any], microbatches: int) -> None:
    expected = len(manifest["inputs"])
    if len(inputs) != expected:
        raise InputError(f"the model takes {expected} input tensor(s) ({', '.join(manifest['inputs'])}), "
                         f"--inputs holds {len(inputs)}")
    sizes = {x.shape[0] for x in inputs if x.dim() > 0}
    if len(sizes) != 1:
        raise InputError("every input needs the same batch size in dim 0 to be cut into micro-batches")
    batch = sizes.pop()
    if batch % microbatches:
        raise InputError(f"batch {batch} is not divisible into {microbatches} micro-batches of equal size; "
                         "choose --microbatches dividing the batch")
    if microbatches > 1 and not manifest.get("dynamic_batch"):
        raise InputError("these stages were captured with a static batch: run with --microbatches 1, or partition "
                         "with an example batch >= 2 so that micro-batches of any size work")


def _plain(value: Any) -> Any:
    """The output with plain containers only (a ModelOutput becomes a dict), so it loads with weights_only=True."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value] if isinstance(value, list) else tuple(_plain(v) for v in value)
    return value


def run_pipeline(directory: str | Path, inputs_path: str | Path | None, microbatches: int,
                 output_path: str | Path | None, *, schedule: str = "gpipe", device: str | None = None,
                 repeats: int = 0, timing_path: str | Path | None = None) -> int:
    """Run this process's stage of the saved pipeline (call it under torchrun); returns an exit status."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise InputError("graphopt.workflows.distributed runs one stage per process: start it with "
                         "torchrun --nproc-per-node N -m graphopt.pipeline DIR ...")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    manifest = read_manifest(directory)
    if is_generation_manifest(manifest):
        raise InputError(f"{directory} holds the stages of a causal LM: run them with --generate (and --inputs ids.pt)")
    stages = len(manifest["stages"])
    if world != stages:
        raise PartitionError(f"{directory} holds {stages} stages but {world} processes were started: run "
                             f"torchrun --nproc-per-node {stages} (one process per stage), or partition again with "
                             f"stages={world}")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    target = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    module = load_stage(directory, rank, manifest).to(target)
    if use_cuda:
        retarget_device_constants(module, target)
    inputs: tuple[torch.Tensor, ...] = ()
    if rank == 0:
        if inputs_path is None:
            raise InputError("rank 0 needs --inputs in.pt")
        inputs = tuple(x.to(target) for x in _load_inputs(Path(inputs_path)))
        _check_inputs(inputs, manifest, microbatches)
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=target if use_cuda else None)
    try:
        stage = PipelineStage(module, rank, world, target)
        runner = (Schedule1F1B if schedule == "1f1b" else ScheduleGPipe)(stage, n_microbatches=microbatches)
        step_times = []
        outputs = None
        with torch.no_grad():
            for index in range(1 + repeats):
                dist.barrier()
                started = time.perf_counter()
                result = runner.step(*inputs) if rank == 0 else runner.step()
                if use_cuda:
                    torch.cuda.synchronize()
                dist.barrier()
                if index > 0:
                    step_times.append(time.perf_counter() - started)
                if rank == world - 1 and index == 0:
                    outputs = result
        if rank == world - 1:
            flat = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
            structured = structure_outputs([x.cpu() for x in flat], manifest)
            if output_path is not None:
                Path(output_path).parent.mkdir(parents=True, exist_ok=True)
                torch.save(_plain(structured), output_path)
        if rank == 0 and step_times and timing_path is not None:
            batch = inputs[0].shape[0]
            median = statistics.median(step_times)
            Path(timing_path).write_text(json.dumps({
                "stages": world, "microbatches": microbatches, "batch": batch, "step_seconds": step_times,
                "median_step_seconds": median, "samples_per_second": batch / median, "schedule": schedule,
                "device": str(target), "threads": torch.get_num_threads(),
            }))
    finally:
        dist.destroy_process_group()
    return 0


class _Relay(torch.nn.Module):
    """A stage that does no work: it passes its inputs on (the pipeline runtime's cost alone)."""

    def forward(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Its inputs, as new tensors."""
        return tuple(v + 0 for v in values)


def _pipeline_step_seconds(microbatches: int, tensors: int, repeats: int) -> float:
    """Median seconds of a GPipe step over 2 ranks of :class:`_Relay` stages passing ``tensors`` small tensors."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    rank = dist.get_rank()
    stage = PipelineStage(_Relay(), rank, 2, torch.device("cpu"))
    schedule = ScheduleGPipe(stage, n_microbatches=microbatches)
    inputs = [torch.zeros(microbatches, 64) for _ in range(tensors)]
    times = []
    with torch.no_grad():
        for _ in range(repeats + 2):
            dist.barrier()
            started = time.perf_counter()
            if rank == 0:
                schedule.step(*inputs)
            else:
                schedule.step()
            dist.barrier()
            times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def _runtime_costs(repeats: int) -> dict[str, float]:
    """Per-tensor latency and per-stage-call overhead of torch.distributed.pipelining between 2 ranks.

    A step of ``M`` micro-batches of stages passing ``k`` tensors costs about
    ``(2 o + k L) + (M - 1) (o + k L)``: the slope in ``M`` for ``k = 1`` and ``k = 8`` gives the
    latency ``L`` per tensor and the overhead ``o`` per stage call.
    """
    slope = {k: (_pipeline_step_seconds(4, k, repeats) - _pipeline_step_seconds(1, k, repeats)) / 3 for k in (1, 8)}
    latency = max((slope[8] - slope[1]) / 7, 1e-6)
    return {"latency": latency, "overhead": max(slope[1] - latency, 0.0)}


def measure_link(sizes: Sequence[int] = (4, 1 << 20, 8 << 20), repeats: int = 20,
                 timing_path: str | Path | None = None) -> dict[str, float]:
    """Measure the link between ranks 0 and 1 and the pipeline runtime's cost (run under torchrun, 2 processes).

    Ping-pong: rank 0 sends a message of each size and waits for a 4-byte reply; the raw latency
    is half the median round trip of the smallest message, the bandwidth the largest message's
    bytes over its one-way time minus that latency. Then GPipe schedules of two stages that do no
    work (:func:`_runtime_costs`) give the latency per tensor as the pipeline runtime sees it
    (``latency_seconds``, what ``graphopt.partition(link_latency=...)`` takes) and the runtime's
    overhead per stage call (``stage_overhead_seconds``, for ``stage_overhead=...``). Rank 0 writes
    the figures as JSON to ``timing_path``.
    """
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        if dist.get_world_size() != 2:
            raise InputError("the link benchmark needs 2 processes: torchrun --nproc-per-node 2 ...")
        reply = torch.zeros(1, dtype=torch.float32)
        one_way: dict[int, float] = {}
        for size in sizes:
            message = torch.zeros(max(size // 4, 1), dtype=torch.float32)
            times = []
            for _ in range(repeats + 2):
                dist.barrier()
                started = time.perf_counter()
                if rank == 0:
                    dist.send(message, 1)
                    dist.recv(reply, 1)
                elif rank == 1:
                    dist.recv(message, 0)
                    dist.send(reply, 0)
                times.append(time.perf_counter() - started)
            one_way[size] = statistics.median(times[2:]) / 2
        raw_latency = one_way[min(sizes)]
        largest = max(sizes)
        bandwidth = largest / max(one_way[largest] - raw_latency, 1e-9)
        runtime = _runtime_costs(repeats)
        result = {"latency_seconds": runtime["latency"], "stage_overhead_seconds": runtime["overhead"],
                  "bandwidth_bytes_per_second": bandwidth, "raw_latency_seconds": raw_latency,
                  "one_way_seconds": {str(k): v for k, v in one_way.items()}}
        if rank == 0 and timing_path is not None:
            Path(timing_path).write_text(json.dumps(result))
        return result
    finally:
        dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m graphopt.pipeline``."""
    parser = argparse.ArgumentParser(prog="python -m graphopt.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", nargs="?", help="stage directory written by parts.save(...) or partition -o")
    parser.add_argument("--inputs", help="torch.save'd tuple of input tensors (read by rank 0)")
    parser.add_argument("--microbatches", type=int, default=1, help="micro-batches per step, cut along dim 0")
    parser.add_argument("--output", help="where the last rank writes the model's output (torch.save)")
    parser.add_argument("--schedule", choices=["gpipe", "1f1b"], default="gpipe")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, help="intra-op threads per process (default: cores / processes)")
    parser.add_argument("--repeats", type=int, default=0, help="extra timed steps after the first")
    parser.add_argument("--timing", help="JSON file for the measured throughput (written by rank 0)")
    parser.add_argument("--link-benchmark", action="store_true",
                        help="measure latency and bandwidth between two ranks instead (writes --timing)")
    generation = parser.add_argument_group("generation (stages saved by a partitioned causal LM)")
    generation.add_argument("--generate", action="store_true",
                            help="generate from the prompt ids in --inputs; the last rank writes the ids to --output")
    generation.add_argument("--max-new-tokens", type=int, default=20)
    generation.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    generation.add_argument("--seed", type=int, help="seed of the sampling generator")
    generation.add_argument("--eos-token-id", type=int, nargs="*",
                            help="end-of-sequence ids instead of the model's (none given: never stop early)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m graphopt.pipeline`` (under torchrun)."""
    args = build_parser().parse_args(argv)
    if args.microbatches < 1:
        print("error: --microbatches must be at least 1", file=sys.stderr)
        return 2
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    try:
        if args.link_benchmark:
            measure_link(timing_path=args.timing)
            return 0
        if args.directory is None:
            raise InputError("give the stage directory: python -m graphopt.pipeline stages/ --inputs in.pt ...")
        if args.generate:
            if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
                raise InputError("--generate runs one stage per process: start it with torchrun --nproc-per-node N "
                                 "-m graphopt.pipeline DIR --generate ...")
            return run_generation_pipeline(args.directory, args.inputs, args.output,
                                           max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                           seed=args.seed, eos_token_id=args.eos_token_id, timing_path=args.timing,
                                           device=args.device)
        return run_pipeline(args.directory, args.inputs, args.microbatches, args.output, schedule=args.schedule,
                            device=args.device, repeats=args.repeats, timing_path=args.timing)
    except GraphoptError as error:
        print(f"error (rank {os.environ.get('RANK', '?')}): {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
