"""Freeing input dims of a graph optimized at static shapes (what distill trains on).

Every model here is optimized at one shape, its graph freed, and run at other shapes against eager.
The example sizes collide on purpose (sequence 64 = hidden size 64 = 4 heads x 16), so a literal
matched to the wrong dim would show.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

import graphopt
from graphopt.errors import InputError
from graphopt.ir.free_dims import free_dims

transformers = pytest.importorskip("transformers")

BATCH_AND_SEQ = {0: {0: "batch", 1: "seq"}, 1: {0: "batch", 1: "seq"}}


def _freed_matches_eager(model: nn.Module, example: tuple, dims: dict, calls: list[tuple]):
    graph = graphopt.optimize(model, example, "cpu").portable_graph
    freed = free_dims(graph, list(example), dims)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(freed.graph_module(*example)),
                                                     pytree.tree_leaves(graph(*example)), strict=True))
        for call in calls:
            expected = [t for t in pytree.tree_leaves(model(*call)) if isinstance(t, torch.Tensor)]
            actual = pytree.tree_leaves(freed.graph_module(*call))
            assert [tuple(t.shape) for t in actual] == [tuple(t.shape) for t in expected]
            for a, e in zip(actual, expected, strict=True):
                torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    return freed


def _tokens(batch: int, seq: int, pad_from: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(batch * 1000 + seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_from is not None:
        mask[0, pad_from:] = 0
    return ids, mask


def test_cnn_batch_freed_through_flatten() -> None:
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(128, 10)).eval()
    x = torch.randn(540, 1, 8, 8)
    freed = _freed_matches_eager(cnn, (x,), {0: {0: "batch"}}, [(torch.randn(64, 1, 8, 8),), (x[:3],)])
    assert freed.bounds == {}


def test_bert_batch_and_sequence_freed_with_padding() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     vocab_size=100)
    bert = transformers.BertModel(config).eval()
    freed = _freed_matches_eager(bert, _tokens(4, 64), BATCH_AND_SEQ,
                                 [_tokens(3, 20, pad_from=15), _tokens(9, 64), _tokens(1, 33)])
    # the folded position table bounds the sequence; the batch is free
    assert freed.bounds == {"seq": 64}
    assert freed.fitted  # the folded token-type table and mask constants were fitted, not trained


def test_vit_batch_freed_through_the_class_token() -> None:
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    image_size=32, patch_size=8)
    vit = transformers.ViTModel(config).eval()
    _freed_matches_eager(vit, (torch.randn(4, 3, 32, 32),), {0: {0: "batch"}}, [(torch.randn(7, 3, 32, 32),)])


def test_llama_batch_and_sequence_freed_with_grouped_heads() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=100, use_cache=False)
    llama = transformers.LlamaModel(config).eval()
    ids = _tokens(4, 64)[0]
    freed = _freed_matches_eager(llama, (ids,), {0: {0: "batch", 1: "seq"}},
                                 [(_tokens(3, 20)[0],), (_tokens(6, 64)[0],)])
    assert freed.bounds == {"seq": 64}  # rotary tables and the causal mask were cut to the sequence


def test_a_dim_of_size_one_cannot_be_freed() -> None:
    model = nn.Linear(4, 2)
    graph = graphopt.optimize(model, (torch.randn(1, 4),), "cpu").portable_graph
    with pytest.raises(InputError, match="has size 1 in the example"):
        free_dims(graph, [torch.randn(1, 4)], {0: {0: "batch"}})


def test_a_table_meeting_the_batch_is_cut_and_bounds_it() -> None:
    class WithTable(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.arange(24.0).reshape(8, 3)  # the batch meets a fixed-size table

    graph = graphopt.optimize(WithTable(), (torch.randn(8, 3),), "cpu").portable_graph
    freed = free_dims(graph, [torch.randn(8, 3)], {0: {0: "batch"}})
    with torch.no_grad():  # smaller batches take the table's first rows
        torch.testing.assert_close(freed.graph_module(torch.ones(5, 3)), 1 + torch.arange(15.0).reshape(5, 3))
    assert freed.bounds == {"batch": 8}


def test_a_graph_that_fixes_the_dim_is_refused_naming_the_node() -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.t() @ self.weight  # contracts over the batch: it must be 8

    graph = graphopt.optimize(Fixed(), (torch.randn(8, 3),), "cpu").portable_graph
    with pytest.raises(InputError, match=r"'batch' cannot vary in this graph: node .*fixes it to 8"):
        free_dims(graph, [torch.randn(8, 3)], {0: {0: "batch"}})
