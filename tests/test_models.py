"""Acceptance: real architectures captured, optimized and run for cpu and onnx, matching eager."""

import pytest
import torch

import graphopt
from graphopt.bench import zoo
from graphopt.ir.graph import count_ops

from helpers import assert_matches, randomize_batchnorm

MODELS = ["resnet18", "mobilenet_v2", "bert", "vit", "minilm"]


def load(name):
    try:
        entry = zoo.load(name, size="small", batch=2)
    except zoo.ModelUnavailableError as error:
        pytest.skip(str(error))
    if name in ("resnet18", "mobilenet_v2"):
        randomize_batchnorm(entry.model)
    return entry


@pytest.mark.parametrize("target", ["cpu", "onnx"])
@pytest.mark.parametrize("name", MODELS)
def test_model_matches_eager(name, target):
    entry = load(name)
    fast = graphopt.optimize(entry.model, entry.example_inputs, target=target)
    assert fast.report.final_check == "passed"
    error = assert_matches(fast, entry.model, entry.example_inputs, tol=1e-4)
    print(f"{name}/{target}: scaled error {error:.2e}")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_cnn_graphs_lose_every_batchnorm(name):
    entry = load(name)
    before = count_ops(graphopt.capture(entry.model, entry.example_inputs).graph_module)
    fast = graphopt.optimize(entry.model, entry.example_inputs)
    after = count_ops(fast.graph_module)
    # in-place ReLUs make capture functionalize the graph, where batch norm is the no-training op
    norms = ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default")
    assert sum(before[op] for op in norms) > 0
    assert not any(op in after for op in norms)
    assert after["aten.conv2d.default"] == before["aten.conv2d.default"]
    if name == "mobilenet_v2":
        assert sum(n for op, n in after.items() if "hardtanh" in op or "relu6" in op) > 0


def test_hf_bert_raw_output_structure_survives_onnx():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones_like(ids)
    fast = graphopt.optimize(model, (ids, mask), target="onnx")
    out = fast(ids, mask)
    assert out.last_hidden_state.shape == (2, 8, 32) and out.pooler_output.shape == (2, 32)
    assert_matches(fast, model, (ids, mask))


def test_minilm_embeddings_keep_their_meaning():
    entry = load("minilm")
    fast = graphopt.optimize(entry.model, entry.example_inputs, target="onnx")
    eager = entry.model(*entry.example_inputs)
    optimized = fast(*entry.example_inputs)
    cosine = torch.nn.functional.cosine_similarity(eager, optimized, dim=-1)
    assert bool((cosine > 0.99999).all()), cosine
