"""The functional IR: no in-place op after capture, explicit state, verification of state and weights."""

from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt.ir.graph import STATE_UPDATE, count_ops, state_update_nodes
from graphopt.ir.verify import lint

from helpers import assert_matches, state_snapshot

aten = torch.ops.aten


class MutatesFoldableTensor(nn.Module):
    """A constant-derived tensor is changed in place (what T5's position bias does)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.arange(12.0).reshape(3, 4))
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        position = self.table * 2
        position.add_(1)  # foldable, then mutated in place
        y = self.linear(x).clone()
        y[:, 0] = 0  # in-place write into a slice
        return torch.relu_(y) + position


class CountsCalls(nn.Module):
    """Forward updates a buffer the user can see: the state must stay explicit and advance per call."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(1))
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x) * self.calls


def _mutating_nodes(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and n.target._schema.is_mutable and not n.meta.get(STATE_UPDATE)]


def test_capture_is_functional():
    captured = graphopt.capture(MutatesFoldableTensor().eval(), (torch.randn(3, 4),))
    assert _mutating_nodes(captured.graph_module) == []
    assert captured.functionalized
    assert lint(captured.graph_module) == []


@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_mutated_foldable_tensor_matches_eager_on_every_call(target):
    torch.manual_seed(0)
    model = MutatesFoldableTensor().eval()
    x = torch.randn(3, 4)
    fast = graphopt.optimize(model, (x,), target=target)
    folding = next(r for r in fast.report.records if r.name == "constant-folding")
    assert folding.stats["folded"] >= 1  # the position table was folded ...
    for _ in range(3):  # ... and later calls still see the right constant
        assert_matches(fast, model, (x,), tol=1e-5)
    assert fast.report.rolled_back == []


def test_state_updates_stay_explicit_and_advance_per_call():
    torch.manual_seed(0)
    model = CountsCalls().eval()
    before = state_snapshot(model)
    x = torch.randn(2, 4)
    fast = graphopt.optimize(model, (x,), target="cpu")
    torch.testing.assert_close(state_snapshot(model), before)  # optimize ran the model, but on a copy
    updates = state_update_nodes(fast.graph_module)
    assert len(updates) == 1 and updates[0].target is aten.copy_.default
    twin = CountsCalls().eval()
    twin.load_state_dict(model.state_dict())
    for _ in range(3):
        with torch.no_grad():
            expected = twin(x)
        torch.testing.assert_close(fast(x), expected)  # the counter advances in both


class CountingConvNet(nn.Module):
    """A conv net with batch norm that also counts its calls in a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_passes_run_on_a_graph_with_state_and_the_state_still_advances():
    """Verifying a pass runs the graph, which writes the state: neither the lint nor the weight check may object."""
    torch.manual_seed(0)
    model = CountingConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    fast = graphopt.optimize(model, (x,), target="cpu")
    assert fast.report.rolled_back == []
    folding = next(r for r in fast.report.records if r.name == "fold-conv-batchnorm")
    assert folding.status == "changed"
    twin = CountingConvNet().eval()
    twin.load_state_dict(model.state_dict())
    for _ in range(2):
        with torch.no_grad():
            expected = twin(x)
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-5)
    assert float(fast.graph_module.calls) == float(twin.calls) == 2.0


def test_state_updates_cannot_go_to_onnx():
    with pytest.raises(graphopt.LoweringError, match=r"updates state.*calls.*target='cpu'"):
        graphopt.optimize(CountsCalls().eval(), (torch.randn(2, 4),), target="onnx")


@dataclass(frozen=True)
class MakeReluInPlace(graphopt.Pass):
    """Broken on purpose: brings an in-place op back into the functional IR."""

    name = "make-relu-in-place"

    def run(self, gm: fx.GraphModule) -> graphopt.PassResult:
        changed = False
        for node in gm.graph.nodes:
            if node.target is aten.relu.default:
                node.target = aten.relu_.default
                changed = True
        return graphopt.PassResult(changed)


@dataclass(frozen=True)
class BumpWeightInPlace(graphopt.Pass):
    """Broken on purpose: writes into an existing weight instead of registering a new one."""

    name = "bump-weight-in-place"
    through_data: bool = False  # tensor.data writes bypass the version counter

    def run(self, gm: fx.GraphModule) -> graphopt.PassResult:
        weight = next(gm.parameters())
        with torch.no_grad():
            (weight.data if self.through_data else weight).add_(1.0)
        return graphopt.PassResult(True)


def _bump(t: torch.Tensor) -> torch.Tensor:
    t.add_(1.0)  # hidden from the schema check: a plain Python function
    return t


@dataclass(frozen=True)
class HideMutationInFunction(graphopt.Pass):
    """Broken on purpose: every run of the graph writes into a stored constant."""

    name = "hide-mutation"

    def run(self, gm: fx.GraphModule) -> graphopt.PassResult:
        for node in gm.graph.nodes:
            if node.op == "get_attr" and any(u.target is aten.linear.default for u in node.users):
                with gm.graph.inserting_after(node):
                    bumped = gm.graph.call_function(_bump, (node,))
                node.replace_all_uses_with(bumped, delete_user_cb=lambda user, keep=bumped: user is not keep)
                return graphopt.PassResult(True)
        return graphopt.PassResult(False)


def _relu_model() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval(), (torch.randn(3, 4),)


def test_verifier_refuses_an_in_place_op_after_capture():
    model, inputs = _relu_model()
    with pytest.raises(graphopt.VerificationError, match=r"mutates a value in place.*relu_") as info:
        graphopt.optimize(model, inputs, passes=[MakeReluInPlace()], on_error="raise")
    assert info.value.pass_name == "make-relu-in-place"


def test_failing_pass_is_rolled_back_with_a_warning_by_default(monkeypatch):
    monkeypatch.delenv("GRAPHOPT_ON_ERROR")  # the product's default, not the strict test-suite one
    model, inputs = _relu_model()
    with pytest.warns(graphopt.RollbackWarning, match="make-relu-in-place"):
        fast = graphopt.optimize(model, inputs, passes=[MakeReluInPlace(), "dce"])
    assert fast.report.rolled_back == ["make-relu-in-place"]
    assert "relu_" not in str(fast.graph_module.code)
    assert_matches(fast, model, inputs)


@pytest.mark.parametrize("through_data", [False, True])
def test_pass_writing_into_a_weight_cannot_be_rolled_back(through_data):
    model, inputs = _relu_model()
    before = state_snapshot(model)
    with pytest.raises(graphopt.PassError, match=r"weights?.*register_constant") as info:
        graphopt.optimize(model, inputs, passes=[BumpWeightInPlace(through_data)], on_error="rollback")
    assert not info.value.recoverable
    assert info.value.report.records[-1].status == "failed"  # not recorded as a clean rollback
    torch.testing.assert_close(state_snapshot(model), before)  # the user's model is untouched all the same


def test_state_that_changes_between_calls_is_caught_and_blamed():
    model, inputs = _relu_model()
    with pytest.raises(graphopt.VerificationError, match=r"state changes between calls") as info:
        graphopt.optimize(model, inputs, passes=["remove-identity", HideMutationInFunction(), "cse"],
                          on_error="raise")
    assert info.value.pass_name == "hide-mutation"


def test_constant_folding_alone_on_a_mutating_model_is_clean():
    torch.manual_seed(0)
    model = MutatesFoldableTensor().eval()
    x = torch.randn(3, 4)
    fast = graphopt.optimize(model, (x,), passes=["constant-folding"], on_error="raise")
    assert count_ops(fast.graph_module)["aten.mul.Tensor"] == 0  # table * 2 was folded
    for _ in range(2):
        assert_matches(fast, model, (x,), tol=1e-5)


class WritesThroughDropout(nn.Module):
    """Inference dropout returns its input itself: a write through its result reaches the input."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x * 2
        z = self.drop(y)
        z.add_(x)  # y is 3x afterwards, in eager
        return z * 3, y


@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_write_through_inference_dropout_keeps_its_alias(target):
    model, x = WritesThroughDropout().eval(), torch.randn(2, 5)
    fast = graphopt.optimize(model, (x,), target=target)
    assert_matches(fast, model, (x,), tol=1e-6)


def test_checks_do_not_advance_state_even_with_dynamic_probes():
    torch.manual_seed(0)
    model = CountsCalls().eval()
    fast = graphopt.optimize(model, (torch.randn(2, 4),), target="cpu", dynamic_batch=True)
    assert "batch=3" in " ".join(fast.report.notes)  # probes at other batch sizes ran the model ...
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = model(x)  # ... yet the first call after optimize sees the counter where eager's starts
    torch.testing.assert_close(fast(x), expected)


class ResidualInPlace(nn.Module):
    """The common in-place writes: activations and residual adds on fresh intermediates."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        before = y * 1.5  # reads y before the writes: must see the old value
        y.relu_()
        y += self.b(x)
        return y + before


def test_plain_in_place_writes_are_rewritten_without_full_functionalization():
    from graphopt.ir.functional import outplace_simple_mutations

    torch.manual_seed(0)
    model, x = ResidualInPlace().eval(), torch.randn(3, 4)
    program = torch.export.export(model, (x,), strict=False).module()
    assert outplace_simple_mutations(program)
    assert _mutating_nodes(program) == []
    torch.testing.assert_close(program(x), model(x))
    fast = graphopt.optimize(model, (x,))
    assert_matches(fast, model, (x,), tol=1e-6)


def test_writes_into_state_are_rewritten_with_one_update_per_state():
    from graphopt.ir.functional import outplace_simple_mutations

    model, x = CountsCalls().eval(), torch.randn(2, 4)
    program = torch.export.export(model, (x,), strict=False).module()
    assert outplace_simple_mutations(program)  # the buffer is written directly: no full functionalization
    assert _mutating_nodes(program) == []
    updates = state_update_nodes(program)
    assert len(updates) == 1 and updates[0].target is aten.copy_.default
    twin = CountsCalls().eval()
    twin.load_state_dict(model.state_dict())
    for _ in range(3):  # the graph's counter advances like the model's
        with torch.no_grad():
            torch.testing.assert_close(program(x), twin(x))


class ReadsStateThroughEarlierView(nn.Module):
    """A view of a buffer taken before the buffer is written and read after: it sees the new value."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.seen[:2]
        self.seen.add_(x.sum())
        return x * head.sum()


class WritesIntoStateView(nn.Module):
    """A slice of a buffer written in place (a cache write by slice assignment)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", torch.zeros(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cache[1:] = self.cache[:-1].clone()
        self.cache[0] = x.sum(0)
        return x @ self.cache.t()


@pytest.mark.parametrize("cls", [ReadsStateThroughEarlierView, WritesIntoStateView])
def test_writes_the_rewrite_cannot_express_get_full_functionalization(cls):
    from graphopt.ir.functional import outplace_simple_mutations

    torch.manual_seed(0)
    x = torch.randn(2, 4)
    program = torch.export.export(cls().eval(), (x,), strict=False).module()
    before = program.code
    assert not outplace_simple_mutations(program)  # left to torch.export's functionalization
    assert program.code == before
    model = cls().eval()
    fast = graphopt.optimize(model, (x,), target="cpu")
    for _ in range(3):  # the state advances identically in the optimized model and in eager
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(fast(x), expected)
