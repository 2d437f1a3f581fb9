"""Decode latency of the ~1B Llama (bench_model_gpu's config, random weights) eager vs `torch.compile(fullgraph=True)`,
for the bfloat16 model and a uniform w4 (group 128) one, in one run: each forward captured in a CUDA graph and
replayed with the L2 flushed (`kernels.model_latency.time_forward`), so the two differ only in what torch.compile
fuses around the quantized layers (`kernels.ops`: each one custom op). Also checks that the compiled logits match
the eager ones. Writes compile.json under --out as it goes."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_model_gpu import build_model  # noqa: E402
from kernels import QuantSpec, quantize_module  # noqa: E402
from kernels.model_latency import default_inputs, time_forward  # noqa: E402


def quantize_linears(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Every nn.Linear (lm_head included) replaced by its quantized module, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantize_module(module, spec))
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": a.tokens, "runs": {}}
    for variant in ("bf16", "w4"):
        t0 = time.perf_counter()
        model, _ = build_model(False, torch.device("cuda"), torch.bfloat16)
        if variant == "w4":
            quantize_linears(model, QuantSpec(4, 128))
        batch = default_inputs(model)(a.tokens)
        with torch.no_grad():
            eager_logits = model(**batch).logits.float()
            eager = time_forward(model, a.tokens, "cuda", a.reps)
            compiled = torch.compile(model, fullgraph=True)
            logits = compiled(**batch).logits.float()
            compile_s = time.perf_counter() - t0
            fast = time_forward(compiled, a.tokens, "cuda", a.reps)
        err = float((logits - eager_logits).norm() / eager_logits.norm())
        result["runs"][variant] = dict(eager_ms=eager.ms, compiled_ms=fast.ms, eager_mode=eager.mode,
                                       compiled_mode=fast.mode, rel_err_vs_eager=err, setup_and_compile_s=compile_s)
        print(variant, result["runs"][variant], flush=True)
        (out / "compile.json").write_text(json.dumps(result, indent=1))
        del model, compiled
        torch.cuda.empty_cache()
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
