"""Layer partitioning: the balanced split, routing of shared values, the runtime, save/load, errors."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.analysis.balanced_split import PartitionError, balanced_split, stage_costs
from graphopt.bench import zoo
from graphopt.cli.main import main as cli_main
from graphopt.passes.split_stages import Partition, is_partitioned, stage_modules
from graphopt.workflows.partition import PartitionReport, load_stages, predict_throughput, read_manifest


@pytest.fixture(autouse=True)
def one_thread():
    """Time stages with one intra-op thread: on a busy machine, waits for a second thread dominate tiny stages."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

class LinearChain(nn.Module):
    """Bias-free linear layers only: layer i costs exactly 2 * d_i * d_(i+1) FLOPs per sample."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SkipNet(nn.Module):
    """The input and an early feature map are used again at the very end: skips that span any cut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(4)])
        self.head = nn.Conv2d(8 + 8 + 3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        early = torch.relu(self.stem(x))
        late = self.body(early)
        return self.head(torch.cat([late, early, x], dim=1)).mean((2, 3))


def _bert(layers: int, batch: int = 4) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A small BERT encoder (random weights) and inputs whose odd rows pad their last quarter."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    model = zoo.LastHiddenState(BertModel(config, add_pooling_layer=False)).eval()
    ids = torch.randint(0, 100, (batch, 8))
    mask = torch.ones(batch, 8, dtype=torch.long)
    mask[1::2, 6:] = 0
    return model, (ids, mask)


def _brute_force(costs: list[float], stages: int, cut_bytes: list[float]) -> tuple[float, float]:
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = [0, *cuts]
        key = (max(stage_costs(costs, bounds)), sum(cut_bytes[c] for c in cuts))
        best = key if best is None or key < best else best
    assert best is not None
    return best


# ------------------------------------------------------------------------------ the algorithm


def test_balanced_split_is_optimal_against_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        count = int(torch.randint(3, 10, (1,), generator=generator))
        stages = int(torch.randint(1, min(4, count) + 1, (1,), generator=generator))
        costs = torch.randint(1, 30, (count,), generator=generator).tolist()
        cut_bytes = torch.randint(0, 100, (count + 1,), generator=generator).tolist()
        bounds = balanced_split(costs, stages, cut_bytes=cut_bytes, tolerance=0.0)
        got = (max(stage_costs(costs, bounds)), sum(cut_bytes[c] for c in bounds[1:]))
        assert got == _brute_force(costs, stages, cut_bytes)


def test_tie_break_prefers_small_cuts_within_tolerance() -> None:
    costs = [10, 10, 10, 2, 9, 10, 10]  # cut before item 3: 30 | 31; before item 4: 32 | 29
    cut_bytes = [0, 50, 50, 1000, 1, 50, 50, 0]  # ... but the first cut carries 1000 bytes, the second 1
    assert balanced_split(costs, 2, cut_bytes=cut_bytes, tolerance=0.0) == [0, 3]
    assert balanced_split(costs, 2, cut_bytes=cut_bytes, tolerance=0.05) == [0, 4]


def test_forbidden_cuts_and_memory_cap() -> None:
    costs = [1, 1, 1, 1]
    assert balanced_split(costs, 2, allowed=[True, True, False, True, True]) in ([0, 1], [0, 3])
    weights = [100, 100, 100, 100]
    assert balanced_split(costs, 2, weight_bytes=weights, peak_bytes=[0] * 4, memory_cap=200) == [0, 2]
    with pytest.raises(PartitionError, match="memory cap"):
        balanced_split(costs, 2, weight_bytes=weights, peak_bytes=[0] * 4, memory_cap=150)
    with pytest.raises(PartitionError, match="at least one"):
        balanced_split(costs, 5)


# ------------------------------------------------------------------------- on a real graph


def test_synthetic_graph_with_known_costs_gets_the_optimal_split() -> None:
    # per-layer costs d_i * d_(i+1) = 64, 16, 16, 32, 32, 64: the only split of 3 stages with a
    # bottleneck of 80 is [64, 16] [16, 32, 32] [64]
    model = LinearChain([8, 8, 2, 8, 4, 8, 8])
    parts = graphopt.partition(model, (torch.randn(4, 8),), stages=3, balance="flops", repeats=1)
    weights = [sum(p.numel() for p in stage.parameters()) for stage in parts.stages]
    assert weights == [64 + 16, 16 + 32 + 32, 64]
    assert [s.flops for s in parts.report.stages] == [2 * 4 * 80, 2 * 4 * 80, 2 * 4 * 64]
    x = torch.randn(8, 8)
    torch.testing.assert_close(parts(x), model(x), rtol=0, atol=1e-6)


def test_routing_of_masks_and_skips_and_micro_batches() -> None:
    model, inputs = _bert(layers=4)  # the attention mask is used by every layer
    parts = graphopt.partition(model, inputs, stages=4, balance="flops", repeats=1, optimize=False)
    manifest = parts.manifest
    stage_inputs = [set(s["inputs"]) for s in manifest["stages"]]
    shared = stage_inputs[1] & stage_inputs[2] & stage_inputs[3]
    assert shared, "the mask computed in stage 0 reaches every later stage"
    assert all(manifest["routed"][name] == [1, 2] for name in shared)  # passed on untouched by stages 1 and 2
    assert parts.microbatches == 4
    ids, mask = (torch.cat([t, t[:2]]) for t in inputs)  # another batch size: 6
    with torch.no_grad():
        expected = model(ids, mask)
    torch.testing.assert_close(parts(ids, mask), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(parts.run((ids, mask), microbatches=2), expected, rtol=0, atol=1e-5)

    model = SkipNet().eval()
    cnn = graphopt.partition(model, (torch.randn(2, 3, 8, 8),), stages=4, balance="flops", repeats=1, optimize=False)
    last = cnn.manifest["stages"][-1]["inputs"]
    assert "x" in last, "the model input is routed to the last stage for the final concatenation"
    assert cnn.manifest["routed"]["x"] == [0, 1, 2]
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(cnn(x), model(x), rtol=0, atol=1e-5)


def test_each_stage_holds_only_its_own_weights_and_the_report_adds_up(tmp_path) -> None:
    model = SkipNet().eval()
    parts = graphopt.partition(model, (torch.randn(2, 3, 8, 8),), stages=2, repeats=2, refine=1, optimize=False)
    total = sum(p.numel() for p in model.parameters())
    assert sum(sum(p.numel() for p in s.parameters()) for s in parts.stages) == total
    report = parts.report
    assert report.balance >= 1.0 and report.balance == pytest.approx(
        max(s.seconds for s in report.stages) / (sum(s.seconds for s in report.stages) / 2))
    assert report.cut_bytes == [report.stages[1].input_bytes]
    assert report.throughput is not None and report.throughput.microbatches == 2
    assert report.throughput.bubble_fraction == pytest.approx(1 / 3)
    html = report.to_html(tmp_path / "partition.html").read_text()
    assert "Pipeline stages" in html and "Bytes crossing each cut" in html and "<svg" in html
    assert "Pipeline stages" in str(report)
    assert PartitionReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_throughput_model() -> None:
    prediction = predict_throughput([0.010, 0.020], [1e6], microbatches=4, batch=8, link_bandwidth=1e8,
                                    link_latency=0.0, stage_overhead=0.0)
    # per micro-batch: stage 0 + transfer 10 ms + 10 ms, stage 1 20 ms; 20+20 + 3 x 20
    assert prediction.step_seconds == pytest.approx(0.1)
    assert prediction.samples_per_second == pytest.approx(80)
    assert prediction.bubble_fraction == pytest.approx(1 / 5)


def test_throughput_model_counts_runtime_overheads() -> None:
    prediction = predict_throughput([0.010, 0.020], [1e6], microbatches=4, batch=8, link_bandwidth=1e8,
                                    link_latency=0.001, stage_overhead=0.002, cut_tensors=[3], step_overhead=0.004)
    # stage 0: 10 + 2 + (3 x 1 + 10) = 25 ms, stage 1: 20 + 2 = 22 ms; 25 + 22 + 3 x 25 + 4
    assert prediction.transfer_seconds == [pytest.approx(0.013)]
    assert prediction.step_seconds == pytest.approx(0.126)


def test_partition_pass_composes_after_the_default_pipeline() -> None:
    model = SkipNet().eval()
    x = torch.randn(2, 3, 8, 8)
    fast = graphopt.optimize(model, (x,), passes=[*graphopt.DEFAULT_PIPELINE, Partition(stages=3, balance="flops")])
    assert is_partitioned(fast.graph_module) and len(stage_modules(fast.graph_module)) == 3
    assert [r.status for r in fast.report.records if r.name == "partition"] == ["changed"]
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-5)
    timed = graphopt.optimize(model, (x,), passes=["partition"])  # by name, balanced on measured time
    assert len(stage_modules(timed.graph_module)) == 2


def test_save_and_load_stages(tmp_path) -> None:
    entry = zoo.load("bert", size="small", batch=2)
    parts = graphopt.partition(entry.model, entry.example_inputs, stages=2, balance="flops", optimize=False)
    directory = parts.save(tmp_path / "stages")
    assert sorted(p.name for p in directory.iterdir()) == [
        "example_inputs.pt", "manifest.json", "stage_0.pt2", "stage_1.pt2"]
    example = torch.load(directory / "example_inputs.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(example, entry.example_inputs, strict=True))
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["microbatch_dim"] == 0 and manifest["inputs"] == parts.manifest["inputs"]
    loaded = load_stages(directory)
    ids, mask = (torch.cat([t, t, t]) for t in entry.example_inputs)  # batch 6: the stages keep a dynamic batch
    with torch.no_grad():
        expected = entry.model(ids, mask)
    torch.testing.assert_close(loaded(ids, mask), expected, rtol=0, atol=1e-5)
    os.remove(directory / "stage_1.pt2")
    with pytest.raises(graphopt.SaveFileError, match="stage file missing"):
        load_stages(directory)
    os.remove(directory / "manifest.json")
    with pytest.raises(graphopt.SaveFileError, match=r"manifest\.json"):
        read_manifest(directory)


def test_bad_input_errors(tmp_path, monkeypatch) -> None:
    model = LinearChain([4, 4, 4])
    with pytest.raises(PartitionError, match="only 2 layer"):
        graphopt.partition(model, (torch.randn(2, 4),), stages=3, balance="flops")
    with pytest.raises(PartitionError, match="memory cap"):
        graphopt.partition(model, (torch.randn(2, 4),), stages=2, balance="flops", memory_cap=16)
    parts = graphopt.partition(model, (torch.randn(2, 4),), stages=2, balance="flops", repeats=1)
    directory = parts.save(tmp_path / "stages")
    from graphopt.workflows.distributed import run_pipeline

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(PartitionError, match="2 stages but 3 processes"):
        run_pipeline(directory, None, 1, None)


def test_cli_partition_writes_stages(tmp_path, capsys) -> None:
    source = tmp_path / "models.py"
    source.write_text(
        "import torch\n"
        "def build():\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))\n"
        "    return model, (torch.randn(4, 8),)\n"
    )
    status = cli_main(["partition", f"{source}:build", "--stages", "2", "--balance", "flops",
                       "-o", str(tmp_path / "stages")])
    assert status == 0
    assert "torchrun --nproc-per-node 2 -m graphopt.pipeline" in capsys.readouterr().out
    assert read_manifest(tmp_path / "stages")["stages"][1]["file"] == "stage_1.pt2"


@pytest.mark.slow
def test_stages_export_to_onnx(tmp_path) -> None:
    model = SkipNet().eval()
    x = torch.randn(2, 3, 8, 8)
    parts = graphopt.partition(model, (x,), stages=2, balance="flops", repeats=1)
    paths = parts.export_onnx(tmp_path)
    assert [p.name for p in paths] == ["stage_0.onnx", "stage_1.onnx"]
    import onnxruntime as ort

    values = [x.numpy()]
    for path in paths:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = dict(zip([i.name for i in session.get_inputs()], values, strict=True))
        values = session.run(None, feed)
    torch.testing.assert_close(torch.from_numpy(values[0]), model(x), rtol=0, atol=1e-5)
    import onnx

    older = parts.export_onnx(tmp_path / "opset17", opset=17)
    assert all(next(o.version for o in onnx.load(str(p)).opset_import if o.domain == "") == 17 for p in older)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stages_on_cuda_pipeline_correctly() -> None:
    entry = zoo.load("bert", size="small", batch=4)
    parts = graphopt.partition(entry.model, entry.example_inputs, stages=2, balance="flops", repeats=1,
                               devices=["cuda:0", "cuda:0"])
    assert all(next(s.parameters()).is_cuda for s in parts.stages)
    with torch.no_grad():
        expected = entry.model(*entry.example_inputs)
    out = parts(*entry.example_inputs)
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)


class DictOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> dict:
        h = self.a(x)
        return {"early": h, "none": None, "out": self.b(torch.relu(h)), "x": x}


def test_output_structure_literals_and_passthrough_outputs(tmp_path) -> None:
    model = DictOutputs()
    x = torch.randn(4, 4)
    parts = graphopt.partition(model, (x,), stages=2, balance="flops", optimize=False)
    expected = model(x)
    for got in (parts(x), load_stages(parts.save(tmp_path / "stages"))(x)):
        assert list(got) == ["early", "none", "out", "x"] and got["none"] is None
        for key in ("early", "out", "x"):
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


def test_no_cut_separates_a_tuple_from_its_users() -> None:
    from graphopt.analysis.balanced_split import graph_items
    from graphopt.ir.capture import capture

    class Halves(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = torch.split(torch.relu(x), 4, dim=1)  # one node with a tuple value, two getitems
            return torch.tanh(a) * torch.sigmoid(b)

    gm = capture(Halves(), (torch.randn(2, 8),)).graph_module
    items = graph_items(gm)
    names = [n.name for n in items.nodes]
    split = next(i for i, n in enumerate(items.nodes) if "split" in str(n.target))
    last_getitem = max(i for i, n in enumerate(items.nodes) if n.args and n.args[0] is items.nodes[split])
    assert not items.allowed[split + 1 : last_getitem + 1].any(), names
    assert items.allowed[split] and items.allowed[last_getitem + 1]
    # the bytes live across a cut: relu's output (2 x 8 floats) before the split
    assert items.cut_bytes[split] == 2 * 8 * 4


def test_devices_one_per_stage() -> None:
    model = LinearChain([8, 8, 8, 8])
    x = torch.randn(4, 8)
    parts = graphopt.partition(model, (x,), stages=2, balance="flops", optimize=False, devices=["cpu", "cpu"])
    assert parts.devices == [torch.device("cpu")] * 2 and [s.device for s in parts.report.stages] == ["cpu"] * 2
    torch.testing.assert_close(parts(x), model(x), rtol=0, atol=1e-6)
    with pytest.raises(graphopt.InputError, match="one device per stage"):
        parts.to_devices(["cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(graphopt.DeviceUnavailableError, match="CUDA is not available"):
            parts.to_devices(["cuda:0", "cuda:1"])
