"""``graphopt bench --generation --pipeline-stages 2,4``: partitioned generation, predicted against measured.

For each stage count ``N``, SmolLM2 (real weights) is partitioned for a batch of prompts with the
intra-op threads each rank will have (``cores // N``, at least 1), so the stage times behind the
prediction are measured as the ranks run them. The stages are saved and generate under
``torchrun --nproc-per-node N -m graphopt.pipeline DIR --generate`` (gloo). A row holds the
cost model's decode tokens/s (``PartitionReport.throughput``), the pipeline's measured decode
tokens/s (median step), their ratio, and whether the ranks' tokens equal those of the unsplit
step graph run in one process (``graphopt.optimize`` with the steps in PyTorch, one micro-batch
at a time: the same arithmetic, unsplit).
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


def _unsplit_tokens(model: torch.nn.Module, ids: torch.Tensor, rows: int, max_cache_len: int,
                    new_tokens: int) -> torch.Tensor:
    import graphopt

    unsplit = graphopt.optimize(model, (ids[:rows],), lowering=graphopt.CpuLowering(), max_cache_len=max_cache_len)
    return torch.cat([unsplit.generate(ids[i:i + rows], max_new_tokens=new_tokens, eos_token_id=[])
                      for i in range(0, ids.shape[0], rows)])


def run_pipeline_generation_bench(stage_counts: list[int], batch: int, prompt_len: int, new_tokens: int,
                                  cores: int | None = None, log: TextIO = sys.stderr) -> list[dict[str, Any]]:
    """One row per stage count: predicted and measured pipelined decode tokens/s, and token identity.

    ``cores`` (default: this machine's) are shared among the ranks; a row whose ranks need more
    threads than there are cores is marked ``oversubscribed`` (the cost model gives every stage
    its own cores, so its prediction does not hold there).
    """
    import graphopt

    cores = cores or os.cpu_count() or 1
    source = smollm2_source()
    ids = english_prompts(source.tokenizer, prompt_len, batch)
    cache = prompt_len + new_tokens
    rows = []
    for stages in stage_counts:
        threads = max(1, cores // stages)
        print(f"pipeline generation: {stages} stages, {threads} thread(s) per rank: partitioning", file=log, flush=True)
        parts = graphopt.partition(source.model, (ids,), stages=stages, max_cache_len=cache, threads=threads)
        predicted = parts.report.throughput
        with tempfile.TemporaryDirectory() as work_dir:
            work = Path(work_dir)
            directory = parts.save(work / "stages")
            print(f"pipeline generation: {stages} stages: torchrun", file=log, flush=True)
            timing = _torchrun(directory, stages, threads, new_tokens, work)
        expected = _unsplit_tokens(source.model, ids, parts.rows, cache, new_tokens)
        measured = timing["decode_tokens_per_second"]
        rows.append({
            "stages": stages, "batch": batch, "micro-batches": parts.microbatches, "threads per rank": threads,
            "oversubscribed": stages * threads > cores, "predicted tok/s": round(predicted.samples_per_second, 1),
            "measured tok/s": round(measured, 1), "predicted / measured": round(predicted.samples_per_second
                                                                                / measured, 3),
            "tokens == unsplit": bool(torch.equal(timing["ids"], expected)),
            "stage ms": [round(s.seconds * 1e3, 2) for s in parts.report.stages],
            "stage memory MiB": [round(s.memory_bytes / 2**20, 1) for s in parts.report.stages],
        })
    return rows


def pipeline_rows_to_markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True) + "\n" if rows else ""
