"""Build, check and time every weight-only kernel on the issue's LLM shapes, in one run on one GPU.

For each shape (N = out_features, K = in_features), bit width (group 128, symmetric) and token count:
every path of `gpu_backends.gpu_candidates` (ours: fused Triton kernels over a small tile sweep, and
dequantize + cuBLAS; anchors: tinygemm int4, gemlite) is checked against a float64 reference and timed
(L2 flushed before each run, CUDA events, graph replay for <= 64 tokens, median of --reps). Ratios are
against cuBLAS bf16 F.linear and the best anchor of the same bit width measured in the same run;
bandwidth at 1 token is (weight + scales + x + y bytes) / time over the measured copy bandwidth.
Writes bench.json and bench.md under --out.
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
from kernels.gpu_backends import gpu_candidates  # noqa: E402
from kernels.gpu_layout import repack_for_gpu  # noqa: E402
from kernels.latency import L2_FLUSH_BYTES, time_cuda  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (28672, 8192)]
BITS = (2, 3, 4, 5, 6, 8)
TOKENS = (1, 16, 64, 512)
OURS = ("triton_fused", "triton_dequant_cublas")
ANCHORS = ("tinygemm_int4", "gemlite")


def sweep(m: int) -> list[tlin.Config]:
    """Tile shapes tried for m rows (the default heuristic is always tried too)."""
    if m == 1:
        return [tlin.Config(1, bn, bk, s, w, 1) for bn, bk, s, w in
                [(32, 128, 0, 4), (64, 128, 0, 4), (128, 128, 0, 4), (64, 128, 0, 8)]]
    if m <= 64:
        bm = 16 if m <= 16 else 64
        return [tlin.Config(bm, bn, 128, s, 4, st) for bn, s, st in [(32, 0, 3), (64, 0, 4), (128, 0, 3)]]
    return [tlin.Config(bm, bn, bk, 1, w, st) for bm, bn, bk, w, st in
            [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3)]]


def with_split(cfg: tlin.Config, m: int, gw) -> tlin.Config:
    """split 0 in the sweep means: as many K-slices as make ~4 waves of programs."""
    if cfg.split_k:
        return cfg
    n = gw.shape[0]
    programs = -(-n // cfg.block_n) * -(-m // cfg.block_m)
    kw = gw.planes[0].shape[0] * gw.per
    split = max(1, min(16, (4 * 132) // programs, kw // (4 * cfg.block_k)))
    return tlin.Config(cfg.block_m, cfg.block_n, cfg.block_k, split, cfg.num_warps, cfg.num_stages)


def copy_bandwidth(flush: torch.Tensor) -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy (median of 20)."""
    a = torch.empty(1 << 29, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    ms = time_cuda(lambda x: b.copy_(x), a, 20, flush, graph=False)
    return 2 * a.numel() * 4 / (ms * 1e-3)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y.double() - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--bits", default=",".join(map(str, BITS)))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = SHAPES if args.shapes == "all" else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    dtype = torch.bfloat16
    t_start = time.time()
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
    bw = copy_bandwidth(flush)
    dev = torch.cuda.get_device_name()
    print(f"device {dev}; torch {torch.__version__}; triton {tlin.triton.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s",
          flush=True)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", generator=gen)
        w_bf16 = w.to(dtype)
        xs = {m: torch.randn(m, k, device="cuda", generator=gen).to(dtype) for m in tokens}
        base = {m: time_cuda(lambda x: F.linear(x, w_bf16), xs[m], args.reps, flush, graph=m <= 64) for m in tokens}
        for bits in bits_list:
            qt = quantize(w, QuantSpec(bits, 128, True, "bfloat16"), clip_search=False)
            wdq = qt.dequantize(torch.float64)
            fns, skipped = gpu_candidates(qt, dtype)
            gw = repack_for_gpu(qt, "cuda")
            wbytes = gw.nbytes
            for m in tokens:
                x = xs[m]
                ref = x.double() @ wdq.t()
                res: dict[str, float] = {}
                errs: dict[str, str] = dict(skipped)
                for name, fn in fns.items():
                    try:
                        e = rel_err(fn(x), ref)
                    except Exception as ex:  # noqa: BLE001 - reported in the table
                        errs[name] = f"{type(ex).__name__}: {str(ex)[:200]}"
                        continue
                    if e > 2e-2:
                        errs[name] = f"rel err {e:.2e}"
                        continue
                    res[name] = time_cuda(fn, x, args.reps, flush, graph=m <= 64)
                best_cfg = tlin.default_config(m, gw).label
                if not args.no_sweep:
                    for cfg in sweep(m):
                        cfg = with_split(cfg, m, gw)
                        try:
                            tlin._check_config(cfg, gw)
                            fn = lambda x, cfg=cfg: tlin.linear(x, gw, cfg)  # noqa: E731
                            if rel_err(fn(x), ref) > 2e-2:
                                errs[f"cfg {cfg.label}"] = "wrong result"
                                continue
                            t = time_cuda(fn, x, args.reps, flush, graph=m <= 64)
                        except Exception as ex:  # noqa: BLE001
                            errs[f"cfg {cfg.label}"] = f"{type(ex).__name__}: {str(ex)[:120]}"
                            continue
                        if t < res.get("triton_fused", float("inf")):
                            res["triton_fused"], best_cfg = t, cfg.label
                ours = min((res[o], o) for o in OURS if o in res)
                anchors = [(res[a], a) for a in ANCHORS if a in res]
                anchor = min(anchors) if anchors else None
                row = dict(N=n, K=k, bits=bits, tokens=m, bf16_ms=base[m], ms=res, best_ours=ours[1],
                           best_ours_ms=ours[0], fused_cfg=best_cfg, speedup_vs_bf16=base[m] / ours[0],
                           anchor=None if anchor is None else anchor[1],
                           vs_anchor=None if anchor is None else anchor[0] / ours[0],
                           bw_frac=(wbytes + 2 * m * (n + k)) / (res.get("triton_fused", ours[0]) * 1e-3) / bw
                           if m == 1 else None,
                           bf16_bw_frac=(2 * n * k + 2 * m * (n + k)) / (base[m] * 1e-3) / bw if m == 1 else None,
                           rejected=errs)
                rows.append(row)
                a = "" if anchor is None else f" {anchor[1]} {anchor[0] * 1e3:.1f}us ({row['vs_anchor']:.2f}x)"
                bwf = "" if row["bw_frac"] is None else f" bw {row['bw_frac']:.0%} (bf16 {row['bf16_bw_frac']:.0%})"
                print(f"{n}x{k} w{bits} M={m}: bf16 {base[m] * 1e3:.1f}us ours {ours[1]} {ours[0] * 1e3:.1f}us "
                      f"[{best_cfg}] {row['speedup_vs_bf16']:.2f}x{a}{bwf} fused {res.get('triton_fused', 0) * 1e3:.1f}us"
                      f" deq {res.get('triton_dequant_cublas', 0) * 1e3:.1f}us", flush=True)
                if errs:
                    print("   rejected:", json.dumps(errs)[:400], flush=True)
            del qt, wdq, fns, gw
            torch.cuda.empty_cache()
    meta = dict(device=dev, torch=torch.__version__, triton=tlin.triton.__version__, copy_bw_TBps=bw / 1e12,
                reps=args.reps, seconds=time.time() - t_start)
    (out / "bench.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"Device: {dev}, torch {torch.__version__}, triton {meta['triton']}, copy bandwidth {bw / 1e12:.2f} TB/s "
             f"(read+write). bf16 activations, symmetric, group 128. Times in microseconds (median, L2 flushed).", "",
             "| N x K | bits | tokens | bf16 | ours (path) | x bf16 | best anchor | ours / anchor | bw @1 tok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        anc = "-" if r["anchor"] is None else f"{r['anchor']} {r['ms'][r['anchor']] * 1e3:.1f}"
        va = "-" if r["vs_anchor"] is None else f"{r['vs_anchor']:.2f}x"
        bwf = "-" if r["bw_frac"] is None else f"{r['bw_frac']:.0%}"
        path = "fused" if r["best_ours"] == "triton_fused" else "deq+cuBLAS"
        lines.append(f"| {r['N']}x{r['K']} | {r['bits']} | {r['tokens']} | {r['bf16_ms'] * 1e3:.1f} | "
                     f"{r['best_ours_ms'] * 1e3:.1f} ({path}) | {r['speedup_vs_bf16']:.2f}x | {anc} | {va} | {bwf} |")
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print(f"done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
