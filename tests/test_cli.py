"""The command line as a user runs it: a model directory and a calibration file in, a plan and a model out."""

import json

import pytest
import torch
from tiny import save_model_and_calib

from allocator import Budget, Plan, load_quantized
from allocator.cli import main
from kernels.latency import LatencyTable

FAST = ["--bits", "2,4,8", "--profiler-setting", "max_probes=16", "--profiler-setting", "min_probes=8"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return save_model_and_calib(root)


def test_run_writes_a_plan_and_a_loadable_quantized_model(files, capsys):
    out = files / "out"
    assert main(["run", "--model", str(files / "model"), "--calib", str(files / "calib.pt"), *FAST,
                 "--avg-bits", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(match)" in printed
    assert "calibration data" in printed and "quantized" in printed and "perplexity" in printed
    plan = Plan.load(out / "plan.json")
    assert plan.predicted["avg_bits"] <= 4
    qmodel = load_quantized(out)
    assert torch.isfinite(qmodel(torch.randint(0, 96, (1, 8))).logits).all()


def test_run_with_a_latency_budget_measures_the_table_on_this_machine(files, capsys):
    out = files / "out_latency"
    assert main(["run", "--model", str(files / "model"), "--calib", str(files / "calib.pt"), *FAST,
                 "--latency-ms", "1:1e6,4:1e6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no --latency-table: measured one on cpu" in printed and "at tokens [1, 4]" in printed
    plan = Plan.load(out / "plan.json")
    assert plan.solver["latency_scope"] == "whole model"  # the run's table holds the model's rest too
    assert set(plan.predicted["latency_ms_at"]) == {"1", "4"}
    cached = LatencyTable.load(next((out / "latency").glob("latency_*.json")))
    assert plan.predicted["latency_ms_at"]["4"] > cached.rest[next(iter(cached.rest))].ms[4]


def test_profile_once_then_solve_and_pareto_without_the_model(files, capsys):
    prof = files / "profile.json"
    assert main(["profile", "--model", str(files / "model"), "--calib", str(files / "calib.pt"), *FAST,
                 "--out", str(prof)]) == 0
    for budget in ("3", "6"):
        assert main(["solve", "--profile", str(prof), "--avg-bits", budget, "--out", str(files / f"plan{budget}.json")]) == 0
    low, high = Plan.load(files / "plan3.json"), Plan.load(files / "plan6.json")
    assert low.predicted["avg_bits"] <= 3 < high.predicted["avg_bits"] <= 6
    assert low.predicted["cost"] >= high.predicted["cost"]
    assert main(["pareto", "--profile", str(prof), "--out", str(files / "frontier.json"), "--plot", str(files / "f.png")]) == 0
    frontier = json.loads((files / "frontier.json").read_text())["points"]
    sizes = [p["value"] for p in frontier]
    assert sizes == sorted(sizes) and len(frontier) >= 3
    assert (files / "f.png").stat().st_size > 1000


def test_latency_table_then_a_latency_budget(files, capsys):
    prof = files / "profile.json"
    if not prof.exists():
        main(["profile", "--model", str(files / "model"), "--calib", str(files / "calib.pt"), *FAST, "--out", str(prof)])
    table = files / "latency.json"
    assert main(["latency", "--profile", str(prof), "--device", "cpu", "--tokens", "1,8", "--out", str(table)]) == 0
    assert main(["solve", "--profile", str(prof), "--latency-ms", "1e6", "--latency-table", str(table),
                 "--out", str(files / "lat.json")]) == 0
    plan, measured = Plan.load(files / "lat.json"), LatencyTable.load(table)
    shapes = {layer.name: layer.weight_shape[::-1] for layer in plan.layers}  # HF Conv1D stores [in, out]

    def expected(tokens):
        return sum(measured.layer_ms(shapes[layer.name], layer.choice, tokens, layer.kind) for layer in plan.layers)

    assert plan.predicted["latency_ms"] == pytest.approx(expected(1))
    assert plan.predicted["latency_ms_at"] == {"1": pytest.approx(expected(1)), "8": pytest.approx(expected(8))}
    # the exact cost-vs-latency frontier at 8 tokens on this table
    assert main(["pareto", "--profile", str(prof), "--objective", "latency", "--latency-table", str(table),
                 "--tokens", "8", "--out", str(files / "lat_front.json"), "--plot", str(files / "lat.png")]) == 0
    front = json.loads((files / "lat_front.json").read_text())
    assert front["objective"] == "latency_layers_ms" and front["tokens"] == 8  # the table holds no rest here
    values = [p["value"] for p in front["points"]]
    assert values == sorted(values)  # on the CPU the most accurate choice can be the fastest: one point or more
    fastest = sum(min(measured.layer_ms(shapes[layer.name], c, 8, layer.kind) for c in ("w2", "w4", "w8"))
                  for layer in plan.layers)
    assert values[0] == pytest.approx(fastest)
    assert main(["pareto", "--profile", str(prof), "--objective", "latency", "--out", str(files / "x.json")]) == 1
    assert "a latency frontier needs a latency table" in capsys.readouterr().err
    # decode and prefill bounded at once
    assert main(["solve", "--profile", str(prof), "--latency-ms", "1:1e6,8:1e6", "--latency-table", str(table),
                 "--out", str(files / "lat2.json")]) == 0
    assert Plan.load(files / "lat2.json").budget == Budget(latency_ms={1: 1e6, 8: 1e6})
    assert main(["solve", "--profile", str(prof), "--latency-ms", "1:1e6,16:1e6", "--latency-table", str(table),
                 "--out", str(files / "x.json")]) == 1
    assert "was measured at tokens [1, 8], not at [16]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["solve", "--profile", str(prof), "--latency-ms", "1:2:3", "--out", str(files / "x.json")])
    assert "TOKENS:MS pairs" in capsys.readouterr().err
    assert main(["solve", "--profile", str(prof), "--latency-ms", "1", "--out", str(files / "x.json")]) == 1
    assert "needs a latency table" in capsys.readouterr().err


def test_infeasible_budget_is_a_clear_error(files, capsys):
    prof = files / "profile.json"
    if not prof.exists():
        main(["profile", "--model", str(files / "model"), "--calib", str(files / "calib.pt"), *FAST, "--out", str(prof)])
    assert main(["solve", "--profile", str(prof), "--memory-mb", "0.01", "--out", str(files / "x.json")]) == 1
    assert "smallest achievable is" in capsys.readouterr().err


def test_missing_budget_and_missing_files(files, capsys):
    assert main(["solve", "--profile", str(files / "profile.json"), "--out", "x.json"]) == 2
    assert "give a budget" in capsys.readouterr().err
    assert main(["solve", "--profile", str(files / "nope.json"), "--avg-bits", "4", "--out", "x.json"]) == 1
    assert "does not exist" in capsys.readouterr().err
