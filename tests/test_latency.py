"""kernels.latency on the CPU: tiny shapes, the registered CPU backends, JSON round trip and cache."""
from __future__ import annotations

import pytest
import torch

from kernels import Choice
from kernels.latency import LatencyTable, cache_path, entry_key, measure


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
    table = measure([Info()], ["w4"], tokens=(2,), device="cpu", reps=1)
    assert table.lookup((16, 72), "w4", 2, kind="conv2d") > 0
    with pytest.raises(KeyError, match="not measured"):
        table.lookup((16, 72), "w8", 2, kind="conv2d")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            measure([(16, 16)], ["w4"], device="cuda")


def test_activation_quantized_choice_removed_on_cpu(tmp_path) -> None:
    table = measure([(32, 64)], ["w4", "w8gca8"], tokens=(1,), device="cpu", reps=1, cache_dir=tmp_path)
    assert "w8gca8" in table.skipped and "CUDA" in table.skipped["w8gca8"]
    assert LatencyTable.load(cache_path(tmp_path, "cpu")).skipped == table.skipped
    with pytest.raises(KeyError, match="removed"):
        table.lookup((32, 64), "w8gca8", 1)
