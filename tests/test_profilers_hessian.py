"""Hessian-trace profiler: Hutchinson traces against exact Hessians, the HAWQ cost, HF models, errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from kernels import Choice, fake_quantize
from profilers import Calibration, build_layer_graph, profile


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def exact_traces(net, loss_of_output):
    """Traces of the diagonal Hessian blocks of both weights, by torch.autograd.functional.hessian."""
    w0, w2 = net[0].weight.detach(), net[2].weight.detach()

    def loss(a, b):
        return loss_of_output(lambda x: torch.tanh(x @ a.T + net[0].bias) @ b.T + net[2].bias)

    H = torch.autograd.functional.hessian(loss, (w0, w2))
    return [torch.diagonal(H[i][i].reshape(w.numel(), w.numel())).sum().item() for i, w in enumerate((w0, w2))]


def test_trace_without_labels_matches_the_exact_gauss_newton_trace():
    net = mlp()
    xs = [torch.randn(32, 6) for _ in range(2)]
    calib = Calibration(xs)  # no labels: KL self-distillation against the float outputs
    refs = calib.references(net)
    exact = exact_traces(net, lambda f: sum(
        F.kl_div(F.log_softmax(f(x), -1), F.log_softmax(r, -1), log_target=True, reduction="batchmean")
        for x, r in zip(xs, refs)) / 2)

    prof = profile(net, calib, build_layer_graph(net, xs[0]), [2, 4, 8], max_probes=2048, tol=0, batch_probes=256)
    for est, ref, rse in zip(prof.scores["trace"], exact, prof.scores["rel_stderr"]):
        assert est == pytest.approx(ref, rel=0.05)
        assert rse < 0.02 and abs(est - ref) < 4 * rse * est


def test_trace_with_float_labels_matches_the_exact_task_loss_trace():
    net = mlp()
    xs, ys = [torch.randn(32, 6)], [torch.randn(32, 3)]
    exact = exact_traces(net, lambda f: F.mse_loss(f(xs[0]), ys[0]))
    prof = profile(net, Calibration(xs, labels=ys), build_layer_graph(net, xs[0]), [4],
                   max_probes=2048, tol=0, batch_probes=512)
    np.testing.assert_allclose(prof.scores["trace"], exact, rtol=0.05)


def test_cost_is_trace_per_weight_times_quantization_error_and_stops_early():
    net = mlp()
    x = torch.randn(32, 6)
    prof = profile(net, [x, x + 1], build_layer_graph(net, x), ["w2", "w4", "w8"], tol=0.1, max_probes=400)
    assert prof.choices == ["w2", "w4", "w8"] and prof.cost.shape == (2, 3)
    assert all(16 <= n < 400 for n in prof.scores["probes"])  # stopped on tol=0.1, not the cap
    assert all(r < 0.1 for r in prof.scores["rel_stderr"])
    w = net[2].weight.detach()
    qerr = [(fake_quantize(w, Choice(b).spec_for("linear", 8)) - w).pow(2).sum().item() for b in (2, 4, 8)]
    np.testing.assert_allclose(prof.cost[1], np.array(prof.scores["trace"][1]) / w.numel() * np.array(qerr), rtol=1e-6)
    assert prof.cost[1, 0] > prof.cost[1, 1] > prof.cost[1, 2] > 0


def test_gpt2_with_sdpa_attention_profiles_through_eager():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, attn_implementation="sdpa"))
    batches = [{"input_ids": torch.randint(0, 50, (2, 8))} for _ in range(2)]
    prof = profile(model, batches, build_layer_graph(model, batches[0]), [2, 4], max_probes=32)
    assert len(prof.layers) == 4 and all(t > 0 for t in prof.scores["trace"])
    assert model.config._attn_implementation == "sdpa"  # restored


class SqrtAbs(nn.Module):
    def forward(self, x):
        return x.abs().sqrt()  # infinite slope at 0


def test_nan_gradient_names_the_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), SqrtAbs(), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight[0].zero_()
        net[0].bias[0] = 0.0  # unit 0 sits at the kink: finite loss, NaN gradient
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"gradient of layer '0' contains NaN/Inf on calibration batch 0"):
        profile(net, Calibration([x], labels=[torch.randn(4, 3)]), build_layer_graph(net, x), [4])


def test_bert_encoder_without_labels_gives_unused_pooler_zero_curvature():
    torch.manual_seed(0)
    bert = BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                vocab_size=50))
    batches = [{"input_ids": torch.randint(0, 50, (2, 8))}]
    graph = build_layer_graph(bert, batches[0])
    for name in ("hessian", "eigen"):
        prof = profile(bert, batches, graph, [4], profiler=name, max_probes=16) if name == "hessian" else \
            profile(bert, batches, graph, [4], profiler=name, max_iter=5)
        pooler = prof.layers.index("pooler.dense")  # last_hidden_state (MSE) does not use the pooler
        assert prof.cost[pooler, 0] == 0
        assert all(prof.cost[prof.layers.index(n), 0] > 0 for n in prof.layers if n.endswith(("value", "dense")) and n != "pooler.dense")
