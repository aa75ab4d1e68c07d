"""Regenerate the figures of docs/partitioning.md: balance, the stage plot, throughput measured vs predicted.

    python docs/partitioning_figures.py            # about 5 minutes on 2 cores

Writes docs/partitioning_stages.png and docs/partitioning_figures.json and prints the figures
(``--plot-only`` redraws the PNG from the JSON).
Timings depend on the machine and on what else runs on it: quote them with the load average.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import graphopt
from graphopt.bench import zoo

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], nproc: int) -> None:
    """``torchrun --nproc-per-node N -m graphopt.pipeline ARGS`` with a time bound."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(_free_port()), "-m", "graphopt.workflows.distributed", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, timeout=600, env=env, capture_output=True)


def balance_figures(figures: dict) -> None:
    """Measured balance of BERT-base and ResNet-50 in 4 stages (batch 1, balanced on measured time)."""
    for name in ("bert", "resnet50"):
        entry = zoo.load(name, size="full", batch=1)
        parts = graphopt.partition(entry.model, entry.example_inputs, stages=4, threads=1, repeats=9)
        report = parts.report
        figures[f"{name}_4_stages"] = {
            "balance": report.balance, "stage_ms": [s.seconds * 1e3 for s in report.stages],
            "cut_kib": [b / 1024 for b in report.cut_bytes], "parameters": [s.parameters for s in report.stages],
            "layers": [f"{s.first} … {s.last}" for s in report.stages],
        }


def plot_stages(figures: dict) -> None:
    """docs/partitioning_stages.png: measured time per stage and bytes crossing each cut, BERT-base and ResNet-50."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 6), layout="constrained")
    for row, name in enumerate(("bert", "resnet50")):
        data = figures[f"{name}_4_stages"]
        stages = [f"stage {i}" for i in range(len(data["stage_ms"]))]
        mean = sum(data["stage_ms"]) / len(stages)
        axes = figure.add_subplot(2, 2, 2 * row + 1)
        axes.bar(stages, data["stage_ms"], color="#3b6ea8")
        axes.axhline(mean, color="#e0a040", linestyle="--", label=f"mean ({mean:.1f} ms)")
        axes.set_title(f"{name}: measured time per stage, slowest/mean {data['balance']:.3f}")
        axes.set_ylabel("ms")
        axes.legend(loc="lower right")
        axes = figure.add_subplot(2, 2, 2 * row + 2)
        axes.bar([f"{i} → {i + 1}" for i in range(len(data["cut_kib"]))], data["cut_kib"], color="#5a9e6f")
        axes.set_title(f"{name}: bytes crossing each cut")
        axes.set_ylabel("KiB")
    figure.savefig(DOCS / "partitioning_stages.png", dpi=80)


def throughput_figures(figures: dict) -> None:
    """BERT-base, batch 8, 8 micro-batches: 2 stages predicted vs measured under torchrun; 8 stages predicted."""
    entry = zoo.load("bert", size="full", batch=8)
    link_file = Path(tempfile.mkdtemp()) / "link.json"
    torchrun(["--link-benchmark", "--timing", str(link_file)], 2)
    link = json.loads(link_file.read_text())
    figures["link"] = link
    for stages in (2, 8):
        parts = graphopt.partition(entry.model, entry.example_inputs, stages=stages, microbatches=8, threads=1,
                                   repeats=5, link_bandwidth=link["bandwidth_bytes_per_second"],
                                   link_latency=link["latency_seconds"])
        prediction = parts.report.throughput
        row = {"balance": parts.report.balance, "predicted_samples_per_second": prediction.samples_per_second,
               "predicted_step_seconds": prediction.step_seconds, "bubble_fraction": prediction.bubble_fraction,
               "stage_ms_per_microbatch": [s * 1e3 for s in prediction.stage_seconds]}
        if stages == 2:
            folder = Path(tempfile.mkdtemp())
            parts.save(folder / "stages")
            torch.save(entry.example_inputs, folder / "in.pt")
            torchrun([str(folder / "stages"), "--inputs", str(folder / "in.pt"), "--microbatches", "8", "--output",
                      str(folder / "out.pt"), "--repeats", "5", "--timing", str(folder / "timing.json")], 2)
            timing = json.loads((folder / "timing.json").read_text())
            output = torch.load(folder / "out.pt", weights_only=True)
            with torch.no_grad():
                expected = entry.model(*entry.example_inputs)
            row["measured_samples_per_second"] = timing["samples_per_second"]
            row["measured_step_seconds"] = timing["step_seconds"]
            row["error"] = prediction.samples_per_second / timing["samples_per_second"] - 1
            row["max_abs_diff_vs_model"] = float((output - expected).abs().max())
        figures[f"bert_batch8_{stages}_stages"] = row


def main() -> None:
    """Compute every figure and write them next to this script."""
    if sys.argv[1:] == ["--plot-only"]:
        plot_stages(json.loads((DOCS / "partitioning_figures.json").read_text()))
        return
    figures: dict = {"load_average_before": os.getloadavg()}
    balance_figures(figures)
    plot_stages(figures)
    throughput_figures(figures)
    figures["load_average_after"] = os.getloadavg()
    (DOCS / "partitioning_figures.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
