"""The integer decodes' L2 prefetch (`dp4a_linear.L2_PREFETCH_BYTES`) swept against itself and cuBLAS bf16, in one run.

The dp4a and int8 tensor-core decodes are two launches: `prepare_x` (x as fixed-point digits, a few us of one warp
per K block) and then the GEMV, which cannot start its sums until the digits are written. The DRAM idles
meanwhile. With a prefetch budget, the prep kernel first asks L2 (`cp.async.bulk.prefetch.L2`, sm_90+) for the
first word rows of every K-slice the GEMV will read, so its first loads hit L2.
For each shape and bit width (group 128, symmetric, bf16; --tokens tokens): every tile a latency table tries
(`tile_candidates`) is checked against float64 and timed with no prefetch ("today"); the dp4a and int8 tiles
among them again at each --budgets value (MiB), interleaved per tile, each checked again (--integer-only: only
the dp4a and int8 tiles, "today" the best of them). CUDA graph replay, L2 flushed before each run, median of
--reps. cuBLAS bf16 before and after each shape; ratios against their mean.
Lines go to --out/l2_prefetch.txt as measured; l2_prefetch.json at the end.
    python benchmarks/bench_l2_prefetch_gpu.py --out $OUT [--shapes 28672x8192] [--bits 2,4] [--budgets 8,16,32]
        [--integer-only]
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
from kernels import dp4a_linear as dl  # noqa: E402
from kernels import triton_linear as tlin  # noqa: E402
from kernels.gpu_layout import repack_for_gpu  # noqa: E402
from kernels.latency import L2_FLUSH_BYTES, time_cuda  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels_gpu import copy_bandwidth  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--bits", default="2,3,4,5,6,8")
    ap.add_argument("--shapes", default="28672x8192,8192x8192")
    ap.add_argument("--budgets", default="8,16,24,32", help="prefetch budgets to try, MiB")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--integer-only", action="store_true", help="time only the dp4a and int8 tiles (faster)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "l2_prefetch.txt", "a")

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
    bw = copy_bandwidth(flush)
    budgets = [0] + [int(b) for b in args.budgets.split(",")]
    say(f"device {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {tlin.triton.__version__}; "
        f"copy bandwidth {bw / 1e12:.2f} TB/s; {args.tokens} token(s); budgets {budgets} MiB")
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
            best: dict[str, tuple[float, str]] = {}
            for cfg in tlin.tile_candidates(args.tokens, gw, torch.bfloat16):
                if args.integer_only and not (cfg.dp4a or cfg.imma):
                    continue
                fn = partial(tlin.linear, gw=gw, config=cfg)
                for mib in budgets if (cfg.dp4a or cfg.imma) else [0]:
                    dl.L2_PREFETCH_BYTES = mib << 20
                    try:
                        err = float((fn(x).double().cpu() - ref).norm() / ref.norm())
                        if not err < 6e-3:
                            say(f"{n}x{k} w{bits} {cfg.label} {mib} MiB: rel err {err:.2e} REJECTED")
                            continue
                        ms = time_cuda(fn, x, args.reps, flush, graph=True)
                    except Exception as e:  # noqa: BLE001 - report and go on
                        say(f"{n}x{k} w{bits} {cfg.label}: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    key = "today" if mib == 0 else f"{mib} MiB"
                    if key not in best or ms < best[key][0]:
                        best[key] = (ms, cfg.label)
            nbytes = gw.nbytes + 2 * args.tokens * (n + k)
            row = dict(N=n, K=k, bits=bits, bytes=nbytes, **{key: dict(us=v[0] * 1e3, tile=v[1],
                                                                       bw_frac=nbytes / (v[0] * 1e-3) / bw)
                                                             for key, v in best.items()})
            shape_rows.append(row)
            say(f"{n}x{k} w{bits}: " + " ".join(f"{key} {v[0] * 1e3:.1f}us ({v[1]}, {row[key]['bw_frac']:.0%})"
                                                 for key, v in best.items()))
        bf16_after = time_cuda(lambda x: F.linear(x, wb), x, args.reps, flush, graph=True)
        base = (bf16_before + bf16_after) / 2
        say(f"{n}x{k}: bf16 {bf16_before * 1e3:.1f}us before, {bf16_after * 1e3:.1f}us after")
        for row in shape_rows:
            row.update(bf16_us=base * 1e3, bf16_before_us=bf16_before * 1e3, bf16_after_us=bf16_after * 1e3)
            say(f"{n}x{k} w{row['bits']} vs bf16 {base * 1e3:.1f}us: " + " ".join(
                f"{key} {base * 1e3 / v['us']:.2f}x" for key, v in row.items() if isinstance(v, dict)))
        rows.extend(shape_rows)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=tlin.triton.__version__,
                copy_bw_TBps=bw / 1e12, tokens=args.tokens)
    (out / "l2_prefetch.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
