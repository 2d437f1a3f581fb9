"""Calibration: batch forms, output extraction, the profiling loss, hashes and input errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from profilers import Calibration, model_hash

torch.manual_seed(0)
GPT2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
IDS = torch.randint(0, 50, (2, 6))


def test_hf_labels_give_the_models_own_loss():
    calib = Calibration([{"input_ids": IDS, "labels": IDS}])
    assert torch.allclose(calib.loss(GPT2, 0), GPT2(input_ids=IDS, labels=IDS).loss)
    assert calib.forward(GPT2, 0).shape == (2, 6, 50)  # logits


def test_tuple_batches_with_labels_use_cross_entropy():
    net = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    calib = Calibration([(x,)], labels=[y])
    assert torch.allclose(calib.loss(net, 0), F.cross_entropy(net(x), y))


def test_self_distillation_is_zero_at_the_float_model_and_grows_when_weights_change():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    calib = Calibration([{"input_ids": IDS}])
    assert calib.loss(model, 0).item() == pytest.approx(0.0, abs=1e-6)  # KL(ref || out); ref cached
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
    ref, out = calib.reference(model, 0), calib.forward(model, 0)  # ref: still the float model's
    expected = F.kl_div(F.log_softmax(out, -1).reshape(-1, 50), F.log_softmax(ref, -1).reshape(-1, 50),
                        log_target=True, reduction="batchmean")
    assert expected > 1e-4
    assert calib.loss(model, 0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_hidden_state_outputs_use_mse():
    bert = BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                vocab_size=50)).eval()
    calib = Calibration([{"input_ids": IDS}])
    out = calib.forward(bert, 0)
    assert out.shape == (2, 6, 32)  # last_hidden_state
    assert torch.allclose(calib.loss(bert, 0, reference=out + 1.0), torch.tensor(1.0))


def test_nan_in_a_batch_names_the_batch_and_key():
    good = {"pixel_values": torch.zeros(1, 3)}
    bad = {"pixel_values": torch.tensor([[0.0, float("nan"), 1.0]])}
    with pytest.raises(ValueError, match=r"calibration batch 1, 'pixel_values': contains NaN"):
        Calibration([good, bad])
    with pytest.raises(ValueError, match=r"calibration batch 0, 'labels': contains Inf"):
        Calibration([torch.zeros(2, 3)], labels=[torch.tensor([1.0, float("inf")])])


def test_a_batch_the_model_rejects_names_forward_and_shapes():
    calib = Calibration([torch.randn(2, 7)])
    with pytest.raises(ValueError, match=r"calibration batch 0 does not fit Linear.forward\(input: torch.Tensor\).*\(2, 7\)"):
        calib.loss(nn.Linear(4, 3), 0)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.forward\(input_ids.*given dict \{tokens: \(2, 6\)"):
        Calibration([{"tokens": IDS}]).forward(GPT2, 0)


def test_hashes_are_stable_and_sensitive():
    a = Calibration([IDS.clone()])
    assert a.hash() == Calibration([IDS.clone()]).hash()
    assert a.hash() != Calibration([IDS + 1]).hash()
    assert a.hash() != Calibration([{"input_ids": IDS}]).hash()
    net = nn.Linear(3, 2)
    h = model_hash(net)
    assert h == model_hash(net) and len(h) == 64
    with torch.no_grad():
        net.weight[0, 0] += 1e-3
    assert model_hash(net) != h
