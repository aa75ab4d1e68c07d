"""Weight-only compression of a language model for generation, within a perplexity and token-agreement budget.

The step graph is where weights are compressed (``WeightOnly``'s dequantize nodes, lowered to
int4/int8 kernels), but a step returns one position's logits, and the budget is about whole
texts. So the budget is judged on the float model with each compressed layer's weight replaced
by the values the graph will compute with (``WeightOnly.dequantized``: the same values, row for
row, also for layers a fusion merged), over held-out text (``language_budget``):

1. plan the scheme on the optimized step graph: its units are the layers it would compress,
   each traced back to the modules of the user's model it came from (``FUSED_FROM`` for a fused
   Q/K/V or gate/up projection);
2. rank the units by sensitivity: the output SQNR of each layer with its weight compressed, on
   the activations of calibration text (a slice of text kept apart from the budget's);
3. measure the whole compressed model on the held-out text; while it breaks the budget, the
   least robust units fall back (1, 2, 4, ... at a time), most sensitive first.

After lowering, the steps are checked against the compressed step graph logit for logit, and
their own greedy tokens against the float model's on the budget's prompts (``check_lowered``).

Units fall back one level at a time: int4 -> int8 (group-wise) -> float; an int8 scheme's go
straight to float. The decision is a ``WeightOnly`` with the fallen-back layers in
``int8_layers`` and ``skip``: every batch size's steps are compressed by it, with no new
measurement. The report gets a per-unit section (and a plot) and the figures before and after.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphopt.errors import FidelityError, InputError
from graphopt.ir.graph import FUSED_FROM, module_path
from graphopt.passes.lossy.base import CalibrationData, Fidelity
from graphopt.passes.quantize.weight_only import WeightOnly, WeightOnlyPlan
from graphopt.report import PlotSpec, Report, ReportSection
from graphopt.report.progress import progress
from graphopt.workflows.generation.language_budget import LanguageBudget, LanguageMeasurement
from graphopt.workflows.generation.loop import run_generation

__all__ = ["CompressionDecision", "GenerationCompression", "StepCompression", "check_lowered", "decide_compression"]

DECODER_PREFIX = "model."
"""Module paths in the step graph start with the cached decoder's attribute holding the user's model."""
SENSITIVITY_ROWS = 1024
"""Activation rows per layer the sensitivity is measured on."""


@dataclass(frozen=True)
class GenerationCompression:
    """What the user asked for: a weight-only scheme and the budget it answers to."""

    scheme: WeightOnly
    fidelity: Fidelity


@dataclass
class _Unit:
    """One compressed layer of the step graph and the user's modules its weight came from."""

    name: str
    kind: str
    scheme: str
    paths: list[str]
    transposed: bool
    bytes_before: int
    bytes_after: int
    features: int
    sqnr_db: float | None = None
    status: str = "kept"
    bits: int = 0


@dataclass
class CompressionDecision:
    """The scheme every step graph is compressed with (fallen-back layers in its ``skip``), and why."""

    scheme: WeightOnly
    fidelity: Fidelity
    float_figures: str
    measurement: LanguageMeasurement
    units: list[_Unit] = field(default_factory=list)
    budget: LanguageBudget | None = None

    def apply(self, gm: fx.GraphModule) -> dict[str, Any]:
        """Compress ``gm``'s weights by the decision; returns the pass's stats."""
        result = self.scheme.plan(gm, CalibrationData(example=None)).apply(gm, frozenset())
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return result.stats


@dataclass
class StepCompression:
    """The compression of a generation model's steps: what was asked, and (after the first build) what was decided."""

    asked: GenerationCompression
    decision: CompressionDecision | None = None


def decide_compression(model: nn.Module, gm: fx.GraphModule, asked: GenerationCompression,
                       report: Report) -> CompressionDecision:
    """Choose which of ``gm``'s layers ``asked.scheme`` compresses so that ``asked.fidelity`` holds on ``model``."""
    fidelity = asked.fidelity
    scheme = asked.scheme
    plan = scheme.plan(gm, CalibrationData(example=None))
    undivided = sorted({reason for reason in plan.near_misses.values() if "not divisible by" in reason})
    if undivided or not plan.units:
        reasons = "; ".join(undivided or sorted(set(plan.near_misses.values())))[:400]
        raise InputError(f"{scheme.scheme} cannot compress every layer of this language model ({reasons or 'none'}). "
                         "Choose a group_size dividing the layers' input features (e.g. 32), or skip= those layers.")
    units = _units(plan, gm, model)
    levels = [4, 8, 0] if scheme.bits == 4 else [8, 0]  # 0: float
    budget = LanguageBudget(model, fidelity)
    compressed = {levels[0]: _compressed_weights(model, units, scheme, levels[0])}
    _measure_sensitivity(model, units, compressed[levels[0]], budget.calibration)
    order = sorted(range(len(units)), key=lambda i: units[i].sqnr_db if units[i].sqnr_db is not None else math.inf)
    for level in progress(_fallback_levels(order, len(levels)), desc=f"{scheme.scheme}: the budget on held-out text"):
        weights = {}
        for index, unit in enumerate(units):
            bits = levels[level[index]]
            if bits:
                if bits not in compressed:
                    compressed[bits] = _compressed_weights(model, units, scheme, bits)
                weights.update(compressed[bits][unit.name])
        with _weights_replaced(model, weights):
            measurement = budget.measure_model(model)
        if not fidelity.enforce or measurement.meets(fidelity):
            break
    else:
        raise FidelityError(f"no choice of layers to compress meets the budget ({fidelity.describe()}): with "
                            f"every layer in float, {measurement.describe()}. Loosen the budget.", scheme.name)
    int8_layers, skip = [], []
    for index, unit in enumerate(units):
        bits = levels[level[index]]
        unit.bits = bits
        if bits != levels[0]:
            unit.status = f"fell back to {'float' if bits == 0 else 'int8'}"
            (int8_layers if bits == 8 else skip).append(DECODER_PREFIX + unit.paths[0])
    decided = replace(scheme, skip=(*scheme.skip, *skip), int8_layers=(*scheme.int8_layers, *int8_layers))
    decision = CompressionDecision(decided, fidelity, f"float perplexity {budget.float_perplexity:.3f}", measurement,
                                   units, budget)
    _report(decision, budget, report)
    _report_uncovered(model, units, report)
    return decision


UNCOVERED_SHARE = 0.05
"""Float weights outside every compressed layer worth a report note, as a share of the model's weight bytes."""


def _report_uncovered(model: nn.Module, units: list[_Unit], report: Report) -> None:
    """Note the weights no compressed layer reads (a mixture of experts' 3-D expert tensors), when they matter."""
    covered = {id(_weight_of(model, path)) for unit in units for path in unit.paths}
    weights = {name: p for name, p in model.named_parameters() if p.dim() >= 2}
    total = sum(p.numel() * p.element_size() for p in weights.values())
    left = {name: p.numel() * p.element_size() for name, p in weights.items() if id(p) not in covered}
    if total and sum(left.values()) > UNCOVERED_SHARE * total:
        largest = sorted(left, key=left.__getitem__, reverse=True)[:3]
        why = ("a mixture of experts' 3-D expert tensors, read by transformers' grouped matmul, are not compressed "
               "yet" if any(weights[name].dim() == 3 for name in left) else "the ops reading them are not rewritten")
        report.notes.append(
            f"weight-only compression left {sum(left.values()) / 1e6:.1f} MB of the model's {total / 1e6:.1f} MB of "
            f"weights in float: no layer it compresses reads them as a matrix (the largest: {', '.join(largest)}; "
            f"{why})")


def _fallback_levels(order: list[int], count: int) -> Iterator[list[int]]:
    """Each unit's rung on a ladder of ``count`` (0: as asked), for every candidate in the order they are tried.

    First every unit as asked; then, rung by rung, the units still on that rung move one down,
    in ``order`` (most sensitive first), 1, 2, 4, ... at a time; the last candidate has every
    unit on the last rung (float).
    """
    level = [0] * len(order)
    yield list(level)
    for rung in range(count - 1):
        movable = [index for index in order if level[index] == rung]
        step = 1
        while movable:
            for index in movable[:step]:
                level[index] = rung + 1
            movable = movable[step:]
            step *= 2
            yield list(level)


def _units(plan: WeightOnlyPlan, gm: fx.GraphModule, model: nn.Module) -> list[_Unit]:
    """The plan's units with the module paths (in ``model``) of the weights each one compresses."""
    nodes = {node.name: node for node in gm.graph.nodes}
    units = []
    for unit in plan.units:
        layer = plan.layers[unit.name]
        node = nodes[unit.name]
        paths = [p.removeprefix(DECODER_PREFIX) for p in node.meta.get(FUSED_FROM) or [module_path(node)]]
        paths = [p for p in paths if _weight_of(model, p) is not None]
        if not paths:
            raise InputError(f"layer {unit.name} of the step graph has no module with a weight in the model; cannot "
                             "judge its compression on the model (skip it: WeightOnly(skip=[...]))")
        details = unit.details
        units.append(_Unit(unit.name, unit.kind, unit.scheme, paths, _stored_transposed(model, paths, layer.site),
                           int(details.get("bytes_before", 0)), int(details.get("bytes_after", 0)),
                           int(layer.site.matrix.shape[1])))
    return units


def _stored_transposed(model: nn.Module, paths: list[str], site: Any) -> bool:
    """Whether the modules at ``paths`` keep their weight ``[in, out]`` (transformers' ``Conv1D``, GPT-2's).

    Read from the modules, not from the graph: a graph may read an ``nn.Linear``'s weight
    through a transposed constant (Falcon's projections do, after constant folding), while the
    sensitivity and the weights swapped in are the module's own.
    """
    modules = [model.get_submodule(path) for path in paths]
    if all(isinstance(module, (nn.Linear, nn.Embedding)) for module in modules):
        return False
    if all(type(module).__name__ == "Conv1D" for module in modules):
        return True
    return bool(site.transposed)


def _weight_of(model: nn.Module, path: str) -> torch.Tensor | None:
    try:
        weight = getattr(model.get_submodule(path), "weight", None)
    except AttributeError:
        return None
    return weight if isinstance(weight, torch.Tensor) else None


def _compressed_weights(model: nn.Module, units: list[_Unit], scheme: WeightOnly,
                        bits: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per unit, per module path: the weight as the graph computes with it at ``bits`` (in the module's layout)."""
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for unit in units:
        weights[unit.name] = {}
        for path in unit.paths:
            weight = _weight_of(model, path)
            assert weight is not None
            matrix = weight.detach().t() if unit.transposed else weight.detach()
            values = scheme.dequantized(matrix, unit.kind, bits)
            weights[unit.name][path] = values.t().contiguous() if unit.transposed else values
    return weights


@contextlib.contextmanager
def _weights_replaced(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """``model`` with the weights of the modules at the given paths replaced (tied weights untied), then restored."""
    saved = {}
    for path, values in weights.items():
        module = model.get_submodule(path)
        saved[path] = module.weight
        module.weight = nn.Parameter(values, requires_grad=False)
    try:
        yield
    finally:
        for path, weight in saved.items():
            model.get_submodule(path).weight = weight


@torch.no_grad()
def _measure_sensitivity(model: nn.Module, units: list[_Unit], weights: dict[str, dict[str, torch.Tensor]],
                         calibration: torch.Tensor) -> None:
    """Each unit's output SQNR (dB) with its weight compressed, on the float model's activations of ``calibration``."""
    inputs: dict[str, torch.Tensor] = {}
    paths = {path for unit in units for path in unit.paths}

    def keep(path: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            rows = args[0].reshape(-1, args[0].shape[-1]) if args[0].is_floating_point() else args[0].reshape(-1)
            step = max(1, rows.shape[0] // SENSITIVITY_ROWS)
            inputs.setdefault(path, rows[::step][:SENSITIVITY_ROWS].clone())
        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(keep(p)) for p in paths]
    try:
        model(input_ids=calibration, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for unit in progress(units, desc="language model: each layer's sensitivity"):
        signal = noise = 0.0
        for path in unit.paths:
            x = inputs.get(path)
            if x is None:
                continue
            if unit.kind == "embedding" and type(model.get_submodule(path)).forward is not nn.Embedding.forward:
                x = None  # its first input need not be its indices
            weight = _weight_of(model, path)
            assert weight is not None
            reference, compressed = _layer_outputs(x, weight.detach(), weights[unit.name][path], unit)
            signal += float(reference.double().pow(2).sum())
            noise += float((compressed.double() - reference.double()).pow(2).sum())
        if signal > 0:
            unit.sqnr_db = math.inf if noise == 0 else 10 * math.log10(signal / noise)


def _layer_outputs(x: torch.Tensor | None, weight: torch.Tensor, compressed: torch.Tensor, unit: _Unit
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's outputs on its inputs ``x`` with the float and with the compressed weight.

    ``x`` None: an embedding whose first input is not its indices (OPT's learned positions take
    the attention mask), judged on its whole table.
    """
    if x is None:
        return weight, compressed
    if unit.kind == "embedding":
        return weight[x], compressed[x]
    if unit.transposed:  # a [K, N] weight (GPT-2's Conv1D)
        return x @ weight, x @ compressed
    return x @ weight.reshape(weight.shape[0], -1).t(), x @ compressed.reshape(compressed.shape[0], -1).t()


def check_lowered(decision: CompressionDecision, steps: Any, report: Report) -> LanguageMeasurement:
    """Greedy tokens of the lowered ``steps`` on the budget's prompts against the float model's; raises past the budget.

    The perplexity is the compressed graph's (the lowered steps were checked step by step against
    it before this, to its tolerance or a logit cosine of 0.999); the agreement is the lowered
    steps' own, so kernels that round differently from the graph answer to the budget here.
    """
    budget = decision.budget
    assert budget is not None
    tokens = []
    new = decision.fidelity.agreement_tokens
    for prompt in budget.prompts:
        rows = prompt.unsqueeze(0).expand(steps.batch_size, -1)
        out = run_generation(steps, rows, max_new_tokens=new, eos_token_id=[], min_new_tokens=new)
        tokens.append(out[0, rows.shape[1]:])
    measured = budget.measure(decision.measurement.perplexity, torch.stack(tokens))
    report.notes.append(f"lowered steps: first {new} greedy tokens equal to the float model's on "
                        f"{measured.agreement:.0%} of {len(tokens)} held-out prompts (mean "
                        f"{measured.matched_tokens:.1f} leading tokens)")
    fidelity = decision.fidelity
    wanted = fidelity.min_token_agreement
    if fidelity.enforce and wanted is not None and measured.agreement < wanted:
        raise FidelityError(f"the lowered generation steps keep the float model's greedy tokens on "
                            f"{measured.agreement:.0%} of prompts, below the budget's {wanted:.0%} (the "
                            f"compressed graph gave {decision.measurement.agreement:.0%}): try another lowering, or "
                            "a budget that keeps more layers in float", decision.scheme.name)
    return measured


def _stored_bytes(unit: _Unit, scheme: WeightOnly) -> int:
    """Bytes of a unit's weight as stored: as planned, float, or int8 (one byte per weight plus its scales)."""
    if unit.status == "kept":
        return unit.bytes_after
    if unit.bits == 0:
        return unit.bytes_before
    weights = unit.bytes_before // 4
    group = scheme.group_for(unit.features, 8)
    return weights + 4 * (weights // group if group else weights // unit.features)


def _level_name(unit: _Unit, scheme: WeightOnly) -> str:
    if unit.status == "kept":
        return unit.scheme
    group = scheme.group_for(unit.features, 8)
    return "float" if unit.bits == 0 else f"int8 weight-only, {f'group {group}' if group else 'per channel'} symmetric"


def _report(decision: CompressionDecision, budget: LanguageBudget, report: Report) -> None:
    units = decision.units
    fallen = [u for u in units if u.status != "kept"]
    int8 = sum(1 for u in fallen if u.bits == 8)
    before = sum(u.bytes_before for u in units)
    after = sum(_stored_bytes(u, decision.scheme) for u in units)
    report.notes.append(
        f"{decision.scheme.scheme}: {len(units) - len(fallen)} of {len(units)} layers compressed as asked, {int8} "
        f"fell back to int8 and {len(fallen) - int8} to float by the budget ({decision.fidelity.describe()}); their "
        f"weights {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB. On held-out text: {decision.measurement.describe()} "
        f"({decision.float_figures}); {budget.describe_text()}")
    rows = [[u.name, u.kind, _level_name(u, decision.scheme), ", ".join(u.paths),
             None if u.sqnr_db is None or not math.isfinite(u.sqnr_db) else round(u.sqnr_db, 2), u.status,
             u.bytes_before, _stored_bytes(u, decision.scheme)] for u in units]
    plot = PlotSpec(kind="barh", title="output SQNR of each layer compressed alone (calibration text; higher is safer)",
                    x_labels=[u.name for u in units],
                    series={"SQNR dB": [u.sqnr_db if u.sqnr_db is not None and math.isfinite(u.sqnr_db) else None
                                        for u in units]},
                    y_label="dB", marked=[i for i, u in enumerate(units) if u.status != "kept"],
                    marked_label="kept in float")
    report.sections.append(ReportSection(
        f"{decision.scheme.name}: per layer (generation)",
        f"{decision.measurement.describe()}; budget {decision.fidelity.describe()}",
        ["unit", "kind", "scheme", "modules", "SQNR dB (alone)", "status", "bytes before", "bytes after"], rows,
        [plot]))
