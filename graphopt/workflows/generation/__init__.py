"""Autoregressive generation: causal LMs with their key/value cache captured, optimized and lowered.

``graphopt.optimize(lm, (input_ids,), target=...)`` on a causal LM lands here
(:func:`optimize_for_generation`) and returns a :class:`GenerativeModel`. The pieces, one job each:
``decoder`` (the model with a static cache in buffers: one call, one step), ``build`` (capture,
verified passes, state lifted into inputs/outputs, lowered prefill and decode steps),
``loop`` (prefill, then one decode step per token), ``sampling`` (greedy / temperature / top-k /
top-p), ``model`` (the public object), ``partitioned`` (the model split into pipeline stages that
each keep their cache: ``graphopt.partition`` on a causal LM), ``onnx_export`` (the step as an ONNX decoder with
past/present key/value inputs and outputs), ``saving`` (the step graphs in graphopt's ``.pt2``
files and back: ``GenerativeModel.save``, ``graphopt.load``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from graphopt.errors import InputError
from graphopt.passes.base import Pass
from graphopt.passes.compress import CompressionStep
from graphopt.passes.lossy.base import Fidelity
from graphopt.passes.quantize.weight_only import WeightOnly
from graphopt.report import Report
from graphopt.targets.base import Target
from graphopt.targets.cpu.target import CpuTarget
from graphopt.workflows.generation.compression import GenerationCompression, StepCompression
from graphopt.workflows.generation.decoder import CachedDecoder, is_causal_lm
from graphopt.workflows.generation.language_budget import default_language_fidelity
from graphopt.workflows.generation.model import DEFAULT_MAX_CACHE_LEN, GenerativeModel, StepSource, load_generative
from graphopt.workflows.generation.partitioned import PartitionedGenerator, partition_for_generation
from graphopt.workflows.generation.sampling import GenerationDefaults, Sampling
from graphopt.workflows.generation.saving import is_generation

__all__ = ["CachedDecoder", "GenerationDefaults", "GenerativeModel", "PartitionedGenerator", "Sampling",
           "generation_compression", "generation_target", "is_causal_lm", "is_generation", "load_generative",
           "optimize_for_generation", "partition_generation"]


def generation_target(target: Target) -> Target:
    """The target a causal LM is optimized for when it was asked for by name, with no lowering given.

    ``"cpu"`` runs its steps in onnxruntime (``CpuLowering(backend="onnxruntime")``): a decode
    step is hundreds of small ops on a few kilobytes each, where PyTorch's per-op dispatch and
    its one-row matrix-vector kernels cost more than the weights' memory traffic (SmolLM2 on 2
    cores: 29 tokens/s in PyTorch, 55 in onnxruntime with its fused decoder ops). Pass
    ``lowering=CpuLowering()`` to keep the steps in PyTorch.
    """
    if isinstance(target, CpuTarget) and target.lowering.backend == "graph":
        return target.with_lowering(replace(target.lowering, backend="onnxruntime"))
    return target


def _max_cache_len(model: nn.Module, asked: int | None) -> int:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if asked is None:
        return min(limit or DEFAULT_MAX_CACHE_LEN, DEFAULT_MAX_CACHE_LEN)
    if not isinstance(asked, int) or asked < 2:
        raise InputError(f"max_cache_len must be an int of at least 2 positions, got {asked!r}")
    if limit is not None and asked > limit:
        raise InputError(f"max_cache_len={asked} is beyond the model's max_position_embeddings ({limit}); "
                         f"use at most {limit}")
    return asked


def _prompt_ids(example_inputs: Any) -> torch.Tensor:
    ids = example_inputs[0] if isinstance(example_inputs, (tuple, list)) and example_inputs else example_inputs
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        raise InputError("for a causal language model, example_inputs is (input_ids,): an integer tensor "
                         "[batch, prompt_length], e.g. tokenizer('Hello', return_tensors='pt').input_ids")
    return ids.long()


LANGUAGE_INT4_GROUP = 32
"""int4 group size of a language model's weights when none is given: GGUF's and onnxruntime-genai's block. On
SmolLM2 (its 576 input features allow 64) groups of 64 broke the default budget on every layer, groups of 32 on one."""


def generation_compression(steps: list[CompressionStep], fidelity: Fidelity | None) -> GenerationCompression | None:
    """The weight compression of a causal LM asked for with ``optimize``'s ``compress=`` / ``quantize=``, or None.

    Weight-only int8/int4 (``WeightOnly``) is what language models get (int4 in groups of
    ``LANGUAGE_INT4_GROUP`` unless a group size is given); its budget is about held-out text
    (``Fidelity(max_perplexity_ratio=..., min_token_agreement=...)``), by default
    ``language_budget.default_language_fidelity``.
    """
    if fidelity is not None and not fidelity.for_language_model:
        raise InputError("a language model's budget is about text: Fidelity(max_perplexity_ratio=1.02, "
                         "min_token_agreement=0.8, tokenizer=...), not an output cosine or metric")
    if not steps:
        if fidelity is not None:
            raise InputError("fidelity= is the budget of compression; for a language model give it with "
                             "quantize='int4-weight-only' (or 'int8-weight-only', or compress=[WeightOnly(...)])")
        return None
    unsupported = [step.source for step in steps if not isinstance(step.lossy, WeightOnly)]
    if unsupported:
        raise InputError(f"{', '.join(unsupported)}: not supported for causal language models yet. Language models "
                         "take weight-only quantization: quantize='int4-weight-only' or 'int8-weight-only', or "
                         "compress=[WeightOnly(bits=4, group_size=32)]")
    scheme = steps[0].lossy
    assert isinstance(scheme, WeightOnly)
    if scheme.rounding != "nearest":
        raise InputError(f"WeightOnly(rounding={scheme.rounding!r}) is for one-shot models; a language model's "
                         "weights are rounded to nearest (its budget on held-out text falls back per layer "
                         "instead): leave rounding at 'nearest'")
    if scheme.bits == 4 and scheme.group_size is None:
        scheme = replace(scheme, group_size=LANGUAGE_INT4_GROUP)
    return GenerationCompression(scheme, fidelity or default_language_fidelity(scheme.bits))


def optimize_for_generation(model: nn.Module, example_inputs: Any, target: Target, passes: list[Pass], *,
                            max_cache_len: int | None = None, verify: bool = True, on_error: str = "rollback",
                            compression: GenerationCompression | None = None,
                            refused: list[str] | None = None, fallback: Target | None = None) -> GenerativeModel:
    """Optimize a causal LM for generation on ``target`` (what ``graphopt.optimize`` does for one).

    ``compression`` (``generation_compression``) compresses the weights within its budget;
    ``refused`` lists ``optimize`` options the caller was given that generation does not support;
    ``fallback`` is the target the user named when ``target`` is its generation default
    (``generation_target``), used where that cannot lower the steps.
    """
    if refused:
        raise InputError(f"{', '.join(refused)} not supported for causal language models yet: optimize for "
                         "generation without them")
    ids = _prompt_ids(example_inputs)
    report = Report(target=target.name)
    source = StepSource(model, ids, passes, verify=verify, on_error=on_error,
                        compression=StepCompression(compression) if compression is not None else None)
    optimized = GenerativeModel(target, report, _max_cache_len(model, max_cache_len), GenerationDefaults.of(model),
                                source=source, fallback=fallback)
    report.notes.append(f"generation: static cache of {optimized.max_cache_len} positions; steps built in "
                        f"{optimized.setup_seconds:.1f} s")
    return optimized


def partition_generation(model: nn.Module, example_inputs: Any, stages: int, passes: list[Pass], *,
                         max_cache_len: int | None = None, **options: Any) -> PartitionedGenerator:
    """Split a causal LM into pipeline stages that generate together (what ``graphopt.partition`` does for one).

    ``options`` are ``partition_for_generation``'s (balance, memory_cap, microbatches, compression...).
    """
    ids = _prompt_ids(example_inputs)
    return partition_for_generation(model, ids, stages, passes=passes,
                                    max_cache_len=_max_cache_len(model, max_cache_len), **options)
