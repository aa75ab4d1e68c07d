"""The generation step as an ONNX decoder: past key/values in, logits and present key/values out.

:func:`export_decoder` writes the verified, state-lifted step graph of a :class:`BuiltSteps`
(the one both lowered steps come from) with the ``onnx`` target's exporter, then names its
inputs and outputs for people:

- inputs ``input_ids [batch, seq]``, ``attention_mask [batch, max_cache_len]``,
  ``position_ids [batch, seq]``, then for every layer ``i`` ``past_key_values.{i}.key`` /
  ``.value`` ``[batch, kv_heads, max_cache_len, head_dim]`` and ``past_key_values.{i}.length``
  (an int64 scalar: how many cache positions are filled; the step writes its tokens there);
- outputs ``logits [batch, vocab]`` (the last position's), then ``present.{i}.key`` /
  ``.value`` / ``.length``, the next call's ``past_key_values.{i}.*``.

Beside ``model.onnx`` it writes ``model.genai.json``: the cache size, batch size, the state's
names, shapes and dtypes in order, and the eos / pad token ids, which is all a plain
onnxruntime loop needs (see ``docs/generation.md``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from graphopt.ir.shapes import DynamicDims
from graphopt.ir.state import StateSpec
from graphopt.targets.base import LoweringContext
from graphopt.targets.onnx.export import write_model
from graphopt.targets.onnx.lowering import export_model
from graphopt.targets.onnx.stateful import rename_io
from graphopt.workflows.generation.decoder import STEP_INPUTS

if TYPE_CHECKING:
    from graphopt.workflows.generation.build import BuiltSteps

__all__ = ["STEP_INPUTS", "export_decoder", "sidecar_path", "state_names"]

_FIELDS = {"keys": "key", "values": "value", "cumulative_length": "length"}
_CACHE_BUFFER = re.compile(r"cache_(\d+)_(\w+)")


def state_names(state: list[StateSpec], prefix: str) -> list[str]:
    """The ONNX names of the state: ``{prefix}.{layer}.key`` / ``.value`` / ``.length`` (other fields by name)."""
    names = []
    for spec in state:
        match = _CACHE_BUFFER.fullmatch(spec.name)
        names.append(f"{prefix}.{match[1]}.{_FIELDS.get(match[2], match[2])}" if match else f"{prefix}.{spec.name}")
    return names


def sidecar_path(path: Path) -> Path:
    """Where the JSON description of the decoder at ``path`` goes: ``model.onnx`` -> ``model.genai.json``."""
    return path.with_name(path.stem + ".genai.json")


def _sidecar(built: BuiltSteps, past: list[str], present: list[str], token_ids: dict[str, Any]) -> dict[str, Any]:
    steps = built.steps
    return {
        "format": "graphopt-decoder/1",
        "max_cache_len": steps.max_cache_len,
        "batch_size": steps.batch_size,
        "inputs": list(STEP_INPUTS),
        "outputs": ["logits"],
        "state": [{"past": p, "present": q, "shape": list(spec.shape), "dtype": str(spec.dtype).removeprefix("torch.")}
                  for p, q, spec in zip(past, present, built.lifted.state, strict=True)],
        **token_ids,
        "notes": ("attention_mask covers the whole cache (1 for real tokens, written or being written); each step "
                  "writes its tokens at the position its layer's past_key_values.*.length holds (layers whose "
                  "counters always agree share one); feed present.* back as past_key_values.*"),
    }


def export_decoder(built: BuiltSteps, path: Path, eos_token_id: int | list[int] | None = None,
                   pad_token_id: int | None = None) -> Path:
    """Write the step of ``built`` as an ONNX decoder at ``path`` and its ``.genai.json`` sidecar; return ``path``.

    The sequence length is dynamic (1 to ``max_cache_len``: one model serves prompt and decode);
    the batch size and the cache size are those ``built`` was made for.
    """
    lifted = built.lifted
    gm = lifted.graph_module
    args = (*built.example, *lifted.initial)
    dynamic = DynamicDims([*built.dynamic.dims, *({} for _ in lifted.initial)], dict(built.dynamic.ranges))
    with torch.no_grad():
        exported = export_model(gm, LoweringContext(args, dynamic=dynamic))
    past, present = state_names(lifted.state, "past_key_values"), state_names(lifted.state, "present")
    outputs = ["logits", *[f"output_{i}" for i in range(1, lifted.num_outputs)], *present]
    model = rename_io(exported.model, [*STEP_INPUTS, *past], outputs)
    written = write_model(model, Path(path))
    tokens = {"eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    sidecar_path(written).write_text(json.dumps(_sidecar(built, past, present, tokens), indent=2) + "\n")
    return written
