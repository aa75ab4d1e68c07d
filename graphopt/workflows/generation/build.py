"""Build the lowered prefill and decode steps of a causal LM for one batch size.

One capture serves both steps: the cached decoder (``decoder.CachedDecoder``) is captured once
with a dynamic sequence length (1 to ``max_cache_len``), its cache writes kept as declared state
updates; the target's exact passes run on it, verified with the state restored after every check;
then the state is lifted into inputs and outputs (``graphopt.ir.state``) and the one graph is
lowered twice: for the prompt (dynamic length) and for the one-token decode step (static shapes,
which is what compilers and CUDA graphs want).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.fx as fx
from torch import nn

from graphopt.errors import CaptureError, FidelityError, VerificationError
from graphopt.ir.capture import capture, eval_twin
from graphopt.ir.shapes import DynamicDims
from graphopt.ir.state import LiftedState, lift_state, merge_equal_state
from graphopt.ir.verify import compare_outputs
from graphopt.passes.base import Pass
from graphopt.passes.cleanup import CommonSubexpressionElimination
from graphopt.passes.lossy.base import output_cosine
from graphopt.passes.manager import PassManager
from graphopt.report import Report
from graphopt.targets.base import LoweringContext, Target
from graphopt.workflows.generation.compression import StepCompression, check_lowered, decide_compression
from graphopt.workflows.generation.decoder import CachedDecoder, step_inputs
from graphopt.workflows.generation.loop import DecoderSteps
from graphopt.workflows.lowering_fallback import lowered_or_fallback

__all__ = ["BuiltSteps", "GraphStep", "LoweredSteps", "StepReference", "TracedSteps", "build_steps", "check_steps",
           "example_prompt", "lower_steps", "trace_steps"]

log = logging.getLogger("graphopt")


class LoweredSteps:
    """:class:`~graphopt.workflows.generation.loop.DecoderSteps` over two lowered state-lifted graphs.

    Each runner is called as ``runner(ids, mask, positions, *state)`` and returns
    ``(logits, *new_state)``; the new state is the next call's input (a runner that updates the
    state in place returns the same tensors).
    """

    def __init__(self, prefill: Any, decode: Any, initial: list[torch.Tensor], batch_size: int,
                 max_cache_len: int, device: torch.device | str = "cpu") -> None:
        self._prefill, self._decode = prefill, decode
        self._initial = [t.to(device).clone() for t in initial]  # lowerings may have run on the originals
        self.device = torch.device(device)
        self.batch_size, self.max_cache_len = batch_size, max_cache_len
        self.host_threads = 1 if getattr(decode, "runs_outside_torch", False) else None
        self.state: list[torch.Tensor] = []
        self.reset()

    def reset(self) -> None:
        """Start from the empty cache."""
        self.state = [t.clone() for t in self._initial]

    def _run(self, runner: Any, *inputs: torch.Tensor) -> torch.Tensor:
        moved = [t.to(self.device) for t in inputs]
        with torch.inference_mode():
            logits, *state = runner(*moved, *self.state)
        self.state = state
        return logits

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
                ) -> torch.Tensor:
        """Run the prompt through the prefill runner."""
        return self._run(self._prefill, input_ids, attention_mask, position_ids)

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
               ) -> torch.Tensor:
        """Run one token per row through the decode runner."""
        return self._run(self._decode, input_ids, attention_mask, position_ids)


@dataclass
class BuiltSteps:
    """What :func:`build_steps` made: the steps, the verified portable graph, and how long each part took."""

    steps: LoweredSteps
    lifted: LiftedState
    example: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    dynamic: DynamicDims
    seconds: dict[str, float] = field(default_factory=dict)
    weight_fallback: str | None = None
    """The label (``Target.label``) of the more exact lowering the steps fell back to when the weight-only
    kernels missed the budget (``Target.exact_weight_lowering``); saved, so that a loaded model starts there."""
    target: Target | None = None
    """The target the steps were built for: the one asked for, or the fallback where that one could not lower
    them (``lowered_or_fallback``); None in a loaded model."""


LOWERED_MIN_COSINE = 0.999
"""Logit cosine a compressed model's lowered steps keep to its graph (their tokens then answer to the budget)."""

EXAMPLE_PROMPT_TOKENS = 8
"""Prompt tokens the steps are captured and verified on (verification cost grows with it)."""


def example_prompt(input_ids: torch.Tensor, batch_size: int, max_cache_len: int) -> torch.Tensor:
    """A prompt of ``batch_size`` rows, 2 to ``EXAMPLE_PROMPT_TOKENS`` tokens (a length of 1 would be specialized)."""
    ids = input_ids[:1].expand(batch_size, -1) if input_ids.shape[0] != batch_size else input_ids
    if ids.shape[1] < 2:
        ids = torch.cat([ids, ids], dim=1)
    return ids[:, -max(2, min(ids.shape[1], EXAMPLE_PROMPT_TOKENS, max_cache_len // 2)):].contiguous()


def _cached_decoder(model: nn.Module, batch_size: int, max_cache_len: int) -> CachedDecoder:
    return CachedDecoder(eval_twin(model, share_weights=True), batch_size, max_cache_len)


@dataclass
class TracedSteps:
    """A causal LM's step, captured and optimized for one batch size: state lifted, not lowered yet.

    ``decoder`` is the model with its cache in buffers, ``prompt`` the example prompt, ``example``
    its prefill step's inputs, ``dynamic`` the step's dynamic dims (its sequence length).
    """

    decoder: CachedDecoder
    prompt: torch.Tensor
    example: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    dynamic: DynamicDims
    lifted: LiftedState
    seconds: dict[str, float] = field(default_factory=dict)


def trace_steps(model: nn.Module, input_ids: torch.Tensor, batch_size: int, max_cache_len: int, passes: list[Pass],
                report: Report, *, verify: bool = True, on_error: str = "rollback",
                compression: StepCompression | None = None) -> TracedSteps:
    """Capture ``model``'s step for ``batch_size`` rows, run ``passes`` (verified), compress, lift the state.

    ``compression`` compresses the weights after the exact passes: decided (and judged on held-out
    text) on the first build, reused as decided on later ones.
    """
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    decoder = _cached_decoder(model, batch_size, max_cache_len)
    prompt = example_prompt(input_ids, batch_size, max_cache_len)
    example = step_inputs(prompt, torch.ones_like(prompt), max_cache_len)
    seq = torch.export.Dim("seq", min=1, max=max_cache_len)
    dynamic_shapes = ({1: seq}, None, {1: seq})
    try:
        captured = capture(decoder, example, dynamic_shapes=dynamic_shapes, share_weights=True)
    except CaptureError:
        if not decoder.bound_fill_counts():
            raise
        captured = capture(decoder, example, dynamic_shapes=dynamic_shapes, share_weights=True)
        report.notes.append("generation: the model sizes something by the cache's fill count (get_seq_length), "
                            f"which failed capture as a tensor; captured again with it as an integer in [0, "
                            f"{max_cache_len}] (torch.export resolves such sizes from those bounds)")
    seconds["capture"] = time.perf_counter() - started
    report.capture_seconds += seconds["capture"]
    report.notes.extend(n for n in captured.notes if "training mode" not in n)

    started = time.perf_counter()
    manager = PassManager(passes, verify=verify, on_error=on_error)  # type: ignore[arg-type]
    gm = manager.run(captured.graph_module, captured.flat_inputs, report, captured.graph_outputs)
    seconds["passes"] = time.perf_counter() - started
    if compression is not None:
        started = time.perf_counter()
        if compression.decision is None:
            compression.decision = decide_compression(decoder.model, gm, compression.asked, report)
        compression.decision.apply(gm)
        seconds["compression"] = time.perf_counter() - started
    lifted = lift_state(gm)
    _merge_equal_state(lifted, report)
    return TracedSteps(decoder, prompt, example, captured.dynamic, lifted, seconds)


def build_steps(model: nn.Module, input_ids: torch.Tensor, batch_size: int, max_cache_len: int, target: Target,
                passes: list[Pass], report: Report, *, verify: bool = True, on_error: str = "rollback",
                compression: StepCompression | None = None, fallback: Target | None = None) -> BuiltSteps:
    """Capture, optimize (verified) and lower ``model``'s prefill and decode steps for ``batch_size`` rows.

    ``compression`` as in :func:`trace_steps`. ``fallback``: the steps are lowered for it when
    ``target`` cannot lower them (``lowered_or_fallback``); ``BuiltSteps.target`` says which.
    """
    traced = trace_steps(model, input_ids, batch_size, max_cache_len, passes, report, verify=verify,
                         on_error=on_error, compression=compression)
    seconds, lifted, example = traced.seconds, traced.lifted, traced.example
    started = time.perf_counter()
    steps, target = lowered_or_fallback(
        lambda chosen: lower_steps(lifted, example, traced.dynamic, chosen, report, on_error=on_error),
        target, fallback, report.notes, "the generation steps")
    seconds["lowering"] = time.perf_counter() - started
    report.lowering_seconds += seconds["lowering"]
    weight_fallback = None
    if verify:
        started = time.perf_counter()
        if compression is None:
            check_steps(steps, traced.decoder, traced.prompt, report, target.name)
        else:
            steps, weight_fallback = _check_compressed(steps, lifted, traced.prompt, compression, example,
                                                       traced.dynamic, target, report, on_error)
        seconds["check"] = time.perf_counter() - started
    return BuiltSteps(steps, lifted, example, traced.dynamic, seconds, weight_fallback, target)


def _check_compressed(steps: LoweredSteps, lifted: LiftedState, prompt: torch.Tensor, compression: StepCompression,
                      example: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dynamic: DynamicDims, target: Target,
                      report: Report, on_error: str) -> tuple[LoweredSteps, str | None]:
    """Check compressed steps against their graph and the budget; lower them more exactly while they miss it.

    Weight-only kernels may compute less exactly than the graph: int8 activations
    (``weight_only_activations="int8"``), graphopt's kernels on 16-bit activations, PyTorch's
    int8/int4 kernels in bfloat16. When the steps drift from the graph or break the budget's token
    agreement, the target's next more exact lowering (``Target.exact_weight_lowering``: float
    activations, then onnxruntime's float kernels instead of graphopt's, or float weights computed
    once) is tried; only when the last one misses too does the error reach the user. Returns the
    steps kept and, when they are a fallback, the label of their target.
    """
    assert compression.decision is not None
    reference = GraphStep(lifted, steps.batch_size, steps.max_cache_len)
    fallback = None
    while True:
        try:
            check_steps(steps, reference, prompt, report, target.name, against="the compressed step graph",
                        min_cosine=LOWERED_MIN_COSINE)
            check_lowered(compression.decision, steps, report)
            return steps, fallback
        except (FidelityError, VerificationError) as error:
            exact = target.exact_weight_lowering()
            if exact is None:
                raise
            report.notes.append(f"the weight-only kernels of lowering '{target.lowering.label()}' missed the budget "
                                f"({error}); the steps were lowered again more exactly, as "
                                f"'{exact.lowering.label()}'")
            target, fallback = exact, exact.label()
            steps = lower_steps(lifted, example, dynamic, target, report, on_error=on_error)


def lower_steps(lifted: LiftedState, example: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dynamic: DynamicDims,
                target: Target, report: Report | None, *, on_error: str = "rollback") -> LoweredSteps:
    """Lower the state-lifted step graph for the prompt and for the one-token decode step.

    ``example`` is the prefill step's inputs (a prompt, its cache-wide mask, its positions; the
    batch size and ``max_cache_len`` are read from the mask), ``dynamic`` the step's dynamic dims
    (the sequence length; the state is static). The prefill lowering keeps the sequence length
    dynamic; targets that gain from static shapes (``Target.specializes_decode``: Inductor, graphopt's int4/int8
    kernels in onnxruntime) get a second lowering for one token.
    ``lifted.initial`` is the empty cache every generation starts from.
    """
    state = lifted.initial
    batch_size, max_cache_len = example[1].shape
    prefill = target.lower(lifted.graph_module, LoweringContext(
        (*example, *state), dynamic=_with_state(dynamic, len(state)), report=report, on_error=on_error,
        state_inputs=len(state)))
    decode = prefill
    if target.specializes_decode(lifted.graph_module):
        prompt = example[0]
        one = step_inputs(prompt[:, :1], torch.ones_like(prompt[:, :1]), max_cache_len)
        decode = target.lower(lifted.graph_module, LoweringContext((*one, *state), report=report, on_error=on_error,
                                                                   state_inputs=len(state)))
    return LoweredSteps(prefill, decode, state, batch_size, max_cache_len, device=_target_device(target))


def _merge_equal_state(lifted: LiftedState, report: Report) -> None:
    """State that always equals other state read once (``merge_equal_state``), then what that duplicated merged."""
    merged = merge_equal_state(lifted)
    if merged:
        gm = lifted.graph_module
        CommonSubexpressionElimination().run(gm)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        report.notes.append(f"generation: {merged} state tensor(s) always equal to another (same start, same "
                            "update) are read through that one; their common computations merged")


def _with_state(dynamic: DynamicDims, count: int) -> DynamicDims:
    """``dynamic`` for the lifted graph: the state inputs after the step's inputs are static."""
    return DynamicDims([*dynamic.dims, *({} for _ in range(count))], dict(dynamic.ranges))


def _target_device(target: Target) -> str:
    return "cuda" if target.name == "gpu" else "cpu"


class StepReference(Protocol):
    """What lowered steps are checked against: one step per call over its own cache, and a way to empty it."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
                 ) -> torch.Tensor:
        """One step (prompt or token): the last position's logits ``[batch, vocab]``."""

    def reset(self) -> None:
        """Empty the cache."""


class GraphStep:
    """The state-lifted step graph run as it is, unlowered, carrying its own cache: a :class:`StepReference`."""

    def __init__(self, lifted: LiftedState, batch_size: int, max_cache_len: int) -> None:
        gm = lifted.graph_module
        self._steps = LoweredSteps(gm, gm, lifted.initial, batch_size, max_cache_len)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
                 ) -> torch.Tensor:
        """One step through the graph."""
        return self._steps.prefill(input_ids, attention_mask, position_ids)

    def reset(self) -> None:
        """Empty the cache."""
        self._steps.reset()


def check_steps(steps: DecoderSteps, reference: StepReference, prompt: torch.Tensor, report: Report, target: str,
                new_tokens: int = 4, against: str = "the model with its static cache",
                min_cosine: float | None = None) -> None:
    """Greedy-decode a few tokens with the lowered steps and with ``reference``; every step's logits must match.

    Match means within the verification tolerance, or, when ``min_cosine`` is given (a compressed
    model, whose kernels may round differently from its graph: PyTorch's int4 kernel computes in
    bfloat16), a logit cosine of at least ``min_cosine``. Raises ``VerificationError`` at the
    first step that differs; notes the check in ``report``.
    """
    worst, lowest_cosine = 0.0, 1.0
    steps.reset()
    reference.reset()
    ids, mask, positions = step_inputs(prompt, torch.ones_like(prompt), steps.max_cache_len)
    with torch.no_grad():
        for index in range(new_tokens):
            expected = reference(ids, mask, positions)
            run = steps.prefill if index == 0 else steps.decode
            actual = run(ids, mask, positions).cpu()
            comparison = compare_outputs([actual], [expected])
            worst = max(worst, comparison.max_abs_diff)
            cosine = output_cosine(expected, actual)
            lowest_cosine = min(lowest_cosine, cosine)
            if not (comparison.ok or (min_cosine is not None and cosine >= min_cosine)):
                allowed = f" and logit cosine {cosine:.6f} < {min_cosine}" if min_cosine is not None else ""
                raise VerificationError(f"the generation steps lowered to {target!r} differ from {against} at step "
                                        f"{index}: {comparison.detail}{allowed}", f"lower-{target}")
            token = expected.argmax(-1, keepdim=True)
            length = prompt.shape[1] + index
            mask = mask.clone()
            mask[:, length] = 1
            ids, positions = token, positions[:, -1:] + 1
    reference.reset()
    steps.reset()
    report.final_max_abs_diff = max(report.final_max_abs_diff or 0.0, worst)
    report.final_check = "passed"
    report.notes.append(f"generation steps checked against {against}: prefill + "
                        f"{new_tokens - 1} decode steps, max |Δ logits| {worst:.2e}, lowest logit cosine "
                        f"{lowest_cosine:.6f}")


def graph_of(built: BuiltSteps) -> fx.GraphModule:
    """The portable, state-lifted step graph (what ONNX export and save start from)."""
    return built.lifted.graph_module
