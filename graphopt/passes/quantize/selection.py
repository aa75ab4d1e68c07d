"""Which layers a quantization pass keeps in float: its ``skip=`` option.

An entry is a node name (``linear_3``) or a module path (``classifier``,
``encoder.layer.11``); a module path keeps every layer under it in float. Layers a fusion merged
(a Q/K/V projection) answer to each of their original paths. An entry that matches nothing is
an error: a misspelt path would otherwise quantize the very layer the user meant to protect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.fx as fx

from graphopt.errors import InputError
from graphopt.ir.graph import FUSED_FROM, module_path

__all__ = ["SKIPPED", "SkipList", "skip_entries"]

SKIPPED = "left float by skip="
"""The near-miss reason of a layer the user kept in float."""


def skip_entries(value: str | Sequence[str]) -> tuple[str, ...]:
    """A ``skip=`` argument as a tuple of entries (one string is one entry, not its characters)."""
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class SkipList:
    """The ``skip=`` entries of a quantization pass, matched against the nodes of a graph."""

    entries: tuple[str, ...] = ()

    @classmethod
    def checked(cls, gm: fx.GraphModule, entries: Sequence[str], option: str) -> SkipList:
        """The skip list of ``entries``; raises InputError naming ``option`` for entries no node of ``gm`` matches."""
        skip = cls(tuple(entries))
        unknown = [e for e in skip.entries if not any(skip._matches(n, e) for n in gm.graph.nodes)]
        if unknown:
            examples = list(dict.fromkeys(p for n in gm.graph.nodes if (p := module_path(n))))[-4:]
            listed = ", ".join(map(repr, unknown))
            raise InputError(
                f"{option} names {listed}, which matches no node name or module path of the model. Module paths "
                f"look like {', '.join(map(repr, examples)) or 'classifier'} (print(model) shows them); "
                "a path keeps every layer under it in float."
            )
        return skip

    def __contains__(self, node: object) -> bool:
        return isinstance(node, fx.Node) and any(self._matches(node, e) for e in self.entries)

    @staticmethod
    def _matches(node: fx.Node, entry: str) -> bool:
        if node.name == entry:
            return True
        paths = [module_path(node), *node.meta.get(FUSED_FROM, ())]
        return any(path and (path == entry or path.startswith(entry + ".")) for path in paths)
