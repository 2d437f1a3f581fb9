"""LRP end to end: conservation on an MLP, a CNN, a tiny GPT-2 and BERT; the "lrp" profiler's
scores against a hand-computed LRP, fallbacks, shard merges, and the model left unchanged."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import profilers.lrp  # noqa: F401  (registers "lrp")
from kernels import Choice, fake_quantize
from profilers import build_layer_graph, merge, profile
from profilers.lrp import output_seed
from profilers.lrp_rules import LRPRules


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def conservation(model, inputs, sources, attention="cp", embeds=False, **kwargs):
    """(output relevance, input relevance + relevance of the additive `sources` parameters)."""
    model.eval()
    x = inputs.clone().requires_grad_(True)
    with LRPRules(model, epsilon=1e-12, attention=attention):
        out = model(inputs_embeds=x, **kwargs) if embeds else model(x, **kwargs)
    out = getattr(out, "logits", out)
    seed = output_seed(out, "predicted")
    grads = torch.autograd.grad(seed, [x, *sources], allow_unused=True)
    r_sources = sum(float((p.detach() * g).sum()) for p, g in zip(sources, grads[1:]) if g is not None)
    return float(seed.detach()), float((x.detach() * grads[0]).sum()) + r_sources


def biases(model):
    return [p for n, p in model.named_parameters() if n.endswith("bias")]


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.SiLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def tiny_gpt2(impl="sdpa"):
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                     attn_implementation=impl)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(impl="sdpa"):
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=16, num_labels=3, attn_implementation=impl)
    return BertForSequenceClassification(cfg).eval()


def randomize_vectors(model):
    """Non-zero biases and norm parameters, so bias relevance matters."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("make, shape", [(mlp, (5, 6)), (cnn, (2, 3, 8, 8))])
def test_relevance_is_conserved_through_mlp_and_cnn(float64, make, shape):
    torch.manual_seed(0)
    model = randomize_vectors(make())
    r_out, r_in = conservation(model, torch.randn(shape), biases(model))
    assert r_in == pytest.approx(r_out, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_relevance_is_conserved_through_gpt2_bert_and_llama(float64, impl):
    torch.manual_seed(1)
    emb = torch.randn(2, 8, 32)
    gpt2 = randomize_vectors(tiny_gpt2(impl))
    sources = biases(gpt2) + [gpt2.transformer.wpe.weight]
    r_out, r_in = conservation(gpt2, emb, sources, embeds=True)
    assert r_in == pytest.approx(r_out, rel=1e-8)
    bert = randomize_vectors(tiny_bert(impl))
    sources = biases(bert) + [bert.bert.embeddings.position_embeddings.weight, bert.bert.embeddings.token_type_embeddings.weight]
    mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    r_out, r_in = conservation(bert, emb, sources, attention_mask=mask, embeds=True)
    assert r_in == pytest.approx(r_out, rel=1e-8)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=16, attn_implementation=impl)
    llama = LlamaForCausalLM(cfg)  # RMSNorm, SiLU-gated MLP, rotary embeddings, grouped-query attention
    with torch.no_grad():
        for p in llama.parameters():
            if p.dim() == 1:
                p.normal_(1, 0.2)
    r_out, r_in = conservation(llama, emb, [], embeds=True)
    assert r_in == pytest.approx(r_out, rel=1e-8)


def test_attnlrp_attention_loses_only_a_little_relevance(float64):
    torch.manual_seed(2)
    gpt2 = randomize_vectors(tiny_gpt2())
    r_out, r_in = conservation(gpt2, torch.randn(2, 8, 32), biases(gpt2) + [gpt2.transformer.wpe.weight],
                               attention="attnlrp", embeds=True)
    assert r_in == pytest.approx(r_out, rel=0.05)  # the softmax rule's Taylor bias absorbs the rest


def test_lrp_profile_matches_a_hand_computed_epsilon_lrp():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    batches = [torch.randn(4, 5), torch.randn(4, 5)]
    graph = build_layer_graph(net, batches[0])
    prof = profile(net, batches, graph, [2, 4], profiler="lrp", epsilon=0.01)

    rel = np.zeros(2)
    for x in batches:  # LRP by its formulas: R_out = predicted logit; R_h = a * W^T (R_out / stabilize(z))
        with torch.no_grad():
            h = net[0](x)
            z = net[2](F.relu(h))
        r_out = torch.zeros_like(z).scatter(1, z.argmax(1, keepdim=True), z.max(1, keepdim=True).values)
        stab = z + 0.01 * torch.where(z >= 0, 1.0, -1.0)
        r_h = F.relu(h) * ((r_out / stab) @ net[2].weight.detach())
        rel += [float(r_h.abs().sum()), float(r_out.abs().sum())]
    share = rel / rel.sum()
    assert prof.scores["share"] == pytest.approx(share.tolist(), rel=1e-5)
    assert prof.scores["relevance"] == pytest.approx(rel.tolist(), rel=1e-5)
    w = net[0].weight.detach()
    rel_err = float((fake_quantize(w, Choice(2).spec_for("linear", 5)) - w).pow(2).sum() / w.pow(2).sum())
    assert prof.cost[0, 0] == pytest.approx(share[0] * rel_err, rel=1e-5)
    assert (prof.cost[:, 0] > prof.cost[:, 1]).all()  # 2 bits cost more than 4
    assert prof.scores["fallback_batches"] == [0.0, 0.0] and prof.settings["fallback_modules"] == {}


def gpt2_calib():
    torch.manual_seed(4)
    model = tiny_gpt2()
    batches = [{"input_ids": torch.randint(0, 64, (2, 8))} for _ in range(3)]
    return model, batches, build_layer_graph(model, batches[0])


def test_lrp_profile_of_gpt2_scores_every_layer_without_fallback():
    model, batches, graph = gpt2_calib()
    prof = profile(model, batches, graph, [2, 4, 8], profiler="lrp")
    assert prof.layers == graph.names and any(n.endswith("c_attn") for n in prof.layers)
    assert min(prof.scores["share"]) > 0 and sum(prof.scores["share"]) == pytest.approx(1.0)
    assert prof.settings["fallback_modules"] == {} and not any(prof.scores["fallback_batches"])


def test_padding_positions_seed_no_relevance():
    model, _, graph = gpt2_calib()
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    other = ids.clone()
    other[1, 5:] = (ids[1, 5:] + 1) % 64  # differs only where the mask is 0
    scores = [profile(model, [{"input_ids": i, "attention_mask": mask}], graph, [4], profiler="lrp").scores["relevance"]
              for i in (ids, other)]
    assert scores[0] == pytest.approx(scores[1], rel=1e-6)


def test_cnn_profile_scores_conv_layers():
    torch.manual_seed(7)
    net = cnn()
    batches = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    prof = profile(net, batches, build_layer_graph(net, batches[0]), [2, 8], profiler="lrp", gamma=0.25)
    assert prof.layers == ["0", "3", "7"] and min(prof.scores["share"]) > 0
    assert (prof.cost[:, 0] > 10 * prof.cost[:, 1]).all()


def test_nan_or_inf_names_the_layer():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    batches = [torch.randn(2, 3)]
    graph = build_layer_graph(net, batches[0])
    with torch.no_grad():
        net[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="output of layer '2' contains NaN/Inf"):
        profile(net, batches, graph, [4], profiler="lrp")


def test_cp_attention_scores_query_and_key_by_the_gradient_x_input_fallback():
    torch.manual_seed(5)
    model = tiny_bert()
    batches = [{"input_ids": torch.randint(0, 64, (2, 8))} for _ in range(2)]
    graph = build_layer_graph(model, batches[0])
    prof = profile(model, batches, graph, [4], profiler="lrp", attention="cp")
    cp, share = prof.layer_scores("fallback_batches"), prof.layer_scores("share")
    qk = [n for n in graph.names if n.endswith(("query", "key"))]
    assert qk and all(cp[n] == 2 and share[n] > 0 for n in qk)
    assert all(cp[n] == 0 for n in graph.names if n not in qk)
    attnlrp = profile(model, batches, graph, [4], profiler="lrp").layer_scores("fallback_batches")
    assert not any(attnlrp.values())


def test_a_module_without_a_rule_is_reported_and_scored():
    class Square(nn.Module):
        def forward(self, x):
            return x * x

    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(4, 6), Square(), nn.Linear(6, 2))
    batches = [torch.randn(3, 4)]
    prof = profile(net, batches, build_layer_graph(net, batches[0]), [4], profiler="lrp")
    assert prof.settings["fallback_modules"] == {"1": "Square"}
    assert min(prof.scores["share"]) > 0


def test_the_model_is_unchanged_after_profiling():
    model, batches, graph = gpt2_calib()
    model.transformer.wte.weight.requires_grad_(False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile(model, batches, graph, [2, 4], profiler="lrp")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and not model.transformer.wte.weight.requires_grad and model.transformer.h[0].attn.c_attn.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_shards_over_batches_and_layers_merge_to_the_unsharded_profile():
    model, batches, graph = gpt2_calib()
    full = profile(model, batches, graph, [2], profiler="lrp")
    by_batch = merge([profile(model, batches, graph, [2], profiler="lrp", shard={"batches": b}) for b in ([0, 2], [1])])
    names = graph.names
    by_layer = merge([profile(model, batches, graph, [2], profiler="lrp", shard={"layers": s})
                      for s in (names[:3], names[3:])])
    for merged in (by_batch, by_layer):
        assert merged.layers == full.layers
        np.testing.assert_allclose(merged.cost, full.cost, rtol=1e-12)
        assert merged.scores["share"] == pytest.approx(full.scores["share"], rel=1e-12)


def test_unknown_target_is_rejected():
    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="target"):
        profile(net, [torch.randn(1, 2)], build_layer_graph(net, torch.randn(1, 2)), [4], profiler="lrp", target="label")
