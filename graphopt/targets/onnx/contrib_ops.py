"""onnxruntime's contrib ops (domain ``com.microsoft``) made known to onnx, so onnxscript can write them."""

from __future__ import annotations

from collections.abc import Callable

import onnx

__all__ = ["ensure_schema"]


def ensure_schema(name: str, build: Callable[[], onnx.defs.OpSchema]) -> None:
    """Register the schema ``build()`` makes for ``com.microsoft::name`` (version 1) unless onnx knows it already."""
    try:
        onnx.defs.get_schema(name, 1, "com.microsoft")
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(build())
