"""Knowledge-distillation recovery: a CNN trained on scikit-learn's real digits, pruned 50%, recovered."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import graphopt
from graphopt.errors import FidelityError, InputError

from helpers import mean_pooled, token_batch


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, held_out = order[:1400], order[1400:]
    return images[train], labels[train], images[held_out], labels[held_out]


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def _train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], epochs: int) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for images, labels in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    return model.eval()


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def _trained_digits_cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The CNN trained 8 epochs on the digits' training split, the split, and its batches of 64."""
    torch.manual_seed(0)
    split = _digits()
    x_train, y_train = split[0], split[1]
    batches = [(x_train[i:i + 64], y_train[i:i + 64]) for i in range(0, len(x_train), 64)]
    return _train(_cnn(), batches, epochs=8), split, batches


@pytest.mark.slow
def test_digits_cnn_pruned_by_half_recovers_to_within_a_point() -> None:
    model, (x_train, _y_train, x_test, y_test), batches = _trained_digits_cnn()
    original = _accuracy(model, x_test, y_test)
    assert original > 0.95

    pruned = graphopt.optimize(model, (x_train[:64],), "cpu", prune=0.5, dynamic_batch=True,
                               calibration=[(images,) for images, _ in batches[:4]])
    params = {name: p.numel() for name, p in model.named_parameters()}
    pruned_params = sum(t.numel() for t in pruned.graph_module.buffers()) + sum(
        t.numel() for t in pruned.graph_module.parameters())
    assert pruned_params < 0.35 * sum(params.values())  # 50% of channels: roughly a quarter of the weights left
    before = _accuracy(pruned, x_test, y_test)

    recovered = graphopt.distill(pruned, teacher=model, data=[(images,) for images, _ in batches], epochs=5,
                                 temperature=4.0, lr=2e-3)
    after = _accuracy(recovered, x_test, y_test)
    print(f"digits held-out accuracy: original {original:.4f}, pruned 50% {before:.4f}, distilled {after:.4f}")
    assert after >= original - 0.01
    assert before < after  # the recovery did something
    section = next(s for s in recovered.report.sections if s.title == "distill: recovery")
    cosine_before, cosine_after = section.rows[0][1], section.rows[0][2]
    assert cosine_after > cosine_before
    assert recovered.report.records[-1].name == "distill"
    assert _accuracy(pruned, x_test, y_test) == before  # the pruned model is not changed


@pytest.mark.slow
def test_distill_with_labels_and_a_budget() -> None:
    torch.manual_seed(0)
    x_train, y_train, _x_test, _y_test = _digits()
    x_train, y_train = x_train[:512], y_train[:512]
    batches = [(x_train[i:i + 128], y_train[i:i + 128]) for i in range(0, 512, 128)]
    model = _train(_cnn(), batches, epochs=3)
    pruned = graphopt.optimize(model, (x_train[:128],), "cpu", prune=0.5)
    recovered = graphopt.distill(pruned, teacher=model, data=batches, labeled=True, alpha=0.5, epochs=2, lr=2e-3,
                                 fidelity=graphopt.Fidelity(min_cosine=0.5))
    section = next(s for s in recovered.report.sections if s.title == "distill: recovery")
    assert [row[0] for row in section.rows] == ["output cosine vs teacher (worst batch)",
                                                "label accuracy on the data (first batches)"]
    assert recovered(x_train[:128]).shape == (128, 10)
    with pytest.raises(FidelityError, match="below the budget"):
        graphopt.distill(pruned, teacher=model, data=batches[:1], labeled=True, epochs=1, lr=1e-6,
                         fidelity=graphopt.Fidelity(min_cosine=0.99999))


def test_distill_bad_arguments_are_input_errors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x, labels = torch.randn(32, 8), torch.randint(0, 4, (32,))
    pruned = graphopt.optimize(model, (x,), "cpu", prune=0.5)
    assert pruned.graph_module.get_buffer(
        next(n for n, b in pruned.graph_module.named_buffers() if b.dim() == 2 and b.shape[1] == 8)).shape == (8, 8)
    with pytest.raises(InputError, match="labeled=True"):
        graphopt.distill(pruned, teacher=model, data=[(x, labels)], epochs=1)
    with pytest.raises(InputError, match="epochs"):
        graphopt.distill(pruned, teacher=model, data=[(x,)], epochs=0)
    with pytest.raises(InputError, match="alpha"):
        graphopt.distill(pruned, teacher=model, data=[(x,)], alpha=2.0)
    with pytest.raises(InputError, match="a single tensor batch goes in a list"):
        graphopt.distill(pruned, teacher=model, data=x)
    with pytest.raises(InputError, match=r"what graphopt\.optimize returned"):
        graphopt.distill(model, teacher=model, data=[(x,)])
    recovered = graphopt.distill(pruned, teacher=model, data=[(x,)] * 4, epochs=3, lr=1e-2)
    section = next(s for s in recovered.report.sections if s.title == "distill: recovery")
    assert section.rows[0][2] > section.rows[0][1]  # closer to the teacher after training
    assert len(section.plots[0].series["training loss"]) == 4 and section.plots[0].series["training loss"][0] is None


def _small_pruned_mlp() -> tuple[nn.Module, graphopt.OptimizedModel, list[tuple[torch.Tensor]],
                                 list[tuple[torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    data = [(torch.randn(16, 8),) for _ in range(4)]
    held_out = [(torch.randn(16, 8),) for _ in range(2)]
    return model, graphopt.optimize(model, data[0], "cpu", prune=0.5), data, held_out


def test_distill_validation_keeps_the_untrained_weights_when_no_epoch_helps() -> None:
    model, pruned, data, held_out = _small_pruned_mlp()
    recovered = graphopt.distill(pruned, teacher=model, data=data, epochs=3, lr=3.0, loss="mse", validation=held_out)
    record = recovered.report.records[-1]
    assert record.stats["kept_epoch"] == 0
    with torch.no_grad():
        for (x,) in held_out + data:
            torch.testing.assert_close(recovered(x), pruned(x), rtol=0, atol=0)
        expected = sum(float(F.mse_loss(pruned(x), model(x))) for (x,) in held_out) / len(held_out)
    section = next(s for s in recovered.report.sections if s.title == "distill: recovery")
    row = next(r for r in section.rows if r[0] == "validation loss")
    assert row[1] == row[2] == pytest.approx(expected, rel=1e-4)
    plot = section.plots[0]
    assert plot.marked == [0] and plot.series["validation loss"][0] == pytest.approx(expected, rel=1e-4)
    assert max(plot.series["validation loss"][1:]) > expected  # the epochs were measured, and did worse
    assert any("kept the untrained weights" in note for note in recovered.report.notes)


def test_distill_validation_keeps_the_last_epoch_when_every_epoch_helps() -> None:
    model, pruned, data, held_out = _small_pruned_mlp()
    plain = graphopt.distill(pruned, teacher=model, data=data, epochs=3, lr=1e-2, loss="mse")
    checked = graphopt.distill(pruned, teacher=model, data=data, epochs=3, lr=1e-2, loss="mse", validation=held_out)
    losses = next(s for s in checked.report.sections if s.title == "distill: recovery").plots[0].series[
        "validation loss"]
    assert losses == sorted(losses, reverse=True) and len(losses) == 4
    assert checked.report.records[-1].stats["kept_epoch"] == 3
    with torch.no_grad():
        torch.testing.assert_close(checked(held_out[0][0]), plain(held_out[0][0]), rtol=0, atol=0)
    section = next(s for s in checked.report.sections if s.title == "distill: recovery")
    worst = next(r for r in section.rows if r[0] == "output cosine vs teacher (worst validation batch)")
    assert worst[2] > worst[1]
    with pytest.raises(InputError, match="holds no batch"):
        graphopt.distill(pruned, teacher=model, data=data, validation=[])
    with pytest.raises(InputError, match="validation=\\[x\\]"):
        graphopt.distill(pruned, teacher=model, data=data, validation=held_out[0][0])


@pytest.mark.slow
def test_prune_distill_then_quantize_composes() -> None:
    pytest.importorskip("graphopt.passes.quantize")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 64, 10)).eval()
    x = torch.randn(16, 1, 8, 8)
    batches = [(torch.randn(16, 1, 8, 8),) for _ in range(4)]
    pruned = graphopt.optimize(model, (x,), "cpu", prune=0.5)
    recovered = graphopt.distill(pruned, teacher=model, data=batches, epochs=2)
    quantized = graphopt.optimize(recovered, (x,), "cpu", quantize="int8", calibration=batches)
    [record] = [r for r in quantized.report.records if r.name == "quantize"]
    assert record.status == "changed"
    assert any("is an OptimizedModel" in note for note in quantized.report.notes)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(quantized(x), recovered(x)).min() > 0.99


def test_distill_and_calibration_take_a_loader_of_another_batch_size() -> None:
    """The issue's case: optimized for a batch of 540, calibrated and trained on a batch-64 DataLoader."""
    model, (x_train, _y_train, x_test, y_test), _batches = _trained_digits_cnn()
    original = _accuracy(model, x_test, y_test)
    loader = DataLoader(TensorDataset(x_train), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    pruned = graphopt.optimize(model, (x_train[:540],), "cpu", prune=0.5, calibration=loader)
    assert any("regrouped into 2 batch(es) of the example's size 540" in note for note in pruned.report.notes)

    recovered = graphopt.distill(pruned, teacher=model, data=loader, epochs=10, lr=2e-3)
    padded = torch.cat([x_test, torch.zeros(540 - len(x_test), 1, 8, 8)])  # the recovered model keeps batch 540
    with torch.no_grad():
        after = float((recovered(padded)[:len(x_test)].argmax(1) == y_test).float().mean())
        before = float((pruned(padded)[:len(x_test)].argmax(1) == y_test).float().mean())
    assert after >= original - 0.01 and after > before
    section = next(s for s in recovered.report.sections if s.title == "distill: recovery")
    assert "trained with free dims: batch (example 540)" in section.description


def test_distill_an_encoder_on_unlabeled_sentences_of_any_length() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, vocab_size=120)
    teacher = transformers.BertModel(config).eval()
    generator = torch.Generator().manual_seed(1)

    def batch(size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return token_batch(generator, size, length)  # one padded sentence per batch

    pruned = graphopt.optimize(teacher, batch(4, 32), "cpu", prune=0.5)
    data = [batch(8, length) for length in (12, 20, 32, 7, 25, 16)]
    recovered = graphopt.distill(pruned, teacher=teacher, data=data, epochs=6, lr=3e-4, loss="cosine",
                                 match=mean_pooled)
    section = next(s for s in recovered.report.sections if s.title == "distill: recovery")
    cosine_before, cosine_after = section.rows[0][1], section.rows[0][2]
    assert cosine_after > cosine_before
    assert "batch (example 4)" in section.description and "dim1_32 (example 32, at most 32)" in section.description
    assert "on mean_pooled(outputs)" in section.description
    checked = graphopt.distill(pruned, teacher=teacher, data=data[:2], epochs=1, lr=3e-4, loss="cosine",
                               match=mean_pooled, validation=[batch(3, 9)])  # a length no training batch has
    section = next(s for s in checked.report.sections if s.title == "distill: recovery")
    assert "validation loss" in [row[0] for row in section.rows]
    with pytest.raises(InputError, match="outside its range"):  # longer than the example's position table
        graphopt.distill(pruned, teacher=teacher, data=[batch(2, 40)], epochs=1, loss="cosine")
    with pytest.raises(InputError, match=r"match=\.\.\.\) takes a function"):
        graphopt.distill(pruned, teacher=teacher, data=data, match="mean")


@pytest.mark.slow
def test_minilm_pruned_recovers_on_unlabeled_sentences_of_any_length() -> None:
    """Real all-MiniLM-L6-v2: pruned 50%, distilled on pydoc sentences padded per batch, judged on held-out ones."""
    from graphopt.bench import zoo
    from graphopt.bench.compound import pydoc_sentences

    try:
        model, example, _ = zoo._build_minilm("small", 8)  # mean-pooled embeddings, batch 8 x 32 tokens
    except zoo.ModelUnavailableError as error:
        pytest.skip(str(error))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo.minilm_path(), local_files_only=True)
    sentences = [s for s in pydoc_sentences() if len(s) < 120]  # most fit in 32 tokens: batches pad less
    train, held_out = sentences[:192], sentences[-16:]

    def encode(batch: list[str], padding: str | bool) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokenizer(batch, padding=padding, truncation=True, max_length=32, return_tensors="pt")
        return tokens["input_ids"], tokens["attention_mask"]

    data = [encode(train[i:i + 16], True) for i in range(0, len(train), 16)]  # 16 per batch, padded per batch
    assert len({ids.shape[1] for ids, _ in data}) > 1
    checks = [encode(held_out[i:i + 8], "max_length") for i in range(0, len(held_out), 8)]
    pruned = graphopt.optimize(model, example, "cpu", prune=0.5)
    recovered = graphopt.distill(pruned, teacher=model, data=data, epochs=2, lr=1e-4, loss="cosine")

    def worst(candidate: nn.Module) -> float:
        with torch.no_grad():
            return min(float(torch.nn.functional.cosine_similarity(candidate(*b), model(*b)).min()) for b in checks)

    before, after = worst(pruned), worst(recovered)
    print(f"MiniLM pruned 50%: held-out worst cosine {before:.4f} -> {after:.4f} after distill")
    assert after > before + 0.02


def test_distill_matches_layer_outputs_too() -> None:
    transformers = pytest.importorskip("transformers")
    from graphopt.workflows.layer_taps import module_outputs

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, vocab_size=120)
    teacher = transformers.BertModel(config).eval()
    ids = torch.randint(0, 120, (4, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 16, dtype=torch.long)
    pruned = graphopt.optimize(teacher, (ids, mask), "cpu", prune=graphopt.Prune(amount=0.5, norms=False))
    taps = module_outputs(pruned.portable_graph, ["encoder.layer.*"])
    assert list(taps) == ["encoder.layer.0", "encoder.layer.1"]
    layer_outputs = {n.name: n for n in pruned.portable_graph.graph.nodes}
    assert all(layer_outputs[name].target is torch.ops.aten.layer_norm.default for name in taps.values())

    data = [(ids, mask)] * 4
    recovered = graphopt.distill(pruned, teacher=teacher, data=data, epochs=3, lr=3e-4, loss="cosine",
                                 layers="encoder.layer.*")
    section = next(s for s in recovered.report.sections if s.title == "distill: recovery")
    assert "layer outputs encoder.layer.* matched too" in section.description
    assert section.rows[0][2] > section.rows[0][1]
    with pytest.raises(InputError, match="names no module"):
        graphopt.distill(pruned, teacher=teacher, data=data, layers="decoder.*")
    classifier = transformers.BertForSequenceClassification(config).eval()
    hidden_pruned = graphopt.optimize(classifier, (ids, mask), "cpu", prune=0.5)  # its hidden size too
    with pytest.raises(InputError, match="pruned hidden size"):
        graphopt.distill(hidden_pruned, teacher=classifier, data=data, layers="bert.encoder.layer.*")
