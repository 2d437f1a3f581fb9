"""The "interlayer" profiler: zero interaction where the loss is additive in two layers,
a measured non-zero one for a dependent pair, exact layer-shard merge, model unchanged."""
import numpy as np
import pytest
import torch
from torch import nn

import profilers.interlayer  # noqa: F401  (registers "interlayer")
from kernels import Choice, fake_quantize
from profilers import Calibration, build_layer_graph, merge, profile
from profilers.interlayer import LossTable, near_pairs

CHOICES = [Choice(2), Choice(3), Choice(8)]


class TwoHeads(nn.Module):
    """trunk -> tanh -> (head_a | head_b): with MSE self-distillation on the concatenated output the loss is a sum
    of a term in head_a and a term in head_b, so they cannot interact; trunk and a head can."""

    def __init__(self):
        super().__init__()
        self.trunk, self.head_a, self.head_b = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return torch.cat([self.head_a(h), self.head_b(h)], dim=-1)


@pytest.fixture
def setup():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    model = TwoHeads()
    xs = [torch.randn(256, 8) for _ in range(4)]
    calib = Calibration(xs, distill="mse")
    yield model, calib, build_layer_graph(model, xs[0])
    torch.set_default_dtype(old)


def test_pairs_are_the_layers_within_k_hops(setup):
    _, _, graph = setup
    assert near_pairs(graph, 1) == [("trunk", "head_a"), ("trunk", "head_b")]
    assert near_pairs(graph, 2) == [("trunk", "head_a"), ("trunk", "head_b"), ("head_a", "head_b")]


def test_additive_heads_do_not_interact_and_trunk_and_head_do(setup):
    model, calib, graph = setup
    prof = profile(model, calib, graph, CHOICES, profiler="interlayer")
    table = LossTable(model, calib, {l.name: l for l in graph.layers}, CHOICES)
    loss = table(("head_a", 0), ("head_b", 0)).max()  # the loss is float32: its rounding is the only interaction
    assert np.abs(table.interaction(("head_a", 0), ("head_b", 0))).max() <= 2 * np.finfo(np.float32).eps * loss
    assert ("head_a", "head_b") not in prof.pairs
    d = prof.pairs[("trunk", "head_a")]
    assert d.shape == (3, 3) and (d[:, 2] == 0).all() and (d[2, :] == 0).all()  # only the two low choices

    def loss(*names):  # the measured interaction, by hand
        saved = {n: model.get_submodule(n).weight.detach().clone() for n in names}
        with torch.no_grad():
            for n in names:
                w = model.get_submodule(n).weight
                w.copy_(fake_quantize(w, Choice(2).spec_for("linear", w.shape[1])))
            out = np.mean([float(calib.loss(model, b)) for b in range(len(calib))])
            for n, w in saved.items():
                model.get_submodule(n).weight.copy_(w)
        return out

    expected = loss("trunk", "head_a") - loss("trunk") - loss("head_a") + loss()
    assert abs(expected) > 1e-4
    # (the profiler adds Q(W) - W taken in float32, hence not bit-equal)
    assert d[0, 0] == pytest.approx(expected, rel=1e-5)
    assert prof.cost[graph.names.index("trunk"), 0] == pytest.approx(loss("trunk") - loss(), rel=1e-5)


def test_augmented_score_adds_half_the_positive_pair_terms(setup):
    model, calib, graph = setup
    prof = profile(model, calib, graph, CHOICES, profiler="interlayer")
    for i, name in enumerate(prof.layers):
        for j, c in enumerate(prof.choices):
            extra = sum(max(d[j, j], 0.0) for pair, d in prof.pairs.items() if name in pair)
            assert prof.scores[f"augmented_{c}"][i] == pytest.approx(prof.cost[i, j] + 0.5 * extra, abs=1e-15)
    assert prof.settings["low"] == ["w2", "w3"]
    assert (prof.cost[:, 0] > prof.cost[:, 2]).all()


def test_a_huge_noise_multiple_keeps_no_pairs(setup):
    model, calib, graph = setup
    assert profile(model, calib, graph, CHOICES, profiler="interlayer", noise_mult=1e9).pairs == {}


def test_layer_shards_merge_to_the_unsharded_profile(setup):
    model, calib, graph = setup
    full = profile(model, calib, graph, CHOICES, profiler="interlayer")
    shards = [profile(model, calib, graph, CHOICES, profiler="interlayer", shard={"layers": s})
              for s in (["trunk"], ["head_a", "head_b"])]
    merged = merge(shards)
    assert merged.layers == full.layers and merged.pairs.keys() == full.pairs.keys()
    np.testing.assert_array_equal(merged.cost, full.cost)
    for k, d in full.pairs.items():
        np.testing.assert_array_equal(merged.pairs[k], d)
    assert merged.scores == full.scores


def test_the_model_is_unchanged_after_profiling(setup):
    model, calib, graph = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile(model, calib, graph, CHOICES, profiler="interlayer")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_requests_are_rejected(setup):
    model, calib, graph = setup
    with pytest.raises(ValueError, match="at least 2 calibration batches"):
        profile(model, [calib[0]], graph, CHOICES, profiler="interlayer")
    with pytest.raises(ValueError, match="not batches"):
        profile(model, calib, graph, CHOICES, profiler="interlayer", shard={"batches": [0, 1]})
