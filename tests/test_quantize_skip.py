"""``skip=``: layers kept in float by name, module path or subtree, under every quantization scheme."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.errors import InputError
from graphopt.ir.graph import FUSED_FROM, module_path
from graphopt.passes import Quantize
from graphopt.passes.quantize.kmeans import KMeansQuantize
from graphopt.passes.quantize.selection import SKIPPED


class Attention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))


class Net(nn.Module):
    """An attention block (fused to one Q/K/V linear), a two-layer MLP and a head; widths fit int4 groups."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.attn = Attention(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.attn(x)) + x)


def _linears(fast: graphopt.OptimizedModel) -> dict[str, bool]:
    """Module path (or fused paths) of each linear -> whether it reads a plain float weight."""
    found = {}
    for node in fast.graph_module.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            key = ",".join(node.meta.get(FUSED_FROM, ())) or module_path(node)
            found[key] = node.args[1].op == "get_attr"
    return found


def _optimize(quantize: object, **options: object) -> graphopt.OptimizedModel:
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(4, 8, 128)
    calibration = [(torch.randn(4, 8, 128),) for _ in range(2)]
    return graphopt.optimize(model, (x,), quantize=quantize, calibration=calibration,
                             fidelity=graphopt.Fidelity(min_cosine=0.9), **options)


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "int8-weight-only", "int4-weight-only", "kmeans"])
def test_a_module_path_keeps_its_layer_float_under_every_scheme(scheme: str) -> None:
    fast = _optimize(Quantize(scheme=scheme, skip="head"))
    linears = _linears(fast)
    assert linears["head"] is True
    assert linears["mlp.0"] is False and linears["mlp.2"] is False
    lossy = next(r for r in fast.report.records if r.fidelity)
    assert SKIPPED in str(lossy.near_misses)


def test_a_path_keeps_everything_under_it_and_a_fused_projection_answers_to_its_parts() -> None:
    fast = _optimize("int8-dynamic")
    fused = [key for key in _linears(fast) if "attn.q" in key]
    assert fused == ["attn.q,attn.k,attn.v"]  # horizontal fusion merged them and kept their paths
    kept = _optimize(Quantize(scheme="int8-dynamic", skip=["mlp", "attn.k"]))
    linears = _linears(kept)
    assert linears["mlp.0"] is True and linears["mlp.2"] is True
    assert linears["attn.q,attn.k,attn.v"] is True  # one of its parts was asked for: the fused layer stays float
    assert linears["head"] is False


def test_a_skip_entry_that_matches_nothing_is_an_error_that_shows_real_paths() -> None:
    with pytest.raises(InputError, match=r"'haed'.*matches no node name or module path.*'head'"):
        _optimize(Quantize(scheme="int8-dynamic", skip="haed"))
    with pytest.raises(InputError, match=r"KMeans\(skip=\.\.\.\) names 'mlp\.9'"):
        _optimize(KMeansQuantize(clusters=16, skip=("mlp.9",)))
