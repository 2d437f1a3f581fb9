"""Each LRP rule alone: the output value is unchanged and relevance is conserved
(sum of input relevance + bias relevance == sum of output relevance)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from profilers.lrp_rules import LRPRules, attention, gate_rule, linear_rule, stabilize, uniform_rule



@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def relevance(module, x, weights=None, **rules):
    """(output, R_out, R_in, R_bias) for one module under the rules; R_out = y * w, w random."""
    x = x.clone().requires_grad_(True)
    with LRPRules(module, **rules):
        y = module(x)
    w = torch.randn_like(y) if weights is None else weights
    bias = [p for n, p in module.named_parameters() if n.endswith("bias")]
    grads = torch.autograd.grad((y * w).sum(), [x, *bias])
    r_bias = float(sum((p.detach() * g).sum() for p, g in zip(bias, grads[1:])))
    return y.detach(), y.detach() * w, x.detach() * grads[0], r_bias


def test_epsilon_rule_matches_the_formula_and_conserves_with_bias():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    x = torch.randn(3, 6)
    y, r_out, r_in, r_bias = relevance(lin, x, epsilon=1e-9)
    assert torch.allclose(y, lin(x))
    z = lin(x).detach()
    expected = x[:, :, None] * lin.weight.T[None] * (r_out / stabilize(z, 1e-9))[:, None, :]  # [n, in, out]
    assert torch.allclose(r_in, expected.sum(-1), atol=1e-10)
    assert r_in.sum().item() + r_bias == pytest.approx(r_out.sum().item(), abs=1e-7)


def test_large_epsilon_absorbs_relevance():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=False)
    x = torch.randn(3, 6)
    _, r_out, r_in, _ = relevance(lin, x, epsilon=1e3)
    assert abs(r_in.sum().item()) < 0.01 * r_out.abs().sum().item()


def test_gamma_rule_matches_the_formula_and_conserves():
    torch.manual_seed(1)
    lin = nn.Linear(5, 3)
    x = torch.rand(4, 5)  # gamma is meant for non-negative inputs
    y, r_out, r_in, r_bias = relevance(lin, x, epsilon=1e-9, gamma=0.25)
    assert torch.allclose(y, lin(x))
    w_g = lin.weight + 0.25 * lin.weight.clamp(min=0)
    b_g = lin.bias + 0.25 * lin.bias.clamp(min=0)
    z_g = (x @ w_g.T + b_g).detach()
    expected = x * ((r_out / stabilize(z_g, 1e-9)) @ w_g).detach()
    assert torch.allclose(r_in, expected, atol=1e-10)
    assert r_in.sum().item() + r_bias == pytest.approx(r_out.sum().item(), abs=1e-7)


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_conv2d_rule_conserves(gamma):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.rand(2, 3, 5, 5)
    y, r_out, r_in, r_bias = relevance(conv, x, epsilon=1e-9, gamma=gamma)
    assert torch.allclose(y, conv(x))
    assert r_in.sum().item() + r_bias == pytest.approx(r_out.sum().item(), abs=1e-6)


def test_hf_conv1d_rule_equals_the_linear_rule():
    torch.manual_seed(3)
    c1d = Conv1D(4, 6)  # nf=4 outputs, nx=6 inputs, weight [6, 4]
    nn.init.normal_(c1d.bias)
    lin = nn.Linear(6, 4)
    lin.weight.data, lin.bias.data = c1d.weight.data.T.clone(), c1d.bias.data.clone()
    x, w = torch.randn(2, 3, 6), torch.randn(2, 3, 4)
    _, r_out, r_in, r_bias = relevance(c1d, x, w, epsilon=1e-9)
    _, _, r_in_lin, _ = relevance(lin, x, w, epsilon=1e-9)
    assert torch.allclose(r_in, r_in_lin, atol=1e-12)
    assert r_in.sum().item() + r_bias == pytest.approx(r_out.sum().item(), abs=1e-7)


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.ReLU(), nn.Tanh()])
def test_activation_gate_rule_is_the_identity_rule(act):
    torch.manual_seed(4)
    x = torch.randn(5, 7)
    y, r_out, r_in, _ = relevance(act, x)
    assert torch.allclose(y, act(x))
    assert torch.allclose(r_in, r_out, atol=1e-12)  # elementwise: R_in = R_out


def test_hf_activation_and_rmsnorm_get_the_gate_rule():
    from transformers.activations import NewGELUActivation
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(5)
    norm = LlamaRMSNorm(8)
    nn.init.normal_(norm.weight)
    for module in (NewGELUActivation(), norm):
        x = torch.randn(3, 8)
        y, r_out, r_in, _ = relevance(module, x)
        assert torch.allclose(y, module(x))
        assert torch.allclose(r_in, r_out, atol=1e-12)


def test_layernorm_rule_conserves_up_to_its_bias():
    torch.manual_seed(6)
    ln = nn.LayerNorm(8)
    nn.init.normal_(ln.weight)
    nn.init.normal_(ln.bias)
    x = torch.randn(4, 8) * 3 + 1
    y, r_out, r_in, r_bias = relevance(ln, x)
    assert torch.allclose(y, ln(x))
    assert r_in.sum().item() + r_bias == pytest.approx(r_out.sum().item(), abs=1e-9)
    # per sample too: the normalization scale is a constant, so each row conserves
    assert torch.allclose(r_in.sum(-1) + (ln.bias * (r_out / y)).sum(-1), r_out.sum(-1), atol=1e-9)


def test_uniform_rule_splits_a_product_in_half():
    torch.manual_seed(7)
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(4, 5, requires_grad=True)
    y = uniform_rule(a @ b)
    assert torch.allclose(y, a @ b)
    w = torch.randn(3, 5)
    ga, gb = torch.autograd.grad((y * w).sum(), [a, b])
    r_out = (y * w).sum().item()
    assert (a * ga).sum().item() == pytest.approx(r_out / 2, abs=1e-10)
    assert (b * gb).sum().item() == pytest.approx(r_out / 2, abs=1e-10)


def test_gate_rule_at_zero_input_passes_no_relevance():
    x = torch.tensor([0.0, 1.0, -2.0], requires_grad=True)
    y = gate_rule(x, F.gelu(x))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(x * g, F.gelu(x).detach())


def test_linear_rule_keeps_the_value():
    z = torch.randn(10, requires_grad=True)
    assert torch.equal(linear_rule(z, z, 0.1), z)


def qkv(causal_heads=2):
    torch.manual_seed(8)
    return [torch.randn(2, causal_heads, 5, 4, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_cp_mode_equals_sdpa_and_gives_all_relevance_to_v(is_causal):
    q, k, v = qkv()
    y = attention(q, k, v, is_causal=is_causal, mode="cp")
    assert torch.allclose(y, F.scaled_dot_product_attention(q, k, v, is_causal=is_causal), atol=1e-12)
    w = torch.randn_like(y)
    gq, gk, gv = torch.autograd.grad((y * w).sum(), [q, k, v], allow_unused=True)
    assert gq is None and gk is None
    assert (v * gv).sum().item() == pytest.approx((y * w).sum().item(), abs=1e-10)


def test_attention_attnlrp_mode_gives_half_to_v_and_some_to_q_and_k():
    q, k, v = qkv()
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    y = attention(q, k, v, attn_mask=mask, mode="attnlrp")
    assert torch.allclose(y, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-12)
    w = torch.randn_like(y)
    gq, gk, gv = torch.autograd.grad((y * w).sum(), [q, k, v])
    assert (v * gv).sum().item() == pytest.approx(0.5 * (y * w).sum().item(), abs=1e-10)
    assert (q * gq).abs().sum() > 1e-3 and (k * gk).abs().sum() > 1e-3


def test_sdpa_inside_a_model_is_rewritten_by_the_rules():
    class Attn(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = qkv()
    model = Attn()
    with LRPRules(model, attention="cp"):
        y = model(q, k, v)
    gq, gv = torch.autograd.grad(y.sum(), [q, v], allow_unused=True)
    assert gq is None
    assert (v * gv).sum().item() == pytest.approx(y.sum().item(), abs=1e-10)


def test_functional_products_and_gates_in_a_container():
    class GatedMLP(nn.Module):  # Llama-style: down(silu(gate(x)) * up(x))
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(4, 6, bias=False), nn.Linear(4, 6, bias=False), nn.Linear(6, 4, bias=False)

        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x))

    torch.manual_seed(9)
    mlp = GatedMLP()
    x = torch.randn(3, 4)
    y, r_out, r_in, _ = relevance(mlp, x, epsilon=1e-12)
    assert torch.allclose(y, mlp(x))
    assert r_in.sum().item() == pytest.approx(r_out.sum().item(), abs=1e-8)


def test_a_product_with_a_transposed_parameter_is_not_split():
    class Tied(nn.Module):  # logits = h @ E^T, as tied output embeddings are often written
        def __init__(self):
            super().__init__()
            self.emb = nn.Parameter(torch.randn(5, 3))

        def forward(self, x):
            return x @ self.emb.T

    x = torch.randn(2, 3)
    y, r_out, r_in, _ = relevance(Tied(), x)
    assert r_in.sum().item() == pytest.approx(r_out.sum().item(), abs=1e-12)


def test_module_without_a_rule_is_reported_and_passed_as_gradient_x_input():
    class Square(nn.Module):
        def forward(self, x):
            return x ** 2

    net = nn.Sequential(nn.Linear(3, 3), Square(), nn.Linear(3, 1))
    x = torch.randn(2, 3, requires_grad=True)
    with LRPRules(net) as rules:
        y = net(x)
    assert rules.fallback == {"1": "Square"}
    (g,) = torch.autograd.grad(y.sum(), x)
    assert (x * g).abs().sum() > 0


def test_rules_are_removed_on_exit():
    lin = nn.Linear(3, 3)
    with LRPRules(lin):
        pass
    assert not lin._forward_hooks
    x = torch.randn(2, 3, requires_grad=True)
    (g,) = torch.autograd.grad(lin(x).sum(), x)
    assert torch.allclose(g, lin.weight.sum(0).expand(2, 3))


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="attention"):
        LRPRules(nn.Linear(2, 2), attention="softmax")
    with pytest.raises(ValueError, match="watched modules"):
        LRPRules(nn.Linear(2, 2), watch=["nope"])
