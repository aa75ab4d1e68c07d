"""``graphopt bench --quantize int8-dynamic --compound 0.5``: prune -> distill -> quantize beside the peers.

Adds to the quantization benchmark, per target and scheme, the model that ``graphopt.recipe``
makes: pruned by the ratio, recovered by distillation against the original, then quantized;
and OpenVINO (f32, and its default, bf16 on CPUs with bf16 instructions) beside onnxruntime's
own dynamic int8. Distillation trains on unlabeled data the example inputs are not part of:
for token inputs, sentences of Python's ``pydoc_data.topics`` tokenized with the zoo's
all-MiniLM-L6-v2 tokenizer (BERT's vocabulary), padded per batch; for other inputs, Gaussian
inputs of the example's shape. So the rows' fidelity (on the example inputs) is on held-out data.
The next 128 sentences are distillation's validation batches: the epoch (or the untrained
weights) with the lowest loss on them is what gets quantized. ``--distill-text FILE`` (one
sentence per line) replaces the pydoc sentences in all three roles (pruning's choice, training,
validation), for text of the domain the model will see; ``scripts/write_everyday_text.py``
writes such a file of everyday sentences with SmolLM2 through graphopt's own generation.
``--distill-sentences N`` (default 1280) and ``--distill-epochs N`` (default 2) size the training;
int8 schemes store embedding tables in 4 bits there (``--embedding-bits 8``: int8 rows).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graphopt.bench import zoo
from graphopt.bench.runner import GraphoptBackend, Runner
from graphopt.errors import InputError

__all__ = ["Compound", "CompoundBackend", "check_text_size", "distill_data", "pydoc_sentences", "text_sentences"]

DISTILL_SENTENCES = 1280
"""How many sentences (or random inputs) distillation trains on, per epoch."""
DISTILL_BATCH = 32
DISTILL_LR = 1e-4
"""Distillation's learning rate in the compound rows."""
VALIDATION_SENTENCES = 128
"""Sentences after the training ones whose loss picks the distilled weights kept (``distill(validation=...)``)."""


@dataclass(frozen=True)
class Compound:
    """What ``--compound`` measures: prune by ``amount``, distill ``epochs`` over ``sentences`` inputs, quantize.

    ``embedding_bits``: how int8 schemes store embedding tables (4 by default: the compound rows
    are about the smallest file; ``Int8Dynamic(embedding_bits=...)``). ``min_cosine``: the
    quantization step's budget (output cosine against the distilled model, ``recipe``'s
    ``fidelity``); a 3-bit word table, say, costs that model about 0.01 and falls back to float
    under the default 0.99. ``text``: a UTF-8 file of one sentence per line that text models
    calibrate, distill and validate on instead of ``pydoc_data.topics``.
    """

    amount: float
    sentences: int = DISTILL_SENTENCES
    epochs: int = 2
    embedding_bits: int = 4
    min_cosine: float = 0.99
    text: str | None = None

    def __post_init__(self) -> None:
        if self.text is not None:  # a short or unreadable file fails here, before any model is built
            check_text_size(self.text, self.sentences)

    def describe(self) -> str:
        """The bench command's flags for it."""
        return (f"--compound {self.amount:g}"
                + (f" --distill-sentences {self.sentences}" if self.sentences != DISTILL_SENTENCES else "")
                + (f" --distill-epochs {self.epochs}" if self.epochs != 2 else "")
                + (f" --embedding-bits {self.embedding_bits}" if self.embedding_bits != 4 else "")
                + (f" --compound-cosine {self.min_cosine:g}" if self.min_cosine != 0.99 else "")
                + (f" --distill-text {self.text}" if self.text is not None else ""))


def pydoc_sentences() -> list[str]:
    """Real English prose on every Python: the sentences of ``pydoc_data.topics``, 40 to 300 characters."""
    from pydoc_data.topics import topics

    text = " ".join(topics[key] for key in sorted(topics))
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 40 <= len(s.strip()) <= 300]


def text_sentences(path: str | os.PathLike[str]) -> list[str]:
    """The non-blank lines of the UTF-8 file ``path``, stripped: one sentence each."""
    try:
        with open(path, encoding="utf-8") as file:
            sentences = [line.strip() for line in file if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--distill-text {path}: cannot read it ({exc}); give a UTF-8 text file with one "
                         f"sentence per line") from exc
    if not sentences:
        raise InputError(f"--distill-text {path}: the file has no sentences; give one sentence per line")
    return sentences


def check_text_size(path: str | os.PathLike[str], count: int) -> None:
    """Fail before any work when ``path`` holds fewer than ``count`` training plus the validation sentences."""
    have, need = len(text_sentences(path)), count + VALIDATION_SENTENCES
    if have < need:
        raise InputError(f"--distill-text {path} has {have} sentences; --distill-sentences {count} needs {need} "
                         f"({count} to train on, {VALIDATION_SENTENCES} to validate). Lower --distill-sentences "
                         f"or add sentences to the file")


def distill_data(example_inputs: tuple[torch.Tensor, ...], count: int = DISTILL_SENTENCES,
                 batch: int = DISTILL_BATCH, like_example: bool = False, skip: int = 0,
                 sentences: Sequence[str] | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Unlabeled training batches for ``example_inputs``' model (see the module doc).

    ``like_example``: every batch shaped like the example (its batch size; token inputs padded to
    its length), which a graph with static shapes can calibrate on; else sentences are padded per
    batch of ``batch``. ``skip``: start after that many sentences (or random batches' worth), so
    validation batches share nothing with the training ones. ``sentences``: what token inputs
    read (``pydoc_sentences()`` when None; ``text_sentences(path)`` for a file).
    """
    if like_example:
        batch = example_inputs[0].shape[0]
    if _token_inputs(example_inputs):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(zoo.minilm_path(), local_files_only=True)
        length = example_inputs[0].shape[1]
        chosen = list(pydoc_sentences() if sentences is None else sentences)[skip:skip + count]
        batches = []
        for start in range(0, len(chosen) - (batch - 1 if like_example else 0), batch):
            tokens = tokenizer(chosen[start:start + batch], padding="max_length" if like_example else True,
                               truncation=True, max_length=length, return_tensors="pt")
            batches.append((tokens["input_ids"], tokens["attention_mask"])[:len(example_inputs)])
        return batches
    generator = torch.Generator().manual_seed(skip)
    return [tuple(torch.randn((batch, *x.shape[1:]), generator=generator, dtype=x.dtype) for x in example_inputs)
            for _ in range(max(1, count // batch))]


def _token_inputs(example_inputs: tuple[torch.Tensor, ...]) -> bool:
    return 1 <= len(example_inputs) <= 2 and all(not x.is_floating_point() and x.dim() == 2 for x in example_inputs)


@dataclass(frozen=True)
class CompoundBackend(GraphoptBackend):
    """``graphopt.recipe(model, x, data, target, prune=Prune(amount, "fluctuation", scope="cost"), quantize=scheme)``.

    Pruning removes ``amount`` of the layers' MACs, chooses and refits on the distillation data
    shaped like the example (the graph's shapes are static); int8 schemes store embedding tables
    in ``compound.embedding_bits``.

    Fluctuation importance with the least-squares refit, at one cost threshold across layers,
    kept all-MiniLM-L6-v2 pruned by half closest to the original of what was tried (Taylor and
    L1, sliced or refit; the same ratio in every layer); after the refit, distillation at lr 5e-4
    lost ground that 1e-4 gains: see docs/benchmarks.md.
    """

    compound: Compound = Compound(0.5)
    scheme: str = "int8-dynamic"
    loss: str = "cosine"

    def prepare(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Runner:
        """Prune and refit, distill, quantize: all on data held apart from the example inputs."""
        from graphopt import Fidelity, Prune, recipe
        from graphopt.passes.quantize import Quantize

        count = self.compound.sentences
        path = self.compound.text
        sentences = pydoc_sentences() if path is None else text_sentences(path)  # read once, used three times
        data = distill_data(example_inputs, count=count, sentences=sentences)
        held_out = distill_data(example_inputs, count=VALIDATION_SENTENCES, skip=count, sentences=sentences)
        distill: dict[str, Any] = {"epochs": self.compound.epochs, "loss": self.loss, "lr": DISTILL_LR,
                                   "validation": held_out}
        choosing = distill_data(example_inputs, count=count, like_example=True, sentences=sentences)
        scheme: Any = self.scheme
        if scheme in ("int8", "int8-dynamic"):
            scheme = Quantize(scheme, embedding_bits=self.compound.embedding_bits)
        return recipe(model, example_inputs, data, target=self.target,
                      prune=Prune(amount=self.compound.amount, importance="fluctuation", scope="cost"),
                      distill=distill, quantize=scheme, calibration=choosing,
                      fidelity=Fidelity(min_cosine=self.compound.min_cosine))
