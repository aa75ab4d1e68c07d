"""The public object model: compression configs, optimize's grouped options, OptimizedModel's properties."""

from __future__ import annotations

import ast
import dataclasses
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch import nn

import graphopt
from graphopt import (
    CpuLowering,
    Dynamic,
    GpuLowering,
    InputError,
    Int8Dynamic,
    Int8Static,
    KMeans,
    OptimizedModel,
    PassPipeline,
    Prune,
    ReducedPrecision,
    RollbackWarning,
    VerificationError,
    Verify,
    WeightOnly,
)
from graphopt.passes.base import Pass, PassResult
from graphopt.passes.compress import SCHEME_CONFIGS, STAGES, compression_steps
from graphopt.passes.lossy.base import LossyPass
from graphopt.passes.quantize import SCHEMES, Quantize
from graphopt.passes.quantize.kmeans import KMeansQuantize
from graphopt.passes.quantize.weight_only import WeightOnlyQuantize
from graphopt.passes.quantize.weight_ops import DEQUANTIZE_INT4
from graphopt.targets.base import get_target

WORKFLOWS = Path(graphopt.__file__).parent / "workflows"


class Mlp(nn.Module):
    def __init__(self, width: int = 256, hidden: int = 256, out: int = 64) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


@pytest.fixture(scope="module")
def mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return Mlp().eval(), (torch.randn(8, 256),)


def _ops(gm: fx.GraphModule) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def _lossy_records(fast: OptimizedModel) -> list[str]:
    return [r.name for r in fast.report.records if r.fidelity]


# -- configs: only their own options, checked -------------------------------------------------


@pytest.mark.parametrize(("build", "message"), [
    (lambda: WeightOnly(bits=3), r"must be 8 .* or 4"),
    (lambda: WeightOnly(bits=4, group_size=100), r"must be one of 32, 64, 128, 256, got 100"),
    (lambda: WeightOnly(bits=8, int8_layers=("lm_head",)), r"int8_layers"),
    (lambda: WeightOnly(min_elements=-1), r"min_elements=...\) must be an integer >= 0"),
    (lambda: KMeans(bits=2), r"8 \(up to 256 clusters\) or 4 \(up to 16\)"),
    (lambda: KMeans(bits=8, clusters=16), r"must be in 17..256, got 16; .* use bits=4"),
    (lambda: KMeans(bits=4, clusters=64), r"must be in 2..16, got 64"),
    (lambda: KMeans(iterations=-1), r"iterations=...\) must be an integer >= 0"),
    (lambda: Int8Static(observer="median"), r"minmax, moving-average, percentile, entropy; got 'median'"),
    (lambda: Int8Static(ops=["conv", "gemm"]), r"unknown op family 'gemm'; choose from: conv, linear"),
    (lambda: Int8Static(max_calibration_batches=0), r"positive integer"),
    (lambda: Int8Dynamic(per_channel="yes"), r"per_channel=...\) must be True or False"),
    (lambda: Prune(amount=1.0), r"must be in \[0, 1\)"),
    (lambda: Prune(structured=False, round_to=8), r"round_to=8\) .* structured"),
    (lambda: ReducedPrecision("int3"), r"bf16, bfloat16, float16, fp16"),
])
def test_configs_refuse_bad_options_and_say_what_is_allowed(build, message) -> None:
    with pytest.raises(InputError, match=message):
        build()


def test_each_config_has_only_its_schemes_options() -> None:
    names = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (Int8Static, Int8Dynamic, WeightOnly, KMeans)}
    assert names[Int8Dynamic] == {"per_channel", "skip", "embeddings", "embedding_bits"}
    assert "observer" not in names[WeightOnly] and "per_channel" not in names[WeightOnly]
    assert "group_size" in names[WeightOnly] and "group_size" not in names[Int8Static]
    assert "clusters" in names[KMeans] and "embeddings" not in names[KMeans]
    with pytest.raises(TypeError):
        Int8Dynamic(observer="entropy")  # type: ignore[call-arg]


def test_configs_are_the_passes_and_quantize_builds_them_with_their_options() -> None:
    assert all(issubclass(cls, LossyPass) for cls in (Int8Static, Int8Dynamic, WeightOnly, KMeans))
    assert WeightOnlyQuantize is WeightOnly and KMeansQuantize is KMeans
    assert Int8Static(observer="entropy", per_channel=False, skip="head") == Quantize(
        scheme="int8", observer="entropy", per_channel=False, skip=("head",))
    assert Int8Dynamic(embeddings=False) == Quantize(scheme="int8-dynamic", embeddings=False)
    assert WeightOnly(bits=4, group_size=32) == Quantize(scheme="int4-weight-only", group_size=32)
    assert WeightOnly(bits=4).group_size is None  # per layer: the largest of 128, 64, 32 dividing its features
    assert [WeightOnly(bits=4).group_for(k, 4) for k in (384, 576, 96, 100)] == [128, 64, 32, None]
    assert WeightOnly() == Quantize(scheme="int8-weight-only") == WeightOnly(bits=8)
    assert KMeans(bits=4).clusters == 16
    assert KMeans(bits=4, clusters=8, seed=3) == KMeansQuantize(clusters=8, seed=3)  # bits from clusters
    assert KMeans().bits == 8 and KMeans().clusters == 256 and KMeans() == Quantize(scheme="kmeans")


def test_every_scheme_name_has_a_config() -> None:
    assert set(SCHEME_CONFIGS) == set(SCHEMES)
    assert isinstance(SCHEME_CONFIGS["int4-weight-only"], WeightOnly) and SCHEME_CONFIGS["int4-weight-only"].bits == 4


def test_quantize_refuses_options_its_scheme_ignores() -> None:
    with pytest.raises(InputError, match=r"'int8-dynamic'\) has no use for observer=.*graphopt.Int8Dynamic"):
        Quantize(scheme="int8-dynamic", observer="entropy")
    with pytest.raises(InputError, match=r"per_channel=.*WeightOnly"):
        Quantize(scheme="int4-weight-only", per_channel=False)
    assert Quantize(scheme="int8-weight-only", embeddings=False).scheme == "int8-weight-only"  # has a use for it
    with pytest.raises(InputError, match=r"'int8-weight-only'\) has no use for bits=.*graphopt.WeightOnly\(bits=8, "):
        Quantize(scheme="int8-weight-only", bits=4)  # the scheme name sets it
    with pytest.raises(InputError, match=r"unknown quantization scheme 'int3'; choose one of: int8, int8-dynamic"):
        Quantize(scheme="int3")
    assert [SCHEME_CONFIGS[name].scheme for name in SCHEMES] == list(SCHEMES)


# -- compression order and conflicts ----------------------------------------------------------


def test_steps_follow_the_stated_order_whatever_the_given_order() -> None:
    steps = compression_steps([ReducedPrecision("bf16"), Int8Dynamic(), Prune(0.5)])
    assert [s.stage for s in steps] == list(STAGES) == ["prune", "quantize", "precision"]
    assert [type(s.lossy).__name__ for s in steps] == ["Prune", "Int8Dynamic", "ReducedPrecision"]


def test_shortcuts_become_the_same_steps() -> None:
    shortcut = compression_steps(prune=0.5, quantize="int4-weight-only", precision="bf16")
    typed = compression_steps([WeightOnly(bits=4), ReducedPrecision("bf16"), Prune(0.5)])
    assert [s.lossy for s in shortcut] == [s.lossy for s in typed]


def test_two_schemes_of_one_stage_are_refused() -> None:
    with pytest.raises(InputError, match=r"two quantization schemes asked for: WeightOnly\(bits=4\) "
                                         r"and Int8Dynamic\(\)"):
        compression_steps([WeightOnly(bits=4), Int8Dynamic()])
    with pytest.raises(InputError, match=r"two quantization schemes .* quantize='int8'"):
        compression_steps([Int8Dynamic()], quantize="int8")
    with pytest.raises(InputError, match="two prunings"):
        compression_steps([Prune(0.3)], prune=0.5)


def test_compress_refuses_what_is_not_a_config() -> None:
    @dataclass(frozen=True)
    class MyLossy(LossyPass):
        name = "my-lossy"

    with pytest.raises(InputError, match="for a scheme name use quantize='int8'"):
        compression_steps("int8")
    with pytest.raises(InputError, match=r"put a lossy pass of your own in passes="):
        compression_steps([MyLossy()])
    with pytest.raises(InputError, match="onnxruntime's CPU provider"):
        compression_steps([ReducedPrecision("bf16")], target="onnx")


def test_compress_equals_the_shortcuts_and_runs_prune_before_quantize(mlp) -> None:
    model, x = mlp
    typed = graphopt.optimize(model, x, compress=[Int8Dynamic(), Prune(0.5)])  # given in the "wrong" order
    flat = graphopt.optimize(model, x, prune=0.5, quantize="int8-dynamic")
    assert _lossy_records(typed) == _lossy_records(flat) == ["prune", "quantize-dynamic"]
    assert typed.portable_graph.code == flat.portable_graph.code
    assert _ops(typed.portable_graph) == _ops(flat.portable_graph)
    assert any("choose_qparams" in op for op in _ops(typed.portable_graph))
    pruned = [t for name, t in typed.portable_graph.state_dict().items() if t.dtype == torch.int8]
    assert pruned and min(t.shape[0] for t in pruned) < 256  # the quantized weights are the pruned ones
    torch.testing.assert_close(typed(*x), flat(*x))
    # pruning is measured only: the final check holds the lowered model to the quantize budget against the
    # compressed graph (against eager the pruned model is far below 0.99 on random weights)
    assert typed.report.final_check == "passed"
    assert any("against the compressed graph" in note for note in typed.report.notes)


def test_compress_conflicting_with_passes_is_refused(mlp) -> None:
    model, x = mlp
    with pytest.raises(InputError, match=r"passes= already holds a quantize pass"):
        graphopt.optimize(model, x, passes=[*graphopt.DEFAULT_PIPELINE, Quantize(scheme="int8-dynamic")],
                          compress=[WeightOnly()])
    with pytest.raises(InputError, match="two quantization schemes"):
        graphopt.optimize(model, x, compress=[Int8Dynamic()], quantize="int8")


def test_weight_only_group_size_reaches_the_packed_weights(mlp) -> None:
    model, x = mlp
    for group in (32, 64):
        fast = graphopt.optimize(model, x, compress=[WeightOnly(bits=4, group_size=group)])
        state = fast.portable_graph.state_dict()
        scales = {k: tuple(v.shape) for k, v in state.items() if k.endswith("_scale")}
        packed = {k: tuple(v.shape) for k, v in state.items() if k.endswith("_qweight")}
        assert sorted(scales.values()) == sorted([(256, 256 // group), (64, 256 // group)])
        assert sorted(packed.values()) == sorted([(256, 128), (64, 128)])  # two 4-bit values per byte
        groups = {n.args[3] for n in fast.portable_graph.graph.nodes if n.target == DEQUANTIZE_INT4}
        assert groups == {group}


# -- grouped options --------------------------------------------------------------------------


def test_dynamic_group_and_its_shortcut_are_the_same(mlp) -> None:
    model, x = mlp
    grouped = graphopt.optimize(model, x, dynamic=Dynamic(batch=True))
    flat = graphopt.optimize(model, x, dynamic_batch=True)
    assert grouped.dynamic.to_dict() == flat.dynamic.to_dict() != {}
    bigger = torch.randn(5, 256)
    torch.testing.assert_close(grouped(bigger), model(bigger))
    with pytest.raises(InputError, match=r"give it inside Dynamic\(batch=...\)"):
        graphopt.optimize(model, x, dynamic=Dynamic(batch=True), dynamic_batch=True)
    with pytest.raises(InputError, match="not both"):
        Dynamic(shapes={"x": {0: torch.export.Dim("b")}}, batch=True)


def test_pipeline_group(mlp) -> None:
    model, x = mlp
    fast = graphopt.optimize(model, x, pipeline=PassPipeline(passes=["remove-dropout", "cse", "dce"], disabled="cse"))
    assert [r.name for r in fast.report.records] == ["remove-dropout", "dce"]
    with pytest.raises(InputError, match=r"give it inside PassPipeline\(passes=...\)"):
        graphopt.optimize(model, x, pipeline=PassPipeline(), passes=["dce"])


@dataclass(frozen=True)
class ReluToSigmoid(Pass):
    """A broken pass: changes what the graph computes."""

    name = "relu-to-sigmoid"

    def run(self, gm: fx.GraphModule) -> PassResult:
        hits = [n for n in gm.graph.nodes if n.target == torch.ops.aten.relu.default]
        for node in hits:
            node.target = torch.ops.aten.sigmoid.default
        return PassResult(changed=bool(hits))


def test_verify_group_decides_what_a_broken_pass_does(mlp) -> None:
    model, x = mlp
    with pytest.raises(VerificationError, match="relu-to-sigmoid"):
        graphopt.optimize(model, x, pipeline=PassPipeline(passes=[ReluToSigmoid()]), verify=Verify(on_error="raise"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = graphopt.optimize(model, x, passes=[ReluToSigmoid()], verify=Verify(on_error="rollback"))
    assert any(issubclass(w.category, RollbackWarning) for w in caught)
    assert fast.report.rolled_back == ["relu-to-sigmoid"]
    with pytest.raises(InputError, match="'raise' or 'rollback'"):
        Verify(on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="tolerance_scale must be a number > 0"):
        Verify(tolerance_scale=0)
    with pytest.raises(InputError, match=r"optimize\(verify=...\) takes a graphopt.Verify\(...\) \(or True / False\)"):
        graphopt.optimize(model, x, verify="yes")  # type: ignore[arg-type]


def test_unknown_keyword_is_an_error_that_suggests_the_right_one(mlp) -> None:
    model, x = mlp
    with pytest.raises(InputError, match=r"unknown keyword argument 'quantise' \(did you mean 'quantize'\?\)"):
        graphopt.optimize(model, x, quantise="int8")


def test_lowering_config_replaces_the_targets_own(mlp) -> None:
    model, x = mlp
    lowering = CpuLowering(fuse=False, layout="contiguous", prepack=False)
    fast = graphopt.optimize(model, x, target="cpu", lowering=lowering)
    assert fast.target.lowering == lowering
    assert get_target("cpu").lowering == CpuLowering()
    torch.testing.assert_close(fast(*x), model(*x))
    with pytest.raises(InputError, match=r"target 'cpu' takes lowering=CpuLowering\(...\), got GpuLowering"):
        graphopt.optimize(model, x, target="cpu", lowering=GpuLowering())


def test_lowering_configs_and_compression_configs_are_top_level() -> None:
    from graphopt.targets.cpu.lowering import CpuLowering as Cpu
    from graphopt.targets.gpu.lowering import GpuLowering as Gpu
    from graphopt.targets.onnx.options import OnnxLowering

    assert graphopt.CpuLowering is Cpu and graphopt.GpuLowering is Gpu and graphopt.OnnxLowering is OnnxLowering
    for name in ("Int8Static", "Int8Dynamic", "WeightOnly", "KMeans", "Prune", "ReducedPrecision", "Dynamic",
                 "PassPipeline", "Verify", "OnnxLowering"):
        assert name in graphopt.__all__


# -- OptimizedModel's public properties, and who reads them ----------------------------------


def test_public_properties(mlp) -> None:
    model, x = mlp
    fast = graphopt.optimize(model, x[0], example_kwargs=None)
    assert fast.portable_graph is fast.graph_module  # on the CPU: the graph itself
    assert isinstance(fast.example_inputs, tuple) and fast.example_inputs[0] is x[0]
    kwargs = fast.example_kwargs
    kwargs["extra"] = 1
    assert fast.example_kwargs == {}  # a copy each time
    assert fast.signature == [((8, 256), torch.float32)]
    fast.check_inputs(*x)
    with pytest.raises(InputError):
        fast.check_inputs(torch.randn(8, 255))
    torch.testing.assert_close(fast(*fast.example_inputs, **fast.example_kwargs), model(*x))


def test_save_distill_analyze_and_partition_read_the_public_properties(mlp, tmp_path, monkeypatch) -> None:
    model, x = mlp
    fast = graphopt.optimize(model, x, prune=0.25)
    reads: Counter = Counter()
    for name in ("portable_graph", "example_inputs", "example_kwargs"):
        original = getattr(OptimizedModel, name)

        def counted(self: OptimizedModel, original: property = original, name: str = name):
            reads[name] += 1
            return original.fget(self)

        monkeypatch.setattr(OptimizedModel, name, property(counted))

    def uses(action) -> set[str]:
        reads.clear()
        action()
        return {name for name, count in reads.items() if count}

    assert {"portable_graph", "example_inputs"} <= uses(lambda: fast.save(tmp_path / "fast.pt2"))
    assert {"portable_graph", "example_inputs"} <= uses(lambda: fast.export_onnx(tmp_path / "fast.onnx"))
    assert {"portable_graph", "example_inputs"} <= uses(lambda: graphopt.analyze(fast, repeats=1))
    assert {"portable_graph", "example_inputs"} <= uses(
        lambda: graphopt.distill(fast, teacher=model, data=[x], epochs=1, check_batches=1))
    assert {"portable_graph", "example_inputs"} <= uses(
        lambda: graphopt.partition(fast, stages=2, balance="flops", repeats=1, refine=0))
    assert {"portable_graph"} <= uses(lambda: graphopt.optimize(fast, x))


def test_partition_of_an_optimized_model_splits_its_portable_graph(mlp) -> None:
    model, x = mlp
    fast = graphopt.optimize(model, x, prune=0.5)
    parts = graphopt.partition(fast, stages=2, balance="flops", repeats=1, refine=0)
    assert "its portable graph was partitioned" in " ".join(parts.report.notes)
    torch.testing.assert_close(parts(*x), fast(*x))
    with pytest.raises(InputError, match="give example inputs"):
        graphopt.partition(model, stages=2)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_save_load_does_not_import_the_model_it_saves() -> None:
    """The old optimize <-> save_load import cycle is gone: save_load knows graphs and metadata only."""
    imported = _imports(WORKFLOWS / "save_load.py")
    assert not {m for m in imported if m.startswith("graphopt.workflows")}


def test_no_workflow_reads_optimized_models_private_state() -> None:
    source = (WORKFLOWS / "optimized_model.py").read_text()
    tree = ast.parse(source)
    private = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")
               and isinstance(n.value, ast.Name) and n.value.id == "self"}
    private |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("_")
                and not n.name.startswith("__")}
    assert {"_example_args", "_check_call", "_signature"} <= private
    for path in WORKFLOWS.glob("*.py"):
        if path.name == "optimized_model.py":
            continue
        reads = {n.attr for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Attribute) and n.attr in private
                 and not (isinstance(n.value, ast.Name) and n.value.id == "self")}
        assert not reads, f"{path.name} reads OptimizedModel's private {sorted(reads)}"
