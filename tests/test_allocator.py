"""The user's surface: allocate under a budget, save the plan, apply it, save and reload the quantized model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from allocator import (Budget, Plan, PlanError, allocate, load_quantized, profile_model, quantized_bytes,
                       save_quantized, solve_profiled)
from allocator.report import stored_layer_bytes
from kernels import Choice
from solvers import InfeasibleError
from tiny import FAST, lm_batches as batches, tiny_gpt2, tiny_llama

@pytest.fixture(scope="module")
def model():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def plan(model):
    return allocate(model, batches(), Budget(avg_bits=4.0), bits=(2, 3, 4, 8), profiler_settings=FAST)


def test_allocate_meets_the_budget_and_mixes_bits(plan, model):
    assert plan.predicted["avg_bits"] <= 4.0 + 1e-9
    assert len(plan.layers) == 8  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj); lm_head is tied
    assert plan.skipped == {"lm_head": "weight tied to transformer.wte"}
    assert {layer.bits for layer in plan.layers} <= {2, 3, 4, 8}
    assert plan.profiler["name"] == "hessian" and plan.solver["method"] == "ilp"
    assert plan.solver["status"] == "optimal"


def test_plan_json_round_trip(plan, model, tmp_path):
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json", model=model)
    assert again.to_dict() == plan.to_dict()


def test_quantized_model_bytes_equal_the_prediction_in_memory_and_on_disk(plan, model, tmp_path):
    qmodel = plan.apply(model)
    in_memory = quantized_bytes(qmodel)
    assert in_memory == {layer.name: layer.bytes for layer in plan.layers}
    save_quantized(qmodel, tmp_path / "q")
    on_disk = stored_layer_bytes(tmp_path / "q" / "model.safetensors", plan)
    assert on_disk == in_memory
    # no float copy of a quantized weight is stored
    assert not any(k.endswith("c_attn.weight") for k in load_file(tmp_path / "q" / "model.safetensors"))


def test_save_and_load_give_identical_outputs(plan, model, tmp_path):
    qmodel = plan.apply(model)
    save_quantized(qmodel, tmp_path / "q")
    reloaded = load_quantized(tmp_path / "q")
    ids = batches(1, seed=5)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(qmodel(ids).logits, reloaded(ids).logits)
        assert not torch.equal(model(ids).logits, qmodel(ids).logits)


def test_a_model_saved_with_its_latency_table_loads_with_the_measured_kernel_paths(plan, model, tmp_path,
                                                                                  monkeypatch):
    """save_quantized(..., latency_table=table) keeps the table's fastest kernel path and tile for each of the
    model's layers (kernels.json); load_quantized installs them, so on a GPU the loaded model runs what the table
    timed. A table's library paths (tinygemm) are never installed: a "w4" layer holds our weight layout (a plan
    reaches tinygemm through the choice "w4@tinygemm": tests/test_library_kernels.py)."""
    from kernels import LatencyTable, gpu_backends, triton_linear
    from kernels.latency import LatencyEntry, entry_key
    from kernels.memory import matrix_shape
    monkeypatch.setattr(gpu_backends, "DISPATCH", {})
    tile = "triton_fused[m1n256s8w2p1]"
    layers = {(layer.kind, matrix_shape(layer.weight_shape[::-1]), layer.choice) for layer in plan.layers}
    entries = {entry_key(shape, choice, 1, kind): LatencyEntry(0.005, "tinygemm_int4", {
        "tinygemm_int4": 0.005, tile: 0.01, "triton_fused": 0.02, "triton": 0.01}, selected="triton")
        for kind, shape, choice in layers}
    entries[entry_key((7, 96), "w4", 1)] = LatencyEntry(0.01, tile, {tile: 0.01})  # another model's layer
    save_quantized(plan.apply(model), tmp_path / "q", latency_table=LatencyTable("NVIDIA H200", {}, entries))
    saved = json.loads((tmp_path / "q" / "kernels.json").read_text())
    assert saved["device"] == "NVIDIA H200"
    assert {(r["kind"], tuple(r["shape"]), r["choice"]) for r in saved["paths"]} == layers
    assert {r["path"] for r in saved["paths"]} == {tile}

    load_quantized(tmp_path / "q")
    assert len(gpu_backends.DISPATCH) == len(layers)
    assert set(gpu_backends.DISPATCH.values()) == {("triton_fused", triton_linear.Config.parse(tile[13:-1]))}

    (tmp_path / "q" / "kernels.json").write_text(json.dumps({"paths": [{"kind": "linear", "shape": [8, 0]}]}))
    with pytest.raises(ValueError, match="kernels.json is malformed"):
        load_quantized(tmp_path / "q")
    save_quantized(plan.apply(model), tmp_path / "q")  # no table: the old paths go with it
    assert not (tmp_path / "q" / "kernels.json").exists()


def test_a_bfloat16_model_reloads_in_bfloat16_bit_for_bit(tmp_path):
    """The float rest (embeddings, norms, rotary frequencies) comes back in the dtype it was saved in, not the
    float32 a rebuilt Hugging Face model starts in: the same outputs, and no float32 copy of the rest in memory."""
    import numpy as np
    from allocator import uniform_plan
    from allocator.api import ProfiledModel
    from profilers import Profile, build_layer_graph
    model = tiny_llama().to(torch.bfloat16)
    ids = batches(1, seed=3)[0]["input_ids"]
    graph = build_layer_graph(model, {"input_ids": ids})
    profile = Profile(layers=graph.names, choices=["w4"], cost=np.ones((len(graph), 1)), profiler="constant",
                      settings={})
    qmodel = uniform_plan(ProfiledModel.build(model, graph, profile), "w4").apply(model)
    save_quantized(qmodel, tmp_path / "q")
    reloaded = load_quantized(tmp_path / "q")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(qmodel(ids).logits, reloaded(ids).logits)

    manifest = json.loads((tmp_path / "q" / "bitalloc.json").read_text())
    manifest["dtypes"]["model.norm.weight"] = "int8"
    (tmp_path / "q" / "bitalloc.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="'model.norm.weight' the dtype 'int8'"):
        load_quantized(tmp_path / "q")


@pytest.mark.parametrize("narrow,refused", [
    ("w4gca8", {"w4g64a8": "int8 matmuls take per-channel weight scales only"}),
    ("w4gcf8", {"w6gcf8": "6-bit codes are not exact in float8 e4m3",
                "w4g64f8": "fp8 matmuls take per-channel weight scales only; use w4gcf8"})])
def test_a_plan_with_8_bit_activations_runs_them(model, tmp_path, narrow, refused):
    """choices=[narrow, "w8gca8"]: the layers round their input per token, to int8 levels (w<b>gca8) or to float8
    e4m3 values (w<b>gcf8), and multiply it by their codes, in memory and after a reload. Backends: "int8_act" for
    8-bit int8 layers, "int8_act_packed" / "fp8_act_packed" for the packed narrower ones (here torch ops on the
    CPU; on CUDA the paths a latency table measured fastest). Grouped weights and codes too wide for e4m3 are
    refused up front."""
    from kernels.gpu_activation_quant import round_activations
    plan = allocate(model, batches(), Budget(avg_bits=6.0), choices=[narrow, "w8gca8"], profiler_settings=FAST)
    assert {layer.choice for layer in plan.layers} == {narrow, "w8gca8"}
    qmodel = plan.apply(model)
    ids = batches(1, seed=5)[0]["input_ids"]
    with torch.no_grad():
        logits = qmodel(ids).logits
    backends = {"w4gca8": "int8_act_packed", "w4gcf8": "fp8_act_packed", "w8gca8": "int8_act"}
    for layer in plan.layers:
        module = qmodel.get_submodule(layer.name)
        assert module.backend == backends[layer.choice]
        x = torch.randn(5, module.in_features, generator=torch.Generator().manual_seed(0))
        w64 = module.quantized_tensor().dequantize(torch.float64).t()
        y = module(x).double()
        rounded = round_activations(x, 8, Choice.parse(layer.choice).act_format).double() @ w64 + module.bias.double()
        assert float((y - rounded).norm() / rounded.norm()) < 1e-5  # exact products, float32 scaling and sums
        unrounded = x.double() @ w64 + module.bias.double()
        assert 1e-3 < float((y - unrounded).norm() / unrounded.norm()) < 8e-2  # x did move to its levels
    save_quantized(qmodel, tmp_path / "q")
    reloaded = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    assert all(reloaded.get_submodule(layer.name).backend == backends[layer.choice] for layer in plan.layers)
    for label, why in refused.items():
        with pytest.raises(ValueError, match=f"choices: {label}: {why}"):
            allocate(model, batches(), Budget(avg_bits=4), choices=["w4", label], profiler_settings=FAST)


def test_apply_leaves_the_float_model_alone(plan, model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan.apply(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_memory_budget_below_the_smallest_plan_says_the_smallest(model):
    with pytest.raises(InfeasibleError, match=r"smallest achievable: memory_mb >= ") as err:
        allocate(model, batches(), Budget(memory_mb=0.05), bits=(4, 8), profiler_settings=FAST)
    smallest = err.value.smallest["memory_mb"]
    plan = allocate(model, batches(), Budget(memory_mb=smallest * (1 + 1e-9)), bits=(4, 8), profiler_settings=FAST)
    assert all(layer.bits == 4 for layer in plan.layers)


def test_bits_outside_the_supported_set(model):
    with pytest.raises(ValueError, match=r"bits=\[7\] not supported; choose from \(2, 3, 4, 5, 6, 8\)"):
        allocate(model, batches(), Budget(avg_bits=4), bits=(4, 7))


def test_budget_needs_a_limit_and_positive_values():
    with pytest.raises(ValueError, match="at least one"):
        Budget()
    with pytest.raises(ValueError, match="Budget.avg_bits must be a positive finite number"):
        Budget(avg_bits=float("nan"))
    budget = Budget(latency_ms={"512": 40, 1: 2.0})  # JSON gives token counts as strings
    assert budget.latency_ms == {1: 2.0, 512: 40.0} and budget.latency_at(16) == {1: 2.0, 512: 40.0}
    assert Budget.from_dict(budget.to_dict()) == budget and Budget(latency_ms=2.0).latency_at(16) == {16: 2.0}
    for bad, why in (({}, "empty mapping"), ({0: 1.0}, "keys must be positive token counts"),
                     ({"x": 1.0}, "keys must be positive token counts"), ({1: -1.0}, r"latency_ms\[1\] must be")):
        with pytest.raises(ValueError, match=why):
            Budget(latency_ms=bad)


def test_model_without_quantizable_layers():
    model = torch.nn.Sequential(torch.nn.ReLU())
    with pytest.raises(ValueError, match="no quantizable layer"):
        allocate(model, [torch.randn(2, 3)], Budget(avg_bits=4))


def test_nan_in_calibration_is_named(model):
    bad = batches()
    bad[1] = {"input_ids": bad[1]["input_ids"], "attention_mask": torch.full((2, 16), float("nan"))}
    with pytest.raises(ValueError, match=r"calibration batch 1, 'attention_mask': contains NaN"):
        allocate(model, bad, Budget(avg_bits=4))


def test_plan_for_another_model_is_rejected(plan):
    with pytest.raises(PlanError, match="plan was made for model .* hashes to"):
        plan.apply(tiny_gpt2(seed=1))


def test_plan_validation_errors(plan, model, tmp_path):
    good = plan.to_dict()
    cases = {
        "not valid JSON: Expecting": "{ not json",
        "schema_version is 99": json.dumps({**good, "schema_version": 99}),
        "has bits=7; supported bits are": json.dumps({**good, "layers": [{**good["layers"][0], "bits": 7}] + good["layers"][1:]}),
        "'transformer.h.9.mlp.c_fc' does not exist in the model": json.dumps(
            {**good, "layers": [{**good["layers"][0], "name": "transformer.h.9.mlp.c_fc"}]}),
        "missing the keys \\['layers'\\]": json.dumps({k: v for k, v in good.items() if k != "layers"}),
    }
    for message, text in cases.items():
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises((PlanError, ValueError), match=message):
            Plan.load(tmp_path / "bad.json", model=model)


def test_latency_budget_from_a_table_measured_on_this_device(model):
    from kernels.latency import measure
    from profilers import build_layer_graph

    graph = build_layer_graph(model, batches(1)[0])
    table = measure(graph, ["w2", "w4", "w8"], tokens=(1,), device="cpu", reps=3)
    profiled = profile_model(model, batches(), [Choice(b) for b in (2, 4, 8)], **FAST)
    fastest = sum(min(table.layer_ms((l.out_features, l.in_features), c, 1, l.kind) for c in ("w2", "w4", "w8"))
                  for l in graph.layers)
    plan = solve_profiled(profiled, Budget(latency_ms=fastest * 1.5), latency_table=table, tokens=1)
    assert plan.predicted["latency_ms"] <= fastest * 1.5
    with pytest.raises(ValueError, match="a latency budget needs a latency table"):
        solve_profiled(profiled, Budget(latency_ms=1.0))
