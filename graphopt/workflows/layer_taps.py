"""Layer outputs for distillation: the same modules' outputs read from the student graph and the teacher.

``distill(..., layers="encoder.layer.*")`` matches every transformer layer's output, not only the
model's: intermediate targets guide a pruned student far better than the last output alone
(TinyBERT's and MiniLM's own recipes). The student graph keeps each node's module path
(``nn_module_stack``), so a module's output is the node inside it that something outside reads;
the teacher's is caught with a forward hook on the module of that path.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.errors import InputError
from graphopt.ir.graph import module_paths, snapshot_graph_module

__all__ = ["TeacherTaps", "module_outputs", "with_extra_outputs"]


def _matches(path: str, patterns: Sequence[str]) -> bool:
    """Whether ``path`` matches a pattern part by part (fnmatch), so ``encoder.layer.*`` names only the layers."""
    parts = path.split(".")
    for pattern in patterns:
        wanted = pattern.split(".")
        if len(wanted) == len(parts) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted, strict=True)):
            return True
    return False


def module_outputs(gm: fx.GraphModule, patterns: Sequence[str]) -> dict[str, str]:
    """``{module path: node name}`` of the modules matching ``patterns``, in graph order.

    A module's output is the last node inside it whose value is read outside it (or returned).
    """
    inside: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        for path in module_paths(node):
            if path and _matches(path, patterns):
                inside.setdefault(path, []).append(node)
    outputs: dict[str, str] = {}
    for path, nodes in inside.items():
        members = set(nodes)
        leaving = [n for n in nodes if isinstance(n.meta.get("val"), torch.Tensor)
                   and any(user not in members for user in n.users)]
        if leaving:
            outputs[path] = leaving[-1].name
    return outputs


def with_extra_outputs(gm: fx.GraphModule, node_names: Sequence[str]) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` returning its outputs' leaves, flat, then the named nodes' values; and how many leaves.

    The copy shares ``gm``'s weights (parameter names are kept, so ``functional_call`` trains it).
    """
    copy = snapshot_graph_module(gm)
    nodes = {n.name: n for n in copy.graph.nodes}
    output = next(n for n in copy.graph.nodes if n.op == "output")
    leaves = pytree.tree_leaves(output.args[0])
    output.args = (tuple([*leaves, *(nodes[name] for name in node_names)]),)
    copy.graph._codegen = fx.graph.CodeGen()  # plain tuple out: the exported pytree spec no longer applies
    copy.recompile()
    return copy, len(leaves)


class TeacherTaps:
    """Forward hooks on the teacher's modules at ``paths``, keeping each one's first tensor output of the last call."""

    def __init__(self, teacher: torch.nn.Module, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self.values: dict[str, torch.Tensor] = {}
        self._handles = []
        for path in self.paths:
            try:
                module = teacher.get_submodule(path)
            except AttributeError as error:
                raise InputError(f"distill(layers=...): the teacher has no module {path!r}, which the student graph "
                                 "names; the teacher must be the model that was optimized") from error
            self._handles.append(module.register_forward_hook(self._hook(path)))

    def _hook(self, path: str) -> Any:
        def keep(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            tensors = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
            if tensors:
                self.values[path] = tensors[0]
        return keep

    def take(self) -> list[torch.Tensor]:
        """The outputs of the last call, in ``paths`` order."""
        missing = [p for p in self.paths if p not in self.values]
        if missing:
            raise InputError(f"distill(layers=...): the teacher's module {missing[0]!r} produced no tensor output")
        values = [self.values[p] for p in self.paths]
        self.values = {}
        return values
