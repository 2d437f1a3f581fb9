"""The measured, fisher, gptq and eigen profilers against hand computations and exact answers."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from kernels import Choice, fake_quantize
from profilers import Calibration, build_layer_graph, merge, profile

BITS = [2, 4, 8]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def quantized(w, bits, kind="linear"):
    return fake_quantize(w.detach(), Choice(bits).spec_for(kind, w.shape[1]))


def test_measured_is_the_loss_change_of_quantizing_one_layer():
    net = mlp()
    xs, ys = [torch.randn(16, 6) for _ in range(3)], [torch.randint(0, 3, (16,)) for _ in range(3)]
    calib = Calibration(xs, labels=ys)
    prof = profile(net, calib, build_layer_graph(net, xs[0]), BITS, profiler="measured")

    def mean_loss(w2):
        return np.mean([F.cross_entropy(torch.tanh(net[0](x)) @ w2.T + net[2].bias, y).item() for x, y in zip(xs, ys)])

    w2 = net[2].weight.detach()
    expected = [mean_loss(quantized(w2, b)) - mean_loss(w2) for b in BITS]
    np.testing.assert_allclose(prof.cost[1], expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(net[2].weight, w2)  # weights restored exactly
    merged = merge([profile(net, calib, build_layer_graph(net, xs[0]), BITS, profiler="measured", shard={"batches": s})
                    for s in ([0], [1, 2])])
    np.testing.assert_allclose(merged.cost, prof.cost, rtol=1e-9, atol=1e-12)


def _int8_levels(h: torch.Tensor) -> torch.Tensor:
    step = h.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(h / step) * step


def _e4m3_values(h: torch.Tensor) -> torch.Tensor:
    scale = h.abs().amax(dim=1, keepdim=True) / 448
    return (h / scale).to(torch.float8_e4m3fn).float() * scale


@pytest.mark.parametrize("plain,act_quantized,rounding", [("w8gc", "w8gca8", _int8_levels),
                                                           ("w4gc", "w4gcf8", _e4m3_values)])
def test_measured_rounds_the_input_of_a_layer_with_8_bit_activations(plain, act_quantized, rounding):
    """w8gca8 (w4gcf8) costs what its emitted layer does: w8gc's (w4gc's) weight rounding, and the layer's input
    rounded per token to integers of 8 bits (absmax / 127 a step), or to float8 e4m3 values (absmax / 448 a
    scale)."""
    net = mlp()
    xs, ys = [torch.randn(16, 6) for _ in range(3)], [torch.randint(0, 3, (16,)) for _ in range(3)]
    prof = profile(net, Calibration(xs, labels=ys), build_layer_graph(net, xs[0]), [plain, act_quantized],
                   profiler="measured")
    w2 = net[2].weight.detach()
    w2q = fake_quantize(w2, Choice.parse(plain).spec_for("linear", 8))

    def mean_loss(w, rounded: bool):
        losses = []
        for x, y in zip(xs, ys):
            h = torch.tanh(net[0](x))
            if rounded:
                h = rounding(h)
            losses.append(F.cross_entropy(h @ w.T + net[2].bias, y).item())
        return np.mean(losses)

    base = mean_loss(w2, False)
    np.testing.assert_allclose(prof.cost[1], [mean_loss(w2q, False) - base, mean_loss(w2q, True) - base],
                               rtol=1e-5, atol=1e-7)
    assert prof.cost[1, 1] != prof.cost[1, 0] and torch.equal(net[2].weight, w2)


def test_measured_without_labels_is_the_distillation_loss_of_the_quantized_model():
    net = mlp()
    x = torch.randn(16, 6)
    prof = profile(net, [x], build_layer_graph(net, x), [2], profiler="measured")
    ref = net(x)
    out = torch.tanh(net[0](x)) @ quantized(net[2].weight, 2).T + net[2].bias
    kl = F.kl_div(F.log_softmax(out, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean")
    assert prof.cost[1, 0] == pytest.approx(kl.item(), rel=1e-5) and prof.scores["base_loss"][1] == pytest.approx(0, abs=1e-7)


def test_fisher_matches_a_hand_computation():
    net = mlp()
    xs, ys = [torch.randn(16, 6) for _ in range(2)], [torch.randint(0, 3, (16,)) for _ in range(2)]
    calib, graph = Calibration(xs, labels=ys), build_layer_graph(net, xs[0])
    dot = profile(net, calib, graph, BITS, profiler="fisher")
    diag = profile(net, calib, graph, BITS, profiler="fisher", estimator="diag")
    w0 = net[0].weight
    grads = [torch.autograd.grad(F.cross_entropy(net(x), y), w0)[0] for x, y in zip(xs, ys)]
    dws = [quantized(w0, b) - w0.detach() for b in BITS]
    np.testing.assert_allclose(dot.cost[0], [np.mean([(g * d).sum().item() ** 2 for g in grads]) for d in dws], rtol=1e-5)
    np.testing.assert_allclose(diag.cost[0], [np.mean([(g * g * d * d).sum().item() for g in grads]) for d in dws], rtol=1e-5)


def test_fisher_without_labels_samples_targets_from_the_model():
    net = mlp()
    x = torch.randn(64, 6)
    prof = profile(net, [x, x], build_layer_graph(net, x), BITS, profiler="fisher")
    assert (prof.cost > 0).all() and (prof.cost[:, 0] > prof.cost[:, 2]).all()  # 2 bits costs more than 8


def test_gptq_cost_is_twice_the_mean_output_error_of_each_layer():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    batches = [{"input_ids": torch.randint(0, 50, (2, 8))} for _ in range(2)]
    graph = build_layer_graph(model, batches[0])
    prof = profile(model, batches, graph, BITS, profiler="gptq")
    layer = model.transformer.h[0].mlp.c_fc  # HF Conv1D, weight [in, out]
    inputs = []
    handle = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    x = torch.cat(inputs).double()
    w = layer.weight.detach().t()  # [out, in]
    expected = [2 * ((x @ (quantized(w, b, "hf_conv1d") - w).double().T) ** 2).sum().item() / len(x) for b in BITS]
    np.testing.assert_allclose(prof.cost[prof.layers.index("transformer.h.0.mlp.c_fc")], expected, rtol=1e-6)
    shards = [profile(model, batches, graph, BITS, profiler="gptq", shard={"batches": [i]}) for i in (0, 1)]
    np.testing.assert_allclose(merge(shards).cost, prof.cost, rtol=1e-9)


def test_gptq_on_a_conv_is_its_output_error():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2))
    x = torch.randn(2, 3, 6, 6)
    prof = profile(net, [x], build_layer_graph(net, x), [2, 4], profiler="gptq")
    h = torch.relu(net[0](x))
    w = net[2].weight.detach()
    for j, b in enumerate((2, 4)):
        dw = fake_quantize(w, Choice(b).spec_for("conv2d", 18)) - w
        err = F.conv2d(h, dw, groups=2)
        assert prof.cost[1, j] == pytest.approx(2 * err.pow(2).sum().item() / (2 * 4 * 4), rel=1e-5)


def test_eigen_finds_the_exact_top_eigenvalue_of_each_block():
    net = mlp()
    xs, ys = [torch.randn(32, 6)], [torch.randn(32, 3)]
    calib, graph = Calibration(xs, labels=ys), build_layer_graph(net, xs[0])
    prof = profile(net, calib, graph, BITS, profiler="eigen", tol=1e-6, max_iter=500)

    def loss(a, b):
        return F.mse_loss(torch.tanh(xs[0] @ a.T + net[0].bias) @ b.T + net[2].bias, ys[0])

    H = torch.autograd.functional.hessian(loss, (net[0].weight.detach(), net[2].weight.detach()))
    for i, w in enumerate((net[0].weight, net[2].weight)):
        ev = torch.linalg.eigvalsh(H[i][i].reshape(w.numel(), w.numel()).double())
        top = ev[ev.abs().argmax()].item()
        assert prof.scores["eigenvalue"][i] == pytest.approx(top, rel=1e-3)
    assert all(prof.scores["converged"])
    shards = [profile(net, calib, graph, BITS, profiler="eigen", tol=1e-6, max_iter=500, shard={"layers": [n]})
              for n in graph.names]
    np.testing.assert_allclose(merge(shards).cost, prof.cost, rtol=1e-6)
    with pytest.raises(ValueError, match="shards over layers only"):
        profile(net, calib, graph, BITS, profiler="eigen", shard={"batches": [0]})
