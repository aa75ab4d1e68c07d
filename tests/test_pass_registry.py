"""The one pass registry: every built-in pass, lossy ones included, is found by its own name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import graphopt.passes.base as pass_infra
from graphopt.passes.base import Pass, available_passes, get_pass, register_pass
from graphopt.passes.lossy.base import LossyPass, is_lossy
from graphopt.passes.quantize import quantize_pass
from graphopt.passes.quantize.kmeans import KMeansQuantize
from graphopt.passes.quantize.weight_only import WeightOnlyQuantize


@pytest.mark.parametrize("name", sorted(pass_infra._BUILTIN))
def test_every_built_in_pass_is_registered_under_its_own_name(name):
    cls = get_pass(name)
    assert issubclass(cls, Pass) and cls.name == name


def test_lossy_passes_are_in_the_registry():
    lossy = {"quantize", "quantize-dynamic", "weight-only-quantize", "kmeans-quantize", "prune", "reduced-precision"}
    assert lossy <= set(available_passes())
    assert all(is_lossy(get_pass(name)()) for name in lossy)


def test_quantization_schemes_resolve_through_the_registry(monkeypatch):
    four_bit = quantize_pass("int4-weight-only")
    assert type(four_bit) is WeightOnlyQuantize and four_bit.bits == 4
    assert type(quantize_pass("kmeans")) is KMeansQuantize
    monkeypatch.setattr(pass_infra, "_REGISTERED", dict(pass_infra._REGISTERED))

    @register_pass
    @dataclass(frozen=True)
    class MyKMeans(KMeansQuantize):
        name = "kmeans-quantize"

    assert type(quantize_pass("kmeans")) is MyKMeans  # a registered name shadows the built-in one
    assert issubclass(MyKMeans, LossyPass)
