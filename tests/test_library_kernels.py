"""A library kernel as a choice: "w4@tinygemm" holds a layer in the format torch's tinygemm reads (a zero beside
each bfloat16 scale, counted in its bytes), so a solver weighs its latency against those bytes and the emitted
layer runs it on CUDA (dequantize + matmul elsewhere)."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from allocator import (Budget, Plan, load_quantized, profile_model, quantized_bytes, save_quantized, solve_profiled,
                       uniform_plan)
from allocator.api import build_problem
from kernels import Choice, QuantSpec, weight_nbytes
from kernels.latency import measure, parse_entry_key
from kernels.modules import QuantizedLinear, quantize_module, quantized_module_from_state
from solvers import InfeasibleError
from tiny import FAST, lm_batches as batches, tiny_llama


def test_the_choice_names_its_kernel_and_counts_the_zeros_it_reads():
    choice = Choice.parse("w4@tinygemm")
    assert choice == Choice(4, kernel="tinygemm") and choice.label == "w4@tinygemm"
    assert Choice.parse("w4g64@tinygemm").spec_for("linear", 4096) == QuantSpec(4, 64, True, "bfloat16")
    spec = choice.spec_for("linear", 4096)
    assert spec == QuantSpec(4, 128, True, "bfloat16")  # tinygemm reads bfloat16 scales, whatever the model's
    assert weight_nbytes((4096, 4096), spec, "tinygemm") == 4096 * 4096 // 2 + 4096 * 32 * (2 + 2)
    assert weight_nbytes((4096, 4096), spec) == 4096 * 4096 // 2 + 4096 * 32 * 2
    for label in ("w3@tinygemm", "w4asym@tinygemm", "w4a8@tinygemm", "w4gc@tinygemm"):
        with pytest.raises(ValueError, match="kernel='tinygemm' runs 4-bit symmetric weights"):
            Choice.parse(label)
    with pytest.raises(ValueError, match=r"kernel='gemm' is not supported; choose None or one of \('tinygemm',\)"):
        Choice.parse("w4@gemm")
    assert choice.kernel_reason("linear", (4096, 4096)) is None
    assert "linear layers only" in choice.kernel_reason("conv2d", (64, 64))
    assert "K % 64 == 0 and N % 8 == 0" in choice.kernel_reason("linear", (100, 4096))
    assert "a group in (32, 64, 128, 256) dividing K" in choice.kernel_reason("linear", (64, 100))


def test_a_layer_held_for_tinygemm_holds_its_bytes_and_runs_dequantize_on_the_cpu(tmp_path):
    linear = torch.nn.Linear(256, 64)
    layer = quantize_module(linear, Choice.parse("w4@tinygemm").spec_for("linear", 256), backend="tinygemm")
    spec = layer.spec
    assert layer.weight_nbytes() == weight_nbytes((64, 256), spec, "tinygemm")
    x = torch.randn(5, 256)
    with torch.no_grad():
        y = layer(x)
    assert layer.backend == "dequant"  # tinygemm runs bfloat16 on CUDA; elsewhere its fallback
    expected = x.double() @ layer.dequantized_weight(torch.float64).t() + linear.bias.double()
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5)
    assert layer.weight_nbytes() == weight_nbytes((64, 256), spec, "tinygemm")  # the forward kept the zeros
    # a saved layer holds the plain scales; a loaded one holds the zeros again
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert state["scales"].shape == (64, 2) and state["scales"].is_contiguous()
    again = quantized_module_from_state(layer.config(), state)
    assert isinstance(again, QuantizedLinear) and again.forced_backend == "tinygemm"
    assert again.weight_nbytes() == layer.weight_nbytes()
    with torch.no_grad():
        assert torch.equal(again(x), y)
    assert again.to(torch.bfloat16).weight_nbytes() == layer.weight_nbytes()  # a cast moves, never recasts scales


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def profiled(llama):
    return profile_model(llama, batches(), [Choice.parse(c) for c in ("w2", "w4", "w4@tinygemm", "w8")], **FAST)


def test_a_plan_of_tinygemm_layers_emits_a_model_of_the_predicted_bytes_that_saves_and_loads(llama, profiled,
                                                                                             tmp_path):
    plan = uniform_plan(profiled, "w4@tinygemm")
    qmodel = plan.apply(llama)
    assert quantized_bytes(qmodel) == {layer.name: layer.bytes for layer in plan.layers}
    assert all(qmodel.get_submodule(layer.name).forced_backend == "tinygemm" for layer in plan.layers)
    ids = batches(1, seed=5)[0]["input_ids"]
    save_quantized(qmodel, tmp_path / "q")
    reloaded = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(qmodel(ids).logits, reloaded(ids).logits)
    assert quantized_bytes(reloaded) == quantized_bytes(qmodel)
    stored = load_file(tmp_path / "q" / "model.safetensors")
    name = plan.layers[0].name
    assert stored[f"{name}.scales"].dtype == torch.bfloat16  # the plain scales; the zeros are rebuilt on load


def test_the_solver_takes_tinygemm_only_where_its_latency_pays_for_its_bytes(llama, profiled):
    from profilers import build_layer_graph

    problem = build_problem(profiled)
    j4, jt = problem.choices.index("w4"), problem.choices.index("w4@tinygemm")
    assert (problem.memory[:, jt] > problem.memory[:, j4]).all()  # the same codes, a zero beside each scale
    graph = build_layer_graph(llama, batches(1)[0])
    table = measure(graph, ["w2", "w4", "w4@tinygemm", "w8"], tokens=(1,), device="cpu", reps=3)
    held = {e.selected for key, e in table.entries.items() if "|w4@tinygemm|" in key}
    assert held == {"dequant"}  # what a layer held for tinygemm runs on the CPU, and all the entry times
    for key, entry in table.entries.items():  # as if tinygemm were ten times faster than every other choice here
        if "|w4@tinygemm|" in key:
            entry.all_ms = {name: ms / 100 for name, ms in entry.all_ms.items()}
            entry.ms /= 100
    fastest = build_problem(profiled, latency_table=table, tokens=1).latency[:, jt].sum()
    plan = solve_profiled(profiled, Budget(latency_ms=fastest * 1.01), latency_table=table, tokens=1)
    assert {layer.choice for layer in plan.layers} == {"w4@tinygemm"}


def test_a_decode_budget_with_a_prefill_bound_keeps_tinygemm_where_prefill_allows(llama, profiled):
    from profilers import build_layer_graph

    graph = build_layer_graph(llama, batches(1)[0])
    table = measure(graph, ["w2", "w4", "w4@tinygemm", "w8"], tokens=(1, 32), device="cpu", reps=3)
    for key, entry in table.entries.items():
        # figures that do not move with the machine's load: bytes plus work, fewer bits faster; tinygemm as on a
        # GPU, far faster than w4 at 1 token and far slower at 32
        _, (n, k), label, tokens = parse_entry_key(key)
        ms = n * k * (Choice.parse(label).wbits / 8 + tokens / 16) * 1e-6
        if label == "w4@tinygemm":
            ms *= 0.01 if tokens == 1 else 1000.0
        entry.all_ms, entry.ms = {name: ms for name in entry.all_ms}, ms
    at = build_problem(profiled, latency_table=table, tokens=(1, 32)).latency_at
    j4, jt = profiled.profile.choices.index("w4"), profiled.profile.choices.index("w4@tinygemm")
    w4 = {t: at[t][:, j4].sum() for t in (1, 32)}
    others = [j for j in range(len(profiled.profile.choices)) if j != jt]
    fastest_without = at[1][:, others].min(axis=1).sum()
    decode = (fastest_without + at[1][:, jt].sum()) / 2  # reachable at 1 token only with tinygemm on some layers

    with pytest.warns(UserWarning, match=r"at 32 tokens, [0-9.]+x the fastest plan there .*bounds only \[1\] "
                      r"tokens.*Budget\(latency_ms=\{1: \.\.\., 32: \.\.\.\}\).*--latency-ms 1:MS,32:MS"):
        plan = solve_profiled(profiled, Budget(latency_ms=decode), latency_table=table, tokens=1)
    assert any(layer.choice == "w4@tinygemm" for layer in plan.layers)
    assert plan.predicted["latency_ms_at"]["1"] <= decode * (1 + 1e-7)
    assert plan.predicted["latency_ms_at"]["32"] > 5 * w4[32]  # what the decode budget alone costs at prefill

    with pytest.raises(InfeasibleError, match="no plan meets latency@1 and latency@32 together") as e:
        solve_profiled(profiled, Budget(latency_ms={1: decode, 32: 1.5 * w4[32]}), latency_table=table)
    assert set(e.value.smallest) == {"latency_ms@1", "latency_ms@32"}

    budget = Budget(latency_ms={1: w4[1], 32: 1.5 * w4[32]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bounded at both counts: nothing to warn of
        plan = solve_profiled(profiled, budget, latency_table=table)
    assert plan.predicted["latency_ms_at"]["1"] <= w4[1] * (1 + 1e-7)
    assert plan.predicted["latency_ms_at"]["32"] <= 1.5 * w4[32] * (1 + 1e-7)
    assert plan.predicted["latency_ms"] == plan.predicted["latency_ms_at"]["1"]
    assert plan.solver["latency_tokens"] == 1
    assert "latency_ms <= " in plan.summary() and "at 32 tokens" in plan.summary()
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))).budget == budget


def test_layers_the_kernel_cannot_hold_are_left_to_the_other_choices():
    from allocator.api import ProfiledModel
    from profilers import Calibration, build_layer_graph, profile

    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64))
    calib = Calibration([torch.randn(4, 64) for _ in range(2)])
    graph = build_layer_graph(model, calib[0])
    choices = [Choice.parse("w4"), Choice.parse("w4@tinygemm")]
    profiled = ProfiledModel.build(model, graph, profile(model, calib, graph, choices, **FAST))
    problem = build_problem(profiled)
    assert problem.allowed.tolist() == [[True, True], [True, False]]  # K = 96: no tinygemm group divides it
    with pytest.raises(ValueError, match="2.*tinygemm needs a group in"):
        uniform_plan(profiled, "w4@tinygemm")


def test_a_job_s_memory_check_counts_only_the_layers_a_kernel_can_hold():
    from allocator.jobs import JobSpec, check_memory_budget
    from profilers import build_layer_graph

    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64))
    graph = build_layer_graph(model, torch.randn(4, 64))
    tg = Choice.parse("w4@tinygemm")
    w8 = Choice.parse("w8")
    smallest = (weight_nbytes((96, 64), tg.spec_for("linear", 64), "tinygemm")  # the second layer cannot be tinygemm's
                + weight_nbytes((64, 96), w8.spec_for("linear", 96)))
    spec = JobSpec(model="m", calib="c", budget=Budget(memory_mb=(smallest - 1) / 2**20), out="o",
                   choices=["w4@tinygemm", "w8"])
    with pytest.raises(ValueError, match=f"smallest achievable .* is {smallest / 2**20:.4f} MiB"):
        check_memory_budget(spec, graph, 0)
    check_memory_budget(JobSpec(model="m", calib="c", budget=Budget(memory_mb=smallest / 2**20), out="o",
                                choices=["w4@tinygemm", "w8"]), graph, 0)
