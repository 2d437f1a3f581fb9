"""The three trained networks of the profiler benchmark, each trained here on data that ships in a package.

- ``gpt``:  a character-level GPT-2 (HF GPT2LMHeadModel) on CPython's bundled ``pydoc_data.topics`` text.
- ``bert``: a character-level BERT masked LM (HF BertForMaskedLM) on the same text, 15% of characters masked.
- ``cnn``:  a small CNN classifying scikit-learn's bundled 8x8 handwritten digits (``load_digits``).

Weights are cached under $BITALLOC_CACHE (default ~/.cache/bitalloc), keyed by the model's settings.
The character corpus, LM batches and cache directory are the demo's (`allocator.demo`; importing allocator
needs no PuLP, so this also runs on the GPU machine).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocator.demo import VOCAB, cache_root  # noqa: E402
from allocator.demo import demo_batches as lm_batches  # noqa: E402
from allocator.demo import demo_corpus as char_corpus  # noqa: E402

MASK_ID = VOCAB      # the BERT mask token, one past the characters


@dataclass
class Task:
    """A trained model with its calibration and held-out data (lists of batches as the model's forward takes them)."""

    name: str
    description: str
    model: nn.Module
    calib: list
    held_out: list
    labels: list | None = None          # per-batch labels for tensor batches (the CNN); dict batches carry theirs
    held_out_labels: list | None = None


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def mlm_batches(ids: torch.Tensor, n: int, batch_size: int, seq_len: int, seed: int, rate: float = 0.15) -> list[dict]:
    """Random windows with `rate` of the characters replaced by the mask token; labels only at masked places."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for batch in lm_batches(ids, n, batch_size, seq_len, seed):
        x = batch["input_ids"]
        masked = torch.rand(x.shape, generator=g) < rate
        masked[:, 0] |= ~masked.any(1)  # at least one masked character per row
        out.append({"input_ids": torch.where(masked, MASK_ID, x), "labels": torch.where(masked, x, -100)})
    return out


def train(model: nn.Module, batches: list, labels: list | None, lr: float) -> nn.Module:
    """AdamW with a one-cycle schedule, one step per batch; HF models take labels in the batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=len(batches), pct_start=0.1)
    model.train()
    for i, batch in enumerate(batches):
        loss = F.cross_entropy(model(batch), labels[i]) if labels is not None else model(**batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model.eval()


def cached_or_trained(name: str, settings: dict, build, fit) -> nn.Module:
    """build() the architecture; load its weights from the cache, else fit(model) and store them."""
    path = cache_root() / f"bench-{name}-{settings_key(settings)}.pt"
    torch.manual_seed(settings["seed"])
    model = build()
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.eval()
    fit(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval()


def gpt_task(quick: bool) -> Task:
    from transformers import GPT2Config, GPT2LMHeadModel

    s = {"n_layer": 4, "n_embd": 64, "n_head": 4, "seq_len": 64, "batch": 16, "steps": 250, "lr": 3e-3, "seed": 0}

    def build():
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=s["seq_len"], n_embd=s["n_embd"], n_layer=s["n_layer"],
                                          n_head=s["n_head"], bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                                          attn_implementation="eager"))

    train_ids, test_ids = char_corpus()
    model = cached_or_trained("gpt", s, build, lambda m: train(m, lm_batches(train_ids, s["steps"], s["batch"], s["seq_len"], 1), None, s["lr"]))
    n_cal = 4 if quick else 8
    return Task("gpt", f"char GPT-2, {s['n_layer']} layers x {s['n_embd']}, pydoc_data text, {s['steps']} steps", model,
                lm_batches(train_ids, n_cal, 8, s["seq_len"], 10), lm_batches(test_ids, 16, 16, s["seq_len"], 11))


def bert_task(quick: bool) -> Task:
    from transformers import BertConfig, BertForMaskedLM

    s = {"layers": 2, "hidden": 64, "heads": 4, "ffn": 128, "seq_len": 64, "batch": 32, "steps": 2000, "lr": 2e-3, "seed": 0}

    def build():
        return BertForMaskedLM(BertConfig(vocab_size=VOCAB + 1, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                                          num_attention_heads=s["heads"], intermediate_size=s["ffn"],
                                          max_position_embeddings=s["seq_len"], pad_token_id=0, attn_implementation="eager"))

    train_ids, test_ids = char_corpus()
    model = cached_or_trained("bert", s, build, lambda m: train(m, mlm_batches(train_ids, s["steps"], s["batch"], s["seq_len"], 1), None, s["lr"]))
    n_cal = 4 if quick else 8
    return Task("bert", f"char BERT masked LM, {s['layers']} layers x {s['hidden']}, pydoc_data text, 15% masked, {s['steps']} steps",
                model, mlm_batches(train_ids, n_cal, 16, s["seq_len"], 10), mlm_batches(test_ids, 16, 32, s["seq_len"], 11))


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions (8x8 -> 4x4 after one 2x2 pool) and two linear layers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cnn_task(quick: bool) -> Task:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    s = {"epochs": 15, "batch": 32, "lr": 3e-3, "seed": 0}
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)

    def fit(model):
        g = torch.Generator().manual_seed(1)
        order = [torch.randperm(len(x_tr), generator=g) for _ in range(s["epochs"])]
        idx = [p[i:i + s["batch"]] for p in order for i in range(0, len(p), s["batch"])]
        train(model, [x_tr[i] for i in idx], [y_tr[i] for i in idx], s["lr"])

    model = cached_or_trained("cnn", s, DigitsCNN, fit)
    n_cal = 4 if quick else 8
    chunks = lambda t, n: list(t.split(n))  # noqa: E731
    return Task("cnn", f"CNN (3 conv + 2 linear), sklearn digits 8x8, {s['epochs']} epochs", model,
                chunks(x_tr[:64 * n_cal], 64), chunks(x_te, 150), chunks(y_tr[:64 * n_cal], 64), chunks(y_te, 150))


TASKS = {"gpt": gpt_task, "bert": bert_task, "cnn": cnn_task}
