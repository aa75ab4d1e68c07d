"""The pass manager's backups and change checks: copies that share weights, code generated only when needed."""

from __future__ import annotations

import gc
import types
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt.ir.backup import GraphBackup, graph_fingerprint, unchanged_since
from graphopt.ir.capture import capture
from graphopt.ir.graph import iter_ops
from graphopt.passes.base import Pass, PassResult
from graphopt.workflows.collector import YOUNG_COLLECTION_SCALE, eased_collector

aten = torch.ops.aten


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).relu()


def _captured() -> tuple[fx.GraphModule, tuple]:
    torch.manual_seed(0)
    captured = capture(Block().eval(), (torch.randn(3, 6),))
    return captured.graph_module, captured.flat_inputs


def _relu_to_sigmoid(gm: fx.GraphModule) -> None:
    for node in iter_ops(gm, aten.relu.default):
        node.target = aten.sigmoid.default
    gm.recompile()


def test_a_backup_restores_the_graph_as_it_was_and_shares_the_weights():
    gm, inputs = _captured()
    expected = gm(*inputs)
    backup = GraphBackup(gm)
    _relu_to_sigmoid(gm)
    assert not torch.allclose(gm(*inputs)[0], expected[0])
    restored = backup.module()
    assert restored is not gm and backup.module() is restored  # built once
    torch.testing.assert_close(restored(*inputs), expected, rtol=0, atol=0)
    assert list(iter_ops(restored, aten.relu.default)) and not list(iter_ops(gm, aten.relu.default))
    weights = {name: t.data_ptr() for name, t in gm.named_parameters()}
    assert weights and weights == {name: t.data_ptr() for name, t in restored.named_parameters()}


def test_methods_bound_to_the_module_are_bound_to_the_restored_one():
    gm, _ = _captured()
    gm.describe = types.MethodType(lambda self: self, gm)  # as torch.export's module() sets train / eval
    restored = GraphBackup(gm).module()
    assert restored.describe() is restored


def test_the_fingerprint_sees_every_change_the_code_would_show():
    gm, _ = _captured()
    fingerprint = graph_fingerprint(gm.graph)
    assert unchanged_since(gm.graph, fingerprint)
    _relu_to_sigmoid(gm)
    assert not unchanged_since(gm.graph, fingerprint)
    fingerprint = graph_fingerprint(gm.graph)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((output.args[0][0], output.args[0][0]),)
    assert not unchanged_since(gm.graph, fingerprint)


@dataclass(frozen=True)
class QuietSwap(Pass):
    """Swaps relu for sigmoid but says it changed nothing: the manager must still notice."""

    name = "quiet-swap"

    def run(self, gm: fx.GraphModule) -> PassResult:
        for node in iter_ops(gm, aten.relu.default):
            node.target = aten.sigmoid.default
        return PassResult(changed=False)


def test_a_pass_that_changes_the_graph_but_reports_no_change_is_verified_and_rolled_back():
    model, x = Block().eval(), torch.randn(3, 6)
    with pytest.warns(graphopt.RollbackWarning, match="quiet-swap") as caught:
        fast = graphopt.optimize(model, (x,), passes=[QuietSwap()], on_error="rollback")
    assert caught[0].filename == __file__  # the warning points at the caller's line, not into graphopt
    assert [(r.name, r.status) for r in fast.report.records] == [("quiet-swap", "rolled back")]
    torch.testing.assert_close(fast(x), model(x))


def test_the_collector_is_eased_during_a_build_and_restored_after():
    thresholds = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with eased_collector():
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == thresholds[0] * YOUNG_COLLECTION_SCALE
        with eased_collector():  # nested: nothing more
            assert gc.get_threshold()[0] == thresholds[0] * YOUNG_COLLECTION_SCALE
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == thresholds
    gc.disable()
    try:
        with eased_collector():
            assert gc.get_freeze_count() == 0
    finally:
        gc.enable()
