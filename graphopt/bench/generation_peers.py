"""Peer backends of the text-generation benchmark: transformers, llama.cpp and onnxruntime-genai.

Every backend runs greedy decoding of a fixed number of new tokens (end-of-sequence is
never chosen: transformers gets ``min_new_tokens``, onnxruntime-genai ``min_length``,
llama.cpp has its end-of-generation tokens masked before the argmax), and reports the
time to the first new token (prefill) apart from the time of the remaining ones (decode):

* ``transformers-eager``: ``model.generate`` with the default dynamic cache. The split is
  taken by a streamer (``FirstTokenClock``): ``generate`` hands the streamer the prompt
  before the prefill and then each new token as soon as it is chosen, so the second
  ``put`` marks the first new token.
* ``transformers-static-compile``: the same with ``cache_implementation="static"`` and a
  ``transformers.CompileConfig`` (mode "reduce-overhead", transformers' default), which
  makes ``generate`` ``torch.compile`` the decode-step forward (the prefill stays eager).
  On CPU transformers only compiles when the config's ``_compile_all_devices`` is set.
  ``setup`` runs a warm-up generate so the compilation is not timed; a new batch or cache
  length can still recompile once, which ``measure_peers``'s warm-up call absorbs.
* ``llama.cpp``: llama-cpp-python on the GGUF file itself (a quantized model runs
  quantized: that is the peer's native format); one sequence at a time. Its logits are
  read after each ``eval`` (``logits_all=False`` keeps only the last position's) and
  argmaxed with the end-of-generation tokens masked. It multiplies with int8-quantized
  activations, so where two logits nearly tie its greedy text can leave transformers'
  (SmolLM2's chat answer starts "L'Étoile" instead of "The capital", 24.74 vs 24.65).
* ``onnxruntime-genai-fp32`` / ``onnxruntime-genai-int4`` / ``onnxruntime-genai-int4-int8-head`` (the
  LM head kept in int8, as graphopt's budget keeps SmolLM2's): the model builder of
  onnxruntime-genai converts ``source.model`` (saved with ``save_pretrained``) once; the
  converted folder is cached under ``source.workdir`` keyed by a hash of the GGUF path
  and size.

The peers are optional packages, deliberately not in requirements-ci.txt (building
llama.cpp takes minutes); a backend whose package is absent says so in ``skip_reason``::

    pip install llama-cpp-python      # builds llama.cpp from source (~5 min on 2 cores)
    pip install onnxruntime-genai     # 0.18 wheels need onnxruntime>=1.31 (keeps 1.32)

    >>> source = load_gguf_source(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> rows = measure_peers(source, [ids_b1_p64, ids_b4_p512], max_new_tokens=128,
    ...                      backends=["transformers-eager", "llama.cpp"])
    >>> print(rows_to_markdown(rows))
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from graphopt.ir.threads import torch_threads

__all__ = [
    "BACKEND_NAMES",
    "FirstTokenClock",
    "GenerationBackend",
    "GenerationRun",
    "GenerationSource",
    "LlamaCppBackend",
    "OrtGenaiBackend",
    "TransformersEagerBackend",
    "TransformersStaticCompileBackend",
    "default_cache_dir",
    "load_gguf_source",
    "make_generation_backend",
    "measure_peers",
    "rows_to_markdown",
]

ORT_GENAI_VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fp32": ("fp32", ()),
    "int4": ("int4", ()),
    "int4-int8-head": ("int4", ("matmul_mixed_precision=last_matmul:int8", "shared_embeddings=false")),
}
"""onnxruntime-genai rows: the builder's precision and ``--extra_options``. ``int4-int8-head`` keeps the LM head
in int8, as graphopt's default budget does on SmolLM2 (with the embedding shared, the builder writes a file
onnxruntime cannot load, so the embedding gets its own float copy)."""

BACKEND_NAMES = ("transformers-eager", "transformers-static-compile", "llama.cpp",
                 *(f"onnxruntime-genai-{variant}" for variant in ORT_GENAI_VARIANTS))
"""The peers ``make_generation_backend`` knows, in the order ``measure_peers`` runs them."""

AGREEMENT_TOKENS = 32
"""How many leading new tokens a row must share with transformers-eager to count as agreeing."""

Progress = Callable[[str], None]


def _stderr_progress(message: str) -> None:
    print(f"[generation-peers {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_cache_dir() -> Path:
    """Where converted models are kept between runs: ``$GRAPHOPT_CACHE`` or ~/.cache/graphopt, then ``bench``."""
    root = os.environ.get("GRAPHOPT_CACHE") or Path.home() / ".cache" / "graphopt"
    return Path(root) / "bench"


# ------------------------------------------------------------------------------ interface


@dataclass
class GenerationRun:
    """One greedy generation: the ids (prompt then new tokens, like ``generate``) and its two timings.

    ``prompt_len`` is the padded prompt length (``input_ids.shape[1]``), so ``tokens[:, prompt_len:]``
    are the new tokens.
    """

    tokens: torch.Tensor
    prefill_seconds: float
    decode_seconds: float
    prompt_len: int

    @property
    def batch(self) -> int:
        """Number of sequences."""
        return int(self.tokens.shape[0])

    @property
    def new_tokens(self) -> torch.Tensor:
        """The generated ids, ``[batch, new]``."""
        return self.tokens[:, self.prompt_len:]

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens processed per second, all rows together: ``batch * prompt_len / prefill_seconds``."""
        return self.batch * self.prompt_len / self.prefill_seconds

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first per second, all rows together: ``batch * (new - 1) / decode_seconds``."""
        return self.batch * (self.new_tokens.shape[1] - 1) / self.decode_seconds


_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path"})
"""Config entries ``save_pretrained`` fills in or rewrites: left out of the cache key."""


@dataclass
class GenerationSource:
    """What every backend may start from: the fp32 model, its tokenizer, the GGUF file, a cache folder."""

    model: transformers.PreTrainedModel
    tokenizer: Any
    gguf_path: str | None = None
    workdir: Path = field(default_factory=default_cache_dir)

    def cache_key(self) -> str:
        """Hash naming this model's conversions: the GGUF path and size, else the config and weights."""
        digest = hashlib.sha256()
        if self.gguf_path is not None:
            path = Path(self.gguf_path).resolve()
            digest.update(f"{path}:{path.stat().st_size}".encode())
        else:
            config = {k: v for k, v in self.model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
            digest.update(json.dumps(config, sort_keys=True, default=str).encode())
            for tensor in self.model.state_dict().values():
                digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


class GenerationBackend:
    """A way of generating text greedily; subclasses implement ``setup`` and ``generate``.

    ``generate`` takes left-padded ``input_ids`` / ``attention_mask`` (``[batch, prompt]``)
    and returns exactly ``max_new_tokens`` new ids per row.
    """

    name: str = "backend"
    warmup_full_length: bool = False
    """Whether a warm-up must generate as many tokens as the timed calls (compiled shapes depend on it)."""

    def skip_reason(self) -> str | None:
        """Why this backend cannot run here (e.g. its package is missing), or None when it can."""
        return None

    def setup(self, source: GenerationSource) -> None:
        """Build or load everything ``generate`` needs (the caller times this)."""
        raise NotImplementedError

    def supports_batch(self, batch: int) -> bool:
        """Whether ``generate`` accepts ``batch`` sequences at once."""
        return True

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> GenerationRun:
        """Greedy-decode ``max_new_tokens`` new tokens after each (left-padded) prompt."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what ``setup`` loaded."""


def _check_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be at least 2 (one prefill token, one decode token), "
                         f"got {max_new_tokens}")


def _row_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor, row: int) -> list[int]:
    """The unpadded prompt ids of one row."""
    return input_ids[row][attention_mask[row].bool()].tolist()


# ------------------------------------------------------------------------------ transformers


class FirstTokenClock(BaseStreamer):
    """Streamer recording when ``generate`` produced its first new token (its second ``put``)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        """Called by ``generate``: first with the prompt, then with each new token."""
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        """Called by ``generate`` when it finishes."""


class TransformersEagerBackend(GenerationBackend):
    """``model.generate`` with the default dynamic cache; prefill/decode split by a streamer."""

    name = "transformers-eager"

    def __init__(self) -> None:
        self.model: transformers.PreTrainedModel | None = None
        self.pad_token_id: int | None = None

    def setup(self, source: GenerationSource) -> None:
        """Keep the source model (no copy: generation does not change weights)."""
        self.model = source.model.eval()
        tokenizer = source.tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)

    def _generate_kwargs(self) -> dict[str, Any]:
        return {}

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> GenerationRun:
        """Greedy ``generate`` with ``min_new_tokens == max_new_tokens``, timed around the call."""
        _check_new_tokens(max_new_tokens)
        assert self.model is not None, "call setup() first"
        clock = FirstTokenClock()
        with torch.inference_mode():
            start = time.perf_counter()
            tokens = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=self.pad_token_id,
                streamer=clock, **self._generate_kwargs(),
            )
            end = time.perf_counter()
        assert clock.first_token_at is not None, "generate produced no token"
        # cloned outside inference mode: callers may edit the ids in place
        return GenerationRun(tokens.cpu().clone(), clock.first_token_at - start, end - clock.first_token_at,
                             int(input_ids.shape[1]))

    def close(self) -> None:
        """Drop the reference to the model."""
        self.model = None


class TransformersStaticCompileBackend(TransformersEagerBackend):
    """``generate`` with a static cache and transformers' automatic ``torch.compile`` of the decode step."""

    name = "transformers-static-compile"
    warmup_full_length = True  # the static cache's length is part of the compiled graph

    def __init__(self, mode: str = "reduce-overhead", warmup_prompt_len: int = 8) -> None:
        super().__init__()
        self.mode = mode
        self.warmup_prompt_len = warmup_prompt_len
        self.compile_config = transformers.CompileConfig(mode=mode)
        self.compile_config._compile_all_devices = True  # transformers compiles only on GPUs unless this is set

    def _generate_kwargs(self) -> dict[str, Any]:
        return {"cache_implementation": "static", "compile_config": self.compile_config}

    def setup(self, source: GenerationSource) -> None:
        """Keep the model and compile its forward with one short warm-up generate."""
        super().setup(source)
        vocab = int(source.model.config.vocab_size)
        ids = torch.arange(self.warmup_prompt_len).remainder(vocab).unsqueeze(0)
        self.generate(ids, torch.ones_like(ids), max_new_tokens=4)


# ------------------------------------------------------------------------------ llama.cpp


class LlamaCppBackend(GenerationBackend):
    """llama-cpp-python on the GGUF file; prefill = ``eval(prompt)`` + argmax, decode = one token per ``eval``."""

    name = "llama.cpp"

    def __init__(self, threads: int | None = None, n_ctx: int = 4096) -> None:
        self.threads = threads or _usable_cores()
        self.n_ctx = n_ctx
        self.llm: Any = None
        self.gguf_path: str | None = None
        self.banned: list[int] = []

    def skip_reason(self) -> str | None:
        """Missing package (``pip install llama-cpp-python``)."""
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed (pip install llama-cpp-python)"
        return None

    def setup(self, source: GenerationSource) -> None:
        """Load the GGUF with ``n_threads`` = the usable cores."""
        if source.gguf_path is None:
            raise ValueError("llama.cpp needs source.gguf_path (a GGUF file)")
        import llama_cpp

        self.gguf_path = source.gguf_path
        self.llm = llama_cpp.Llama(model_path=source.gguf_path, n_ctx=self.n_ctx, n_batch=512,
                                   n_threads=self.threads, n_threads_batch=self.threads,
                                   logits_all=False, verbose=False)
        vocab = self.llm.n_vocab()
        self.banned = [t for t in range(vocab) if llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, t)]

    def supports_batch(self, batch: int) -> bool:
        """One sequence at a time (llama-cpp-python's high-level API is single-sequence)."""
        return batch == 1

    def _next_token(self) -> int:
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),)).copy()
        logits[self.banned] = -np.inf
        token = int(np.argmax(logits))
        return token

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> GenerationRun:
        """Greedy decoding of the single (unpadded) prompt."""
        _check_new_tokens(max_new_tokens)
        if input_ids.shape[0] != 1:
            raise ValueError("llama.cpp backend runs one sequence at a time")
        prompt = _row_prompt(input_ids, attention_mask, 0)
        if len(prompt) + max_new_tokens > self.n_ctx:
            raise ValueError(f"prompt + new tokens exceed n_ctx={self.n_ctx}")
        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        new = [self._next_token()]
        first_at = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            llm.eval([new[-1]])
            new.append(self._next_token())
        end = time.perf_counter()
        tokens = torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype)], dim=1)
        return GenerationRun(tokens, first_at - start, end - first_at, int(input_ids.shape[1]))

    def close(self) -> None:
        """Free the llama.cpp model and context."""
        if self.llm is not None:
            self.llm.close()
        self.llm = None


# ------------------------------------------------------------------------------ onnxruntime-genai


@contextlib.contextmanager
def _without_quantizer(model: transformers.PreTrainedModel) -> Iterator[None]:
    """Let ``save_pretrained`` write a GGUF-loaded model: its weights are already dequantized to fp32.

    transformers marks a model loaded with ``gguf_file=`` as quantized and refuses to save it;
    the quantizer and its config entry are detached for the save and put back afterwards.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    had_config = hasattr(model.config, "quantization_config")
    config_entry = getattr(model.config, "quantization_config", None)
    model.hf_quantizer = None
    if had_config:
        del model.config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if had_config:
            model.config.quantization_config = config_entry


def _ort_genai_convert(source: GenerationSource, precision: str, out: Path, report: Progress,
                       extra_options: tuple[str, ...] = ()) -> None:
    """Run onnxruntime-genai's model builder on ``source.model`` saved as a transformers folder."""
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    hf_folder = staging / "hf"
    report(f"saving the transformers model for the onnxruntime-genai builder in {hf_folder}")
    with _without_quantizer(source.model):
        source.model.save_pretrained(hf_folder)
    source.tokenizer.save_pretrained(hf_folder)
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder),
               "-o", str(staging / "model"), "-p", precision, "-e", "cpu", "-c", str(staging / "cache")]
    if extra_options:
        command += ["--extra_options", *extra_options]
    report(f"converting with onnxruntime-genai's builder ({precision}): {' '.join(command[2:])}")
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai builder failed ({result.returncode}):\n{result.stderr[-3000:]}")
    report(f"converted in {time.perf_counter() - started:.1f} s")
    shutil.rmtree(out, ignore_errors=True)
    (staging / "model").rename(out)
    shutil.rmtree(staging, ignore_errors=True)


def _configure(model_dir: Path, threads: int) -> int:
    """Set the session's threads and a rare pad id in genai_config.json; returns the pad id.

    onnxruntime-genai masks every input id equal to ``pad_token_id``, and models often pad
    with a token real prompts hold (SmolLM2 pads with ``<|im_end|>``), so padding uses the
    last vocabulary id instead.
    """
    config_path = model_dir / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    pad = int(config["model"]["vocab_size"]) - 1
    config["model"]["pad_token_id"] = pad
    config_path.write_text(json.dumps(config, indent=4))
    return pad


class OrtGenaiBackend(GenerationBackend):
    """onnxruntime-genai on a model its builder converted (a variant of ``ORT_GENAI_VARIANTS``).

    Batches of equal-length prompts give each row exactly its single-sequence tokens.
    Left-padded rows are accepted (padding becomes the pad id, which onnxruntime-genai
    masks) but are only approximate: with onnxruntime-genai 0.18 a padded row follows
    eager greedy decoding for a few tokens and then drifts (measured on SmolLM2).
    """

    def __init__(self, variant: str = "fp32", threads: int | None = None, progress: Progress | None = None) -> None:
        if variant not in ORT_GENAI_VARIANTS:
            raise ValueError(f"unknown onnxruntime-genai variant {variant!r}; "
                             f"choose from {', '.join(ORT_GENAI_VARIANTS)}")
        self.variant = variant
        self.precision, self.extra_options = ORT_GENAI_VARIANTS[variant]
        self.name = f"onnxruntime-genai-{variant}"
        self.threads = threads or _usable_cores()
        self.report = progress or _stderr_progress
        self.model: Any = None
        self.model_dir: Path | None = None
        self.pad_token_id = 0

    def skip_reason(self) -> str | None:
        """Missing package (``pip install onnxruntime-genai``)."""
        if importlib.util.find_spec("onnxruntime_genai") is None:
            return "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
        return None

    def converted_dir(self, source: GenerationSource) -> Path:
        """The cached builder output for this source and precision, converting it first when absent."""
        out = Path(source.workdir) / f"ort-genai-{source.cache_key()}-{self.variant}"
        if not (out / "genai_config.json").exists():
            _ort_genai_convert(source, self.precision, out, self.report, self.extra_options)
        else:
            self.report(f"reusing the onnxruntime-genai model in {out}")
        return out

    def setup(self, source: GenerationSource) -> None:
        """Convert (or reuse) the model, set the session's threads, and load it."""
        import onnxruntime_genai as og

        self.model_dir = self.converted_dir(source)
        self.pad_token_id = _configure(self.model_dir, self.threads)
        self.model = og.Model(str(self.model_dir))

    def _padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        """int32 ids with the padding replaced by the pad id (onnxruntime-genai masks pad ids)."""
        ids = input_ids.clone()
        ids[~attention_mask.bool()] = self.pad_token_id
        if (input_ids[attention_mask.bool()] == self.pad_token_id).any():
            raise ValueError(f"a prompt contains the pad id {self.pad_token_id}, which onnxruntime-genai would mask")
        return ids.to(torch.int32).numpy()

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> GenerationRun:
        """``append_tokens`` + first ``generate_next_token`` (prefill), then the rest (decode)."""
        import onnxruntime_genai as og

        _check_new_tokens(max_new_tokens)
        batch, prompt_len = input_ids.shape
        ids = self._padded(input_ids, attention_mask)
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=prompt_len + max_new_tokens,
                                  min_length=prompt_len + max_new_tokens, batch_size=batch)
        generator = og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        first_at = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            generator.generate_next_token()
        end = time.perf_counter()
        new = [np.asarray(generator.get_sequence(row))[-max_new_tokens:] for row in range(batch)]
        del generator
        tokens = torch.cat([input_ids, torch.from_numpy(np.stack(new).astype(np.int64))], dim=1)
        return GenerationRun(tokens, first_at - start, end - first_at, int(prompt_len))

    def close(self) -> None:
        """Drop the onnxruntime-genai model."""
        self.model = None


# ------------------------------------------------------------------------------ loading


def load_gguf_source(folder: str | os.PathLike[str], gguf_file: str, workdir: Path | None = None) -> GenerationSource:
    """Load a GGUF checkpoint as an fp32 transformers model (eval) and tokenizer, keeping the file's path."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    return GenerationSource(model, tokenizer, str(Path(folder) / gguf_file), workdir or default_cache_dir())


def make_generation_backend(name: str, threads: int | None = None,
                            progress: Progress | None = None) -> GenerationBackend:
    """The peer called ``name`` (one of ``BACKEND_NAMES``), using ``threads`` cores where it takes a count."""
    if name == "transformers-eager":
        return TransformersEagerBackend()
    if name == "transformers-static-compile":
        return TransformersStaticCompileBackend()
    if name == "llama.cpp":
        return LlamaCppBackend(threads=threads)
    if name.startswith("onnxruntime-genai-") and name in BACKEND_NAMES:
        return OrtGenaiBackend(name.removeprefix("onnxruntime-genai-"), threads=threads, progress=progress)
    raise ValueError(f"unknown generation backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")


# ------------------------------------------------------------------------------ measuring


def agreement(run: GenerationRun, reference: GenerationRun, tokens: int = AGREEMENT_TOKENS) -> float:
    """Fraction of rows whose first ``tokens`` new ids equal the reference's."""
    ours, theirs = run.new_tokens[:, :tokens], reference.new_tokens[:, :tokens]
    return float((ours == theirs).all(dim=1).float().mean())


def common_prefix(run: GenerationRun, reference: GenerationRun) -> int:
    """New tokens every row shares with the reference before its first difference (the fewest over rows)."""
    same = (run.new_tokens == reference.new_tokens).int()
    return int(same.cumprod(dim=1).sum(dim=1).min())


@dataclass
class _Slot:
    """One backend's state during ``measure_peers``."""

    backend: GenerationBackend
    setup_s: float | None = None
    error: str | None = None


def _set_up(backends: Sequence[GenerationBackend], source: GenerationSource, report: Progress) -> list[_Slot]:
    slots = []
    for backend in backends:
        slot = _Slot(backend, error=backend.skip_reason())
        if slot.error is None:
            report(f"{backend.name}: setting up")
            started = time.perf_counter()
            try:
                backend.setup(source)
                slot.setup_s = time.perf_counter() - started
                report(f"{backend.name}: set up in {slot.setup_s:.1f} s")
            except Exception as exc:  # a failing peer is recorded in its rows, never raised
                slot.error = f"setup failed: {type(exc).__name__}: {exc}"
                report(f"{backend.name}: {slot.error}")
        else:
            report(f"{backend.name}: skipped: {slot.error}")
        slots.append(slot)
    return slots


def _median_run(runs: list[GenerationRun]) -> tuple[float, float]:
    return statistics.median(r.prefill_seconds for r in runs), statistics.median(r.decode_seconds for r in runs)


def _row(slot: _Slot, ids: torch.Tensor, **values: Any) -> dict[str, Any]:
    row = {"name": slot.backend.name, "batch": int(ids.shape[0]), "prompt_len": int(ids.shape[1]),
           "setup_s": slot.setup_s, "warmup_s": None, "prefill_tok_s": None, "decode_tok_s": None,
           "prefill_s": None, "decode_s": None, "agree32": None, "common_prefix": None, "text": None,
           "error": slot.error}
    row.update(values)
    return row


@dataclass(frozen=True)
class _Plan:
    """How ``measure_peers`` times one prompt batch."""

    max_new_tokens: int
    repeats: int
    gap_s: float
    warmup_new_tokens: int

    def warmup_tokens(self, backend: GenerationBackend) -> int:
        """New tokens of ``backend``'s warm-up call."""
        return self.max_new_tokens if backend.warmup_full_length else min(self.warmup_new_tokens,
                                                                           self.max_new_tokens)


def _measure_prompt(slots: list[_Slot], ids: torch.Tensor, plan: _Plan, source: GenerationSource,
                    report: Progress) -> list[dict[str, Any]]:
    """Warm up every runnable backend on one prompt batch, then time them round-robin."""
    mask = torch.ones_like(ids)
    label = f"batch {ids.shape[0]} prompt {ids.shape[1]}"
    active: list[tuple[_Slot, float]] = []
    rows: dict[str, dict[str, Any]] = {}
    for slot in slots:
        if slot.error is not None:
            rows[slot.backend.name] = _row(slot, ids)
        elif not slot.backend.supports_batch(int(ids.shape[0])):
            rows[slot.backend.name] = _row(slot, ids, error=f"batch {ids.shape[0]} not supported")
        else:
            report(f"{label}: {slot.backend.name}: warm-up")
            started = time.perf_counter()
            try:
                slot.backend.generate(ids, mask, plan.warmup_tokens(slot.backend))
            except Exception as exc:
                rows[slot.backend.name] = _row(slot, ids, error=f"generate failed: {type(exc).__name__}: {exc}")
                continue
            active.append((slot, time.perf_counter() - started))
            time.sleep(plan.gap_s)
    timed: dict[str, list[GenerationRun]] = {slot.backend.name: [] for slot, _ in active}
    for repeat in range(plan.repeats):
        report(f"{label}: timing round {repeat + 1}/{plan.repeats}")
        for offset in range(len(active)):
            slot = active[(repeat + offset) % len(active)][0]
            timed[slot.backend.name].append(slot.backend.generate(ids, mask, plan.max_new_tokens))
            time.sleep(plan.gap_s)
    reference = _reference_run(timed, ids, plan.max_new_tokens, source)
    max_new_tokens = plan.max_new_tokens
    for slot, warmup_s in active:
        prefill_s, decode_s = _median_run(timed[slot.backend.name])
        run = timed[slot.backend.name][-1]
        rows[slot.backend.name] = _row(
            slot, ids, warmup_s=warmup_s, prefill_s=prefill_s, decode_s=decode_s,
            prefill_tok_s=ids.shape[0] * ids.shape[1] / prefill_s,
            decode_tok_s=ids.shape[0] * (max_new_tokens - 1) / decode_s,
            agree32=agreement(run, reference), common_prefix=common_prefix(run, reference),
            text=source.tokenizer.decode(run.new_tokens[0][:24].tolist()),
        )
    return [rows[slot.backend.name] for slot in slots]


def _reference_run(timed: dict[str, list[GenerationRun]], ids: torch.Tensor, max_new_tokens: int,
                   source: GenerationSource) -> GenerationRun:
    """transformers-eager's greedy tokens: its timed run when it is measured, else a fresh one."""
    if timed.get(TransformersEagerBackend.name):
        return timed[TransformersEagerBackend.name][-1]
    eager = TransformersEagerBackend()
    eager.setup(source)
    return eager.generate(ids, torch.ones_like(ids), max_new_tokens)


def measure_peers(
    source: GenerationSource,
    prompts_ids: Sequence[torch.Tensor],
    max_new_tokens: int,
    backends: Sequence[str | GenerationBackend] = BACKEND_NAMES,
    repeats: int = 3,
    threads: int | None = None,
    gap_s: float = 0.1,
    progress: bool = True,
    warmup_new_tokens: int = 8,
) -> list[dict[str, Any]]:
    """Time every backend on every prompt batch (``[batch, prompt_len]`` ids, no padding); one row each.

    Backends are set up once (``setup_s``); per prompt batch each gets a warm-up call
    (``warmup_s``) of ``warmup_new_tokens`` new tokens, or of ``max_new_tokens`` for a backend
    with ``warmup_full_length`` (recompiles land there), then ``repeats`` timed calls round-robin with
    ``gap_s`` idle between calls (onnxruntime's threads spin for a while after a call).
    Rows hold the median ``prefill_s`` / ``decode_s``, ``prefill_tok_s`` / ``decode_tok_s``,
    ``agree32`` (fraction of rows whose first 32 new tokens equal transformers-eager's greedy
    ones), ``common_prefix`` (new tokens shared with it before the first difference, fewest
    over rows), ``text`` (row 0's first new tokens, decoded) and ``error`` (why a row was not
    measured). ``threads`` (default: the usable cores) applies to PyTorch and the peers built here.
    """
    threads = threads or _usable_cores()
    report = _stderr_progress if progress else (lambda message: None)
    chosen = [b if isinstance(b, GenerationBackend) else make_generation_backend(b, threads, report)
              for b in backends]
    plan = _Plan(max_new_tokens, repeats, gap_s, warmup_new_tokens)
    rows: list[dict[str, Any]] = []
    with torch_threads(threads):
        slots = _set_up(chosen, source, report)
        try:
            for ids in prompts_ids:
                rows += _measure_prompt(slots, ids, plan, source, report)
        finally:
            for slot in slots:
                slot.backend.close()
    return rows


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def rows_to_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of ``measure_peers`` as a Markdown table (errors in the last column)."""
    headers = ["backend", "batch", "prompt", "setup s", "warm-up s", "prefill tok/s", "decode tok/s",
               f"agree@{AGREEMENT_TOKENS}", "common prefix", "note"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [row["name"], row["batch"], row["prompt_len"], _cell(row["setup_s"]), _cell(row["warmup_s"]),
                 _cell(row["prefill_tok_s"]), _cell(row["decode_tok_s"]), _cell(row["agree32"], 2),
                 _cell(row["common_prefix"]), row["error"] or ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
