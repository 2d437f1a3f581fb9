"""Profile object: JSON round trip, shard merge, the profile() dispatcher and its cache."""
import numpy as np
import pytest
import torch
from torch import nn

from profilers import PROFILERS, Calibration, Profile, build_layer_graph, merge, profile


def small_setup(n_batches=4):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    calib = Calibration([torch.randn(8, 6) for _ in range(n_batches)])
    return net, calib, build_layer_graph(net, calib[0])


def test_profile_json_round_trip(tmp_path):
    prof = Profile(layers=["a", "b"], choices=["w2", "w4"], cost=np.array([[2.0, 1.0], [4.0, 0.5]]),
                   scores={"trace": [1.0, 2.0]}, pairs={("a", "b"): np.array([[0.1, 0.0], [0.0, 0.0]])},
                   profiler="hessian", settings={"tol": 0.01}, model_hash="m", calib_hash="c", elapsed_s=1.5)
    prof.save(tmp_path / "p.json")
    back = Profile.load(tmp_path / "p.json")
    assert back.layers == prof.layers and back.choices == prof.choices and back.settings == prof.settings
    np.testing.assert_array_equal(back.cost, prof.cost)
    np.testing.assert_array_equal(back.pairs[("a", "b")], prof.pairs[("a", "b")])
    assert back.layer_scores("trace") == {"a": 1.0, "b": 2.0}


def test_merge_rejects_mismatched_shards():
    a = Profile(["a"], ["w2"], np.ones((1, 1)), profiler="hessian")
    b = Profile(["b"], ["w4"], np.ones((1, 1)), profiler="hessian")
    with pytest.raises(ValueError, match="different choices"):
        merge([a, b])


def test_layer_shards_merge_to_the_unsharded_profile():
    net, calib, graph = small_setup()
    full = profile(net, calib, graph, [2, 4, 8], max_probes=64, tol=0.05)
    shards = [profile(net, calib, graph, [2, 4, 8], shard={"layers": names}, max_probes=64, tol=0.05)
              for names in (["0"], ["2", "4"])]
    merged = Profile.merge(shards)
    assert merged.layers == full.layers == ["0", "2", "4"]
    np.testing.assert_allclose(merged.cost, full.cost, rtol=1e-12)
    assert merged.scores["probes"] == full.scores["probes"]  # per-layer stopping is shard independent


def test_batch_shards_merge_to_the_unsharded_profile():
    net, calib, graph = small_setup()
    full = profile(net, calib, graph, ["w2", "w4"], max_probes=64, tol=0)
    shards = [profile(net, calib, graph, ["w2", "w4"], shard={"batches": idx}, max_probes=64)
              for idx in ([0, 1], [2], [3])]
    merged = merge(shards)
    np.testing.assert_allclose(merged.cost, full.cost, rtol=1e-9)
    np.testing.assert_allclose(merged.scores["trace"], full.scores["trace"], rtol=1e-9)
    assert merged.scores["probes"] == full.scores["probes"] == [64.0, 64.0, 64.0]


def test_same_request_twice_is_served_from_the_cache(tmp_path, monkeypatch):
    net, calib, graph = small_setup()
    calls = []
    real = PROFILERS["hessian"]

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setitem(PROFILERS, "hessian", counting)
    first = profile(net, calib, graph, [4], cache_dir=tmp_path, max_probes=16)
    again = profile(net, calib, graph, [4], cache_dir=tmp_path, max_probes=16)
    assert len(calls) == 1 and len(list(tmp_path.glob("hessian-*.json"))) == 1
    np.testing.assert_array_equal(again.cost, first.cost)
    assert again.model_hash == first.model_hash and again.calib_hash == calib.hash()
    profile(net, calib, graph, [4], cache_dir=tmp_path, max_probes=32)  # other settings: recomputed
    assert len(calls) == 2


def test_unknown_profiler_and_bad_shard_are_clear_errors():
    net, calib, graph = small_setup(1)
    with pytest.raises(ValueError, match="unknown profiler 'nope'; registered: .*hessian"):
        profile(net, calib, graph, [4], profiler="nope")
    with pytest.raises(ValueError, match=r"shard names unknown layers \['9'\]"):
        profile(net, calib, graph, [4], shard={"layers": ["9"]})
    with pytest.raises(ValueError, match="out of range for 1 calibration batches"):
        profile(net, calib, graph, [4], shard={"batches": [3]})
