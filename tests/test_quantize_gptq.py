"""GPTQ rounding for weight-only quantization: the same layout as round-to-nearest, a smaller output error."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt import Fidelity, WeightOnly
from graphopt.errors import InputError
from graphopt.passes.quantize.gptq import HessianWatcher, gptq_int4, gptq_int8
from graphopt.passes.quantize.weight_only import (
    int4_group_grid,
    int8_group_grid,
    quantize_int4_groupwise,
    quantize_int8_per_channel,
)
from graphopt.passes.quantize.weight_ops import dequantize_int4_reference, dequantize_int8_reference


def _correlated_inputs(rows: int, features: int, seed: int) -> torch.Tensor:
    """Inputs whose features move together and differ in scale, as a layer's inputs in a trained model do."""
    mixing = torch.randn(features, features, generator=torch.Generator().manual_seed(0))  # one distribution
    spectrum = torch.logspace(0, -2, features)  # a few directions carry most of the variance
    samples = torch.randn(rows, features, generator=torch.Generator().manual_seed(seed)) * spectrum
    return (samples @ mixing) * torch.logspace(-1, 0.5, features)


def test_uncorrelated_inputs_round_to_nearest() -> None:
    """With H = I no error has anywhere to go: GPTQ's codes and grids are round-to-nearest's."""
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    packed, scale, zero_point = gptq_int4(weight, torch.eye(128, dtype=torch.float64), 32, int4_group_grid)
    nearest = quantize_int4_groupwise(weight, 32)
    assert torch.allclose(scale, nearest[1]) and torch.allclose(zero_point, nearest[2], atol=1e-4)
    assert (packed == nearest[0]).float().mean() > 0.999  # a rare tie may round the other way
    q, scale8 = gptq_int8(weight, torch.eye(128, dtype=torch.float64), None, int8_group_grid)
    q_nearest, scale_nearest = quantize_int8_per_channel(weight)
    assert torch.equal(scale8, scale_nearest) and (q == q_nearest).float().mean() > 0.999


@pytest.mark.parametrize("bits", [4, 8])
def test_correlated_inputs_move_the_layer_output_less(bits: int) -> None:
    """On held-out inputs of the same distribution, the layer's output error falls well below round-to-nearest's."""
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    watcher = HessianWatcher(256)
    watcher.update(_correlated_inputs(2048, 256, seed=3).reshape(8, 256, 256))
    assert watcher.rows == 2048
    held_out = _correlated_inputs(512, 256, seed=4)
    if bits == 4:
        gptq = dequantize_int4_reference(*gptq_int4(weight, watcher.hessian, 32, int4_group_grid), 32)
        nearest = dequantize_int4_reference(*quantize_int4_groupwise(weight, 32), 32)
    else:
        gptq = dequantize_int8_reference(*gptq_int8(weight, watcher.hessian, None, int8_group_grid))
        nearest = dequantize_int8_reference(*quantize_int8_per_channel(weight))
    reference = held_out @ weight.T
    gptq_error = (held_out @ gptq.T - reference).norm()
    nearest_error = (held_out @ nearest.T - reference).norm()
    assert gptq_error < 0.85 * nearest_error, (float(gptq_error), float(nearest_error))
    assert (gptq - weight).abs().max() < 8 * (nearest - weight).abs().max()  # moved, not blown up


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


def test_optimize_with_gptq_rounding_beats_nearest_on_held_out_inputs() -> None:
    torch.manual_seed(0)
    model = _Mlp().eval()
    example = (_correlated_inputs(32, 128, seed=5),)
    calibration = [(_correlated_inputs(32, 128, seed=10 + i),) for i in range(8)]
    held_out = _correlated_inputs(32, 128, seed=99)
    with torch.no_grad():
        reference = model(held_out)
    errors = {}
    for rounding in ("nearest", "gptq"):
        fast = graphopt.optimize(model, example, quantize=WeightOnly(bits=4, group_size=32, rounding=rounding),
                                 calibration=calibration, fidelity=Fidelity(enforce=False))
        errors[rounding] = float((fast(held_out) - reference).norm() / reference.norm())
        if rounding == "gptq":
            assert "GPTQ rounding" in str(fast.report)
    assert errors["gptq"] < 0.85 * errors["nearest"], errors


def test_gptq_without_calibration_says_it_used_the_example() -> None:
    torch.manual_seed(0)
    fast = graphopt.optimize(_Mlp().eval(), (_correlated_inputs(64, 128, seed=5),),
                             quantize=WeightOnly(bits=4, rounding="gptq"), fidelity=Fidelity(enforce=False))
    assert "calibrated on the example inputs alone" in str(fast.report)


def test_unknown_rounding_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"rounding=.*'nearest', 'gptq'"):
        WeightOnly(bits=4, rounding="awq")


def test_language_models_refuse_gptq_rounding_before_capture() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    lm = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(InputError, match=r"rounding='gptq'.*one-shot models"):
        graphopt.optimize(lm, (torch.randint(0, 64, (1, 8)),), quantize=WeightOnly(bits=4, rounding="gptq"))
