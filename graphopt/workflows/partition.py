"""``graphopt.partition``: split a model into balanced pipeline stages for model parallelism.

    parts = graphopt.partition(model, example_inputs, stages=4, balance="time")
    parts(*inputs)                 # the stages in order, micro-batch pipelined, each on its device
    parts.stages                   # one fx.GraphModule per stage, each holding only its own weights
    print(parts.report)            # per-stage cost, weights, memory, cut bytes, balance, throughput
    parts.save("stages/")          # one .pt2 per stage + manifest.json, for graphopt.workflows.distributed
    parts.export_onnx("onnx/")     # one .onnx per stage

The model is captured (with a dynamic batch dim, so stages run on micro-batches), optimized by
the default exact pass pipeline (``optimize=False`` skips it), profiled node by node, split by
``graphopt.passes.Partition`` and verified by the pass manager like any pass. With
``balance="time"`` the split is refined from the measured stage times: each stage's node costs
are scaled by how far its measured time was from the estimate, and the best measured split is
kept. ``parts.report.balance`` is the slowest / mean measured stage time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.analysis.balanced_split import PartitionError
from graphopt.analysis.cost import count_parameters, profile_nodes
from graphopt.analysis.throughput import (
    DEFAULT_LINK_BANDWIDTH,
    DEFAULT_LINK_LATENCY,
    DEFAULT_STAGE_OVERHEAD,
    PipelineLink,
    ThroughputPrediction,
    predict_throughput,
)
from graphopt.errors import (
    CaptureError,
    DeviceUnavailableError,
    InputError,
    VerificationError,
)
from graphopt.ir.capture import capture, flatten_inputs
from graphopt.ir.graph import clone_graph_module, fill_output_nodes
from graphopt.ir.verify import compare_outputs
from graphopt.passes.base import resolve_pass
from graphopt.passes.compress import compression_steps
from graphopt.passes.lossy.base import Fidelity
from graphopt.passes.manager import PassManager
from graphopt.passes.split_stages import (
    Partition,
    StageInfo,
    plan_boundaries,
    split_stages,
    stage_modules,
)
from graphopt.targets.base import DEFAULT_PIPELINE
from graphopt.targets.gpu.target import retarget_device_constants
from graphopt.version import __version__
from graphopt.workflows.generation import (
    GenerativeModel,
    PartitionedGenerator,
    generation_compression,
    is_causal_lm,
    partition_generation,
)
from graphopt.workflows.generation.compression import GenerationCompression
from graphopt.workflows.optimized_model import OptimizedModel
from graphopt.workflows.options import default_on_error, is_graphopt_pipeline
from graphopt.workflows.save_load import import_output_modules, output_modules
from graphopt.workflows.stage_files import (
    EXAMPLE_INPUTS,
    FORMAT,
    MANIFEST,
    VERSION,
    load_stage,
    read_manifest,
    save_stage,
)
from graphopt.workflows.stage_report import (
    PartitionReport,
    StageReport,
    balance_of,
    fill_stage_reports,
    median_stage_seconds,
    stage_section,
    stage_sums,
)

__all__ = [
    "MANIFEST",
    "PartitionReport",
    "PartitionedModel",
    "StageReport",
    "ThroughputPrediction",
    "load_stage",
    "load_stages",
    "partition",
    "predict_throughput",
    "read_manifest",
]



# ------------------------------------------------------------------------------------ running


def _stage_inputs(modules: Sequence[torch.nn.Module], flat: Sequence[Any]) -> list[tuple[Any, ...]]:
    """The inputs each stage receives when the chain runs on ``flat`` (the model's flat inputs)."""
    inputs = []
    values = tuple(flat)
    with torch.inference_mode():
        for module in modules:
            inputs.append(values)
            values = tuple(module(*values))
    return inputs


def _microbatch_inputs(flat: Sequence[Any], microbatches: int) -> list[tuple[Any, ...]]:
    """The flat inputs cut into ``microbatches`` chunks along dim 0."""
    chunks = [torch.tensor_split(x, microbatches, dim=0) if isinstance(x, torch.Tensor) else [x] * microbatches
              for x in flat]
    return [tuple(c[m] for c in chunks) for m in range(microbatches)]


def _batch_size(flat: Sequence[Any]) -> int | None:
    """The common dim-0 size of the tensor inputs, or None when they do not share one."""
    sizes = {x.shape[0] for x in flat if isinstance(x, torch.Tensor) and x.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


class PartitionedModel(torch.nn.Module):
    """A model split into pipeline stages: call it like the model, save it for ``graphopt.workflows.distributed``.

    ``stages`` holds one ``fx.GraphModule`` per stage (each with only its own weights),
    ``devices`` the device of each, ``microbatches`` how many micro-batches a call is cut into
    (along dim 0; 1 when the model was captured with a static batch), ``report`` the
    ``PartitionReport`` and ``manifest`` the plain-data description written by ``save``.
    """

    def __init__(self, graph_module: fx.GraphModule, infos: Sequence[StageInfo], report: PartitionReport,
                 microbatches: int, dynamic_batch: bool, example_flat: Sequence[Any], reference: Any = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.stages = torch.nn.ModuleList(stage_modules(graph_module))
        self.report = report
        self.microbatches = microbatches
        self.dynamic_batch = dynamic_batch
        self.devices = [torch.device("cpu")] * len(self.stages)
        self._example_flat = tuple(example_flat)
        self._infos = [StageInfo(i.index, self.stages[i.index], i.inputs, i.outputs, i.nodes, i.input_bytes)
                       for i in infos]
        output = next(n for n in graph_module.graph.nodes if n.op == "output")
        self._output_template = output.args[0]
        self._reference = reference

    # -- running ---------------------------------------------------------------------------

    def to_devices(self, devices: Sequence[str | torch.device]) -> PartitionedModel:
        """Put stage ``i`` on ``devices[i]`` (e.g. ``["cuda:0", "cuda:1"]``); returns self."""
        if len(devices) != len(self.stages):
            raise InputError(f"give one device per stage: {len(self.stages)} stages, {len(devices)} devices")
        resolved = [torch.device(d) for d in devices]
        for device in resolved:
            if device.type == "cuda" and not torch.cuda.is_available():
                raise DeviceUnavailableError(f"device {device} was asked for but CUDA is not available here; "
                                             "use devices=['cpu', ...] or run on a machine with GPUs")
        for stage, device in zip(self.stages, resolved, strict=True):
            stage.to(device)
            retarget_device_constants(stage, device)
        self.devices = resolved
        for info, device in zip(self.report.stages, resolved, strict=True):
            info.device = str(device)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the stages on the call's inputs, micro-batch pipelined (GPipe order), each on its device."""
        return self.run(args, kwargs)

    def run(self, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
            microbatches: int | None = None) -> Any:
        """``forward`` with an explicit micro-batch count (default ``self.microbatches``)."""
        flat = flatten_inputs(self.graph_module, tuple(args), dict(kwargs or {}))
        count = microbatches or self.microbatches
        batch = _batch_size(flat)
        if count > 1 and (not self.dynamic_batch or batch is None):
            count = 1
        count = min(count, batch or 1) if count > 1 else 1
        chunks = _microbatch_inputs(flat, count) if count > 1 else [tuple(flat)]
        stages, devices = list(self.stages), self.devices
        values: list[tuple[Any, ...]] = list(chunks)
        with torch.inference_mode():
            # GPipe order: at each clock, stage s works on micro-batch clock - s. On GPUs the calls
            # are asynchronous, so stages on different devices overlap.
            for clock in range(count + len(stages) - 1):
                for index in range(len(stages) - 1, -1, -1):
                    micro = clock - index
                    if 0 <= micro < count:
                        moved = tuple(v.to(devices[index], non_blocking=True) if isinstance(v, torch.Tensor) else v
                                      for v in values[micro])
                        values[micro] = tuple(stages[index](*moved))
        flat_out = [torch.cat([v[i] for v in values], dim=0) if count > 1 else values[0][i]
                    for i in range(len(values[0]))]
        return self._structure(flat_out)

    def _structure(self, flat_out: Sequence[Any]) -> Any:
        return self.graph_module.graph._codegen.process_outputs(fill_output_nodes(self._output_template, flat_out))

    # -- saving ----------------------------------------------------------------------------

    @property
    def manifest(self) -> dict[str, Any]:
        """Plain data describing the stages: order, inputs/outputs by name, routed values, micro-batch dim."""
        routed: dict[str, list[int]] = {}
        for info in self._infos:
            produced = set(info.nodes)
            for name in info.outputs:
                if name in info.inputs and name not in produced:
                    routed.setdefault(name, []).append(info.index)
        leaves = pytree.tree_leaves(self._output_template)
        layout, position = [], 0
        for leaf in leaves:
            if isinstance(leaf, fx.Node):
                layout.append({"output": position})
                position += 1
            else:
                layout.append({"literal": leaf})
        out_spec = getattr(self.graph_module, "_out_spec", None)
        return {
            "format": FORMAT,
            "version": VERSION,
            "graphopt": __version__,
            "torch": torch.__version__,
            "stages": [{"index": i.index, "file": f"stage_{i.index}.pt2", "inputs": i.inputs, "outputs": i.outputs,
                        "nodes": len(i.nodes), "parameters": count_parameters(self.stages[i.index])}
                       for i in self._infos],
            "inputs": self._infos[0].inputs,
            "outputs": {"layout": layout, "template": pytree.treespec_dumps(pytree.tree_flatten(
                self._output_template)[1]), "spec": pytree.treespec_dumps(out_spec) if out_spec else None},
            "output_modules": output_modules(self.graph_module),
            "routed": routed,
            "microbatch_dim": 0,
            "microbatches": self.microbatches,
            "dynamic_batch": self.dynamic_batch,
            "example_batch": _batch_size(self._example_flat),
            "balance": self.report.balance,
            "report": self.report.to_dict(),
        }

    def _cpu_stages(self) -> list[fx.GraphModule]:
        result = []
        for stage, device in zip(self.stages, self.devices, strict=True):
            if device.type == "cpu":
                result.append(stage)
            else:
                copy_on_cpu = clone_graph_module(stage).to("cpu")
                retarget_device_constants(copy_on_cpu, torch.device("cpu"))
                result.append(copy_on_cpu)
        return result

    def save(self, directory: str | Path) -> Path:
        """Write one torch.export ``.pt2`` per stage, ``manifest.json`` and ``example_inputs.pt`` into ``directory``.

        ``torchrun --nproc-per-node N -m graphopt.pipeline DIRECTORY --inputs in.pt --output out.pt``
        runs them as a pipeline; ``graphopt.workflows.partition.load_stages(DIRECTORY)`` loads them back.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stages = self._cpu_stages()
        inputs = _stage_inputs(stages, self._example_flat)
        for info, stage, args in zip(self._infos, stages, inputs, strict=True):
            save_stage(stage, args, directory, info.index, dynamic=self.dynamic_batch)
        (directory / MANIFEST).write_text(json.dumps(self.manifest, indent=1))
        torch.save(tuple(self._example_flat), directory / EXAMPLE_INPUTS)  # a ready --inputs file
        return directory

    def export_onnx(self, directory: str | Path, opset: int | None = None) -> list[Path]:
        """Write each stage as ``stage_i.onnx`` (checked against the stage in onnxruntime); returns the paths.

        Shapes are static, at the example batch: export a partition made with the batch you deploy.
        ``opset`` as for ``OptimizedModel.export_onnx`` (default: the exporter's).
        """
        # onnx and onnxruntime take about a second to import: only when exporting
        from graphopt.targets.onnx.opsets import check_opset
        from graphopt.targets.onnx.target import OnnxRuntimeModule, export_onnx_model

        check_opset(opset)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stages = self._cpu_stages()
        paths = []
        for info, stage, args in zip(self._infos, stages, _stage_inputs(stages, self._example_flat), strict=True):
            model = export_onnx_model(stage, args, {}, opset=opset)
            session = OnnxRuntimeModule(model, None)
            with torch.inference_mode():
                expected = list(stage(*args))
            comparison = compare_outputs(list(session(*args)), expected)
            if not comparison.ok:
                raise VerificationError(f"stage {info.index} exported to ONNX computes different outputs: "
                                        f"{comparison.detail}", "export-onnx")
            paths.append(session.save(directory / f"stage_{info.index}.onnx"))
        return paths


# -------------------------------------------------------------------------------------- load


def load_stages(directory: str | Path) -> LoadedStages:
    """Load every stage of a saved partition, chained in one process (for checks and single-host runs)."""
    manifest = read_manifest(directory)
    modules = [load_stage(directory, i, manifest) for i in range(len(manifest["stages"]))]
    return LoadedStages(modules, manifest)


class LoadedStages(torch.nn.Module):
    """Stages loaded from a directory, run one after the other; ``outputs`` rebuilds the model's structure."""

    def __init__(self, modules: Sequence[torch.nn.Module], manifest: dict[str, Any]) -> None:
        super().__init__()
        self.stages = torch.nn.ModuleList(modules)
        self.manifest = manifest

    def forward(self, *flat_inputs: torch.Tensor) -> Any:
        """The model's outputs for its flat inputs (in the manifest's input order)."""
        values: tuple[Any, ...] = tuple(flat_inputs)
        with torch.inference_mode():
            for stage in self.stages:
                values = tuple(stage(*values))
        return structure_outputs(values, self.manifest)


def structure_outputs(flat_out: Sequence[Any], manifest: dict[str, Any]) -> Any:
    """The last stage's flat outputs arranged as the model returns them (a tensor, a tuple, a dict...)."""
    import_output_modules(manifest)
    outputs = manifest["outputs"]
    leaves = [flat_out[item["output"]] if "output" in item else item["literal"] for item in outputs["layout"]]
    structured = pytree.tree_unflatten(leaves, pytree.treespec_loads(outputs["template"]))
    if outputs.get("spec"):
        structured = pytree.tree_unflatten(list(structured), pytree.treespec_loads(outputs["spec"]))
    return structured


# ------------------------------------------------------------------------------- partition()


def _capture(model: torch.nn.Module, example_inputs: Any, example_kwargs: dict[str, Any] | None,
             microbatches: int | None, share_weights: bool) -> tuple[Any, bool, list[str]]:
    flat = pytree.tree_leaves((example_inputs, example_kwargs or {}))
    batch = _batch_size(flat)
    notes = []
    if microbatches != 1 and batch is not None and batch >= 2:
        try:
            captured = capture(model, example_inputs, example_kwargs, dynamic_batch=True, share_weights=share_weights)
            return captured, True, notes
        except (CaptureError, InputError) as error:
            notes.append(f"captured with a static batch (micro-batching off): dynamic batch failed: "
                         f"{str(error).splitlines()[0]}")
    elif microbatches != 1:
        notes.append("the example batch is 1 (or inputs disagree on dim 0): captured with a static batch, so calls "
                     "run as one micro-batch; give an example batch >= 2 to pipeline micro-batches")
    return capture(model, example_inputs, example_kwargs, share_weights=share_weights), False, notes


def partition(
    model: torch.nn.Module,
    example_inputs: Any = None,
    stages: int = 2,
    *,
    balance: str = "time",
    example_kwargs: dict[str, Any] | None = None,
    memory_cap: float | None = None,
    microbatches: int | None = None,
    devices: Sequence[str | torch.device] | None = None,
    optimize: bool = True,
    passes: Sequence[Any] | None = None,
    tolerance: float = 0.02,
    repeats: int = 7,
    refine: int = 3,
    link_bandwidth: float = DEFAULT_LINK_BANDWIDTH,
    link_latency: float = DEFAULT_LINK_LATENCY,
    stage_overhead: float = DEFAULT_STAGE_OVERHEAD,
    threads: int | None = None,
    max_cache_len: int | None = None,
    compress: Any = (),
    quantize: Any = None,
    fidelity: Fidelity | None = None,
) -> PartitionedModel | PartitionedGenerator:
    """Split ``model`` into ``stages`` pipeline stages of balanced cost; returns a ``PartitionedModel``.

    ``balance``: what to equalize, ``"time"`` (measured per node, medians of ``repeats`` runs),
    ``"flops"``, ``"params"`` (weight bytes) or ``"memory"`` (weights + activations).
    ``memory_cap``: bytes per device (a stage's weights + its peak live activations).
    ``microbatches``: how many micro-batches a call is cut into along dim 0 (default: as many
    as stages, at most the batch); 1 captures a static batch. ``devices``: one per stage
    (``["cuda:0", "cuda:1"]``), CPU by default. ``optimize``: run the default exact pass
    pipeline (dropout removal, batch-norm folding, CSE...) before partitioning, so the split
    sees the graph that runs; ``passes`` (names or ``Pass`` objects, e.g. fusion or
    quantization passes) replaces that pipeline. ``refine``: rounds of re-splitting from measured stage times
    (``balance="time"``). ``link_bandwidth`` (bytes/s), ``link_latency`` (s per tensor sent)
    and ``stage_overhead`` (the pipeline runtime's s per stage per micro-batch; all three measured
    by ``--link-benchmark``) feed the throughput prediction in the report. ``threads``: intra-op
    threads while measuring (default: as set); 1 gives steadier figures on a machine shared with
    other work.

    ``model`` may be what ``graphopt.optimize`` returned: its ``portable_graph`` is split, on its
    ``example_inputs`` unless others are given.

    A causal language model (``example_inputs`` ``(input_ids,)``) is split for generation: each
    stage keeps its layers' key/value cache (``max_cache_len`` positions), the split balances a
    decode step, and the result is a ``PartitionedGenerator`` with ``generate`` and ``save``
    (``graphopt.workflows.generation.partitioned``); ``microbatches`` cuts the example batch.
    ``compress=`` / ``quantize=`` / ``fidelity=`` compress its weights first, as ``graphopt.optimize``
    does for one (weight-only int4/int8 within a language budget); the stages then hold the
    compressed weights and expand them as they run.

    Raises ``PartitionError`` for more stages than layers, a memory cap no split meets, or a
    model that updates its buffers; ``InputError``/``CaptureError`` as ``graphopt.optimize`` does.
    """
    link = PipelineLink(link_bandwidth, link_latency, stage_overhead)
    if is_causal_lm(model):
        compression = generation_compression(compression_steps(compress, quantize=quantize), fidelity)
        return _partition_generation(model, example_inputs, stages, balance=balance, example_kwargs=example_kwargs,
                                     memory_cap=memory_cap, microbatches=microbatches, devices=devices,
                                     optimize=optimize, passes=passes, tolerance=tolerance, repeats=repeats,
                                     link=link, threads=threads, max_cache_len=max_cache_len, compression=compression)
    if isinstance(model, GenerativeModel):
        raise InputError("this is a language model optimized for generation: partition the model itself, "
                         "graphopt.partition(lm, (input_ids,), stages=N), with quantize=... to compress it")
    if compress or quantize is not None or fidelity is not None:
        raise InputError("compress=, quantize= and fidelity= are for causal language models here; compress another "
                         "model with graphopt.optimize(model, inputs, quantize=...) and partition what it returns")
    optimized = isinstance(model, OptimizedModel)
    if optimized:
        if example_inputs is None:
            example_inputs = model.example_inputs
            example_kwargs = model.example_kwargs if example_kwargs is None else example_kwargs
        model = model.portable_graph
    elif example_inputs is None:
        raise InputError("partition(model, example_inputs): give example inputs, e.g. (torch.randn(8, 3, 224, 224),)")
    if stages < 1:
        raise PartitionError(f"stages must be at least 1, got {stages}")
    if microbatches is not None and microbatches < 1:
        raise InputError(f"microbatches must be at least 1, got {microbatches}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        pipeline = list(passes) if passes is not None else list(DEFAULT_PIPELINE) if optimize else []
        parts = _partition(model, example_inputs, stages, balance, example_kwargs, memory_cap, microbatches, devices,
                           pipeline, tolerance, repeats, refine, link)
    finally:
        torch.set_num_threads(previous_threads)
    if optimized:
        parts.report.notes.append("the model is an OptimizedModel: its portable graph was partitioned")
    return parts


def _partition_generation(model: torch.nn.Module, example_inputs: Any, stages: int, *, balance: str,
                          example_kwargs: dict[str, Any] | None, memory_cap: float | None, microbatches: int | None,
                          devices: Sequence[str | torch.device] | None, optimize: bool, passes: Sequence[Any] | None,
                          tolerance: float, repeats: int, link: PipelineLink, threads: int | None,
                          max_cache_len: int | None, compression: GenerationCompression | None
                          ) -> PartitionedGenerator:
    """``partition`` for a causal LM (``partition_generation``), with the options that apply to one."""
    if example_inputs is None:
        raise InputError("partition(lm, (input_ids,)): give example prompt ids, e.g. tokenizer('Hello', "
                         "return_tensors='pt').input_ids")
    if example_kwargs:
        raise InputError("a causal LM is partitioned on (input_ids,) alone: drop example_kwargs")
    if devices is not None:
        raise InputError("partitioned generation runs its stages on this process's CPU, or one per process with "
                         "torchrun (parts.save(DIR), then torchrun ... -m graphopt.pipeline DIR --generate); "
                         "devices= is for one-shot models")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        pipeline = list(passes) if passes is not None else list(DEFAULT_PIPELINE) if optimize else []
        return partition_generation(model, example_inputs, stages, [resolve_pass(p) for p in pipeline],
                                    max_cache_len=max_cache_len, balance=balance, memory_cap=memory_cap,
                                    microbatches=microbatches, repeats=repeats, tolerance=tolerance, link=link,
                                    compression=compression)
    finally:
        torch.set_num_threads(previous_threads)


def _partition(model: torch.nn.Module, example_inputs: Any, stages: int, balance: str,
               example_kwargs: dict[str, Any] | None, memory_cap: float | None, microbatches: int | None,
               devices: Sequence[str | torch.device] | None, pipeline: list[Any], tolerance: float, repeats: int,
               refine: int, link: PipelineLink) -> PartitionedModel:
    report = PartitionReport(target="partition", balance_key=balance)
    chosen = [resolve_pass(p) for p in pipeline]
    started = time.perf_counter()
    # graphopt's own passes never write into weights: the stages share them with the model (no copy)
    captured, dynamic, notes = _capture(model, example_inputs, example_kwargs, microbatches,
                                        share_weights=is_graphopt_pipeline(chosen))
    report.capture_seconds = time.perf_counter() - started
    report.notes.extend([*captured.notes, *notes])
    gm, flat = captured.graph_module, captured.flat_inputs
    manager = PassManager(chosen, on_error=default_on_error())
    gm = manager.run(gm, flat, report, captured.graph_outputs)
    outputs_before = manager.outputs

    seconds = profile_nodes(gm, flat, repeats=repeats) if balance == "time" else None
    items, boundaries, costs = plan_boundaries(gm, stages, balance, seconds=seconds, memory_cap=memory_cap,
                                               tolerance=tolerance)
    current = _measure_split(gm, items, boundaries, flat, repeats)
    best, tried = current, [boundaries]
    report.refinements.append(balance_of(current[1]))
    for _ in range(refine if balance == "time" and stages > 1 else 0):
        # scale each node's cost so that every stage of the measured split costs what it measured
        estimates = stage_sums(costs, current[0])
        factors = [m / e if e > 0 else 1.0 for m, e in zip(current[1], estimates, strict=True)]
        costs = [c * factors[_stage_of(i, current[0])] for i, c in enumerate(costs)]
        _, candidate, _ = plan_boundaries(gm, stages, balance, memory_cap=memory_cap, tolerance=tolerance,
                                          costs=costs)
        if candidate in tried:
            break  # the split would not change (or would go back to one already measured)
        tried.append(candidate)
        current = _measure_split(gm, items, candidate, flat, repeats)
        report.refinements.append(balance_of(current[1]))
        if balance_of(current[1]) < balance_of(best[1]):
            best = current
    boundaries = best[0]

    names = tuple(items.nodes[i].name for i in boundaries[1:])
    infos = split_stages(gm, items, boundaries)  # the names of the values each stage takes and returns
    final = PassManager([Partition(stages=stages, balance=balance, boundaries=names)], on_error="raise")
    gm = final.run(gm, flat, report, outputs_before)
    modules = stage_modules(gm)
    stage_inputs = _stage_inputs(modules, flat)
    measured = median_stage_seconds(modules, stage_inputs, max(2 * repeats, 11))  # the figure users read
    count = microbatches or stages
    batch = _batch_size(flat) or 1
    count = max(1, min(count, batch)) if dynamic else 1
    fill_stage_reports(report, modules, infos, items, boundaries, costs, measured)
    cut_tensors = [len(info.inputs) for info in infos[1:]]
    report.throughput, predictions = _predictions(modules, flat, report.cut_bytes, cut_tensors, measured, count, batch,
                                                  dynamic, repeats, link)
    report.sections.append(stage_section(report, predictions))
    comparison = compare_outputs(list(pytree.tree_leaves(gm(*captured.example_args, **captured.example_kwargs))),
                                 captured.reference_outputs)
    report.final_check = "passed" if comparison.ok else f"FAILED ({comparison.detail})"
    report.final_max_abs_diff = comparison.max_abs_diff
    if not comparison.ok:
        raise VerificationError(f"the partitioned model differs from the original: {comparison.detail}", "partition")
    parts = PartitionedModel(gm, infos, report, count, dynamic, flatten_inputs(gm, captured.example_args,
                                                                               captured.example_kwargs))
    if devices is not None:
        parts.to_devices(devices)
    return parts


def _stage_of(item: int, boundaries: Sequence[int]) -> int:
    return max(k for k, b in enumerate(boundaries) if b <= item)


def _measure_split(gm: fx.GraphModule, items: Any, boundaries: list[int], flat: Sequence[Any],
                   repeats: int) -> tuple[list[int], list[float]]:
    modules = [info.module for info in split_stages(gm, items, boundaries)]
    return boundaries, median_stage_seconds(modules, _stage_inputs(modules, flat), repeats)


def _predictions(modules: Sequence[fx.GraphModule], flat: Sequence[Any], cut_bytes: Sequence[int],
                 cut_tensors: Sequence[int], measured: Sequence[float], microbatches: int, batch: int, dynamic: bool,
                 repeats: int, link: PipelineLink) -> tuple[ThroughputPrediction, list[ThroughputPrediction]]:
    """The prediction for ``microbatches`` (stage times measured at that micro-batch size), and for 1, 2, 4..."""
    counts = sorted({m for m in (1, 2, 4, 8, 16, 32) if m <= batch} | {microbatches}) if dynamic else [1]
    predictions = []
    chosen = None
    for count in counts:
        if count == 1:
            seconds = list(measured)
        else:
            micro = _microbatch_inputs(flat, count)[0]
            seconds = median_stage_seconds(modules, _stage_inputs(modules, micro), max(3, repeats // 2))
        per_micro_cut = [b / count for b in cut_bytes]
        prediction = link.predict(seconds, per_micro_cut, count, batch, cut_tensors)
        predictions.append(prediction)
        if count == microbatches:
            chosen = prediction
    assert chosen is not None
    return chosen, predictions
