"""The pipeline throughput model: GPipe step time, samples per second and bubble from stage times.

``predict_throughput([0.010, 0.020], [1e6], microbatches=4, batch=8)`` predicts two stages of 10
and 20 ms per micro-batch with 1 MB crossing the cut, 4 micro-batches of a batch of 8.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from graphopt.errors import InputError

__all__ = ["DEFAULT_LINK_BANDWIDTH", "DEFAULT_LINK_LATENCY", "DEFAULT_STAGE_OVERHEAD", "PipelineLink",
           "ThroughputPrediction", "predict_throughput"]

DEFAULT_LINK_LATENCY = 100e-6
"""Seconds per transfer between two stages when none is given (one message over TCP on a LAN)."""
DEFAULT_LINK_BANDWIDTH = 1.0e9
"""Bytes per second between two stages when none is given: about a 10 Gbit/s link (gloo over TCP)."""
DEFAULT_STAGE_OVERHEAD = 2e-4
"""Seconds the pipeline runtime spends per stage per micro-batch besides the stage's own work, when none
is given (``--link-benchmark`` measures it: 0.1-0.3 ms for torch.distributed.pipelining on gloo on a
2-core CPU machine, which matters for stages of a few milliseconds)."""


@dataclass(frozen=True)
class PipelineLink:
    """What moving a micro-batch from stage to stage costs: the link, and the pipeline runtime's own work.

    ``bandwidth`` (bytes/s) and ``latency`` (seconds per tensor sent) describe the link;
    ``stage_overhead`` the runtime's seconds per stage per micro-batch. ``torchrun ... -m
    graphopt.pipeline --link-benchmark`` measures all three.
    """

    bandwidth: float = DEFAULT_LINK_BANDWIDTH
    latency: float = DEFAULT_LINK_LATENCY
    stage_overhead: float = DEFAULT_STAGE_OVERHEAD

    def predict(self, stage_seconds: Sequence[float], cut_bytes: Sequence[float], microbatches: int, batch: int,
                cut_tensors: Sequence[int] | None = None, step_overhead: float = 0.0) -> ThroughputPrediction:
        """``predict_throughput`` over this link."""
        return predict_throughput(stage_seconds, cut_bytes, microbatches, batch, self.bandwidth, self.latency,
                                  self.stage_overhead, cut_tensors, step_overhead)


@dataclass
class ThroughputPrediction:
    """Predicted pipeline throughput for ``microbatches`` micro-batches of a ``batch``-sample batch.

    Every micro-batch spends ``stage_seconds[s]`` in stage ``s``, ``stage_overhead`` in the
    pipeline runtime around it, and ``transfer_seconds[s]`` crossing the cut after it (one link
    latency per tensor sent, plus the bytes over the bandwidth). A GPipe forward pass over ``N``
    stages takes the time of one micro-batch through all stages plus ``M - 1`` times the slowest
    stage (with its overhead and transfer), plus ``step_overhead`` once: ``step_seconds``.
    ``bubble_fraction`` is GPipe's idle share (N-1)/(M+N-1).
    """

    stages: int
    microbatches: int
    batch: int
    stage_seconds: list[float]
    transfer_seconds: list[float]
    step_seconds: float
    samples_per_second: float
    bubble_fraction: float
    link_bandwidth: float
    link_latency: float
    stage_overhead: float = 0.0
    step_overhead: float = 0.0


def predict_throughput(
    stage_seconds: Sequence[float],
    cut_bytes: Sequence[float],
    microbatches: int,
    batch: int,
    link_bandwidth: float = DEFAULT_LINK_BANDWIDTH,
    link_latency: float = DEFAULT_LINK_LATENCY,
    stage_overhead: float = DEFAULT_STAGE_OVERHEAD,
    cut_tensors: Sequence[int] | None = None,
    step_overhead: float = 0.0,
) -> ThroughputPrediction:
    """Pipeline throughput from per-micro-batch stage times and the bytes one micro-batch sends over each cut.

    ``stage_seconds[s]``: time of stage ``s`` on one micro-batch; ``cut_bytes[s]``: bytes crossing
    the cut after stage ``s`` per micro-batch (``len(stage_seconds) - 1`` values), in
    ``cut_tensors[s]`` tensors (1 each when not given); ``stage_overhead``: the runtime's own
    seconds per stage per micro-batch; ``step_overhead``: seconds a step costs once (a generation
    loop's sampling and its messages to the first rank).
    """
    count = len(stage_seconds)
    if microbatches < 1:
        raise InputError(f"microbatches must be at least 1, got {microbatches}")
    tensors = list(cut_tensors) if cut_tensors is not None else [1] * len(cut_bytes)
    transfers = [link_latency * max(n, 1) + b / link_bandwidth for b, n in zip(cut_bytes, tensors, strict=True)]
    per_stage = [t + stage_overhead + c for t, c in zip(stage_seconds, [*transfers, 0.0], strict=False)]
    step = sum(per_stage) + (microbatches - 1) * max(per_stage) + step_overhead
    return ThroughputPrediction(
        stages=count, microbatches=microbatches, batch=batch, stage_seconds=list(stage_seconds),
        transfer_seconds=transfers, step_seconds=step, samples_per_second=batch / step if step else 0.0,
        bubble_fraction=(count - 1) / (microbatches + count - 1), link_bandwidth=link_bandwidth,
        link_latency=link_latency, stage_overhead=stage_overhead, step_overhead=step_overhead,
    )
