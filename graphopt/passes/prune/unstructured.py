"""Unstructured pruning: zero the least important weights of every layer (shapes stay).

Masks by magnitude (``l1``: |w|, ``l2``: w**2; the same ranking, kept for symmetry with the
structured pass) or Taylor (|w * dL/dw|), with a threshold per layer (``scope="local"``) or one
for all layers (``"global"``). ``pattern="2:4"`` keeps the 2 most important of every 4
consecutive weights along the input dim, the layout sparse tensor cores run at up to twice
the dense speed (``to_semi_structured`` converts such weights for a CUDA GPU that has them).

Dense kernels (the ``cpu`` and ``onnx`` targets) do not skip zeros: unstructured sparsity
makes them no faster; the plan's notes say so. It pays in storage: ``compress_state``
stores each sparse weight as a bitmask and its non-zero values.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from graphopt.analysis.dependency import layer_label
from graphopt.errors import InputError
from graphopt.ir.graph import attribute_value, prune_unused_attributes, register_constant
from graphopt.ir.ops import MATMUL_OPS, WEIGHTED_LAYER_OPS
from graphopt.passes.base import PassResult
from graphopt.passes.lossy.base import CalibrationData, LossyPlan, LossyUnit
from graphopt.passes.prune.importance import check_kind, element_scores, taylor_gradients
from graphopt.report import PlotSpec, ReportSection

__all__ = ["UnstructuredPlan", "compress_state", "decompress_state", "plan_unstructured", "to_semi_structured"]

aten = torch.ops.aten
_WEIGHT_ARG = {op: 2 if op is aten.addmm.default else 1 for op in WEIGHTED_LAYER_OPS}
NO_SPEEDUP_NOTE = ("unstructured sparsity: the cpu and onnx targets run dense kernels, so zeroed weights make the "
                   "model no faster (only smaller when stored compressed); use structured pruning for speed, or "
                   "pattern='2:4' on a GPU with sparse tensor cores")


def _input_dim(node: fx.Node, weight: torch.Tensor) -> int:
    """The dim of ``weight`` that the layer contracts with its input."""
    if node.target in MATMUL_OPS or node.target is aten.addmm.default:
        return weight.dim() - 2
    return 1


def _layers(gm: fx.GraphModule, protect: Sequence[str]) -> tuple[list[tuple[str, fx.Node, str]], int]:
    """(weight target, layer node, label) of every prunable layer weight; and how many were protected."""
    seen: set[str] = set()
    out, protected = [], 0
    for node in gm.graph.nodes:
        index = _WEIGHT_ARG.get(node.target) if node.op == "call_function" else None  # type: ignore[call-overload]
        if index is None or len(node.args) <= index:
            continue
        weight = node.args[index]
        if not isinstance(weight, fx.Node) or weight.op != "get_attr" or str(weight.target) in seen:
            continue
        value = attribute_value(gm, weight)
        if value is None or value.dim() < 2 or not value.is_floating_point():
            continue
        seen.add(str(weight.target))
        label = layer_label(node)
        if any(fnmatch.fnmatchcase(label, p) or fnmatch.fnmatchcase(str(weight.target), p)
               or label.startswith(p.rstrip(".*") + ".") or label == p for p in protect):
            protected += 1
            continue
        out.append((str(weight.target), node, label))
    return out, protected


def plan_unstructured(gm: fx.GraphModule, data: CalibrationData, *, amount: float, importance: str, scope: str,
                      protect: Sequence[str], pattern: str | None) -> UnstructuredPlan:
    """Decide a mask for every layer weight (``gm`` is not changed)."""
    check_kind(importance)
    layers, protected = _layers(gm, protect)
    if not layers:
        raise InputError("unstructured pruning found no conv/linear/matmul weights to prune"
                         + (f" ({protected} protected)" if protected else ""))
    weights = {target: attribute_value(gm, node.args[_WEIGHT_ARG[node.target]]) for target, node, _ in layers}
    taylor = taylor_gradients(gm, weights, data) if importance == "taylor" else {}
    scores = {t: element_scores(w, importance, taylor.get(t)) for t, w in weights.items()}  # type: ignore[arg-type]
    masks: dict[str, torch.Tensor] = {}
    if pattern == "2:4":
        for target, node, _ in layers:
            masks[target] = _two_four_mask(scores[target], _input_dim(node, weights[target]))  # type: ignore[arg-type]
    elif scope == "global":
        everything = torch.cat([s.reshape(-1) for s in scores.values()])
        count = int(everything.numel() * amount)
        threshold = everything.kthvalue(count).values if count > 0 else everything.min() - 1
        for target, score in scores.items():
            masks[target] = score > threshold
    else:
        for target, score in scores.items():
            count = int(score.numel() * amount)
            threshold = score.reshape(-1).kthvalue(count).values if count > 0 else score.min() - 1
            masks[target] = score > threshold
    units = []
    for target, node, label in layers:
        mask = masks[target]
        sparsity = 1 - float(mask.float().mean())
        units.append(LossyUnit(label, f"{_op(node)} weights",
                               "2:4 semi-structured" if pattern else f"{amount:.0%} {importance} ({scope})",
                               {"weight shape": "x".join(map(str, weights[target].shape)),  # type: ignore[union-attr]
                                "params": int(mask.numel()), "nonzero after": int(mask.sum()),
                                "sparsity": round(sparsity, 4)}))
    return UnstructuredPlan(units, {label: (target, masks[target]) for target, _, label in layers}, pattern)


def _op(node: fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target)).split(".")[0]


def _two_four_mask(score: torch.Tensor, dim: int) -> torch.Tensor:
    """Keep the 2 highest scores of every 4 consecutive entries along ``dim``."""
    moved = score.movedim(dim, -1)
    if moved.shape[-1] % 4:
        raise InputError(f"pattern='2:4' needs input sizes divisible by 4, got a weight of shape {tuple(score.shape)}")
    blocks = moved.reshape(*moved.shape[:-1], -1, 4)
    top = blocks.topk(2, dim=-1).indices
    mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(moved.shape).movedim(-1, dim)


class UnstructuredPlan(LossyPlan):
    """A mask per layer weight; applying a unit stores the masked weight as a new constant."""

    def __init__(self, units: list[LossyUnit], masks: dict[str, tuple[str, torch.Tensor]], pattern: str | None) -> None:
        self.units = units
        self.masks = masks
        self.pattern = pattern
        self.last_section: ReportSection | None = None

    def notes(self) -> list[str]:
        """Unstructured sparsity gains no speed on dense targets."""
        return [NO_SPEEDUP_NOTE]

    def sections(self) -> list[ReportSection]:
        """Per-layer sparsity of the last ``apply``, with a plot."""
        return [self.last_section] if self.last_section is not None else []

    def apply(self, gm: fx.GraphModule, skip: frozenset[str] = frozenset()) -> PassResult:
        """Zero the masked weights of every layer not in ``skip`` (new constants; the old ones stay untouched)."""
        readers: dict[str, list[fx.Node]] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                readers.setdefault(str(node.target), []).append(node)
        rows, zeroed, total = [], 0, 0
        for label, (target, mask) in self.masks.items():
            nodes = readers.get(target)
            if label in skip or not nodes:
                continue
            value = attribute_value(gm, nodes[0])
            masked = value * mask.to(value.device)  # type: ignore[operator]
            new = register_constant(gm, f"sparse_{target}", masked, before=nodes[0])
            for node in nodes:
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
            zeros = int((~mask).sum())
            zeroed += zeros
            total += mask.numel()
            rows.append([label, "x".join(map(str, mask.shape)), mask.numel(), zeros, round(zeros / mask.numel(), 4)])
        prune_unused_attributes(gm)
        plot = PlotSpec(kind="barh", title="prune: sparsity per layer", x_labels=[r[0] for r in rows],
                        series={"sparsity": [r[4] for r in rows]}, y_label="fraction zero")
        self.last_section = ReportSection(
            "prune: sparsity per layer", f"{zeroed:,} of {total:,} layer weights zeroed. {NO_SPEEDUP_NOTE}",
            ["layer", "weight shape", "params", "zeroed", "sparsity"], rows, [plot] if rows else [])
        return PassResult(bool(rows), {"layers_pruned": len(rows), "weights_zeroed": zeroed,
                                       "sparsity": round(zeroed / total, 4) if total else 0.0})


def compress_state(tensors: dict[str, torch.Tensor], min_sparsity: float = 0.3) -> dict[str, Any]:
    """Store tensors with at least ``min_sparsity`` zeros as a bitmask plus their non-zero values.

    ``torch.save(compress_state(gm.state_dict()), path)``; ``decompress_state`` gives them back.
    A 50%-sparse float32 weight takes about 53% of its dense size.
    """
    out: dict[str, Any] = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() >= 64:
            mask = tensor != 0
            if 1 - float(mask.float().mean()) >= min_sparsity:
                flat = mask.reshape(-1)
                padded = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).reshape(-1, 8).to(torch.uint8)
                bits = (padded << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)
                out[name] = {"graphopt_sparse": 1, "shape": tuple(tensor.shape), "dtype": str(tensor.dtype),
                             "bits": bits, "values": tensor.reshape(-1)[flat].clone()}
                continue
        out[name] = tensor
    return out


def decompress_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The dense tensors back from ``compress_state``."""
    out = {}
    for name, value in state.items():
        if isinstance(value, dict) and value.get("graphopt_sparse") == 1:
            numel = int(torch.Size(value["shape"]).numel())
            bits = value["bits"]
            flat = ((bits[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:numel].bool()
            dense = torch.zeros(numel, dtype=value["values"].dtype)
            dense[flat] = value["values"]
            out[name] = dense.reshape(value["shape"])
        else:
            out[name] = value
    return out


def to_semi_structured(gm: fx.GraphModule) -> int:
    """Store every 2:4-sparse ``linear`` weight of ``gm`` (on a CUDA GPU) as a semi-structured sparse tensor.

    Needs a GPU with sparse tensor cores (compute capability 8.0+) and fp16/bf16 weights; returns
    how many weights were converted (0 when the GPU cannot run them). ``gm`` is changed in place.
    """
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return 0
    from torch.sparse import to_sparse_semi_structured

    converted = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        weight = node.args[1]
        value = attribute_value(gm, weight) if isinstance(weight, fx.Node) else None
        if value is None or not value.is_cuda or value.dtype not in (torch.float16, torch.bfloat16):
            continue
        blocks = (value.reshape(value.shape[0], -1, 4) != 0).sum(-1)
        if value.shape[-1] % 4 or bool((blocks > 2).any()):
            continue
        sparse = to_sparse_semi_structured(value)
        name = f"_go_semi_{converted}"
        while hasattr(gm, name):
            name += "_"
        setattr(gm, name, torch.nn.Parameter(sparse, requires_grad=False))
        with gm.graph.inserting_before(node):
            new = gm.graph.get_attr(name)
        new.meta.update(weight.meta)
        node.replace_input_with(weight, new)
        converted += 1
    prune_unused_attributes(gm)
    gm.recompile()
    return converted
