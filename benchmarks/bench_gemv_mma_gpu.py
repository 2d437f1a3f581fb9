"""Check and time the tensor-core decode kernel (`Config(mma=True)`, 2..6-bit) against the default kernel (the
CUDA-core GEMV / batch kernels, or the tensor-core one where it is the default), the CUDA-core kernel
(`--compare`) and cuBLAS bf16, in one run: L2 flushed, graph replay, median of --reps.
Writes mma.json and mma.txt under --out."""
from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import QuantSpec, quantize  # noqa: E402
from kernels import triton_linear as tlin  # noqa: E402
from kernels.gpu_layout import repack_for_gpu  # noqa: E402
from kernels.latency import l2_flush_buffer, time_cuda  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (28672, 8192)]


def check(gen: torch.Generator, bits_list: list[int], gluon: bool = False) -> list[str]:
    """Relative errors vs float64 of the mma kernel and the default kernel on odd shapes, groups, zero points."""
    lines = []
    for bits in bits_list:
        for n, k, g, sym in [(64, 256, 128, True), (67, 203, 32, False), (45, 600, None, True), (130, 512, 64, False),
                             (257, 1024, 256, True), (40, 384, 128, False), (300, 4096, 128, True)]:
            w = torch.randn(n, k, device="cuda", generator=gen)
            qt = quantize(w, QuantSpec(bits, g, sym, "bfloat16"), clip_search=False)
            gw = repack_for_gpu(qt, "cuda")
            for m in (1, 3, 8):
                configs = [tlin.Config(1 if m == 1 else 4 if m <= 4 else 8, 64, 3, 4, 1, mma=True, gluon=g)
                           for g in ([False, True] if gluon else [False])]
                configs += [tlin.Config(8, 256, 1, 4, 1, mma=True), tlin.Config(8, 128, 2, 2, 1, mma=True)]
                for cfg in configs:
                    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16() + (30 if n == 40 else 0)
                    ref = x.double() @ qt.dequantize(torch.float64).t()
                    y = tlin.linear(x, gw, cfg)
                    y0 = tlin.linear(x, gw)
                    e = float((y.double() - ref).norm() / ref.norm())
                    e0 = float((y0.double() - ref).norm() / ref.norm())
                    ok = e < max(2 * e0, 5e-3)
                    lines.append(f"check bits={bits} n={n} k={k} g={g} sym={sym} m={m} {cfg.label}: mma {e:.2e} "
                                 f"default {e0:.2e} {'OK' if ok else 'FAIL'}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--tokens", default="1,4,8,16")
    ap.add_argument("--bits", default="2,3,4,5,6")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--tiles", default="128x2,128x4,256x2,256x4", help="columns per program x warps")
    ap.add_argument("--waves", default="4,8", help="programs per SM that set the K-split")
    ap.add_argument("--stages", default="1", help="software-pipelining stages (num_stages)")
    ap.add_argument("--gluon", action="store_true", help="also check and time the Gluon kernel (Config(gluon=True))")
    ap.add_argument("--no-check", action="store_true")
    a = ap.parse_args()
    bits_list = [int(b) for b in a.bits.split(",")]
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    tiles = [tuple(map(int, t.split("x"))) for t in a.tiles.split(",")]
    waves_list = [int(v) for v in a.waves.split(",")]
    stages_list = [int(v) for v in a.stages.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.time()
    lines = [f"device {torch.cuda.get_device_name()} torch {torch.__version__}"]
    lines += [] if a.no_check else check(gen, bits_list, a.gluon)
    fails = sum("FAIL" in s for s in lines)
    lines.append(f"checks: {fails} failed, {time.time() - t0:.0f} s")
    print("\n".join(lines[-3:]), flush=True)
    flush = l2_flush_buffer("cuda")
    rows = []
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", generator=gen)
        wb = w.bfloat16()
        for bits in bits_list:
            qt = quantize(w, QuantSpec(bits, 128, True, "bfloat16"), clip_search=False)
            gw = repack_for_gpu(qt, "cuda")
            blocks = gw.planes[0].shape[0] // 16
            for m in map(int, a.tokens.split(",")):
                x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
                bf16 = time_cuda(lambda v: F.linear(v, wb), x, a.reps, flush)
                base = time_cuda(lambda v: tlin.linear(v, gw), x, a.reps, flush)
                core = tlin.default_config(m, gw, torch.float16)  # the CUDA-core kernel's tile
                cuda_core = time_cuda(lambda v: tlin.linear(v, gw, core), x, a.reps, flush)
                best = None
                best_of = {}
                for (bn, warps), waves, stages, gluon in product(tiles, waves_list, stages_list,
                                                                 [False, True] if a.gluon else [False]):
                    split = tlin.split_for(-(-n // bn), blocks, waves)
                    cfg = tlin.Config(m, bn, split, warps, stages, mma=True, gluon=gluon)
                    try:
                        ms = time_cuda(lambda v: tlin.linear(v, gw, cfg), x, a.reps, flush)
                    except Exception as e:  # noqa: BLE001 (a tile that does not compile is reported, not fatal)
                        lines.append(f"{n}x{k} b{bits} m{m} {cfg.label}: {type(e).__name__} {str(e)[:120]}")
                        continue
                    rows.append(dict(n=n, k=k, bits=bits, m=m, cfg=cfg.label, ms=ms, bf16_ms=bf16, base_ms=base,
                                     cuda_core_ms=cuda_core))
                    if best is None or ms < best[0]:
                        best = (ms, cfg.label)
                    if gluon not in best_of or ms < best_of[gluon][0]:
                        best_of[gluon] = (ms, cfg.label)
                s = (f"{n}x{k} b{bits} m{m}: bf16 {bf16 * 1e3:.1f} us, default {base * 1e3:.1f} us "
                     f"({bf16 / base:.2f}x bf16), CUDA-core {cuda_core * 1e3:.1f} us, mma best {best[0] * 1e3:.1f} us "
                     f"{best[1]} ({bf16 / best[0]:.2f}x bf16, {cuda_core / best[0]:.2f}x CUDA-core)")
                if a.gluon and len(best_of) == 2:
                    s += (f"; triton mma {best_of[False][0] * 1e3:.1f} us {best_of[False][1]}, "
                          f"gluon {best_of[True][0] * 1e3:.1f} us {best_of[True][1]} "
                          f"({best_of[False][0] / best_of[True][0]:.2f}x triton mma)")
                lines.append(s)
                print(s, flush=True)
    (out / "mma.txt").write_text("\n".join(lines) + "\n")
    (out / "mma.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
