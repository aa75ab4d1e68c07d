"""The cpu target's lowering: oneDNN epilogue fusion, channels-last, prepacked weights, threads, Inductor."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.errors import VerificationError
from graphopt.ir.graph import count_ops
from graphopt.ir.verify import compare_outputs
from graphopt.targets.cpu.epilogue import EpilogueFusion, onednn_available
from graphopt.targets.cpu.lowering import CpuLowering, LoweredGraph
from graphopt.targets.cpu.target import CpuTarget

pytestmark = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


class ResidualNet(nn.Module):
    """A small ResNet-style net written the usual way: conv-BN-ReLU stem, one residual block, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = F.relu(self.conv1(x))
        x = F.relu(self.conv2(y) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


class FeedForward(nn.Module):
    """A transformer feed-forward block: linear + GELU, linear + residual add, LayerNorm."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(F.gelu(self.up(x))) + x)


def _net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = ResidualNet().eval()
    with torch.no_grad():
        model.stem[1].running_mean.uniform_(-0.5, 0.5)
        model.stem[1].running_var.uniform_(0.5, 2.0)
    return model, torch.randn(2, 3, 16, 16)


def _record(fast: graphopt.OptimizedModel, name: str) -> graphopt.PassRecord:
    """A rewrite of the cpu lowering (they are in ``runner.records`` and a report section, not the pass table)."""
    assert name not in [r.name for r in fast.report.records]
    return next(r for r in fast.runner.records if r.name == name)


def _lowered_ops(fast: graphopt.OptimizedModel) -> dict[str, int]:
    assert isinstance(fast.runner, LoweredGraph)
    return dict(count_ops(fast.runner.graph_module))


def test_conv_net_runs_on_fused_onednn_kernels_in_channels_last() -> None:
    model, x = _net()
    fast = graphopt.optimize(model, (x,), target="cpu")
    ops = _lowered_ops(fast)
    assert ops["mkldnn._convolution_pointwise.default"] == 2  # stem conv+relu, conv1+relu
    assert ops["mkldnn._convolution_pointwise.binary"] == 1  # conv2 + residual add + relu
    assert ops["mkldnn._linear_pointwise.default"] == 1
    assert "aten.conv2d.default" not in ops and "aten.relu.default" not in ops
    assert ops["aten.clone.default"] == 1  # one conversion to channels-last, at the input; none inside
    fusion = _record(fast, "epilogue-fusion")
    assert fusion.status == "changed"
    assert fusion.stats["conv+relu"] == 2 and fusion.stats["conv+add+relu"] == 1
    assert _record(fast, "channels-last").stats == {"to_channels_last": 1}
    assert compare_outputs([fast(x)], [model(x)]).ok
    section = next(s for s in fast.report.sections if s.title == "cpu lowering 'onednn'")
    assert [row[0] for row in section.rows] == ["packed-rows", "packed-attention", "trimmed-attention",
                                                "channels-last", "epilogue-fusion", "prepack-weights"]
    assert "3 convolution weights prepacked" in section.description
    # the weights the fused convolutions read are prepacked oneDNN tensors
    packed = [n for n in fast.runner.graph_module.graph.nodes if n.op == "get_attr" and "packed" in str(n.target)]
    assert len(packed) == 3
    assert all(getattr(fast.runner.graph_module, str(n.target)).is_mkldnn for n in packed)


def test_optimized_graph_stays_portable_aten() -> None:
    model, x = _net()
    fast = graphopt.optimize(model, (x,), target="cpu")
    ops = count_ops(fast.graph_module)
    assert not any(name.startswith("mkldnn.") for name in ops)
    assert ops["aten.conv2d.default"] == 3
    assert fast.state_dict()  # no opaque tensors in the state dict


def test_linear_epilogues_and_residual() -> None:
    torch.manual_seed(0)
    model, x = FeedForward().eval(), torch.randn(2, 5, 32)
    fast = graphopt.optimize(model, (x,), target="cpu")
    ops = _lowered_ops(fast)
    assert ops["mkldnn._linear_pointwise.default"] == 1  # up + GELU
    assert ops["mkldnn._linear_pointwise.binary"] == 1  # down + residual add
    assert "aten.gelu.default" not in ops and ops["aten.layer_norm.default"] == 1
    assert _record(fast, "epilogue-fusion").stats == {"linear+gelu": 1, "linear+add": 1}
    assert compare_outputs([fast(x)], [model(x)]).ok
    assert _record(fast, "channels-last").status == "unchanged"  # no convolutions


def test_addmm_with_constant_weight_becomes_a_linear_on_a_transposed_copy() -> None:
    class Conv1D(nn.Module):  # GPT-2's layer: x @ W + b with W stored (in, out)
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16, 24))
            self.bias = nn.Parameter(torch.randn(24))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(torch.addmm(self.bias, x.view(-1, 16), self.weight))

    torch.manual_seed(0)
    model, x = Conv1D().eval(), torch.randn(6, 16)
    fast = graphopt.optimize(model, (x,), target="cpu")
    assert _lowered_ops(fast)["mkldnn._linear_pointwise.default"] == 1
    stats = _record(fast, "epilogue-fusion").stats
    assert stats["linear+tanh"] == 1 and stats["transposed weights"] == 1
    assert compare_outputs([fast(x)], [model(x)]).ok
    assert model.weight.shape == (16, 24)  # the user's weight is untouched


def test_near_misses_say_why_a_layer_stayed() -> None:
    class RuntimeWeight(nn.Module):
        def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return F.relu(F.linear(x, w))

    x, w = torch.randn(3, 8), torch.randn(4, 8)
    fast = graphopt.optimize(RuntimeWeight(), (x, w), target="cpu")
    record = _record(fast, "epilogue-fusion")
    assert record.status == "unchanged"
    assert record.near_misses["epilogue-fusion"] == {"linear weight computed at run time": 1}
    assert compare_outputs([fast(x, w)], [RuntimeWeight()(x, w)]).ok


def test_model_without_fusable_pattern_is_unchanged() -> None:
    class Elementwise(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x * 2 + 1, dim=-1)

    x = torch.randn(4, 8)
    fast = graphopt.optimize(Elementwise(), (x,), target="cpu")
    assert _record(fast, "epilogue-fusion").status == "unchanged"
    assert _lowered_ops(fast) == dict(count_ops(fast.graph_module))


def test_transformer_with_a_patch_conv_keeps_its_layout() -> None:
    class PatchEmbed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 32, 4, stride=4)
            self.ffn = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ffn(self.patch(x).flatten(2).transpose(1, 2))

    torch.manual_seed(0)
    model, x = PatchEmbed().eval(), torch.randn(1, 3, 8, 8)
    fast = graphopt.optimize(model, (x,), target="cpu")
    record = _record(fast, "channels-last")
    assert record.status == "unchanged"
    (reason,) = record.near_misses["channels-last"]
    assert "of the work" in reason
    assert "aten.clone.default" not in _lowered_ops(fast)
    assert compare_outputs([fast(x)], [model(x)]).ok


def test_four_d_outputs_come_back_contiguous() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(1, 3, 8, 8)
    fast = graphopt.optimize(model, (x,), target="cpu")
    out = fast(x)
    assert out.is_contiguous()
    assert _record(fast, "channels-last").stats == {"to_channels_last": 1, "to_contiguous": 1}
    assert compare_outputs([out], [model(x)]).ok


def test_dynamic_batch_with_packed_weights() -> None:
    model, x = _net()
    fast = graphopt.optimize(model, (x,), target="cpu", dynamic_batch=True)
    bigger = torch.randn(5, 3, 16, 16)
    assert compare_outputs([fast(bigger)], [model(bigger)]).ok


def test_unfused_lowering_runs_the_aten_graph() -> None:
    model, x = _net()
    fast = graphopt.optimize(model, (x,), target=CpuTarget(CpuLowering(fuse=False, layout="contiguous")))
    assert _lowered_ops(fast) == dict(count_ops(fast.graph_module))
    assert CpuLowering(fuse=False, layout="contiguous").label() == "aten"
    assert compare_outputs([fast(x)], [model(x)]).ok


def test_threads_setting_applies_during_the_call_only() -> None:
    model, x = _net()
    before = torch.get_num_threads()
    seen = []
    fast = graphopt.optimize(model, (x,), target=CpuTarget(CpuLowering(threads=1)))
    original = fast.runner.graph_module.forward

    def spy(*args: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return original(*args)

    fast.runner.graph_module.forward = spy
    fast(x)
    assert seen == [1] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be at least 1"):
        CpuLowering(threads=0)


def test_a_broken_fused_kernel_fails_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lowering's rewrites are verified like every pass: a wrong epilogue is caught and named."""
    from graphopt.targets.cpu import epilogue

    monkeypatch.setitem(epilogue._UNARY, torch.ops.aten.relu.default, ("sigmoid", epilogue._scalars_none))
    model, x = _net()
    with pytest.raises(VerificationError, match="epilogue-fusion"):
        graphopt.optimize(model, (x,), target="cpu")


def test_epilogue_fusion_is_a_registered_pass() -> None:
    assert graphopt.passes.base.get_pass("epilogue-fusion") is EpilogueFusion
    torch.manual_seed(0)
    model, x = FeedForward().eval(), torch.randn(2, 5, 32)
    fast = graphopt.optimize(model, (x,), target="cpu", passes=["epilogue-fusion"])
    assert count_ops(fast.graph_module)["mkldnn._linear_pointwise.default"] == 1
    assert compare_outputs([fast(x)], [model(x)]).ok


@pytest.mark.slow
def test_inductor_lowering_matches() -> None:
    model, x = _net()
    fast = graphopt.optimize(model, (x,), target=CpuTarget(CpuLowering(backend="inductor")))
    assert compare_outputs([fast(x)], [model(x)]).ok
    assert any("torch.compile" in note for note in fast.report.notes)
