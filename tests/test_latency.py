"""kernels.latency on the CPU: tiny shapes, the registered CPU backends, JSON round trip and cache."""
from __future__ import annotations

import pytest
import torch

from kernels import Choice, LatencyTable, QuantizedLinear, QuantSpec, a8_linear, measure
from kernels.latency import (GRAPH_MAX_TOKENS, L2_FLUSH_BYTES, MIN_LAYER_FRACTION, LatencyEntry, cache_path,
                             entry_key, l2_flush_buffer, replay_overhead_ms, use_paths)


def test_measure_cpu_tiny(tmp_path) -> None:
    shapes = [(32, 64), (48, 128), (32, 64)]
    table = measure(shapes, ["w4", "w8gc", Choice(3)], tokens=(1, 4), device="cpu", reps=2, cache_dir=tmp_path)
    assert len(table.entries) == 2 * 3 * 2
    for key, e in table.entries.items():
        assert e.ms > 0 and e.backend in e.all_ms and e.ms == min(e.all_ms.values())
        assert e.selected == "dequant"  # what a float32 QuantizedLinear dispatches to on the CPU
    # lookup gives the path an emitted model runs, which need not be the fastest one measured
    entry = table.entries[entry_key((48, 128), "w4", 4)]
    assert table.lookup((48, 128), "w4", 4) == entry.model_ms == entry.all_ms["dequant"]
    assert table.dispatch[(32, 64, "w8gc", 1)] in ("cpu_int8", "dequant")
    assert table.latency_matrix([(32, 64), (48, 128)], ["w4", "w3"], 1)[1][0] > 0
    path = cache_path(tmp_path, "cpu")
    assert path.exists()
    again = LatencyTable.load(path)
    assert again.to_dict() == table.to_dict()
    # cached entries are not measured again
    assert measure(shapes, ["w4"], tokens=(1,), device="cpu", cache_dir=tmp_path).entries[entry_key((32, 64), "w4", 1)].ms \
        == table.entries[entry_key((32, 64), "w4", 1)].ms


def test_layer_graph_like_input_and_errors(tmp_path) -> None:
    class Info:
        kind, out_features, in_features = "conv2d", 16, 72
    table = measure([Info()], ["w4", "w4gca8"], tokens=(2,), device="cpu", reps=1)
    assert table.lookup((16, 72), "w4", 2, kind="conv2d") > 0
    # a conv runs an activation-quantized choice weight-only, and its entry times that
    assert "int8" not in table.entries[entry_key((16, 72), "w4gca8", 2, "conv2d")].backend
    with pytest.raises(KeyError, match="not measured"):
        table.lookup((16, 72), "w8", 2, kind="conv2d")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            measure([(16, 16)], ["w4"], device="cuda")


def test_activation_quantized_choices_on_cpu(tmp_path) -> None:
    """w8gca8 and w4gca8 (int8 x int8, x quantized per token) and w4gcf8 (e4m3 x e4m3) are timed on the CPU as
    their emitted layers run them; the other activation-quantized choices (grouped, asymmetric, codes too wide for
    e4m3) are removed, each with why."""
    table = measure([(32, 64), (36, 30)], ["w4", "w8gca8", "w4gca8", "w4gcf8", "w8a8", "w4gca8asym", "w6gcf8"],
                    tokens=(1,), device="cpu", reps=1, cache_dir=tmp_path)
    assert table.lookup((32, 64), "w8gca8", 1) > 0 and table.lookup((32, 64), "w4gca8", 1) > 0
    assert table.entries[entry_key((32, 64), "w8gca8", 1)].backend == "int8_int_mm"
    assert table.entries[entry_key((32, 64), "w4gca8", 1)].backend == "int8_packed"
    # torch._int_mm takes no N or K off a multiple of 8 on CUDA: such 8-bit layers run the fused kernel everywhere
    assert table.entries[entry_key((36, 30), "w8gca8", 1)].backend == "int8_packed"
    assert table.entries[entry_key((36, 30), "w4gcf8", 1)].backend == "fp8_packed"
    assert "per-channel" in table.skipped["w8a8"] and "symmetric" in table.skipped["w4gca8asym"]
    assert "not exact in float8" in table.skipped["w6gcf8"]
    assert LatencyTable.load(cache_path(tmp_path, "cpu")).skipped == table.skipped
    with pytest.raises(KeyError, match="removed"):
        table.lookup((32, 64), "w8a8", 1)


def test_float8_activations_are_removed_where_the_device_has_none(monkeypatch) -> None:
    """A w<b>gcf8 choice on a CUDA device without float8 matmuls (compute capability < 8.9) is removed with the
    reason, as a latency table lists it, never an error in the middle of a solve."""
    from kernels import gpu_activation_quant as gaq
    monkeypatch.setattr(gaq, "fp8_available", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    reason = gaq.unsupported_reason(Choice.parse("w4gcf8"), torch.device("cuda"))
    assert "compute capability >= 8.9; removed on Tesla V100" in reason
    assert gaq.unsupported_reason(Choice.parse("w4gca8"), torch.device("cuda")) is None
    assert gaq.unsupported_reason(Choice.parse("w4gcf8"), torch.device("cpu")) is None  # emulated in torch ops
    monkeypatch.setattr(a8_linear, "fp8_available", lambda device: False)
    layer = QuantizedLinear("linear", (32, 64), QuantSpec(4, None), backend="fp8_act_packed")
    with pytest.raises(ValueError, match="float8 matmuls need compute capability >= 8.9, which Tesla V100 lacks"):
        layer.select(torch.device("cuda"), torch.bfloat16)  # a layer forced onto float8 says why it cannot run


def test_a_tables_w_b_a8_winners_are_installed_and_saved(monkeypatch) -> None:
    """A CUDA table times each W<b>A8 path of the choice's activation format (`a8_linear.PATHS`) per entry; its
    fastest goes into `measured_paths` (so `save_quantized` writes it to kernels.json) and `use_paths` installs it
    for the process's W<b>A8 layers, per format. Entries of other paths (torch._int_mm at 8 bits, a CPU table's
    backend) carry none; a path of the other format is refused."""
    monkeypatch.setattr(a8_linear, "DISPATCH", {})
    entries = {
        entry_key((64, 128), "w4gca8", 1): LatencyEntry(0.01, "a8_rounded_x", {"a8_rounded_x": 0.01, "a8_fused": 0.03}),
        entry_key((64, 128), "w4gca8", 512): LatencyEntry(0.2, "a8_unpack_int_mm",
                                                          {"a8_unpack_int_mm": 0.2, "a8_fused": 0.5}),
        entry_key((64, 128), "w4gcf8", 1): LatencyEntry(0.01, "f8_rounded_x", {"f8_rounded_x": 0.01}),
        entry_key((64, 128), "w8gca8", 1): LatencyEntry(0.01, "int8_int_mm", {"int8_int_mm": 0.01}),
        entry_key((64, 128), "w2gca8", 1): LatencyEntry(0.01, "int8_packed", {"int8_packed": 0.01})}
    records = LatencyTable("H100", {}, entries).measured_paths()
    assert sorted((r["choice"], r["tokens"], r["path"]) for r in records) == [
        ("w4gca8", 1, "a8_rounded_x"), ("w4gca8", 512, "a8_unpack_int_mm"), ("w4gcf8", 1, "f8_rounded_x")]
    use_paths(records)
    assert a8_linear.DISPATCH == {(64, 128, 4, "int", 1): "a8_rounded_x", (64, 128, 4, "int", 512): "a8_unpack_int_mm",
                                  (64, 128, 4, "fp8", 1): "f8_rounded_x"}
    record = next(r for r in records if r["choice"] == "w4gca8")
    with pytest.raises(ValueError, match="malformed.*not a W<b>A8 path"):
        use_paths([{**record, "path": "triton_fused"}])
    with pytest.raises(ValueError, match="malformed.*runs fp8 activations, w4gca8 int ones"):
        use_paths([{**record, "path": "f8_rounded_x"}])


def _entry(ms: float) -> LatencyEntry:
    return LatencyEntry(ms, "dequant", {"dequant": ms}, selected="dequant")


def test_layer_ms_takes_the_replay_overhead_off_graph_timed_entries_only() -> None:
    figures = {((64, 128), "w4", 1): 0.010, ((64, 128), "w4", 16): 0.012, ((64, 128), "w4", 512): 0.050,
               ((64, 128), "w8", 1): 0.0042}
    table = LatencyTable("H100", {}, {entry_key(*k): _entry(ms) for k, ms in figures.items()},
                         replay_overhead_ms=0.004, graph_max_tokens=64)
    assert table.layer_ms((64, 128), "w4", 1) == pytest.approx(0.006)
    assert table.layer_ms((64, 128), "w4", 16) == pytest.approx(0.008)
    assert table.layer_ms((64, 128), "w4", 512) == 0.050  # timed eagerly: no replay overhead to take off
    assert table.layer_ms((64, 128), "w8", 1) == pytest.approx(MIN_LAYER_FRACTION * 0.0042)  # the floor
    assert table.lookup((64, 128), "w4", 1) == 0.010  # lookup stays the measured figure
    assert table.latency_matrix([(64, 128)], ["w4", "w8"], 1) == [[pytest.approx(0.006), pytest.approx(0.00042)]]
    again = LatencyTable.from_dict(table.to_dict())
    assert (again.replay_overhead_ms, again.graph_max_tokens) == (0.004, 64)
    assert again.layer_ms((64, 128), "w4", 16) == pytest.approx(0.008)


def test_tables_without_the_replay_overhead_load_uncorrected() -> None:
    table = LatencyTable("H100", {}, {entry_key((64, 128), "w4", 1): _entry(0.010)})
    old = table.to_dict()
    del old["replay_overhead_ms"], old["graph_max_tokens"]
    loaded = LatencyTable.from_dict(old)
    assert (loaded.replay_overhead_ms, loaded.graph_max_tokens) == (0.0, 0)
    assert loaded.layer_ms((64, 128), "w4", 1) == loaded.lookup((64, 128), "w4", 1) == 0.010


def test_cpu_tables_have_no_replay_overhead(tmp_path) -> None:
    assert replay_overhead_ms("cpu") == 0.0 and l2_flush_buffer("cpu") is None
    table = measure([(32, 64)], ["w4"], tokens=(1,), device="cpu", reps=1)
    assert (table.replay_overhead_ms, table.graph_max_tokens) == (0.0, 0)
    assert table.layer_ms((32, 64), "w4", 1) == table.lookup((32, 64), "w4", 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tables_measure_the_replay_overhead_once(tmp_path) -> None:
    table = measure([(512, 2048)], ["w4"], tokens=(1, 128), device="cuda", reps=10, cache_dir=tmp_path)
    assert 0 < table.replay_overhead_ms < 0.05 and table.graph_max_tokens == GRAPH_MAX_TOKENS
    assert l2_flush_buffer("cuda").nbytes == L2_FLUSH_BYTES
    raw = table.lookup((512, 2048), "w4", 1)
    expected = max(raw - table.replay_overhead_ms, MIN_LAYER_FRACTION * raw)
    assert table.layer_ms((512, 2048), "w4", 1) == pytest.approx(expected)
    raw = table.lookup((512, 2048), "w4", 128)  # every count up to GRAPH_MAX_TOKENS is graph-timed too
    assert table.layer_ms((512, 2048), "w4", 128) == pytest.approx(
        max(raw - table.replay_overhead_ms, MIN_LAYER_FRACTION * raw))
    # a cached table keeps its overhead; one cached without it gets it measured
    assert measure([(512, 2048)], ["w4"], tokens=(1,), device="cuda", cache_dir=tmp_path).replay_overhead_ms \
        == table.replay_overhead_ms
    old = table.to_dict()
    del old["replay_overhead_ms"], old["graph_max_tokens"]
    LatencyTable.from_dict(old).save(cache_path(tmp_path, "cuda"))
    assert measure([(512, 2048)], ["w4"], tokens=(1,), device="cuda", cache_dir=tmp_path).replay_overhead_ms > 0


def test_convs_are_timed_as_an_emitted_model_runs_them(tmp_path) -> None:
    """A conv's entries are keyed by its traced geometry and timed as the QuantizedConv it becomes (k x k:
    dequantize + conv; pointwise: the linear backends), on `tokens` samples of its input shape; a latency budget
    for a CNN then bounds what the model runs, and the plan keeps the geometry to look its layers up again."""
    from torch import nn

    from allocator import Budget, predict_latency, profile_model, solve_profiled
    from kernels.latency import latency_calls
    from kernels.model_latency import measure_rest, model_key
    from profilers import LayerGraph, build_layer_graph

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, padding_mode="reflect"), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 10))
    x = torch.randn(2, 3, 8, 8)
    graph = build_layer_graph(net, x)
    assert graph["0"].conv == [{"in_shape": [3, 8, 8], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
                                "groups": 1, "padding_mode": "zeros", "calls": 1}]
    assert LayerGraph.from_dict(graph.to_dict()).layers[3].conv is None  # the linear head
    kinds = [kind for layer in graph.layers for kind, _ in latency_calls(layer)]
    assert kinds == ["conv2d(3x8x8,k3x3,s1x1,p1x1,d1x1,g1)", "conv2d(8x8x8,k1x1,s1x1,p0x0,d1x1,g1)",
                     "conv2d(8x8x8,k3x3,s2x2,p1x1,d1x1,g2,reflect)", "linear"]

    table = measure(graph, ["w4", "w8"], tokens=(1, 3), device="cpu", reps=2, cache_dir=tmp_path)
    for layer, kind in zip(graph.layers, kinds):
        for t in (1, 3):
            e = table.entries[entry_key((layer.out_features, layer.in_features), "w4", t, kind)]
            assert (e.backend == "quantized_conv") == layer.kind.startswith("conv") and e.ms > 0
    assert {k[:2] for k in table.dispatch} == {(10, 128)}  # conv entries run one path: nothing to dispatch

    profiled = profile_model(net, [x], [Choice(4), Choice(8)], profiler="gptq")
    measure_rest(net, graph, tokens=(3,), device="cpu", reps=2, inputs=lambda t: torch.randn(t, 3, 8, 8), table=table)
    slowest = sum(max(table.layer_ms((l.out_features, l.in_features), c, 3, k) for c in ("w4", "w8"))
                  for l, k in zip(graph.layers, kinds))
    plan = solve_profiled(profiled, Budget(latency_ms=slowest), method="greedy", latency_table=table, tokens=3)
    assert [layer.conv for layer in plan.layers] == [layer.conv for layer in graph.layers]
    plan.save(tmp_path / "plan.json")
    again = type(plan).load(tmp_path / "plan.json")
    rest, layers_ms = predict_latency(again, table, 3, model_key(net, graph.names))
    assert rest > 0 and rest + layers_ms == pytest.approx(plan.predicted["latency_ms"], rel=1e-9)


def test_a_layer_run_several_times_per_forward_counts_its_latency_each_time(tmp_path) -> None:
    """A module reused in a loop (or shared between blocks) runs once per call: the layer graph counts the calls,
    the solver's latency column and the plan's prediction multiply by them, and plans keep the count."""
    from torch import nn

    from allocator import Budget, Plan, PlanError, predict_latency, profile_model, solve_profiled
    from allocator.api import build_problem
    from kernels.model_latency import measure_rest, model_key
    from profilers import build_layer_graph

    class Looped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.step, self.head = nn.Linear(32, 32), nn.Linear(32, 4)

        def forward(self, x):
            for _ in range(3):
                x = torch.relu(self.step(x))
            return self.head(x)

    torch.manual_seed(0)
    net, x = Looped(), torch.randn(2, 32)
    graph = build_layer_graph(net, x)
    assert [layer.calls for layer in graph.layers] == [3, 1]
    table = measure(graph, ["w4", "w8"], tokens=(2,), device="cpu", reps=2)
    profiled = profile_model(net, [x], [Choice(4), Choice(8)], profiler="gptq")
    problem = build_problem(profiled, latency_table=table, tokens=2)
    assert problem.latency[0, 0] == pytest.approx(3 * table.layer_ms((32, 32), "w4", 2))
    measure_rest(net, graph, tokens=(2,), device="cpu", reps=2, inputs=lambda t: torch.randn(t, 32), table=table)
    plan = solve_profiled(profiled, Budget(avg_bits=8), method="greedy", latency_table=table, tokens=2)
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert [layer.calls for layer in again.layers] == [3, 1]
    rest, layers_ms = predict_latency(again, table, 2, model_key(net, graph.names))
    assert rest + layers_ms == pytest.approx(plan.predicted["latency_ms"], rel=1e-9)
    data = again.to_dict()
    data["layers"][0]["calls"] = 0
    with pytest.raises(PlanError, match="calls=0"):
        Plan.from_dict(data)


def test_a_conv_shared_across_feature_map_sizes_is_timed_at_each(tmp_path) -> None:
    """A detection-style head shared across feature-map sizes runs at each: the layer graph keeps every geometry
    with its calls, the table times each, and the solver's latency column and the plan's prediction sum them.
    Plans written when a conv kept one geometry still load; a conv entry whose calls do not add up is rejected."""
    from torch import nn

    from allocator import Budget, Plan, PlanError, predict_latency, profile_model, solve_profiled
    from allocator.api import build_problem
    from kernels.latency import latency_calls
    from kernels.model_latency import measure_rest, model_key
    from profilers import LayerGraph, build_layer_graph

    class Pyramid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down, self.head = nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            small = self.down(x)
            return self.head(x).mean() + self.head(small).mean() + self.head(small * 2).mean()

    torch.manual_seed(0)
    net, x = Pyramid(), torch.randn(2, 8, 8, 8)
    graph = build_layer_graph(net, x)
    head = graph["head"]
    assert head.calls == 3 and [(g["in_shape"], g["calls"]) for g in head.conv] == [([8, 8, 8], 1), ([8, 4, 4], 2)]
    assert LayerGraph.from_dict(graph.to_dict())["head"].conv == head.conv
    saved = graph.to_dict()  # graphs written when a conv kept one geometry (that of its first call)
    saved["layers"][0]["conv"] = {k: v for k, v in saved["layers"][0]["conv"][0].items() if k != "calls"}
    assert LayerGraph.from_dict(saved)["down"].conv == graph["down"].conv
    assert latency_calls(head) == [("conv2d(8x8x8,k3x3,s1x1,p1x1,d1x1,g1)", 1),
                                   ("conv2d(8x4x4,k3x3,s1x1,p1x1,d1x1,g1)", 2)]

    table = measure(graph, ["w4", "w8"], tokens=(1,), device="cpu", reps=2, cache_dir=tmp_path)
    from kernels.latency import timed_layers  # what a Ray latency task is sent: one entry per geometry
    assert len(timed_layers(graph)) == 3 == len(table.entries) // 2
    big, small = (table.layer_ms((4, 72), "w4", 1, kind) for kind, _ in latency_calls(head))
    profiled = profile_model(net, [x], [Choice(4), Choice(8)], profiler="gptq")
    problem = build_problem(profiled, latency_table=table, tokens=1)
    assert problem.latency[graph.names.index("head"), 0] == pytest.approx(big + 2 * small)

    measure_rest(net, graph, tokens=(1,), device="cpu", reps=2, inputs=lambda t: torch.randn(t, 8, 8, 8), table=table)
    plan = solve_profiled(profiled, Budget(avg_bits=8), method="greedy", latency_table=table, tokens=1)
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.layers[1].conv == head.conv
    rest, layers_ms = predict_latency(again, table, 1, model_key(net, graph.names))
    assert rest + layers_ms == pytest.approx(plan.predicted["latency_ms"], rel=1e-9)

    data = again.to_dict()
    old = data["layers"][0]
    old["conv"] = {k: v for k, v in old["conv"][0].items() if k != "calls"}  # one geometry, as plans used to hold
    assert Plan.from_dict(data).layers[0].conv == graph["down"].conv
    data["layers"][1]["conv"][1]["calls"] = 1
    with pytest.raises(PlanError, match="calls=3"):
        Plan.from_dict(data)
    data["layers"][1]["conv"][1].update(calls=2, groups="one")
    with pytest.raises(PlanError, match="malformed conv entry"):
        Plan.from_dict(data)
