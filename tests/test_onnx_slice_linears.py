"""A linear read only through disjoint slices of its output, as one linear per slice (onnx decoder steps)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphopt.ir.capture import capture
from graphopt.targets.onnx.slice_linears import MIN_PIECE_FEATURES, LinearPerSlice

aten = torch.ops.aten


class Sliced(nn.Module):
    """One projection read through slices of its features, as horizontal fusion leaves a gated MLP."""

    def __init__(self, bounds: list[tuple[int, int]], whole: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 2 * MIN_PIECE_FEATURES, bias=bias)
        self.bounds, self.whole = bounds, whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        parts = [torch.sigmoid(y[..., start:end]).sum(-1, keepdim=True) for start, end in self.bounds]
        return torch.cat(parts + ([y] if self.whole else []), dim=-1)


def _linears(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return list(gm.graph.find_nodes(op="call_function", target=aten.linear.default))


@pytest.mark.parametrize("bias", [True, False])
def test_disjoint_slices_get_one_linear_each_over_views_of_the_weight(bias: bool) -> None:
    torch.manual_seed(0)
    model = Sliced([(0, MIN_PIECE_FEATURES), (MIN_PIECE_FEATURES, 2 * MIN_PIECE_FEATURES)], bias=bias).eval()
    x = torch.randn(2, 3, 16)
    gm = capture(model, (x,)).graph_module
    expected = gm(x)
    result = LinearPerSlice().run(gm)
    assert result.changed and result.stats == {"linears_divided": 1, "linears_after": 2}
    linears = _linears(gm)
    assert len(linears) == 2 and not list(gm.graph.find_nodes(op="call_function", target=aten.slice.Tensor))
    weights = [getattr(gm, node.args[1].target) for node in linears]
    assert [tuple(w.shape) for w in weights] == [(MIN_PIECE_FEATURES, 16)] * 2
    assert weights[1].untyped_storage().data_ptr() == weights[0].untyped_storage().data_ptr()  # views: no copy
    torch.testing.assert_close(gm(x), expected)


N = MIN_PIECE_FEATURES


@pytest.mark.parametrize(("bounds", "whole"), [([(0, N + 8), (N, 2 * N)], False),  # overlapping: weights read twice
                                               ([(0, N), (N, 2 * N)], True),  # the projection is also read whole
                                               ([(0, N)], False),  # one slice: nothing to divide
                                               ([(0, N + N // 2), (N + N // 2, 2 * N)], False)])  # one too narrow
def test_other_readers_keep_the_linear_whole(bounds: list[tuple[int, int]], whole: bool) -> None:
    model = Sliced(bounds, whole=whole).eval()
    x = torch.randn(2, 16)
    gm = capture(model, (x,)).graph_module
    assert not LinearPerSlice().run(gm).changed
    assert len(_linears(gm)) == 1
