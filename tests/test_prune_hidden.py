"""Hidden-dim (residual stream) pruning of transformers: through embeddings, norms and every projection.

The hidden group of a Llama block (RMS norms) prunes exactly when the removed channels were zero
everywhere they are produced; BERT- and ViT-style blocks (layer norms) shrink to the right shapes
and reach the size goals of issue 20.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.ir.graph import attribute_value, run_and_record, snapshot_graph_module
from graphopt.passes import Prune
from graphopt.passes.lossy.base import CalibrationData

transformers = pytest.importorskip("transformers")
aten = torch.ops.aten


def _stored_numel(gm: torch.nn.Module) -> int:
    return sum(t.numel() for t in gm.parameters()) + sum(t.numel() for t in gm.buffers())


def _read_constants(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the graph reads, by attribute name."""
    return {str(n.target): value for n in gm.graph.nodes if (value := attribute_value(gm, n)) is not None}


def _hidden_choice(plan, width: int):
    """The pruning choice for the group of ``width`` units that an embedding's columns belong to."""
    for choice in plan.choices:
        atoms = plan.deps.weight_atoms(choice.group)
        if choice.group.units == width and any("embed" in a.target and a.dim == 1 for a in atoms):
            return choice
    raise AssertionError("no hidden-dim group was pruned")


def _zero_hidden_producers(gm: torch.fx.GraphModule, plan, choice) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose removed hidden channels are zero wherever they are produced."""
    zeroed = snapshot_graph_module(gm)
    removed = sorted(set(range(choice.group.units)) - set(choice.kept))
    for atom in plan.deps.weight_atoms(choice.group) + [plan.deps.atoms[a] for a in choice.group.atoms]:
        value = plan.deps.constant(atom.target)
        node = plan.deps.layer_node(atom.target)
        producing = (value.dim() == 1 or (node is not None and node.target is aten.embedding.default and atom.dim == 1)
                     or (node is not None and node.target is aten.linear.default and atom.dim == 0))
        if not producing:
            continue
        index = torch.tensor([atom.offset + u * atom.per_unit + j for u in removed for j in range(atom.per_unit)])
        owner, _, leaf = atom.target.rpartition(".")
        module = zeroed.get_submodule(owner) if owner else zeroed
        current = getattr(module, leaf).detach().clone().index_fill_(atom.dim, index, 0.0)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(current, requires_grad=False)
        else:
            module._buffers[leaf] = current
    return zeroed


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, vocab_size=100, use_cache=False,
                                      rms_norm_eps=1e-5)
    return transformers.LlamaForCausalLM(config).eval()


def test_llama_hidden_dim_prunes_exactly_when_the_removed_channels_are_zero() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 12))
    gm = graphopt.optimize(_llama(), (ids,), "cpu").portable_graph  # RMSNorm, SwiGLU, rotary fused
    assert any(n.target is aten.rms_norm.default for n in gm.graph.nodes)
    plan = Prune(amount=0.5).plan(gm, CalibrationData(example=(ids,)))
    hidden = _hidden_choice(plan, 64)
    assert len(hidden.kept) == 32
    reference = _zero_hidden_producers(gm, plan, hidden)
    pruned = snapshot_graph_module(reference)
    plan.apply(pruned, frozenset(c.name for c in plan.choices if c is not hidden))  # the hidden group alone
    pruned.recompile()
    expected, _ = run_and_record(reference, (ids,))
    actual, _ = run_and_record(pruned, (ids,))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    dense, _ = run_and_record(gm, (ids,))
    assert not torch.allclose(dense.logits, expected.logits, atol=1e-3)  # the zeroed channels mattered
    norms = [n for n in pruned.graph.nodes if n.target is aten.rms_norm.default]
    assert norms and all(n.args[1] == [32] for n in norms)


def test_llama_prunes_heads_in_key_value_groups_and_its_hidden_size() -> None:
    torch.manual_seed(0)
    model, ids = _llama(), torch.randint(0, 100, (2, 12))
    fast = graphopt.optimize(model, (ids,), "cpu", prune=0.5)
    shapes = {name: tuple(t.shape) for name, t in _read_constants(fast.graph_module).items()}
    embedding = next(shape for name, shape in shapes.items() if "embed_tokens" in name)
    assert embedding == (100, 32)  # every row kept (tokens), half the hidden columns
    assert fast(ids).logits.shape == (2, 12, 100)
    assert _stored_numel(fast.graph_module) < 0.35 * sum(p.numel() for p in model.parameters())


def test_bert_classifier_prunes_its_hidden_size_within_the_size_goal() -> None:
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(dim=128, hidden_dim=512, n_layers=2, n_heads=4, vocab_size=100)
    model = transformers.DistilBertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (2, 16))
    fast = graphopt.optimize(model, (ids,), "cpu", prune=0.5)
    embedding_names = ("word_embeddings", "position_embeddings")

    def non_embedding(named: dict[str, torch.Tensor]) -> int:
        return sum(t.numel() for name, t in named.items() if not any(e in name for e in embedding_names))

    after = non_embedding(_read_constants(fast.graph_module))
    assert after <= 0.55 * non_embedding(dict(model.named_parameters()))
    norms = [n for n in fast.graph_module.graph.nodes if n.target is aten.layer_norm.default]
    assert norms and all(n.args[1] == [64] for n in norms)
    assert fast(ids).logits.shape == (2, 2)


def test_vit_classifier_at_half_keeps_at_most_035_of_its_weights() -> None:
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384,
                                    image_size=32, patch_size=8, num_labels=10)
    model = transformers.ViTForImageClassification(config).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = graphopt.optimize(model, (x,), "cpu", prune=0.5)
    assert _stored_numel(fast.graph_module) <= 0.35 * sum(p.numel() for p in model.parameters())
    assert fast(x).logits.shape == (2, 10)
    kept = graphopt.optimize(model, (x,), "cpu", prune=Prune(amount=0.5, norms=False))  # hidden size kept
    norms = [n for n in kept.graph_module.graph.nodes if n.target is aten.layer_norm.default]
    assert norms and all(n.args[1] == [96] for n in norms)


class _TorchEncoder(nn.Module):
    """Two ``nn.TransformerEncoderLayer`` (so ``nn.MultiheadAttention``: packed q/k/v, batch-folded heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 256, batch_first=True, dropout=0.0)
        self.layers = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.inp(x)).mean(1))


def test_multihead_attention_is_unpacked_exactly_and_its_heads_prune() -> None:
    torch.manual_seed(0)
    model, x = _TorchEncoder().eval(), torch.randn(2, 12, 16)
    fast = graphopt.optimize(model, (x,), "cpu")  # the pass manager verifies the rewrite against eager
    record = next(r for r in fast.report.records if r.name == "unpack-attention")
    assert record.stats == {"qkv_slices": 6, "heads_unfolded": 6}
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)

    pruned = graphopt.optimize(model, (x,), "cpu", prune=Prune(amount=0.5, norms=False))
    # pruned constants are new attributes named after the originals, dots made underscores
    shapes = {name.replace(".", "_"): tuple(t.shape) for name, t in _read_constants(pruned.graph_module).items()}
    in_proj = next(shape for name, shape in shapes.items() if name.endswith("layers_0_self_attn_in_proj_weight"))
    out_proj = next(shape for name, shape in shapes.items() if name.endswith("layers_0_self_attn_out_proj_weight"))
    assert in_proj == (96, 64) and out_proj == (64, 32)  # 2 of 4 heads kept in q, k, v and the output projection
    assert pruned(x).shape == (2, 10)
