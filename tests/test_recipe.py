"""graphopt.recipe: prune -> distill -> quantize in one call, every stage measured side by side."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.errors import InputError

from helpers import mean_pooled, token_batch

transformers = pytest.importorskip("transformers")


def test_recipe_on_a_small_encoder_end_to_end() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, vocab_size=120)
    teacher = transformers.BertModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    example = token_batch(generator, 4, 32)
    sentences = [token_batch(generator, 8, length) for length in (12, 20, 32, 7, 25, 16)]
    held_out = [token_batch(generator, 4, 32) for _ in range(3)]
    small = graphopt.recipe(teacher, example, data=sentences, prune=0.5,
                            distill={"epochs": 3, "lr": 3e-4, "loss": "cosine"}, match=mean_pooled,
                            quantize="int8-dynamic", validation=held_out)

    names = [r.name for r in small.report.records]
    assert names.index("prune") < names.index("distill") < names.index("quantize-dynamic")
    section = next(s for s in small.report.sections if s.title == "recipe: stages")
    assert [row[0] for row in section.rows] == ["original (eager)", "pruned (0.5)", "distilled",
                                                "quantized (int8-dynamic)"]
    sizes = [row[1] for row in section.rows]
    assert sizes[1] < 0.6 * sizes[0] and sizes[3] < 0.5 * sizes[1]  # half the heads and neurons; int8 weights
    worst = [row[5] for row in section.rows]
    assert worst[2] > worst[1]  # distillation recovered some of what pruning lost, on held-out sentences
    assert worst[3] > 0.99
    assert {p.title for p in section.plots} == {"recipe: size and speed per stage",
                                                "recipe: worst per-sample cosine to the original"}
    assert "3 held-out batch(es) through match()" in section.description
    assert small(*held_out[0]).last_hidden_state.shape == (4, 32, 64)


def test_recipe_says_what_is_wrong() -> None:
    model = torch.nn.Linear(4, 4)
    with pytest.raises(InputError, match="nothing to do"):
        graphopt.recipe(model, (torch.randn(2, 4),), data=[], prune=None, quantize=None)
    with pytest.raises(InputError, match="keywords as a dict"):
        graphopt.recipe(model, (torch.randn(2, 4),), data=[], distill=3)
