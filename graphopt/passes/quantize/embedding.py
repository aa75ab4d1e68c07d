"""Quantized embedding tables: the rows are gathered as stored, then dequantized (no float copy of the table).

Static and dynamic int8 both store every constant ``aten.embedding`` table in one of three forms
(``embedding_bits``):

- **8 bits** (default): int8 with one symmetric scale per row; the graph reads
  ``embedding(int8 table, ids).float() * embedding(scales, ids)``.
- **4 bits**: two 4-bit codes per byte and, per group of ``group`` consecutive columns of a row,
  a float16 scale and offset (asymmetric: ``value ≈ code · scale + offset``, codes 0-15). Byte
  ``j`` of a row holds column ``j`` in its low half and column ``j + D/2`` in its high half, so
  unpacking is ``cat(rows mod 16, rows // 16)`` with no reshape (any batch shape, any free dim);
  ``index_select`` spreads each group's scale and offset over its columns.
- **3 bits**: per row, a codebook of 8 float16 values found by k-means on the row, and a 3-bit
  index per column, stored as three bit planes of ``D/8`` bytes each (plane ``p`` holds bit ``p``
  of every index; bit ``k`` of plane byte ``j`` is column ``k·D/8 + j``), so unpacking works on
  the row's last dim only: each byte's 8 bits by ``floor``, each column's bit of each plane by
  ``index_select``, the planes weighted 1, 2, 4, then each index compared with 0..7 and the
  matches times the row's codebook summed. 0.125 bytes per value for the codes plus 16 per row (MiniLM's word
  embeddings: 4.9 MB against 7.3 at 4 bits and 11.8 at 8).

Only the looked-up rows are ever dequantized, on every target (ONNX: ``Gather``, ``Floor``, ``Mul``,
``Add``, exact on bytes in float). For a BERT-style model the word embeddings are half of the fp32
file, so int8 tables bring an int8 file to about a quarter of the fp32 size, 4-bit tables
(0.16 bytes per value with group 32) to about a sixth, and 3-bit ones to about a seventh.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.errors import InputError
from graphopt.ir.graph import attribute_value, module_path, register_constant
from graphopt.ir.meta import infer_meta
from graphopt.passes.lossy.base import LossyUnit
from graphopt.passes.quantize.observers import quantize_weight
from graphopt.passes.quantize.selection import SkipList

__all__ = ["EMBEDDING_BITS", "QuantizedTable", "check_embedding_bits", "embedding_sites", "embedding_units",
           "pack_planes", "plan_embeddings", "quantize_embedding", "quantize_table_codebook", "unpack_planes"]

aten = torch.ops.aten

EMBEDDING_BITS = (8, 4, 3)
"""The widths an embedding table can be stored in."""

CODEBOOK_SIZE = 8
"""Values in a 3-bit table's codebook per row."""
KMEANS_STEPS = 12
"""Lloyd steps of a 3-bit table's k-means per row (from quantile seeds; it settles within a few)."""
KMEANS_ROWS = 2048
"""Rows a k-means step handles at once (their distances to the codebook take rows x D x 8 floats)."""

INT4_GROUP = 32
"""Columns per 4-bit scale/offset pair (a row whose width it does not divide is stored in int8)."""

_FLOAT16_MAX = 6.0e4


def check_embedding_bits(config: object) -> None:
    """``config.embedding_bits`` must be one of ``EMBEDDING_BITS``."""
    bits = config.embedding_bits  # type: ignore[attr-defined]
    if isinstance(bits, bool) or bits not in EMBEDDING_BITS:
        raise InputError(f"{type(config).__name__}(embedding_bits=...) must be 8, 4 or 3, got {bits!r}: 8 stores "
                         "embedding tables as int8 rows, 4 as 4-bit codes with a scale and offset per 32 columns, "
                         "3 as 3-bit indices into a codebook of 8 values per row")


@dataclass(frozen=True)
class QuantizedTable:
    """An embedding table as stored: int8 ``codes`` with per-row ``scales``, packed 4-bit codes, or 3-bit planes.

    4 bits: ``codes`` is ``uint8 [rows, D/2]`` (column ``j`` in the low half of byte ``j``, column
    ``j + D/2`` in the high half), ``scales`` and ``offsets`` ``[rows, D/group]``. 3 bits:
    ``codes`` is ``uint8 [rows, 3·D/8]`` (the three bit planes side by side), ``scales`` the
    codebooks ``[rows, 8]`` (``codebook=True``).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None = None
    group: int = 0
    codebook: bool = False

    @property
    def bits(self) -> int:
        """3, 4 or 8."""
        return 3 if self.codebook else 4 if self.offsets is not None else 8

    @property
    def shape(self) -> list[int]:
        """The float table's shape."""
        rows, width = self.codes.shape
        return [rows, {3: width * 8 // 3, 4: width * 2, 8: width}[self.bits]]

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes, scales and offsets."""
        parts = (self.codes, self.scales, self.offsets)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def scheme(self) -> str:
        """How the report names it."""
        if self.bits == 3:
            return "3-bit indices into 8 values per row (k-means; weight-only)"
        if self.bits == 4:
            return f"4-bit table, scale + offset per {self.group} columns (weight-only)"
        return "int8 per-row table (weight-only)"

    def dequantized(self) -> torch.Tensor:
        """The float table the stored one stands for (float32)."""
        if self.codebook:
            return self.scales.float().gather(1, unpack_planes(self.codes).long())
        if self.offsets is None:
            return self.codes.float() * self.scales.reshape(-1, 1).float()
        codes = torch.cat([self.codes & 15, self.codes >> 4], dim=-1).float()
        columns = _column_groups(codes.shape[1], self.group)
        return (codes * self.scales.float().index_select(1, columns)
                + self.offsets.float().index_select(1, columns))


def _column_groups(width: int, group: int) -> torch.Tensor:
    """Each column's group index (``[width]``, int64)."""
    return torch.arange(width) // group


def quantize_table_int4(table: torch.Tensor, group: int = INT4_GROUP) -> QuantizedTable:
    """Asymmetric 4-bit codes per ``group`` columns of each row, scales and offsets in float16 where they fit."""
    rows, width = table.shape
    values = table.detach().float().reshape(rows, width // group, group)
    low, high = values.amin(-1), values.amax(-1)
    dtype = torch.float16 if float(values.abs().max()) < _FLOAT16_MAX else torch.float32
    scales = ((high - low) / 15).to(dtype).clamp_min(torch.finfo(dtype).tiny)  # constant groups: code 0, exact
    offsets = low.to(dtype)
    codes = torch.round((values - offsets.float().unsqueeze(-1)) / scales.float().unsqueeze(-1)).clamp(0, 15)
    codes = codes.reshape(rows, width).to(torch.uint8)
    half = width // 2
    packed = codes[:, :half] | (codes[:, half:] << 4)
    return QuantizedTable(packed.contiguous(), scales, offsets, group)


def pack_planes(indices: torch.Tensor) -> torch.Tensor:
    """3-bit ``indices [rows, D]`` (``D`` a multiple of 8) as three bit planes ``uint8 [rows, 3·D/8]``.

    Plane ``p`` holds bit ``p`` of every index; bit ``k`` of a plane's byte ``j`` belongs to
    column ``k·D/8 + j``.
    """
    rows, width = indices.shape
    values = indices.to(torch.int64).reshape(rows, 8, width // 8)  # [rows, bit k, byte j]
    weights = (2 ** torch.arange(8)).reshape(1, 8, 1)
    planes = [(((values >> plane) & 1) * weights).sum(1) for plane in range(3)]
    return torch.cat(planes, dim=1).to(torch.uint8)


def unpack_planes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_planes``: ``uint8 [rows, 3·D/8]`` -> indices ``[rows, D]`` (uint8, 0..7)."""
    rows, width = packed.shape
    bits = (packed.to(torch.int64).unsqueeze(1) >> torch.arange(8).reshape(1, 8, 1)) & 1  # [rows, k, 3·D/8]
    planes = bits.reshape(rows, 8, 3, width // 3)
    indices = planes[:, :, 0] + 2 * planes[:, :, 1] + 4 * planes[:, :, 2]  # [rows, k, D/8]
    return indices.reshape(rows, -1).to(torch.uint8)


def quantize_table_codebook(table: torch.Tensor) -> QuantizedTable:
    """3-bit indices into a codebook of ``CODEBOOK_SIZE`` float16 values per row, found by k-means on the row."""
    values = table.detach().float()
    rows = values.shape[0]
    dtype = torch.float16 if float(values.abs().max()) < _FLOAT16_MAX else torch.float32
    codebooks = torch.empty(rows, CODEBOOK_SIZE)
    indices = torch.empty(values.shape, dtype=torch.uint8)
    levels = (torch.arange(CODEBOOK_SIZE, dtype=torch.float32) + 0.5) / CODEBOOK_SIZE
    for start in range(0, rows, KMEANS_ROWS):
        part = values[start:start + KMEANS_ROWS]
        centers = torch.quantile(part, levels, dim=1).T.contiguous()  # [rows, 8], sorted
        for _ in range(KMEANS_STEPS):
            nearest = (part.unsqueeze(-1) - centers.unsqueeze(1)).abs().argmin(-1)  # [rows, D]
            sums = torch.zeros_like(centers).scatter_add_(1, nearest, part)
            counts = torch.zeros_like(centers).scatter_add_(1, nearest, torch.ones_like(part))
            centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
        stored = centers.to(dtype).float()  # the values the file keeps: indices chosen against them
        indices[start:start + KMEANS_ROWS] = (part.unsqueeze(-1) - stored.unsqueeze(1)).abs().argmin(-1).to(torch.uint8)
        codebooks[start:start + KMEANS_ROWS] = stored
    return QuantizedTable(pack_planes(indices), codebooks.to(dtype), codebook=True)


def embedding_sites(gm: fx.GraphModule) -> list[str]:
    """Names of the ``aten.embedding`` nodes that read a constant 2-D float table."""
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.embedding.default and len(node.args) >= 2:
            table = attribute_value(gm, node.args[0])
            if table is not None and table.is_floating_point() and table.dim() == 2:
                names.append(node.name)
    return names


def quantize_embedding(gm: fx.GraphModule, node: fx.Node, table: QuantizedTable) -> int:
    """Rewrite ``node`` to gather the stored rows and dequantize them; returns the bytes saved."""
    original = attribute_value(gm, node.args[0])
    graph = gm.graph
    rest = tuple(node.args[2:])
    ids = node.args[1]

    def add(target: object, *args: object, **kwargs: object) -> fx.Node:
        new = graph.call_function(target, args, kwargs)  # type: ignore[arg-type]
        infer_meta(new)
        return new

    codes = register_constant(gm, f"{node.name}_table_int{table.bits}", table.codes, before=node)
    decode = _decoded_codebook_rows if table.codebook else _decoded_scaled_rows
    scaled = decode(gm, add, node, codes, table, ids, rest, original.dtype)
    node.replace_all_uses_with(scaled)
    graph.erase_node(node)
    return original.numel() * original.element_size() - table.nbytes


def _decoded_scaled_rows(gm: fx.GraphModule, add: Callable[..., fx.Node], node: fx.Node, codes: fx.Node,
                         table: QuantizedTable, ids: Any, rest: tuple[Any, ...], dtype: torch.dtype) -> fx.Node:
    """The float rows of an int8 or 4-bit table looked up by ``ids``: codes times scales (plus offsets)."""
    graph = gm.graph
    scales = register_constant(gm, f"{node.name}_{'row' if table.bits == 8 else 'group'}_scale",
                               table.scales.reshape(-1, 1) if table.bits == 8 else table.scales, before=node)
    offsets = (register_constant(gm, f"{node.name}_group_offset", table.offsets, before=node)
               if table.offsets is not None else None)
    columns = (register_constant(gm, f"{node.name}_column_group", _column_groups(table.shape[1], table.group),
                                 before=node) if offsets is not None else None)
    with graph.inserting_before(node):
        rows = add(aten.embedding.default, codes, ids, *rest)
        if offsets is None:
            row_scales = add(aten.embedding.default, scales, ids, *rest)
            scaled = add(aten.mul.Tensor, add(aten._to_copy.default, rows, dtype=dtype), row_scales)
        else:
            # unpacked in float arithmetic, exact for bytes (ONNX's BitShift is not in every runtime's type set)
            as_float = add(aten._to_copy.default, rows, dtype=dtype)
            high = add(aten.floor.default, add(aten.mul.Tensor, as_float, 1 / 16))
            low = add(aten.sub.Tensor, as_float, add(aten.mul.Tensor, high, 16))
            values = add(aten.cat.default, [low, high], -1)
            spread = [add(aten._to_copy.default,
                          add(aten.index_select.default, add(aten.embedding.default, part, ids, *rest), -1, columns),
                          dtype=dtype) for part in (scales, offsets)]
            scaled = add(aten.add.Tensor, add(aten.mul.Tensor, values, spread[0]), spread[1])
    return scaled


def _decoded_codebook_rows(gm: fx.GraphModule, add: Callable[..., fx.Node], node: fx.Node, codes: fx.Node,
                           table: QuantizedTable, ids: Any, rest: tuple[Any, ...], dtype: torch.dtype) -> fx.Node:
    """The float rows of a 3-bit table looked up by ``ids``: planes to indices, indices to codebook values.

    Arithmetic, ``index_select`` and ``unsqueeze`` on the last dims only (no shape written down),
    exact in float (bytes are integers below 256).
    """
    codebooks = register_constant(gm, f"{node.name}_row_codebook", table.scales, before=node)
    per_plane = table.shape[1] // 8
    columns = torch.arange(table.shape[1])
    index = (columns // per_plane) * 3 * per_plane + columns % per_plane  # column k·D/8 + j in plane 0
    wheres = [register_constant(gm, f"{node.name}_plane{plane}_columns", index + plane * per_plane, before=node)
              for plane in range(3)]
    levels = register_constant(gm, f"{node.name}_levels", torch.arange(CODEBOOK_SIZE, dtype=dtype), before=node)
    with gm.graph.inserting_before(node):
        planes = add(aten._to_copy.default, add(aten.embedding.default, codes, ids, *rest), dtype=dtype)  # [..., 3·D/8]
        bits = []
        for k in range(8):  # bit k of each byte: floor(b / 2^k) - 2 * floor(b / 2^(k + 1))
            shifted = add(aten.floor.default, add(aten.mul.Tensor, planes, 1.0 / 2 ** k))
            higher = add(aten.floor.default, add(aten.mul.Tensor, planes, 1.0 / 2 ** (k + 1)))
            bits.append(add(aten.sub.Tensor, shifted, add(aten.mul.Tensor, higher, 2.0)))
        every = add(aten.cat.default, bits, -1)  # [..., 3·D]: bit k, then plane p, then byte j
        indices = None
        for where, weight in zip(wheres, (1.0, 2.0, 4.0), strict=True):
            bit = add(aten.index_select.default, every, -1, where)
            term = bit if weight == 1.0 else add(aten.mul.Tensor, bit, weight)
            indices = term if indices is None else add(aten.add.Tensor, indices, term)
        chosen = add(aten._to_copy.default, add(aten.eq.Tensor, add(aten.unsqueeze.default, indices, -1), levels),
                     dtype=dtype)  # [..., D, 8]: one-hot of each column's index
        values = add(aten._to_copy.default, add(aten.embedding.default, codebooks, ids, *rest), dtype=dtype)
        return add(aten.sum.dim_IntList, add(aten.mul.Tensor, chosen, add(aten.unsqueeze.default, values, -2)), [-1])


def plan_embeddings(gm: fx.GraphModule, bits: int = 8, group: int = INT4_GROUP) -> dict[str, QuantizedTable]:
    """The stored form of every constant embedding table of ``gm``, by node name.

    ``bits=4`` packs tables whose width ``group`` divides (and is even) in 4 bits, ``bits=3``
    tables whose width 8 divides in 3-bit codebooks; the others are int8.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    planned = {}
    for name in embedding_sites(gm):
        table = attribute_value(gm, nodes[name].args[0])
        if bits == 3 and table.shape[1] % 8 == 0 and table.shape[0] > CODEBOOK_SIZE:
            planned[name] = quantize_table_codebook(table)
        elif bits == 4 and table.shape[1] % group == 0 and table.shape[1] % 2 == 0:
            planned[name] = quantize_table_int4(table, group)
        else:
            planned[name] = QuantizedTable(*quantize_weight(table, per_channel=True, axis=0))
    return planned


def quantize_embeddings(gm: fx.GraphModule, planned: dict[str, QuantizedTable],
                        nodes: dict[str, fx.Node], skip: frozenset[str]) -> tuple[int, int]:
    """Apply the planned tables not in ``skip``; returns (tables quantized, bytes saved)."""
    tables = [name for name in planned if name not in skip and name in nodes]
    saved = sum(quantize_embedding(gm, nodes[name], planned[name]) for name in tables)
    return len(tables), saved


def embedding_units(gm: fx.GraphModule, nodes: dict[str, fx.Node], skipped: SkipList,
                    units: list[LossyUnit], bits: int = 8) -> dict[str, QuantizedTable]:
    """Plan embedding tables in ``bits`` (weight-only) and add one unit per table to ``units``."""
    tables = {name: value for name, value in plan_embeddings(gm, bits).items() if nodes[name] not in skipped}
    for name, table in tables.items():
        units.append(LossyUnit(name, "embedding", table.scheme,
                               {"module": module_path(nodes[name]), "weight_shape": table.shape}))
    return tables
