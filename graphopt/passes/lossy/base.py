"""Passes that change numerics on purpose (quantization, pruning), and the budget they answer to.

An exact pass must keep the outputs to the verification tolerance. A *lossy* pass may not: it
declares so by subclassing ``LossyPass``, and the pass manager checks it against a
``Fidelity`` budget instead (output cosine, or a metric of the user's). One mechanism serves
every lossy family:

1. ``LossyPass.plan(gm, data)`` studies the graph, running it on calibration data if it needs
   to (observers, gradients), and returns a ``LossyPlan``: the independent *units* it would
   change (a layer, a group of coupled channels) and how to apply them.
2. The manager measures every unit's sensitivity (output SQNR and cosine with that unit alone
   applied), applies all units, and checks the budget.
3. While the budget is broken, the most sensitive applied unit falls back (is skipped), one at
   a time; the report lists every unit as kept or fallen back, with why. A budget no fallback
   can meet raises ``FidelityError`` with the best value reached. A unit that declares milder
   schemes (``LossyUnit.milder``: static int8 -> dynamic int8) steps down to those first, and
   leaves the pass only when the mildest one still breaks the budget.

``LossyPlan.apply(gm, skip)`` (plus ``milder={unit: level}`` for plans whose units declare milder
schemes) must be pure in the graph module it is given: it may be called
many times, on fresh structure copies of the planned graph (node names are the same), so it
keeps what it learnt in the plan and registers new tensors instead of writing existing ones.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.errors import InputError
from graphopt.passes.base import Pass, PassResult
from graphopt.report import ReportSection

__all__ = [
    "CalibrationData",
    "Fidelity",
    "LossyPass",
    "LossyPlan",
    "LossyUnit",
    "MIN_BATCHES_TO_HOLD_OUT",
    "output_cosine",
    "output_sqnr_db",
]


@dataclass(frozen=True)
class Fidelity:
    """How far lossy passes may move the model's outputs.

    By default the mean per-sample cosine similarity between the original and the changed
    model's outputs, over the example and calibration inputs, must stay ``>= min_cosine``.
    With ``metric`` (``fn(model) -> float``, higher is better, e.g. accuracy on your validation
    data; ``model`` is called like your original model), the metric may drop at most
    ``max_drop`` below its value on the unchanged graph; the cosine is then measured and
    reported but not enforced. ``enforce=False`` measures and reports without enforcing.
    ``max_batches`` caps how many calibration batches the check runs on.

    **Held-out data.** The budget is judged on data the layers were not chosen on: the
    ``validation=`` batches given to ``optimize``, else the last ``held_out`` share of the
    calibration batches (when there are at least ``MIN_BATCHES_TO_HOLD_OUT``). Observers and the
    per-layer fallback use the rest; a candidate must meet the budget on both, and the report
    shows both figures. ``held_out=0`` judges the budget on the calibration data itself.

    **Language models** (compressed for generation) are judged on held-out text instead:
    ``max_perplexity_ratio`` (perplexity at most that multiple of the float model's, e.g. 1.02)
    and ``min_token_agreement`` (the share of prompts whose first ``agreement_tokens`` greedy
    tokens equal the float model's, e.g. 0.8). The text is ``text`` (a string, tokenized with
    ``tokenizer``), by default a slice of Python's ``pydoc_data.topics`` kept apart from the
    slice the layers' sensitivity is measured on; ``tokenizer`` defaults to the one saved beside
    the model (``AutoTokenizer.from_pretrained(model.name_or_path)``).
    """

    min_cosine: float = 0.99
    metric: Callable[[Callable[..., Any]], float] | None = None
    max_drop: float | None = None
    enforce: bool = True
    max_batches: int = 8
    max_perplexity_ratio: float | None = None
    min_token_agreement: float | None = None
    agreement_tokens: int = 32
    text: str | None = None
    tokenizer: Any = None
    held_out: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 < self.min_cosine <= 1.0:
            raise InputError(f"Fidelity(min_cosine=...) must be in (0, 1], got {self.min_cosine}")
        if self.metric is not None and self.max_drop is None:
            raise InputError("Fidelity(metric=fn) needs max_drop=, the largest drop of fn you accept (e.g. 0.005)")
        if self.max_drop is not None and self.metric is None:
            raise InputError("Fidelity(max_drop=...) needs metric=fn(model) -> float to measure the drop with")
        if self.max_drop is not None and self.max_drop < 0:
            raise InputError(f"Fidelity(max_drop=...) must be >= 0, got {self.max_drop}")
        if self.max_batches < 0:
            raise InputError(f"Fidelity(max_batches=...) must be >= 0, got {self.max_batches}")
        if self.max_perplexity_ratio is not None and not self.max_perplexity_ratio > 0:
            raise InputError(f"Fidelity(max_perplexity_ratio=...) must be > 0 (e.g. 1.02: at most 2% above the "
                             f"float model's perplexity), got {self.max_perplexity_ratio}")
        if self.min_token_agreement is not None and not 0.0 <= self.min_token_agreement <= 1.0:
            raise InputError(f"Fidelity(min_token_agreement=...) is a share of prompts, in [0, 1]; got "
                             f"{self.min_token_agreement}")
        if isinstance(self.agreement_tokens, bool) or not isinstance(self.agreement_tokens, int) \
                or self.agreement_tokens < 1:
            raise InputError(f"Fidelity(agreement_tokens=...) must be a positive int, got {self.agreement_tokens!r}")
        if isinstance(self.held_out, bool) or not 0.0 <= self.held_out < 1.0:
            raise InputError(f"Fidelity(held_out=...) is the share of calibration batches kept apart to judge the "
                             f"budget on, in [0, 1); got {self.held_out!r}")
        if self.text is not None and not isinstance(self.text, str):
            raise InputError("Fidelity(text=...) is the held-out text as one string (it is tokenized with "
                             f"tokenizer=), got {type(self.text).__name__}")

    @property
    def for_language_model(self) -> bool:
        """True when the budget is about held-out text (perplexity, greedy token agreement)."""
        return self.max_perplexity_ratio is not None or self.min_token_agreement is not None

    def describe(self) -> str:
        """The budget in words, for reports and errors."""
        if self.for_language_model:
            parts = []
            if self.max_perplexity_ratio is not None:
                parts.append(f"perplexity <= {self.max_perplexity_ratio:g}x float")
            if self.min_token_agreement is not None:
                parts.append(f"first {self.agreement_tokens} greedy tokens equal to float's on >= "
                             f"{self.min_token_agreement:.0%} of prompts")
            return ", ".join(parts)
        if self.metric is not None:
            name = getattr(self.metric, "__name__", "metric")
            return f"{name} drop <= {self.max_drop:g}"
        return f"output cosine >= {self.min_cosine:g}"


MIN_BATCHES_TO_HOLD_OUT = 3
"""Fewer calibration batches than this are all used for calibration (the budget is then judged on them too)."""


@dataclass
class CalibrationData:
    """Inputs a lossy pass may run the graph on, each as the graph's flat input tuple.

    ``example`` is the example inputs; ``batches`` the calibration batches the user gave
    (empty when none); ``validation`` the batches kept apart to judge budgets on (never seen by
    observers or the choice of layers). Passes that need data they were not given raise
    ``InputError`` saying what to pass (``optimize(..., calibration=loader)``).
    """

    example: tuple[Any, ...] | None
    batches: list[tuple[Any, ...]] = field(default_factory=list)
    validation: list[tuple[Any, ...]] = field(default_factory=list)

    @property
    def all(self) -> list[tuple[Any, ...]]:
        """The example (when there is one) followed by the calibration batches."""
        return ([self.example] if self.example is not None else []) + list(self.batches)


@dataclass
class LossyUnit:
    """One independently applicable change of a lossy plan (a layer, a group of coupled channels).

    ``name`` is stable within the plan (used in ``skip``); ``kind`` says what it is (``linear``,
    ``conv2d``, ``channel-group``...), ``scheme`` how it is changed (``int8 per-channel``,
    ``50% of 64 channels``...); ``details`` are plain values shown in the report (shapes, sizes,
    sparsity...). ``milder``: schemes the unit can step down to before it falls back, mildest
    last (level 1 is ``milder[0]``); a plan with such units takes ``apply(gm, skip, milder)``.
    """

    name: str
    kind: str
    scheme: str
    details: dict[str, Any] = field(default_factory=dict)
    milder: tuple[str, ...] = ()


class LossyPlan(ABC):
    """What a lossy pass decided for one graph: its units, and how to apply any subset of them."""

    units: list[LossyUnit]

    @abstractmethod
    def apply(self, gm: fx.GraphModule, skip: frozenset[str] = frozenset()) -> PassResult:
        """Rewrite ``gm`` (a structure copy of the planned graph) applying every unit not in ``skip``.

        A plan whose units declare ``milder`` schemes also takes ``milder``: ``{unit name: level}``
        for the units applied in their milder scheme number ``level`` (1-based) instead of their own.
        """

    def notes(self) -> list[str]:
        """Facts for the report that are not about one unit (e.g. "no speed-up from unstructured sparsity")."""
        return []

    def sections(self) -> list[ReportSection]:
        """Extra report sections describing the last ``apply`` (e.g. per-layer shapes before/after)."""
        return []


@dataclass(frozen=True)
class LossyPass(Pass):
    """Base class of passes that change numerics on purpose; checked against a ``Fidelity`` budget.

    Subclasses implement ``plan``. Run through ``optimize``/``PassManager`` they get calibration
    data, sensitivity analysis and fallback; ``run(gm)`` alone plans on no data and applies
    every unit (for passes that need no data).
    """

    lossy: ClassVar[bool] = True

    @abstractmethod
    def plan(self, gm: fx.GraphModule, data: CalibrationData) -> LossyPlan:
        """Study ``gm`` (running it on ``data`` if needed, without changing it) and decide the units."""

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Apply every unit with no calibration data and no budget (outside the pass manager)."""
        return self.plan(gm, CalibrationData(example=None)).apply(gm, frozenset())


def is_lossy(pass_: Pass) -> bool:
    """True for passes that declare they change numerics."""
    return bool(getattr(pass_, "lossy", False))


def _float_leaves(outputs: Any) -> list[torch.Tensor]:
    """The float tensors in ``outputs`` (a tensor, or any nesting of lists, tuples and dicts)."""
    leaves = pytree.tree_leaves(outputs)
    return [o for o in leaves if isinstance(o, torch.Tensor) and o.is_floating_point() and o.numel() > 0]


def output_cosine(reference: Any, actual: Any) -> float:
    """Mean per-sample cosine similarity of float outputs (dim 0 is the sample), worst over outputs.

    Scalars and 1-D outputs count as one sample. Identical zero vectors count as 1.0. A sample
    whose output is inf or NaN where the reference's is finite (a float16 overflow) counts as
    -1.0, the worst cosine there is, so that no budget passes it.
    """
    worst = 1.0
    for ref, out in zip(_float_leaves(reference), _float_leaves(actual), strict=True):
        ref64 = ref.detach().double().cpu()
        out64 = out.detach().double().cpu()
        rows = ref64.reshape(ref64.shape[0], -1) if ref64.dim() >= 2 else ref64.reshape(1, -1)
        got = out64.reshape(rows.shape)
        dot = (rows * got).sum(1)
        norms = rows.norm(dim=1) * got.norm(dim=1)
        same = (rows == got).all(1)
        cosine = torch.where(norms > 0, dot / norms.clamp_min(1e-300), same.double())
        broken = (~torch.isfinite(got) & torch.isfinite(rows)).any(1) | cosine.isnan()
        worst = min(worst, float(torch.where(broken, -1.0, cosine).mean()))
    return worst


def output_sqnr_db(reference: Any, actual: Any) -> float:
    """Signal-to-quantization-noise ratio of the float outputs in dB (worst over outputs; inf if exact)."""
    worst = math.inf
    for ref, out in zip(_float_leaves(reference), _float_leaves(actual), strict=True):
        ref64 = ref.detach().double().cpu()
        noise = float((ref64 - out.detach().double().cpu()).pow(2).sum())
        signal = float(ref64.pow(2).sum())
        if noise == 0:
            continue
        worst = min(worst, 10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    return worst
