"""Knowledge distillation: fine-tune a pruned (or otherwise lossy) graph against the original model.

    pruned = graphopt.optimize(model, x, prune=0.5)
    recovered = graphopt.distill(pruned, teacher=model, data=loader, epochs=3)
    recovered.report            # the pruning, then the recovery: loss per epoch, agreement before/after

The student is a copy of the optimized graph: every floating-point weight it stores is trained
(the graph, with batch norms folded, runs in inference form); the pruned model and the teacher
are not changed. The loss is the soft-target loss of Hinton et al.: KL divergence between the
student's and the teacher's softmax at ``temperature`` (times ``temperature**2``), over the last
dim of every float output; ``loss="mse"`` matches outputs directly (embeddings, hidden states).
With ``labeled=True`` each batch is ``(inputs, labels)`` and the cross-entropy with the labels
joins the loss: ``alpha * soft + (1 - alpha) * hard``.

With ``validation=`` (batches held out from ``data``), the loss on them is measured before
training and after every epoch, and the weights of the best point are kept, the starting ones
included: training that stops helping, or never helps, does not make the model worse on data it
did not see.

The result is a new ``OptimizedModel`` lowered to the same target, with the recovery recorded
in its report. A ``fidelity=Fidelity(...)`` budget is checked after recovery (output cosine vs
the teacher on the example and the data, or ``metric``'s drop from the teacher's value) and
raises ``FidelityError`` when it is not met.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.func import functional_call

from graphopt.errors import FidelityError, InputError
from graphopt.ir.capture import eval_twin
from graphopt.ir.graph import clone_graph_module, parameter_bytes, state_update_nodes
from graphopt.passes.lossy.base import Fidelity, output_cosine
from graphopt.report import PassRecord, PlotSpec, Report, ReportSection
from graphopt.report.progress import progress
from graphopt.workflows.layer_taps import TeacherTaps, module_outputs, with_extra_outputs
from graphopt.workflows.optimized_model import OptimizedModel
from graphopt.workflows.training_graph import TrainingGraph, training_graph

__all__ = ["distill"]

LOSSES = ("kl", "mse", "cosine")


def distill(
    pruned: OptimizedModel,
    teacher: torch.nn.Module,
    data: Iterable[Any],
    *,
    epochs: int = 3,
    temperature: float = 4.0,
    alpha: float = 0.5,
    labeled: bool = False,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    loss: str = "kl",
    match: Callable[[list[Any], tuple[Any, ...]], Any] | None = None,
    layers: str | Sequence[str] | None = None,
    layer_weight: float = 1.0,
    fidelity: Fidelity | None = None,
    check_batches: int = 8,
    validation: Iterable[Any] | None = None,
) -> OptimizedModel:
    """Fine-tune ``pruned`` against ``teacher``'s outputs on ``data``; return a new optimized model.

    ``data`` yields input tuples (a tensor counts as a 1-tuple), or ``(inputs, labels)`` pairs
    with ``labeled=True``; it is iterated once per epoch, so pass a re-iterable (a list, a
    DataLoader). ``alpha`` weighs the soft (teacher) loss against the hard (label) loss when
    labeled. Batches may differ from the example in batch size, and in other dims up to the
    example's size (shorter sentences): the student trains on its graph with those dims free.

    ``loss``: ``"kl"`` (soft targets), ``"mse"`` or ``"cosine"`` (1 - cosine along the last dim:
    hidden states and embeddings, whatever their scale). ``match(outputs, inputs)`` picks what
    the student must reproduce from the flat list of outputs and the batch's inputs (the same
    function for student and teacher), e.g. mask-weighted mean pooling for sentence embeddings;
    default: every floating-point output. ``layers``: module paths (fnmatch per dotted part, e.g.
    ``"encoder.layer.*"``) whose outputs the student must match too, weighted by ``layer_weight``
    (cosine along the last dim, or MSE with ``loss="mse"``): intermediate targets recover a pruned
    model much further than its last output alone; their shapes must be the teacher's (a pruned
    hidden size cannot be matched). Agreement with the teacher (output cosine) is measured
    on the example and the first ``check_batches`` batches before and after, and recorded in the
    report. ``validation``: batches laid out like ``data``, never trained on; the loss on them picks
    the epoch whose weights are returned (or the untrained ones), and their worst output cosine is
    reported beside the training data's.
    """
    _check_arguments(pruned, teacher, data, epochs, temperature, alpha, lr, loss, match)
    if not layer_weight >= 0:
        raise InputError(f"distill(layer_weight=...) must be >= 0, got {layer_weight}")
    settings = _Settings(epochs, temperature, alpha, labeled, lr, loss, match,
                         layers if isinstance(layers, str) or layers is None else ", ".join(layers))
    batches = list(data) if not hasattr(data, "__len__") else data
    held_out = _validation_batches(validation, labeled)
    started = time.perf_counter()
    student = clone_graph_module(pruned.portable_graph)
    trainable = _trainable(student)
    if not trainable:
        raise InputError("distill: the optimized graph stores no floating-point weights to train")
    teacher_twin = eval_twin(teacher, share_weights=True)

    def run_teacher(args: tuple[Any, ...]) -> list[Any]:
        try:
            with torch.no_grad():
                return pytree.tree_leaves(teacher_twin(*args))
        except Exception as error:
            shapes = ", ".join(str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
            hint = "; batches look like (inputs, labels): pass labeled=True" if not labeled and len(args) == 2 else ""
            raise InputError(f"distill: the teacher fails on a batch of {len(args)} input(s) ({shapes}): "
                             f"{type(error).__name__}: {error}{hint}") from error

    check_inputs = [pruned.example_inputs] + [
        _split(batch, labeled)[0] for _, batch in zip(range(check_batches), batches, strict=False)
    ]
    trainer = _trainer(pruned, student, batches, labeled, check_inputs, [args for args, _ in held_out])
    trainable = {name: value for name, value in trainable.items() if name not in trainer.frozen}
    taps = module_outputs(student, [layers] if isinstance(layers, str) else list(layers)) if layers else {}
    if layers and not taps:
        raise InputError(f"distill(layers={layers!r}) names no module of the optimized graph; give module paths "
                         "like 'encoder.layer.*' (fnmatch per dotted part)")
    teacher_taps = TeacherTaps(teacher_twin, list(taps)) if taps else None
    trained_graph = (with_extra_outputs(trainer.graph_module, list(taps.values()))[0] if taps
                     else trainer.graph_module)

    def run_teacher_and_taps(args: tuple[Any, ...]) -> tuple[list[Any], list[Any]]:
        outputs = run_teacher(args)
        return outputs, (teacher_taps.take() if teacher_taps else [])

    def run_student_and_taps(args: tuple[Any, ...], params: dict[str, torch.Tensor]) -> tuple[list[Any], list[Any]]:
        trainer.check(args)
        values = list(pytree.tree_leaves(functional_call(trained_graph, params, args, strict=False)))
        return values[:len(values) - len(taps)], values[len(values) - len(taps):]

    def run_student(args: tuple[Any, ...], params: dict[str, torch.Tensor]) -> list[Any]:
        return run_student_and_taps(args, params)[0]

    def objective(args: tuple[Any, ...], labels: Any, params: dict[str, torch.Tensor],
                  expected: tuple[list[Any], list[Any]] | None = None) -> torch.Tensor:
        targets, teacher_layers = expected if expected is not None else run_teacher_and_taps(args)
        outputs, student_layers = run_student_and_taps(args, params)
        value = _loss(outputs, targets, args, labels, settings)
        if taps:
            value = value + layer_weight * _layer_loss(student_layers, teacher_layers, list(taps), settings.loss)
        return value

    before = _agreement(run_teacher, lambda a: run_student(a, trainable), check_inputs, match)
    accuracy_before = _label_accuracy(run_student, trainable, batches, labeled, check_batches)
    checkpoints = _Checkpoints(held_out, run_teacher_and_taps, objective)
    checkpoints.consider(trainable)

    params = {name: value.detach().clone().requires_grad_(True) for name, value in trainable.items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr, weight_decay=weight_decay)
    total = epochs * len(batches) if hasattr(batches, "__len__") else None
    epoch_losses: list[float] = []
    steps = ((epoch, batch) for epoch in range(epochs) for batch in batches)
    running, count, current = 0.0, 0, 0
    for epoch, batch in progress(steps, desc="distill", total=total):
        if epoch != current:
            epoch_losses.append(running / max(count, 1))
            checkpoints.consider(params)
            running, count, current = 0.0, 0, epoch
        args, labels = _split(batch, labeled)
        with torch.enable_grad():
            value = objective(args, labels, params)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        running += float(value.detach())
        count += 1
    epoch_losses.append(running / max(count, 1))
    if not all(math.isfinite(v) for v in epoch_losses):
        raise InputError(f"distill diverged (loss {epoch_losses[-1]}); use a smaller lr= than {lr}")
    checkpoints.consider(params)

    trained = checkpoints.best if held_out else {name: value.detach() for name, value in params.items()}
    _store(student, trained)
    after = _agreement(run_teacher, lambda a: run_student(a, trained), check_inputs, match)
    held_inputs = [args for args, _ in held_out]
    validation_cosines = ((_agreement(run_teacher, lambda a: run_student(a, trainable), held_inputs, match),
                           _agreement(run_teacher, lambda a: run_student(a, trained), held_inputs, match))
                          if held_out else None)
    accuracy_after = _label_accuracy(run_student, trained, batches, labeled, check_batches)

    report = Report.from_dict(pruned.report.to_dict())
    recovered = pruned.with_graph(student, report)
    metric = _metric_figures(fidelity, recovered, pruned, teacher)
    seconds = time.perf_counter() - started
    _record(report, student, settings, seconds, trainer.describe(), epoch_losses, before, after,
            accuracy_before, accuracy_after, metric, checkpoints if held_out else None, validation_cosines)
    _enforce(fidelity, after, metric)
    return recovered


def _validation_batches(validation: Iterable[Any] | None, labeled: bool) -> list[tuple[tuple[Any, ...], Any]]:
    """``validation`` as (inputs, labels) pairs; an empty or non-iterable one is an ``InputError``."""
    if validation is None:
        return []
    if isinstance(validation, torch.Tensor) or not isinstance(validation, Iterable):
        raise InputError("distill(validation=...) takes an iterable of batches laid out like data= (a list or a "
                         "DataLoader); a single tensor batch goes in a list: validation=[x]")
    held_out = [_split(batch, labeled) for batch in validation]
    if not held_out:
        raise InputError("distill(validation=...) holds no batch; give held-out batches or leave it out")
    return held_out


class _Checkpoints:
    """The validation loss at each checkpoint (before training, after every epoch) and the best weights seen.

    Without validation batches it records nothing and ``best`` stays empty.
    """

    def __init__(self, held_out: list[tuple[tuple[Any, ...], Any]], teacher: Callable[[tuple[Any, ...]], Any],
                 objective: Callable[..., torch.Tensor]) -> None:
        self.held_out = held_out
        self.objective = objective
        with torch.no_grad():
            self.targets = [teacher(args) for args, _ in held_out]  # the teacher does not change: run it once
        self.losses: list[float] = []
        self.best: dict[str, torch.Tensor] = {}
        self.best_index = 0

    def consider(self, params: dict[str, torch.Tensor]) -> None:
        """Measure ``params`` on the validation batches; keep a copy when they beat every earlier checkpoint."""
        if not self.held_out:
            return
        with torch.no_grad():
            loss = sum(float(self.objective(args, labels, params, expected))
                       for (args, labels), expected in zip(self.held_out, self.targets, strict=True))
        loss /= len(self.held_out)
        if not self.losses or loss < min(self.losses):
            self.best = {name: value.detach().clone() for name, value in params.items()}
            self.best_index = len(self.losses)
        self.losses.append(loss)


def _trainer(pruned: OptimizedModel, student: fx.GraphModule, batches: Any, labeled: bool,
             check_inputs: list[tuple[Any, ...]], validation: list[tuple[Any, ...]]) -> TrainingGraph:
    """The student as trained: its batch dim, and the dims the data (and validation) vary in, set free."""
    if pruned.example_kwargs:  # batches are positional: train at the example's shapes
        return TrainingGraph(student, pruned.dynamic, pruned.signature)
    samples = list(check_inputs[1:])
    if isinstance(batches, (list, tuple)):  # shapes are free to look at: look at all of them
        samples += [_split(batch, labeled)[0] for batch in batches[len(samples):]]
    return training_graph(student, list(pruned.example_inputs), pruned.dynamic, pruned.signature, samples + validation)


@dataclass(frozen=True)
class _Settings:
    """How distill trains (what the report describes)."""

    epochs: int
    temperature: float
    alpha: float
    labeled: bool
    lr: float
    loss: str
    match: Callable[[list[Any], tuple[Any, ...]], Any] | None
    layers: str | None = None

    def describe(self) -> str:
        return (f"{self.epochs} epoch(s), loss {self.loss}"
                + (f" at temperature {self.temperature:g}" if self.loss == "kl" else "")
                + (f" on {getattr(self.match, '__name__', 'match')}(outputs)" if self.match else "")
                + (f", layer outputs {self.layers} matched too" if self.layers else "")
                + (f", labeled (alpha {self.alpha:g})" if self.labeled else "") + f", lr {self.lr:g}")


def _check_arguments(pruned: Any, teacher: Any, data: Any, epochs: int, temperature: float, alpha: float,
                     lr: float, loss: str, match: Any) -> None:
    if not isinstance(pruned, OptimizedModel):
        raise InputError(f"distill(pruned=...) takes what graphopt.optimize returned, got {type(pruned).__name__}")
    if not isinstance(teacher, torch.nn.Module):
        raise InputError(f"distill(teacher=...) takes the original torch.nn.Module, got {type(teacher).__name__}")
    if data is None or isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise InputError("distill(data=...) takes an iterable of input batches (a list or a DataLoader); "
                         "a single tensor batch goes in a list: data=[x]")
    if not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"distill(epochs=...) must be a positive integer, got {epochs!r}")
    if not temperature > 0:
        raise InputError(f"distill(temperature=...) must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"distill(alpha=...) must be in [0, 1], got {alpha}")
    if not lr > 0:
        raise InputError(f"distill(lr=...) must be > 0, got {lr}")
    if loss not in LOSSES:
        raise InputError(f"distill(loss=...) must be one of {', '.join(LOSSES)}, got {loss!r}")
    if match is not None and not callable(match):
        raise InputError(f"distill(match=...) takes a function of (outputs, inputs), got {type(match).__name__}")


def _split(batch: Any, labeled: bool) -> tuple[tuple[Any, ...], Any]:
    """A batch as (input tuple, labels or None)."""
    if labeled:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise InputError("distill(labeled=True) needs each batch to be an (inputs, labels) pair, got "
                             f"{type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list))
                                                          else ""))
        inputs, labels = batch
    else:
        inputs, labels = batch, None
    if isinstance(inputs, torch.Tensor):
        return (inputs,), labels
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), labels
    raise InputError(f"distill: a batch's inputs must be a tensor or a tuple of them, got {type(inputs).__name__}")


def _trainable(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every floating-point weight the graph reads (not state it updates), by attribute name."""
    updated = {str(u.args[0].target) for u in state_update_nodes(gm) if u.args[0].op == "get_attr"}
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    out = {}
    for name, tensor in [*gm.named_parameters(), *gm.named_buffers()]:
        if name in read and name not in updated and tensor.is_floating_point():
            out[name] = tensor
    return out


def _float_pairs(outputs: list[Any], targets: list[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = [(o, t) for o, t in zip(outputs, targets, strict=False)
             if isinstance(o, torch.Tensor) and o.is_floating_point() and isinstance(t, torch.Tensor)]
    if not pairs or any(o.shape != t.shape for o, t in pairs):
        shapes = [(tuple(o.shape), tuple(t.shape)) for o, t in pairs]
        raise InputError(f"distill: the student's and the teacher's outputs do not match ({shapes}); the teacher "
                         "must be the model that was optimized")
    return pairs


def _matched(outputs: list[Any], inputs: tuple[Any, ...], match: Any) -> list[Any]:
    if match is None:
        return outputs
    try:
        return pytree.tree_leaves(match(outputs, inputs))
    except Exception as error:
        raise InputError(f"distill(match=...) failed on a batch: {type(error).__name__}: {error}") from error


def _layer_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], paths: list[str],
                kind: str) -> torch.Tensor:
    """How far the student's layer outputs are from the teacher's: 1 - cosine along the last dim, or MSE."""
    total = torch.zeros(())
    for path, s, t in zip(paths, student, teacher, strict=True):
        if s.shape != t.shape:
            raise InputError(f"distill(layers=...): {path} gives {tuple(s.shape)} in the student and "
                             f"{tuple(t.shape)} in the teacher (a pruned hidden size?); match other layers or "
                             "outputs only")
        if kind == "mse":
            total = total + F.mse_loss(s.float(), t.float())
        else:
            total = total + (1 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean()
    return total / max(len(paths), 1)


def _loss(outputs: list[Any], targets: list[Any], inputs: tuple[Any, ...], labels: Any,
          settings: _Settings) -> torch.Tensor:
    logits = outputs[0] if outputs else None
    pairs = _float_pairs(_matched(outputs, inputs, settings.match), _matched(targets, inputs, settings.match))
    temperature = settings.temperature
    soft = torch.zeros(())
    for student, teacher in pairs:
        if settings.loss == "mse" or student.dim() == 0:
            soft = soft + F.mse_loss(student.float(), teacher.float())
        elif settings.loss == "cosine":
            soft = soft + (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
        else:
            s = student.float().reshape(-1, student.shape[-1]) / temperature
            t = teacher.float().reshape(-1, teacher.shape[-1]) / temperature
            soft = soft + F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                                   reduction="batchmean") * temperature ** 2
    if labels is None:
        return soft
    hard = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).long())
    return settings.alpha * soft + (1 - settings.alpha) * hard


def _agreement(teacher: Any, student: Any, inputs: list[tuple[Any, ...]], match: Any) -> float:
    """Worst cosine of the student's (matched) outputs against the teacher's over ``inputs``."""
    worst = 1.0
    with torch.no_grad():
        for args in inputs:
            expected, actual = _matched(teacher(args), args, match), _matched(student(args), args, match)
            worst = min(worst, output_cosine(expected, actual))
    return worst


def _label_accuracy(run_student: Any, params: dict[str, torch.Tensor], batches: Any, labeled: bool,
                    limit: int) -> float | None:
    """Share of the first ``limit`` labeled batches' samples the student's first output classifies right."""
    if not labeled:
        return None
    right = seen = 0
    with torch.no_grad():
        for _, batch in zip(range(limit), batches, strict=False):
            args, labels = _split(batch, True)
            logits = run_student(args, params)[0]
            right += int((logits.reshape(-1, logits.shape[-1]).argmax(-1) == labels.reshape(-1)).sum())
            seen += labels.numel()
    return right / seen if seen else None


def _store(gm: fx.GraphModule, values: dict[str, torch.Tensor]) -> None:
    """Put trained values into the student graph (a private copy) under the same names."""
    for name, value in values.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        # nn.Module.__setattr__ stores a Parameter as a parameter and a tensor under a buffer's name as that buffer
        if isinstance(getattr(owner, leaf), torch.nn.Parameter):
            setattr(owner, leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
        else:
            setattr(owner, leaf, value.clone())


def _metric_figures(fidelity: Fidelity | None, recovered: OptimizedModel, pruned: OptimizedModel,
                    teacher: torch.nn.Module) -> dict[str, float]:
    if fidelity is None or fidelity.metric is None:
        return {}
    twin = eval_twin(teacher, share_weights=True)
    with torch.no_grad():
        baseline = float(fidelity.metric(twin))
        before = float(fidelity.metric(pruned))
        after = float(fidelity.metric(recovered))
    return {"teacher": baseline, "before": before, "after": after, "drop_before": baseline - before,
            "drop_after": baseline - after}


def _record(report: Report, student: fx.GraphModule, settings: _Settings, seconds: float, shapes: str,
            epoch_losses: list[float], before: float, after: float, accuracy_before: float | None,
            accuracy_after: float | None, metric: dict[str, float], checkpoints: _Checkpoints | None,
            validation_cosines: tuple[float, float] | None) -> None:
    nodes = sum(1 for n in student.graph.nodes if n.op not in ("placeholder", "output"))
    size = parameter_bytes(student)
    stats: dict[str, int | float] = {"epochs": settings.epochs, "final_loss": round(epoch_losses[-1], 6)}
    if checkpoints is not None:
        stats.update(kept_epoch=checkpoints.best_index, validation_loss=round(min(checkpoints.losses), 6))
    report.records.append(PassRecord(
        name="distill", status="changed", nodes_before=nodes, nodes_after=nodes, param_bytes_before=size,
        param_bytes_after=size, seconds=seconds, stats=stats,
        fidelity={"budget": "recovery", "enforced": False, "cosine": after, "cosine_before": before,
                  **({"metric": metric["after"], "metric_drop": metric["drop_after"]} if metric else {})},
    ))
    rows: list[list[Any]] = [["output cosine vs teacher (worst batch)", round(before, 6), round(after, 6)]]
    if accuracy_before is not None and accuracy_after is not None:
        rows.append(["label accuracy on the data (first batches)", round(accuracy_before, 4), round(accuracy_after, 4)])
    if metric:
        rows.append([f"metric (teacher {metric['teacher']:.4g})", round(metric["before"], 6),
                     round(metric["after"], 6)])
        rows.append(["metric drop vs teacher", round(metric["drop_before"], 6), round(metric["drop_after"], 6)])
    description = f"{settings.describe()}, {shapes}, {seconds:.1f} s"
    series: dict[str, list[float | None]] = {"training loss": [None, *epoch_losses]}
    marked: list[int] = []
    if checkpoints is not None and validation_cosines is not None:
        rows.append(["output cosine vs teacher (worst validation batch)", round(validation_cosines[0], 6),
                     round(validation_cosines[1], 6)])
        rows.append(["validation loss", round(checkpoints.losses[0], 6), round(min(checkpoints.losses), 6)])
        series["validation loss"] = list(checkpoints.losses)
        marked = [checkpoints.best_index]
        kept = (f"the weights after epoch {checkpoints.best_index}" if checkpoints.best_index
                else "the untrained weights (no epoch lowered the validation loss)")
        description += f"; kept {kept}"
        report.notes.append(f"distill: kept {kept}; validation loss {checkpoints.losses[0]:.5g} -> "
                            f"{min(checkpoints.losses):.5g}")
    plot = PlotSpec(kind="line", title="distill: loss per epoch (0: before training)",
                    x_labels=[str(i) for i in range(len(epoch_losses) + 1)], series=series,
                    x_label="epoch", y_label="loss", marked=marked, marked_label="weights kept")
    report.sections.append(ReportSection("distill: recovery", description, ["measure", "before", "after"], rows,
                                         [plot]))
    report.notes.append(f"distill: output cosine vs teacher {before:.5f} -> {after:.5f}"
                        + (f"; metric drop {metric['drop_before']:.4g} -> {metric['drop_after']:.4g}" if metric
                           else ""))


def _enforce(fidelity: Fidelity | None, after: float, metric: dict[str, float]) -> None:
    if fidelity is None or not fidelity.enforce:
        return
    if fidelity.metric is not None:
        if metric["drop_after"] > fidelity.max_drop:  # type: ignore[operator]
            error = FidelityError(
                f"distill: after recovery the metric is {metric['after']:.4g}, {metric['drop_after']:.4g} below the "
                f"teacher's {metric['teacher']:.4g}; the budget allows {fidelity.max_drop:g}. Train longer (epochs=), "
                "with more data, or prune less.", "distill")
            error.best = metric["after"]
            raise error
    elif after < fidelity.min_cosine:
        error = FidelityError(
            f"distill: after recovery the output cosine vs the teacher is {after:.5f}, below the budget "
            f"{fidelity.min_cosine:g}. Train longer (epochs=), with more data, or prune less.", "distill")
        error.best = after
        raise error
