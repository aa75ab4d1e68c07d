"""``graphopt bench --generation --pipeline-stages 2,4``: partitioned generation, predicted against measured.

The link between two ranks and the pipeline runtime's own cost are measured first
(``--link-benchmark``). For each stage count ``N``, SmolLM2 (real weights) is partitioned for a
batch of prompts with the intra-op threads each rank will have (``cores // N``, at least 1), so
the stage times behind the prediction are measured as the ranks run them. The stages are saved
and generate under ``torchrun --nproc-per-node N -m graphopt.pipeline DIR --generate`` (gloo). A
row holds the cost model's decode tokens/s (``PartitionReport.throughput``, with the measured
link), the pipeline's measured decode tokens/s (median step), their ratio, and whether the ranks'
tokens equal those of the unsplit step graph run in one process (``graphopt.optimize`` with the
steps in PyTorch, one micro-batch at a time: the same arithmetic, unsplit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import torch
from tabulate import tabulate

from graphopt.bench.generation import english_prompts, smollm2_source

__all__ = ["pipeline_rows_to_markdown", "run_pipeline_generation_bench"]


def _torchrun(directory: Path, stages: int, threads: int, new_tokens: int, work: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(stages), "-m",
               "graphopt.pipeline", str(directory), "--generate", "--inputs", str(directory / "prompt_ids.pt"),
               "--max-new-tokens", str(new_tokens), "--eos-token-id", "--threads", str(threads),
               "--output", str(work / "out.pt"), "--timing", str(work / "timing.json")]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode:
        raise RuntimeError(f"torchrun failed ({result.returncode}): {result.stderr[-2000:]}")
    timing = json.loads((work / "timing.json").read_text())
    timing["ids"] = torch.load(work / "out.pt", weights_only=True)
    return timing


def measure_link(work: Path) -> dict[str, float]:
    """The link and pipeline-runtime figures between two ranks on this machine (``--link-benchmark``)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "graphopt.pipeline",
               "--link-benchmark", "--timing", str(work / "link.json")]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise RuntimeError(f"the link benchmark failed ({result.returncode}): {result.stderr[-2000:]}")
    return json.loads((work / "link.json").read_text())


def _unsplit_tokens(model: torch.nn.Module, ids: torch.Tensor, rows: int, max_cache_len: int,
                    new_tokens: int) -> torch.Tensor:
    import graphopt

    unsplit = graphopt.optimize(model, (ids[:rows],), lowering=graphopt.CpuLowering(), max_cache_len=max_cache_len)
    return torch.cat([unsplit.generate(ids[i:i + rows], max_new_tokens=new_tokens, eos_token_id=[])
                      for i in range(0, ids.shape[0], rows)])


def run_pipeline_generation_bench(stage_counts: list[int], batches: list[int], prompt_len: int, new_tokens: int,
                                  cores: int | None = None, log: TextIO = sys.stderr) -> list[dict[str, Any]]:
    """One row per stage count and batch: predicted and measured pipelined decode tokens/s, and token identity.

    ``cores`` (default: this machine's) are shared among the ranks; a row whose ranks need more
    threads than there are cores is marked ``oversubscribed`` (the cost model gives every stage
    its own cores, so its prediction does not hold there).
    """
    cores = cores or os.cpu_count() or 1
    source = smollm2_source()
    with tempfile.TemporaryDirectory() as work_dir:
        link = measure_link(Path(work_dir))
    print(f"pipeline generation: link {link['latency_seconds'] * 1e6:.0f} µs per tensor, "
          f"{link['bandwidth_bytes_per_second'] / 1e9:.2f} GB/s; runtime {link['stage_overhead_seconds'] * 1e6:.0f} µs "
          "per stage call", file=log, flush=True)
    return [_pipeline_row(source.model, english_prompts(source.tokenizer, prompt_len, batch), stages, new_tokens,
                          cores, link, log)
            for batch in batches for stages in stage_counts]


def _pipeline_row(model: torch.nn.Module, ids: torch.Tensor, stages: int, new_tokens: int, cores: int,
                  link: dict[str, Any], log: TextIO) -> dict[str, Any]:
    import graphopt

    cache = ids.shape[1] + new_tokens
    threads = max(1, cores // stages)
    print(f"pipeline generation: {stages} stages, batch {ids.shape[0]}, {threads} thread(s) per rank: partitioning",
          file=log, flush=True)
    parts = graphopt.partition(model, (ids,), stages=stages, max_cache_len=cache, threads=threads,
                               link_latency=link["latency_seconds"], stage_overhead=link["stage_overhead_seconds"],
                               link_bandwidth=link["bandwidth_bytes_per_second"])
    predicted = parts.report.throughput.samples_per_second
    with tempfile.TemporaryDirectory() as work_dir:
        directory = parts.save(Path(work_dir) / "stages")
        print(f"pipeline generation: {stages} stages: torchrun", file=log, flush=True)
        timing = _torchrun(directory, stages, threads, new_tokens, Path(work_dir))
    expected = _unsplit_tokens(model, ids, parts.rows, cache, new_tokens)
    measured = timing["decode_tokens_per_second"]
    return {
        "stages": stages, "batch": ids.shape[0], "micro-batches": parts.microbatches, "threads per rank": threads,
        "oversubscribed": stages * threads > cores, "predicted tok/s": round(predicted, 1),
        "measured tok/s": round(measured, 1), "predicted / measured": round(predicted / measured, 3),
        "tokens == unsplit": bool(torch.equal(timing["ids"], expected)),
        "stage ms": [round(s.seconds * 1e3, 2) for s in parts.report.stages],
        "stage memory MiB": [round(s.memory_bytes / 2**20, 1) for s in parts.report.stages],
    }


def pipeline_rows_to_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True) + "\n" if rows else ""
