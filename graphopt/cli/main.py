"""The ``graphopt`` command: ``demo``, ``optimize FILE.py:FACTORY``, ``partition FILE.py:FACTORY`` and ``bench``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from graphopt.cli.factory import load_factory
from graphopt.errors import GraphoptError, InputError

__all__ = ["build_parser", "load_factory", "main", "parse_input_shapes"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


def parse_input_shapes(shapes: Sequence[str], dtypes: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Build random example inputs from ``--input-shape 1,3,224,224`` (and optional ``--input-dtype``)."""
    if dtypes and len(dtypes) not in (1, len(shapes)):
        raise InputError(f"give one --input-dtype, or one per --input-shape ({len(shapes)}), not {len(dtypes)}")
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for index, text in enumerate(shapes):
        try:
            shape = [int(d) for d in text.split(",") if d.strip()]
        except ValueError as error:
            raise InputError(f"--input-shape {text!r} is not a comma-separated list of integers") from error
        name = dtypes[index if len(dtypes) > 1 else 0] if dtypes else "float32"
        if name not in _DTYPES:
            raise InputError(f"unknown --input-dtype {name!r}; choose from {', '.join(_DTYPES)}")
        dtype = _DTYPES[name]
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            inputs.append(torch.randint(0, 2 if dtype == torch.bool else 100, shape, generator=generator).to(dtype))
    return tuple(inputs)


def _command_optimize(args: argparse.Namespace) -> int:
    import graphopt

    model, inputs = _model_and_inputs(args)
    lossy: dict[str, Any] = {"prune": args.prune} if getattr(args, "prune", None) is not None else {}
    lossy.update(_quantize_options(args, inputs))
    fast = graphopt.optimize(model, inputs, target=args.target, disabled=args.disable or (),
                             on_error="raise" if args.strict else "rollback", dynamic_batch=args.dynamic_batch,
                             **lossy)
    print(fast.report)
    if args.output:
        output = Path(args.output)
        if output.suffix == ".onnx":
            fast.export_onnx(output)
        elif output.suffix == ".pt2":
            fast.save(output)  # reload with graphopt.load(path)
        else:
            raise InputError(f"-o {output}: use a .onnx (ONNX) or .pt2 (torch.export) file name")
        print(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB)")
    if args.report_markdown:
        Path(args.report_markdown).write_text(fast.report.to_markdown())
    if args.report:
        print(f"wrote {fast.report.to_html(args.report)}")
    return 0


def _model_and_inputs(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    """The model and example inputs of ``FILE.py:FACTORY`` (inputs from --input-shape when given)."""
    factory = load_factory(args.model)
    built = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    model, inputs = built if isinstance(built, tuple) else (built, None)
    if args.input_shape:
        inputs = parse_input_shapes(args.input_shape, args.input_dtype or [])
    if inputs is None:
        raise InputError("give --input-shape (e.g. --input-shape 1,3,224,224), or have FACTORY return (model, inputs)")
    return model, inputs


def _command_partition(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.workflows.generation.partitioned import PROMPT_IDS, PartitionedGenerator

    model, inputs = _model_and_inputs(args)
    parts = graphopt.partition(model, inputs, stages=args.stages, balance=args.balance,
                               memory_cap=args.memory_cap * 2**20 if args.memory_cap else None,
                               microbatches=args.microbatches, optimize=not args.no_optimize)
    print(parts.report)
    generator = isinstance(parts, PartitionedGenerator)
    if args.output:
        directory = parts.save(args.output)
        run = (f"--generate --inputs {directory / PROMPT_IDS} --max-new-tokens 32" if generator else
               f"--inputs {directory / 'example_inputs.pt'} --microbatches {parts.microbatches}")
        print(f"wrote {len(parts.stages)} stages and {directory / 'manifest.json'}; run them with:\n"
              f"  torchrun --nproc-per-node {len(parts.stages)} -m graphopt.pipeline {directory} {run} --output out.pt")
    if args.onnx and generator:
        raise InputError("--onnx writes one-shot stages; for a language model export the unsplit steps: "
                         "graphopt.optimize(lm, (ids,)).export_onnx('lm.onnx')")
    if args.onnx:
        for path in parts.export_onnx(args.onnx):
            print(f"wrote {path}")
    if args.report:
        print(f"wrote {parts.report.to_html(args.report)}")
    return 0


def _quantize_options(args: argparse.Namespace, inputs: Any) -> dict[str, Any]:
    """``optimize`` keywords for --quantize / --calibration / --validation / --fidelity-cosine."""
    import graphopt
    from graphopt.cli.calibration_files import load_calibration

    options: dict[str, Any] = {}
    if getattr(args, "quantize", None):
        options["quantize"] = args.quantize
    rounding = getattr(args, "rounding", None)
    if rounding is not None:
        if options.get("quantize") not in ("int8-weight-only", "int4-weight-only"):
            raise InputError("--rounding chooses how weight-only quantization rounds: use it with --quantize "
                             "int8-weight-only or int4-weight-only")
        options["quantize"] = graphopt.WeightOnly(bits=8 if args.quantize == "int8-weight-only" else 4,
                                                  rounding=rounding)
    if getattr(args, "calibration", None):
        options["calibration"] = load_calibration(args.calibration, inputs)
    if getattr(args, "validation", None):
        options["validation"] = load_calibration(args.validation, inputs)
    if getattr(args, "fidelity_cosine", None) is not None:
        options["fidelity"] = graphopt.Fidelity(min_cosine=args.fidelity_cosine)
    return options


def _command_demo(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.bench import run_benchmark, zoo

    entry = zoo.load(args.model, size="small", batch=args.batch)
    print(f"demo: optimizing {entry.name} ({entry.description}) for target {args.target}\n")
    fast = graphopt.optimize(entry.model, entry.example_inputs, target=args.target)
    print(fast.report, "\n")
    backend = f"graphopt-{args.target}"
    result = run_benchmark([(entry.name, entry.model, entry.example_inputs)], target="cpu",
                           backends=["eager", backend], progress=True)
    print(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``graphopt`` command."""
    parser = argparse.ArgumentParser(prog="graphopt", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="optimize a built-in example model and measure the speedup")
    demo.add_argument("--model", default="resnet18", help="zoo model to use (default: resnet18)")
    demo.add_argument("--target", default="cpu", choices=["cpu", "onnx"])
    demo.add_argument("--batch", type=int, default=8)
    demo.set_defaults(func=_command_demo)

    optimize = commands.add_parser("optimize", help="optimize a model defined in your own file")
    optimize.add_argument("model", help="FILE.py:FACTORY — FACTORY() returns a module, or (module, inputs)")
    optimize.add_argument("--input-shape", action="append", help="e.g. 1,3,224,224 (repeat for each input)")
    optimize.add_argument("--input-dtype", action="append", help=f"one of {', '.join(_DTYPES)} (default float32)")
    optimize.add_argument("--target", default="cpu", choices=["cpu", "gpu", "onnx"])
    optimize.add_argument("-o", "--output", help="write the optimized model: .onnx or .pt2")
    optimize.add_argument("--disable", action="append", help="skip a pass by name (repeatable)")
    optimize.add_argument("--strict", action="store_true",
                          help="stop with an error when a pass fails verification (default: undo it and go on)")
    optimize.add_argument("--rollback", action="store_true", help=argparse.SUPPRESS)  # the default now
    optimize.add_argument("--dynamic-batch", action="store_true",
                          help="accept any batch size (dim 0 of every input), in the model and its ONNX file")
    optimize.add_argument("--prune", type=float, metavar="RATIO",
                          help="structured pruning: remove this fraction (e.g. 0.5) of every prunable group of "
                               "channels/features/heads; the output loss is reported (recover with graphopt.distill)")
    optimize.add_argument("--quantize",
                          choices=["int8", "int8-dynamic", "int8-weight-only", "int4-weight-only", "kmeans"],
                          help="quantize: static int8 (needs --calibration), dynamic int8, weight-only int8/int4, "
                               "or K-means weight clustering; checked against the fidelity budget")
    optimize.add_argument("--rounding", choices=["nearest", "gptq"],
                          help="with a weight-only --quantize: round each weight to nearest (default), or by GPTQ "
                               "so each layer's output on the --calibration inputs moves least")
    optimize.add_argument("--calibration", metavar="FILE.npz|FILE.py:FACTORY",
                          help="calibration inputs: a .npz with one array per model input (samples on dim 0, cut into "
                               "batches of the example's size), or a factory returning an iterable of input tuples")
    optimize.add_argument("--validation", metavar="FILE.npz|FILE.py:FACTORY",
                          help="held-out inputs (like --calibration) the fidelity budget is judged on besides; "
                               "default: the last quarter of the calibration batches")
    optimize.add_argument("--fidelity-cosine", type=float, metavar="COSINE",
                          help="lossy passes must keep the mean output cosine vs the float model >= this "
                               "(default 0.99)")
    optimize.add_argument("--report-markdown", help="also write the report as Markdown to this file")
    optimize.add_argument("--report", metavar="REPORT.html",
                          help="also write the report as one self-contained HTML page (tables and plots)")
    optimize.set_defaults(func=_command_optimize)

    split = commands.add_parser("partition", help="split a model into balanced pipeline stages (model parallelism)")
    split.add_argument("model", help="FILE.py:FACTORY — FACTORY() returns a module, or (module, inputs)")
    split.add_argument("--stages", type=int, default=2, help="number of pipeline stages (default 2)")
    split.add_argument("--balance", default="time", choices=["time", "flops", "params", "memory"],
                       help="what to equalize across stages (default: measured time)")
    split.add_argument("--memory-cap", type=float, metavar="MIB", help="per-device memory cap in MiB")
    split.add_argument("--microbatches", type=int, help="micro-batches per call (default: one per stage)")
    split.add_argument("--input-shape", action="append", help="e.g. 8,3,224,224 (repeat for each input)")
    split.add_argument("--input-dtype", action="append", help=f"one of {', '.join(_DTYPES)} (default float32)")
    split.add_argument("--no-optimize", action="store_true", help="skip the default exact passes before splitting")
    split.add_argument("-o", "--output", metavar="DIR", help="write one .pt2 per stage and manifest.json here")
    split.add_argument("--onnx", metavar="DIR", help="also write one .onnx per stage here")
    split.add_argument("--report", metavar="REPORT.html", help="write the partition report as an HTML page")
    split.set_defaults(func=_command_partition)

    try:
        from graphopt.bench import add_bench_parser
    except ImportError:  # the benchmark harness is optional at import time
        pass
    else:
        add_bench_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``graphopt`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="graphopt: %(message)s")
    try:
        return int(args.func(args) or 0)
    except GraphoptError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
