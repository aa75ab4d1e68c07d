"""Property test: random models through the lossy passes (prune, quantize, precision) and the lowerings.

The companion of ``test_fuzz.py`` (exact passes). A model is drawn as data: a ``LossyProgram`` is
an input kind (image ``(N, C, H, W)``, sequence ``(N, L, D)``, vector ``(N, D)`` or token ids
``(N, L)`` read through an embedding), a chain of ``Block``s and an optional head. Blocks are what
the lossy passes act on: convolutions (plain, grouped, depthwise; with batch norm and an
activation; residual conv blocks), linears (with batch norm), residual MLPs, layer/batch norms,
activations, pooling, concat of a branch, matrix products by a constant weight, products of two
activations (``x @ xᵀ @ x``), attention (explicit softmax or SDPA) with a residual add, and the
reshapes between ranks (patch tokens, global pooling, flatten). Weights are PyTorch's default
initialization (embeddings N(0, 1)) with widths up to 48, sometimes 64 or 128, and batch norms get sensible running
statistics, so every layer has something to prune or quantize.

Each program runs through one (scheme, target): ``prune`` 0.3 / 0.5 (with an enforced budget, or
measured only), every ``quantize`` scheme (``int8`` static with calibration batches,
``int8-dynamic``, ``int8-weight-only``, ``int4-weight-only``, ``kmeans``), ``precision`` (``bf16``,
``fp16``) and two combinations (``prune-0.3+int8``, ``int8-dynamic+bf16``), each on ``cpu`` and
``onnx``. Also drawn: the budget (the scheme's default or an explicit ``Fidelity``), extra
calibration batches, and the pass options (variant 0 is the plain scheme name; others: Taylor /
global / unstructured / ``round_to`` pruning, percentile / entropy / moving-average observers,
per-tensor scales, int4 groups of 32, GPTQ rounding, 16 K-means clusters, ``min_elements=256``). The property:
``optimize`` either

(a) returns a model whose outputs, on the example inputs and on fresh inputs of the same shape and
    distribution, meet the budget against the eager model (mean per-sample cosine, worst over the
    outputs, computed here in float64, not read from the report; for a measured-only budget the
    report's ``final_cosine`` must be what we measure); the user's model and the inputs are left
    as they were; or
(b) raises a ``graphopt.GraphoptError`` whose message says what is wrong (names the pass, scheme,
    budget, target...), and which is not an internal exception wrapped into one (a ``PassError``
    "raised KeyError: ..." is a crash, as is an exact pass failing its verification).

Any other exception is a crash; an output outside the budget without an error is a silent divergence.

Budget: ``GRAPHOPT_FUZZ_LOSSY_EXAMPLES`` examples per (scheme, target) (default 2, derandomized so CI
always runs the same ones; the whole set takes about 30 s on 2 slow cores). Larger random runs do
fail: most often on fresh inputs, a few points under a budget that held on the example and calibration
batches it was measured on (see ``test_static_int8_budget_holds_on_fresh_inputs``).
``GRAPHOPT_FUZZ_SEED`` switches to random exploration, e.g.
``GRAPHOPT_FUZZ_LOSSY_EXAMPLES=20 GRAPHOPT_FUZZ_SEED=7 pytest tests/test_fuzz_lossy.py``;
``GRAPHOPT_FUZZ_LOSSY_LOG=file.jsonl`` appends one line per example (scheme, target, outcome, cosines,
error) for counting, and ``scripts/fuzz_lossy_survey.py`` runs many examples per pair without stopping
at the first failure and prints the counts. ``check_lossy(program, scheme, target, ...)`` reruns one
falsifying example. The bugs found and not fixed yet have ``xfail(strict=True)`` reproducers at the
end of this file, and the ones fixed since stay there as regression tests.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import Phase, given, note
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import graphopt
from graphopt import Fidelity, GraphoptError

from helpers import SelfAttentionBase, fuzz_settings, randomize_batchnorm, state_snapshot

EXAMPLES = int(os.environ.get("GRAPHOPT_FUZZ_LOSSY_EXAMPLES", "2"))
LOG = os.environ.get("GRAPHOPT_FUZZ_LOSSY_LOG")

QUANTIZE = ("int8", "int8-dynamic", "int8-weight-only", "int4-weight-only", "kmeans")
PRECISION = ("bf16", "fp16")
PRUNE = ("prune-0.3", "prune-0.5")
COMBINED = ("prune-0.3+int8", "int8-dynamic+bf16")  # two lossy passes in one call; their budget always explicit
SCHEMES = PRUNE + QUANTIZE + PRECISION + COMBINED
TARGETS = ("cpu", "onnx")

MAX_WIDTH = 48
ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "relu6", "sigmoid", "hardswish")


# --------------------------------------------------------------------------------------------
# Programs


@dataclass(frozen=True)
class Block:
    """One block: ``op`` with its arguments; it maps the current value to the next."""

    op: str
    args: tuple[Any, ...] = ()

    def __repr__(self) -> str:
        return f"Block({self.op!r}, {self.args})"


@dataclass(frozen=True)
class LossyProgram:
    """A model: its input, blocks, whether it also returns an intermediate value, weights' seed, mode."""

    kind: str  # "image", "sequence", "vector", "tokens"
    input_shape: tuple[int, ...]  # for "tokens": (N, L)
    vocab: int  # tokens only
    blocks: tuple[Block, ...]
    shapes: tuple[tuple[int, ...], ...]  # the value after the input stage and after every block
    extra_output: int | None  # also return the value after this block (index into shapes)
    seed: int
    training: bool = False  # leave the user's model in training mode


def _act(draw) -> str | None:
    return draw(st.sampled_from((None, *ACTIVATIONS)))


def _width(draw, low: int = 4) -> int:
    """A layer width: mostly small, sometimes 64 or 128 (weight-only schemes skip weights under 1024
    elements, int4 needs in-features divisible by its group size 128)."""
    return draw(st.one_of(st.integers(low, MAX_WIDTH), st.integers(low, MAX_WIDTH), st.sampled_from([64, 128])))


def _draw_block(draw, shape: tuple[int, ...]) -> tuple[Block, tuple[int, ...]]:
    """A block that fits ``shape``, and the shape it produces."""
    rank = len(shape)
    if rank == 4:
        n, c, h, w = shape
        ops = ["conv", "conv", "res_conv", "bn", "act", "cat_conv"]
        ops += ["pool"] if min(h, w) >= 2 else []
        ops += ["to_vec", "to_seq"]
    elif rank == 3:
        ops = ["linear", "linear", "mlp", "layernorm", "attention", "matmul_const", "matmul_act", "act", "to_vec",
               "cat_linear"]
    else:
        ops = ["linear", "linear", "mlp", "layernorm", "bn", "matmul_const", "act", "cat_linear"]
    op = draw(st.sampled_from(ops))
    if op == "conv":
        n, c, h, w = shape
        kind = draw(st.sampled_from(["plain", "plain", "depthwise"] + (["grouped"] if c % 2 == 0 and c > 2 else [])))
        if kind == "plain":
            groups, cout = 1, _width(draw)
        elif kind == "depthwise":
            groups, cout = c, c
        else:
            groups, cout = 2, 2 * draw(st.integers(2, MAX_WIDTH // 2))
        kernel = draw(st.sampled_from([1, 3]))
        stride = draw(st.sampled_from([1, 1, 2]))
        padding = kernel // 2
        bias = draw(st.booleans())
        bn = draw(st.sampled_from([None, "bn"]))
        args = (c, cout, kernel, stride, padding, groups, bias, bn, _act(draw))
        out = (n, cout, (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1)
        return Block("conv", args), out
    if op == "res_conv":
        hidden = _width(draw)
        return Block("res_conv", (shape[1], hidden, draw(st.booleans()), _act(draw) or "relu")), shape
    if op == "cat_conv":
        cout = _width(draw)
        return Block("cat_conv", (shape[1], cout, _act(draw))), (shape[0], shape[1] + cout, *shape[2:])
    if op == "pool":
        kind = draw(st.sampled_from(["max", "avg"]))
        return Block("pool", (kind,)), (*shape[:2], shape[2] // 2, shape[3] // 2)
    if op == "bn":
        return Block("bn", (shape[1], draw(st.booleans()))), shape
    if op == "act":
        return Block("act", (draw(st.sampled_from(ACTIVATIONS)),)), shape
    if op == "to_vec":
        if rank == 4:
            features = math.prod(shape[1:])
            how = draw(st.sampled_from(["avgpool", "flatten"] if features <= 4 * MAX_WIDTH else ["avgpool"]))
            return Block("to_vec", (how,)), ((shape[0], shape[1]) if how == "avgpool" else (shape[0], features))
        return Block("to_vec", ("mean",)), (shape[0], shape[2])
    if op == "to_seq":
        return Block("to_seq", ()), (shape[0], shape[2] * shape[3], shape[1])
    if op == "linear":
        fout = _width(draw, 2)
        bn = draw(st.sampled_from([None, "bn"])) if rank == 2 else None
        return Block("linear", (shape[-1], fout, draw(st.booleans()), bn, _act(draw))), (*shape[:-1], fout)
    if op == "mlp":
        hidden = draw(st.integers(max(2, shape[-1] // 2), min(4 * shape[-1], 256)))
        norm = draw(st.sampled_from(["pre", "post", None]))
        return Block("mlp", (shape[-1], hidden, _act(draw) or "gelu", norm)), shape
    if op == "layernorm":
        return Block("layernorm", (shape[-1], draw(st.booleans()))), shape
    if op == "attention":
        d = shape[-1]
        heads = draw(st.sampled_from([h for h in (1, 2, 4) if d % h == 0]))
        form = draw(st.sampled_from(["explicit", "sdpa"]))
        return Block("attention", (d, heads, draw(st.booleans()), form)), shape
    if op == "matmul_const":
        fout = _width(draw, 2)
        return Block("matmul_const", (shape[-1], fout)), (*shape[:-1], fout)
    if op == "matmul_act":
        return Block("matmul_act", ()), shape
    if op == "cat_linear":
        fout = _width(draw, 2)
        return Block("cat_linear", (shape[-1], fout, _act(draw))), (*shape[:-1], shape[-1] + fout)
    raise AssertionError(op)


@st.composite
def lossy_programs(draw, max_blocks: int = 5) -> LossyProgram:
    """A random valid program: input, 1..max_blocks blocks, maybe a linear / 1x1 conv head."""
    batch = draw(st.integers(2, 4))  # per-sample cosine: a few samples
    kind = draw(st.sampled_from(["image", "image", "sequence", "vector", "tokens"]))
    vocab = 0
    if kind == "image":
        input_shape = (batch, draw(st.integers(1, 8)), draw(st.integers(4, 10)), draw(st.integers(4, 10)))
        shape = input_shape
    elif kind == "sequence":
        input_shape = (batch, draw(st.integers(2, 8)), _width(draw))
        shape = input_shape
    elif kind == "vector":
        input_shape = (batch, _width(draw))
        shape = input_shape
    else:
        vocab = draw(st.integers(8, 64))
        input_shape = (batch, draw(st.integers(2, 8)))
        shape = (*input_shape, _width(draw, 8))
    blocks: list[Block] = []
    shapes = [shape]
    for _ in range(draw(st.integers(2, max_blocks))):
        block, shape = _draw_block(draw, shape)
        blocks.append(block)
        shapes.append(shape)
    if draw(st.integers(0, 2)):  # a head: the model's outputs are what graphopt must keep (and cannot prune)
        if len(shape) == 4:
            head = Block("conv", (shape[1], draw(st.integers(2, 8)), 1, 1, 0, 1, True, None, None))
            shape = (shape[0], head.args[1], *shape[2:])
        else:
            head = Block("linear", (shape[-1], draw(st.integers(2, 16)), True, None, None))
            shape = (*shape[:-1], head.args[1])
        blocks.append(head)
        shapes.append(shape)
    extra = draw(st.integers(1, len(blocks) - 1)) if len(blocks) > 1 and draw(st.integers(0, 4)) == 0 else None
    return LossyProgram(kind, input_shape, vocab, tuple(blocks), tuple(shapes), extra,
                        draw(st.integers(0, 2**16)), draw(st.integers(0, 7)) == 0)


# --------------------------------------------------------------------------------------------
# Building and running a program


_ACTIVATION_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "relu6": nn.ReLU6,
                       "sigmoid": nn.Sigmoid, "hardswish": nn.Hardswish}


def _activation(kind: str | None) -> nn.Module:
    return _ACTIVATION_MODULES[kind]() if kind else nn.Identity()


class Conv(nn.Module):
    def __init__(self, cin, cout, kernel, stride, padding, groups, bias, bn, act) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ResConv(nn.Module):
    """``act(x + bn(conv(act(bn(conv(x))))))``: a ResNet basic block."""

    def __init__(self, channels: int, hidden: int, bn: bool, act: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(hidden) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(channels) if bn else nn.Identity()
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


class CatConv(nn.Module):
    def __init__(self, channels: int, cout: int, act: str | None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, cout, 1)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.act(self.conv(x))], dim=1)


class Linear(nn.Module):
    def __init__(self, fin, fout, bias, bn, act) -> None:
        super().__init__()
        self.fc = nn.Linear(fin, fout, bias=bias)
        self.bn = nn.BatchNorm1d(fout) if bn else nn.Identity()
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.fc(x)))


class MLP(nn.Module):
    """A transformer feed-forward block with a residual add, pre- or post-norm or none."""

    def __init__(self, dim: int, hidden: int, act: str, norm: str | None) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = _activation(act)
        self.norm_kind = norm
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_kind == "pre":
            return x + self.fc2(self.act(self.fc1(self.norm(x))))
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


class Attention(SelfAttentionBase):
    """Multi-head self-attention with a residual add: q/k/v/o linears, explicit softmax or SDPA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, length, self.heads, dim // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.form == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            out = self.softmax_attention(q, k, v)
        return x + self.o(out.transpose(1, 2).reshape(n, length, dim))


class MatmulConst(nn.Module):
    """``x @ W`` with a constant (parameter) right operand, as GPT-2's Conv1D does."""

    def __init__(self, fin: int, fout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fin, fout) / math.sqrt(fin))
        self.bias = nn.Parameter(torch.randn(fout) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class CatLinear(nn.Module):
    def __init__(self, fin: int, fout: int, act: str | None) -> None:
        super().__init__()
        self.fc = nn.Linear(fin, fout)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.act(self.fc(x))], dim=-1)


def _layer_norm(dim: int, affine: bool) -> nn.Module:
    return nn.LayerNorm(dim, elementwise_affine=affine)


_BLOCK_MODULES: dict[str, Callable[..., nn.Module]] = {
    "conv": Conv, "res_conv": ResConv, "cat_conv": CatConv, "act": _activation, "linear": Linear, "mlp": MLP,
    "layernorm": _layer_norm, "attention": Attention, "matmul_const": MatmulConst, "cat_linear": CatLinear,
}
"""The module of each block kind that has one, built from the block's arguments."""


def _block_module(block: Block) -> nn.Module | None:
    make = _BLOCK_MODULES.get(block.op)
    return make(*block.args) if make is not None else None


class LossyModel(nn.Module):
    """Runs a ``LossyProgram``: block ``i``'s layers are the submodule ``b<i>``."""

    def __init__(self, program: LossyProgram) -> None:
        super().__init__()
        self.program = program
        self.embed = nn.Embedding(program.vocab, program.shapes[0][-1]) if program.kind == "tokens" else None
        self.blocks = nn.ModuleDict()
        for i, block in enumerate(program.blocks):
            if block.op == "bn":
                channels, affine = block.args
                rank = len(program.shapes[i])
                self.blocks[f"b{i}"] = (nn.BatchNorm2d if rank == 4 else nn.BatchNorm1d)(channels, affine=affine)
            else:
                module = _block_module(block)
                if module is not None:
                    self.blocks[f"b{i}"] = module

    def forward(self, x: torch.Tensor) -> Any:
        if self.embed is not None:
            x = self.embed(x)
        kept = None
        for i, block in enumerate(self.program.blocks):
            name = f"b{i}"
            if name in self.blocks:
                x = self.blocks[name](x)
            elif block.op == "pool":
                x = F.max_pool2d(x, 2) if block.args[0] == "max" else F.avg_pool2d(x, 2)
            elif block.op == "to_vec":
                how = block.args[0]
                x = (F.adaptive_avg_pool2d(x, 1).flatten(1) if how == "avgpool"
                     else x.flatten(1) if how == "flatten" else x.mean(1))
            elif block.op == "to_seq":
                x = x.flatten(2).transpose(1, 2)
            elif block.op == "matmul_act":
                x = (x @ x.transpose(-2, -1)) @ x / x.shape[-1]
            else:
                raise AssertionError(f"unknown block {block}")
            want = self.program.shapes[i + 1]
            assert tuple(x.shape) == want, f"generator bug: {block} gave {tuple(x.shape)}, not {want}"
            if i + 1 == self.program.extra_output:
                kept = x
        return x if kept is None else (x, kept)


def make_inputs(program: LossyProgram, salt: int) -> tuple[torch.Tensor]:
    """One input batch of the program's shape; ``salt`` 0 is the example, others are further draws."""
    generator = torch.Generator().manual_seed(program.seed * 1000 + salt + 1)
    if program.kind == "tokens":
        return (torch.randint(0, program.vocab, program.input_shape, generator=generator),)
    return (torch.randn(program.input_shape, generator=generator),)


def build(program: LossyProgram) -> tuple[LossyModel, tuple[torch.Tensor]]:
    """The model (weights and batch-norm statistics from ``program.seed``) and its example input."""
    torch.manual_seed(program.seed)
    model = randomize_batchnorm(LossyModel(program), seed=program.seed)
    model.train(program.training)
    return model, make_inputs(program, 0)


# --------------------------------------------------------------------------------------------
# The property


def cosine(reference: Any, actual: Any) -> float:
    """Mean per-sample cosine of the float outputs (dim 0 is the sample), worst over outputs, in float64.

    Written here rather than taken from graphopt, so the check does not trust the code it checks.
    A sample whose two vectors are equal counts 1 (also when both are zero).
    """
    refs, outs = pytree.tree_leaves(reference), pytree.tree_leaves(actual)
    assert len(refs) == len(outs), f"{len(outs)} outputs, eager has {len(refs)}"
    worst = 1.0
    for ref, out in zip(refs, outs, strict=True):
        assert out.shape == ref.shape and out.dtype == ref.dtype, f"output {tuple(out.shape)} {out.dtype}, " \
                                                                  f"eager {tuple(ref.shape)} {ref.dtype}"
        a = ref.detach().double().reshape(ref.shape[0], -1)
        b = out.detach().double().reshape(ref.shape[0], -1)
        per_sample = []
        for u, v in zip(a, b, strict=True):
            if torch.equal(u, v):
                per_sample.append(1.0)
            else:
                norms = float(u.norm() * v.norm())
                per_sample.append(float(u @ v) / norms if norms > 0 else 0.0)
        worst = min(worst, sum(per_sample) / len(per_sample))
    return worst


@dataclass
class Case:
    """What ``optimize`` is called with for one (scheme, target)."""

    kwargs: dict[str, Any]
    budget: float | None  # the enforced min cosine; None: measured only


def _variant(scheme: str, variant: int) -> Any:
    """The ``prune=`` / ``quantize=`` value: variant 0 is the plain scheme name (ratio), others set options."""
    from graphopt.passes import Quantize
    from graphopt.passes.quantize.kmeans import KMeansQuantize
    from graphopt.passes.quantize.weight_only import WeightOnlyQuantize

    if scheme.startswith("prune"):
        amount = float(scheme.split("-")[1])
        options = [amount, graphopt.Prune(amount=amount, importance="taylor", scope="global"),
                   graphopt.Prune(amount=amount, structured=False), graphopt.Prune(amount=amount, round_to=2)]
    elif scheme == "int8":
        options = ["int8", Quantize(observer="percentile"), Quantize(observer="entropy", per_channel=False),
                   Quantize(observer="moving-average")]
    elif scheme == "int8-dynamic":
        options = ["int8-dynamic", Quantize(scheme="int8-dynamic", per_channel=False)]
    elif scheme == "int8-weight-only":  # min_elements: small models have few weights of 1024 elements or more
        options = ["int8-weight-only", WeightOnlyQuantize(bits=8, min_elements=256),
                   WeightOnlyQuantize(bits=8, min_elements=256, rounding="gptq")]
    elif scheme == "int4-weight-only":
        options = ["int4-weight-only", WeightOnlyQuantize(bits=4, group_size=32, min_elements=256),
                   WeightOnlyQuantize(bits=4, group_size=32, min_elements=256, rounding="gptq")]
    elif scheme == "kmeans":
        options = ["kmeans", KMeansQuantize(clusters=16, min_elements=256)]
    else:
        options = [scheme]
    return options[variant % len(options)]


def lossy_case(scheme: str, program: LossyProgram, budget_draw: int, calibrate: bool, variant: int = 0) -> Case:
    """The optimize keywords for ``scheme``; ``budget_draw`` picks the budget (0: the scheme's default),
    ``variant`` the pass options (0: the plain scheme name), ``calibrate`` whether calibration batches are given
    (always for static int8)."""
    kwargs: dict[str, Any] = {}
    parts = scheme.split("+")
    for part in parts:
        if part.startswith("prune"):
            kwargs["prune"] = _variant(part, variant)
        elif part in QUANTIZE:
            kwargs["quantize"] = _variant(part, variant)
        else:
            kwargs["precision"] = part
    if len(parts) > 1:
        choices = (0.9, 0.95, 0.99)  # the default budget of prune + quantize: test_prune_then_quantize_default_budget
    elif "prune" in kwargs:
        choices = (None, 0.9, 0.99)  # prune's default budget is measured, not enforced
    elif "quantize" in kwargs:
        choices = (0.99, 0.95, 0.999)
    else:
        choices = (0.999, 0.99, 0.9999)
    budget = choices[budget_draw % len(choices)]
    if budget_draw % len(choices) or len(parts) > 1:
        kwargs["fidelity"] = Fidelity(min_cosine=budget)
    if "int8" in parts or calibrate:
        kwargs["calibration"] = [make_inputs(program, salt) for salt in (1, 2, 3)]
    return Case(kwargs, budget)


# Words a refusal must use to say what it refuses: the pass, the scheme, the budget or the target.
_REASON_WORDS = ("quantiz", "int8", "int4", "weight", "kmeans", "k-means", "prun", "precision", "bf16", "fp16",
                 "budget", "fidelity", "cosine", "calibration", "onnx", "cpu", "target", "lower")


def refusal_problem(error: GraphoptError) -> str | None:
    """Why ``error`` is not an acceptable refusal (a crash in disguise, or no reason given); None if it is."""
    message = str(error)
    cause = error.__cause__
    if cause is not None and not isinstance(cause, GraphoptError):
        return f"an internal {type(cause).__name__} wrapped in {type(error).__name__}"
    if isinstance(error, graphopt.VerificationError) and not error.pass_name.startswith("lower-"):
        return f"exact pass {error.pass_name!r} failed its verification"
    if len(message) < 40 or not any(word in message.lower() for word in _REASON_WORDS):
        return "the message gives no reason"
    return None


def _matrix_in_features(program: LossyProgram) -> set[int]:
    """The in-features (K) of every linear / matrix product by a constant the program has."""
    found = set()
    for block in program.blocks:
        if block.op in ("linear", "matmul_const", "cat_linear", "attention"):
            found.add(block.args[0])
        elif block.op == "mlp":
            found.update(block.args[:2])
    return found


def _note(text: str) -> None:
    try:
        note(text)
    except InvalidArgument:
        print(text)


def _log(entry: dict[str, Any]) -> None:
    if LOG:
        with open(LOG, "a") as file:
            file.write(json.dumps(entry) + "\n")


def check_lossy(program: LossyProgram, scheme: str, target: str, budget_draw: int = 0,
                calibrate: bool = False, variant: int = 0) -> str:
    """Optimize ``program``'s model with ``scheme`` for ``target``; check (a) or (b). Returns the outcome.

    The outcome ("ok", "refused", "crash", "divergence", "broken") goes to the log before the
    assertion that fails on it, so an exploration run can count every kind.
    """
    model, inputs = build(program)
    case = lossy_case(scheme, program, budget_draw, calibrate, variant)
    option = {k: v for k, v in case.kwargs.items() if k in ("prune", "quantize", "precision")}
    entry: dict[str, Any] = {"scheme": scheme, "target": target, "budget": case.budget, "program": repr(program),
                             "budget_draw": budget_draw, "calibrate": calibrate, "variant": repr(option)}
    _note(f"{option!r} on {target}, budget {case.budget}, calibration: {'calibration' in case.kwargs}")
    reference = copy.deepcopy(model).eval()
    before, training = state_snapshot(model), model.training
    kept_inputs = [x.clone() for x in inputs]
    _log({**entry, "outcome": "started"})  # a process crash (segfault) leaves this line without its outcome
    try:
        fast = graphopt.optimize(model, inputs, target=target, on_error="raise", **case.kwargs)
        _note(f"report:\n{fast.report}")
        cosines = {}
        with torch.no_grad():
            for label, salt in (("example", 0), ("fresh", 7), ("fresh", 8)):
                batch = inputs if salt == 0 else make_inputs(program, salt)
                cosines[f"{label}{salt}"] = cosine(reference(*batch), fast(*batch))
    except GraphoptError as error:
        problem = refusal_problem(error)
        entry.update(outcome="crash" if problem else "refused", error=type(error).__name__, message=str(error))
        _log(entry)
        _note(f"refused: {type(error).__name__}: {error}")
        assert problem is None, f"{problem}: {type(error).__name__}: {error}"
        return "refused"
    except Exception as error:
        entry.update(outcome="crash", error=type(error).__name__, message=str(error))
        _log(entry)
        raise
    _note(f"cosines vs eager: {cosines}")
    entry.update(cosines=cosines, final_cosine=fast.report.final_cosine)
    problems = []
    worst = min(cosines.values())
    if case.budget is not None and worst < case.budget:
        problems.append(f"silent divergence: output cosine {cosines} vs eager, budget {case.budget}")
    lossy_changed = any(r.fidelity and r.status == "changed" for r in fast.report.records)
    if lossy_changed and (fast.report.final_cosine is None
                          or abs(fast.report.final_cosine - cosines["example0"]) > 1e-6):
        problems.append(f"the report's final cosine {fast.report.final_cosine} is not the measured "
                        f"{cosines['example0']}")
    if not lossy_changed and fast.report.final_cosine is not None:
        problems.append("no lossy pass changed the graph, yet the report gives a final cosine")
    if not all(torch.equal(x, kept) for x, kept in zip(inputs, kept_inputs, strict=True)):
        problems.append("the example input was modified")
    if model.training != training:
        problems.append("optimize changed the model's training flag")
    after = state_snapshot(model)
    if after.keys() != before.keys() or not all(torch.equal(after[k], v) for k, v in before.items()):
        problems.append("optimize modified the model's parameters or buffers")
    outcome = "ok" if not problems else "divergence" if problems[0].startswith("silent") else "broken"
    entry.update(outcome=outcome, problems=problems)
    _log(entry)
    assert not problems, "; ".join(problems)
    return outcome


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("scheme", SCHEMES)
@fuzz_settings(EXAMPLES, phases=[Phase.explicit, Phase.generate])  # no shrinking: an example costs seconds
@given(program=lossy_programs(), budget_draw=st.integers(0, 2), calibrate=st.booleans(), variant=st.integers(0, 3))
def test_lossy_random_models(program: LossyProgram, scheme: str, target: str, budget_draw: int,
                             calibrate: bool, variant: int) -> None:
    check_lossy(program, scheme, target, budget_draw, calibrate, variant)


# --------------------------------------------------------------------------------------------
# Bugs this fuzzer found: regression tests for the fixed ones, an xfail reproducer for the one left.


def _runs_cleanly(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a segfault must not take the test session down)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_int8_weight_only_kernel_with_k_not_multiple_of_16() -> None:
    """aten._weight_int8pack_mm crashed the process for in-features not a multiple of 16: such layers stay float."""
    result = _runs_cleanly("""
        import torch, graphopt
        torch.manual_seed(0)
        model = torch.nn.Linear(40, 32).eval()  # 1280 weights: quantized; K = 40
        x = torch.randn(12, 40)
        fast = graphopt.optimize(model, (x,), target="cpu", quantize="int8-weight-only")
        print(float(torch.nn.functional.cosine_similarity(fast(x), model(x)).min()))
        print(fast.report.to_dict()["sections"])
    """)
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    assert float(result.stdout.splitlines()[0]) > 0.999
    assert "not a multiple of 16" in result.stdout


BF16_RESIDUAL_CONV = LossyProgram(  # depthwise conv-bn-relu, 1x1 conv-sigmoid, a residual conv block with GELU
    kind="image", input_shape=(4, 4, 9, 4), vocab=0,
    blocks=(Block("conv", (4, 4, 3, 1, 1, 4, True, "bn", "relu")),
            Block("conv", (4, 13, 1, 2, 0, 1, False, None, "sigmoid")),
            Block("res_conv", (13, 64, False, "gelu"))),
    shapes=((4, 4, 9, 4), (4, 4, 9, 4), (4, 13, 5, 2), (4, 13, 5, 2)), extra_output=None, seed=339,
)


def test_bf16_epilogue_fusion_within_its_verification_tolerance() -> None:
    """A bf16 epilogue fusion beyond its tolerance is rolled back (lowering follows on_error), not raised."""
    model, inputs = build(BF16_RESIDUAL_CONV)
    fast = graphopt.optimize(model, inputs, target="cpu", precision="bf16", on_error="rollback")
    assert fast.report.final_check == "passed"


def test_prune_then_quantize_default_budget() -> None:
    """Measured-only pruning then quantization: the final check holds the budget against the compressed graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(8, 32)
    pruned = graphopt.optimize(model, (x,), prune=0.5)
    assert pruned.report.final_cosine < 0.9  # half the hidden units gone: far below quantization's budget
    fast = graphopt.optimize(model, (x,), prune=0.5, quantize="int8-dynamic")
    with torch.no_grad():
        assert cosine(model(x), fast(x)) >= 0.99 * pruned.report.final_cosine


STATIC_INT8_FEW_SAMPLES = LossyProgram(  # linear + GELU concatenated to its input, then x @ W
    kind="sequence", input_shape=(3, 2, 14), vocab=0,
    blocks=(Block("cat_linear", (14, 64, "gelu")), Block("matmul_const", (78, 24))),
    shapes=((3, 2, 14), (3, 2, 78), (3, 2, 24)), extra_output=1, seed=465,
)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "the fidelity budget is enforced on the example and calibration batches only: static int8 calibrated "
        "on 4 batches of 3 samples keeps output cosine >= 0.999 there, but a quarter of fresh batches from "
        "the same distribution fall below it (activations outside the calibrated ranges are clipped); nothing "
        "warns"
    ),
)
def test_static_int8_budget_holds_on_fresh_inputs() -> None:
    model, inputs = build(STATIC_INT8_FEW_SAMPLES)
    calibration = [make_inputs(STATIC_INT8_FEW_SAMPLES, salt) for salt in (1, 2, 3)]
    fast = graphopt.optimize(model, inputs, target="cpu", quantize="int8", calibration=calibration,
                             fidelity=Fidelity(min_cosine=0.999))
    with torch.no_grad():
        seen = [cosine(model(*batch), fast(*batch)) for batch in [inputs, *calibration]]
        fresh = [cosine(model(*batch), fast(*batch))
                 for batch in (make_inputs(STATIC_INT8_FEW_SAMPLES, salt) for salt in range(10, 30))]
    assert min(seen) >= 0.999  # what optimize promises, and keeps
    assert min(fresh) >= 0.999, f"{sum(c < 0.999 for c in fresh)} of {len(fresh)} fresh batches below the budget"
