"""Verification: structural lint and numerical comparison of a graph against a reference."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.ir.graph import STATE_UPDATE, has_attribute, is_mutating, run_and_record

__all__ = ["Comparison", "Tolerance", "compare_outputs", "first_divergence", "lint", "tolerance_for"]


@dataclass(frozen=True)
class Tolerance:
    """Allowed error: ``|a - b| <= atol + rtol * scale`` with scale the reference's max magnitude."""

    rtol: float
    atol: float


_TOLERANCES = {
    torch.float64: Tolerance(rtol=1e-7, atol=1e-9),
    torch.float32: Tolerance(rtol=1e-4, atol=1e-5),
    torch.float16: Tolerance(rtol=1e-2, atol=1e-3),
    torch.bfloat16: Tolerance(rtol=2e-2, atol=1e-2),
}
_EXACT = Tolerance(rtol=0.0, atol=0.0)


def tolerance_for(dtype: torch.dtype, scale: float = 1.0) -> Tolerance:
    """The default tolerance for outputs of ``dtype`` (exact for integers and bools).

    ``scale`` widens floating-point tolerances, for passes that trade precision on purpose.
    """
    base = _TOLERANCES.get(dtype)
    if base is None:
        return _EXACT
    return Tolerance(rtol=base.rtol * scale, atol=base.atol * scale)


@dataclass(frozen=True)
class Comparison:
    """Result of comparing outputs: the worst absolute and scaled errors and whether all pass."""

    ok: bool
    max_abs_diff: float
    max_scaled_diff: float
    detail: str = ""


def _compare_pair(
    actual: Any, expected: Any, tolerance_scale: float, extra_atol: float = 0.0
) -> tuple[bool, float, float, str]:
    if not isinstance(expected, torch.Tensor):
        same = actual == expected
        return bool(same), 0.0 if same else float("inf"), 0.0 if same else float("inf"), "" if same else (
            f"expected {expected!r}, got {actual!r}"
        )
    if not isinstance(actual, torch.Tensor):
        return False, float("inf"), float("inf"), f"expected a tensor, got {type(actual).__name__}"
    if actual.shape != expected.shape:
        return False, float("inf"), float("inf"), f"shape {list(actual.shape)} != {list(expected.shape)}"
    if actual.dtype != expected.dtype:
        return False, float("inf"), float("inf"), f"dtype {actual.dtype} != {expected.dtype}"
    if expected.is_quantized:  # quint8 / qint8 values (a quantized graph's intermediates): compare what they stand for
        actual, expected = actual.dequantize(), expected.dequantize()
    if expected.numel() == 0:
        return True, 0.0, 0.0, ""
    if not expected.is_floating_point() and not expected.is_complex():
        a, e = actual.detach().cpu(), expected.detach().cpu()
        same = bool(torch.equal(a, e))
        diff = 0.0 if same else float((a.double() - e.double()).abs().max())
        return same, diff, diff, "" if same else "integer outputs differ"
    # Compare in the outputs' own precision (float32 and wider; half types in float32): no float64
    # copies, so checking a large output (a language model's logits) costs about one copy of it.
    work = torch.promote_types(expected.dtype, torch.float32)
    a = actual.detach().to("cpu", work)
    e = expected.detach().to("cpu", work)
    delta = torch.sub(a, e).abs_()
    delta.masked_fill_(torch.isnan(a) & torch.isnan(e), 0.0)
    if torch.isnan(delta).any():
        return False, float("nan"), float("inf"), "NaN where the reference has a number"
    scale = float(torch.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0).abs_().max())
    tol = tolerance_for(expected.dtype, tolerance_scale)
    max_abs = float(delta.max())
    scaled = max_abs / max(scale, 1e-12)
    allowed = tol.atol + tol.rtol * scale + extra_atol
    ok = max_abs <= allowed
    return ok, max_abs, scaled, "" if ok else f"max abs diff {max_abs:.3g} exceeds the allowed {allowed:.3g}"


def compare_outputs(actual: Any, expected: Any, tolerance_scale: float = 1.0, extra_atol: float = 0.0) -> Comparison:
    """Compare two (nested) outputs leaf by leaf with dtype-aware tolerances (plus ``extra_atol``)."""
    actual_leaves = pytree.tree_leaves(actual)
    expected_leaves = pytree.tree_leaves(expected)
    if len(actual_leaves) != len(expected_leaves):
        why = f"{len(actual_leaves)} outputs, expected {len(expected_leaves)}"
        return Comparison(False, float("inf"), float("inf"), why)
    ok, worst_abs, worst_scaled, detail = True, 0.0, 0.0, ""
    for index, (a, e) in enumerate(zip(actual_leaves, expected_leaves, strict=True)):
        leaf_ok, max_abs, scaled, why = _compare_pair(a, e, tolerance_scale, extra_atol)
        worst_abs, worst_scaled = max(worst_abs, max_abs), max(worst_scaled, scaled)
        if not leaf_ok and ok:
            ok, detail = False, f"output {index}: {why}"
    return Comparison(ok, worst_abs, worst_scaled, detail)


def lint(gm: fx.GraphModule, check_meta: bool = True, in_place_ops: Collection[Any] = ()) -> list[str]:
    """Structural problems of ``gm``: fx's own lint, dangling attributes, missing meta, in-place ops.

    The only mutations allowed are explicit writes of user-visible state made at capture
    (``aten.copy_`` marked ``node.meta[STATE_UPDATE]``) and calls of ``in_place_ops`` (backend
    kernels a lowering placed that write into a private buffer of their own). ``check_meta=False``
    skips the shape/dtype check, for a graph not yet run since a pass added nodes.
    """
    problems: list[str] = []
    try:
        gm.graph.lint()
    except Exception as error:
        problems.append(f"fx lint: {error}")
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not has_attribute(gm, str(node.target)):
            problems.append(f"node {node.name} reads missing attribute {node.target!r}")
        if node.op == "call_function" and not callable(node.target):
            problems.append(f"node {node.name} calls non-callable {node.target!r}")
        if is_mutating(node) and not node.meta.get(STATE_UPDATE) and node.target not in in_place_ops:
            problems.append(
                f"node {node.name} mutates a value in place ({node.target}); the IR is functional: "
                "use the out-of-place op"
            )
        missing_meta = "tensor_meta" not in node.meta and "val" not in node.meta
        if check_meta and node.op in ("placeholder", "call_function") and missing_meta and node.users:
            problems.append(f"node {node.name} has no shape/dtype meta")
    return problems


def _touched(before: fx.GraphModule, after: fx.GraphModule) -> set[str]:
    """Names of the nodes of ``after`` that are new or whose op or arguments differ from ``before``."""
    old = {n.name: n for n in before.graph.nodes}
    touched = set()
    for node in after.graph.nodes:
        twin = old.get(node.name)
        if twin is None or twin.target != node.target or repr(twin.args) != repr(node.args) or (
            repr(twin.kwargs) != repr(node.kwargs)
        ):
            touched.add(node.name)
    return touched


def first_divergence(
    before: fx.GraphModule, after: fx.GraphModule, flat_inputs: tuple[Any, ...], tolerance_scale: float = 1.0
) -> str | None:
    """Name the node of ``after`` most likely to blame for a change in outputs.

    That is the first node the pass touched whose value differs from the same-named node of
    ``before``; failing that, the first same-named node whose value differs beyond tolerance.
    """
    _, old_values = run_and_record(before, flat_inputs, keep_values=True)
    _, new_values = run_and_record(after, flat_inputs, keep_values=True)
    touched = _touched(before, after)

    def differs(name: str, scale: float) -> bool:
        old, new = old_values.get(name), new_values.get(name)
        if not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor) or old.shape != new.shape:
            return False
        return not compare_outputs(new, old, scale).ok

    names = [n.name for n in after.graph.nodes]
    for name in names:
        if name in touched and differs(name, tolerance_scale * 1e-2):
            return name
    return next((name for name in names if differs(name, tolerance_scale)), None)
