"""graphopt's own onnxruntime kernels: built once on the machine, swapped into the session's copy of a model.

onnxruntime's ``MatMulNBits`` on float activations (accuracy level 0) dequantizes its 4-bit
weights into a float buffer and runs a float GEMM: on a decode step, where every product is one
row against a large weight, that reads the codes at 4-6 GB/s. With int8 activations (accuracy
level 4) it is 2-3x faster but rounds every activation to 8 bits.
``graphopt.Int4Linear`` (``int4_linear.cc``) reads the 4-bit codes directly and multiplies them
as integers with AVX512-VNNI against the activations rounded to 16 bits per group of 32 (two
integer products, one per byte), at the speed memory delivers 0.625 bytes per weight (float16
scales and offsets beside the codes); ``graphopt.Int8Linear`` does the same for the group-wise
int8 layers graphopt exports as two 4-bit halves (a tied LM head), from one byte per weight.
What that changes, against the float product of the file, is bounded per output: half a 16-bit
step per activation and the float16 rounding of each scale and offset (2^-11 relative), both far
below the 4-bit rounding of the weights; the lowering's final check judges it like any other.

How it is used: :func:`native_int4_model` rewrites a *copy* of the exported model for the session
(each eligible ``MatMulNBits``, with the group offsets that follow it folded in, becomes one
``Int4Linear``; each pair of halves with its adds, one ``Int8Linear``; a SwiGLU block over such
layers, ``SiLU(gate) * up``, one ``Int4SwiGLU`` / ``Int8SwiGLU`` that reads the gate's and the up
projection's tiles in turn and stores the product; onnxruntime's residual add and RMS norm before
a kernel, part of it: ``SkipNorm...``); the model graphopt keeps,
saves and exports stays standard ONNX. The library is compiled with the system's C++ compiler into
graphopt's cache folder the first time it is needed (about a second) and registered with the
session's options. Where it cannot be used (no compiler, no AVX512-VNNI, onnxruntime older than
1.20, ``GRAPHOPT_NATIVE_KERNELS=0``) the session runs ``MatMulNBits`` as exported and
:func:`native_int4_library` says why. The same library holds ``graphopt.DecodeAttention``, a
decoder's attention over its cache (:mod:`~graphopt.targets.onnx.decode_attention`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from graphopt.passes.quantize.weight_ops import unpack_nibbles
from graphopt.targets.onnx.options import OnnxLowering
from graphopt.targets.onnx.swiglu import SwiGLU, find_swiglus, value_shapes

__all__ = ["NATIVE_DOMAIN", "NativeLibrary", "NativeRewrite", "native_int4_library", "native_int4_model",
           "native_kernels_run"]

log = logging.getLogger("graphopt")

NATIVE_DOMAIN = "graphopt"
"""The ONNX domain of graphopt's own operators (``graphopt.Int4Linear``)."""

GROUP = 32
"""Features per scale in ``Int4Linear`` (``MatMulNBits`` blocks of any multiple of it are split into groups of 32)."""

MIN_ONNXRUNTIME = (1, 20)
"""The library asks onnxruntime for C API version 20 (``KernelContext_ParallelFor`` and the rest it calls)."""

TILE = 16
"""Output features per tile of the kernels' weight layout (one AVX-512 register of int32 sums)."""

SOURCES = tuple(Path(__file__).with_name(name) for name in ("int4_linear.cc", "decode_attention.cc"))
"""The library's sources, compiled together (``int4_linear.cc`` registers every op)."""
HEADERS = (Path(__file__).with_name("ort_custom_op.h"),)
COMPILE_FLAGS = ("-O3", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-fPIC",
                 "-shared", "-fvisibility=hidden")


@dataclass(frozen=True)
class NativeLibrary:
    """The built library (``path``), or why there is none (``reason``)."""

    path: Path | None
    reason: str = ""


def _cache_folder() -> Path:
    """Where built kernels live: ``GRAPHOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/graphopt`` or ``~/.cache/graphopt``."""
    if os.environ.get("GRAPHOPT_CACHE_DIR"):
        return Path(os.environ["GRAPHOPT_CACHE_DIR"]) / "kernels"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "graphopt" / "kernels"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _why_not() -> str:
    """Why this machine cannot run the library ("" when it can)."""
    if os.environ.get("GRAPHOPT_NATIVE_KERNELS", "1").lower() in ("0", "off", "false", "no"):
        return "GRAPHOPT_NATIVE_KERNELS=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"built for Linux on x86-64 only (this is {platform.system()} on {platform.machine()})"
    if not {"avx512f", "avx512bw", "avx512_vnni"} <= _cpu_flags():
        return "the CPU lacks AVX-512 (F, BW and VNNI)"
    import onnxruntime as ort

    version = tuple(int(part) for part in ort.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_ONNXRUNTIME:
        return f"onnxruntime {ort.__version__} is older than 1.20"
    return ""


@lru_cache(maxsize=1)
def native_int4_library() -> NativeLibrary:
    """The kernel library graphopt builds for onnxruntime, compiled into the cache folder on first use.

    Built once per source; it holds the int4 / int8 linears and ``graphopt.DecodeAttention``
    (:mod:`~graphopt.targets.onnx.decode_attention`).
    """
    reason = _why_not()
    if reason:
        return NativeLibrary(None, reason)
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        return NativeLibrary(None, "no C++ compiler found (g++, c++ or clang++; or set CXX)")
    source = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    digest = hashlib.sha256(source + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
    target = _cache_folder() / f"graphopt_int4_linear_{digest}.so"
    if target.exists():
        return NativeLibrary(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as folder:
            built = Path(folder) / target.name
            subprocess.run([compiler, *COMPILE_FLAGS, "-o", str(built), *map(str, SOURCES)], check=True,
                           capture_output=True, text=True, timeout=300)
            os.replace(built, target)  # atomic: another process building the same source sees a whole file
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        names = " and ".join(path.name for path in SOURCES)
        return NativeLibrary(None, f"compiling {names} failed: {detail.strip().splitlines()[-1][:200]}")
    log.info("built graphopt's kernels for onnxruntime (int4/int8 linears, decoder attention): %s", target)
    return NativeLibrary(target)


def native_kernels_run(options: OnnxLowering) -> bool:
    """True when sessions under ``options`` run graphopt's kernels where a model has layers for them.

    The options allow them (``OnnxLowering.runs_native_kernels``) and the library is built here.
    """
    return options.runs_native_kernels and native_int4_library().path is not None


@dataclass(frozen=True)
class NativeRewrite:
    """What :func:`native_int4_model` did: the session's model, its ``Int4Linear`` and ``Int8Linear`` layers."""

    model: onnx.ModelProto
    int4_layers: int
    offsets_folded: int
    int8_layers: int = 0
    """int8 layers graphopt exported as two 4-bit ``MatMulNBits`` halves, each now one ``Int8Linear``."""
    swiglus: int = 0
    """SwiGLU blocks whose gate and up layers run as one ``Int4SwiGLU`` / ``Int8SwiGLU`` (counted in the layers too)."""
    skip_norms: int = 0
    """``SkipSimplifiedLayerNormalization`` nodes folded into the kernel that reads them (``SkipNorm...``)."""

    @property
    def layers(self) -> int:
        """How many ``MatMulNBits`` nodes the kernels replaced."""
        return self.int4_layers + 2 * self.int8_layers


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _unpack_low_first(packed: np.ndarray) -> np.ndarray:
    """uint8 pairs -> nibbles along the last axis, the low nibble first (``MatMulNBits``' order, graphopt's own)."""
    return unpack_nibbles(torch.from_numpy(np.array(packed))).numpy()  # a writable copy


def _int4_linear_constants(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(codes ``[N, K/GROUP, GROUP]``, scales and offsets ``[N, K/GROUP]``) of a ``MatMulNBits`` node, or None.

    Qualifies: 4 bits, float32 scales, blocks and K multiples of ``GROUP``, constant weights, float
    activations (accuracy level 0), uint8 zero points or none, no ``g_idx`` or bias.
    """
    inputs = list(node.input) + [""] * (6 - len(node.input))
    k, n = _attribute(node, "K", 0), _attribute(node, "N", 0)
    block = _attribute(node, "block_size", 0)
    if (_attribute(node, "bits", 4) != 4 or _attribute(node, "accuracy_level", 0) != 0 or block % GROUP
            or k % GROUP or inputs[4] or inputs[5] or inputs[1] not in initializers or inputs[2] not in initializers):
        return None
    if inputs[3] and (inputs[3] not in initializers or initializers[inputs[3]].data_type != onnx.TensorProto.UINT8):
        return None
    scales = numpy_helper.to_array(initializers[inputs[2]])
    if scales.dtype != np.float32:
        return None
    packed = numpy_helper.to_array(initializers[inputs[1]])
    blocks = -(-k // block)
    q = _unpack_low_first(packed.reshape(n, -1))[:, :k]
    groups = k // GROUP
    codes = q.reshape(n, groups, GROUP).astype(np.uint8)
    if inputs[3]:
        zero_points = _unpack_low_first(numpy_helper.to_array(initializers[inputs[3]]).reshape(n, -1))[:, :blocks]
    else:
        zero_points = np.full((n, blocks), 8, dtype=np.uint8)
    scales = scales.reshape(n, blocks)
    per_group = block // GROUP
    group_scales = np.repeat(scales, per_group, axis=1)[:, :groups]
    group_offsets = np.repeat(-zero_points.astype(np.float32) * scales, per_group, axis=1)[:, :groups]
    return codes, np.ascontiguousarray(group_scales), np.ascontiguousarray(group_offsets, dtype=np.float32)


def _group_offsets(add: onnx.NodeProto, product: str, activations: str, k: int, producers: dict[str, onnx.NodeProto],
                   initializers: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The ``[N, K/GROUP]`` offsets ``add`` adds to ``product`` as ``(activations summed per block) @ offsets``, if so.

    That is how graphopt exports float zero points (``weight_only._add_group_offsets``): a
    constant 0/1 indicator matrix sums each block of features, a constant ``[blocks, N]`` matrix
    weighs the sums.
    """
    other = next((name for name in add.input if name != product), None)
    weigh = producers.get(other) if other is not None else None
    if weigh is None or weigh.op_type != "MatMul" or weigh.input[1] not in initializers:
        return None
    summed = producers.get(weigh.input[0])
    if summed is None or summed.op_type != "MatMul" or summed.input[0] != activations \
            or summed.input[1] not in initializers:
        return None
    indicator = numpy_helper.to_array(initializers[summed.input[1]])
    offsets = numpy_helper.to_array(initializers[weigh.input[1]])
    if indicator.ndim != 2 or indicator.shape[0] != k or offsets.ndim != 2 or offsets.dtype != np.float32:
        return None
    blocks = indicator.shape[1]
    block = k // blocks if blocks and k % blocks == 0 else 0
    if block % GROUP or not np.array_equal(indicator, np.repeat(np.eye(blocks, dtype=indicator.dtype), block, 0)):
        return None
    return np.repeat(offsets.T, block // GROUP, axis=1)


@dataclass(frozen=True)
class _Int8Pair:
    """An int8 layer exported as two 4-bit halves: ``Add(hi, lo) + (activations summed per block) @ 8s``."""

    halves: tuple[onnx.NodeProto, onnx.NodeProto]
    adds: tuple[str, str]  # the outputs of the add of the halves and of the offsets, the second the layer's
    codes: np.ndarray  # int8 [N, K/GROUP, GROUP]
    scales: np.ndarray  # float32 [N, K/GROUP]


def _int8_pair(add: onnx.NodeProto, producers: dict[str, onnx.NodeProto], consumers: dict[str, list[onnx.NodeProto]],
               initializers: dict[str, onnx.TensorProto]) -> _Int8Pair | None:
    """The int8 layer ``add`` sums the halves of (``weight_only._groupwise_int8_product``), or None.

    ``s * q == 16s * (hi - 8) + s * (lo - 8) + 8s`` with ``q + 128 = 16 * hi + lo``: both halves
    4-bit without zero points on the same input, the high one's scales 16 times the low one's,
    and the add after them adding ``8s`` per group.
    """
    halves = [producers.get(name) for name in add.input]
    if len(halves) != 2 or any(h is None or h.op_type != "MatMulNBits" or h.domain != "com.microsoft" for h in halves):
        return None
    first, second = halves
    if first.input[0] != second.input[0] or any(len([i for i in h.input if i]) != 3 for h in halves):
        return None
    attributes = [{a: _attribute(h, a, 0) for a in ("K", "N", "bits", "block_size", "accuracy_level")} for h in halves]
    k, n, block = attributes[0]["K"], attributes[0]["N"], attributes[0]["block_size"]
    if attributes[0] != attributes[1] or attributes[0]["bits"] != 4 or attributes[0]["accuracy_level"] or block % GROUP:
        return None
    if k % GROUP or any(h.input[1] not in initializers or h.input[2] not in initializers for h in halves):
        return None
    scales = [numpy_helper.to_array(initializers[h.input[2]]) for h in halves]
    if np.array_equal(scales[1], 16 * scales[0]):
        first, second, scales = second, first, scales[::-1]
    if scales[0].dtype != np.float32 or not np.array_equal(scales[0], 16 * scales[1]):
        return None
    readers = consumers.get(add.output[0], [])
    if len(readers) != 1 or readers[0].op_type != "Add":
        return None
    offsets = _group_offsets(readers[0], add.output[0], first.input[0], k, producers, initializers)
    per_group, groups = block // GROUP, k // GROUP
    low_scales = np.repeat(scales[1].reshape(n, -1), per_group, axis=1)[:, :groups]
    if offsets is None or not np.array_equal(offsets, 8 * low_scales) or not _fits_float16(low_scales):
        return None
    high, low = (_unpack_low_first(numpy_helper.to_array(initializers[h.input[1]]).reshape(n, -1))[:, :k]
                 for h in (first, second))
    codes = (16 * high.astype(np.int16) + low - 128).astype(np.int8).reshape(n, groups, GROUP)
    return _Int8Pair((first, second), (add.output[0], readers[0].output[0]), codes, np.ascontiguousarray(low_scales))


def _by_tiles(array: np.ndarray) -> np.ndarray:
    """``[N, G, ...]`` -> ``[ceil(N / TILE), G, TILE, ...]``, the last tile padded with zeros."""
    n = array.shape[0]
    padded = np.zeros((-(-n // TILE) * TILE, *array.shape[1:]), array.dtype)
    padded[:n] = array
    tiled = padded.reshape(-1, TILE, *array.shape[1:])
    return np.ascontiguousarray(np.moveaxis(tiled, 1, 2))


def _int4_tiles(codes: np.ndarray) -> np.ndarray:
    """The codes of ``Int4Linear``'s blocks, ``[T, G, 256]``, from 4-bit codes ``[N, G, GROUP]`` (``int4_linear.cc``).

    Byte ``b`` of lane ``c`` in chunk ``j`` holds features ``8j + b`` (low nibble) and ``8j + 4 + b``
    (high nibble) of output feature ``c`` of the tile.
    """
    tiled = _by_tiles(codes)
    tiled = tiled.reshape(*tiled.shape[:3], 4, 2, 4)  # [T, G, TILE, chunk, nibble, byte]
    packed = (tiled[..., 0, :] | (tiled[..., 1, :] << 4)).astype(np.uint8)
    return packed.transpose(0, 1, 3, 2, 4).reshape(*tiled.shape[:2], -1)


def _int8_tiles(codes: np.ndarray) -> np.ndarray:
    """The codes of ``Int8Linear``'s blocks, ``[T, G, 512]`` (``q + 128``), from int8 codes ``[N, G, GROUP]``."""
    tiled = _by_tiles((codes.astype(np.int16) + 128).astype(np.uint8))
    tiled = tiled.reshape(*tiled.shape[:3], 8, 4)  # [T, G, TILE, chunk, byte]
    return tiled.transpose(0, 1, 3, 2, 4).reshape(*tiled.shape[:2], -1)


HALF_MAX = 65504.0  # float16's largest finite value
HALF_SMALLEST_NORMAL = 2.0 ** -14  # and its smallest with all 11 significant bits


def _fits_float16(*arrays: np.ndarray) -> bool:
    """Whether float16 holds ``arrays`` to its full 11 significant bits at their largest (none overflows)."""
    largest = max(float(np.abs(a).max(initial=0.0)) for a in arrays)
    return bool(all(np.isfinite(a).all() for a in arrays)) and HALF_SMALLEST_NORMAL <= largest <= HALF_MAX


def _weight_blocks(codes: np.ndarray, *per_group: np.ndarray) -> np.ndarray:
    """One block of bytes per tile and group: the tiled ``codes``, then each ``[N, G]`` array as 16 float16s."""
    halves = [_by_tiles(a).astype(np.float16).view(np.uint8) for a in per_group]  # [T, G, 32] each
    return np.ascontiguousarray(np.concatenate([codes, *halves], axis=2))


def _kernel_node(op: str, activations: str, output: str, stem: str, n: int, blocks: np.ndarray
                 ) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A ``graphopt`` kernel node reading ``activations`` and its initializers (the weight blocks, ``N``)."""
    constants = [numpy_helper.from_array(blocks, f"{stem}_weights"),
                 numpy_helper.from_array(np.array([n], dtype=np.int64), f"{stem}_columns")]
    node = onnx.helper.make_node(op, [activations, *(t.name for t in constants)], [output], name=stem,
                                 domain=NATIVE_DOMAIN)
    return node, constants


@dataclass(frozen=True)
class _Layer:
    """A linear the kernels run: its codes and per-group arrays, what it reads and writes, the node it replaces."""

    int8: bool
    activations: str
    output: str
    position: int
    stem: str
    codes: np.ndarray  # [N, G, GROUP]: uint8 4-bit codes, or int8
    per_group: tuple[np.ndarray, ...]  # [N, G] each: the scales, then (4-bit) the offsets

    def blocks(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The kernels' weight blocks ``[T, G, bytes]`` of output features ``start .. stop - 1``."""
        rows = slice(start, stop)
        codes = _int8_tiles(self.codes[rows]) if self.int8 else _int4_tiles(self.codes[rows])
        return _weight_blocks(codes, *(a[rows] for a in self.per_group))


def _gated_blocks(block: SwiGLU, layers: dict[str, _Layer]) -> np.ndarray | None:
    """``Int4SwiGLU`` / ``Int8SwiGLU`` weights: the gate's tile ``t`` at ``2t``, the up projection's at ``2t + 1``."""
    gate, up = layers[block.gate.source], layers[block.up.source]
    if gate.int8 != up.int8 or gate.activations != up.activations or gate.codes.shape[1] != up.codes.shape[1]:
        return None
    pair = np.stack([gate.blocks(block.gate.start, block.gate.stop), up.blocks(block.up.start, block.up.stop)], 1)
    return pair.reshape(-1, *pair.shape[2:])


SKIP_NORM = "SkipSimplifiedLayerNormalization"
"""onnxruntime's contrib op for a decoder's residual add and RMS norm (``decoder_norms`` exports it)."""

KERNEL_OPS = ("Int4Linear", "Int8Linear", "Int4SwiGLU", "Int8SwiGLU")


def _fold_skip_norms(nodes: list[onnx.NodeProto], graph: onnx.GraphProto
                     ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``nodes`` with skip-add RMS norms folded into the kernels after them, and the new constants.

    A ``SkipSimplifiedLayerNormalization`` whose normed output only a kernel reads becomes part of that
    kernel (``SkipNorm<op>``: it adds, normalizes and multiplies in one call). Folded only where the
    two added tensors have the same known shape, the norm has no bias and writes no mean or inverse
    deviation anyone reads, and its epsilon is written on the node.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs, shapes = {o.name for o in graph.output}, value_shapes(graph)
    fused: dict[int, onnx.NodeProto] = {}  # position of the norm -> the kernel that takes it in
    taken: set[int] = set()  # positions of the kernels folded into a norm's place
    constants: list[onnx.TensorProto] = []
    positions = {id(node): index for index, node in enumerate(nodes)}
    for index, norm in enumerate(nodes):
        if norm.op_type != SKIP_NORM or norm.domain != "com.microsoft" or len([i for i in norm.input if i]) != 3:
            continue
        epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), None)
        kernel = readers.get(norm.output[0], [None])
        unread = all(not name or not readers.get(name) for name in norm.output[1:3])
        shape = shapes.get(norm.input[0], ("?",))
        same_shape = shape == shapes.get(norm.input[1]) and "?" not in shape
        if (len(kernel) != 1 or kernel[0] is None or kernel[0].domain != NATIVE_DOMAIN or kernel[0].op_type not in
                KERNEL_OPS or kernel[0].input[0] != norm.output[0] or norm.output[0] in outputs or not unread
                or epsilon is None or not same_shape):
            continue
        linear = kernel[0]
        stem = linear.name or linear.output[0]
        constants.append(numpy_helper.from_array(np.array([epsilon], np.float32), f"{stem}_epsilon"))
        total = norm.output[3] if len(norm.output) > 3 and norm.output[3] else f"{stem}_unread_sum"
        fused[index] = onnx.helper.make_node(
            f"SkipNorm{linear.op_type}", [norm.input[0], linear.input[1], linear.input[2], norm.input[1],
                                          norm.input[2], constants[-1].name],
            [linear.output[0], total], name=f"{stem}_skip_norm", domain=NATIVE_DOMAIN)
        taken.add(positions[id(linear)])
    return [fused.get(i, node) for i, node in enumerate(nodes) if i not in taken], constants


def native_int4_model(model: onnx.ModelProto) -> NativeRewrite:
    """A copy of ``model`` whose 4-bit float-activation ``MatMulNBits`` run graphopt's kernels.

    Each layer's scales and zero points become a scale and an offset per group of 32 features, a
    following add of graphopt's float-zero-point offsets folded into the offsets, and its codes are
    repacked in tiles of ``TILE`` output features, each group's codes followed by its scales and
    offsets in float16 (``_weight_blocks``; a layer whose scales float16 cannot hold keeps
    ``MatMulNBits``): one ``graphopt.Int4Linear``. An int8 layer exported as two halves
    (``_int8_pair``) becomes one ``Int8Linear`` on its one-byte codes. Where such layers feed a
    SwiGLU block (``SiLU(gate) * up``, :func:`~graphopt.targets.onnx.swiglu.find_swiglus`), the gate
    and up features run as one ``Int4SwiGLU`` / ``Int8SwiGLU`` that applies SiLU and the product
    before it stores its outputs. Nodes left without a reader are removed, and a skip-add RMS norm
    that only a kernel reads runs inside it (:func:`_fold_skip_norms`). ``model`` itself is not
    changed.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        producers.update((name, node) for name in node.output)
    # a value read only inside a subgraph (If, Loop) looks unread from here: with subgraphs, nothing is pruned
    nested = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                 for n in graph.node for a in n.attribute)
    folded = 0
    layers: list[_Layer] = []
    dropped: set[str] = set()  # outputs of the adds folded into a kernel
    pairs = [pair for node in graph.node if node.op_type == "Add"
             and (pair := _int8_pair(node, producers, consumers, initializers)) is not None]
    paired = {half.output[0] for pair in pairs for half in pair.halves}
    positions = {node.output[0]: index for index, node in enumerate(graph.node) if node.output}
    for pair in pairs:
        layers.append(_Layer(True, pair.halves[0].input[0], pair.adds[1], positions[pair.adds[1]],
                             f"{pair.halves[0].name or pair.adds[1]}_graphopt_int8", pair.codes, (pair.scales,)))
        dropped.update(pair.adds)
    for index, node in enumerate(graph.node):
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or node.output[0] in paired:
            continue
        constants = _int4_linear_constants(node, initializers)
        if constants is None:
            continue
        codes, scales, offsets = constants
        output = node.output[0]
        readers = consumers.get(output, [])
        term = None
        if len(readers) == 1 and readers[0].op_type == "Add" and output not in [o.name for o in graph.output]:
            term = _group_offsets(readers[0], output, node.input[0], _attribute(node, "K", 0), producers, initializers)
        if term is not None:  # the add's output comes from the kernel; the offset chain loses its reader
            offsets = offsets + term
            output = readers[0].output[0]
        if not _fits_float16(scales, offsets):
            continue
        if term is not None:
            dropped.add(output)
            folded += 1
        layers.append(_Layer(False, node.input[0], output, index, f"{node.name or node.output[0]}_graphopt_int4",
                             codes, (scales, offsets)))
    if not layers:
        return NativeRewrite(copy, 0, 0)
    by_output = {layer.output: layer for layer in layers}
    replaced: dict[int, onnx.NodeProto | None] = {}  # None: the layer runs inside a gated kernel
    swiglus = 0
    for block in [] if nested else find_swiglus(graph, {layer.output: layer.codes.shape[0] for layer in layers}):
        blocks = _gated_blocks(block, by_output)
        if blocks is None:
            continue
        gate = by_output[block.gate.source]
        replaced[positions[block.output]], constants = _kernel_node(
            "Int8SwiGLU" if gate.int8 else "Int4SwiGLU", gate.activations, block.output, f"{gate.stem}_swiglu",
            block.gate.width, blocks)
        graph.initializer.extend(constants)
        for source in (block.gate.source, block.up.source):
            replaced[by_output[source].position] = None
        swiglus += 1
    for layer in layers:
        if layer.position not in replaced:
            replaced[layer.position], constants = _kernel_node(
                "Int8Linear" if layer.int8 else "Int4Linear", layer.activations, layer.output, layer.stem,
                layer.codes.shape[0], layer.blocks())
            graph.initializer.extend(constants)
    nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        if index not in replaced:
            if not (node.op_type == "Add" and node.output[0] in dropped):
                nodes.append(node)
        elif (kernel := replaced[index]) is not None:  # None: the layer runs inside a gated kernel
            nodes.append(kernel)
    del graph.node[:]
    norms = 0
    if not nested:
        nodes, epsilons = _fold_skip_norms(_without_dead_nodes(nodes, {o.name for o in graph.output}), graph)
        graph.initializer.extend(epsilons)
        norms = len(epsilons)
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input} | {i.name for i in graph.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == NATIVE_DOMAIN for o in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid(NATIVE_DOMAIN, 1))
    int8_layers = sum(layer.int8 for layer in layers)
    return NativeRewrite(copy, len(layers) - int8_layers, folded, int8_layers, swiglus, norms)


def _without_dead_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` less those whose outputs nothing reads (repeatedly), in their order."""
    live = set(outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(name in live for name in node.output if name):
            kept.append(node)
            live.update(name for name in node.input if name)
    return list(reversed(kept))
