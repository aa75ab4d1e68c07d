"""Least-squares refit after structured pruning, and the fluctuation importance that goes with it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.errors import InputError
from graphopt.ir.graph import run_and_record, snapshot_graph_module
from graphopt.passes.lossy.base import CalibrationData
from graphopt.passes.prune import Prune
from tests.test_dependency_graph import Attention, Residual
from tests.test_prune_hidden import _llama


def _plan_and_apply(model: nn.Module, example: tuple[torch.Tensor, ...], pass_: Prune,
                    batches: list[tuple[torch.Tensor, ...]]):
    captured = graphopt.capture(model.eval(), example)
    gm = captured.graph_module
    plan = pass_.plan(gm, CalibrationData(example=captured.flat_inputs, batches=batches))
    pruned = snapshot_graph_module(gm)
    result = plan.apply(pruned)
    pruned.recompile()
    return gm, pruned, plan, result


def _relative_error(gm: torch.fx.GraphModule, pruned: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> float:
    errors = []
    for x in inputs:
        reference, _ = run_and_record(gm, (x,))
        actual, _ = run_and_record(pruned, (x,))
        errors.append(float((actual - reference).norm() / reference.norm()))
    return max(errors)


class Redundant(nn.Module):
    """An MLP whose hidden ReLU neurons are ``hidden`` originals, their 0.1x copies, and two constants."""

    def __init__(self, width: int = 16, hidden: int = 8) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * hidden + 2), nn.Linear(2 * hidden + 2, width)
        with torch.no_grad():
            self.up.weight[hidden:2 * hidden] = 0.1 * self.up.weight[:hidden]
            self.up.bias[hidden:2 * hidden] = 0.1 * self.up.bias[:hidden]
            self.up.weight[2 * hidden:] = 0.0  # two neurons that are always relu(bias): constants
            self.up.bias[2 * hidden:] = torch.tensor([0.5, 0.3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_refit_recovers_neurons_that_copy_kept_ones_and_constants_exactly() -> None:
    torch.manual_seed(0)
    model = Redundant()
    batches = [(torch.randn(32, 16),) for _ in range(4)]
    held_out = [torch.randn(32, 16) for _ in range(3)]
    # L1 removes the 0.1x copies and the two constants: 10 of 18 neurons
    gm, refit, plan, result = _plan_and_apply(model, batches[0], Prune(0.56, importance="l1", refit=True), batches)
    _, sliced, _, _ = _plan_and_apply(model, batches[0], Prune(0.56, importance="l1"), batches)
    [choice] = plan.choices
    assert choice.kept == list(range(8))
    assert result.stats["layers_refit"] == 1
    down = next(n for n in refit.graph.nodes if n.op == "get_attr" and "down" in str(n.target) and "weight" in
                str(n.target))
    assert getattr(refit, str(down.target)).shape == (16, 8)
    assert _relative_error(gm, refit, held_out) < 1e-5  # the copies' and the constant's share moved to the kept
    assert _relative_error(gm, sliced, held_out) > 1e-2  # slicing alone loses them


def test_fluctuation_refit_beats_slicing_on_held_out_inputs_for_heads_and_neurons() -> None:
    torch.manual_seed(0)
    model = Attention(hidden=32, heads=8)
    batches = [(torch.randn(4, 12, 32) + 0.5,) for _ in range(8)]
    held_out = [torch.randn(4, 12, 32) + 0.5 for _ in range(4)]
    gm, refit, plan, result = _plan_and_apply(model, batches[0], Prune(0.5, importance="fluctuation"), batches)
    _, sliced, _, _ = _plan_and_apply(model, batches[0], Prune(0.5, importance="fluctuation", refit=False), batches)
    kinds = {unit.kind for unit in plan.units}
    assert kinds == {"attention-heads", "features"}
    assert all("readers refit" in unit.scheme for unit in plan.units)
    assert result.stats["layers_refit"] == 2  # the output projection and the FFN's down projection
    refit_error, sliced_error = _relative_error(gm, refit, held_out), _relative_error(gm, sliced, held_out)
    assert refit_error < 0.85 * sliced_error, (refit_error, sliced_error)  # random weights: little to carry over
    neurons = next(unit.name for unit in plan.units if unit.kind == "features")
    heads_only = snapshot_graph_module(gm)
    assert plan.apply(heads_only, frozenset({neurons})).stats["layers_refit"] == 1  # a fallen-back group: no refit


def test_readers_of_a_shrinking_norm_are_sliced_not_refit() -> None:
    """A hidden size pruned through RMS norms changes the norms' outputs: statistics of the original do not hold."""
    torch.manual_seed(0)
    ids = [(torch.randint(0, 100, (2, 12)),) for _ in range(4)]
    gm = graphopt.optimize(_llama(), ids[0], "cpu").portable_graph  # RMSNorm fused: the hidden size may shrink
    plan = Prune(0.5, importance="fluctuation").plan(gm, CalibrationData(example=ids[0], batches=ids))
    assert any(c.group.units == 64 for c in plan.choices), "the hidden size is pruned"
    refit_weights = {refit.reader.weight for refit in plan.refits}
    assert not any(part in w for w in refit_weights for part in ("q_proj", "k_proj", "gate_proj", "lm_head"))
    assert any("o_proj" in w for w in refit_weights) and any("down_proj" in w for w in refit_weights)
    pruned = snapshot_graph_module(gm)
    result = plan.apply(pruned)
    pruned.recompile()
    assert result.stats["layers_refit"] == 4  # o_proj and down_proj of both layers
    outputs, _ = run_and_record(pruned, ids[1])
    assert torch.isfinite(outputs.logits).all()


def test_fluctuation_through_optimize_reports_the_refit() -> None:
    torch.manual_seed(0)
    model = Attention(hidden=32, heads=8)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    x = torch.randn(4, 12, 32)
    fast = graphopt.optimize(model, (x,), "cpu", prune=Prune(0.5, importance="fluctuation"),
                             calibration=[(torch.randn(4, 12, 32),) for _ in range(4)])
    assert "layers_refit=2" in str(fast.report)
    assert fast(x).shape == x.shape
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())  # not mutated


def test_fluctuation_on_a_convolution_net_measures_what_1x1_convolutions_read_and_says_what_it_did_not() -> None:
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(2)]
    gm, pruned, plan, result = _plan_and_apply(Residual(), batches[0], Prune(0.5, importance="fluctuation"), batches)
    assert any("1 group(s) ranked by L2 magnitude" in note for note in plan.notes())  # conv1's, read by a 3x3 conv
    assert result.stats["layers_refit"] == 1  # the 1x1 head reads the residual channels
    assert result.stats["groups_pruned"] == 2
    assert run_and_record(pruned, batches[1])[0].shape == run_and_record(gm, batches[1])[0].shape


@pytest.mark.parametrize("pass_", [Prune(importance="fluctuation"), Prune(refit=True)])
def test_refit_and_fluctuation_without_calibration_data_say_what_to_pass(pass_: Prune) -> None:
    with pytest.raises(InputError, match=r"needs calibration data.*calibration=batches"):
        graphopt.optimize(Attention(), (torch.randn(2, 5, 16),), "cpu", prune=pass_)


def test_fluctuation_is_structured_only() -> None:
    with pytest.raises(InputError, match="structured=True"):
        Prune(structured=False, importance="fluctuation")


def test_cost_keep_counts_remove_the_cheapest_to_lose_per_mac_first() -> None:
    from graphopt.passes.prune.importance import cost_keep_counts

    scores = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])]
    # group 1's units cost 10x more MACs at the same importance: they go first
    keeps = cost_keep_counts(scores, [1.0, 10.0], amount=0.5, max_amount=0.9, normalize=False)
    assert keeps == [4, 1]  # 30 of the 44 MACs removed (>= half), capped at 90% of group 1's units
    keeps = cost_keep_counts(scores, [1.0, 1.0], amount=0.5, max_amount=0.9, normalize=False)
    assert keeps == [3, 1]  # equal costs: the four least important units overall


def test_cost_scope_removes_the_same_macs_as_local_and_varies_per_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 64), nn.ReLU(),
                          nn.Linear(64, 16))
    with torch.no_grad():
        model[4].weight[32:] *= 0.01  # half of the second block's neurons barely move: cheap to lose
    batches = [(torch.randn(32, 16),) for _ in range(4)]
    _, _, local, local_result = _plan_and_apply(model, batches[0], Prune(0.5, importance="fluctuation"), batches)
    _, _, cost, cost_result = _plan_and_apply(model, batches[0], Prune(0.5, importance="fluctuation", scope="cost"),
                                              batches)
    kept = {c.name: len(c.kept) for c in cost.choices}
    assert sorted(kept.values()) != [len(c.kept) for c in local.choices]
    assert min(kept.values()) <= 32  # the block with quiet neurons loses at least its quiet half
    macs_local = local_result.stats["layer_macs_after"]
    assert abs(cost_result.stats["layer_macs_after"] - macs_local) <= 0.1 * macs_local


def test_cost_scope_is_structured_only() -> None:
    with pytest.raises(InputError, match="structured=True"):
        Prune(structured=False, scope="cost")


class Bottleneck(nn.Module):
    """A 3x3 convolution whose channels a strided 1x1 convolution reads, and a copy channel it can do without."""

    def __init__(self) -> None:
        super().__init__()
        self.spread, self.project = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1, stride=2)
        with torch.no_grad():
            self.spread.weight[4:] = 0.1 * self.spread.weight[:4]  # channels 4..7 are 0.1x copies of 0..3
            self.spread.bias[4:] = 0.1 * self.spread.bias[:4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.relu(self.spread(x)))


def test_a_strided_pointwise_convolution_is_refit_exactly_for_copied_channels() -> None:
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 9, 9),) for _ in range(4)]
    held_out = [torch.randn(2, 3, 9, 9) for _ in range(2)]
    gm, refit, plan, result = _plan_and_apply(Bottleneck(), batches[0], Prune(0.5, importance="l1", refit=True),
                                              batches)
    _, sliced, _, _ = _plan_and_apply(Bottleneck(), batches[0], Prune(0.5, importance="l1"), batches)
    [choice] = plan.choices
    assert choice.kept == [0, 1, 2, 3]
    assert result.stats["layers_refit"] == 1 and plan.refits[0].reader.stride == (2, 2)
    assert _relative_error(gm, refit, held_out) < 1e-5
    assert _relative_error(gm, sliced, held_out) > 1e-2
