"""Partitioned generation: a causal LM split into stages that each keep their layers' cache.

A random-weight 4-layer Llama is split into 2 (and 4) stages; the stages generate, in one process
and as a torchrun pipeline on gloo, the tokens transformers' ``generate`` gives. The split keeps
every cache in one stage (only activations cross a cut), a memory cap below the model's size
places it on two devices, and bad input gets graphopt errors.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from test_generation import FAMILIES
from test_generation import prompt as family_prompt
from test_generation import reference as family_reference
from test_generation import tiny_lm as family_lm

import graphopt
from graphopt.analysis.balanced_split import PartitionError
from graphopt.cli.main import main as cli_main
from graphopt.errors import InputError
from graphopt.workflows.generation import PartitionedGenerator

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 128
MAX_CACHE_LEN = 48
NEW_TOKENS = 20
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
GENERATE_COMMAND = ("torchrun --nproc-per-node {nproc} --master-port {port} -m graphopt.pipeline {stages} --generate "
                    "--inputs {inputs} --max-new-tokens {new} --eos-token-id --output {output}")
"""The command docs/partitioning.md shows for generation (``--eos-token-id`` alone: never stop early)."""


def tiny_llama(tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG, tie_word_embeddings=tied)).eval()
    lm.generation_config.eos_token_id = None  # random weights: no eos unless a test asks for one
    return lm


def prompts(batch: int, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference(lm: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return lm.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                           max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def lm() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def two_stages(lm: torch.nn.Module) -> PartitionedGenerator:
    return graphopt.partition(lm, (prompts(2),), stages=2, max_cache_len=MAX_CACHE_LEN, repeats=3)


def test_two_stages_generate_what_transformers_generates(lm, two_stages) -> None:
    ids = prompts(2)
    assert (two_stages.rows, two_stages.microbatches) == (1, 2)  # a micro-batch per stage
    assert torch.equal(two_stages.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[]), reference(lm, ids))


def test_each_stage_keeps_its_own_layers_cache(two_stages) -> None:
    held = two_stages.held
    assert sorted(i for h in held for i in h) == list(range(len(two_stages.state)))  # every state in one stage
    layers = [{int(two_stages.state[i].name.split("_")[1]) for i in h} for h in held]
    # contiguous layers, in order; a measured (balance="time") cut may fall inside the layer at the boundary,
    # between its keys and its values, but each cache tensor stays whole in one stage (checked above)
    assert layers[0] and layers[1] and max(layers[0]) <= min(layers[1])
    assert len(layers[0] & layers[1]) <= 1
    report = two_stages.report
    assert all(stage.state_bytes > 0 for stage in report.stages)
    # only activations cross the cut: a decode step sends a small part of the model's cache (a measured cut can
    # leave stage 0 a layer and a half of it, so the bound is the whole cache, not stage 0's share)
    assert 0 < report.cut_bytes[0] < sum(stage.state_bytes for stage in report.stages) / 4
    assert any(note.startswith("stage 1 keeps the cache of layers") for note in report.notes)


def test_report_predicts_pipelined_decode_throughput(two_stages) -> None:
    prediction = two_stages.report.throughput
    assert prediction.microbatches == 2 and prediction.batch == 2
    stage_seconds = [s.seconds for s in two_stages.report.stages]
    assert prediction.stage_seconds == stage_seconds
    assert prediction.step_seconds > sum(stage_seconds)  # the second micro-batch and the link come on top
    section = next(s for s in two_stages.report.sections if s.title == "Pipeline stages")
    assert "state MiB" in section.headers


def test_cli_partitions_a_language_model(tmp_path, capsys) -> None:
    source = tmp_path / "models.py"
    source.write_text(
        "import torch, transformers\n"
        "def build():\n"
        f"    config = transformers.LlamaConfig(**{CONFIG!r})\n"
        "    return transformers.LlamaForCausalLM(config).eval(), (torch.randint(3, 100, (2, 6)),)\n"
    )
    status = cli_main(["partition", f"{source}:build", "--stages", "2", "--balance", "flops",
                       "-o", str(tmp_path / "stages"), "--report", str(tmp_path / "report.html")])
    assert status == 0
    out = capsys.readouterr().out
    assert "--generate --inputs" in out and "prompt_ids.pt" in out
    assert json.loads((tmp_path / "stages" / "manifest.json").read_text())["generation"]["rows"] == 1
    assert "Pipeline stages" in (tmp_path / "report.html").read_text()


def test_four_stages_and_left_padded_batch(lm) -> None:
    ids = prompts(4, length=9, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[3, :5] = 0
    ids[mask == 0] = 0
    parts = graphopt.partition(lm, (ids,), stages=4, max_cache_len=MAX_CACHE_LEN, balance="flops")
    assert len(parts.stages) == 4 and all(parts.held)
    out = parts.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert torch.equal(out, reference(lm, ids, mask))


FAMILY_CASES = [pytest.param(family, id=family, marks=() if family in ("gpt2", "gemma3") else pytest.mark.slow)
                for family in FAMILIES]


@pytest.mark.parametrize("family", FAMILY_CASES)
def test_decoder_families_split_and_generate_what_transformers_generates(family: str) -> None:
    lm = family_lm(family)  # gemma3: sliding-window layers; gpt2: learned positions, fused qkv
    ids = family_prompt(7, 2)
    parts = graphopt.partition(lm, (ids,), stages=2, max_cache_len=MAX_CACHE_LEN, balance="flops")
    assert all(parts.held)
    expected = family_reference(lm, ids, max_new_tokens=NEW_TOKENS)
    assert torch.equal(parts.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[]), expected)


def test_eos_and_cache_limit(lm, two_stages) -> None:
    ids = prompts(2)
    free = two_stages.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    eos = int(free[0, ids.shape[1] + 3])
    stopped = two_stages.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    first = int((stopped[0, ids.shape[1]:] == eos).nonzero()[0])
    assert (stopped[0, ids.shape[1] + first + 1:] == 0).all()  # the finished row is padded
    with pytest.raises(InputError, match="max_cache_len"):
        two_stages.generate(ids, max_new_tokens=MAX_CACHE_LEN)


def test_memory_cap_places_a_model_too_big_for_one_device() -> None:
    lm = tiny_llama(tied=True)  # the tied embedding / LM head is held by the first and the last stage
    ids = prompts(1)
    whole = graphopt.partition(lm, (ids,), stages=1, max_cache_len=MAX_CACHE_LEN, balance="flops")
    size = whole.report.stages[0].memory_bytes
    cap = 0.75 * size
    parts = graphopt.partition(lm, (ids,), stages=2, max_cache_len=MAX_CACHE_LEN, balance="flops", memory_cap=cap)
    assert all(stage.memory_bytes <= cap for stage in parts.report.stages)
    assert all(stage.weight_bytes >= lm.model.embed_tokens.weight.nbytes for stage in parts.report.stages)
    assert torch.equal(parts.generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[]), reference(lm, ids))
    with pytest.raises(PartitionError, match="memory cap"):
        graphopt.partition(lm, (ids,), stages=2, max_cache_len=MAX_CACHE_LEN, balance="flops", memory_cap=0.3 * size)


def test_saved_stages_generate_in_a_fresh_process(lm, two_stages, tmp_path) -> None:
    directory = two_stages.save(tmp_path / "stages")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["generation"]["rows"] == 1 and [s["state"] for s in manifest["stages"]] == two_stages.held
    assert torch.equal(PartitionedGenerator.load(directory).example_ids, prompts(2))  # saved again, it keeps them
    expected = reference(lm, prompts(2))
    script = (f"import torch; from graphopt.workflows.generation import PartitionedGenerator\n"
              f"parts = PartitionedGenerator.load({str(directory)!r})\n"
              f"ids = torch.load({str(directory / 'prompt_ids.pt')!r})\n"
              f"torch.save(parts.generate(ids, max_new_tokens={NEW_TOKENS}, eos_token_id=[]), "
              f"{str(tmp_path / 'out.pt')!r})")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=240, env=_env(), cwd=ROOT)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def torchrun_generate(directory: Path, inputs: Path, output: Path, nproc: int, extra: list[str] | None = None
                      ) -> subprocess.CompletedProcess[str]:
    command = GENERATE_COMMAND.format(nproc=nproc, port=_free_port(), stages=directory, inputs=inputs,
                                      new=NEW_TOKENS, output=output).split()
    command = [sys.executable, "-m", "torch.distributed.run", *command[1:], *(extra or [])]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT)


def _ranks_generate_the_same_tokens(lm: torch.nn.Module, parts: PartitionedGenerator, ids: torch.Tensor,
                                    tmp_path: Path) -> dict:
    directory = parts.save(tmp_path / "stages")
    torch.save(ids, tmp_path / "ids.pt")
    result = torchrun_generate(directory, tmp_path / "ids.pt", tmp_path / "out.pt", len(parts.stages),
                               ["--timing", str(tmp_path / "timing.json")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), reference(lm, ids))
    return json.loads((tmp_path / "timing.json").read_text())


def test_two_ranks_on_gloo_generate_the_same_tokens(lm, two_stages, tmp_path) -> None:
    timing = _ranks_generate_the_same_tokens(lm, two_stages, prompts(2), tmp_path)
    assert timing["stages"] == 2 and timing["microbatches"] == 2
    assert len(timing["decode_step_seconds"]) == NEW_TOKENS - 1 and timing["decode_tokens_per_second"] > 0


@pytest.mark.slow
def test_four_ranks_on_gloo_generate_the_same_tokens(lm, tmp_path) -> None:
    ids = prompts(4, seed=5)
    parts = graphopt.partition(lm, (ids,), stages=4, max_cache_len=MAX_CACHE_LEN, balance="flops")
    timing = _ranks_generate_the_same_tokens(lm, parts, ids, tmp_path)
    assert timing["microbatches"] == 4


def test_stage_kinds_are_told_apart(two_stages, tmp_path) -> None:
    directory = two_stages.save(tmp_path / "stages")
    torch.save((prompts(2),), tmp_path / "in.pt")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "graphopt.pipeline", str(directory), "--inputs", str(tmp_path / "in.pt")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT)
    assert result.returncode != 0 and "run them with --generate" in result.stderr
    with pytest.raises(InputError, match="not of a generator"):
        PartitionedGenerator.load(graphopt.partition(torch.nn.Linear(4, 4), (torch.randn(2, 4),), stages=1,
                                                     balance="flops").save(tmp_path / "one_shot"))


@pytest.mark.parametrize("options, message", [
    ({"microbatches": 3}, "must divide the example batch"),
    ({"devices": ["cpu", "cpu"]}, "devices= is for one-shot models"),
    ({"example_kwargs": {"attention_mask": None}}, "drop example_kwargs"),
])
def test_bad_options_raise_input_error(lm, options, message) -> None:
    with pytest.raises(InputError, match=message):
        graphopt.partition(lm, (prompts(2),), stages=2, max_cache_len=MAX_CACHE_LEN, **options)


def test_batch_not_made_of_whole_micro_batches_raises_input_error(lm) -> None:
    parts = graphopt.partition(lm, (prompts(2),), stages=1, max_cache_len=MAX_CACHE_LEN, balance="flops")
    assert parts.rows == 2
    with pytest.raises(InputError, match="micro-batches of 2 row"):
        parts.generate(prompts(3), max_new_tokens=2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (one NCCL rank per GPU)")
def test_two_ranks_on_nccl_generate_the_same_tokens(lm, two_stages, tmp_path) -> None:
    timing = _ranks_generate_the_same_tokens(lm, two_stages, prompts(2), tmp_path)
    assert timing["stages"] == 2
