"""Files for the runtime on the device: half-precision ONNX, and onnxruntime's ORT format for mobile builds.

``float16_model`` stores weights and activations as float16 (half the file; inputs and outputs
kept float32 where asked, so callers feed what they fed before). ``write_ort_format`` runs
onnxruntime's own converter: an ``.ort`` file (what onnxruntime's mobile and minimal builds
load) and the ``required_operators.config`` listing every operator the model uses, which
onnxruntime's build script takes to compile a reduced runtime with those kernels only.
"""

from __future__ import annotations

import copy
import io
import logging
import shutil
import tempfile
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx

from graphopt.errors import LoweringError
from graphopt.targets.onnx.export import quiet_loggers

__all__ = ["OrtPlatform", "OrtFiles", "float16_model", "write_ort_format"]

OrtPlatform = Literal["arm", "amd64"]

log = logging.getLogger("graphopt")

FLOAT32_ONLY_OPS = ("DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "MatMulInteger", "ConvInteger",
                    "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits",
                    "GatherBlockQuantized", "GroupQueryAttention")
"""Operators a float16 file keeps in float32 (casts around them): int8 (de)quantization and compressed-weight
kernels take float32 scales and inputs in onnxruntime's CPU kernels."""


def float16_model(model: onnx.ModelProto, keep_io_types: bool = True) -> onnx.ModelProto:
    """A float16 copy of ``model`` (onnxruntime's converter); ``keep_io_types``: inputs and outputs stay float32.

    Raises ``LoweringError`` when the converter fails on the model.
    """
    # imported here: onnxruntime's transformer tools take 0.2 s to import, for an export option
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    try:
        with redirect_stdout(io.StringIO()), quiet_loggers("onnxruntime.transformers"):
            return convert_float_to_float16(copy.deepcopy(model), keep_io_types=keep_io_types,
                                            op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FLOAT32_ONLY_OPS])
    except Exception as error:
        raise LoweringError(f"onnxruntime's float16 converter failed on the model: {type(error).__name__}: "
                            f"{str(error)[:300]}") from error


@dataclass(frozen=True)
class OrtFiles:
    """What ``write_ort_format`` wrote: the ``.ort`` model and the operator configuration for a reduced build."""

    model: Path
    operators: Path


def write_ort_format(onnx_path: Path, destination: Path, platform: OrtPlatform = "arm") -> OrtFiles:
    """Convert the ONNX file ``onnx_path`` to ORT format at ``destination`` (a ``.ort`` path), with its operators.

    onnxruntime optimizes the graph first at its fixed level for ``platform`` (``"arm"`` for
    phones and boards, ``"amd64"`` for x86 devices; the x86 layout optimizations make a file only
    x86 builds run). The operator list is written beside the model as
    ``<name>.required_operators.config``. Raises ``LoweringError`` when onnxruntime cannot convert it.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "model.onnx"
        shutil.copyfile(onnx_path, source)
        data = Path(str(onnx_path) + ".data")
        if data.exists():  # weights in a side file, which the model names relative to itself
            shutil.copyfile(data, Path(folder) / data.name)
        output = Path(folder) / "ort"
        try:
            with redirect_stdout(io.StringIO()), quiet_loggers("ort_format_model.utils", "onnxruntime"):
                convert_onnx_models_to_ort(source, output, optimization_styles=[OptimizationStyle.Fixed],
                                           target_platform=platform)
        except Exception as error:
            raise LoweringError(f"onnxruntime could not convert the model to ORT format: {type(error).__name__}: "
                                f"{str(error)[:300]}") from error
        converted, config = output / "model.ort", output / "model.required_operators.config"
        if not converted.exists() or not config.exists():
            raise LoweringError("onnxruntime's ORT-format converter wrote no model (see its log above)")
        operators = destination.with_name(destination.stem + ".required_operators.config")
        shutil.move(str(converted), destination)
        shutil.move(str(config), operators)
    log.info("ORT format: %s (%d bytes), operators in %s", destination, destination.stat().st_size, operators)
    return OrtFiles(destination, operators)
