"""Architectures users reported, small and randomly initialised, through the default pipeline.

Each one once failed ``remove-identity``: a ``.contiguous()`` before a ``view`` (ShuffleNetV2's
channel shuffle, the attention-head reshapes of DeBERTa-v2 and MobileViT) was dropped, and the
``view`` then failed on the non-contiguous tensor.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.bench.zoo import LastHiddenState
from graphopt.passes.cleanup import RemoveIdentity

from helpers import assert_matches, randomize_batchnorm

transformers = pytest.importorskip("transformers")


# --- ShuffleNetV2, as in torchvision (which is not a dependency) --------------------------------


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


def conv_bn(inp: int, oup: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(inp, oup, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(oup)]
    return [*layers, nn.ReLU(inplace=True)] if relu else layers


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                *conv_bn(inp, inp, 3, stride, groups=inp, relu=False),  # depthwise
                *conv_bn(inp, branch, 1),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            *conv_bn(inp if stride > 1 else branch, branch, 1),
            *conv_bn(branch, branch, 3, stride, groups=branch, relu=False),  # depthwise
            *conv_bn(branch, branch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, repeats=(2, 3, 2), channels=(8, 16, 32, 64, 128), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(*conv_bn(3, channels[0], 3, 2))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, inp = [], channels[0]
        for count, oup in zip(repeats, channels[1:-1], strict=True):
            stages.append(nn.Sequential(InvertedResidual(inp, oup, 2),
                                        *(InvertedResidual(oup, oup, 1) for _ in range(count - 1))))
            inp = oup
        self.stages = nn.Sequential(*stages)
        self.conv5 = nn.Sequential(*conv_bn(inp, channels[-1], 1))
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


# --- the models ---------------------------------------------------------------------------------


def shufflenet_v2():
    return randomize_batchnorm(ShuffleNetV2()), (torch.randn(2, 3, 64, 64),)


def t5_encoder():
    config = transformers.T5Config(
        vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, use_cache=False,
    )
    return LastHiddenState(transformers.T5EncoderModel(config)), (torch.randint(0, 100, (2, 12)),)


def deberta_v2():
    config = transformers.DebertaV2Config(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, relative_attention=True, position_buckets=16, max_relative_positions=32,
        pos_att_type=["p2c", "c2p"],
    )
    return LastHiddenState(transformers.DebertaV2Model(config)), (torch.randint(0, 100, (2, 12)),)


def mobilevit():
    config = transformers.MobileViTConfig(
        image_size=64, patch_size=2, hidden_sizes=[32, 40, 48], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
        num_attention_heads=2,
    )
    model = transformers.MobileViTModel(config, expand_output=False)
    return LastHiddenState(randomize_batchnorm(model)), (torch.randn(1, 3, 64, 64),)


MODELS = {"shufflenet_v2": shufflenet_v2, "t5_encoder": t5_encoder, "deberta_v2": deberta_v2, "mobilevit": mobilevit}


@pytest.mark.parametrize("target", ["cpu", "onnx"])
@pytest.mark.parametrize("name", list(MODELS))
def test_default_pipeline(name, target):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    model.eval()
    fast = graphopt.optimize(model, inputs, target=target, on_error="raise")
    assert fast.report.rolled_back == []
    assert_matches(fast, model, inputs)
    record = next(r for r in fast.report.records if r.name == "remove-identity")
    assert record.status == "changed"


@pytest.mark.parametrize("name", list(MODELS))
def test_remove_identity_on_the_training_ir(name):
    """The pass on export's training IR, in-place ops and ``aten.contiguous`` included, as users captured it."""
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    model.eval()
    with torch.no_grad():
        expected = model(*inputs)
    gm = torch.export.export(copy.deepcopy(model), inputs, strict=False).module()
    result = RemoveIdentity().run(gm)
    gm.recompile()
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), expected)
    assert result.stats["copies_removed"] > 0
