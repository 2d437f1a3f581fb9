"""How a layer's isolated table entry relates to its cost inside a sequence of layers, on one GPU.

The latency table times each (shape, choice, tokens) alone: one graph replay after an L2 flush, which carries a
fixed launch cost a whole-model graph pays once. This script builds the linears of the ~1B Llama of
`bench_model_gpu.py` in model order (distinct random weights, so no layer finds another's weights in L2), and
for bf16 cuBLAS and each quantized choice compares:
- the sum of isolated entries (`time_cuda`, as `measure` does), raw and less `replay_overhead_ms` per layer;
- the measured replay of all layers in one graph (one flush before it).
It also times graphs of 1 and 64 trivial kernels (torch and Triton), which split the replay overhead into a
fixed part per graph and a gap per kernel. Writes sequence.json under --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import QuantSpec, quantize  # noqa: E402
from kernels import triton_linear as tlin  # noqa: E402
from kernels.gpu_layout import repack_for_gpu  # noqa: E402
from kernels.latency import cuda_graph, l2_flush_buffer, replay_overhead_ms, time_cuda, time_events  # noqa: E402

HIDDEN, INTER, KV, VOCAB, BLOCKS = 2048, 8192, 512, 32000, 16


def model_shapes() -> list[tuple[int, int]]:
    """(out, in) of every linear of the ~1B Llama, in forward order."""
    block = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTER, HIDDEN), (INTER, HIDDEN),
             (HIDDEN, INTER)]
    return block * BLOCKS + [(VOCAB, HIDDEN)]


@tlin.triton.jit
def _touch(p):
    tlin.tl.store(p, tlin.tl.load(p) + 1.0)


def chain_ms(step, n: int, flush: torch.Tensor, reps: int) -> float:
    replay = cuda_graph(lambda: [step() for _ in range(n)])
    return time_events(replay, reps, flush)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    flush = l2_flush_buffer("cuda")
    one = torch.zeros(1, device="cuda")
    res: dict = dict(device=torch.cuda.get_device_name(), replay_overhead_ms=replay_overhead_ms("cuda", 50, flush))
    for name, step in (("torch", lambda: one.add_(1)), ("triton", lambda: _touch[(1,)](one))):
        t1, t64 = chain_ms(step, 1, flush, 50), chain_ms(step, 64, flush, 50)
        res[f"trivial_{name}"] = dict(t1=t1, t64=t64, gap=(t64 - t1) / 63, fixed=t1 - (t64 - t1) / 63)
        print(name, res[f"trivial_{name}"], flush=True)
    shapes = model_shapes()
    x = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (HIDDEN, INTER)}
    gen = torch.Generator(device="cuda").manual_seed(0)
    paths = {"bf16": None, **{f"w{b}": int(b) for b in args.bits.split(",")}}
    for label, bits in paths.items():
        fns = []
        for n, k in shapes:
            w = torch.randn(n, k, device="cuda", generator=gen)
            if bits is None:
                wb = w.bfloat16()
                fns.append((n, k, lambda xx, wb=wb: F.linear(xx, wb)))
            else:
                gw = repack_for_gpu(quantize(w, QuantSpec(bits, 128, True, "bfloat16"), clip_search=False), "cuda")
                fns.append((n, k, lambda xx, gw=gw: tlin.linear(xx, gw)))
            del w
        iso: dict[tuple[int, int], float] = {}
        for n, k, fn in fns:
            if (n, k) not in iso:
                iso[(n, k)] = time_cuda(fn, x[k], args.reps, flush)
        iso_sum = sum(iso[(n, k)] for n, k, _ in fns)
        seq = chain_ms(lambda: [fn(x[k]) for n, k, fn in fns], 1, flush, args.reps)
        row = dict(layers=len(fns), isolated_sum=iso_sum, corrected=iso_sum - len(fns) * res["replay_overhead_ms"],
                   sequence=seq, per_layer_gap=(seq - (iso_sum - len(fns) * res["replay_overhead_ms"])) / len(fns),
                   isolated={f"{n}x{k}": v for (n, k), v in iso.items()})
        res[label] = row
        print(label, {a: b for a, b in row.items() if a != "isolated"}, flush=True)
        del fns
        torch.cuda.empty_cache()
    res["seconds"] = time.time() - t0
    (out / "sequence.json").write_text(json.dumps(res, indent=1))
    print(f"done in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
