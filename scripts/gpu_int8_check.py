"""One-command check of the gpu int8 lowering on a CUDA machine (not run by CI).

    python scripts/gpu_int8_check.py                 # MiniLM (real weights), batch 8, seq 128
    python scripts/gpu_int8_check.py --model bert    # zoo bert, full size (random weights)

Builds eager fp32 on the GPU, graphopt ``gpu`` fp32, ``gpu`` int8-dynamic and ``gpu``
int8-weight-only, times them interleaved (CUDA events, median of ``--rounds`` rounds of
``--iters`` calls each) and prints latency, speedup vs graphopt fp32, output cosine vs eager fp32,
and the lowering note of each (how many layers got an int8 kernel, which stayed float and why).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree


def _time_ms(fn: Callable[[], Any], iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _cosine(a: Any, b: Any) -> float:
    x = torch.cat([t.detach().float().flatten().cpu() for t in pytree.tree_leaves(a) if isinstance(t, torch.Tensor)])
    y = torch.cat([t.detach().float().flatten().cpu() for t in pytree.tree_leaves(b) if isinstance(t, torch.Tensor)])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; returns the exit status (2 without CUDA)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=["minilm", "bert"])
    parser.add_argument("--size", default="full", choices=["small", "full"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_int8_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine.")
        return 2

    import graphopt
    from graphopt.bench import zoo

    entry = zoo.load(args.model, size=args.size, batch=args.batch)
    model, inputs = entry.model, tuple(entry.example_inputs)
    device_inputs = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in inputs)
    print(f"{entry.description}, batch {args.batch}, on {torch.cuda.get_device_name()} (torch {torch.__version__})")

    eager = copy.deepcopy(model).cuda().eval()
    variants: dict[str, Callable[..., Any]] = {"eager fp32": eager}
    notes: dict[str, list[str]] = {}
    for label, quantize in (("gpu fp32", None), ("gpu int8-dynamic", "int8-dynamic"),
                            ("gpu int8-weight-only", "int8-weight-only")):
        try:
            fast = graphopt.optimize(model, inputs, target="gpu", quantize=quantize)
        except Exception as error:  # report and go on: one failing variant should not hide the others
            print(f"{label}: optimize failed: {type(error).__name__}: {error}")
            continue
        variants[label] = fast
        notes[label] = [n for n in fast.report.notes if "lowering" in n]

    with torch.inference_mode():
        reference = eager(*device_inputs)
        outputs = {label: fn(*device_inputs) for label, fn in variants.items()}
        for fn in variants.values():  # warm up
            _time_ms(lambda fn=fn: fn(*device_inputs), 3)
        times: dict[str, list[float]] = {label: [] for label in variants}
        for _ in range(args.rounds):  # interleaved: clock and thermal drift hit every variant alike
            for label, fn in variants.items():
                times[label].append(_time_ms(lambda fn=fn: fn(*device_inputs), args.iters))

    base = statistics.median(times["gpu fp32"]) if "gpu fp32" in times else None
    print(f"\n{'variant':<24}{'median ms':>11}{'vs gpu fp32':>13}{'cosine vs eager':>17}")
    for label in variants:
        median = statistics.median(times[label])
        ratio = f"{base / median:.2f}x" if base else "-"
        print(f"{label:<24}{median:>11.3f}{ratio:>13}{_cosine(reference, outputs[label]):>17.5f}")
    for label, lines in notes.items():
        for line in lines:
            print(f"[{label}] {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
