"""How the ``gpu`` target makes the optimized graph fast on an NVIDIA GPU.

- **cuBLASLt epilogues** (``CublasLtEpilogue`` pass): ``linear`` + bias + ReLU (or tanh-GELU)
  on a 2-D input becomes ``aten._addmm_activation``, which cuBLASLt runs as one GEMM with the
  bias and activation in its epilogue; 3-D inputs are flattened around it (a view).
- **SDPA's fastest backend**: attention runs under ``torch.nn.attention.sdpa_kernel`` with the
  backends in ``sdpa_backends`` order (default: cuDNN, flash, memory-efficient, math), so the
  fastest one that supports the shapes and dtype is taken.
- **CUDA graphs** for static shapes: the whole call is captured once on static input buffers
  and replayed, so a batch-1 call costs one launch instead of one per kernel. Used when no
  input dim is dynamic (``cuda_graphs="auto"``).
- ``backend="inductor"``: ``torch.compile(mode="max-autotune-no-cudagraphs")`` of the graph.

The rewrites are verified through the pass manager on the GPU copy, like the CPU lowering.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphopt.ir import attribute_value, node_shape
from graphopt.pass_infra import Pass, PassResult

__all__ = ["CUDAGraphRunner", "CublasLtEpilogue", "GpuLowering", "sdpa_context"]

aten = torch.ops.aten
SdpaBackend = Literal["cudnn", "flash", "efficient", "math"]


@dataclass(frozen=True)
class GpuLowering:
    """Options of the GPU lowering (``GpuTarget(lowering=...)``); see the module docstring."""

    epilogues: bool = True
    cuda_graphs: bool | Literal["auto"] = "auto"
    sdpa_backends: tuple[SdpaBackend, ...] = ("cudnn", "flash", "efficient", "math")
    backend: Literal["graph", "inductor"] = "graph"

    def label(self) -> str:
        """Short name of this lowering, for reports and ``tune``."""
        if self.backend == "inductor":
            return "inductor"
        parts = ["cublaslt" if self.epilogues else "aten"]
        if self.cuda_graphs is True or self.cuda_graphs == "auto":
            parts.append("cudagraphs")
        return "-".join(parts)

    def candidates(self) -> list[GpuLowering]:
        """The variants ``tune`` measures."""
        options = [self, replace(self, cuda_graphs=False), replace(self, epilogues=False),
                   replace(self, backend="inductor")]
        return list(dict.fromkeys(options))


@dataclass(frozen=True)
class CublasLtEpilogue(Pass):
    """``linear`` + bias + ReLU / tanh-GELU becomes ``aten._addmm_activation`` (a cuBLASLt GEMM epilogue)."""

    name = "cublaslt-epilogue"

    def run(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite every fusable linear in place."""
        fused = 0
        near: dict[str, int] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target != aten.linear.default or len(node.args) < 3:
                continue
            users = list(node.users)
            act = users[0] if len(users) == 1 and users[0].op == "call_function" else None
            use_gelu = None
            if act is not None and act.target == aten.relu.default:
                use_gelu = False
            elif act is not None and act.target == aten.gelu.default and act.kwargs.get("approximate") == "tanh":
                use_gelu = True
            if use_gelu is None:
                continue
            x, weight, bias = node.args[:3]
            shape = node_shape(x)
            if bias is None or attribute_value(gm, weight) is None or shape is None:
                near["weight or bias not constant"] = near.get("weight or bias not constant", 0) + 1
                continue
            with gm.graph.inserting_before(act):
                flat = x if len(shape) == 2 else gm.graph.call_function(aten.reshape.default, (x, [-1, shape[-1]]))
                wt = gm.graph.call_function(aten.t.default, (weight,))
                out = gm.graph.call_function(aten._addmm_activation.default, (bias, flat, wt), {"use_gelu": use_gelu})
                result = out
                if len(shape) != 2:
                    out_shape = list(node_shape(act))  # type: ignore[arg-type]
                    result = gm.graph.call_function(aten.reshape.default, (out, [*out_shape[:-1], out_shape[-1]]))
            result.meta.update({k: v for k, v in act.meta.items() if k == "val"})
            act.replace_all_uses_with(result)
            gm.graph.erase_node(act)
            gm.graph.erase_node(node)
            fused += 1
        return PassResult(fused > 0, {"fused": fused}, near_misses={"cublaslt-epilogue": near} if near else {})


_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "math": "MATH"}


@contextlib.contextmanager
def sdpa_context(backends: tuple[SdpaBackend, ...]) -> Iterator[None]:
    """Run SDPA with ``backends`` tried in order (PyTorch takes the first one that supports the call)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = [getattr(SDPBackend, _BACKENDS[b]) for b in backends if hasattr(SDPBackend, _BACKENDS[b])]
    with sdpa_kernel(chosen, set_priority=True):
        yield


class CUDAGraphRunner(torch.nn.Module):
    """Replays one captured CUDA graph of ``fn`` on static input buffers (static shapes only).

    Each call copies the inputs into the captured buffers, replays the graph and returns clones
    of the outputs (the captured output buffers are overwritten by the next replay).
    """

    def __init__(self, fn: Callable[..., Any], example_args: tuple[Any, ...], example_kwargs: dict[str, Any],
                 context: Callable[[], Any] = contextlib.nullcontext) -> None:
        super().__init__()
        self.__dict__["fn"] = fn
        self._context = context
        leaves, self._spec = pytree.tree_flatten((example_args, example_kwargs))
        self._static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        static_args, static_kwargs = pytree.tree_unflatten(self._static, self._spec)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode(), context():
            for _ in range(3):  # warm up: cuBLAS workspaces, autotuned kernels
                fn(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode(), context():
            self._outputs = fn(*static_args, **static_kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Copy the inputs in, replay, return copies of the outputs."""
        leaves, _ = pytree.tree_flatten((args, kwargs))
        for static, value in zip(self._static, leaves, strict=True):
            if isinstance(static, torch.Tensor):
                static.copy_(value, non_blocking=True)
        self.graph.replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self._outputs)


class _WithSdpa(torch.nn.Module):
    def __init__(self, fn: Callable[..., Any], backends: tuple[SdpaBackend, ...]) -> None:
        super().__init__()
        self.__dict__["fn"] = fn
        self.backends = backends

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with sdpa_context(self.backends):
            return self.fn(*args, **kwargs)


def lower_for_gpu(gm: fx.GraphModule, example_args: tuple[Any, ...], example_kwargs: dict[str, Any],
                  flat_inputs: tuple[Any, ...], static: bool, options: GpuLowering, report: Any = None) -> Any:
    """Lower ``gm`` (already on the GPU, inputs too) with ``options``; returns the runnable module."""
    from graphopt.pass_manager import PassManager
    from graphopt.report import Report

    if options.backend == "inductor":
        compiled = torch.compile(gm, mode="max-autotune-no-cudagraphs", dynamic=not static)
        with torch.inference_mode():
            compiled(*example_args, **example_kwargs)
        return _WithSdpa(compiled, options.sdpa_backends)
    if options.epilogues:
        from graphopt.targets.cpu_lowering import records_section

        scratch = Report(target="gpu")
        manager = PassManager([CublasLtEpilogue()], tolerance_scale=10.0)  # TF32 / cuBLASLt rounding
        gm = manager.run(gm, flat_inputs, scratch)
        if report is not None:
            report.sections.append(records_section(f"gpu lowering '{options.label()}'", scratch.records))
    runner: Any = _WithSdpa(gm, options.sdpa_backends)
    if options.cuda_graphs is True or (options.cuda_graphs == "auto" and static):
        runner = CUDAGraphRunner(gm, example_args, example_kwargs, lambda: sdpa_context(options.sdpa_backends))
    return runner
