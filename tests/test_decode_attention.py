"""``graphopt.DecodeAttention`` (``graphopt.targets.onnx.decode_attention``) against ``GroupQueryAttention``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import graphopt
from graphopt.targets.onnx.decode_attention import decode_attention_nodes, decode_attention_while, use_decode_attention
from graphopt.targets.onnx.native_kernels import native_int4_library

LIBRARY = native_int4_library()
needs_library = pytest.mark.skipif(LIBRARY.path is None, reason=f"graphopt's kernels cannot run here: {LIBRARY.reason}")
FLOAT, INT32, INT64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64


def _gqa_model(batch: int, heads: int, kv_heads: int, head_size: int, cache: int, positions: int, *, packed: bool,
               rotary: bool, bias: bool, seq: int | str = 1, **attributes: object) -> onnx.ModelProto:
    """One ``GroupQueryAttention`` over a ``[batch, kv_heads, cache, head_size]`` cache, its inputs graph inputs."""
    width = (heads + 2 * kv_heads) * head_size if packed else heads * head_size
    inputs = [helper.make_tensor_value_info("query", FLOAT, [batch, seq, width])]
    if not packed:
        inputs += [helper.make_tensor_value_info(name, FLOAT, [batch, seq, kv_heads * head_size])
                   for name in ("key", "value")]
    inputs += [helper.make_tensor_value_info(name, FLOAT, [batch, kv_heads, cache, head_size])
               for name in ("past_key", "past_value")]
    inputs += [helper.make_tensor_value_info("seqlens_k", INT32, [batch]),
               helper.make_tensor_value_info("total", INT32, [])]
    if rotary:
        inputs += [helper.make_tensor_value_info(name, FLOAT, [positions, head_size // 2]) for name in ("cos", "sin")]
        inputs.append(helper.make_tensor_value_info("position_ids", INT64, [batch, seq]))
    if bias:
        inputs.append(helper.make_tensor_value_info("bias", FLOAT, [batch, 1, seq, "total"]))
    names = ["query", "" if packed else "key", "" if packed else "value", "past_key", "past_value", "seqlens_k",
             "total", "cos" if rotary else "", "sin" if rotary else "", "position_ids" if rotary else "",
             "bias" if bias else ""]
    node = helper.make_node("GroupQueryAttention", names, ["output", "present_key", "present_value"], name="gqa",
                            domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, scale=0.125,
                            do_rotary=int(rotary), **attributes)
    outputs = [helper.make_tensor_value_info("output", FLOAT, [batch, seq, heads * head_size])]
    outputs += [helper.make_tensor_value_info(name, FLOAT, [batch, kv_heads, cache, head_size])
                for name in ("present_key", "present_value")]
    graph = helper.make_graph([node], "decode", inputs, outputs)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(LIBRARY.path))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _inputs(batch: int, heads: int, kv_heads: int, head_size: int, cache: int, filled: list[int], *, packed: bool,
            rotary: bool, bias: bool, seq: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """A step of ``seq`` tokens per row ending at slot ``filled[row]``, each row's first ``3 * row`` slots padding."""
    rng = np.random.default_rng(seed)
    total = max(filled) + 1
    positions = max(cache, total) + 1
    width = (heads + 2 * kv_heads) * head_size if packed else heads * head_size
    feeds = {"query": rng.standard_normal((batch, seq, width)).astype(np.float32),
             "past_key": rng.standard_normal((batch, kv_heads, cache, head_size)).astype(np.float32),
             "past_value": rng.standard_normal((batch, kv_heads, cache, head_size)).astype(np.float32),
             "seqlens_k": np.array(filled, np.int32), "total": np.array(total, np.int32)}
    if not packed:
        for name in ("key", "value"):
            feeds[name] = rng.standard_normal((batch, seq, kv_heads * head_size)).astype(np.float32)
    if rotary:
        angles = rng.random((positions, head_size // 2)).astype(np.float32) * 6
        feeds["cos"], feeds["sin"] = np.cos(angles), np.sin(angles)
        slots = np.array(filled)[:, None] + 1 - seq + np.arange(seq)  # a prompt's tokens at their slots, as in
        random_rows = rng.integers(0, positions, size=(batch, 1))     # graphopt's steps; a decode token anywhere
        feeds["position_ids"] = (slots if seq > 1 else random_rows).astype(np.int64)
    if bias:
        masks = np.zeros((batch, 1, seq, total), np.float32)
        for row in range(batch):  # -inf, or the float minimum transformers uses
            masks[row, ..., : _padding(row, filled[row])] = -np.inf if row % 2 else np.finfo(np.float32).min
        feeds["bias"] = masks
    return feeds


def _padding(row: int, filled: int) -> int:
    """Row ``row``'s left padding in :func:`_inputs`: its first slots, never the last one."""
    return min(3 * row, filled)


def _run_sharing_the_cache(session: ort.InferenceSession, feeds: dict[str, np.ndarray]
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step with the present key and value bound to the past ones (as graphopt's generation loop binds them)."""
    binding = session.io_binding()
    caches = {name: feeds[name].copy() for name in ("past_key", "past_value")}
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in caches.items()}
    for name, array in feeds.items():
        if name not in caches:
            binding.bind_cpu_input(name, array)
    binding.bind_output("output")  # first: copy_outputs_to_cpu follows the order of binding
    for past, present in (("past_key", "present_key"), ("past_value", "present_value")):
        binding.bind_ortvalue_input(past, values[past])
        binding.bind_ortvalue_output(present, values[past])
    session.run_with_iobinding(binding)
    output = binding.copy_outputs_to_cpu()[0]
    return output, values["past_key"].numpy().copy(), values["past_value"].numpy().copy()


CASES = {  # batch, heads, kv heads, head size, cache slots, filled slots per row, tokens per row, packed q/k/v
    "packed-rotary": (1, 9, 3, 64, 96, [70], 1, True),
    "rows-left-padded": (3, 9, 3, 64, 64, [5, 5, 5], 1, False),
    "long-cache-in-stretches": (2, 9, 3, 64, 640, [639, 639], 1, True),
    "empty-cache": (1, 8, 8, 128, 32, [0], 1, False),
    "large-groups": (2, 32, 4, 128, 1100, [1000, 1000], 1, True),
    "prompt-packed-rotary": (1, 9, 3, 64, 96, [63], 64, True),
    "prompts-left-padded": (3, 9, 3, 64, 32, [7, 7, 7], 8, False),
    "prompt-after-a-prompt": (1, 4, 2, 32, 48, [20], 6, True),
}


@needs_library
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shared", [True, False], ids=["cache-bound-in-place", "cache-copied"])
def test_decode_attention_computes_group_query_attention(case: str, shared: bool) -> None:
    batch, heads, kv_heads, head_size, cache, filled, seq, packed = CASES[case]
    rotary = packed or case == "empty-cache"
    bias = case != "empty-cache"
    model = _gqa_model(batch, heads, kv_heads, head_size, cache, max(cache, max(filled) + 1) + 1, packed=packed,
                       rotary=rotary, bias=bias, seq=seq)
    ours = onnx.ModelProto()
    ours.CopyFrom(model)
    assert use_decode_attention(ours) == 1 and ours.graph.node[0].op_type == "DecodeAttention"
    feeds = _inputs(batch, heads, kv_heads, head_size, cache, filled, packed=packed, rotary=rotary, bias=bias, seq=seq)
    if shared:
        expected, got = (_run_sharing_the_cache(_session(m), feeds) for m in (model, ours))
    else:
        expected, got = (_session(m).run(None, feeds) for m in (model, ours))
    for row, count in enumerate(filled):
        # tokens that see some slot that is not padding (a padding token's own output is read by no other token)
        first = max(0, (_padding(row, count) if bias else 0) - (count + 1 - seq))
        live = expected[0][row, first:]
        assert np.abs(got[0][row, first:] - live).max() < 2e-6 * max(1.0, float(np.abs(live).max()))
        for got_cache, expected_cache in zip(got[1:], expected[1:], strict=True):  # up to the new tokens
            np.testing.assert_allclose(got_cache[row, :, : count + 1], expected_cache[row, :, : count + 1], atol=1e-6)
    if not shared:  # the past is an input: never written
        again = _inputs(batch, heads, kv_heads, head_size, cache, filled, packed=packed, rotary=rotary, bias=bias,
                        seq=seq)
        assert np.array_equal(feeds["past_key"], again["past_key"])


def test_nodes_without_what_the_kernel_lacks_are_swapped() -> None:
    common = dict(batch=1, heads=4, kv_heads=2, head_size=16, cache=32, positions=33, packed=True, rotary=True)
    assert len(decode_attention_nodes(_gqa_model(**common, bias=True))) == 1
    assert len(decode_attention_nodes(_gqa_model(**common, bias=True, seq="sequence"))) == 1  # any length
    assert not decode_attention_nodes(_gqa_model(**common, bias=False, local_window_size=8))  # a sliding window
    assert not decode_attention_nodes(_gqa_model(**common, bias=False, softcap=30.0))
    assert not decode_attention_nodes(_gqa_model(**{**common, "head_size": 24, "positions": 33}, bias=False))
    assert not decode_attention_nodes(_gqa_model(**{**common, "heads": 34}, bias=False))  # 17 heads per group
    model = _gqa_model(**common, bias=False)
    assert use_decode_attention(model) == 1
    assert any(opset.domain == "graphopt" for opset in model.opset_import)
    assert [i.name for i in model.graph.initializer] == ["gqa_graphopt_decode_attention_0_heads",
                                                         "gqa_graphopt_decode_attention_0_scale"]


def test_the_swap_for_a_session_puts_the_model_back() -> None:
    model = _gqa_model(1, 4, 2, 16, 32, 33, packed=True, rotary=True, bias=True)
    before = model.SerializeToString()
    with decode_attention_while(model) as swapped:
        assert swapped == 1 and model.graph.node[0].op_type == "DecodeAttention"
    assert model.SerializeToString() == before


@needs_library
def test_a_decoder_generates_with_it_and_its_file_keeps_group_query_attention(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    lm = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    fast = graphopt.optimize(lm, (ids[:1],), target="cpu", max_cache_len=40)
    assert any("2 GroupQueryAttention nodes run graphopt.DecodeAttention" in note for note in fast.report.notes)
    for rows in (slice(0, 1), slice(0, 2)):
        expected = lm.generate(ids[rows], attention_mask=mask[rows], max_new_tokens=12, min_new_tokens=12,
                               do_sample=False)
        got = fast.generate(ids[rows], attention_mask=mask[rows], max_new_tokens=12, eos_token_id=[])
        assert got.tolist() == expected.tolist()
    step = onnx.ModelProto()  # the batch of 2 rotates apart for onnxruntime's op; the kernel takes it whole
    step.CopyFrom(fast.steps_for(2).steps._decode.module.model)
    assert [n.op_type for n in step.graph.node].count("RotaryEmbedding") == 4
    assert use_decode_attention(step) == 2
    assert not {"RotaryEmbedding", "GroupQueryAttention"} & {n.op_type for n in step.graph.node}
    path = fast.export_onnx(tmp_path / "decoder.onnx")
    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops and "DecodeAttention" not in ops


def _rotated_apart_model(batch: int, heads: int, kv_heads: int, head_size: int, cache: int) -> onnx.ModelProto:
    """Queries, keys and values sliced from one packed projection, queries and keys rotated by ``RotaryEmbedding``."""
    model = _gqa_model(batch, heads, kv_heads, head_size, cache, cache + 1, packed=True, rotary=False, bias=True)
    graph = model.graph
    ends = np.cumsum([0, heads * head_size, kv_heads * head_size, kv_heads * head_size])
    nodes = []
    for name, start, end in zip(("q", "k", "v"), ends[:-1], ends[1:], strict=True):
        graph.initializer.extend([onnx.numpy_helper.from_array(np.array([value], np.int64), f"{name}_{which}")
                                  for which, value in (("start", start), ("end", end), ("axis", -1))])
        nodes.append(helper.make_node("Slice", ["packed", f"{name}_start", f"{name}_end", f"{name}_axis"],
                                      [f"{name}_sliced"]))
    for name, count in (("q", heads), ("k", kv_heads)):
        nodes.append(helper.make_node("RotaryEmbedding", [f"{name}_sliced", "position_ids", "cos", "sin"],
                                      [f"{name}_rotated"], domain="com.microsoft", interleaved=0, num_heads=count))
    attention = graph.node[0]
    attention.input[0], attention.input[1], attention.input[2] = "q_rotated", "k_rotated", "v_sliced"
    nodes.append(attention)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input[0].name = "packed"
    graph.value_info.extend(helper.make_tensor_value_info(f"{name}_{stage}", FLOAT, [batch, 1, count * head_size])
                            for name, count in (("q", heads), ("k", kv_heads), ("v", kv_heads))
                            for stage in ("sliced", "rotated"))
    graph.input.extend([helper.make_tensor_value_info("cos", FLOAT, [batch, head_size // 2]),
                        helper.make_tensor_value_info("sin", FLOAT, [batch, head_size // 2]),
                        helper.make_tensor_value_info("position_ids", INT64, [batch, 1])])
    return model


@needs_library
def test_queries_and_keys_rotated_apart_are_taken_whole_and_rotated_inside() -> None:
    batch, heads, kv_heads, head_size, cache = 3, 9, 3, 64, 48
    model = _rotated_apart_model(batch, heads, kv_heads, head_size, cache)
    ours = onnx.ModelProto()
    ours.CopyFrom(model)
    assert use_decode_attention(ours) == 1
    assert [n.op_type for n in ours.graph.node] == ["DecodeAttention"]
    rng = np.random.default_rng(3)
    feeds = _inputs(batch, heads, kv_heads, head_size, cache, [20, 20, 20], packed=True, rotary=False, bias=True)
    feeds["packed"] = feeds.pop("query")
    angles = rng.random((batch, head_size // 2)).astype(np.float32) * 6  # one table row per token, as graphopt's
    feeds.update(cos=np.cos(angles), sin=np.sin(angles), position_ids=np.arange(batch, dtype=np.int64)[:, None])
    expected, got = (_run_sharing_the_cache(_session(m), feeds) for m in (model, ours))
    assert np.abs(got[0] - expected[0]).max() < 2e-6 * max(1.0, float(np.abs(expected[0]).max()))
    for got_cache, expected_cache in zip(got[1:], expected[1:], strict=True):
        np.testing.assert_allclose(got_cache[:, :, :21], expected_cache[:, :, :21], atol=1e-6)


@needs_library
@pytest.mark.parametrize("seq", [1, 4])
def test_a_nan_in_the_cache_comes_out_as_nan(seq: int) -> None:
    model = _gqa_model(1, 4, 2, 16, 32, 33, packed=False, rotary=False, bias=False, seq=seq)
    use_decode_attention(model)
    feeds = _inputs(1, 4, 2, 16, 32, [20], packed=False, rotary=False, bias=False, seq=seq)
    feeds["past_key"][0, 0, 3] = np.nan  # a slot every token sees, read by key/value head 0's query heads
    output = _session(model).run(None, feeds)[0].reshape(1, seq, 4, 16)
    assert np.isnan(output[:, :, :2]).all() and np.isfinite(output[:, :, 2:]).all()
