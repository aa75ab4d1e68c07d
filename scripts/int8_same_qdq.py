"""Static int8 on cpu against OpenVINO running graphopt's own QDQ file (issue 19's int8 goal).

For ResNet-50 (the zoo's, batch-norm statistics re-estimated on Gaussian batches so the random net
behaves like a trained one; calibrated on 8 other batches) and MiniLM (8 x 128, real weights,
calibrated on its example): ``optimize(..., target="cpu", quantize="int8")`` as a user calls it,
the same with PyTorch's int8 kernels forced, and OpenVINO's defaults on the QDQ file the onnx
target exports; timed round-robin in one process with 100 ms between calls.

    python scripts/int8_same_qdq.py --models resnet50,minilm --rounds 21
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

import graphopt
from graphopt import CpuLowering
from graphopt.bench import zoo


def resnet50() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
    """ResNet-50 with batch-norm statistics estimated on 4 batches of 8, and 8 calibration batches."""
    built = zoo.load("resnet50", size="full", batch=1)
    model = built.model
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the batches
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, 224, 224))
    model.eval()
    return model, built.example_inputs, [(torch.randn(1, 3, 224, 224),) for _ in range(8)]


def minilm() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
    """MiniLM at 8 x 128, calibrated on its example."""
    built = zoo.load("minilm", size="full", batch=8)
    return built.model, built.example_inputs, [built.example_inputs]


class OpenVinoFile:
    """OpenVINO's defaults (latency hint, 2 threads) on an ONNX file."""

    def __init__(self, path: str, threads: int) -> None:
        import openvino

        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = openvino.Core().compile_model(path, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The first output for ``inputs``, copied out of OpenVINO."""
        results = self.request.infer([t.numpy() for t in inputs])
        return torch.from_numpy(results[self.compiled.outputs[0]].copy())


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def measure(name: str, rounds: int) -> None:
    """Print one line per way of running ``name``: median ms, speed against OpenVINO's defaults, output cosine."""
    model, example, calibration = {"resnet50": resnet50, "minilm": minilm}[name]()
    with torch.no_grad():
        reference = _first(model(*example))
    default = graphopt.optimize(model, example, "cpu", quantize="int8", calibration=calibration)
    kept = default.target.label()
    runs: dict[str, Callable[..., Any]] = {
        "eager": model,
        f"graphopt-cpu int8, default ({kept})": default,
        "graphopt-cpu int8, PyTorch's kernels": graphopt.optimize(model, example, "cpu", quantize="int8",
                                                                 calibration=calibration, lowering=CpuLowering()),
    }
    onnx = graphopt.optimize(model, example, "onnx", quantize="int8", calibration=calibration)
    with tempfile.TemporaryDirectory() as folder:
        path = onnx.export_onnx(f"{folder}/int8.onnx")
        runs["OpenVINO defaults, graphopt's QDQ file"] = OpenVinoFile(str(path), torch.get_num_threads())
    times: dict[str, list[float]] = {label: [] for label in runs}
    cosines = {}
    with torch.inference_mode():
        for label, run in runs.items():
            output = _first(run(*example))
            cosines[label] = torch.nn.functional.cosine_similarity(reference.flatten(1), output.flatten(1)).min().item()
        for _ in range(rounds):
            for label, run in runs.items():
                time.sleep(0.1)  # let the previous runtime's threads go idle
                started = time.perf_counter()
                run(*example)
                times[label].append(time.perf_counter() - started)
    openvino = statistics.median(times["OpenVINO defaults, graphopt's QDQ file"])
    for label, samples in times.items():
        median = statistics.median(samples)
        print(f"{name} | {label} | {median * 1e3:.1f} ms | {openvino / median:.2f}x OpenVINO | "
              f"cosine {cosines[label]:.5f}", flush=True)


def main() -> None:
    """Parse the flags and measure each model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,minilm")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name in args.models.split(","):
        measure(name, args.rounds)


if __name__ == "__main__":
    main()
