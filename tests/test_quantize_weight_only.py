"""Weight-only int8 / int4 quantization and K-means clustering: the IR, the kernels, ONNX, the CLI."""

from __future__ import annotations

import textwrap
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.cli.main import main
from graphopt.errors import InputError
from graphopt.ir.graph import snapshot_graph_module
from graphopt.passes.lossy.base import CalibrationData, output_cosine, output_sqnr_db
from graphopt.passes.quantize.kmeans import KMeansQuantize, kmeans_1d
from graphopt.passes.quantize.weight_only import WeightOnlyQuantize
from graphopt.passes.quantize.weight_ops import DEQUANTIZE_CODEBOOK, DEQUANTIZE_INT4, DEQUANTIZE_INT8, DEQUANTIZE_OPS
from graphopt.targets.base import LoweringContext
from graphopt.targets.common.lowering import run_lowering
from graphopt.targets.cpu import weight_only as lower_weight_only
from graphopt.targets.cpu.quantized import WEIGHT_ONLY_LOWERING

aten = torch.ops.aten


class Mlp(nn.Module):
    """Token embedding, three linears (one GPT-2 style addmm on a [K, N] weight), rows of unequal scale."""

    def __init__(self, vocab: int = 200, width: int = 128, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.up = nn.Linear(width, hidden)
        self.conv1d_weight = nn.Parameter(torch.randn(hidden, hidden) * 0.05)  # [K, N] like GPT-2's Conv1D
        self.conv1d_bias = nn.Parameter(torch.randn(hidden) * 0.1)
        self.down = nn.Linear(hidden, width)
        with torch.no_grad():
            self.up.weight.mul_(torch.logspace(-1, 1, hidden).unsqueeze(1))  # per-row scales differ 100x

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = torch.relu(self.up(x))
        shape = x.shape
        x = torch.addmm(self.conv1d_bias, x.reshape(-1, shape[-1]), self.conv1d_weight).reshape(shape)
        return self.down(torch.relu(x))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = Mlp().eval()
    ids = torch.randint(0, 200, (4, 16))
    captured = graphopt.capture(model, (ids,))
    return model, (ids,), captured


def _lower_weight_only_for_cpu(gm, captured):
    """The cpu target's lowering of ``gm``'s compressed weights, on a copy, every pass verified on the example."""
    context = LoweringContext(captured.example_args, captured.example_kwargs, on_error="raise")
    result = run_lowering(snapshot_graph_module(gm), WEIGHT_ONLY_LOWERING, context)
    return result.graph_module, result.stats


def _apply(captured, pass_):
    gm = captured.graph_module
    plan = pass_.plan(gm, CalibrationData(example=captured.flat_inputs))
    copy = snapshot_graph_module(gm)
    result = plan.apply(copy, frozenset())
    return plan, copy, result


def _buffer(gm, node):
    return getattr(gm, node.target)


def _dequantize_rows(gm, node):
    return node.target(*(_buffer(gm, a) for a in node.args))


def _compare(captured, gm):
    reference = [captured.graph_module(*captured.flat_inputs)]
    actual = [gm(*captured.flat_inputs)]
    return output_cosine(reference, actual), output_sqnr_db(reference, actual)


def test_int8_weight_only_per_channel_scales_and_accuracy(mlp):
    _, _, captured = mlp
    plan, gm, result = _apply(captured, WeightOnlyQuantize(bits=8))
    dequant = [n for n in gm.graph.nodes if n.target == DEQUANTIZE_INT8]
    assert len(plan.units) == len(dequant) == 4  # embedding, up, addmm (now linear), down
    assert result.stats["quantized"] == 4
    assert not any(n.target == aten.addmm.default for n in gm.graph.nodes)
    for node in dequant:
        q_weight, scale = _buffer(gm, node.args[0]), _buffer(gm, node.args[1])
        assert q_weight.dtype == torch.int8 and scale.shape == (q_weight.shape[0],)
        # symmetric per row: every row's largest |weight| lands on 127, whatever the row's scale (the
        # embedding's all-zero padding row stays exactly zero)
        row_max = q_weight.abs().amax(dim=1)
        assert torch.all((row_max == 127) | (_dequantize_rows(gm, node) == 0).all(dim=1))
    up = next(u for u in plan.units if u.details["weight"] == "up.weight")
    layer = next(n for n in gm.graph.nodes if n.name == up.name)
    scale = _buffer(gm, layer.args[1].args[1])
    assert scale.max() / scale.min() > 50  # one scale per output channel, not one per tensor
    assert up.details["size_ratio"] < 0.27
    cosine, sqnr = _compare(captured, gm)
    assert cosine > 0.9999 and sqnr > 35
    assert result.stats["weight_bytes_after"] < 0.27 * result.stats["weight_bytes_before"]


def test_int4_groupwise_layout_and_accuracy(mlp):
    _, _, captured = mlp
    _, gm, result = _apply(captured, WeightOnlyQuantize(bits=4, group_size=32))
    int4 = [n for n in gm.graph.nodes if n.target == DEQUANTIZE_INT4]
    assert len(int4) == 3 and result.stats["quantized"] == 4  # the embedding table is int8 per row
    for node in int4:
        packed, scale, zero_point = (_buffer(gm, a) for a in node.args[:3])
        rows, columns = node.meta["val"].shape
        assert packed.dtype == torch.uint8 and packed.shape == (rows, columns // 2)  # two 4-bit values per byte
        assert scale.shape == zero_point.shape == (rows, columns // 32) and node.args[3] == 32
        assert zero_point.is_floating_point()  # the grid starts at the group's minimum, wherever 0 falls
    cosine4, sqnr4 = _compare(captured, gm)
    _, gm8, _ = _apply(captured, WeightOnlyQuantize(bits=8))
    _, sqnr8 = _compare(captured, gm8)
    assert cosine4 > 0.99 and 15 < sqnr4 < sqnr8 - 10  # 4 bits: about 24 dB less signal-to-noise than 8
    assert result.stats["weight_bytes_after"] < 0.21 * result.stats["weight_bytes_before"]  # float scales, zero points


def test_int4_refuses_layers_it_cannot_group_per_layer():
    model = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 128), nn.Conv1d(128, 8, 1)).eval()

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner[2](self.inner[1](self.inner[0](x)))
            return self.inner[3](y.unsqueeze(-1))

    captured = graphopt.capture(Wrapped().eval(), (torch.randn(2, 96),))
    plan, gm, result = _apply(captured, WeightOnlyQuantize(bits=4, group_size=64))
    assert [u.details["weight"] for u in plan.units] == ["inner.2.weight"]
    reasons = result.near_misses["weight-only"]
    assert "in-features 96 not divisible by group_size 64 (choose a group size that divides it)" in reasons
    assert any("conv1d weight kept float" in r for r in reasons)
    assert _compare(captured, gm)[0] > 0.99


def test_bad_options_are_input_errors():
    with pytest.raises(InputError, match="must be 8 or 4"):
        WeightOnlyQuantize(bits=3)
    with pytest.raises(InputError, match="group_size"):
        WeightOnlyQuantize(bits=4, group_size=48)
    assert WeightOnlyQuantize(bits=8, group_size=128).group_size == 128  # group-wise int8
    with pytest.raises(InputError, match="int8_layers"):
        WeightOnlyQuantize(bits=8, int8_layers=("lm_head",))
    with pytest.raises(InputError, match=r"2\.\.256"):
        KMeansQuantize(clusters=1000)


def test_kmeans_1d_finds_the_clusters_and_is_deterministic():
    generator = torch.Generator().manual_seed(1)
    centres = torch.tensor([-1.0, 0.0, 2.5])
    noise = 0.01 * torch.randn(30000, generator=generator)
    values = centres[torch.randint(0, 3, (30000,), generator=generator)] + noise
    codebook, indices, _ = kmeans_1d(values, 3)
    assert torch.allclose(codebook.float(), centres, atol=0.01)
    assert (codebook[indices].float() - values).abs().max() < 0.1  # every value sits in its own cluster
    again, _, _ = kmeans_1d(values, 3)
    assert torch.equal(codebook, again)


@pytest.mark.parametrize("clusters", [16, 256])
def test_kmeans_codebook_size_indices_and_size_reduction(mlp, clusters):
    _, _, captured = mlp
    plan, gm, result = _apply(captured, KMeansQuantize(clusters=clusters))
    nodes = [n for n in gm.graph.nodes if n.target == DEQUANTIZE_CODEBOOK]
    assert len(nodes) == len(plan.units) == 4
    for node in nodes:
        indices, codebook = _buffer(gm, node.args[0]), _buffer(gm, node.args[1])
        weight = node.target(indices, codebook, *node.args[2:])
        assert indices.dtype == torch.uint8 and codebook.numel() == clusters
        assert torch.unique(weight).numel() == clusters  # exactly k shared values in the layer
        elements = weight.numel()
        assert indices.numel() == (elements + 1) // 2 if clusters == 16 else indices.numel() == elements
    for unit in plan.units:
        assert unit.details["distinct_values"] == clusters
        assert unit.details["size_ratio"] < (0.14 if clusters == 16 else 0.27)
    assert result.stats["bytes_saved"] > 0.7 * result.stats["weight_bytes_before"]
    assert _compare(captured, gm)[0] > (0.97 if clusters == 16 else 0.9995)  # one codebook for rows 100x apart


def test_cpu_lowering_runs_int8_and_int4_kernels(mlp, monkeypatch):
    _, _, captured = mlp
    monkeypatch.setattr(lower_weight_only, "CPU_KERNEL_CHOICE", "kernel")
    for bits, kernel in ((8, lower_weight_only.int8_weight_linear), (4, lower_weight_only.int4_weight_linear)):
        _, gm, _ = _apply(captured, WeightOnlyQuantize(bits=bits, group_size=32 if bits == 4 else None))
        lowered, counts = _lower_weight_only_for_cpu(gm, captured)
        targets = Counter(n.target for n in lowered.graph.nodes if n.op == "call_function")
        assert targets[kernel] == 3 and counts["int8_embedding_gathers"] == 1
        assert not any(t in DEQUANTIZE_OPS for t in targets)  # nothing dequantizes per call
        kept = [t for t in lowered.buffers() if t.dim() == 2 and t.numel() >= 128 * 128]
        assert kept and all(t.dtype in (torch.int8, torch.uint8) for t in kept)  # weights stay compressed
        reference = [gm(*captured.flat_inputs)]
        assert output_cosine(reference, [lowered(*captured.flat_inputs)]) > 0.9999  # bf16 activations


@pytest.mark.parametrize("clusters", [16, 256])
def test_codebook_embeddings_gather_rows_before_decoding(mlp, clusters):
    _, _, captured = mlp
    _, gm, _ = _apply(captured, KMeansQuantize(clusters=clusters))
    lowered, counts = _lower_weight_only_for_cpu(gm, captured)
    assert counts["codebook_embedding_gathers"] == 1
    tables = [n for n in lowered.graph.nodes if n.target == aten.embedding.default
              and getattr(lowered, n.args[0].target).dtype == torch.uint8]
    assert len(tables) == 1  # the table is gathered as indices, not as float weights
    torch.testing.assert_close(lowered(*captured.flat_inputs), gm(*captured.flat_inputs), rtol=1e-5, atol=1e-5)


def test_cpu_lowering_dequantize_once_is_exact(mlp, monkeypatch):
    _, _, captured = mlp
    monkeypatch.setattr(lower_weight_only, "CPU_KERNEL_CHOICE", "dequantize-once")
    _, gm, _ = _apply(captured, WeightOnlyQuantize(bits=8))
    lowered, counts = _lower_weight_only_for_cpu(gm, captured)
    assert counts["weights_dequantized_once"] == 3
    torch.testing.assert_close(lowered(*captured.flat_inputs), gm(*captured.flat_inputs), rtol=1e-5, atol=1e-5)


def _onnx_model(captured, pass_=None):
    from graphopt.targets.onnx.target import export_graph_to_onnx

    gm = captured.graph_module
    if pass_ is not None:
        _, gm, _ = _apply(captured, pass_)
    model = export_graph_to_onnx(gm, captured.flat_inputs, {})
    return model, model.ByteSize(), Counter(n.op_type for n in model.graph.node)


@pytest.fixture(scope="module")
def larger_mlp():
    torch.manual_seed(0)
    model, inputs = Mlp(vocab=1000, width=256, hidden=512).eval(), (torch.randint(0, 1000, (4, 16)),)  # 3.7 MB
    captured = graphopt.capture(model, inputs)
    return captured, _onnx_model(captured)[1]


def test_int8_onnx_file_carries_int8_weights(larger_mlp):
    captured, fp32_size = larger_mlp
    _, int8_size, int8_ops = _onnx_model(captured, WeightOnlyQuantize(bits=8))
    assert int8_ops["MatMulNBits"] == 6 and "Gather" in int8_ops
    assert int8_size <= 0.29 * fp32_size  # int8 weights as two 4-bit halves: 1 byte per weight plus scales


@pytest.mark.slow
def test_int4_and_kmeans_onnx_files_are_smaller_still(larger_mlp):
    captured, fp32_size = larger_mlp
    _, int4_size, int4_ops = _onnx_model(captured, WeightOnlyQuantize(bits=4, group_size=32))
    # the embedding table stays int8; each int4 group carries a float scale and a float offset (zero point)
    assert int4_ops["MatMulNBits"] == 3 and int4_size < 0.24 * fp32_size
    _, kmeans_size, kmeans_ops = _onnx_model(captured, KMeansQuantize(16))
    assert kmeans_ops["Gather"] >= 4 and kmeans_size < 0.16 * fp32_size


def test_optimize_onnx_int8_weight_only_runs_matmulnbits(mlp, tmp_path):
    model, inputs, _ = mlp
    fast = graphopt.optimize(model, inputs, target="onnx", quantize="int8-weight-only")
    assert output_cosine([model(*inputs)], [fast(*inputs)]) > 0.999
    path = fast.export_onnx(tmp_path / "int8.onnx")
    # two 4-bit halves per int8 layer
    assert Counter(n.op_type for n in onnx.load(str(path)).graph.node)["MatMulNBits"] == 6


def test_onnx_int4_float_zero_points_sum_groups_with_shared_matrices(mlp, tmp_path):
    """Float zero points: MatMulNBits plus per-group offsets, the group sums one product with a shared 0/1 matrix."""
    model, inputs, _ = mlp
    fast = graphopt.optimize(model, inputs, target="onnx", quantize=WeightOnlyQuantize(bits=4, group_size=32),
                             dynamic_batch=True)
    for batch in (4, 7):
        ids = torch.randint(0, 200, (batch, 16))
        assert output_cosine([fast.graph_module(ids)], [fast(ids)]) > 0.99999  # the graph's weights, exactly
    graph = onnx.load(str(fast.export_onnx(tmp_path / "int4.onnx"))).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["MatMulNBits"] == 3 and "ReduceSum" not in ops and "Shape" not in ops
    indicators = [i for i in graph.initializer if "nbits_groups" in i.name]
    assert sorted(tuple(i.dims) for i in indicators) == [(128, 4), (256, 8)]  # one per input width, not per layer


def test_optimize_cpu_int8_weight_only_reports_units_and_kernels(mlp):
    model, inputs, _ = mlp
    fast = graphopt.optimize(model, inputs, target="cpu", quantize="int8-weight-only")
    assert output_cosine([model(*inputs)], [fast(*inputs)]) > 0.999
    text = str(fast.report)
    assert "weight-only-quantize" in text and "int8_embedding_gathers" in text


def test_save_and_load_keep_the_compressed_weights(mlp, tmp_path, monkeypatch):
    model, inputs, _ = mlp
    monkeypatch.setattr(lower_weight_only, "CPU_KERNEL_CHOICE", "dequantize-once")  # same lowering after load
    fast = graphopt.optimize(model, inputs, target="cpu", quantize="int4-weight-only")
    float_file = graphopt.optimize(model, inputs, target="cpu").save(tmp_path / "float.pt2")
    path = fast.save(tmp_path / "int4.pt2")
    assert path.stat().st_size < 0.25 * float_file.stat().st_size
    loaded = graphopt.load(path)
    assert Counter(n.target for n in loaded.graph_module.graph.nodes)[DEQUANTIZE_INT4] == 3
    torch.testing.assert_close(loaded(*inputs), fast(*inputs))


MODEL_FILE = textwrap.dedent("""
    import torch
    import torch.nn as nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()

    def batches():
        torch.manual_seed(1)
        return [(torch.randn(4, 64),) for _ in range(3)]
""")


def test_cli_quantize_with_npz_calibration(tmp_path, capsys):
    model_file = tmp_path / "model.py"
    model_file.write_text(MODEL_FILE)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((10, 64)).astype(np.float32))
    out = tmp_path / "q.onnx"
    code = main(["optimize", f"{model_file}:build", "--input-shape", "4,64", "--target", "onnx",
                 "--quantize", "int8-weight-only", "--calibration", str(data), "--fidelity-cosine", "0.995",
                 "-o", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "weight-only-quantize" in text and "output cosine >= 0.995" in text
    assert Counter(n.op_type for n in onnx.load(str(out)).graph.node)["MatMulNBits"] == 4  # two 4-bit halves each
    held_out = tmp_path / "held_out.npz"
    np.savez(held_out, x=np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32))
    code = main(["optimize", f"{model_file}:build", "--input-shape", "4,64", "--target", "onnx",
                 "--quantize", "int8-weight-only", "--calibration", str(data), "--validation", str(held_out),
                 "-o", str(out)])
    assert code == 0
    assert "budgets judged on 2 validation batch(es)" in capsys.readouterr().out


def test_cli_gptq_rounding_needs_a_weight_only_scheme(tmp_path, capsys):
    model_file = tmp_path / "model.py"
    model_file.write_text(MODEL_FILE)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
    common = ["optimize", f"{model_file}:build", "--input-shape", "4,64", "--calibration", str(data),
              "--fidelity-cosine", "0.9", "-o", str(tmp_path / "q.pt2")]
    assert main([*common, "--quantize", "int4-weight-only", "--rounding", "gptq"]) == 0
    assert "GPTQ rounding" in capsys.readouterr().out
    assert main([*common, "--quantize", "int8-dynamic", "--rounding", "gptq"]) == 2
    assert "--rounding chooses how weight-only quantization rounds" in capsys.readouterr().err


def test_calibration_files_cut_batches_and_explain_mistakes(tmp_path):
    from graphopt.cli.calibration_files import load_calibration

    example = (torch.zeros(4, 64), torch.zeros(4, 3, dtype=torch.int64))
    data = tmp_path / "two.npz"
    np.savez(data, a=np.ones((10, 64), np.float64), b=np.ones((10, 3), np.int32))
    batches = load_calibration(str(data), example)
    assert len(batches) == 2 and batches[1][0].shape == (4, 64)  # 10 samples: two batches of 4, 2 dropped
    assert batches[0][0].dtype == torch.float32 and batches[0][1].dtype == torch.int64
    with pytest.raises(InputError, match="holds 2 array"):
        load_calibration(str(data), example[:1])
    bad = tmp_path / "bad.npz"
    np.savez(bad, a=np.ones((10, 65)), b=np.ones((10, 3)))
    with pytest.raises(InputError, match="other dims must match"):
        load_calibration(str(bad), example)
    factory = tmp_path / "data.py"
    factory.write_text(MODEL_FILE)
    assert len(list(load_calibration(f"{factory}:batches", example))) == 3
    with pytest.raises(InputError, match=r"\.npz file"):
        load_calibration("nothing", example)


@pytest.mark.slow
def test_real_minilm_int8_weight_only_keeps_sentence_embeddings():
    from graphopt.bench import zoo

    try:
        entry = zoo.load("minilm", size="full", batch=8)
    except zoo.ModelUnavailableError as error:
        pytest.skip(str(error))
    fast = graphopt.optimize(entry.model, entry.example_inputs, target="cpu", quantize="int8-weight-only")
    reference = entry.model(*entry.example_inputs)
    embeddings = fast(*entry.example_inputs)
    assert output_cosine([reference], [embeddings]) >= 0.99

    def top_pairs(e: torch.Tensor) -> list[tuple[int, int]]:
        unit = torch.nn.functional.normalize(e, dim=1)
        similarity = (unit @ unit.T).triu(diagonal=1)
        order = similarity.flatten().argsort(descending=True)[:3]
        return sorted((int(i) // len(e), int(i) % len(e)) for i in order)

    # the three paraphrase pairs of the zoo's sentences stay the three most similar, float and int8
    assert top_pairs(reference) == top_pairs(embeddings) == [(0, 1), (2, 7), (3, 5)]


@pytest.mark.gpu
def test_weight_only_graph_runs_on_gpu(mlp):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    model, inputs, _ = mlp
    fast = graphopt.optimize(model, inputs, target="gpu", quantize="int8-weight-only")
    out = fast(*inputs)
    assert output_cosine([model(*inputs)], [out.cpu()]) > 0.999


def test_quantize_front_object_forwards_embeddings_to_the_weight_only_pass() -> None:
    from graphopt.passes import Quantize

    class EmbedThenProject(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(1000, 64)
            self.project = torch.nn.Linear(64, 64)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.project(self.embed(ids))

    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    kinds = {}
    for embeddings in (True, False):
        fast = graphopt.optimize(EmbedThenProject(), (ids,),
                                 quantize=Quantize(scheme="int8-weight-only", embeddings=embeddings))
        section = next(s for s in fast.report.sections if s.title.endswith("per unit"))
        kinds[embeddings] = sorted(row[section.headers.index("kind")] for row in section.rows)
    assert "embedding" in kinds[True] and "embedding" not in kinds[False]
    assert "linear" in kinds[False]
