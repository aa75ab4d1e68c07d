"""Which ONNX opset a file is written at, and which onnxruntime can read it.

An edge device runs the onnxruntime it ships with, often one or two years old. A file stamped
with a newer opset, or a newer IR version, than the runtime implements does not load there.
``export_onnx(path, opset=N)`` (and ``OnnxLowering(opset=N)``) writes opset ``N``: fused
attention (ONNX's ``Attention``) only from ``FUSED_ATTENTION_OPSET``, standard ops below it, and
the file's IR version lowered to the oldest one its opsets allow (``stamp_ir_version``). The option
classes import this module, so it loads onnx only when a function needs it.
:data:`ONNXRUNTIME_OPSETS` says which opset each onnxruntime release reads;
:func:`opset_for_onnxruntime` picks the newest one a given release reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from graphopt.errors import InputError

if TYPE_CHECKING:
    import onnx

__all__ = ["FUSED_ATTENTION_OPSET", "MAX_OPSET", "MIN_OPSET", "ONNXRUNTIME_OPSETS", "check_opset",
           "opset_for_onnxruntime", "opset_of", "stamp_ir_version"]

MIN_OPSET = 17
"""The oldest opset graphopt writes (``LayerNormalization`` is a standard op from 17)."""

MAX_OPSET = 25
"""The newest opset graphopt writes (torch.onnx's exporter translates up to it)."""

FUSED_ATTENTION_OPSET = 23
"""The first ONNX opset with an ``Attention`` operator (the exporter's translation of SDPA)."""

ONNXRUNTIME_OPSETS: dict[tuple[int, int], int] = {
    (1, 14): 18, (1, 15): 19, (1, 16): 19, (1, 17): 20, (1, 18): 21, (1, 19): 21, (1, 20): 21,
    (1, 21): 22, (1, 22): 22, (1, 23): 23,
}
"""The newest ``ai.onnx`` opset each onnxruntime release implements (onnxruntime's version matrix)."""


def check_opset(opset: int | None) -> None:
    """``InputError`` unless ``opset`` is None (the exporter's default) or within ``MIN_OPSET``..``MAX_OPSET``."""
    if opset is None:
        return
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"opset must be an int from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}. For an older "
                         f"onnxruntime, opset_for_onnxruntime('1.17') gives the newest opset it reads "
                         f"({ONNXRUNTIME_OPSETS[(1, 17)]}).")


def opset_for_onnxruntime(version: str) -> int:
    """The newest opset graphopt writes that onnxruntime ``version`` (``"1.17"`` or ``"1.17.3"``) reads.

    Raises ``InputError`` for a release older than graphopt's oldest opset (before 1.14).
    """
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        raise InputError(f"expected an onnxruntime version like '1.17', got {version!r}") from None
    if (major, minor) in ONNXRUNTIME_OPSETS:
        return ONNXRUNTIME_OPSETS[(major, minor)]
    if (major, minor) > max(ONNXRUNTIME_OPSETS):
        return MAX_OPSET
    raise InputError(f"onnxruntime {version} reads opsets older than {MIN_OPSET}, the oldest graphopt writes; "
                     "upgrade the runtime on the device to 1.14 or newer")


def opset_of(model: onnx.ModelProto) -> int | None:
    """The ``ai.onnx`` opset ``model`` is stamped with (None when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def stamp_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (changed in place) with the oldest IR version its opsets allow.

    The exporter writes the IR version of the onnx package installed here, which an older runtime
    refuses ("Unsupported model IR version") even when every operator is one it implements.
    """
    import onnx  # here: the option classes import this module, and onnx takes a second to import

    standard = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    model.ir_version = min(model.ir_version, onnx.helper.find_min_ir_version_for(standard, ignore_unknown=True))
    return model
