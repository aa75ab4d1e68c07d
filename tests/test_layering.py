"""Backend code lives under graphopt/targets/: nothing else names a backend's kernels or imports onnxruntime.

The import side is also written down as import-linter contracts (``.importlinter``: onnxruntime
imported by the targets only, cpu and gpu apart, the onnx target's modules without a cycle);
this test scans the source text, which also catches kernels named as strings or ``torch.ops``
attributes, which no import shows.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "graphopt"

BACKEND_KERNELS = {
    "oneDNN ops": re.compile(r"torch\.ops\.mkldnn|mkldnn"),
    "cuDNN ops": re.compile(r"cudnn_"),
    "int8 GEMM": re.compile(r"_int_mm"),
    "weight-only kernels": re.compile(r"_weight_int4pack_mm|_weight_int8pack_mm|_convert_weight_to_int4pack"),
    "onnxruntime contrib ops": re.compile(r"com\.microsoft"),
    "onnxruntime": re.compile(r"^\s*(import onnxruntime|from onnxruntime\b)", re.MULTILINE),
}

ALLOWED = {
    # the benchmark runs onnxruntime as a peer of graphopt (a plain export, onnxruntime's own int8)
    ("bench", "onnxruntime"),
    # the cost model counts the multiply-adds of ATen ops by name, backend convolutions and GEMMs among
    # them; it calls none of them (moving these names into the targets is left to the cost model's owner)
    ("analysis/cost.py", "oneDNN ops"),
    ("analysis/cost.py", "cuDNN ops"),
    ("analysis/cost.py", "int8 GEMM"),
    ("analysis/cost.py", "weight-only kernels"),
}


def _allowed(path: Path, kind: str) -> bool:
    relative = path.relative_to(ROOT).as_posix()
    return any((relative == place or relative.startswith(place + "/")) and kind == allowed
               for place, allowed in ALLOWED)


def _sources_outside_targets() -> list[Path]:
    return [p for p in sorted(ROOT.rglob("*.py")) if p.relative_to(ROOT).parts[0] != "targets"]


def test_the_scan_sees_the_backends() -> None:
    """The patterns find what they look for where it belongs: in the targets."""
    targets = "\n".join(p.read_text() for p in (ROOT / "targets").rglob("*.py"))
    for kind, pattern in BACKEND_KERNELS.items():
        assert pattern.search(targets), kind


@pytest.mark.parametrize("kind", sorted(BACKEND_KERNELS))
def test_no_module_outside_the_targets_names_a_backend_kernel(kind: str) -> None:
    pattern = BACKEND_KERNELS[kind]
    found = [f"{path.relative_to(ROOT)}:{text[:match.start()].count(chr(10)) + 1}: {match.group(0).strip()}"
             for path in _sources_outside_targets() if not _allowed(path, kind)
             for text in [path.read_text()] for match in pattern.finditer(text)]
    assert not found, f"{kind} named outside graphopt/targets/: " + "; ".join(found)
