"""What a pipeline split costs, stage by stage: the report of ``graphopt.partition`` and how it is measured.

``fill_stage_reports`` fills a ``PartitionReport`` from the stage modules of a split and their
measured times; ``stage_section`` draws it (a table and plots) for the HTML report. Both
one-shot partitions (``workflows.partition``) and partitioned generation
(``workflows.generation.partitioned``) report this way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from graphopt.analysis.cost import count_parameters, node_costs, value_bytes
from graphopt.analysis.throughput import ThroughputPrediction
from graphopt.ir.graph import parameter_bytes
from graphopt.passes.split_stages import StageInfo
from graphopt.report import PlotSpec, Report, ReportSection

__all__ = ["PartitionReport", "StageReport", "balance_of", "fill_stage_reports", "median_stage_seconds",
           "stage_section", "stage_sums", "sync_devices"]




@dataclass
class StageReport:
    """What one stage costs: measured time, estimate, FLOPs, weights, kept state, memory and the bytes it receives."""

    index: int
    nodes: int
    first: str
    last: str
    seconds: float
    estimate: float
    flops: int
    parameters: int
    weight_bytes: int
    peak_activation_bytes: int
    input_bytes: int
    routed: int
    device: str = "cpu"
    state_bytes: int = 0

    @property
    def memory_bytes(self) -> int:
        """Weights, the state the stage keeps (a decoder's cache) and its peak live activations."""
        return self.weight_bytes + self.state_bytes + self.peak_activation_bytes


@dataclass
class PartitionReport(Report):
    """The report of a partition: the passes that ran, one ``StageReport`` per stage, balance, throughput.

    ``balance`` is slowest / mean of the stage times measured after splitting (medians over
    repeats), ``balance_key`` what the split equalized, ``cut_bytes[s]`` the bytes crossing the
    cut after stage ``s`` on the example batch, ``throughput`` the prediction for
    ``microbatches`` micro-batches.
    """

    stages: list[StageReport] = field(default_factory=list)
    balance: float = 0.0
    balance_key: str = "time"
    cut_bytes: list[int] = field(default_factory=list)
    throughput: ThroughputPrediction | None = None
    refinements: list[float] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PartitionReport:
        """Rebuild a partition report (stages and throughput included) from ``to_dict()`` output."""
        report = super().from_dict(data)
        report.stages = [StageReport(**s) if isinstance(s, Mapping) else s for s in report.stages]
        if isinstance(report.throughput, Mapping):
            report.throughput = ThroughputPrediction(**report.throughput)
        return report  # type: ignore[return-value]


def stage_section(report: PartitionReport, predictions: Sequence[ThroughputPrediction]) -> ReportSection:
    """The "Pipeline stages" section: the stage table, time and cut plots, predictions by micro-batches."""
    rows = [
        [s.index, s.device, s.nodes, f"{s.first} … {s.last}", round(s.seconds * 1e3, 3), round(s.flops / 1e9, 4),
         s.parameters, round(s.weight_bytes / 2**20, 3), round(s.state_bytes / 2**20, 3),
         round(s.peak_activation_bytes / 2**20, 3), round(s.memory_bytes / 2**20, 3), round(s.input_bytes / 1024, 2),
         s.routed]
        for s in report.stages
    ]
    labels = [f"stage {s.index}" for s in report.stages]
    mean = statistics.mean(s.seconds for s in report.stages)
    estimates = [s.estimate for s in report.stages]
    scale = sum(s.seconds for s in report.stages) / sum(estimates) if sum(estimates) else 0.0
    plots = [
        PlotSpec("bar", "Time per stage (ms)", labels,
                 {"measured": [s.seconds * 1e3 for s in report.stages],
                  f"estimate ({report.balance_key}, scaled)": [e * scale * 1e3 for e in estimates],
                  "mean": [mean * 1e3] * len(labels)}, y_label="ms"),
        PlotSpec("bar", "Bytes crossing each cut (KiB)", [f"{i} → {i + 1}" for i in range(len(report.cut_bytes))]
                 or ["none"], {"KiB": [b / 1024 for b in report.cut_bytes] or [0.0]}, y_label="KiB"),
    ]
    if predictions:
        counts = [str(p.microbatches) for p in predictions]
        plots.append(PlotSpec("line", "Predicted throughput (samples/s) by micro-batches", counts,
                              {"samples/s": [p.samples_per_second for p in predictions]}, x_label="micro-batches"))
        plots.append(PlotSpec("line", "Pipeline bubble (% idle) by micro-batches", counts,
                              {"bubble %": [100 * p.bubble_fraction for p in predictions]}, x_label="micro-batches"))
    t = report.throughput
    description = (
        f"{len(report.stages)} stages balanced on {report.balance_key}; slowest / mean measured stage time "
        f"{report.balance:.3f}"
        + (f"; predicted {t.samples_per_second:.1f} samples/s with {t.microbatches} micro-batches of "
           f"{t.batch // max(t.microbatches, 1)} (bubble {100 * t.bubble_fraction:.1f}%, link "
           f"{t.link_bandwidth / 1e9:.2f} GB/s, {t.link_latency * 1e6:.0f} µs)" if t else "")
    )
    headers = ["stage", "device", "nodes", "layers", "ms", "GFLOPs", "parameters", "weights MiB", "state MiB",
               "peak act MiB", "memory MiB", "cut in KiB", "routed"]
    return ReportSection("Pipeline stages", description, headers, rows, plots)


def median_stage_seconds(modules: Sequence[torch.nn.Module], inputs: Sequence[tuple[Any, ...]], repeats: int,
                          warmup: int = 1) -> list[float]:
    """Median seconds of each stage on its inputs; stages are timed in turn, round after round."""
    samples: list[list[float]] = [[] for _ in modules]
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for index, (module, args) in enumerate(zip(modules, inputs, strict=True)):
                sync_devices(args)
                started = time.perf_counter()
                module(*args)
                sync_devices(args)
                if round_index >= warmup:
                    samples[index].append(time.perf_counter() - started)
    return [statistics.median(s) for s in samples]


def sync_devices(values: Sequence[Any]) -> None:
    """Wait for the GPU when any of ``values`` lives on one (timings must cover the work, not its launch)."""
    if any(isinstance(v, torch.Tensor) and v.is_cuda for v in values):
        torch.cuda.synchronize()


def stage_sums(costs: Sequence[float], boundaries: Sequence[int]) -> list[float]:
    """The summed cost of each stage of the split starting at ``boundaries``."""
    edges = [*boundaries, len(costs)]
    return [sum(costs[edges[k]:edges[k + 1]]) for k in range(len(boundaries))]


def balance_of(seconds: Sequence[float]) -> float:
    """Slowest / mean stage time (1.0 is a perfect balance)."""
    return max(seconds) / statistics.mean(seconds) if seconds and statistics.mean(seconds) > 0 else 1.0


def fill_stage_reports(report: PartitionReport, modules: Sequence[fx.GraphModule], infos: Sequence[StageInfo],
                       items: Any, boundaries: Sequence[int], costs: Sequence[float], measured: Sequence[float]
                       ) -> None:
    """Per-stage figures, cut bytes and the measured balance into ``report``."""
    estimates = stage_sums(costs, boundaries)
    edges = [*boundaries, len(items)]
    for info, module, seconds, estimate in zip(infos, modules, measured, estimates, strict=True):
        costs_table = node_costs(module)
        peak = int(max(items.peak_bytes[edges[info.index]:edges[info.index + 1]], default=0))
        member_nodes = [items.nodes[i] for i in range(edges[info.index], edges[info.index + 1])]
        paths = [c.module for c in costs_table.values() if c.module and not c.module.startswith("_")]
        containers = {p for p in paths if any(q.startswith(p + ".") for q in paths)}
        modules_of = [p for p in paths if p not in containers]  # leaf layers, not the model wrapping them
        produced = set(info.nodes)
        routed = sum(1 for name in info.outputs if name in info.inputs and name not in produced)
        weight_bytes = parameter_bytes(module)
        report.stages.append(StageReport(
            index=info.index, nodes=len(member_nodes),
            first=modules_of[0] if modules_of else member_nodes[0].name,
            last=modules_of[-1] if modules_of else member_nodes[-1].name,
            seconds=seconds, estimate=estimate, flops=sum(c.flops for c in costs_table.values()),
            parameters=count_parameters(module), weight_bytes=weight_bytes, peak_activation_bytes=peak,
            input_bytes=sum(value_bytes(n) for n in module.graph.nodes if n.op == "placeholder") - info.state_bytes,
            routed=routed, state_bytes=info.state_bytes,
        ))
    report.cut_bytes = [s.input_bytes for s in report.stages[1:]]
    report.balance = balance_of(measured)
