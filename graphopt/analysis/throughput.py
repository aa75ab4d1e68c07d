"""The pipeline throughput model: GPipe step time, samples per second and bubble from stage times.

``predict_throughput([0.010, 0.020], [1e6], microbatches=4, batch=8)`` predicts two stages of 10
and 20 ms per micro-batch with 1 MB crossing the cut, 4 micro-batches of a batch of 8.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from graphopt.errors import InputError

__all__ = ["DEFAULT_LINK_BANDWIDTH", "DEFAULT_LINK_LATENCY", "ThroughputPrediction", "predict_throughput"]

DEFAULT_LINK_LATENCY = 100e-6
"""Seconds per transfer between two stages when none is given (one message over TCP on a LAN)."""
DEFAULT_LINK_BANDWIDTH = 1.0e9
"""Bytes per second between two stages when none is given: about a 10 Gbit/s link (gloo over TCP)."""


@dataclass
class ThroughputPrediction:
    """Predicted pipeline throughput for ``microbatches`` micro-batches of a ``batch``-sample batch.

    Every micro-batch spends ``stage_seconds[s]`` in stage ``s`` and ``transfer_seconds[s]``
    crossing the cut after it. A GPipe forward pass over ``N`` stages takes the time of one
    micro-batch through all stages plus ``M - 1`` times the slowest stage (with its transfer):
    ``step_seconds``. ``bubble_fraction`` is GPipe's idle share (N-1)/(M+N-1).
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


def predict_throughput(
    stage_seconds: Sequence[float],
    cut_bytes: Sequence[float],
    microbatches: int,
    batch: int,
    link_bandwidth: float = DEFAULT_LINK_BANDWIDTH,
    link_latency: float = DEFAULT_LINK_LATENCY,
) -> ThroughputPrediction:
    """Pipeline throughput from per-micro-batch stage times and the bytes one micro-batch sends over each cut.

    ``stage_seconds[s]``: time of stage ``s`` on one micro-batch; ``cut_bytes[s]``: bytes crossing
    the cut after stage ``s`` per micro-batch (``len(stage_seconds) - 1`` values).
    """
    count = len(stage_seconds)
    if microbatches < 1:
        raise InputError(f"microbatches must be at least 1, got {microbatches}")
    transfers = [link_latency + b / link_bandwidth for b in cut_bytes] + [0.0]
    per_stage = [t + c for t, c in zip(stage_seconds, transfers, strict=False)]
    step = sum(per_stage) + (microbatches - 1) * max(per_stage)
    return ThroughputPrediction(
        stages=count, microbatches=microbatches, batch=batch, stage_seconds=list(stage_seconds),
        transfer_seconds=transfers[:-1], step_seconds=step, samples_per_second=batch / step if step else 0.0,
        bubble_fraction=(count - 1) / (microbatches + count - 1), link_bandwidth=link_bandwidth,
        link_latency=link_latency,
    )
