"""What a target is (a backend that lowers an optimized graph to something runnable), and its registry.

Every target answers to one interface: ``lower(gm, context)`` with a ``LoweringContext`` (the
example inputs, dynamic dims, the report, how to verify), ``lowering_passes(gm)`` (the verified
rewrites it runs on that graph, in order) and ``candidates()`` (the variants ``tune`` measures).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol

import torch.fx as fx

from graphopt.errors import UnknownTargetError
from graphopt.ir.capture import CapturedModel, flatten_inputs
from graphopt.ir.shapes import DynamicDims
from graphopt.passes.base import Pass
from graphopt.passes.lossy.base import Fidelity
from graphopt.passes.manager import OnError
from graphopt.report import Report

__all__ = ["DEFAULT_PIPELINE", "LoweringContext", "LoweringOptions", "Target", "available_targets", "get_target"]

DEFAULT_PIPELINE: tuple[str, ...] = (
    "remove-dropout",
    "remove-identity",
    "constant-folding",
    "fold-conv-batchnorm",
    "fold-linear-batchnorm",
    "cse",
    "fuse-activations",
    "fuse-norms",
    "unpack-attention",
    "fuse-attention",
    "fuse-horizontal",
    "fuse-gqa",
    "fuse-rotary",
    "fuse-gated-mlp",
    "dce",
)


@dataclass(frozen=True)
class LoweringContext:
    """What ``Target.lower`` gets besides the graph.

    ``example_args`` / ``example_kwargs``: the model's example call (as the user calls it), on
    which every lowering pass is verified. ``dynamic``: the dims that vary between calls.
    ``report``: where the lowering writes its sections and notes (None: nowhere). ``on_error``:
    a lowering pass that fails verification is rolled back and reported (``"rollback"``) or
    raises (``"raise"``). ``tolerance_scale`` widens the exact passes' tolerance; ``fidelity``
    is the budget kernel-substituting passes are held to (``graphopt.targets.common.lowering``).
    ``state_inputs``: the last that many inputs are state the caller carries from call to call
    (a key/value cache): the graph returns their new values as its last outputs, the caller feeds
    those back and keeps nothing it passed in, so a lowering may write the new state into it.
    """

    example_args: tuple[Any, ...]
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    dynamic: DynamicDims | None = None
    report: Report | None = None
    on_error: OnError = "rollback"
    tolerance_scale: float = 1.0
    fidelity: Fidelity | None = None
    state_inputs: int = 0

    @classmethod
    def from_captured(cls, captured: CapturedModel, **options: Any) -> LoweringContext:
        """The context of a captured model's example call (``options``: the other fields)."""
        return cls(captured.example_args, captured.example_kwargs, captured.dynamic, **options)

    @property
    def static(self) -> bool:
        """True when no input dim is dynamic."""
        return not self.dynamic

    def flat_inputs(self, gm: fx.GraphModule) -> tuple[Any, ...]:
        """The example call flattened into ``gm``'s placeholders (what verification runs the graph on)."""
        return flatten_inputs(gm, self.example_args, self.example_kwargs)

    def with_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> LoweringContext:
        """A copy of the context with another example call (e.g. moved to the target's device)."""
        return replace(self, example_args=tuple(args), example_kwargs=dict(kwargs))


class LoweringOptions(Protocol):
    """A target's exported config (``CpuLowering``, ``GpuLowering``, ``OnnxLowering``)."""

    def label(self) -> str:
        """Short name of this lowering, for reports and ``tune``."""
        ...

    def candidates(self) -> list[Any]:
        """The variants of this config ``tune`` measures (this one first)."""
        ...


class Target:
    """A backend: says whether it can run here, which passes it wants, and lowers a graph.

    ``lower(gm, context)`` returns a callable taking the model's own arguments (as the user
    calls the model) and returning outputs structured as the model's. The rewrites it makes
    are the ``Pass`` objects ``lowering_passes(gm)`` lists, run and verified by a
    ``PassManager`` one at a time. ``lowering`` is the target's config; ``candidates()`` gives
    one target per variant of it, for ``tune``.
    """

    name: ClassVar[str] = ""
    default_passes: ClassVar[tuple[str, ...]] = DEFAULT_PIPELINE
    lowering: LoweringOptions | None = None

    def check_available(self) -> None:
        """Raise ``DeviceUnavailableError`` when this machine cannot run the target."""

    def lowering_passes(self, gm: fx.GraphModule) -> list[Pass]:
        """The rewrites ``lower`` runs on ``gm``, in order (none by default)."""
        return []

    def lower(self, gm: fx.GraphModule, context: LoweringContext) -> Callable[..., Any]:
        """Turn the optimized graph into a runnable callable."""
        raise NotImplementedError

    def label(self) -> str:
        """The target's name with its lowering's label (``cpu:onednn``), for reports and ``tune``."""
        return self.name if self.lowering is None else f"{self.name}:{self.lowering.label()}"

    def candidates(self) -> list[Target]:
        """The lowerings ``tune`` measures: one copy of this target per candidate of its config (this one first)."""
        if self.lowering is None:
            return [self]
        return [self.with_lowering(option) for option in self.lowering.candidates()]

    def with_lowering(self, lowering: LoweringOptions) -> Target:
        """A copy of this target (its class and settings kept) lowering with ``lowering``."""
        clone = copy.copy(self)
        clone.lowering = lowering
        return clone

    def for_graph(self, gm: fx.GraphModule) -> Target:
        """The lowering this target picks for ``gm`` when the user named the target without a lowering (itself here).

        A target overrides it where one kind of graph runs much faster another way (the ``cpu``
        target sends bfloat16 graphs to OpenVINO where it is installed).
        """
        return self

    def runtime_candidates(self, gm: fx.GraphModule) -> list[Target]:
        """Lowerings of ``gm`` to measure against each other when the target was named without one (none here).

        Where no rule settles which of two runtimes runs a kind of graph faster, ``optimize``
        (without ``tune``) lowers ``gm`` with each one listed, checks and times them on the example
        inputs, and keeps the fastest (``graphopt.targets.tune.lower_model``). The first is the
        target's own lowering.
        """
        return []

    def specializes_decode(self, gm: fx.GraphModule) -> bool:
        """True when a decode step (one token per row) gains from a lowering of its own, with static shapes.

        ``gm`` is the state-lifted step graph. Here: lowerings that compile kernels for the shapes
        they see (``backend="inductor"``); targets add their own cases.
        """
        return getattr(getattr(self, "lowering", None), "backend", "graph") == "inductor"

    def exact_weight_lowering(self) -> Target | None:
        """A copy of this target whose weight-only layers compute exactly as the graph does, when its kernels may not.

        None (the default) when its weight-only kernels already compute as the graph does or it has no other
        form; a compressed model whose lowered steps miss their budget falls back to it.
        """
        return None

    def weight_kernels_round_within_bound(self, gm: fx.GraphModule) -> bool:
        """True when ``gm``'s weight-only layers run kernels whose only departure from the graph is a bounded rounding.

        graphopt's own int4/int8 kernels for onnxruntime (16-bit activations, float16 scales: far
        below the weights' own rounding) are such kernels; int8 activations or bfloat16 kernels are
        not. A loaded model, which has no float model to judge kernels by its budget, keeps these
        and checks them against its saved graph by logit cosine (``LOWERED_MIN_COSINE``).
        """
        return False

    def native_error(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], reference: list[Any]) -> float:
        """Max abs error of the *unoptimized* model run the target's way, vs the CPU reference.

        The final check allows twice this on top of the usual tolerance: graphopt must not
        claim more precision than the device gives the original model (0 for CPU targets).
        """
        return 0.0

    def move_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Put call arguments where the lowered module expects them (identity by default)."""
        return args, kwargs


_TARGETS = {
    "cpu": "graphopt.targets.cpu.target:CpuTarget",
    "gpu": "graphopt.targets.gpu.target:GpuTarget",
    "onnx": "graphopt.targets.onnx.target:OnnxTarget",
}


def available_targets() -> list[str]:
    """Names accepted by ``optimize(target=...)``."""
    return sorted(_TARGETS)


def get_target(name: str | Target) -> Target:
    """A target instance from its name (or the instance itself).

    The built-in targets are imported when first asked for: the onnx target loads onnx (about a
    second of import time), which a cpu-only run never needs.
    """
    if isinstance(name, Target):
        return name
    if name not in _TARGETS:
        raise UnknownTargetError(f"unknown target {name!r}; choose one of {', '.join(available_targets())}")
    module_name, class_name = _TARGETS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
