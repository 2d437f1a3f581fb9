"""The wgmma prefill (`kernels.gluon_wgmma`) at hundreds of tokens: checked against float64, timed against cuBLAS bf16,
dequantize + cuBLAS and the Triton GEMM that `default_config` picks, all in one run with the L2 flushed between
timings. Each tile is checked --checks times, its output poisoned with NaN first (a race shows as an occasional wrong
call, an unwritten tile as NaN), and dropped, with the error in the table, above 5e-3 relative error (right is about
2e-3). Writes wgmma.json and wgmma.md to --out.
    python benchmarks/bench_wgmma_gpu.py --out $OUT [--shapes 28672x8192,...] [--bits 2,3,4,8] [--tokens 128,512]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import QuantSpec, quantize  # noqa: E402
from kernels import gluon_wgmma  # noqa: E402
from kernels import triton_linear as tlin  # noqa: E402
from kernels.gpu_layout import repack_for_gpu  # noqa: E402
from kernels.latency import l2_flush_buffer, time_cuda  # noqa: E402
from bench_kernels_gpu import poisoned, rel_err  # noqa: E402  (this directory is on sys.path when run as a script)

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (28672, 8192))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--tokens", default="128,512")
    ap.add_argument("--tiles", default="", help="block_m:num_warps:stages[:split_k],... (default: gluon_wgmma.TILES, "
                    "each at every split of gluon_wgmma.SPLITS)")
    ap.add_argument("--checks", type=int, default=3, help="calls checked against float64 per tile (a race shows "
                    "as an occasional wrong call)")
    args = ap.parse_args()
    shapes = SHAPES if args.shapes == "all" else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    tiles = ([tuple(int(v) for v in (t + ":1").split(":")[:4]) for t in args.tiles.split(",")] if args.tiles else
             [(*t, split) for t in gluon_wgmma.TILES for split in gluon_wgmma.SPLITS])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flush = l2_flush_buffer("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = torch.cuda.get_device_name()
    print(f"device {dev}; torch {torch.__version__}; triton {tlin.triton.__version__}", flush=True)
    rows = []
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", generator=gen)
        w_bf16 = w.to(torch.bfloat16)
        for bits in (int(b) for b in args.bits.split(",")):
            qt = quantize(w, QuantSpec(bits, 128, True, "bfloat16"), clip_search=False)
            gw = repack_for_gpu(qt, "cuda")
            wdq = qt.dequantize(torch.float64)
            for m in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
                ref = x.double() @ wdq.t()
                row = dict(shape=[n, k], bits=bits, tokens=m,
                           bf16=time_cuda(lambda x: F.linear(x, w_bf16), x, args.reps, flush),
                           dequant_cublas=time_cuda(lambda x: tlin.dequant_matmul(x, gw), x, args.reps, flush),
                           triton_default=time_cuda(lambda x: tlin.linear(x, gw), x, args.reps, flush),
                           wgmma={}, errors={})
                for bm, warps, stages, split in tiles:
                    label = f"m{bm}w{warps}p{stages}" + (f"s{split}" if split > 1 else "")
                    fn = lambda x, t=(bm, warps, stages, split): gluon_wgmma.linear(x, gw, *t)  # noqa: E731
                    try:
                        err = max(rel_err(poisoned(fn, x, ref.numel()), ref) for _ in range(args.checks))
                    except Exception as ex:  # noqa: BLE001 - reported in the table
                        row["errors"][label] = f"{type(ex).__name__}: {str(ex)[:300]}"
                        continue
                    if err > 5e-3:
                        row["errors"][label] = f"rel err {err:.2e}"
                        continue
                    row["wgmma"][label] = time_cuda(fn, x, args.reps, flush)
                    row.setdefault("rel_err", {})[label] = err
                best = min(row["wgmma"].items(), key=lambda kv: kv[1], default=(None, float("nan")))
                row["best"] = best[0]
                print(f"{n}x{k} {bits}-bit {m} tokens: bf16 {row['bf16'] * 1e3:.1f} us, dequant+cuBLAS "
                      f"{row['dequant_cublas'] * 1e3:.1f}, triton {row['triton_default'] * 1e3:.1f}, wgmma {best[0]} "
                      f"{best[1] * 1e3:.1f} (x bf16 {row['bf16'] / best[1]:.2f}); all "
                      + ", ".join(f"{lbl} {t * 1e3:.1f}" for lbl, t in row["wgmma"].items())
                      + ("; errors " + json.dumps(row["errors"]) if row["errors"] else ""), flush=True)
                rows.append(row)
    (out / "wgmma.json").write_text(json.dumps(dict(device=dev, torch=torch.__version__,
                                                    triton=tlin.triton.__version__, rows=rows), indent=1))
    lines = [f"# wgmma prefill, {dev}, torch {torch.__version__}, triton {tlin.triton.__version__}", "",
             "Microseconds, median of the reps (CUDA-graph replays), L2 flushed before each; x bf16 = bf16 time / best wgmma time.", "",
             "| shape | bits | tokens | bf16 | dequant + cuBLAS | Triton default | wgmma best (tile) | x bf16 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["wgmma"].get(r["best"], float("nan"))
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['bits']} | {r['tokens']} | {r['bf16'] * 1e3:.1f} | "
                     f"{r['dequant_cublas'] * 1e3:.1f} | {r['triton_default'] * 1e3:.1f} | {t * 1e3:.1f} ({r['best']}) "
                     f"| {r['bf16'] / t:.2f} |")
    (out / "wgmma.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
