"""The onnx target's lowering: fused Attention in the file, onnxruntime's fusions, session options."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt
from graphopt.ir.verify import compare_outputs
from graphopt.targets.onnx.lowering import fused_op_counts
from graphopt.targets.onnx.options import OnnxLowering
from graphopt.targets.onnx.target import OnnxRuntimeModule, OnnxTarget


class Encoder(nn.Module):
    """One post-LN transformer encoder layer written the usual way, with SDPA and a padding mask."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = self.norm1(x + self.out(attn.transpose(1, 2).reshape(b, s, w)))
        return self.norm2(x + self.down(F.gelu(self.up(x))))


def _encoder() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    return Encoder().eval(), (torch.randn(2, 6, 32), mask)


def _ops(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


def test_attention_is_one_fused_onnx_op() -> None:
    model, inputs = _encoder()
    fast = graphopt.optimize(model, inputs, target="onnx")
    assert isinstance(fast.runner, OnnxRuntimeModule)
    counts = fused_op_counts(fast.runner.model)
    assert counts["::Attention"] == 1
    assert "Softmax" not in _ops(fast.runner.model)
    assert compare_outputs([fast(*inputs)], [model(*inputs)]).ok
    section = next(s for s in fast.report.sections if s.title.startswith("onnx lowering"))
    assert ["::Attention", 1] in section.rows and "opset 23" in section.description


def test_without_fused_attention_the_chain_stays() -> None:
    model, inputs = _encoder()
    fast = graphopt.optimize(model, inputs, target=OnnxTarget(OnnxLowering(fused_attention=False)))
    assert "Attention" not in _ops(fast.runner.model) and "Softmax" in _ops(fast.runner.model)
    assert compare_outputs([fast(*inputs)], [model(*inputs)]).ok


def test_saved_file_holds_the_fused_attention(tmp_path: Path) -> None:
    model, inputs = _encoder()
    fast = graphopt.optimize(model, inputs, target="onnx")
    path = fast.export_onnx(tmp_path / "encoder.onnx")
    assert "Attention" in _ops(onnx.load(str(path)))


def test_session_options_and_onnxruntime_optimized_model(tmp_path: Path) -> None:
    model, inputs = _encoder()
    saved = tmp_path / "optimized.onnx"
    lowering = OnnxLowering(threads=1, optimized_model_path=str(saved))
    fast = graphopt.optimize(model, inputs, target=OnnxTarget(lowering))
    options = fast.runner.session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    optimized = onnx.load(str(saved))
    # onnxruntime's own session fusions, on top of the exported Attention
    assert "SkipLayerNormalization" in _ops(optimized) and "Attention" in _ops(optimized)


def test_transformer_optimizer_result_is_checked() -> None:
    model, inputs = _encoder()
    fast = graphopt.optimize(model, inputs, target=OnnxTarget(OnnxLowering(transformer_optimizer=True)))
    assert compare_outputs([fast(*inputs)], [model(*inputs)]).ok
    fused = fused_op_counts(fast.runner.model)
    used = any(op.startswith("com.microsoft::") for op in fused)
    noted = any("transformer optimizer" in note for note in fast.report.notes)
    assert used or noted  # either its fused ops are in the file, or the report says why it was not used


def test_conv_net_exports_at_the_default_opset() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(1, 3, 8, 8)
    fast = graphopt.optimize(model, (x,), target="onnx")
    opset = next(o.version for o in fast.runner.model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset < 23  # no attention: nothing to gain from the newer opset
    assert compare_outputs([fast(x)], [model(x)]).ok


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="optimization_level"):
        OnnxLowering(optimization_level="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threads"):
        OnnxLowering(threads=0)


def test_padding_mask_with_dynamic_sequence_length() -> None:
    model, inputs = _encoder()
    seq = torch.export.Dim("seq", min=2, max=64)
    fast = graphopt.optimize(model, inputs, target="onnx",
                             dynamic_shapes={"x": {1: seq}, "mask": {1: seq}})
    assert "Attention" in _ops(fast.runner.model)
    x, mask = torch.randn(2, 9, 32), torch.ones(2, 9, dtype=torch.bool)
    mask[0, 7:] = False
    assert compare_outputs([fast(x, mask)], [model(x, mask)]).ok
