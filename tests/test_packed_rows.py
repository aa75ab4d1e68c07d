"""The cpu lowering's packed rows: an encoder fed a token mask skips its padded rows, exactly."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.bench.zoo import MeanPooledEmbedding
from graphopt.ir.graph import count_ops
from graphopt.passes.quantize import Quantize
from graphopt.targets.cpu.lowering import CpuLowering
from graphopt.targets.cpu.packed_attention import PACKED_ATTENTION, PACKED_LAYOUT
from graphopt.targets.cpu.packed_rows import PACK_ROWS, ROW_INDEX, UNPACK_ROWS
from graphopt.targets.cpu.target import CpuTarget

transformers = pytest.importorskip("transformers")


class EveryToken(nn.Module):
    """The encoder's state of every token, padded ones included."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state


class FirstTokenClassifier(nn.Module):
    """A classifier reading the first token's state (BERT's pooler on ``[CLS]``)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(32, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.head(torch.tanh(hidden[:, 0]))


class TinyEncoder(nn.Module):
    """One attention block written by hand, its mask additive (``(1 - mask) * -1e9``) or absent."""

    def __init__(self, masked: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.position = nn.Parameter(torch.randn(1, 16, 32) * 0.1)
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)
        self.masked = masked

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position
        q, k, v = (t.view(*ids.shape, 4, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        bias = (1.0 - mask[:, None, None, :].float()) * -1e9 if self.masked else None
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(x.shape)
        x = self.norm(x + self.out(attended))
        weights = mask.unsqueeze(-1).float()
        return (x * weights).sum(1) / weights.sum(1)


def _bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def _batch(lengths: list[int], length: int = 16, left: bool = False, vocab: int = 50,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask ``[len(lengths), length]``, each row ``lengths[b]`` tokens, padded right (or left)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), length), generator=generator)
    mask = torch.zeros(len(lengths), length, dtype=torch.int64)
    for row, count in enumerate(lengths):
        if left:
            mask[row, length - count:] = 1
        else:
            mask[row, :count] = 1
    return ids * mask, mask


def test_row_ops_gather_broadcast_values_and_scatter_zeros() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]])  # 4 kept tokens: as many as the sequence is long
    batch, seq = ROW_INDEX(mask, [])
    assert batch.tolist() == [0, 0, 1, 1] and seq.tolist() == [0, 1, 1, 2]
    positions = torch.arange(8.0).view(1, 4, 2)  # one row of position vectors, read per token
    assert PACK_ROWS(positions, batch, seq, mask).tolist() == [[0, 1], [2, 3], [2, 3], [4, 5]]
    values = torch.arange(1.0, 9.0).view(4, 2)
    full = UNPACK_ROWS(values, batch, seq, mask, False)
    assert full.shape == (2, 4, 2) and full[0, 2:].eq(0).all() and full[1, 1].tolist() == [5, 6]
    assert torch.equal(PACK_ROWS(full, batch, seq, mask), values)
    batch, seq = ROW_INDEX(mask, [0])  # position 0 read by index: kept in every row
    assert seq.tolist() == [0, 1, 0, 1, 2]
    every = torch.ones(2, 4, dtype=torch.int64)
    batch, seq = ROW_INDEX(every, [])
    rows = torch.randn(2, 4, 3)
    assert torch.equal(UNPACK_ROWS(PACK_ROWS(rows, batch, seq, every), batch, seq, every, False), rows)


@pytest.mark.parametrize(("lengths", "left", "positions", "kv_heads", "additive"), [
    ([5, 12, 3, 16], False, [], 4, False),  # right padding, boolean mask
    ([5, 12, 3, 16], True, [0], 4, False),  # left padding; position 0 kept in every row but masked as a key
    ([5, 0, 3, 16], False, [], 2, True),  # a row without tokens (kept whole), grouped key/value heads, additive
    ([16, 16, 16, 16], False, [], 4, True),  # every token kept: torch's attention on views
])
def test_packed_attention_matches_torch_on_the_kept_queries(lengths: list[int], left: bool, positions: list[int],
                                                            kv_heads: int, additive: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    _, tokens = _batch(lengths, left=left)
    query = torch.randn(4, 16, 4, 8, generator=generator)
    key, value = (torch.randn(4, 16, kv_heads, 8, generator=generator) for _ in range(2))
    # padded keys masked, and some other keys per head; every query still sees itself, as in real masks
    mask = tokens.bool()[:, None, None, :] & ((torch.rand(1, 4, 16, 16, generator=generator) > 0.3) | torch.eye(16,
                                                                                                          dtype=torch.bool))
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    expected = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                              attn_mask=mask, scale=0.3, enable_gqa=kv_heads != 4).transpose(1, 2)
    batch, seq = ROW_INDEX(tokens, positions)
    slot, compact_mask, plan = PACKED_LAYOUT(mask, batch, seq, tokens, torch.float32)
    actual = PACKED_ATTENTION(query[batch, seq], key[batch, seq], value[batch, seq], mask, batch, slot, compact_mask,
                              plan, tokens, 0.3)
    torch.testing.assert_close(actual, expected[batch, seq], atol=2e-6, rtol=1e-5)


def _record(fast: graphopt.OptimizedModel) -> graphopt.PassRecord:
    return next(r for r in fast.runner.records if r.name == "packed-rows")


def test_mean_pooled_bert_runs_its_linears_on_kept_tokens_only() -> None:
    model = MeanPooledEmbedding(_bert())
    example = _batch([5, 12, 3, 16])
    fast = graphopt.optimize(model, example, target=CpuTarget())
    record = _record(fast)
    assert record.status == "changed" and record.stats["ops_on_kept_rows"] > 20
    lowered = count_ops(fast.runner.graph_module)
    assert lowered["graphopt_cpu.row_index.default"] == 1
    # attention among each sentence's kept tokens: no scatter back to [batch, seq, ...] for it
    assert lowered["graphopt_cpu.packed_attention.default"] == 2
    assert lowered["graphopt_cpu.packed_layout.default"] == 1  # one layout for both layers
    assert "aten.scaled_dot_product_attention.default" not in lowered
    assert "graphopt_cpu.attention.default" not in lowered
    # what still scatters: the pooling's sum over the sequence, of hidden * mask and of the mask
    assert lowered["graphopt_cpu.unpack_rows.default"] == 2
    # every linear reads packed rows: [N, hidden], not [batch, seq, hidden]
    linears = [n for n in fast.runner.graph_module.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert linears and all(n.all_input_nodes[0].meta["val"].dim() == 2 for n in linears)
    padded = graphopt.optimize(model, example, target=CpuTarget(CpuLowering(pack_rows=False)))
    for inputs in (example, _batch([1, 2, 16, 7], seed=1), _batch([16] * 4, seed=2), _batch([4, 9, 2, 11], left=True)):
        expected = model(*inputs)
        torch.testing.assert_close(fast(*inputs), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fast(*inputs), padded(*inputs), atol=1e-6, rtol=1e-5)


def _family(name: str) -> nn.Module:
    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
             "vocab_size": 100, "max_position_embeddings": 64}
    if name == "roberta":  # positions counted along the sequence from the ids (cumsum)
        return transformers.RobertaModel(transformers.RobertaConfig(**small, pad_token_id=0), add_pooling_layer=False)
    if name == "mpnet":  # relative-position bias on the mask; heads back to tokens by permute
        return transformers.MPNetModel(transformers.MPNetConfig(**small), add_pooling_layer=False)
    if name == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
        return transformers.DistilBertModel(config)
    # T5: relative-position bias where the mask keeps a key, finfo.min where it does not
    return transformers.T5EncoderModel(transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                             vocab_size=100))


@pytest.mark.parametrize("family", ["roberta", "distilbert", "mpnet", "t5"])
def test_other_encoder_families_pack_their_rows(family: str) -> None:
    model = MeanPooledEmbedding(_family(family).eval()).eval()
    fast = graphopt.optimize(model, _batch([5, 12, 3, 16]), target=CpuTarget())
    assert _record(fast).status == "changed"
    assert next(r for r in fast.runner.records if r.name == "packed-attention").stats["attention"] == 2
    for inputs in (_batch([2, 16, 9, 4], seed=3), _batch([7, 1, 16, 16], left=True, seed=5)):
        torch.testing.assert_close(fast(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("embedding_bits", [8, 4, 3])
def test_static_int8_encoder_packs_rows_and_keeps_its_outputs(embedding_bits: int) -> None:
    """int8 linears and embedding tables (4 bits: nibbles unpacked and joined by ``cat``; 3 bits: bit planes
    selected by ``index_select``, indices compared with the codebook's) on kept rows."""
    model = MeanPooledEmbedding(_bert())
    example = _batch([5, 12, 3, 16])
    calibration = [_batch([6, 10, 16, 2], seed=s) for s in range(4)]
    scheme = Quantize("int8", embedding_bits=embedding_bits)
    fast = graphopt.optimize(model, example, target=CpuTarget(), quantize=scheme, calibration=calibration)
    padded = graphopt.optimize(model, example, target=CpuTarget(CpuLowering(pack_rows=False)), quantize=scheme,
                               calibration=calibration)
    assert any(f"_table_int{embedding_bits}" in name for name in fast.graph_module.state_dict())  # kept
    assert count_ops(fast.runner)["graphopt_cpu.row_index.default"] == 1  # the int8 lowering packs too
    assert "graphopt_cpu.row_index.default" not in count_ops(padded.runner)
    for inputs in (example, _batch([1, 2, 16, 7], seed=1)):
        # the same int8 arithmetic per kept token: at most a last-bit difference, rounded by the next quantization
        cosine = F.cosine_similarity(fast(*inputs), padded(*inputs), dim=-1)
        assert cosine.min() > 0.9999


def test_dynamic_int8_takes_each_scale_over_the_kept_rows() -> None:
    """Dynamic int8's per-tensor scales come from the words, not from the padding: closer to eager, and packed."""
    model = MeanPooledEmbedding(_bert())
    example = _batch([5, 12, 3, 16])
    fast = graphopt.optimize(model, example, target=CpuTarget(), quantize="int8-dynamic")
    padded = graphopt.optimize(model, example, target=CpuTarget(CpuLowering(pack_rows=False)), quantize="int8-dynamic")
    # one scale per dynamic linear (Q/K/V merged, the attention output, the two FFN linears; 2 layers)
    assert re.search(r"packed-rows +changed .*scales_on_kept_rows=8\b", str(fast.report))
    assert count_ops(fast.runner)["graphopt_cpu.row_index.default"] == 1
    linears = [n for n in fast.runner.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert len(linears) == 8 and all(n.all_input_nodes[0].meta["val"].dim() == 2 for n in linears)
    assert "graphopt_cpu.row_index.default" not in count_ops(padded.runner)
    for inputs in (example, _batch([1, 2, 16, 7], seed=1), _batch([4, 9, 2, 11], left=True, seed=2)):
        expected = model(*inputs)
        ours, theirs = (F.cosine_similarity(m(*inputs), expected, dim=-1) for m in (fast, padded))
        assert ours.min() > 0.99 and ours.mean() >= theirs.mean() - 1e-3
    # nothing padded: the same rows, the same scales, the same arithmetic as the padded lowering
    full = _batch([16] * 4, seed=3)
    assert F.cosine_similarity(fast(*full), padded(*full), dim=-1).min() > 0.99999


def test_first_token_classifier_keeps_that_token_in_every_row() -> None:
    """Left padding puts a pad at position 0 of some rows: the model's value there is still what it reads."""
    model = FirstTokenClassifier(_bert()).eval()
    fast = graphopt.optimize(model, _batch([5, 12, 3, 16], left=True), target=CpuTarget())
    assert _record(fast).status == "changed"
    [index] = [n for n in fast.runner.graph_module.graph.nodes if n.target is ROW_INDEX]
    assert index.args[1] == [0]
    # a row without any token is computed whole, as the model computes it
    for inputs in (_batch([2, 16, 9, 4], left=True, seed=3), _batch([2, 16, 9, 4], seed=4),
                   _batch([0, 16, 9, 4], left=True, seed=5)):
        torch.testing.assert_close(fast(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)


def test_dynamic_batch_packs_any_batch() -> None:
    model = MeanPooledEmbedding(_bert())
    fast = graphopt.optimize(model, _batch([5, 12, 3, 16]), target=CpuTarget(), dynamic_batch=True)
    assert _record(fast).status == "changed"
    for lengths in ([7], [3, 16, 1, 9, 12, 2]):
        inputs = _batch(lengths, seed=len(lengths))
        torch.testing.assert_close(fast(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)


def test_additive_mask_written_by_hand_is_proven_blocking() -> None:
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    fast = graphopt.optimize(model, _batch([5, 12, 3, 16]), target=CpuTarget())
    assert _record(fast).status == "changed"
    inputs = _batch([2, 16, 9, 4], seed=3)
    torch.testing.assert_close(fast(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("model", "reason"), [
    (EveryToken(_bert()), "an output keeps every token's rows"),
    (TinyEncoder(masked=False), "reads padded keys its mask does not block"),
])
def test_models_that_read_padded_rows_are_left_padded(model: nn.Module, reason: str) -> None:
    """Outputs per token, or attention over unmasked padding: zeros in the padded rows would change them."""
    model.eval()
    fast = graphopt.optimize(model, _batch([5, 12, 3, 16]), target=CpuTarget())
    record = _record(fast)
    assert record.status == "unchanged"
    assert any(reason in why for why in record.near_misses["packed-rows"])
    assert "graphopt_cpu.row_index.default" not in count_ops(fast.runner.graph_module)
    inputs = _batch([2, 16, 9, 4], seed=3)
    torch.testing.assert_close(fast(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)
