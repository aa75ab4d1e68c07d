"""The pass manager: verification names a broken pass, rollback, instruments, registry, pipelines."""

import io
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx

import graphopt
from graphopt import Instrument, IRDumpInstrument, Pass, PassResult, TimingInstrument
from graphopt.ir.graph import iter_ops

from helpers import assert_matches

aten = torch.ops.aten


@dataclass(frozen=True)
class SwapReluForSigmoid(Pass):
    """Deliberately wrong: relu6 and sigmoid are different functions."""

    name = "swap-relu6-for-sigmoid"

    def run(self, gm: fx.GraphModule) -> PassResult:
        hits = list(iter_ops(gm, aten.relu6.default))
        for node in hits:
            node.target = aten.sigmoid.default
        return PassResult(changed=bool(hits), stats={"swapped": len(hits)})


@dataclass(frozen=True)
class Crashes(Pass):
    name = "crashes"

    def run(self, gm: fx.GraphModule) -> PassResult:
        raise RuntimeError("boom")


def test_wrong_pass_is_caught_and_named(small_cnn):
    model, inputs = small_cnn
    with pytest.raises(graphopt.VerificationError) as info:
        graphopt.optimize(model, inputs, passes=["remove-dropout", SwapReluForSigmoid(), "dce"])
    error = info.value
    assert error.pass_name == "swap-relu6-for-sigmoid"
    assert "swap-relu6-for-sigmoid" in str(error)
    assert error.node == "relu6"  # the node the pass touched whose value changed
    assert [(r.name, r.status) for r in error.report.records] == [
        ("remove-dropout", "changed"), ("swap-relu6-for-sigmoid", "failed")]
    assert "disabled=[...]" in str(error) and "on_error='rollback'" in str(error)  # says what to do


def test_rollback_undoes_the_pass_and_the_pipeline_goes_on(small_cnn):
    model, inputs = small_cnn
    fast = graphopt.optimize(model, inputs, passes=[SwapReluForSigmoid(), "fold-conv-batchnorm", Crashes(), "dce"],
                             on_error="rollback")
    statuses = [(r.name, r.status) for r in fast.report.records]
    assert statuses == [("swap-relu6-for-sigmoid", "rolled back"), ("fold-conv-batchnorm", "changed"),
                        ("crashes", "rolled back"), ("dce", "unchanged")]
    assert fast.report.rolled_back == ["swap-relu6-for-sigmoid", "crashes"]
    assert "boom" in fast.report.records[2].error
    assert "rolled back: swap-relu6-for-sigmoid, crashes" in str(fast.report)
    assert len(list(iter_ops(fast.graph_module, aten.relu6.default))) == 2
    assert_matches(fast, model, inputs)


def test_verification_off_lets_a_wrong_pass_through_but_final_check_reports_it(small_cnn):
    model, inputs = small_cnn
    fast = graphopt.optimize(model, inputs, passes=[SwapReluForSigmoid()], verify=False)
    assert fast.report.final_check.startswith("FAILED")
    assert fast.report.records[0].max_abs_diff is None


def test_malformed_graph_is_caught():
    @dataclass(frozen=True)
    class DanglingAttribute(Pass):
        name = "dangling-attribute"

        def run(self, gm: fx.GraphModule) -> PassResult:
            with gm.graph.inserting_before(next(iter(gm.graph.nodes))):
                gm.graph.get_attr("does_not_exist")
            return PassResult(changed=True)

    with pytest.raises(graphopt.VerificationError, match="dangling-attribute"):
        graphopt.optimize(torch.nn.ReLU(), (torch.randn(3),), passes=[DanglingAttribute()])


def test_instruments_see_every_hook(small_cnn):
    model, inputs = small_cnn
    calls = []

    class Recorder(Instrument):
        def before_pass(self, pass_, gm):
            calls.append(("before", pass_.name))

        def after_pass(self, pass_, gm, result):
            calls.append(("after", pass_.name, result.changed))

        def after_pass_failed(self, pass_, gm, error):
            calls.append(("failed", pass_.name, type(error).__name__))

    timing = TimingInstrument()
    dump = io.StringIO()
    graphopt.optimize(model, inputs, passes=["remove-dropout", SwapReluForSigmoid()], on_error="rollback",
                      instruments=[Recorder(), timing, IRDumpInstrument(dump)])
    assert calls == [("before", "remove-dropout"), ("after", "remove-dropout", True),
                     ("before", "swap-relu6-for-sigmoid"), ("failed", "swap-relu6-for-sigmoid", "VerificationError")]
    assert [name for name, _ in timing.seconds] == ["remove-dropout", "swap-relu6-for-sigmoid"]
    assert all(seconds > 0 for _, seconds in timing.seconds)
    text = dump.getvalue()
    assert "# after remove-dropout" in text and "# after swap-relu6-for-sigmoid-FAILED" in text
    assert "dropout" not in text.split("# after remove-dropout")[1].split("# after")[0]


def test_ir_dump_to_folder(small_cnn, tmp_path):
    model, inputs = small_cnn
    graphopt.optimize(model, inputs, passes=["remove-dropout", "dce"], instruments=[IRDumpInstrument(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01-remove-dropout.py", "02-dce.py"]


def test_fixed_point_repeats_until_nothing_changes():
    @dataclass(frozen=True)
    class PeelOneNeg(Pass):
        """Removes one pair of negations per run, so it needs several iterations."""

        name = "peel-one-neg"

        def run(self, gm: fx.GraphModule) -> PassResult:
            for node in iter_ops(gm, aten.neg.default):
                inner = node.args[0]
                if isinstance(inner, fx.Node) and inner.target is aten.neg.default:
                    node.replace_all_uses_with(inner.args[0])
                    gm.graph.erase_node(node)
                    gm.graph.erase_node(inner)
                    return PassResult(changed=True)
            return PassResult(changed=False)

    class FourNegs(torch.nn.Module):
        def forward(self, x):
            return torch.neg(torch.neg(torch.neg(torch.neg(x)))) + 1

    fast = graphopt.optimize(FourNegs(), (torch.randn(3),), passes=[PeelOneNeg()], fixed_point=True)
    assert [r.iteration for r in fast.report.records] == [1, 2, 3]
    assert [r.status for r in fast.report.records] == ["changed", "changed", "unchanged"]
    assert not list(iter_ops(fast.graph_module, aten.neg.default))


def test_registry_finds_user_passes_by_name(small_cnn):
    @graphopt.register_pass
    @dataclass(frozen=True)
    class NoOp(Pass):
        name = "test-no-op"

        def run(self, gm: fx.GraphModule) -> PassResult:
            return PassResult(changed=False)

    assert "test-no-op" in graphopt.available_passes()
    assert graphopt.get_pass("test-no-op") is NoOp
    model, inputs = small_cnn
    fast = graphopt.optimize(model, inputs, passes=["test-no-op"])
    assert fast.report.records[0].name == "test-no-op"


def test_unknown_and_disabled_pass_names():
    with pytest.raises(graphopt.UnknownPassError, match=r"available: .*constant-folding"):
        graphopt.get_pass("no-such-pass")
    with pytest.raises(graphopt.UnknownPassError, match="not in the pipeline: typo-pass"):
        graphopt.optimize(torch.nn.ReLU(), (torch.randn(2),), disabled=["typo-pass"])


def test_disabled_drops_passes_by_name(small_cnn):
    model, inputs = small_cnn
    fast = graphopt.optimize(model, inputs, disabled=["fold-conv-batchnorm", "fold-linear-batchnorm"])
    names = [r.name for r in fast.report.records]
    assert names == [p for p in graphopt.DEFAULT_PIPELINE if "batchnorm" not in p]
    assert any(n.target is aten.batch_norm.default for n in fast.graph_module.graph.nodes)


def test_pass_options_are_fields():
    folding = graphopt.get_pass("constant-folding")(min_growth_elements=0)
    assert folding.min_growth_elements == 0
    with pytest.raises(AttributeError):
        folding.min_growth_elements = 5  # frozen: options are fixed once made
