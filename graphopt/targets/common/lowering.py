"""Running a target's lowering passes: one ``PassManager``, each pass verified against the graph before it.

Every rewrite a target makes (channels-last, fused epilogues, int8 and weight-only kernels,
custom ops before an ONNX export...) is a ``Pass``. ``run_lowering`` runs a target's ordered
list of them through the pass manager on the example inputs: a pass that fails verification is
rolled back and reported (``context.on_error="rollback"``) or raises (``"raise"``), and every
pass leaves a ``PassRecord`` (counts in ``stats``, near misses by reason) that
``LoweringResult.report`` turns into the lowering's report section.

How a pass is verified depends on what it claims:

- an **exact** pass (the default) must keep the outputs of the graph before it to the usual
  tolerance, times the target's own factor (kernels that round differently: TF32 cuDNN
  convolutions, oneDNN in bfloat16) and ``context.tolerance_scale``;
- a **kernel-substituting** pass (``KernelSubstitution``: int8 kernels in place of the QDQ
  reference, weight-only kernels with bfloat16 activations, the ops onnxruntime runs as int8
  kernels) computes on purpose like the ops it replaces but not bit for bit: an int8 kernel
  requantizes once where the reference rounds twice, and in a graph that quantizes its
  activations any change of float rounding can move a value by a whole quantum downstream. It is
  held to the fidelity budget against the graph before it. The budget (``context.fidelity``;
  the default ``Fidelity()`` when none is set) lets each of the two graphs sit within a cosine of
  ``c = min_cosine`` of the float model, so they may be up to twice that apart: the output
  cosine against the graph before must reach ``cos(2 arccos c) = 2c² - 1`` (0.980 at 0.99), and
  the relative RMS error stay within twice the noise ``c`` allows, ``2 sqrt(2 (1 - c))`` (SQNR
  >= 11 dB at 0.99). The cosine alone is blind to scale; the SQNR bound catches a kernel with a
  wrong scale or zero point, which moves the outputs by their own size (0 dB for a scale off by
  2x). Integer outputs are not compared (as in the budget's own check); shapes and dtypes must
  match. The final check still holds the lowered model to the budget against eager.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.ir.verify import Comparison, compare_outputs
from graphopt.passes.base import Pass
from graphopt.passes.lossy.base import Fidelity, output_cosine, output_sqnr_db
from graphopt.passes.manager import PassManager
from graphopt.report import PassRecord, Report, ReportSection, sum_counts, sum_near_misses
from graphopt.targets.base import LoweringContext

__all__ = ["KernelSubstitution", "LoweringCheck", "LoweringResult", "computes_in", "is_kernel_substituting",
           "kernel_bounds", "kernel_comparison", "records_section", "run_lowering"]


@dataclass(frozen=True)
class KernelSubstitution(Pass):
    """A lowering pass that puts kernels in place of ops they compute like, but not bit for bit.

    The pass manager then holds it to the fidelity budget against the graph before it instead of
    the exact tolerance (see the module docstring). ``in_place_kernels`` names the ops it calls
    in place on a buffer of its own (the IR's lint refuses in-place ops otherwise).
    """

    kernel_substituting: ClassVar[bool] = True
    in_place_kernels: ClassVar[frozenset[Any]] = frozenset()


def is_kernel_substituting(pass_: Pass) -> bool:
    """True for passes that declare they substitute kernels rounding differently."""
    return bool(getattr(pass_, "kernel_substituting", False))


def _structure_problem(actual: Any, expected: Any) -> str | None:
    """Why ``actual`` cannot stand for ``expected`` (other outputs, shapes or dtypes), or None."""
    actual_leaves, expected_leaves = pytree.tree_leaves(actual), pytree.tree_leaves(expected)
    if len(actual_leaves) != len(expected_leaves):
        return f"{len(actual_leaves)} outputs, expected {len(expected_leaves)}"
    for index, (a, e) in enumerate(zip(actual_leaves, expected_leaves, strict=True)):
        if not isinstance(e, torch.Tensor):
            continue
        if not isinstance(a, torch.Tensor) or a.shape != e.shape or a.dtype != e.dtype:
            got = f"{type(a).__name__}" if not isinstance(a, torch.Tensor) else f"{a.dtype} {list(a.shape)}"
            return f"output {index}: {got}, expected {e.dtype} {list(e.shape)}"
    return None


def kernel_bounds(min_cosine: float) -> tuple[float, float]:
    """(least output cosine, least SQNR in dB) a kernel substitution may reach against the graph before it.

    Both graphs may each be ``min_cosine`` away from the float model: twice the angle, twice the
    relative RMS error that noise orthogonal to the outputs leaves at that cosine.
    """
    if min_cosine >= 1.0:
        return 1.0, math.inf
    return 2 * min_cosine**2 - 1, -20.0 * math.log10(2.0 * math.sqrt(2.0 * (1.0 - min_cosine)))


def kernel_comparison(actual: Any, expected: Any, min_cosine: float) -> Comparison:
    """Compare a kernel-substituting pass's outputs with the graph's before it (see the module docstring)."""
    exact = compare_outputs(actual, expected)
    if exact.ok:
        return exact
    problem = _structure_problem(actual, expected)
    if problem is not None:
        return Comparison(False, math.inf, math.inf, problem)
    cosine, sqnr = output_cosine(expected, actual), output_sqnr_db(expected, actual)
    least_cosine, least_sqnr = kernel_bounds(min_cosine)
    ok = cosine >= least_cosine and sqnr >= least_sqnr
    detail = "" if ok else (f"kernel substitution: output cosine {cosine:.5f} (>= {least_cosine:.4f} needed), "
                            f"SQNR {sqnr:.1f} dB (>= {least_sqnr:.1f} dB needed) against the graph before it, "
                            f"for a budget of output cosine >= {min_cosine:g}")
    return Comparison(ok, exact.max_abs_diff, exact.max_scaled_diff, detail)


@dataclass(frozen=True)
class LoweringCheck:
    """The pass manager's ``compare`` for a lowering: exact passes to tolerance, kernel substitutions to the budget."""

    tolerance_scale: float = 1.0
    min_cosine: float = Fidelity().min_cosine

    def __call__(self, pass_: Pass, actual: Any, expected: Any) -> Comparison:
        """Hold ``pass_``'s outputs to the outputs of the graph before it."""
        if is_kernel_substituting(pass_):
            return kernel_comparison(actual, expected, self.min_cosine)
        return compare_outputs(actual, expected, self.tolerance_scale)


@dataclass
class LoweringResult:
    """The lowered graph and what each pass of the lowering did (``PassRecord``s, in order)."""

    graph_module: fx.GraphModule
    records: list[PassRecord] = field(default_factory=list)

    @property
    def stats(self) -> dict[str, int | float]:
        """The passes' counts, summed by key (in the order the passes first reported them)."""
        return self.stats_of()

    def stats_of(self, names: Collection[str] | None = None) -> dict[str, int | float]:
        """The counts of the passes named ``names`` (all when None), summed by key."""
        return sum_counts(record.stats for record in self.records if names is None or record.name in names)

    @property
    def near_misses(self) -> dict[str, dict[str, int]]:
        """Why rewrites did not happen, ``{rule: {reason: count}}`` over every pass."""
        return sum_near_misses(self.records)

    def rolled_back(self) -> list[PassRecord]:
        """The passes that failed verification and were undone."""
        return [r for r in self.records if r.status == "rolled back"]

    def report(self, report: Report | None, title: str, summary: str = "") -> None:
        """Add the records to ``report`` as a section, and a note for each pass rolled back."""
        if report is None:
            return
        report.sections.append(records_section(title, self.records, summary))
        for record in self.rolled_back():
            report.notes.append(f"{title}: rewrite {record.name!r} failed verification and was rolled back "
                                f"({record.error})")


def run_lowering(gm: fx.GraphModule, passes: Sequence[Pass], context: LoweringContext,
                 tolerance_scale: float = 1.0) -> LoweringResult:
    """Run ``passes`` on ``gm`` through a ``PassManager``, each verified on ``context``'s example inputs.

    ``tolerance_scale`` is the target's own factor for its exact passes (multiplied by
    ``context.tolerance_scale``). ``gm`` is rewritten in place except where a pass is rolled
    back: use the result's ``graph_module``.
    """
    if not passes:
        return LoweringResult(gm)
    budget = context.fidelity if context.fidelity is not None else Fidelity()
    check = LoweringCheck(tolerance_scale * context.tolerance_scale, budget.min_cosine)
    in_place = frozenset().union(*(getattr(p, "in_place_kernels", frozenset()) for p in passes))
    manager = PassManager(passes, on_error=context.on_error, tolerance_scale=check.tolerance_scale, compare=check,
                          in_place_kernels=in_place)
    scratch = Report(target="lowering")
    lowered = manager.run(gm, context.flat_inputs(gm), scratch)
    return LoweringResult(lowered, scratch.records)


def records_section(title: str, records: list[PassRecord], summary: str = "") -> ReportSection:
    """A lowering's verified rewrites as a report section: one row per rewrite, like the pass table."""
    rows = []
    for record in records:
        details = ", ".join(f"{k}={v}" for k, v in record.stats.items())
        misses = "; ".join(f"{reason} ({count})" for group in record.near_misses.values()
                           for reason, count in group.items())
        rows.append([record.name, record.status, f"{record.nodes_before} → {record.nodes_after}",
                     round(record.seconds * 1e3, 1), round(record.verify_seconds * 1e3, 1), record.max_abs_diff,
                     details, misses])
    return ReportSection(title=title, description=summary or None,
                         headers=["rewrite", "status", "nodes", "ms", "verify ms", "max |Δ|", "details", "near-misses"],
                         rows=rows)


def computes_in(gm: fx.GraphModule, *dtypes: torch.dtype) -> bool:
    """True when some node of ``gm`` computes a tensor of one of ``dtypes`` (its recorded value's dtype)."""
    return any(isinstance(value, torch.Tensor) and value.dtype in dtypes
               for value in (node.meta.get("val") for node in gm.graph.nodes))
