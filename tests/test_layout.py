"""remove-identity and memory layout: copies go only where nothing needs their layout or identity."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.ir.graph import count_ops
from graphopt.passes.cleanup import RemoveIdentity

from helpers import assert_matches, randomize_batchnorm

COPIES = ("aten.contiguous.default", "aten.clone.default")


def copies(counts) -> int:
    return sum(counts[name] for name in COPIES)


def writes(gm) -> int:
    return sum(1 for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable)


class ChannelShuffleBlock(nn.Module):
    """conv → view(b, g, c/g, h, w) → transpose(1, 2) → contiguous → view(b, c, h, w) → conv."""

    def __init__(self, channels: int = 8, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv1(x))
        b, c, h, w = y.shape
        y = y.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return self.conv2(y)


class HeadAttention(nn.Module):
    """linear → view(b, s, h, d) → transpose(1, 2) → attention → transpose(1, 2).contiguous().view → linear."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, dim = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, s, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))
        attention = torch.softmax(q @ k.transpose(-2, -1) / (dim // self.heads) ** 0.5, dim=-1)
        context = (attention @ v).transpose(1, 2).contiguous().view(b, s, dim)
        return self.out(context)


def shuffle_case():
    torch.manual_seed(0)
    return randomize_batchnorm(ChannelShuffleBlock()).eval(), (torch.randn(2, 8, 6, 6),)


def attention_case():
    torch.manual_seed(0)
    return HeadAttention().eval(), (torch.randn(2, 5, 16),)


CASES = {"channel-shuffle": shuffle_case, "attention-heads": attention_case}


@pytest.mark.parametrize("target", ["cpu", "onnx"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_default_pipeline_keeps_layout_sensitive_views_working(case, target):
    model, inputs = CASES[case]()
    fast = graphopt.optimize(model, inputs, target=target, on_error="raise")
    assert fast.report.rolled_back == []
    assert_matches(fast, model, inputs)
    record = next(r for r in fast.report.records if r.name == "remove-identity")
    assert record.stats["copies_removed"] == 1 and record.stats["views_rewritten"] == 1, record.stats
    after = count_ops(fast.graph_module)
    assert copies(after) == 0, after
    assert after["aten.reshape.default"] == 1, after


@pytest.mark.parametrize("case", sorted(CASES))
def test_remove_identity_drops_the_copy_and_turns_the_view_after_it_into_reshape(case):
    model, inputs = CASES[case]()
    gm = graphopt.capture(model, inputs).graph_module
    before = count_ops(gm)
    assert copies(before) == 1 and before["aten.reshape.default"] == 0, before
    views = [n for n in gm.graph.nodes if n.target is torch.ops.aten.view.default]
    downstream = [n for n in views if n.args[0].target in (torch.ops.aten.contiguous.default,
                                                           torch.ops.aten.clone.default)]
    assert len(downstream) == 1
    view, meta = downstream[0], dict(downstream[0].meta)

    result = RemoveIdentity().run(gm)
    gm.recompile()

    after = count_ops(gm)
    assert copies(after) == 0, after
    assert after["aten.reshape.default"] == 1
    assert after["aten.view.default"] == before["aten.view.default"] - 1  # the views before the copy stay
    assert view.target is torch.ops.aten.reshape.default and view.meta == meta  # rewritten in place
    assert result.changed and result.stats["copies_removed"] == 1 and result.stats["views_rewritten"] == 1
    assert result.near_misses == {}
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs))


def test_functional_ir_clone_is_dropped_and_view_rewritten():
    """The functional IR spells ``.contiguous()`` as ``clone(memory_format=contiguous_format)``."""
    model, inputs = shuffle_case()
    gm = torch.export.export(model, inputs, strict=False).run_decompositions({}).module()
    clones = [n for n in gm.graph.nodes if n.target is torch.ops.aten.clone.default]
    assert [n.kwargs.get("memory_format") for n in clones] == [torch.contiguous_format]
    result = RemoveIdentity().run(gm)
    gm.recompile()
    after = count_ops(gm)
    assert after["aten.clone.default"] == 0 and after["aten.reshape.default"] == 1, after
    assert result.stats["views_rewritten"] == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs))


def test_copies_go_even_when_the_graph_updates_a_buffer():
    class Counting(ChannelShuffleBlock):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls.add_(1)
            return super().forward(x)

    torch.manual_seed(0)
    model, inputs = randomize_batchnorm(Counting()).eval(), (torch.randn(2, 8, 6, 6),)
    gm = graphopt.capture(model, inputs).graph_module
    assert writes(gm) == 1  # the buffer update (``add_`` in the training IR, ``copy_`` once functionalized)
    result = RemoveIdentity().run(gm)
    after = count_ops(gm)
    assert copies(after) == 0 and after["aten.reshape.default"] == 1, after
    assert result.stats["copies_removed"] == 1
    assert writes(gm) == 1


class ReturnsCopy(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.clone(), x.transpose(0, 1).contiguous() * 2


def test_copy_feeding_the_output_is_kept_and_reported():
    x = torch.randn(3, 4)
    gm = graphopt.capture(ReturnsCopy(), (x,)).graph_module
    result = RemoveIdentity().run(gm)
    after = count_ops(gm)
    # the clone is returned: dropping it would return the caller's own tensor; the contiguous
    # feeds a multiplication, which gives the same values for any layout
    assert after["aten.clone.default"] == 1 and after["aten.contiguous.default"] == 0, after
    assert result.near_misses == {"remove-identity": {"copy feeds the graph output": 1}}

    fast = graphopt.optimize(ReturnsCopy(), (x,), on_error="raise")
    assert fast.report.near_misses == {"remove-identity": {"copy feeds the graph output": 1}}
    copied, _ = fast(x)
    assert torch.equal(copied, x) and copied.data_ptr() != x.data_ptr()


def test_returned_copy_of_a_private_intermediate_goes():
    """Functionalization turns an inference dropout before the output into ``clone``: that one may go."""

    class FinalDropout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.dropout = nn.Dropout(0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dropout(self.fc(x))

    model, x = FinalDropout().eval(), torch.randn(2, 4)
    gm = torch.export.export(model, (x,), strict=False).run_decompositions({}).module()
    assert count_ops(gm)["aten.clone.default"] == 1
    result = RemoveIdentity().run(gm)
    gm.recompile()
    assert count_ops(gm)["aten.clone.default"] == 0 and result.near_misses == {}
    torch.testing.assert_close(gm(x), model(x))


def test_returned_copy_of_a_shared_intermediate_is_kept():
    class Shared(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = x * 2
            return y.clone(), y  # the two outputs must not be the same tensor

    x = torch.randn(3)
    gm = graphopt.capture(Shared(), (x,)).graph_module
    result = RemoveIdentity().run(gm)
    gm.recompile()
    assert count_ops(gm)["aten.clone.default"] == 1
    assert result.near_misses == {"remove-identity": {"copy feeds the graph output": 1}}
    first, second = gm(x)
    assert first.data_ptr() != second.data_ptr()


def test_returned_view_of_a_copy_keeps_the_copy():
    class ReturnsView(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x + 1).transpose(0, 1).contiguous().view(-1)

    x = torch.randn(3, 4)
    gm = graphopt.capture(ReturnsView(), (x,)).graph_module
    result = RemoveIdentity().run(gm)
    assert count_ops(gm)["aten.contiguous.default"] == 1
    assert count_ops(gm)["aten.view.default"] == 1
    assert result.near_misses == {"remove-identity": {"copy feeds the graph output": 1}}


def test_views_reached_through_elementwise_ops_are_rewritten_too():
    class Through(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(x.transpose(1, 2).contiguous())  # relu keeps its input's strides
            return y.view(2, -1) + 1

    x = torch.randn(2, 3, 4)
    gm = graphopt.capture(Through(), (x,)).graph_module
    result = RemoveIdentity().run(gm)
    gm.recompile()
    assert count_ops(gm)["aten.contiguous.default"] == 0
    assert count_ops(gm)["aten.view.default"] == 0 and result.stats["views_rewritten"] == 1
    torch.testing.assert_close(gm(x), Through()(x))


@pytest.mark.parametrize(
    ("consumer", "reason"),
    [
        (lambda y: y.as_strided((2, 2), (1, 2)) + 1, "copy feeds as_strided"),
        (lambda y: y.view(torch.int16) + 1, "copy feeds a view that cannot become reshape"),
        (lambda y: torch.ops.graphopt_test.needs_contiguous(y) + 1, "copy feeds a non-aten op"),
        (lambda y: torch.ops.graphopt_test.needs_contiguous(torch.relu(y)) + 1, "copy feeds a non-aten op"),
    ],
    ids=["as_strided", "view-dtype", "custom-op", "custom-op-after-relu"],
)
def test_layout_dependent_consumers_keep_the_copy(consumer, reason):
    class Model(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return consumer(x.t().contiguous())

    x = torch.randn(3, 4)
    gm = graphopt.capture(Model(), (x,)).graph_module
    result = RemoveIdentity().run(gm)
    gm.recompile()
    assert count_ops(gm)["aten.contiguous.default"] == 1
    assert result.near_misses == {"remove-identity": {reason: 1}}
    torch.testing.assert_close(gm(x), Model()(x))


def test_same_element_size_dtype_view_does_not_need_the_copy():
    class Bits(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.t().contiguous().view(torch.int32) + 1

    x = torch.randn(3, 4)
    gm = graphopt.capture(Bits(), (x,)).graph_module
    result = RemoveIdentity().run(gm)
    gm.recompile()
    assert count_ops(gm)["aten.contiguous.default"] == 0 and result.stats["copies_removed"] == 1
    torch.testing.assert_close(gm(x), Bits()(x))


def test_copy_written_in_place_is_kept():
    class Writes(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.clone()
            y.view(-1)[0] = 5.0  # in place on a view of the copy: must not reach the input
            return y * x

    x = torch.randn(3, 4)
    captured = graphopt.capture(Writes(), (x,))
    RemoveIdentity().run(captured.graph_module)
    captured.graph_module.recompile()
    x_before = x.clone()
    torch.testing.assert_close(captured.graph_module(x), Writes()(x_before))
    assert torch.equal(x, x_before)


def test_channels_last_copy_is_kept_on_purpose():
    class ChannelsLast(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.contiguous(memory_format=torch.channels_last) + 1

    gm = graphopt.capture(ChannelsLast(), (torch.randn(1, 2, 3, 4),)).graph_module
    result = RemoveIdentity().run(gm)
    assert copies(count_ops(gm)) == 1
    assert result.near_misses == {"remove-identity": {"copy changes the memory format": 1}}


def test_channel_shuffle_with_dynamic_batch():
    model, inputs = shuffle_case()
    fast = graphopt.optimize(model, inputs, dynamic_batch=True, on_error="raise")
    assert fast.report.rolled_back == []
    assert copies(count_ops(fast.graph_module)) == 0
    assert_matches(fast, model, (torch.randn(5, 8, 6, 6),))


@torch.library.custom_op("graphopt_test::needs_contiguous", mutates_args=())
def _needs_contiguous(x: torch.Tensor) -> torch.Tensor:
    if not x.is_contiguous():
        raise RuntimeError("needs_contiguous: input must be contiguous")
    return x * 2


@_needs_contiguous.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)
