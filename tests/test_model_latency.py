"""Whole-model latency on the CPU: the unquantized rest in the latency table, whole-model latency budgets, and
check_latency's predicted-vs-measured report (structure only: a shared 2-core CPU is too noisy for the 5% goal)."""

import copy
import json

import numpy as np
import pytest
import torch
from tiny import lm_batches, save_model_and_calib, tiny_llama

from allocator import (Budget, Plan, build_problem, check_latency, format_checks, predict_latency, profile_model,
                       solve_profiled, uniform_plan)
from allocator.cli import main
from kernels import Choice
from kernels.latency import LatencyTable, entry_key, measure
from kernels.model_latency import measure_rest, model_key, stubbed, time_forward
from profilers import build_layer_graph
from solvers import InfeasibleError

CHOICES = ("w2", "w4", "w8")
TOKENS = (1, 4)


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    graph = build_layer_graph(model, lm_batches(1)[0])
    table = measure(graph, CHOICES, tokens=TOKENS, device="cpu", reps=2)
    measure_rest(model, graph, tokens=TOKENS, device="cpu", reps=3, table=table)
    profiled = profile_model(model, lm_batches(2), [Choice.parse(c) for c in CHOICES], profiler="gptq")
    return model, graph, table, profiled


def layer_ms(table, layer, choice, tokens=1):
    return table.layer_ms((layer.out_features, layer.in_features), choice, tokens, layer.kind)


def test_rest_is_measured_once_per_token_count_and_serialized(setup, tmp_path):
    model, graph, table, profiled = setup
    key = model_key(model, graph.names)
    assert key == profiled.rest_key
    rest = table.rest[key]
    assert set(rest.ms) == set(TOKENS) and all(ms > 0 for ms in rest.ms.values())
    assert rest.mode == {t: "cpu" for t in TOKENS} and rest.layers == len(graph) == 15
    assert rest.model == "LlamaForCausalLM" and rest.dtype == "float32"
    for e in table.entries.values():
        assert e.selected in e.all_ms and e.model_ms == e.all_ms[e.selected]
    table.save(tmp_path / "t.json")
    again = LatencyTable.load(tmp_path / "t.json")
    assert again.to_dict() == table.to_dict()
    assert rest.calibration_ms == {}  # calibrated on CUDA only, unless asked for
    assert again.rest_ms(key, 4) == rest.ms[4]
    assert again.rest_ms("OtherModel:0123", 1) is None
    with pytest.raises(KeyError, match=r"measured at tokens \[1, 4\].*not at 16"):
        again.rest_ms(key, 16)
    # more token counts merge into the same entry
    measure_rest(model, graph, tokens=(2,), device="cpu", reps=1, table=again)
    assert set(again.rest[key].ms) == {1, 2, 4}


def test_tables_without_rest_or_selected_path_still_load(setup):
    _, graph, table, _ = setup
    old = copy.deepcopy(table.to_dict())
    del old["rest"]
    for e in old["entries"].values():
        del e["selected"]
    loaded = LatencyTable.from_dict(old)
    assert loaded.rest == {}
    layer = graph.layers[0]
    entry = loaded.entries[entry_key((layer.out_features, layer.in_features), "w4", 1)]
    assert entry.selected is None and layer_ms(loaded, layer, "w4") == entry.ms


def test_the_rest_is_calibrated_by_the_float_models_own_forward(monkeypatch):
    """With a table (on CUDA, or when asked for), measure_rest also times the float model's whole forward and its
    float layers alone (as the table's entries are timed): what the forward took beyond the rest and those layers
    (the gaps a layer pays inside the model's graph) is the rest's calibration, charged to every plan with the rest.
    Fixed timings here; tables from before the calibration load without it; timings too noisy to calibrate leave
    the rest uncalibrated, with a warning."""
    import kernels.model_latency as ml
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4), torch.nn.Linear(4, 4),
                              torch.nn.Linear(4, 4))
    names = ["0", "2", "3", "4"]
    stubbed_ms, whole_ms = 1.0, 2.5
    monkeypatch.setattr(ml, "time_forward", lambda model, *a, **k: ml.ForwardTiming(
        stubbed_ms if type(model[0]).__name__ == "_Stub" else whole_ms, "cpu"))
    timed = []
    monkeypatch.setattr(ml, "time_layer", lambda fn, x, reps, flush, tokens: timed.append(tuple(x.shape)) or 0.25)
    table = LatencyTable("cpu-test", {})
    rest = measure_rest(mlp, names, tokens=(3,), device="cpu", inputs=lambda t: torch.randn(1, t, 8),
                        table=table, calibrate=True)
    assert sorted(timed) == [(1, 3, 4), (1, 3, 8), (1, 3, 16)]  # each distinct layer and input once: 4x4 twice
    assert rest.ms[3] == stubbed_ms and rest.calibration_ms[3] == pytest.approx(whole_ms - stubbed_ms - 4 * 0.25)
    key = model_key(mlp, names)
    assert table.rest_ms(key, 3) == pytest.approx(whole_ms - 4 * 0.25)
    loaded = LatencyTable.from_dict(table.to_dict())
    assert loaded.rest_ms(key, 3) == table.rest_ms(key, 3)
    old = table.to_dict()
    del old["rest"][key]["calibration_ms"]
    assert LatencyTable.from_dict(old).rest_ms(key, 3) == stubbed_ms
    whole_ms = 0.5  # noise: the whole forward no longer than its layers alone
    with pytest.warns(UserWarning, match="cannot calibrate the rest"):
        rest = measure_rest(mlp, names, tokens=(3,), device="cpu", inputs=lambda t: torch.randn(1, t, 8),
                            table=table, calibrate=True)
    assert rest.calibration_ms == {} and table.rest_ms(key, 3) == stubbed_ms
    with pytest.raises(ValueError, match="calibrate=True needs table="):
        measure_rest(mlp, names, tokens=(3,), device="cpu", inputs=lambda t: torch.randn(1, t, 8),
                     calibrate=True)


def test_the_rest_is_calibrated_by_a_w4_forward_where_the_table_holds_w4_for_every_layer(monkeypatch):
    """Where the table has w4 entries for every stubbed layer, the calibration's forward is of the model with every
    layer quantized to w4, less the rest and those very entries: no float layer is timed alone. The model gets its
    float layers back afterwards. Fixed timings here."""
    import kernels.model_latency as ml
    from kernels.modules import QuantizedLinear
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4), torch.nn.Linear(4, 4))
    names = ["0", "2", "3"]
    table = measure([(16, 8), (4, 16), (4, 4)], ["w4"], tokens=(3,), device="cpu", reps=1)
    for entry in table.entries.values():
        entry.ms = entry.all_ms[entry.selected] = 0.25
    forwards = []

    def timed(model, *a, **k):
        forwards.append(type(model[0]).__name__)
        return ml.ForwardTiming({"_Stub": 1.0, "QuantizedLinear": 2.0}[forwards[-1]], "cpu")
    monkeypatch.setattr(ml, "time_forward", timed)
    monkeypatch.setattr(ml, "time_layer", lambda *a, **k: pytest.fail("a float layer was timed alone"))
    rest = measure_rest(mlp, names, tokens=(3,), device="cpu", inputs=lambda t: torch.randn(1, t, 8),
                        table=table, calibrate=True)
    assert forwards == ["_Stub", "QuantizedLinear"]
    assert rest.calibration_from == {3: "w4"} and rest.calibration_ms[3] == pytest.approx(2.0 - 1.0 - 3 * 0.25)
    assert all(type(mlp.get_submodule(n)) is torch.nn.Linear for n in names)
    assert not any(isinstance(m, QuantizedLinear) for m in mlp.modules())
    loaded = LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert loaded.rest[model_key(mlp, names)].calibration_from == {3: "w4"}

    del table.entries[entry_key((4, 4), "w4", 3)]  # w4 no longer covers every layer: the float model calibrates
    monkeypatch.setattr(ml, "time_layer", lambda *a, **k: 0.25)
    mlp_forwards = {"_Stub": 1.0, "Linear": 2.5}
    monkeypatch.setattr(ml, "time_forward", lambda model, *a, **k: ml.ForwardTiming(
        mlp_forwards[type(model[0]).__name__], "cpu"))
    rest = measure_rest(mlp, names, tokens=(3,), device="cpu", inputs=lambda t: torch.randn(1, t, 8),
                        table=table, calibrate=True)
    assert rest.calibration_from == {3: "float"} and rest.calibration_ms[3] == pytest.approx(2.5 - 1.0 - 3 * 0.25)


def test_a_layer_that_takes_two_inputs_leaves_the_rest_uncalibrated():
    """A stubbed layer called with more than one input cannot be timed alone: the rest is measured, uncalibrated,
    with a warning that says so."""

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
            return self.lin(x) * scale

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = Scaled()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x, 2.0).relu()

    table = LatencyTable("cpu-test", {})
    with pytest.warns(UserWarning, match="cannot be timed alone"):
        rest = measure_rest(Net(), ["layer"], tokens=(2,), device="cpu", reps=1, inputs=lambda t: torch.randn(t, 8),
                            table=table, calibrate=True)
    assert rest.ms[2] > 0 and rest.calibration_ms == {}


def test_stubs_restore_the_model_and_bad_arguments_are_named(setup):
    model, graph, _, _ = setup
    x = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        before = model(x).logits
        with stubbed(model, graph):
            assert type(model.get_submodule(graph.names[0])).__name__ == "_Stub"
            stubbed_out = model(x).logits
        after = model(x).logits
    assert torch.equal(before, after) and not torch.equal(before, stubbed_out)
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in graph.names)
    with pytest.raises(ValueError, match="do not exist"):
        measure_rest(model, ["model.nope"], tokens=(1,), device="cpu")
    with pytest.raises(ValueError, match="tokens=0"):
        time_forward(model, 0, "cpu")
    with pytest.raises(ValueError, match="captures=0"):
        time_forward(model, 1, "cpu", captures=0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    with pytest.raises(ValueError, match="pass inputs="):
        time_forward(mlp, 2, "cpu")
    timing = time_forward(mlp, 3, "cpu", reps=2, inputs=lambda t: torch.randn(1, t, 8))
    assert timing.ms > 0 and timing.mode == "cpu"
    rest = measure_rest(mlp, ["0", "2"], tokens=(3,), device="cpu", reps=2, inputs=lambda t: torch.randn(1, t, 8))
    assert rest.ms[3] > 0 and rest.layers == 2


def test_latency_budget_covers_the_whole_model(setup):
    model, graph, table, profiled = setup
    rest = table.rest_ms(profiled.rest_key, 1)
    lo = rest + sum(min(layer_ms(table, l, c) for c in CHOICES) for l in graph.layers)
    hi = rest + sum(max(layer_ms(table, l, c) for c in CHOICES) for l in graph.layers)
    budget = (lo + hi) / 2
    plan = solve_profiled(profiled, Budget(latency_ms=budget), latency_table=table, tokens=1)
    p = plan.predicted
    layers = sum(layer_ms(table, graph[l.name], l.choice) for l in plan.layers)
    assert p["latency_ms"] <= budget * (1 + 1e-7)
    assert p["latency_rest_ms"] == rest
    assert p["latency_layers_ms"] == pytest.approx(layers)
    assert p["latency_ms"] == pytest.approx(rest + layers)
    assert plan.solver["latency_scope"] == "whole model" and plan.solver["latency_tokens"] == 1
    assert "whole model" in plan.summary() and f"rest {rest:.4g}" in plan.summary()

    with pytest.raises(InfeasibleError, match=r"below the model's unquantized rest alone: the rest takes") as e:
        solve_profiled(profiled, Budget(latency_ms=rest / 2), latency_table=table, tokens=1)
    assert e.value.smallest["latency_ms"] == pytest.approx(lo)
    with pytest.raises(InfeasibleError, match=r"latency_ms >= ") as e:
        solve_profiled(profiled, Budget(latency_ms=(rest + lo) / 2), latency_table=table, tokens=1)
    assert e.value.smallest["latency_ms"] == pytest.approx(lo)


def test_a_latency_budget_at_two_token_counts_covers_the_whole_model_at_both(setup):
    model, graph, table, profiled = setup
    t = max(TOKENS)

    def whole(plan, tokens):
        return table.rest_ms(profiled.rest_key, tokens) + sum(layer_ms(table, graph[l.name], l.choice, tokens)
                                                              for l in plan.layers)

    # uniform w4's whole-model latency at each count: a budget some plan meets whatever the timings
    mid = {n: table.rest_ms(profiled.rest_key, n) + sum(layer_ms(table, l, "w4", n) for l in graph.layers)
           for n in (1, t)}
    plan = solve_profiled(profiled, Budget(latency_ms=mid), latency_table=table)
    at = plan.predicted["latency_ms_at"]
    assert at == {str(n): pytest.approx(whole(plan, n)) for n in TOKENS}
    assert at["1"] <= mid[1] * (1 + 1e-7) and at[str(t)] <= mid[t] * (1 + 1e-7)
    assert plan.solver["latency_scope"] == "whole model"

    with pytest.raises(InfeasibleError, match=f"latency budget .* at {t} tokens is below the model's unquantized rest"):
        solve_profiled(profiled, Budget(latency_ms={1: mid[1], t: table.rest_ms(profiled.rest_key, t) / 2}),
                       latency_table=table)
    partial = LatencyTable.from_dict(table.to_dict())
    del partial.rest[profiled.rest_key].ms[t]
    with pytest.raises(ValueError, match=rf"holds this model's unquantized rest at tokens \[1\], not at \[{t}\]"):
        solve_profiled(profiled, Budget(latency_ms=mid), latency_table=partial)


def test_without_the_rest_the_budget_covers_the_layers_and_says_so(setup):
    _, graph, table, profiled = setup
    layers_only = LatencyTable.from_dict({**table.to_dict(), "rest": {}})
    budget = sum(max(layer_ms(table, l, c) for c in CHOICES) for l in graph.layers)
    plan = solve_profiled(profiled, Budget(latency_ms=budget), latency_table=layers_only, tokens=1)
    assert plan.predicted["latency_ms"] == plan.predicted["latency_layers_ms"] <= budget * (1 + 1e-7)
    assert "latency_rest_ms" not in plan.predicted
    assert plan.solver["latency_scope"].startswith("quantized layers only")
    assert "quantized layers only" in plan.summary()


def test_check_latency_reports_predicted_vs_measured_and_bytes(setup):
    model, graph, table, profiled = setup
    rest1 = table.rest_ms(profiled.rest_key, 1)
    mid = rest1 + sum(sorted(layer_ms(table, l, c) for c in CHOICES)[1] for l in graph.layers)
    plans = {"w4": uniform_plan(profiled, "w4"), "w8": uniform_plan(profiled, "w8"),
             "mixed": solve_profiled(profiled, Budget(latency_ms=mid), latency_table=table, tokens=1)}
    checks = check_latency(model, plans, table, tokens=TOKENS, device="cpu", reps=2)
    assert [(c.plan, c.tokens) for c in checks] == [(n, t) for n in plans for t in TOKENS]
    for c in checks:
        plan = plans[c.plan]
        layers = sum(layer_ms(table, graph[l.name], l.choice, c.tokens) for l in plan.layers)
        assert c.rest_ms == table.rest_ms(profiled.rest_key, c.tokens)
        assert c.layers_ms == pytest.approx(layers) and c.predicted_ms == pytest.approx(c.rest_ms + layers)
        assert c.measured_ms > 0 and c.mode == "cpu"
        assert c.rel_error == pytest.approx((c.predicted_ms - c.measured_ms) / c.measured_ms)
        assert c.memory == "parameters + buffers"
        assert c.resident_bytes == c.peak_bytes == c.predicted_bytes == plan.predicted["total_bytes"]
    assert checks[0].predicted_bytes < checks[2].predicted_bytes  # 4-bit is smaller than 8-bit
    printed = format_checks(checks)
    assert "mixed" in printed and "error %" in printed
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in graph.names)  # the float model is untouched
    with pytest.raises(ValueError, match="no rest-of-model figure"):
        check_latency(model, [plans["w4"]], LatencyTable.from_dict({**table.to_dict(), "rest": {}}), device="cpu")


def test_the_replay_overhead_comes_off_the_latency_column_and_the_prediction(setup):
    model, graph, table, profiled = setup
    key = profiled.rest_key
    overhead = 0.5 * min(e.model_ms for e in table.entries.values())  # below every entry: the floor never applies
    # as if 1 token had been graph-timed on CUDA and 4 tokens eagerly
    corrected = LatencyTable.from_dict({**table.to_dict(), "replay_overhead_ms": overhead, "graph_max_tokens": 1})
    raw1 = build_problem(profiled, latency_table=table, tokens=1).latency
    assert np.allclose(build_problem(profiled, latency_table=corrected, tokens=1).latency, raw1 - overhead)
    assert np.array_equal(build_problem(profiled, latency_table=corrected, tokens=4).latency,
                          build_problem(profiled, latency_table=table, tokens=4).latency)
    plan = uniform_plan(profiled, "w4")
    rest, layers = predict_latency(plan, table, 1, key)
    assert layers == pytest.approx(sum(table.lookup((l.out_features, l.in_features), "w4", 1, l.kind)
                                       for l in graph.layers))
    assert predict_latency(plan, corrected, 1, key) == pytest.approx((rest, layers - len(graph) * overhead))
    assert predict_latency(plan, corrected, 4, key) == predict_latency(plan, table, 4, key)
    solved = solve_profiled(profiled, Budget(latency_ms=1e6), latency_table=corrected, tokens=1)
    assert solved.predicted["latency_ms"] == pytest.approx(sum(predict_latency(solved, corrected, 1, key)))
    c1, c4 = check_latency(model, {"w4": plan}, corrected, tokens=TOKENS, device="cpu", reps=1)
    assert c1.raw_ms == pytest.approx(rest + layers)
    assert c1.predicted_ms == pytest.approx(rest + layers - len(graph) * overhead)
    assert c4.raw_ms == c4.predicted_ms == pytest.approx(sum(predict_latency(plan, table, 4, key)))


def test_cli_latency_with_the_model_measures_the_rest(tmp_path, capsys):
    save_model_and_calib(tmp_path)
    prof, lat = tmp_path / "profile.json", tmp_path / "latency.json"
    assert main(["profile", "--model", str(tmp_path / "model"), "--calib", str(tmp_path / "calib.pt"),
                 "--bits", "2,4,8", "--profiler", "gptq", "--out", str(prof)]) == 0
    assert main(["latency", "--profile", str(prof), "--device", "cpu", "--tokens", "1", "--model",
                 str(tmp_path / "model"), "--out", str(lat)]) == 0
    assert "unquantized rest" in capsys.readouterr().out
    table = LatencyTable.load(lat)
    (rest,) = table.rest.values()
    assert rest.model == "GPT2LMHeadModel" and set(rest.ms) == {1}
    assert main(["solve", "--profile", str(prof), "--latency-ms", "1e6", "--latency-table", str(lat),
                 "--out", str(tmp_path / "plan.json")]) == 0
    assert "whole model" in capsys.readouterr().out
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.predicted["latency_rest_ms"] == rest.ms[1]
    tiny_llama().save_pretrained(tmp_path / "other")
    assert main(["latency", "--profile", str(prof), "--device", "cpu", "--tokens", "1", "--model",
                 str(tmp_path / "other"), "--out", str(tmp_path / "x.json")]) == 1
    assert "not the model the profile was made for" in capsys.readouterr().err
