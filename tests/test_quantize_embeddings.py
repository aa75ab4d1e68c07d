"""Embedding tables stored in 8 or 4 bits by the int8 schemes: rows gathered as stored, dequantized after."""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.errors import InputError
from graphopt.passes.quantize.embedding import INT4_GROUP, quantize_table_int4


def test_int4_table_round_trips_within_half_a_step() -> None:
    torch.manual_seed(0)
    table = torch.randn(50, 64) * torch.linspace(0.1, 3.0, 64)  # columns of very different ranges
    table[7, :32] = 0.25  # a constant group (a zero range must not divide by zero)
    stored = quantize_table_int4(table)
    assert stored.codes.dtype == torch.uint8 and list(stored.codes.shape) == [50, 32]  # two codes a byte
    assert list(stored.scales.shape) == [50, 64 // INT4_GROUP] and stored.scales.dtype == torch.float16
    assert stored.shape == [50, 64] and stored.bits == 4
    assert stored.nbytes == 50 * 32 + 2 * 50 * 2 * 2  # codes + float16 scales and offsets
    error = (stored.dequantized() - table).abs()
    step = stored.scales.float().repeat_interleave(INT4_GROUP, dim=1)
    assert bool((error <= step * 0.5 + 1e-3 * table.abs()).all())  # round to nearest (float16 scales)
    assert float(error.max()) > 0  # it is lossy: 16 levels per group
    assert bool((stored.dequantized()[7, :32] == 0.25).all())


def test_three_bit_table_is_a_codebook_per_row() -> None:
    """8 values per row found by k-means; indices in three bit planes; a row of at most 8 values comes back exactly."""
    from graphopt.passes.quantize.embedding import pack_planes, quantize_table_codebook, unpack_planes

    torch.manual_seed(0)
    indices = torch.randint(0, 8, (6, 64), dtype=torch.uint8)
    assert torch.equal(unpack_planes(pack_planes(indices)), indices)
    table = torch.randn(50, 64)
    table[3] = torch.tensor([-1.0, 0.0, 0.5, 2.0]).repeat(16)  # four distinct values: representable exactly
    stored = quantize_table_codebook(table)
    assert stored.bits == 3 and stored.shape == [50, 64]
    assert stored.codes.dtype == torch.uint8 and list(stored.codes.shape) == [50, 24]  # 3 planes of 64 / 8 bytes
    assert list(stored.scales.shape) == [50, 8] and stored.scales.dtype == torch.float16
    assert stored.nbytes == 50 * 24 + 50 * 8 * 2
    restored = stored.dequantized()
    assert torch.equal(restored[3], table[3])
    # k-means beats a uniform 8-level grid over each row's range on Gaussian rows
    low, high = table.amin(1, keepdim=True), table.amax(1, keepdim=True)
    step = (high - low) / 7
    uniform = torch.round((table - low) / step) * step + low
    assert (restored - table).pow(2).mean() < 0.9 * (uniform - table).pow(2).mean()


def _bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=400)
    return transformers.BertModel(config).eval()


def _tokens(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 100 + length)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    return torch.randint(0, 400, (batch, length), generator=generator), mask


@pytest.mark.parametrize("target", ["cpu", "onnx"])
@pytest.mark.parametrize("scheme", [graphopt.Int8Dynamic, graphopt.Int8Static])
def test_four_bit_embeddings_shrink_the_table_and_keep_the_outputs(target: str, scheme: type, tmp_path) -> None:
    model = _bert()
    example = _tokens(4, 16)
    results = {}
    for bits in (8, 4):
        fast = graphopt.optimize(model, example, target, quantize=scheme(embedding_bits=bits),
                                 calibration=[example, _tokens(4, 16)], dynamic_batch=True)
        [record] = [r for r in fast.report.records if r.name.startswith("quantize")]
        assert record.stats["embeddings"] == 2  # word and token-type tables (the position lookup is folded)
        tables = {name: value for name, value in fast.graph_module.state_dict().items() if "_table_int" in name}
        with torch.no_grad():
            inputs = _tokens(3, 16)  # another batch size: no literal shape in the unpacking
            expected = model(*inputs).last_hidden_state
            actual = fast(*inputs)[0]
        cosine = torch.nn.functional.cosine_similarity(actual.flatten(1), expected.flatten(1)).min()
        results[bits] = (tables, float(cosine), record.stats["weight_bytes_saved"])
    int8_tables, int8_cosine, int8_saved = results[8]
    int4_tables, int4_cosine, int4_saved = results[4]
    [int8_table] = [t for t in int8_tables.values() if t.shape[0] == 400]  # the word embeddings
    [int4_table] = [t for t in int4_tables.values() if t.shape[0] == 400]
    assert int8_table.dtype == torch.int8 and list(int8_table.shape) == [400, 64]
    assert int4_table.dtype == torch.uint8 and list(int4_table.shape) == [400, 32]
    # per row of both tables (400 words, 2 token types): int8 keeps 64 codes + a float32 scale; 4 bits keep
    # 32 bytes + 2 groups x float16 scale and offset
    assert int4_saved - int8_saved == (400 + 2) * ((64 + 4) - (32 + 2 * 2 * 2))
    assert int8_cosine > 0.999 and int4_cosine > 0.995
    if target == "onnx":
        fast.export_onnx(tmp_path / "model.onnx")  # the 4-bit model: the table stays packed in the file
        import onnx

        initializers = {i.name: i for i in onnx.load(tmp_path / "model.onnx").graph.initializer}
        packed = [i for i in initializers.values() if list(i.dims) == [400, 32]]
        assert packed and packed[0].data_type == onnx.TensorProto.UINT8


@pytest.mark.parametrize("target", ["cpu", "onnx"])
def test_three_bit_embeddings_decode_in_the_graph_on_every_target(target: str, tmp_path) -> None:
    model = _bert()
    example = _tokens(4, 16)
    fast = graphopt.optimize(model, example, target, quantize=graphopt.Int8Dynamic(embedding_bits=3),
                             fidelity=graphopt.Fidelity(min_cosine=0.98), dynamic_batch=True)
    tables = {name: value for name, value in fast.graph_module.state_dict().items() if "_table_int3" in name}
    [word] = [t for t in tables.values() if t.shape[0] == 400]
    assert word.dtype == torch.uint8 and list(word.shape) == [400, 24]  # 64 columns: 3 planes of 8 bytes
    stored = {name: value for name, value in fast.graph_module.state_dict().items() if "row_codebook" in name}
    assert any(list(t.shape) == [400, 8] for t in stored.values())
    with torch.no_grad():
        inputs = _tokens(3, 16)  # another batch size: no literal shape in the decoding
        expected = model(*inputs).last_hidden_state
        actual = fast(*inputs)[0]
    assert torch.nn.functional.cosine_similarity(actual.flatten(1), expected.flatten(1)).min() > 0.98
    if target == "onnx":
        import onnx

        fast.export_onnx(tmp_path / "model.onnx")
        initializers = onnx.load(tmp_path / "model.onnx").graph.initializer
        assert any(list(i.dims) == [400, 24] and i.data_type == onnx.TensorProto.UINT8 for i in initializers)


def test_embedding_bits_must_be_eight_four_or_three() -> None:
    with pytest.raises(InputError, match=r"embedding_bits=\.\.\.\) must be 8, 4 or 3, got 2"):
        graphopt.Int8Dynamic(embedding_bits=2)
    with pytest.raises(InputError, match="must be 8, 4 or 3"):
        graphopt.Int8Static(embedding_bits=True)
