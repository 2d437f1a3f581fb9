"""One-token decode: the dp4a kernel (`Config(dp4a=True)`) against today's best tile and cuBLAS bf16, in one run.

For each LLM shape and bit width (group 128, symmetric, bf16): every dp4a tile below and every tile a latency table
tries (`tile_candidates`) is checked against float64 and timed (CUDA graph replay, L2 flushed, median of --reps);
with --imma, also the decode on int8 tensor cores (`kernels/gluon_imma.py`, `Config(imma=True)`) at IMMA_TILES,
without and with the next block's prefetch; --no-sweep times only the table's tiles. --tokens times that many
tokens (the int8 tensor-core decode takes up to 16 in one launch, 8 with half-block groups; the dp4a decode runs a
program per token).
cuBLAS bf16 is timed before and after each shape's sweep, and ratios are against the mean of the two. Bandwidth
is (weight + scales + x + y bytes) / time over the measured copy bandwidth.
Lines are appended to --out/dp4a.txt as they are measured; dp4a.json at the end.
    python benchmarks/bench_dp4a_gpu.py --out $OUT [--shapes 28672x8192,8192x8192] [--bits 2,4] [--imma]
        [--tokens 1] [--no-sweep]
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import QuantSpec, quantize  # noqa: E402
from kernels import triton_linear as tlin  # noqa: E402
from kernels.gpu_layout import repack_for_gpu  # noqa: E402
from kernels.latency import l2_flush_buffer, time_cuda  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels_gpu import copy_bandwidth  # noqa: E402

SHAPES = "28672x8192,8192x8192,4096x14336,14336x4096,4096x4096"
DP4A_TILES = ((256, 2), (512, 4), (256, 4), (512, 8), (128, 2), (128, 4))  # (columns per program, warps)
WAVES = (4, 6, 8, 12, 16, 32)
IMMA_TILES = ((128, 4), (64, 2), (128, 2), (256, 4), (64, 4), (32, 1))  # (columns per program, warps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--bits", default="2,3,4,5,6,8")
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--imma", action="store_true", help="also the int8 tensor-core decode (kernels/gluon_imma.py)")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--no-sweep", action="store_true", help="only the tiles a latency table tries")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "dp4a.txt", "a")

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()
    flush = l2_flush_buffer("cuda")
    bw = copy_bandwidth(flush)
    say(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {tlin.triton.__version__}; "
        f"copy bandwidth {bw / 1e12:.2f} TB/s")
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in (tuple(map(int, s.split("x"))) for s in args.shapes.split(",")):
        w = torch.randn(n, k, device="cuda", generator=gen)
        wb = w.bfloat16()
        x = torch.randn(args.tokens, k, device="cuda", generator=gen).bfloat16()
        bf16_before = time_cuda(lambda x: F.linear(x, wb), x, args.reps, flush, graph=True)
        shape_rows = []
        for bits in (int(b) for b in args.bits.split(",")):
            qt = quantize(w, QuantSpec(bits, 128, True, "bfloat16"), clip_search=False)
            gw = repack_for_gpu(qt, "cuda")
            ref = (x.double() @ qt.dequantize(torch.float64).t().to("cuda")).cpu()
            blocks = gw.planes[0].shape[0] // 16
            candidates = tlin.tile_candidates(args.tokens, gw, torch.bfloat16)
            best = {}

            def run(family: str, fns: dict) -> None:
                for label, fn in fns.items():
                    try:
                        y = fn(x)
                        err = float((y.double().cpu() - ref).norm() / ref.norm())
                        if not err < 6e-3:
                            say(f"{n}x{k} w{bits} {label}: rel err {err:.2e} REJECTED")
                            continue
                        ms = time_cuda(fn, x, args.reps, flush, graph=True)
                    except Exception as e:  # noqa: BLE001 - report and go on
                        say(f"{n}x{k} w{bits} {label}: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    if family not in best or ms < best[family][0]:
                        best[family] = (ms, label, err)
            run("best_today", {c.label: partial(tlin.linear, gw=gw, config=c) for c in candidates})
            if not args.no_sweep:
                run("dp4a", {c.label: partial(tlin.linear, gw=gw, config=c) for c in (
                    tlin.Config(1, bn, tlin.split_for(-(-n // bn), blocks, waves), warps, 1, dp4a=True)
                    for bn, warps in DP4A_TILES for waves in WAVES)})
            for family, stages in (("imma", 1), ("imma_prefetch", 2))[:2 * args.imma * (not args.no_sweep)]:
                run(family, {c.label: partial(tlin.linear, gw=gw, config=c) for c in (
                    tlin.Config(args.tokens, bn, split, warps, stages, imma=True)
                    for bn, warps in IMMA_TILES for split in sorted({tlin.split_for(-(-n // bn), blocks, waves)
                                                                     for waves in WAVES}))})
            nbytes = gw.nbytes + 2 * args.tokens * (n + k)
            row = dict(N=n, K=k, bits=bits, bytes=nbytes,
                       **{f: dict(us=v[0] * 1e3, tile=v[1], err=v[2], bw_frac=nbytes / (v[0] * 1e-3) / bw)
                          for f, v in best.items()})
            shape_rows.append(row)
            say(f"{n}x{k} w{bits}: " + " ".join(
                f"{f} {v[0] * 1e3:.1f}us ({v[1]}, err {v[2]:.1e}, {row[f]['bw_frac']:.0%} of copy bw)"
                for f, v in best.items()))
            del qt
        bf16_after = time_cuda(lambda x: F.linear(x, wb), x, args.reps, flush, graph=True)
        base = (bf16_before + bf16_after) / 2
        say(f"{n}x{k}: bf16 {bf16_before * 1e3:.1f}us before, {bf16_after * 1e3:.1f}us after "
            f"({2 * n * k / (base * 1e-3) / bw:.0%} of copy bw)")
        for row in shape_rows:
            row.update(bf16_us=base * 1e3, bf16_before_us=bf16_before * 1e3, bf16_after_us=bf16_after * 1e3)
            say(f"{n}x{k} w{row['bits']} vs bf16 {base * 1e3:.1f}us: " + " ".join(
                f"{f} {base * 1e3 / v['us']:.2f}x" for f, v in row.items() if isinstance(v, dict)))
        rows.extend(shape_rows)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=tlin.triton.__version__,
                copy_bw_TBps=bw / 1e12)
    (out / "dp4a.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
