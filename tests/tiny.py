"""Tiny models and calibration data shared by the tests (random weights, built from configs: no downloads)."""

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 96
FAST = {"max_probes": 16, "min_probes": 8}  # quick Hutchinson settings


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-block GPT-2 (n_embd 64): 8 quantizable layers, lm_head tied to the embedding."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4, attn_implementation="eager")
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-block Llama (hidden 64, 4 heads, 2 KV heads, untied lm_head): 15 quantizable layers."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def lm_batches(n: int = 3, seed: int = 0, batch_size: int = 2, seq_len: int = 16) -> list[dict]:
    """Language-model batches as a tokenizer gives them, with labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def save_model_and_calib(root: Path, batch_size: int = 2) -> Path:
    """``root/model`` (save_pretrained) and ``root/calib.pt`` (3 batches), as a user would have them on disk."""
    tiny_gpt2().save_pretrained(root / "model")
    torch.save(lm_batches(3, batch_size=batch_size), root / "calib.pt")
    return root


JOB = {"model": "model", "calib": "calib.pt", "bits": [2, 4, 8], "profiler_settings": FAST, "budget": {"avg_bits": 4}}


def reference_plan(root: Path):
    """What the in-process ``allocate()`` gives for the saved model and calibration under JOB's settings."""
    from allocator import Budget, allocate

    model = GPT2LMHeadModel.from_pretrained(root / "model")
    return allocate(model, torch.load(root / "calib.pt"), Budget(avg_bits=4), bits=(2, 4, 8), profiler_settings=FAST)


@contextmanager
def one_torch_thread():
    """Cap torch at one thread (CI's 2 cores are shared with Ray workers), restoring it afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def env_vars(**env: str):
    """Set environment variables for the block, then restore (or remove) them."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
