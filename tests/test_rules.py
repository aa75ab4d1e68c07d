"""Pattern rules: two plain functions and a check; hits and near-misses reach the report."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt import RewriteRules, Rule
from graphopt.ir.graph import count_ops

from helpers import assert_matches


def hardtanh_0_6(x):
    return F.hardtanh(x, 0.0, 6.0)


def relu6(x):
    return F.relu6(x)


def linear_then_relu(x, w, b):
    return torch.relu(F.linear(x, w, b))


def clamp_linear(x, w, b):
    return torch.clamp_min(F.linear(x, w, b), 0.0)


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x):
        a = torch.relu(self.fc(x))  # constant weight and bias: the rule fires
        b = torch.relu(F.linear(x, self.fc.weight, self.bias * x.mean()))  # computed bias: refused
        return F.hardtanh(a + b, 0.0, 6.0)


def bias_is_constant(match):
    return match.ok() if match.constant("b") is not None else match.fail("bias is computed at run time")


def test_rule_fires_and_refusals_are_reported_with_reason():
    model, x = TwoBranches().eval(), torch.randn(3, 4)
    rules = RewriteRules(rules=(
        Rule(linear_then_relu, clamp_linear, check=bias_is_constant),
        Rule(hardtanh_0_6, relu6),
    ))
    fast = graphopt.optimize(model, (x,), passes=[rules, "dce"])
    ops = count_ops(fast.graph_module)
    assert ops["aten.clamp_min.default"] == 1 and ops["aten.relu.default"] == 1
    assert ops["aten.relu6.default"] == 1 and "aten.hardtanh.default" not in ops
    assert fast.report.rule_hits == {"linear_then_relu": 1, "hardtanh_0_6": 1}
    record = fast.report.records[0]
    assert record.near_misses == {"linear_then_relu": {"bias is computed at run time": 1}}
    assert "linear_then_relu: 1× not applied (bias is computed at run time)" in str(fast.report)
    assert_matches(fast, model, (x,))


def test_rule_without_match_changes_nothing():
    fast = graphopt.optimize(nn.Tanh(), (torch.randn(2, 4),), passes=[RewriteRules(rules=(Rule(hardtanh_0_6, relu6),))])
    assert fast.report.records[0].status == "unchanged"
    assert fast.report.rule_hits == {}


def test_wrong_rule_is_caught_by_verification():
    def relu(x):
        return torch.relu(x)

    def wrong(x):
        return torch.sigmoid(x)

    fast = graphopt.optimize(nn.ReLU(), (torch.randn(2, 4),), passes=[RewriteRules(rules=(Rule(relu, wrong),))],
                             on_error="rollback")
    assert fast.report.rolled_back == ["rewrite-rules"]
    assert count_ops(fast.graph_module)["aten.relu.default"] == 1


def test_named_rule_set_and_explicit_trace_inputs():
    def conv_relu(x, w):
        return torch.relu(F.conv2d(x, w))

    def conv_clamp(x, w):
        return torch.clamp_min(F.conv2d(x, w), 0.0)

    rule = Rule(conv_relu, conv_clamp, name="conv-relu-to-clamp",
                example_inputs=(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)))

    class ConvRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 2, 3, 3))

        def forward(self, x):
            return torch.relu(F.conv2d(x, self.w))

    model = ConvRelu().eval()
    fast = graphopt.optimize(model, (torch.randn(2, 2, 7, 7),), passes=[RewriteRules(rules=(rule,), name="my-rules")])
    assert fast.report.records[0].name == "my-rules"
    assert fast.report.rule_hits == {"conv-relu-to-clamp": 1}
    assert_matches(fast, model, (torch.randn(2, 2, 7, 7),))
