"""The cost model: FLOPs/MACs of known layers, weight bytes, dynamic dims, profiling, analyze()."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.analysis import count_parameters, node_costs, profile_nodes, total_macs
from graphopt.ir.capture import capture
from graphopt.ir.op_args import conv_arguments


def _costs_by_op(model: nn.Module, inputs: tuple, **kwargs):
    gm = capture(model, inputs, **kwargs).graph_module
    costs = node_costs(gm)
    return gm, {c.op.split(".")[1]: c for c in costs.values() if c.op.startswith("aten.")}


def test_conv_macs_plain_grouped_transposed() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),                # out 2x8x8x8, C_in 3, k 3x3
        nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False),  # C_in per group 2
        nn.ConvTranspose2d(8, 4, 2, stride=2),        # each input element feeds 4 channels x 2x2
    )
    gm = capture(model, (torch.randn(2, 3, 8, 8),)).graph_module
    convs = [c for c in node_costs(gm).values() if "conv" in c.op]
    assert [c.macs for c in convs] == [1024 * 3 * 9, 1024 * 2 * 9, 1024 * 4 * 4]
    assert convs[0].flops == 2 * 1024 * 3 * 9 + 1024          # bias adds one op per output element
    assert convs[1].flops == 2 * 1024 * 2 * 9                 # no bias
    assert convs[0].param_bytes == (8 * 3 * 9 + 8) * 4
    assert convs[2].activation_bytes == 2 * 4 * 16 * 16 * 4
    assert total_macs(gm) == sum(c.macs for c in convs)


def test_linear_matmul_bmm_and_attention() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)                                   # (4, 5, 32): 20 rows x 16 x 32
            q = h.view(4, 5, 2, 16).transpose(1, 2)          # (4, 2, 5, 16)
            a = F.scaled_dot_product_attention(q, q, q)      # 8 heads x 5 x 5 x (16 + 16)
            s = torch.bmm(h, h.transpose(1, 2))              # 4 x 5 x 5 x 32
            return a.sum() + s.sum() + torch.matmul(x, x.transpose(1, 2)).sum()  # 4 x 5 x 5 x 16

    gm, by_op = _costs_by_op(Block(), (torch.randn(4, 5, 16),))
    assert by_op["linear"].macs == 20 * 16 * 32
    assert by_op["linear"].flops == 2 * 20 * 16 * 32 + 20 * 32
    assert by_op["bmm"].macs in (4 * 5 * 5 * 32, 4 * 5 * 5 * 16)
    attention = next(c for c in node_costs(gm).values() if "scaled_dot_product" in c.op)
    assert attention.macs == 8 * 5 * 5 * (16 + 16)
    assert total_macs(gm) == 20 * 16 * 32 + 8 * 5 * 5 * 32 + 4 * 5 * 5 * 32 + 4 * 5 * 5 * 16


def test_elementwise_norm_softmax_are_counted_and_views_are_free() -> None:
    model = nn.Sequential(nn.LayerNorm(8), nn.GELU(), nn.Softmax(-1), nn.Flatten())
    _, by_op = _costs_by_op(model, (torch.randn(3, 8),))
    assert by_op["layer_norm"].flops == 5 * 24
    assert by_op["gelu"].flops > 0 and by_op["softmax"].flops == 5 * 24
    assert by_op["flatten"].flops == 0 and by_op["flatten"].macs == 0


def test_dynamic_dims_use_the_example_size() -> None:
    gm = capture(nn.Linear(8, 4), (torch.randn(6, 8),), dynamic_batch=True).graph_module
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)  # only the symbolic shapes are left
    linear = next(c for c in node_costs(gm).values() if c.op == "aten.linear.default")
    assert linear.macs == 6 * 8 * 4


def test_count_parameters_counts_shared_storage_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight
            self.register_buffer("scale", torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)) * self.scale

    gm = capture(Tied(), (torch.randn(2, 4),)).graph_module
    assert count_parameters(gm) == 16 + 4
    costs = node_costs(gm)
    assert sum(c.param_bytes for c in costs.values()) == (16 + 4) * 4


def test_profile_nodes_times_every_compute_node() -> None:
    captured = capture(nn.Sequential(nn.Linear(64, 64), nn.ReLU()), (torch.randn(8, 64),))
    seconds = profile_nodes(captured.graph_module, captured.flat_inputs, repeats=3)
    compute = [n.name for n in captured.graph_module.graph.nodes if n.op == "call_function"]
    assert sorted(seconds) == sorted(compute)
    assert all(s > 0 for s in seconds.values())


def test_analyze_reports_layers_with_plots(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    analysis = graphopt.analyze(model, (torch.randn(2, 3, 8, 8),), repeats=2)
    names = [layer.name for layer in analysis.layers]
    assert names == ["0", "1", "2", "3"]
    assert analysis.parameters == sum(p.numel() for p in model.parameters())
    assert analysis.layers[0].macs == 2 * 8 * 36 * 27
    section = analysis.report.sections[0]
    assert len(section.rows) == 4 and section.plots
    html = analysis.to_html(tmp_path / "analysis.html").read_text()
    assert "Measured time per layer" in html and "<svg" in html
    assert "Linear" in str(analysis)


def test_analyze_an_optimized_model_adds_its_section() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    fast = graphopt.optimize(model, (torch.randn(1, 3, 8, 8),))
    analysis = graphopt.analyze(fast, repeats=1)
    assert not any("batch_norm" in c.op for c in analysis.nodes.values())  # the folded graph is analysed
    assert fast.report.sections[-1].title == "Cost per layer"


def test_layers_grouped_by_module_depth() -> None:
    from graphopt.analysis.layers import group_by_layer

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(8, 8)
            self.fc2 = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    model = nn.Sequential(Block(), Block())
    gm = capture(model, (torch.randn(2, 8),)).graph_module
    costs = node_costs(gm)
    blocks = group_by_layer(costs, depth=1)
    assert [b.name for b in blocks] == ["0", "1"]
    assert [b.macs for b in blocks] == [2 * 2 * 8 * 8, 2 * 2 * 8 * 8]
    leaves = group_by_layer(costs)
    assert [layer.name for layer in leaves if layer.macs] == ["0.fc1", "0.fc2", "1.fc1", "1.fc2"]


def test_backend_convolutions_read_their_arguments_by_name() -> None:
    """``mkldnn_convolution`` puts ``groups`` where ``convolution`` has ``transposed``: not a transposed conv."""
    gm = capture(nn.Conv2d(3, 8, 3, padding=1), (torch.randn(2, 3, 8, 8),)).graph_module
    (conv,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    args = conv_arguments(conv)
    conv.target = torch.ops.aten.mkldnn_convolution.default
    conv.args = (args.input, args.weight, args.bias, list(args.padding), list(args.stride), list(args.dilation),
                 args.groups)
    (cost,) = [c for c in node_costs(gm).values() if "convolution" in c.op]
    assert cost.macs == 2 * 8 * 8 * 8 * 3 * 9
