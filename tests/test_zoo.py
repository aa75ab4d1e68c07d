"""Tests for the model zoo: every entry builds, is deterministic, exports, and matches eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphopt.bench import zoo

# Parameter counts of torchvision's definitions: the zoo's own CNNs must match them exactly.
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872}


def _load_or_skip(name: str, size: str = "small", batch: int = 2) -> zoo.ZooModel:
    try:
        return zoo.load(name, size=size, batch=batch)
    except zoo.ModelUnavailableError as exc:
        pytest.skip(str(exc))


def _run(entry: zoo.ZooModel) -> torch.Tensor:
    with torch.no_grad():
        return entry.model(*entry.example_inputs)


@pytest.mark.parametrize("name", zoo.list_models())
def test_small_model_is_deterministic_and_exports(name: str) -> None:
    first = _load_or_skip(name)
    second = _load_or_skip(name)
    assert not first.model.training
    assert first.output_kind in {"logits", "embedding", "hidden"}
    assert first.example_inputs[0].shape[0] == 2
    for a, b in zip(first.example_inputs, second.example_inputs, strict=True):
        assert torch.equal(a, b)
    eager = _run(first)
    assert isinstance(eager, torch.Tensor)
    assert torch.isfinite(eager).all()
    assert torch.equal(eager, _run(second))

    exported = torch.export.export(first.model, first.example_inputs, strict=False)
    with torch.no_grad():
        captured = exported.module()(*first.example_inputs)
    torch.testing.assert_close(captured, eager)


def test_load_leaves_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    zoo.load("resnet18")
    assert torch.equal(state, torch.get_rng_state())


def test_unknown_name_lists_available_models() -> None:
    with pytest.raises(zoo.UnknownModelError) as info:
        zoo.load("resnet1000")
    assert isinstance(info.value, ValueError)
    for name in zoo.list_models():
        assert name in str(info.value)


def test_bad_size_and_batch_are_rejected() -> None:
    with pytest.raises(ValueError, match="size"):
        zoo.load("resnet18", size="huge")
    with pytest.raises(ValueError, match="batch"):
        zoo.load("resnet18", batch=0)


@pytest.mark.parametrize("name", zoo.list_models())
def test_full_variant_builds(name: str) -> None:
    entry = _load_or_skip(name, size="full", batch=1)
    assert entry.size == "full"
    n_params = sum(p.numel() for p in entry.model.parameters())
    if name in TORCHVISION_PARAMS:
        assert n_params == TORCHVISION_PARAMS[name]
    else:
        assert n_params > 10_000_000
    if name in {"resnet18", "mobilenet_v2"}:  # cheap enough to run at full size
        assert _run(entry).shape == (1, 1000)


def test_minilm_similar_sentences_are_closer_than_unrelated() -> None:
    entry = _load_or_skip("minilm", batch=len(zoo.MINILM_SENTENCES))
    emb = _run(entry)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(emb)))

    def cos(i: int, j: int) -> float:
        return float(F.cosine_similarity(emb[i], emb[j], dim=0))

    # (0, 1): guitar music; (3, 5): cat by the window; (2, 7): falling share prices.
    for similar in [(0, 1), (3, 5), (2, 7)]:
        for unrelated in [(0, 2), (3, 6), (4, 7)]:
            assert cos(*similar) > cos(*unrelated) + 0.2, (similar, unrelated)


@pytest.mark.parametrize("name", zoo.list_outside_models())
def test_architectures_outside_the_zoo_build_and_lower_on_cpu(name: str) -> None:
    """The ones ``graphopt bench --outside`` measures: deterministic, and the default cpu lowering matches eager."""
    pytest.importorskip("transformers")
    import graphopt

    entry = _load_or_skip(name)
    assert name not in zoo.list_models() and entry.size == "small"
    eager = _run(entry)
    assert torch.isfinite(eager).all() and torch.equal(eager, _run(_load_or_skip(name)))
    fast = graphopt.optimize(entry.model, entry.example_inputs, "cpu")
    torch.testing.assert_close(fast(*entry.example_inputs), eager, atol=1e-4, rtol=1e-4)


def test_unknown_name_lists_the_architectures_outside_the_zoo_too() -> None:
    with pytest.raises(zoo.UnknownModelError) as info:
        zoo.check_name("resnet1000")
    assert all(name in str(info.value) for name in zoo.list_outside_models())
