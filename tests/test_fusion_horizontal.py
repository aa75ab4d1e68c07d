"""fuse-horizontal: sibling linears reading one input become one linear with concatenated weights and slices."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.ir.graph import count_ops, parameter_bytes

PIPELINE = ["remove-identity", "fuse-horizontal", "dce"]


class QKV(nn.Module):
    """Attention projections as usually written: three nn.Linear on the same input, heads split by view."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, s, d).view(-1)  # a view after the fused slices' layout path


class GatedMLP(nn.Module):
    """LLaMA-style MLP: gate and up projections (no bias, different width from the input) read x."""

    def __init__(self, dim: int = 16, hidden: int = 40) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _record(fast):
    return next(r for r in fast.report.records if r.name == "fuse-horizontal")


def test_qkv_projections_become_one_linear() -> None:
    torch.manual_seed(0)
    model = QKV().eval()
    x = torch.randn(2, 8, 32)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    fast = graphopt.optimize(model, (x,), passes=PIPELINE)
    ops = count_ops(fast.graph_module)
    assert ops["aten.linear.default"] == 1 and ops["aten.slice.Tensor"] == 3
    assert _record(fast).stats == {"groups": 1, "linears_merged": 3}
    (linear,) = [n for n in fast.graph_module.graph.nodes if n.target is torch.ops.aten.linear.default]
    fused_weight = getattr(fast.graph_module, linear.args[1].target)
    fused_bias = getattr(fast.graph_module, linear.args[2].target)
    assert fused_weight.shape == (96, 32)
    torch.testing.assert_close(fused_bias[64:], torch.zeros(32))  # v had no bias: zeros
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())  # untouched
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


class SharedBlock(nn.Module):
    """ALBERT's layer sharing: one attention block applied three times."""

    def __init__(self) -> None:
        super().__init__()
        self.block = QKV()

    def forward(self, x):
        for _ in range(3):
            x = x + self.block(x).view(x.shape)
        return x


def test_a_block_applied_several_times_stores_its_fused_weights_once() -> None:
    torch.manual_seed(0)
    model = SharedBlock().eval()
    x = torch.randn(2, 8, 32)
    fast = graphopt.optimize(model, (x,), passes=PIPELINE)
    assert _record(fast).stats == {"groups": 3, "linears_merged": 9}
    linears = [n for n in fast.graph_module.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 3 and len({n.args[1].target for n in linears}) == 1  # one fused weight, read thrice
    assert parameter_bytes(fast.graph_module) == (96 * 32 + 96) * 4  # the fused copies only: no per-use copy
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_gate_and_up_projections_are_merged() -> None:
    torch.manual_seed(0)
    model = GatedMLP().eval()
    x = torch.randn(3, 5, 16)
    fast = graphopt.optimize(model, (x,), passes=PIPELINE)
    assert count_ops(fast.graph_module)["aten.linear.default"] == 2  # gate+up fused, down alone
    assert fast.report.rule_hits == {"sibling-linears": 1}
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


class Siblings(nn.Module):
    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        if self.variant == "runtime-weight":
            return self.a(x) + self.b(x) + F.linear(x, self.c.weight * 2)
        return self.a(x) + self.b(x), self.c(x)  # "returned": c's result is a graph output


def test_near_misses_name_the_sibling_problem() -> None:
    x = torch.randn(4, 8)
    fast = graphopt.optimize(Siblings("runtime-weight").eval(), (x,), passes=PIPELINE)
    assert _record(fast).stats == {"groups": 1, "linears_merged": 2}
    assert _record(fast).near_misses == {"fuse-horizontal": {"weight computed at run time": 1}}

    model = Siblings("returned").eval()
    fast = graphopt.optimize(model, (x,), passes=PIPELINE)
    assert _record(fast).stats == {"groups": 1, "linears_merged": 2}
    assert _record(fast).near_misses == {"fuse-horizontal": {"projection returned as a graph output": 1}}
    with torch.no_grad():
        for got, want in zip(fast(x), model(x), strict=True):
            torch.testing.assert_close(got, want)


def test_lone_linears_are_unchanged() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    before = graphopt.optimize(model, (x,), passes=["remove-identity"]).graph_module.code
    fast = graphopt.optimize(model, (x,), passes=PIPELINE)
    assert _record(fast).status == "unchanged" and not _record(fast).near_misses
    assert fast.graph_module.code == before


def test_transformers_attention_projections_are_merged_with_dynamic_batch() -> None:
    from graphopt.bench import zoo

    entry = zoo.load("vit", size="small", batch=2)
    fast = graphopt.optimize(entry.model, entry.example_inputs, dynamic_batch=True,
                             passes=["remove-dropout", "remove-identity", "constant-folding", "fuse-horizontal", "dce"])
    assert _record(fast).stats == {"groups": 2, "linears_merged": 6}  # Q, K, V of both layers
    (images,) = entry.example_inputs
    bigger = images.repeat(3, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(fast(bigger), entry.model(bigger), rtol=1e-4, atol=1e-5)
