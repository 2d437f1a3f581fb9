"""``bitalloc demo``: the whole pipeline on a real (trained) Hugging Face model, with nothing downloaded.

A character-level GPT-2 is trained on the spot on the Python documentation text that ships inside every
CPython install (``pydoc_data.topics``), cached after the first run. It is
profiled (Hessian trace, Fisher, measured single-layer deltas), allocated with the ILP at the byte size of
uniform 4- and 3-bit quantization, and every plan is applied and
measured on held-out text: the table shows quality (perplexity) and bytes, predicted and measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from kernels import Choice

from .api import profile_model, solve_profiled, uniform_plan
from .budget import MIB, Budget
from .evaluate import evaluate
from .model import load_model, storage_bytes
from .quantize import load_quantized, quantized_bytes, save_quantized
from .report import format_table, stored_layer_bytes

VOCAB = 128
DEMO_PROFILERS = ("hessian", "fisher", "measured")


@dataclass(frozen=True)
class DemoSettings:
    """The demo model and its training run (small enough to train in about a minute on 2 cores)."""

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 600
    lr: float = 3e-3
    seed: int = 0
    calib_batches: int = 8
    eval_batches: int = 24

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def demo_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """Character ids (ASCII, clamped to 127) of CPython's bundled documentation topics: 90% train, 10% test."""
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = torch.tensor([min(ord(c), VOCAB - 1) for c in text], dtype=torch.long)
    split = int(len(ids) * 0.9)
    return ids[:split], ids[split:]


def demo_batches(ids: torch.Tensor, n: int, batch_size: int, seq_len: int, seed: int) -> list[dict]:
    """``n`` batches of random windows, as a tokenizer would give them, with labels for the LM loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=g)
        x = torch.stack([ids[s:s + seq_len] for s in starts])
        out.append({"input_ids": x, "labels": x.clone()})
    return out


def cache_root() -> Path:
    return Path(os.environ.get("BITALLOC_CACHE", Path.home() / ".cache" / "bitalloc"))


def train_demo_model(settings: DemoSettings = DemoSettings(), cache_dir: Path | None = None) -> nn.Module:
    """Train (or load from the cache) the demo's character-level GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = (cache_dir or cache_root()) / f"demo-gpt2-{settings.key()}"
    if (path / "config.json").is_file():
        return load_model(path)
    torch.manual_seed(settings.seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=settings.seq_len, n_embd=settings.n_embd, n_layer=settings.n_layer,
                        n_head=settings.n_head, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, attn_implementation="eager")
    model = GPT2LMHeadModel(config)
    train, _ = demo_corpus()
    batches = demo_batches(train, settings.steps, settings.batch_size, settings.seq_len, settings.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.steps, pct_start=0.1)
    model.train()
    bar = tqdm(batches, desc="training demo GPT-2", unit="step")
    for batch in bar:
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.save_pretrained(path)
    return load_model(path)


def run_demo(out_dir: str | os.PathLike = "bitalloc-demo", steps: int | None = None, bits: tuple[int, ...] = (2, 3, 4, 8),
             settings: DemoSettings | None = None, profilers: tuple[str, ...] = DEMO_PROFILERS) -> list[dict]:
    """Run the demo end to end; print the table and return its rows. Each profiler gets its own ILP plans;
    the last profiler's plan at the 3-bit size is the one saved."""
    settings = settings or DemoSettings()
    if steps is not None:
        settings = DemoSettings(**{**asdict(settings), "steps": steps})
    start = time.perf_counter()
    model = train_demo_model(settings)
    train, test = demo_corpus()
    calib = demo_batches(train, settings.calib_batches, 4, settings.seq_len, seed=10)
    held_out = demo_batches(test, settings.eval_batches, 8, settings.seq_len, seed=11)
    print(f"model: GPT-2, {settings.n_layer} layers x {settings.n_embd} wide, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters ({time.perf_counter() - start:.0f} s)")

    profiles = {}
    for name in profilers:
        print(f"profiling with {name} ...")
        profiles[name] = profile_model(model, calib, [Choice(b) for b in bits], profiler=name)
        print(f"  {len(profiles[name].graph)} layers in {profiles[name].profile.elapsed_s:.1f} s")
    first = profiles[profilers[0]]
    print(f"skipped layers: {first.graph.skipped or 'none'}")

    rows = [{"config": "float32", **_quality(model, held_out), "predicted_mib": None,
             "measured_mib": storage_bytes(model) / MIB, "avg_bits": 32.0}]
    plans = {f"uniform {b}-bit": uniform_plan(first, Choice(b)) for b in sorted((b for b in bits if b >= 3), reverse=True)}
    for name, profiled in profiles.items():
        for b in (4, 3):
            size = plans[f"uniform {b}-bit"].predicted["total_bytes"]
            plans[f"mixed ({name}) @ {b}-bit size"] = solve_profiled(profiled, Budget(memory_mb=size / MIB))
    for name, plan in tqdm(plans.items(), desc="applying and evaluating plans", unit="plan"):
        qmodel = plan.apply(model)
        measured = first.fixed_bytes + sum(quantized_bytes(qmodel).values())
        rows.append({"config": name, **_quality(qmodel, held_out), "avg_bits": plan.predicted["avg_bits"],
                     "predicted_mib": plan.predicted["total_bytes"] / MIB, "measured_mib": measured / MIB})

    chosen = plans[f"mixed ({profilers[-1]}) @ 3-bit size"]
    out = Path(out_dir)
    qmodel = chosen.apply(model)
    save_quantized(qmodel, out)
    reloaded = load_quantized(out)
    same = torch.equal(_logits(qmodel, held_out[0]), _logits(reloaded, held_out[0]))
    on_disk = sum(stored_layer_bytes(out / "model.safetensors", chosen).values())

    fp = rows[0]["perplexity"]
    for r in rows:
        r["delta_ppl"] = r["perplexity"] - fp
    print()
    print(format_table(rows, [("config", "config", "s"), ("avg_bits", "avg bits", ".3f"),
                              ("predicted_mib", "predicted MiB", ".4f"), ("measured_mib", "measured MiB", ".4f"),
                              ("loss", "test loss", ".4f"), ("perplexity", "test ppl", ".4f"), ("delta_ppl", "d ppl", "+.4f")]))
    print()
    for name in profilers:
        for b in (4, 3):
            u, m = _row(rows, f"uniform {b}-bit"), _row(rows, f"mixed ({name}) @ {b}-bit size")
            verdict = "beats" if m["perplexity"] < u["perplexity"] else "does NOT beat"
            print(f"at the size of uniform {b}-bit ({u['measured_mib']:.4f} MiB) the {name} plan {verdict} uniform: "
                  f"ppl {m['perplexity']:.4f} vs {u['perplexity']:.4f}")
    print(f"bits of the saved plan ({chosen.profiler['name']} @ 3-bit size): " + ", ".join(f"{layer.name.replace('transformer.', '')}={layer.bits}" for layer in chosen.layers))
    print(f"wrote {out / 'plan.json'} and the quantized model to {out}/ (quantized layers: predicted "
          f"{chosen.predicted['layer_bytes']:,} B, on disk {on_disk:,} B); reloaded outputs identical: {same}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return rows


def _row(rows: list[dict], name: str) -> dict:
    return next(r for r in rows if r["config"] == name)


def _quality(model: nn.Module, batches: list[dict]) -> dict:
    q = evaluate(model, batches)
    return {"loss": q["loss"], "perplexity": q["perplexity"]}


@torch.no_grad()
def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"]).logits
