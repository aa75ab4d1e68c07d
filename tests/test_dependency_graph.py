"""The dependency graph of coupled dims: what shrinks with what, on residual, concat, depthwise and attention models."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.analysis.dependency import DependencyGraph


def _deps(model: nn.Module, *inputs: torch.Tensor, protect: tuple[str, ...] = ()) -> DependencyGraph:
    captured = graphopt.capture(model.eval(), inputs)
    return DependencyGraph.build(captured.graph_module, protect)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.stem(x))
        return self.head(F.relu(self.conv2(F.relu(self.conv1(a))) + a))


def test_residual_add_couples_both_branches_and_the_consumer() -> None:
    deps = _deps(Residual(), torch.randn(1, 3, 8, 8))
    assert deps.coupled_weights("stem.weight", 0) == {
        ("stem.weight", 0), ("stem.bias", 0), ("conv2.weight", 0), ("conv2.bias", 0),
        ("conv1.weight", 1), ("head.weight", 1),
    }
    # the inner channels of the block are a group of their own
    assert deps.coupled_weights("conv1.weight", 0) == {("conv1.weight", 0), ("conv1.bias", 0), ("conv2.weight", 1)}
    [outputs] = deps.weight_groups("head.weight", 0)
    assert "graph output keeps its shape" in outputs.reasons
    assert {g.units for g in deps.prunable_groups()} == {8, 6}
    # the networkx graph: the stem's output slot and the head's input channels are connected
    slot = next(n for n in deps.graph.nodes if isinstance(n[0], str) and n[0].startswith("conv2d") and n[1] == 1)
    assert nx.has_path(deps.graph, slot, ("atom", deps.weight_groups("head.weight", 1)[0].atoms[0]))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.mix = nn.Conv2d(10, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1))


def test_concat_maps_each_input_to_its_offset_range() -> None:
    deps = _deps(Concat(), torch.randn(1, 3, 4, 4))
    [group_a] = deps.weight_groups("a.weight", 0)
    [group_b] = deps.weight_groups("b.weight", 0)
    assert group_a is not group_b
    mix_a = [deps.atoms[i] for i in group_a.atoms if deps.atoms[i].target == "mix.weight"]
    mix_b = [deps.atoms[i] for i in group_b.atoms if deps.atoms[i].target == "mix.weight"]
    assert [(m.dim, m.offset, m.size) for m in mix_a] == [(1, 0, 4)]
    assert [(m.dim, m.offset, m.size) for m in mix_b] == [(1, 4, 6)]
    assert len(deps.weight_groups("mix.weight", 1)) == 2


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.project = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(F.relu(self.depthwise(F.relu(self.expand(x)))))


def test_depthwise_conv_ties_its_input_and_output_channels() -> None:
    deps = _deps(Depthwise(), torch.randn(1, 3, 8, 8))
    assert deps.coupled_weights("expand.weight", 0) == {
        ("expand.weight", 0), ("expand.bias", 0), ("depthwise.weight", 0), ("depthwise.bias", 0),
        ("project.weight", 1),
    }
    node = next(n for n in deps.gm.graph.nodes if n.name in deps.rewrites and deps.rewrites[n.name] == "groups")
    assert node.args[1].target == "depthwise.weight"


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.project = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(F.relu(self.grouped(F.relu(self.expand(x)))))


def test_grouped_conv_prunes_whole_groups() -> None:
    deps = _deps(Grouped(), torch.randn(1, 3, 8, 8))
    [group] = deps.weight_groups("expand.weight", 0)
    assert group.units == 4  # one unit per conv group: 2 input and 3 output channels each
    assert ("grouped.weight", 0) in deps.coupled_weights("expand.weight", 0)
    per_unit = {(deps.atoms[a].target, deps.atoms[a].dim): deps.atoms[a].per_unit for a in group.atoms}
    assert per_unit[("expand.weight", 0)] == 2 and per_unit[("grouped.weight", 0)] == 3


class Attention(nn.Module):
    def __init__(self, hidden: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.up, self.down = nn.Linear(hidden, 32), nn.Linear(32, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, s, self.heads, h // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = x + self.out(attended.transpose(1, 2).reshape(n, s, h))
        return x + self.down(F.gelu(self.up(x)))


def test_attention_heads_couple_q_k_v_and_the_output_projection() -> None:
    deps = _deps(Attention(), torch.randn(2, 5, 16))
    [heads] = deps.weight_groups("q.weight", 0)
    assert heads.units == 4 and not heads.blocked
    assert deps.coupled_weights("q.weight", 0) == {
        ("q.weight", 0), ("q.bias", 0), ("k.weight", 0), ("k.bias", 0), ("v.weight", 0), ("v.bias", 0),
        ("out.weight", 1),
    }
    assert {deps.atoms[a].per_unit for a in heads.atoms} == {4}  # a whole head (head_dim 4) per unit
    [ffn] = deps.weight_groups("up.weight", 0)
    assert ffn.units == 32
    # the residual stream feeds the graph output: it keeps its size
    [stream] = deps.weight_groups("out.weight", 0)
    assert stream.blocked


def test_gpt2_fused_qkv_projection_is_cut_into_q_k_v_heads() -> None:
    pytest.importorskip("transformers")
    from graphopt.bench import zoo

    entry = zoo.load("gpt2")
    deps = _deps(entry.model, *entry.example_inputs)
    [heads] = deps.weight_groups("lm.transformer.h.0.attn.c_proj.weight", 0)
    pieces = sorted((deps.atoms[a].offset, deps.atoms[a].size) for a in heads.atoms
                    if deps.atoms[a].target == "lm.transformer.h.0.attn.c_attn.weight")
    assert heads.units == 2 and pieces == [(0, 64), (64, 64), (128, 64)]  # q, k, v of Conv1D's (in, 3*out) weight


def test_protected_layers_and_unknown_ops_block_their_groups() -> None:
    deps = _deps(Residual(), torch.randn(1, 3, 8, 8), protect=("conv1",))
    [group] = deps.weight_groups("conv1.weight", 0)
    assert group.blocked and any("protected" in r for r in group.reasons)

    class Flip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.flip(self.a(x), dims=[1]))

    deps = _deps(Flip(), torch.randn(1, 3, 4, 4))
    [group] = deps.weight_groups("a.weight", 0)
    assert any("flip" in r for r in group.reasons)


def test_rms_norm_blocks_its_features_and_ties_its_scale_like_layer_norm() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.norm, self.down = nn.Linear(8, 16), nn.RMSNorm(16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(self.norm(self.up(x)))

    deps = _deps(Block(), torch.randn(2, 8))
    [group] = deps.weight_groups("up.weight", 0)
    assert group.blocked and any("rms_norm" in r and "normalizes over it" in r for r in group.reasons)
    assert ("norm.weight", 0) in deps.coupled_weights("up.weight", 0)
