"""What a pass is, what it returns, and the registry that finds passes by name.

A pass is a frozen dataclass: its fields are its options, ``name`` is its kebab-case name, and
``run`` rewrites the graph module in place and says whether it changed anything. ``NodeRewrite``
is a pass that visits the nodes one by one: a subclass writes only what happens to one node.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch.fx as fx

from graphopt.errors import UnknownPassError

__all__ = [
    "NodeRewrite",
    "Pass",
    "PassResult",
    "available_passes",
    "get_pass",
    "register_builtin",
    "register_pass",
    "resolve_pass",
]


@dataclass
class PassResult:
    """What a pass did: whether the graph changed, counters, and rule hits / near-misses."""

    changed: bool
    stats: dict[str, int | float] = field(default_factory=dict)
    rule_hits: dict[str, int] = field(default_factory=dict)
    near_misses: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """Base class of every pass: subclass, set ``name``, implement ``run``.

    ``run`` may edit ``gm`` in place: the pass manager keeps a copy to roll back to, and
    recompiles the module afterwards (call ``gm.recompile()`` yourself only when running a
    pass outside the manager). Passes must preserve what the graph computes; the pass
    manager verifies that after every pass.
    """

    name: ClassVar[str] = ""

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite ``gm`` in place and report what changed."""
        raise NotImplementedError(f"{type(self).__name__} must implement run(gm)")


@dataclass(frozen=True)
class NodeRewrite(Pass):
    """A pass that rewrites node by node: subclass, set ``name`` and ``stat``, implement ``rewrite``.

    ``run`` calls ``rewrite(gm, node)`` on every node the graph had when the pass began (a rewrite
    may add nodes, and erase the node it is given) and counts the nodes it rewrote under ``stat``;
    a string answer is a near-miss reason, counted under the pass's ``name``. With
    ``dead_code_after``, the dead code the rewrites left (the ops they replaced) is erased at the
    end, so that no later pass rewrites it again.
    """

    stat: ClassVar[str] = "rewritten"
    dead_code_after: ClassVar[bool] = False

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> bool | str:
        """Rewrite ``node`` in place: True when rewritten, False when it does not match, or why it almost did."""
        raise NotImplementedError(f"{type(self).__name__} must implement rewrite(gm, node)")

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite every node that matches, then count the rewrites and near misses."""
        count = 0
        near: dict[str, int] = {}
        for node in list(gm.graph.nodes):
            outcome = self.rewrite(gm, node)
            if isinstance(outcome, str):
                near[outcome] = near.get(outcome, 0) + 1
            elif outcome:
                count += 1
        dead = self.dead_code_after and gm.graph.eliminate_dead_code()
        return PassResult(count > 0 or dead, {self.stat: count}, near_misses={self.name: near} if near else {})


P = TypeVar("P", bound=type[Pass])

# The one registry of passes. Built-in ones are imported only when first asked for: name -> "module:Class".
_BUILTIN: dict[str, str] = {
    "dce": "graphopt.passes.cleanup:DeadCodeElimination",
    "cse": "graphopt.passes.cleanup:CommonSubexpressionElimination",
    "remove-dropout": "graphopt.passes.cleanup:RemoveDropout",
    "remove-identity": "graphopt.passes.cleanup:RemoveIdentity",
    "constant-folding": "graphopt.passes.constant_folding:ConstantFolding",
    "fold-conv-batchnorm": "graphopt.passes.batchnorm_folding:FoldConvBatchNorm",
    "fold-linear-batchnorm": "graphopt.passes.batchnorm_folding:FoldLinearBatchNorm",
    "unpack-attention": "graphopt.passes.fusion.packed_attention:UnpackAttention",
    "fuse-attention": "graphopt.passes.fusion.attention:FuseAttention",
    "fuse-activations": "graphopt.passes.fusion.activations:FuseActivations",
    "fuse-norms": "graphopt.passes.fusion.norms:FuseNorms",
    "fuse-horizontal": "graphopt.passes.fusion.horizontal:FuseHorizontal",
    "fuse-gqa": "graphopt.passes.fusion.gqa:FuseGroupedQueryAttention",
    "fuse-rotary": "graphopt.passes.fusion.rotary:FuseRotary",
    "fuse-gated-mlp": "graphopt.passes.fusion.gated:FuseGatedActivations",
    "partition": "graphopt.passes.split_stages:Partition",
    "quantize": "graphopt.passes.quantize.static:Int8Static",
    "quantize-dynamic": "graphopt.passes.quantize.dynamic:Int8Dynamic",
    "weight-only-quantize": "graphopt.passes.quantize.weight_only:WeightOnly",
    "kmeans-quantize": "graphopt.passes.quantize.kmeans:KMeans",
    "prune": "graphopt.passes.prune:Prune",
    "reduced-precision": "graphopt.passes.precision:ReducedPrecision",
}
_REGISTERED: dict[str, type[Pass]] = {}


def register_pass(cls: P) -> P:
    """Class decorator: make ``cls`` findable by its ``name`` (e.g. in ``optimize(passes=[...])``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name` (kebab-case) to be registered")
    _REGISTERED[cls.name] = cls
    return cls


def register_builtin(name: str, location: str) -> None:
    """Make the pass at ``location`` (``"module:Class"``) findable as ``name``, imported on first use.

    For a layer above this one (a target) to offer its passes by name without this module
    naming it, and without importing them before they are asked for.
    """
    if ":" not in location:
        raise ValueError(f"location must be 'module:Class', got {location!r}")
    _BUILTIN.setdefault(name, location)


def available_passes() -> list[str]:
    """Names of every built-in and registered pass."""
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def get_pass(name: str) -> type[Pass]:
    """The pass class registered under ``name``."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        module_name, class_name = _BUILTIN[name].split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        _REGISTERED[name] = cls
        return cls
    raise UnknownPassError(f"no pass named {name!r}; available: {', '.join(available_passes())}")


def resolve_pass(spec: str | Pass | Callable[[], Pass]) -> Pass:
    """Turn a pass name, a pass instance or a pass class into a pass instance."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, str):
        return get_pass(spec)()
    if isinstance(spec, type) and issubclass(spec, Pass):
        return spec()
    raise TypeError(f"expected a pass name, Pass instance or Pass class, got {spec!r}")
