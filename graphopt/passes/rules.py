"""Pattern rules: a rewrite written as two plain PyTorch functions and an optional check.

```python
def linear_relu(x, w, b):
    return torch.relu(F.linear(x, w, b))

def fused(x, w, b):
    return my_ops.linear_relu(x, w, b)

rule = Rule(linear_relu, fused, check=lambda m: m.fail("bias is not constant") if m.constant("b") is None else m.ok())
```
Both functions are captured with the same tracer as models, so they match the ATen ops of the
model's graph. ``RewriteRules(rules=(rule,))`` is the pass that applies a set of rules; the
report lists how often each rule fired and, for refused matches, the reasons.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.utils.matcher_utils import InternalMatch
from torch.fx.subgraph_rewriter import replace_pattern_with_filters

from graphopt.errors import CaptureError
from graphopt.ir.graph import attribute_value
from graphopt.passes.base import Pass, PassResult

__all__ = ["Match", "Refusal", "RewriteRules", "Rule"]


@dataclass(frozen=True)
class Refusal:
    """A check's answer when a match must not be rewritten, with the reason shown in the report."""

    reason: str


class Match:
    """One place where a rule's pattern matched, as seen by its check."""

    def __init__(self, gm: fx.GraphModule, names: Sequence[str], internal: InternalMatch) -> None:
        self._gm = gm
        self._by_name = dict(zip(names, internal.placeholder_nodes, strict=False))
        self.nodes = [n for n in internal.nodes_map.values() if n.op != "placeholder"]

    def __getitem__(self, name: str) -> fx.Node:
        """The graph node bound to the pattern's argument ``name``."""
        return self._by_name[name]

    def constant(self, name: str) -> torch.Tensor | None:
        """The constant tensor (weight, buffer) bound to ``name``, or None when it is computed."""
        return attribute_value(self._gm, self._by_name[name])

    def ok(self) -> bool:
        """Accept the match."""
        return True

    def fail(self, reason: str) -> Refusal:
        """Refuse the match, naming the reason (it appears under near-misses in the report)."""
        return Refusal(reason)


def _trace_function(fn: Callable[..., Any], example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    class _Function(torch.nn.Module):
        def forward(self, *args: Any) -> Any:
            return fn(*args)

    try:
        gm = torch.export.export(_Function(), example_inputs, strict=False).module()
    except Exception as error:
        raise CaptureError(
            f"could not trace rule function {fn.__name__!r} on example inputs of shapes "
            f"{[tuple(t.shape) for t in example_inputs]}: {error}. Pass Rule(..., example_inputs=...) "
            "with inputs the function accepts."
        ) from error
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    return gm


@dataclass(frozen=True)
class Rule:
    """Rewrite every match of ``pattern`` into ``replacement`` where ``check`` agrees.

    ``check(match)`` returns ``match.ok()`` (or True) to accept, ``match.fail("why")`` to refuse.
    ``example_inputs`` are tensors to trace both functions with; by default each argument is a
    4×4 float tensor — give them when the ops need other shapes (convolutions, say).
    """

    pattern: Callable[..., Any]
    replacement: Callable[..., Any]
    check: Callable[[Match], bool | Refusal | None] | None = None
    name: str = ""
    example_inputs: tuple[torch.Tensor, ...] | None = None

    @property
    def label(self) -> str:
        """The rule's name in reports (defaults to the pattern function's name)."""
        return self.name or self.pattern.__name__

    @cached_property
    def argument_names(self) -> list[str]:
        """The pattern's parameter names, in order."""
        return list(inspect.signature(self.pattern).parameters)

    def _inputs(self) -> tuple[torch.Tensor, ...]:
        if self.example_inputs is not None:
            return tuple(self.example_inputs)
        generator = torch.Generator().manual_seed(0)
        return tuple(torch.randn(4, 4, generator=generator) for _ in self.argument_names)

    @cached_property
    def graphs(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        """The traced pattern and replacement graphs."""
        inputs = self._inputs()
        return _trace_function(self.pattern, inputs), _trace_function(self.replacement, inputs)


@dataclass(frozen=True)
class RewriteRules(Pass):
    """A pass that applies a set of pattern rules, in order, to the graph."""

    rules: tuple[Rule, ...] = ()
    name: str = "rewrite-rules"  # type: ignore[misc]

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Apply each rule to every match its check accepts."""
        hits: dict[str, int] = {}
        misses: dict[str, dict[str, int]] = {}
        for rule in self.rules:
            refused = Counter[str]()
            pattern, replacement = rule.graphs

            def accept(internal: InternalMatch, _graph: fx.Graph, _pattern: fx.Graph, rule: Rule = rule,
                       refused: Counter[str] = refused) -> bool:
                if rule.check is None:
                    return True
                verdict = rule.check(Match(gm, rule.argument_names, internal))
                if isinstance(verdict, Refusal):
                    refused[verdict.reason] += 1
                    return False
                if verdict is False:
                    refused["check returned False"] += 1
                    return False
                return True

            replaced = replace_pattern_with_filters(gm, pattern, replacement, match_filters=[accept])
            if replaced:
                hits[rule.label] = len(replaced)
            if refused:
                misses[rule.label] = dict(refused)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(changed=bool(hits), stats={"rewrites": sum(hits.values())}, rule_hits=hits,
                          near_misses=misses)

