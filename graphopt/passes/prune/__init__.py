"""Weight pruning: structured (channels, features, heads removed for real) or unstructured (masks).

    graphopt.optimize(model, x, prune=0.5)                    # structured, 50% of every group, L1
    graphopt.optimize(model, x, prune=Prune(amount=0.3, importance="taylor", scope="global",
                                            protect=["layer4.*"]), calibration=loader)
    graphopt.optimize(model, x, prune=Prune(0.4, importance="fluctuation"), calibration=loader)  # refit too
    graphopt.optimize(model, x, prune=Prune(amount=0.5, structured=False))   # magnitude masks
    graphopt.optimize(model, x, prune=Prune(structured=False, pattern="2:4"))  # 2:4 semi-structured

``importance="fluctuation"`` also refits the layers that read the removed units by least squares
on the calibration data (``graphopt.passes.prune.refit``), which recovers much of what slicing
loses without any training. Pruning is a lossy pass: the pass manager measures it against a ``Fidelity`` budget
(reported, not enforced, unless you give ``fidelity=``). Follow it with ``graphopt.distill`` to
recover more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from graphopt.errors import InputError
from graphopt.passes.lossy.base import CalibrationData, LossyPass, LossyPlan
from graphopt.passes.prune.importance import IMPORTANCE_KINDS
from graphopt.passes.prune.structured import plan_structured
from graphopt.passes.prune.unstructured import plan_unstructured

__all__ = ["Prune", "prune_pass"]

SCOPES = ("local", "global", "cost")


@dataclass(frozen=True)
class Prune(LossyPass):
    """Prune ``amount`` of the weights' units (structured) or elements (unstructured).

    ``structured=True`` removes whole output channels / features / attention heads / FFN
    neurons, found by the dependency graph of coupled dims, so tensors really shrink.
    ``importance``: ``"l1"``, ``"l2"`` (magnitude), ``"taylor"`` (gradient x weight on the
    calibration data, which it needs) or ``"fluctuation"`` (structured, calibration data: how much
    a unit's values vary where layers read them, times those layers' weights on it; units no
    measured layer reads fall back to ``"l2"``). ``refit`` (structured): refit the linear layers and
    pointwise convolutions reading removed units to reproduce their original outputs on the
    calibration data by least squares, bias included. ``None`` (the default) refits with
    ``"fluctuation"``, the importance made for it: it keeps the units whose variation the kept
    ones cannot carry. A refit after another importance's choice can do worse than slicing: on
    all-MiniLM-L6-v2 at half its heads and neurons, Taylor's choice refit kept a worst held-out
    cosine of 0.15 against 0.36 sliced, fluctuation's 0.68 against 0.44. ``True`` refits after
    any importance, ``False`` only slices.
    ``scope="local"`` prunes every group (or layer) by ``amount``; ``"global"`` ranks all units
    (elements) against one threshold, no group losing more than ``max_group_amount``;
    ``"cost"`` (structured) removes ``amount`` of the prunable layers' MACs, cheapest to lose
    first: one threshold on importance per MAC across all groups (with ``"fluctuation"`` or
    ``"taylor"`` the scores are output effects and compare as they are; magnitudes, and every
    score once a group falls back to them, are divided by their group's mean first), so
    sensitive layers keep more units and redundant ones fewer.
    ``protect``: attribute-name patterns (``"layer4.*"``, ``"classifier"``) that keep their
    shape; graph outputs always do. ``round_to`` keeps multiples of that many units per group
    (e.g. 8 for vector units). ``norms=True`` (structured) also prunes the dims layer and RMS
    norms normalize over: a transformer's hidden size (the residual stream, its embeddings and
    every projection reading it, together). The norms then normalize over the kept features,
    which changes more than the removed weights (distill recovers it); RMS norm is rescaled so
    that removing features that were zero stays exact. ``norms=False`` keeps those dims.
    Unstructured only: ``pattern="2:4"`` keeps the 2 largest of every 4 weights along the input
    dim (sparse tensor cores on recent GPUs).
    """

    name: ClassVar[str] = "prune"

    amount: float = 0.5
    structured: bool = True
    importance: str = "l1"
    scope: str = "local"
    protect: tuple[str, ...] = ()
    round_to: int = 1
    max_group_amount: float = 0.9
    pattern: str | None = None
    norms: bool = True
    refit: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.protect, (list, str)):
            object.__setattr__(self, "protect", (self.protect,) if isinstance(self.protect, str)
                               else tuple(self.protect))
        if not 0.0 <= self.amount < 1.0:
            raise InputError(f"Prune(amount=...) must be in [0, 1), the fraction to remove; got {self.amount}")
        if self.importance not in IMPORTANCE_KINDS:
            raise InputError(f"Prune(importance=...) must be one of {', '.join(IMPORTANCE_KINDS)}, "
                             f"got {self.importance!r}")
        if self.scope not in SCOPES:
            raise InputError(f"Prune(scope=...) must be 'local', 'global' or 'cost', got {self.scope!r}")
        if self.round_to < 1:
            raise InputError(f"Prune(round_to=...) must be >= 1, got {self.round_to}")
        if not 0.0 < self.max_group_amount < 1.0:
            raise InputError(f"Prune(max_group_amount=...) must be in (0, 1), got {self.max_group_amount}")
        if not self.structured and self.round_to != 1:
            raise InputError(f"Prune(round_to={self.round_to}) rounds the units kept per group of structured pruning; "
                             "unstructured pruning masks single weights: leave round_to unset, or use structured=True")
        if not self.structured and self.scope == "cost":
            raise InputError("Prune(scope='cost') weighs units by the MACs they cost, which only structured pruning "
                             "removes: use structured=True, or scope='global' for unstructured masks")
        if not self.structured and (self.importance == "fluctuation" or self.refit):
            raise InputError("Prune(importance='fluctuation') and Prune(refit=True) work on the layers reading "
                             "removed units, which structured pruning has: use structured=True, or another importance")
        if self.pattern is not None:
            if self.structured:
                raise InputError("Prune(pattern='2:4') is unstructured sparsity: pass structured=False too")
            if self.pattern != "2:4":
                raise InputError(f"Prune(pattern=...) supports '2:4' only, got {self.pattern!r}")

    def plan(self, gm: fx.GraphModule, data: CalibrationData) -> LossyPlan:
        """Find what to prune (structured: coupled groups; unstructured: weight masks)."""
        if self.structured:
            return plan_structured(gm, data, amount=self.amount, importance=self.importance, scope=self.scope,
                                   protect=self.protect, round_to=self.round_to,
                                   max_group_amount=self.max_group_amount, norms=self.norms, refit=self.refit)
        return plan_unstructured(gm, data, amount=self.amount, importance=self.importance, scope=self.scope,
                                 protect=self.protect, pattern=self.pattern)


def prune_pass(spec: float | LossyPass) -> LossyPass:
    """The pruning pass for ``optimize(prune=spec)``: a ratio means structured channel pruning at it."""
    if isinstance(spec, LossyPass):
        return spec
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise InputError(f"prune= takes a ratio such as 0.5 or a graphopt.passes.Prune(...), got {spec!r}")
    return Prune(amount=float(spec))
