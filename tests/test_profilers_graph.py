"""Layer graph: quantizable layers, MACs, skipped layers and producer -> consumer edges."""
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from profilers import LayerGraph, build_layer_graph

TOKENS = {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))}


def test_gpt2_layers_macs_tied_head_and_edges():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100))
    g = build_layer_graph(model, TOKENS)

    assert len(g.layers) == 8 and {l.kind for l in g.layers} == {"hf_conv1d"}
    assert g.skipped == {"lm_head": "weight tied to transformer.wte"}
    c_attn = g["transformer.h.0.attn.c_attn"]
    assert (c_attn.weight_shape, c_attn.in_features, c_attn.out_features) == ((64, 192), 64, 192)
    assert c_attn.macs == 8 * 64 * 192  # tokens per sample x in x out
    h0, h1 = "transformer.h.0.", "transformer.h.1."
    chain = [h0 + "attn.c_attn", h0 + "attn.c_proj", h0 + "mlp.c_fc", h0 + "mlp.c_proj", h1 + "attn.c_attn"]
    for a, b in zip(chain, chain[1:]):
        assert g.graph.has_edge(a, b), (a, b)
    assert g.graph.has_edge(h0 + "attn.c_proj", h1 + "attn.c_attn")  # residual skip
    assert not g.graph.has_edge(h0 + "mlp.c_fc", h1 + "attn.c_attn")  # c_fc only feeds c_proj
    assert set(g.graph.successors(h0 + "attn.c_attn")) == {h0 + "attn.c_proj"}


def test_llama_attention_and_gated_mlp():
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    g = build_layer_graph(LlamaForCausalLM(cfg), TOKENS)

    assert len(g.layers) == 15 and g.skipped == {}  # 7 per block + untied lm_head
    p = "model.layers.0."
    for src in ("q_proj", "k_proj", "v_proj"):
        assert set(g.graph.successors(p + "self_attn." + src)) == {p + "self_attn.o_proj"}
    assert {p + "mlp.gate_proj", p + "mlp.up_proj"} <= set(g.graph.successors(p + "self_attn.o_proj"))
    assert set(g.graph.predecessors(p + "mlp.down_proj")) == {p + "mlp.gate_proj", p + "mlp.up_proj"}
    assert g["model.layers.0.self_attn.k_proj"].out_features == 32  # 2 kv heads x 16


def test_bert_encoder_chain():
    cfg = BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=100)
    g = build_layer_graph(BertModel(cfg), TOKENS)

    assert len(g.layers) == 13  # 6 per layer + pooler
    p = "encoder.layer.0."
    for src in ("query", "key", "value"):
        assert g.graph.has_edge(p + "attention.self." + src, p + "attention.output.dense")
    assert g.graph.has_edge(p + "attention.output.dense", p + "intermediate.dense")
    assert g.graph.has_edge(p + "intermediate.dense", p + "output.dense")
    assert g.graph.has_edge(p + "output.dense", "encoder.layer.1.attention.self.query")


def test_opt_skips_tied_head():
    cfg = OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4, vocab_size=100,
                    word_embed_proj_dim=64)
    g = build_layer_graph(OPTForCausalLM(cfg), TOKENS)
    assert len(g.layers) == 12
    assert g.skipped == {"lm_head": "weight tied to model.decoder.embed_tokens"}
    assert g.graph.has_edge("model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2")


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8 * 4 * 4, 10)
        self.unused = nn.Linear(4, 4)
        self.emb = nn.Embedding(10, 4)  # has a weight but is not a quantizable kind

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h)) + h  # residual
        return self.head(nn.functional.adaptive_avg_pool2d(h, 4).flatten(1))


def test_cnn_macs_kinds_residual_and_unused_layer():
    g = build_layer_graph(SmallCNN(), torch.randn(2, 3, 8, 8))

    assert g.names == ["conv1", "conv2", "head"]
    assert g.skipped == {"unused": "not called in the traced forward"}
    assert g["conv1"].kind == "conv2d" and g["conv1"].macs == 8 * 8 * 8 * 3 * 9
    assert g["conv2"].in_features == 4 * 9 and g["conv2"].macs == 8 * 8 * 8 * 4 * 9  # groups=2
    assert g["head"].macs == 10 * 128
    assert sorted(g.graph.edges) == [("conv1", "conv2"), ("conv1", "head"), ("conv2", "head")]


def test_round_trip_json(tmp_path):
    g = build_layer_graph(SmallCNN(), torch.randn(1, 3, 8, 8))
    g.save(tmp_path / "graph.json")
    back = LayerGraph.load(tmp_path / "graph.json")
    assert back.layers == g.layers and back.skipped == g.skipped
    assert sorted(back.graph.edges) == sorted(g.graph.edges)


def test_no_quantizable_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="has no quantizable layer"):
        build_layer_graph(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), torch.randn(2, 4))


def test_example_batch_that_does_not_fit_names_expected_inputs():
    with pytest.raises(ValueError, match=r"example batch does not fit Sequential.forward\(input\).*\(2, 5\)"):
        build_layer_graph(nn.Sequential(nn.Linear(4, 2)), torch.randn(2, 5))
