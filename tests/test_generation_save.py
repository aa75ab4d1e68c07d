"""Saving and loading a generation model: ``GenerativeModel.save`` and ``graphopt.load``.

One tiny random Llama is optimized for the CPU and saved once per module; the saved file is
loaded in a fresh process (tokens identical to transformers' greedy ``generate``), in this one
for another target, and with batch sizes it does not hold. Broken files keep the errors
``graphopt.load`` gives for any save.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

import graphopt
from graphopt.errors import InputError, SaveFileError
from graphopt.targets.cpu.target import CpuTarget
from graphopt.workflows.generation import GenerativeModel

VOCAB = 128
MAX_CACHE_LEN = 32
PROMPT_LENGTH = 7
NEW_TOKENS = 16
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    lm.generation_config.eos_token_id = None  # random weights: set below to a token the model does produce
    return lm


def prompt(batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, PROMPT_LENGTH), generator=torch.Generator().manual_seed(seed))


def reference(lm: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """transformers' greedy generate (eos and pad from the model's generation_config)."""
    with torch.no_grad():
        return lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Llama with an eos it produces mid-generation, optimized for cpu and saved at ``lm.pt2``."""
    lm, ids = tiny_llama(), prompt()
    free = reference(lm, ids)  # no eos yet: all NEW_TOKENS tokens
    new = free[0, PROMPT_LENGTH:].tolist()
    eos = max(set(new), key=new.index)  # the new token that first appears last
    lm.generation_config.eos_token_id, lm.generation_config.pad_token_id = eos, 0
    stopped = reference(lm, ids)
    assert stopped.shape[1] == PROMPT_LENGTH + new.index(eos) + 1 < free.shape[1]
    # the steps kept in PyTorch (the cpu default for generation runs them in onnxruntime, which the
    # fresh-process test below loads them with): in-place cache writes and cached attention must come back
    fast = graphopt.optimize(lm, (ids,), target="cpu", lowering=graphopt.CpuLowering(), max_cache_len=MAX_CACHE_LEN)
    path = fast.save(tmp_path_factory.mktemp("generation") / "lm.pt2")
    return {"lm": lm, "ids": ids, "fast": fast, "path": path, "free": free, "stopped": stopped, "eos": eos}


@pytest.fixture(scope="module")
def loaded(saved: dict[str, Any]) -> GenerativeModel:
    model = graphopt.load(saved["path"], target=CpuTarget(graphopt.CpuLowering()))
    assert isinstance(model, GenerativeModel)
    return model


def run_in_fresh_process(code: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# --- the round trip -------------------------------------------------------------------------------------------------


def test_loaded_in_a_fresh_process_generates_the_same_tokens(saved: dict[str, Any]) -> None:
    path, ids = saved["path"], saved["ids"]
    torch.save({"ids": ids}, path.parent / "prompt.pt")
    out = run_in_fresh_process(f"""
        import json, torch, graphopt
        model = graphopt.load({path.name!r})
        ids = torch.load("prompt.pt")["ids"]
        print(json.dumps({{
            "type": type(model).__name__, "target": model.target.name, "batch_sizes": model.batch_sizes,
            "max_cache_len": model.max_cache_len, "eos": model.eos_token_id, "pad": model.pad_token_id,
            "stopped": model.generate(ids, max_new_tokens={NEW_TOKENS}).tolist(),
            "free": model.generate(ids, max_new_tokens={NEW_TOKENS}, eos_token_id=[]).tolist(),
        }}))
    """, path.parent)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["type"] == "GenerativeModel" and result["target"] == "cpu"
    assert result["batch_sizes"] == [1] and result["max_cache_len"] == MAX_CACHE_LEN
    assert (result["eos"], result["pad"]) == (saved["eos"], 0)
    assert result["stopped"] == saved["stopped"].tolist()  # eos from the saved defaults, as transformers stops
    assert result["free"] == saved["free"].tolist()
    assert result["free"] == saved["fast"].generate(ids, max_new_tokens=NEW_TOKENS, eos_token_id=[]).tolist()


def test_loaded_steps_are_lowered_like_a_fresh_build(saved: dict[str, Any], loaded: GenerativeModel) -> None:
    def ops(model: GenerativeModel) -> collections.Counter:
        graph = model.steps_for(1).steps._prefill.graph_module.graph
        return collections.Counter(str(n.target) for n in graph.nodes if n.op == "call_function")

    assert ops(loaded) == ops(saved["fast"])  # the state marks came back: in-place cache writes, cached attention
    assert ops(loaded)["aten.index_copy_.default"] > 0
    assert any("checked against the saved step graph" in note for note in loaded.report.notes)


def test_loaded_forward_and_export_onnx(saved: dict[str, Any], loaded: GenerativeModel, tmp_path: Path) -> None:
    ids = saved["ids"]
    assert torch.equal(loaded(ids), saved["fast"](ids))
    path = loaded.export_onnx(tmp_path / "model.onnx")
    sidecar = json.loads((tmp_path / "model.genai.json").read_text())
    assert path.is_file()
    assert (sidecar["max_cache_len"], sidecar["batch_size"], sidecar["eos_token_id"]) == (MAX_CACHE_LEN, 1,
                                                                                       saved["eos"])
    assert [s["past"] for s in sidecar["state"][:3]] == [f"past_key_values.0.{f}" for f in ("key", "value", "length")]


def test_target_override_to_onnx_gives_the_same_tokens(saved: dict[str, Any]) -> None:
    model = graphopt.load(saved["path"], target="onnx")
    assert isinstance(model, GenerativeModel) and model.target.name == "onnx"
    layers = CONFIG["num_hidden_layers"]
    assert model.steps_for(1).steps._decode.in_place == [True, True, False] + [True, True] * (layers - 1)
    assert model.generate(saved["ids"], max_new_tokens=NEW_TOKENS).tolist() == saved["stopped"].tolist()


def test_every_built_batch_size_is_saved(saved: dict[str, Any], tmp_path: Path) -> None:
    fast, two = saved["fast"], prompt(batch=2, seed=3)
    expected = fast.generate(two, max_new_tokens=6, eos_token_id=[])  # builds the steps for 2 rows
    path = fast.save(tmp_path / "lm.pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.batch2.pt2", "lm.pt2"]
    model = graphopt.load(path)
    assert model.batch_sizes == [1, 2]
    assert torch.equal(model.generate(two, max_new_tokens=6, eos_token_id=[]), expected)
    (tmp_path / "lm.batch2.pt2").unlink()
    with pytest.raises(SaveFileError, match=r"lm\.pt2 keeps the steps for batch size 2 in lm\.batch2\.pt2, which is "
                                            r"missing"):
        graphopt.load(path)


# --- errors ---------------------------------------------------------------------------------------------------------


def test_unsaved_batch_size_raises_input_error(saved: dict[str, Any], loaded: GenerativeModel) -> None:
    three = prompt(batch=3)
    message = r"no steps for a batch of 3 rows: .*lm\.pt2 holds the steps for batch size\(s\) 1 only.*" \
              r"Generate with a batch of 3 rows before saving, or optimize the model again"
    with pytest.raises(InputError, match=message):
        loaded.generate(three, max_new_tokens=2)
    with pytest.raises(InputError, match=message):
        loaded(three)
    assert loaded.batch_sizes == [1]


def test_truncated_and_garbage_generation_files_keep_the_save_errors(saved: dict[str, Any], tmp_path: Path) -> None:
    data = saved["path"].read_bytes()
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(SaveFileError, match=r"truncated\.pt2.*(truncated or corrupt|could not be read)"):
        graphopt.load(truncated)
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip archive at all" * 10)
    with pytest.raises(SaveFileError, match=r"garbage\.pt2 is truncated or corrupt"):
        graphopt.load(garbage)
    with pytest.raises(SaveFileError, match=r"missing\.pt2: no such file"):
        graphopt.load(tmp_path / "missing.pt2")


def test_incomplete_generation_metadata_is_named(saved: dict[str, Any], tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt2"
    with zipfile.ZipFile(saved["path"]) as source, zipfile.ZipFile(broken, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("graphopt.json"):
                metadata = json.loads(data)
                del metadata["generation"]["max_cache_len"]
                data = json.dumps(metadata).encode()
            target.writestr(item, data)
    with pytest.raises(SaveFileError, match=r"broken\.pt2: the generation metadata is incomplete"):
        graphopt.load(broken)


def test_a_one_shot_save_still_loads_as_an_optimized_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    x = torch.randn(2, 8)
    path = graphopt.optimize(model, (x,), target="cpu").save(tmp_path / "mlp.pt2")
    back = graphopt.load(path)
    assert isinstance(back, graphopt.OptimizedModel)
    torch.testing.assert_close(back(x), model(x))
