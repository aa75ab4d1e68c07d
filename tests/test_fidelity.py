"""The lossy-pass mechanism: fidelity budgets, sensitivity, fallback, calibration data, report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx

import graphopt
from graphopt import CalibrationData, Fidelity, FidelityError, InputError, LossyPass, LossyPlan, LossyUnit, PassError
from graphopt.ir.graph import attribute_value, prune_unused_attributes, register_constant
from graphopt.passes.base import PassResult
from graphopt.passes.lossy.base import output_cosine, output_sqnr_db
from graphopt.targets.cpu.target import CpuTarget


def _linear_weights(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default]


class _RoundPlan(LossyPlan):
    def __init__(self, gm: fx.GraphModule, bits: int) -> None:
        self.bits = bits
        self.units = []
        for node in _linear_weights(gm):
            weight = node.args[1]
            shape = list(weight.meta["val"].shape)
            self.units.append(LossyUnit(node.name, "linear", f"{bits}-bit uniform", {"shape": shape}))

    def apply(self, gm: fx.GraphModule, skip: frozenset[str] = frozenset()) -> PassResult:
        changed = 0
        for node in _linear_weights(gm):
            if node.name in skip:
                continue
            weight_node = node.args[1]
            weight = attribute_value(gm, weight_node)
            step = weight.abs().max() / (2 ** (self.bits - 1) - 1 if self.bits > 1 else 1)
            rounded = (weight / step).round() * step
            node.replace_input_with(weight_node, register_constant(gm, f"{weight_node.target}_r", rounded, node))
            changed += 1
        prune_unused_attributes(gm)
        return PassResult(changed > 0, {"rounded": changed})


@dataclass(frozen=True)
class RoundWeights(LossyPass):
    """A user-written lossy pass: round every linear weight to ``bits`` uniform levels."""

    name = "round-weights"
    bits: int = 4

    def plan(self, gm: fx.GraphModule, data: CalibrationData) -> LossyPlan:
        return _RoundPlan(gm, self.bits)


class ThreeLayers(torch.nn.Module):
    """Three linears; the middle one has one huge weight, so rounding wrecks its small ones."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 32)
        self.c = torch.nn.Linear(32, 8)
        with torch.no_grad():
            self.b.weight[0, 0] = 40.0  # an outlier: per-tensor rounding of b loses everything else

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 16, generator=torch.Generator().manual_seed(1))


def _record(report: graphopt.Report, name: str = "round-weights") -> graphopt.PassRecord:
    return next(r for r in report.records if r.name == name)


def test_cosine_and_sqnr_measure_what_they_say() -> None:
    ref = [torch.tensor([[1.0, 0.0], [0.0, 2.0]])]
    assert output_cosine(ref, ref) == 1.0
    assert output_cosine(ref, [torch.tensor([[0.0, 1.0], [0.0, 2.0]])]) == pytest.approx(0.5)
    assert output_sqnr_db(ref, [ref[0] * 1.1]) == pytest.approx(20.0, abs=1e-4)  # noise = 10% of signal
    assert output_sqnr_db(ref, ref) == float("inf")


def test_a_loose_budget_keeps_every_unit_and_reports_the_measured_error() -> None:
    model = ThreeLayers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _x()
    fast = graphopt.optimize(model, (x,), passes=["dce", RoundWeights(bits=8)],
                             fidelity=Fidelity(min_cosine=0.9))
    record = _record(fast.report)
    assert record.status == "changed" and record.stats["rounded"] == 3
    assert record.fidelity["fallen_back"] == 0 and record.fidelity["units"] == 3
    assert 0.9 <= record.fidelity["cosine"] < 1.0  # lossy: not exact
    out = fast(x)
    assert not torch.equal(out, model(x))
    assert output_cosine([model(x)], [out]) == pytest.approx(fast.report.final_cosine, abs=1e-6)
    section = next(s for s in fast.report.sections if s.title.startswith("round-weights"))
    assert len(section.rows) == 3 and section.headers[:3] == ["unit", "kind", "scheme"]
    assert all(row[section.headers.index("status")] == "kept" for row in section.rows)
    assert "cosine" in str(fast.report) and "budget output cosine >= 0.9" in str(fast.report)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"optimize changed the user's {key}"


def test_a_tight_budget_falls_back_the_most_sensitive_unit_first() -> None:
    model = ThreeLayers()
    x = _x()
    fast = graphopt.optimize(model, (x,), passes=["dce", RoundWeights(bits=6)],
                             fidelity=Fidelity(min_cosine=0.995))
    section = next(s for s in fast.report.sections if s.title.startswith("round-weights"))
    status = {row[0]: row[section.headers.index("status")] for row in section.rows}
    sqnr = {row[0]: row[section.headers.index("SQNR dB (alone)")] for row in section.rows}
    fallen = [name for name, s in status.items() if s == "fallen back"]
    layers = [row[0] for row in section.rows]
    assert fallen == [layers[1]], "only the layer with the outlier weight (b) breaks cosine 0.995 at 6 bits"
    assert min(sqnr, key=sqnr.get) == layers[1]  # it is the most sensitive one
    assert all(sqnr[name] <= min(sqnr[k] for k in status if status[k] == "kept") for name in fallen)
    assert fast.report.final_cosine >= 0.995
    assert output_cosine(model(x), fast(x)) == pytest.approx(fast.report.final_cosine, abs=1e-9)
    assert _record(fast.report).fidelity["fallen_back"] == len(fallen)
    assert section.plots and section.plots[0].marked  # fallen-back units are marked in the plot


def test_an_unmeetable_budget_raises_with_the_best_value_reached() -> None:
    with pytest.raises(FidelityError, match=r"cannot meet the budget output cosine >= 0\.999999.*reaches only cosine"):
        graphopt.optimize(ThreeLayers(), (_x(),), passes=[RoundWeights(bits=1)],
                          fidelity=Fidelity(min_cosine=0.999999), on_error="rollback")


def test_a_budget_that_is_not_enforced_is_reported_only() -> None:
    fast = graphopt.optimize(ThreeLayers(), (_x(),), passes=[RoundWeights(bits=2)],
                             fidelity=Fidelity(min_cosine=0.999999, enforce=False))
    record = _record(fast.report)
    assert record.fidelity["fallen_back"] == 0 and record.fidelity["enforced"] is False
    assert record.fidelity["cosine"] < 0.999999
    assert "reported only" in str(fast.report)


def test_a_user_metric_budget_is_measured_on_the_graph_and_the_lowered_model() -> None:
    model = ThreeLayers()
    x = _x(16)
    target = model(x).detach()
    calls = []

    def negative_mse(candidate) -> float:
        calls.append(candidate)
        return -float((candidate(x) - target).pow(2).mean())

    fast = graphopt.optimize(model, (x,), passes=[RoundWeights(bits=6)],
                             fidelity=Fidelity(metric=negative_mse, max_drop=1e-3))
    record = _record(fast.report)
    assert record.fidelity["metric_drop"] <= 1e-3
    assert fast.report.final_metric["drop"] <= 1e-3
    assert fast.report.final_metric["baseline"] == pytest.approx(0.0, abs=1e-10)
    assert calls[-1] is fast  # the last measurement is of the lowered model


def test_calibration_batches_of_another_size_are_regrouped_and_misfits_skipped_with_a_note() -> None:
    model = ThreeLayers()
    batches = [(torch.randn(4, 16),) for _ in range(3)] + [(torch.randn(3, 16),)]  # last: a short batch
    fast = graphopt.optimize(model, (_x(),), passes=[RoundWeights(bits=8)], calibration=batches)
    assert any("1 calibration batch(es) of another batch size (3 samples) were regrouped into 1 batch(es) of the "
               "example's size 4 (repeating samples to fill one)" in note for note in fast.report.notes)
    loader = [(torch.randn(6, 16),), (torch.randn(6, 16),), (torch.randn(4, 15),)]  # 12 samples, one misfit
    fast = graphopt.optimize(model, (_x(),), passes=[RoundWeights(bits=8)], calibration=loader)
    assert any("regrouped into 3 batch(es)" in note for note in fast.report.notes)
    assert any("1 calibration batch(es) skipped" in note for note in fast.report.notes)
    with pytest.raises(InputError, match="none of the 1 calibration batch"):
        graphopt.optimize(model, (_x(),), passes=[RoundWeights(bits=8)], calibration=[(torch.randn(4, 15),)])
    with pytest.raises(InputError, match="iterable of batches"):
        graphopt.optimize(model, (_x(),), passes=[RoundWeights(bits=8)], calibration=torch.randn(4, 16))
    with pytest.raises(InputError, match="dynamic_batch"):
        graphopt.optimize(model, (_x(),), passes=[RoundWeights(bits=8)], calibration=[(torch.randn(2, 15),)])


def test_dynamic_batch_takes_calibration_batches_of_any_size() -> None:
    batches = [(torch.randn(b, 16),) for b in (2, 3, 7)]
    fast = graphopt.optimize(ThreeLayers(), (_x(),), passes=[RoundWeights(bits=8)], calibration=batches,
                             dynamic_batch=True)
    assert not any("skipped" in note for note in fast.report.notes)
    assert fast(torch.randn(5, 16)).shape == (5, 8)


def test_a_lossy_pass_outside_optimize_needs_a_budget() -> None:
    captured = graphopt.capture(ThreeLayers(), (_x(),))
    manager = graphopt.PassManager([RoundWeights()])
    with pytest.raises(PassError, match=r"lossy pass.*fidelity budget"):
        manager.run(captured.graph_module, captured.flat_inputs, graphopt.Report(target="cpu"))


def test_bad_budgets_say_what_to_do() -> None:
    with pytest.raises(InputError, match="needs max_drop"):
        Fidelity(metric=lambda m: 0.0)
    with pytest.raises(InputError, match=r"min_cosine=.*\(0, 1\]"):
        Fidelity(min_cosine=1.5)
    with pytest.raises(InputError, match=r"must be a graphopt\.Fidelity"):
        graphopt.optimize(ThreeLayers(), (_x(),), passes=[RoundWeights()], fidelity=0.99)


def test_a_lossy_pass_runs_once_in_fixed_point_mode_and_the_report_renders(tmp_path) -> None:
    fast = graphopt.optimize(ThreeLayers(), (_x(),), passes=["dce", RoundWeights(bits=8)], fixed_point=True)
    assert [r.name for r in fast.report.records].count("round-weights") == 1
    html = fast.report.to_html(tmp_path / "report.html").read_text()
    assert "round-weights: per unit" in html and "<svg" in html
    again = graphopt.Report.from_dict(fast.report.to_dict())
    assert again.records[-1].fidelity == fast.report.records[-1].fidelity


def test_a_lossy_model_exports_to_onnx_checked_by_its_budget(tmp_path) -> None:
    model = ThreeLayers()
    x = _x()
    fast = graphopt.optimize(model, (x,), passes=[RoundWeights(bits=8)], fidelity=Fidelity(min_cosine=0.9))
    path = fast.export_onnx(tmp_path / "lossy.onnx")  # not exact vs eager, but within the budget
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert torch.allclose(torch.from_numpy(onnx_out), fast(x), atol=1e-5)
    assert output_cosine(model(x), torch.from_numpy(onnx_out)) >= 0.9


class _LossierKernels(CpuTarget):
    """A cpu target whose kernels lose more than the graph simulates: it adds ``factor`` times the graph's own error."""

    def __init__(self, float_model: torch.nn.Module, factor: float) -> None:
        super().__init__()
        self.float_model, self.factor = float_model, factor

    def lower(self, gm: fx.GraphModule, context):
        runner = super().lower(gm, context)

        def lowered(*args):
            out = runner(*args)
            with torch.no_grad():
                return out + self.factor * (out - self.float_model(*args))

        return lowered


def _fallen_back(report: graphopt.Report) -> int:
    return _record(report).fidelity["fallen_back"]


def test_a_lowered_model_that_misses_the_budget_keeps_more_layers_in_float() -> None:
    model, x = ThreeLayers(), _x()
    budget = Fidelity(min_cosine=0.995)
    plain = graphopt.optimize(model, (x,), passes=["dce", RoundWeights(bits=6)], fidelity=budget)
    fast = graphopt.optimize(model, (x,), _LossierKernels(model, factor=2.0), passes=["dce", RoundWeights(bits=6)],
                             fidelity=budget)
    assert fast.report.final_check == "passed" and fast.report.final_cosine >= 0.995
    assert output_cosine(model(x), fast(x)) >= 0.995
    assert _fallen_back(fast.report) > _fallen_back(plain.report)  # the retry kept more layers in float
    retries = [n for n in fast.report.notes if "missed its budget" in n]
    assert retries and "ran again holding the graph to" in retries[0]
    assert len(fast.report.records) == len(plain.report.records)  # the report holds the run that was kept


def test_a_lowering_no_tighter_graph_rescues_still_raises() -> None:
    model, x = ThreeLayers(), _x()
    with pytest.raises(graphopt.VerificationError, match="output cosine"):
        graphopt.optimize(model, (x,), _LossierKernels(model, factor=400.0), passes=["dce", RoundWeights(bits=8)],
                          fidelity=Fidelity(min_cosine=0.99))


class TwoBranches(torch.nn.Module):
    """``p`` reads the first 8 features, ``q`` the last 8; ``r`` has weights 4-bit rounding keeps exactly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.p, self.q, self.r = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
        with torch.no_grad():
            self.r.weight.copy_(torch.randint(-7, 8, (4, 16)) / 7.0)
            self.r.weight[0, 0] = 1.0  # the largest magnitude: 4-bit steps of 1/7 are exact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.r(torch.relu(self.p(x[:, :8]) + self.q(x[:, 8:])))


def _first_half(batch: int, seed: int) -> torch.Tensor:
    """Inputs whose last 8 features are small: they barely show ``q``'s rounding."""
    x = torch.randn(batch, 16, generator=torch.Generator().manual_seed(seed))
    x[:, 8:] *= 0.05
    return x


def test_the_budget_is_judged_on_held_out_data_the_layers_were_not_chosen_on() -> None:
    calibration = [(_first_half(8, seed),) for seed in range(4)]
    fresh = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(10 + i)),) for i in range(2)]
    budget = Fidelity(min_cosine=0.9995)

    blind = graphopt.optimize(TwoBranches(), (_first_half(8, 99),), passes=[RoundWeights(bits=4)],
                              calibration=calibration, fidelity=dataclasses.replace(budget, held_out=0))
    with torch.no_grad():  # chosen and judged on data that barely exercises q: fresh inputs break the budget
        assert min(output_cosine(TwoBranches()(x), blind(x)) for (x,) in fresh) < budget.min_cosine

    judged = graphopt.optimize(TwoBranches(), (_first_half(8, 99),), passes=[RoundWeights(bits=4)],
                               calibration=calibration, validation=fresh, fidelity=budget)
    record = _record(judged.report)
    assert record.fidelity["held_out_cosine"] >= budget.min_cosine
    assert record.fidelity["fallen_back"] == _record(blind.report).fidelity["fallen_back"] + 1
    assert judged.report.final_held_out_cosine >= budget.min_cosine
    assert "on held-out data" in str(judged.report)
    assert any("2 validation batch(es)" in note for note in judged.report.notes)
    with torch.no_grad():
        assert min(output_cosine(TwoBranches()(x), judged(x)) for (x,) in fresh) >= budget.min_cosine


def test_without_validation_the_last_calibration_batches_are_held_out() -> None:
    batches = [(_x(4),)] + [(torch.randn(4, 16, generator=torch.Generator().manual_seed(s)),) for s in range(7)]
    fast = graphopt.optimize(ThreeLayers(), (_x(),), passes=[RoundWeights(bits=8)], calibration=batches)
    assert any("6 batch(es) choose the layers, the last 2 are held out" in note for note in fast.report.notes)
    assert "held_out_cosine" in _record(fast.report).fidelity
    few = graphopt.optimize(ThreeLayers(), (_x(),), passes=[RoundWeights(bits=8)], calibration=batches[:2])
    assert any("give validation= to judge it on other data" in note for note in few.report.notes)
    with pytest.raises(InputError, match="held_out"):
        Fidelity(held_out=1.0)
