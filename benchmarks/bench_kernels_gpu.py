"""Build, check and time every weight-only kernel on the issue's LLM shapes, in one run on one GPU.

For each shape (N = out_features, K = in_features), bit width (group 128, symmetric) and token count:
every path of `gpu_backends.gpu_candidates` (ours: fused Triton kernels over a small tile sweep (for decode, the tiles a latency table tries), and
dequantize + cuBLAS; anchors: tinygemm int4, gemlite) is checked against a float64 reference and timed
(L2 flushed before each run, CUDA events, graph replay, median of --reps). Ratios are
against cuBLAS bf16 F.linear and the best anchor of the same bit width measured in the same run;
bandwidth at 1 token is (weight + scales + x + y bytes) / time over the measured copy bandwidth.
With --in-graph C, bf16, our fastest path and the best anchor are also timed up to 16 tokens as what one more layer
adds inside a CUDA graph (`latency.chain_ms`: a chain of C layers, each with its own weight, less the replay of one):
the cost of a layer in a whole-model graph, without the fixed cost of launching a replay (3.1 us on an H100) that
every single timed replay carries. Writes bench.json and bench.md under --out.

Compiling the Triton kernels (odd widths: seconds to minutes a tile) is most of a cold run. With --jobs N, N
processes first run every path once, each on its share of the (bits, tokens) and (choice, tokens) cases
(--shard i/N, one timing rep), filling Triton's on-disk cache on all CPU cores; this process then times
everything with the kernels cached (gemlite still tunes each case, on cached kernels).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import QuantSpec, a8_linear, quantize  # noqa: E402
from kernels import triton_linear as tlin  # noqa: E402
from kernels.gpu_backends import gpu_candidates  # noqa: E402
from kernels.gpu_layout import repack_for_gpu  # noqa: E402
from kernels.latency import GRAPH_MAX_TOKENS, chain_ms, l2_flush_buffer, time_cuda  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (28672, 8192)]
BITS = (2, 3, 4, 5, 6, 8)
TOKENS = (1, 16, 64, 512)
OURS = ("triton_fused", "triton_dequant_cublas")
ANCHORS = ("tinygemm_int4", "gemlite")
PROCESS_BYTES_PER_ELEMENT = 64  # GPU memory of one process per weight element (weights, float64 reference, codes)


def sweep(m: int, gw) -> list[tlin.Config]:
    """Tile shapes tried for m rows besides the default heuristic: for decode (m <= triton_linear.TUNED_MAX_M)
    exactly the tiles a latency table tries (`tile_candidates`), so "ours" is what an emitted model runs after
    `kernels.measure`; above it those too (the Hopper wgmma prefill's, where the device runs them), and a few
    split-K GEMM (up to 64 rows) and wide-kernel tiles, which no table installs."""
    offered = tlin.tile_candidates(m, gw, torch.bfloat16)[1:]
    if m <= tlin.TUNED_MAX_M:
        return offered

    def cfg(bm: int, bn: int, warps: int, stages: int, waves: int = 4, wide: bool = False) -> tlin.Config:
        n, blocks = gw.shape[0], gw.planes[0].shape[0] // 16
        split = 1 if m > 64 else tlin.split_for(-(-n // bn) * -(-m // bm), blocks, waves)
        return tlin.Config(bm, bn, split, warps, stages, wide)
    if m <= 64:
        return offered + [cfg(64, 128, 4, 3, 2), cfg(64, 64, 4, 4, 4)]
    if gw.per == 16:  # 256-column K blocks: x tiles of 256 columns per stage
        return offered + [cfg(128, 128, 8, 2, wide=True), cfg(64, 128, 4, 2, wide=True),
                          cfg(128, 64, 4, 2, wide=True), cfg(256, 128, 8, 3)]
    return offered + [cfg(128, 128, 8, 3, wide=True), cfg(128, 256, 8, 3, wide=True), cfg(64, 128, 4, 3, wide=True),
                      cfg(128, 128, 8, 4, wide=True), cfg(256, 128, 8, 3)]


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


def poisoned(fn, x: torch.Tensor, outputs: int) -> torch.Tensor:
    """fn(x) with the caching allocator's next free block (16 bytes for each of `outputs` output elements) filled
    with NaN first, so output elements a kernel leaves unwritten show as NaN (`rel_err`: inf) rather than as a
    right value an earlier call left in the same memory."""
    torch.empty(4 * outputs, device=x.device).fill_(float("nan"))
    return fn(x)


def checked_times(paths: dict, x: torch.Tensor, ref: torch.Tensor, tol: float, reps: int, flush: torch.Tensor,
                  errs: dict) -> dict[str, float]:
    """The time of each path whose output (poisoned first) is within relative error `tol` of `ref`; the others go
    into `errs` with why (an exception, or the error)."""
    times = {}
    for name, fn in paths.items():
        try:
            e = rel_err(poisoned(fn, x, ref.numel()), ref)
        except Exception as ex:  # noqa: BLE001 - reported in the table
            errs[name] = f"{type(ex).__name__}: {str(ex)[:200]}"
            continue
        if e > tol:
            errs[name] = f"rel err {e:.2e}"
            continue
        times[name] = time_cuda(fn, x, reps, flush, graph=x.shape[0] <= GRAPH_MAX_TOKENS)
    return times


def bw_fraction(weight_bytes: int, m: int, n: int, k: int, ms: float, bw: float) -> float | None:
    """At 1 token, the bytes a linear moves (weight, x and y in bf16) per second over the copy bandwidth `bw`;
    None above 1 token."""
    return (weight_bytes + 2 * m * (n + k)) / (ms * 1e-3) / bw if m == 1 else None


def layer_copy(t):
    """A QuantizedTensor or GpuPackedWeight with its own copy of every tensor (the same values)."""
    zeros = None if t.zeros is None else t.zeros.clone()
    if hasattr(t, "planes"):
        return replace(t, planes=tuple(p.clone() for p in t.planes), scales=t.scales.clone(), zeros=zeros)
    return replace(t, packed=t.packed.clone(), scales=t.scales.clone(), zeros=zeros)


def in_graph_row(row: dict, x: torch.Tensor, w_bf16: torch.Tensor, qt, gw, copies: int, reps: int,
                 flush: torch.Tensor, bw: float, wbytes: int) -> dict:
    """What one more layer of bf16, of our fastest path (at its best tile) and of the best anchor of a benchmark row
    adds to a graph of `copies` such layers (`chain_ms`); their ratios and, at 1 token, bandwidths."""
    m, (n, k) = x.shape[0], w_bf16.shape
    cfg = tlin.Config.parse(row["fused_cfg"])

    def bf16(w: torch.Tensor) -> Callable:
        return lambda x: F.linear(x, w)

    def ours(gw) -> Callable:
        if row["best_ours"] == "triton_dequant_cublas":
            return lambda x: tlin.dequant_matmul(x, gw)
        return lambda x: tlin.linear(x, gw, cfg)

    got = {"bf16": chain_ms([bf16(w_bf16)] + [bf16(w_bf16.clone()) for _ in range(copies - 1)], x, reps, flush)[1],
           "ours": chain_ms([ours(gw)] + [ours(layer_copy(gw)) for _ in range(copies - 1)], x, reps, flush)[1]}
    if row["anchor"] is not None:
        got["anchor"] = chain_ms([gpu_candidates(layer_copy(qt) if i else qt, x.dtype, gw)[0][row["anchor"]]
                                  for i in range(copies)], x, reps, flush)[1]  # gw: no repack, our paths unused
    torch.cuda.empty_cache()
    got["speedup_vs_bf16"] = got["bf16"] / got["ours"]
    got["vs_anchor"] = got["anchor"] / got["ours"] if "anchor" in got else None
    got["bw_frac"] = bw_fraction(wbytes, m, n, k, got["ours"], bw)
    got["bf16_bw_frac"] = bw_fraction(2 * n * k, m, n, k, got["bf16"], bw)
    return got


def unfused(fns: dict, qt) -> dict:
    """The baseline of the activation-quantized paths: x quantized, and the int8 product scaled, in torch ops
    (about ten kernels a call) around the same matmuls."""
    from kernels import gpu_activation_quant as gaq
    codes = gaq.signed_codes(qt)
    sw = qt.scales.float().view(1, -1).cuda()
    out = {}
    if "int8_int_mm" in fns:
        w8 = codes.to(torch.int8).cuda().t()
        out["int8_int_mm_unfused"] = lambda x: gaq.int8_matmul(x, w8, sw.view(-1), fused=False)
    if "fp8_scaled_mm" in fns:
        wf = codes.float().to(torch.float8_e4m3fn).cuda().t()

        def fp8(x: torch.Tensor) -> torch.Tensor:
            m = x.shape[0]
            sx = gaq.token_scales(x, gaq.E4M3_MAX)
            xq = (x.float() / sx).to(torch.float8_e4m3fn)
            pad = gaq.padded_rows(m, 16, 16) - m
            if pad:
                xq, sx = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (xq, sx))
            return torch._scaled_mm(xq, wf, scale_a=sx, scale_b=sw, out_dtype=x.dtype)[:m]
        out["fp8_scaled_mm_unfused"] = fp8
    return out


def a8_sweep(m: int, gw) -> list[tlin.Config]:
    """Tiles (block_m tokens x block_n weight rows) of the fused W<b>A8 kernel tried besides
    `a8_linear.default_config`: split-K decode tiles up to 64 rows (and one without split-K), 64..256 x 64..256
    prefill tiles above."""
    n, blocks = gw.shape[0], gw.planes[0].shape[0] // 16

    def cfg(bm: int, bn: int, warps: int, stages: int, waves: int) -> tlin.Config:
        split = 1 if waves == 0 else tlin.split_for(-(-n // bn) * -(-m // bm), blocks, waves)
        return tlin.Config(bm, bn, split, warps, stages)
    bm = 16 if m <= 16 else 64
    if m <= 64:
        return [cfg(bm, 128, 4, 1, 2), cfg(bm, 64, 4, 1, 4), cfg(bm, 256, 8, 1, 2), cfg(bm, 128, 4, 3, 0)]
    return [cfg(64, 128, 4, 3, 0), cfg(128, 256, 8, 3, 0), cfg(256, 128, 8, 3, 0), cfg(128, 64, 4, 3, 0),
            cfg(64, 256, 8, 3, 0), cfg(128, 128, 8, 4, 0)]


def own_tokens(shard: tuple[int, int], row: int, tokens: list[int]) -> list[int]:
    """The token counts of case row `row` (a bit width or a choice) that are this process's: case row x
    len(tokens) + j is shard (i, n)'s when it is i modulo n."""
    return [m for j, m in enumerate(tokens) if (row * len(tokens) + j) % shard[1] == shard[0]]


def warm_in_parallel(jobs: int, elements: int) -> None:
    """Run this script's cases in `jobs` processes, one timing rep each (--shard i/jobs), to fill Triton's on-disk
    cache on every CPU core before the timed run (gemlite's too: its tuning then only times cached kernels). At
    most as many at a time as the GPU's free memory holds, at PROCESS_BYTES_PER_ELEMENT bytes per element of the
    largest weight (with 6 at once, one of six ran out of memory on an H100 at 28672x8192)."""
    t0 = time.time()
    free = torch.cuda.mem_get_info()[0]
    at_once = max(1, min(jobs, int((free - (4 << 30)) // (PROCESS_BYTES_PER_ELEMENT * elements + (1 << 30)))))
    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp, f"{i}.log") for i in range(jobs)]
        pending, running = list(range(jobs)), {}
        while pending or running:
            for i in [i for i, p in running.items() if p.poll() is not None]:
                if running.pop(i).returncode != 0:
                    print(f"compile pass, shard {i}/{jobs} failed (the timed run compiles what it left):\n"
                          f"{logs[i].read_text()[-2000:]}", flush=True)
            while pending and len(running) < at_once:
                i = pending.pop(0)
                with logs[i].open("w") as f:  # the child holds its own descriptor
                    running[i] = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--jobs", "1", "--shard",
                                                   f"{i}/{jobs}", "--reps", "1", "--out", f"{tmp}/{i}"], stdout=f,
                                                  stderr=subprocess.STDOUT)
            time.sleep(0.2)
    print(f"compile pass: {jobs} processes, {at_once} at a time, {time.time() - t0:.0f} s", flush=True)


def activation_quantized(shapes, tokens, labels, reps: int, flush: torch.Tensor, gen: torch.Generator,
                         shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """w<b>gca8 / w<b>gcf8 through the paths an emitted layer can run (below 8 bits each of `a8_linear.PATHS` of
    the choice's format, of which a latency table installs the fastest, with a sweep of the fused kernel's tiles;
    torch._int_mm at 8) and, for comparison, torch._int_mm on byte-wide codes and torch._scaled_mm (x quantized by
    our kernel; also the torch-op baseline, `unfused`) vs bf16, checked against float64."""
    from kernels import Choice
    from kernels import gpu_activation_quant as gaq
    rows = []
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", generator=gen)
        w_bf16 = w.bfloat16()
        for label in labels:
            own = own_tokens(shard, labels.index(label), tokens)
            if not own:  # a compile pass's shard with no case of this choice: skip its quantization too
                continue
            choice = Choice.parse(label)
            qt = quantize(w, choice.spec_for("linear", k), clip_search=False)
            wdq = qt.dequantize(torch.float64)
            fns, skipped = gaq.candidates(qt, choice, torch.bfloat16, benchmark=True)
            fns.update(unfused(fns, qt))
            gw = repack_for_gpu(qt, "cuda") if "a8_fused" in fns else None
            for m in own:
                x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
                ref = x.double() @ wdq.t()
                paths = dict(fns)
                if gw is not None:
                    paths.update({f"a8_fused[{c.label}]": (lambda x, c=c, gw=gw: a8_linear.linear(x, gw, c))
                                  for c in a8_sweep(m, gw)})
                errs = dict(skipped)
                ms = checked_times(paths, x, ref, 8e-2, reps, flush, errs)
                base = time_cuda(lambda x: F.linear(x, w_bf16), x, reps, flush, graph=m <= GRAPH_MAX_TOKENS)
                tiles = {name: t for name, t in ms.items() if name.startswith("a8_fused[")}
                best_tile = min(tiles, key=tiles.get) if tiles else None
                rows.append(dict(N=n, K=k, choice=label, tokens=m, bf16_ms=base, ms=ms, rejected=errs,
                                 default_a8=None if gw is None else a8_linear.default_config(m, gw).label,
                                 default_path=None if gw is None else a8_linear.default_path(m, gw),
                                 best_a8_tile=best_tile))
                print(f"{n}x{k} {label} M={m}: bf16 {base * 1e3:.1f}us " +
                      " ".join(f"{a} {b * 1e3:.1f}us" for a, b in ms.items()) + (f" rejected {errs}" if errs else ""),
                      flush=True)
            del qt, wdq, fns, gw
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--shapes", default="all")
    ap.add_argument("--bits", default=",".join(map(str, BITS)))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-act", action="store_true", help="leave out the int8 / FP8 activation-quantized paths")
    ap.add_argument("--act-choices", default="w4gca8,w4gcf8,w8gca8", help="activation-quantized choices timed")
    ap.add_argument("--no-gemlite", action="store_true",
                    help="leave gemlite out (it autotunes every new shape/bits/tokens: minutes per shape)")
    ap.add_argument("--in-graph", type=int, default=0, metavar="C",
                    help="also time bf16, ours and the best anchor up to 16 tokens as one more layer of a graph of C")
    ap.add_argument("--jobs", type=int, default=1, help="processes compiling the kernels before the timed run")
    ap.add_argument("--shard", default="0/1", help="i/n: run only every n-th (bits, tokens) case from the i-th")
    args = ap.parse_args()
    shard = tuple(int(v) for v in args.shard.split("/"))
    shapes = SHAPES if args.shapes == "all" else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.jobs > 1:
        warm_in_parallel(args.jobs, max(n * k for n, k in shapes))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bits_list = [int(b) for b in args.bits.split(",") if b]  # --bits "": only bf16 and the activation-quantized
    tokens = [int(t) for t in args.tokens.split(",")]
    dtype = torch.bfloat16
    t_start = time.time()
    flush = l2_flush_buffer("cuda")
    bw = copy_bandwidth(flush) if shard == (0, 1) else float("nan")  # a compile pass's shard times nothing it keeps
    dev = torch.cuda.get_device_name()
    print(f"device {dev}; torch {torch.__version__}; triton {tlin.triton.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s",
          flush=True)
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", generator=gen)
        w_bf16 = w.to(dtype)
        xs = {m: torch.randn(m, k, device="cuda", generator=gen).to(dtype) for m in tokens}
        base = {m: time_cuda(lambda x: F.linear(x, w_bf16), xs[m], args.reps, flush, graph=m <= GRAPH_MAX_TOKENS)
                for m in tokens}
        for bits in bits_list:
            own = own_tokens(shard, bits_list.index(bits), tokens)
            if not own:  # a compile pass's shard with no case of this width: skip its quantization too
                continue
            qt = quantize(w, QuantSpec(bits, 128, True, "bfloat16"), clip_search=False)
            wdq = qt.dequantize(torch.float64)
            fns, skipped = gpu_candidates(qt, dtype)
            if args.no_gemlite and fns.pop("gemlite", None) is not None:
                skipped["gemlite"] = "left out (--no-gemlite)"
            gw = repack_for_gpu(qt, "cuda")
            wbytes = gw.nbytes
            for m in own:
                x = xs[m]
                ref = x.double() @ wdq.t()
                errs: dict[str, str] = dict(skipped)
                res = checked_times(fns, x, ref, 2e-2, args.reps, flush, errs)
                default_cfg = best_cfg = tlin.default_config(m, gw, x.dtype).label
                swept: dict[str, float] = {}
                if not args.no_sweep:
                    for cfg in sweep(m, gw):
                        try:
                            fn = lambda x, cfg=cfg, gw=gw: tlin.linear(x, gw, cfg)  # noqa: E731
                            if rel_err(fn(x), ref) > 2e-2:
                                errs[f"cfg {cfg.label}"] = "wrong result"
                                continue
                            t = time_cuda(fn, x, args.reps, flush, graph=m <= GRAPH_MAX_TOKENS)
                        except Exception as ex:  # noqa: BLE001
                            errs[f"cfg {cfg.label}"] = f"{type(ex).__name__}: {str(ex)[:120]}"
                            continue
                        swept[cfg.label] = t
                        if t < res.get("triton_fused", float("inf")):
                            res["triton_fused"], best_cfg = t, cfg.label
                ours = min((res[o], o) for o in OURS if o in res)
                anchors = [(res[a], a) for a in ANCHORS if a in res]
                anchor = min(anchors) if anchors else None
                row = dict(N=n, K=k, bits=bits, tokens=m, bf16_ms=base[m], ms=res, best_ours=ours[1],
                           best_ours_ms=ours[0], fused_cfg=best_cfg, speedup_vs_bf16=base[m] / ours[0],
                           anchor=None if anchor is None else anchor[1],
                           vs_anchor=None if anchor is None else anchor[0] / ours[0],
                           bw_frac=bw_fraction(wbytes, m, n, k, res.get("triton_fused", ours[0]), bw),
                           bf16_bw_frac=bw_fraction(2 * n * k, m, n, k, base[m], bw),
                           default_cfg=default_cfg, sweep_ms=swept, rejected=errs)
                if args.in_graph > 1 and m <= 16 and shard == (0, 1):
                    row["in_graph"] = in_graph_row(row, x, w_bf16, qt, gw, args.in_graph, args.reps, flush, bw, wbytes)
                rows.append(row)
                a = "" if anchor is None else f" {anchor[1]} {anchor[0] * 1e3:.1f}us ({row['vs_anchor']:.2f}x)"
                bwf = "" if row["bw_frac"] is None else f" bw {row['bw_frac']:.0%} (bf16 {row['bf16_bw_frac']:.0%})"
                print(f"{n}x{k} w{bits} M={m}: bf16 {base[m] * 1e3:.1f}us ours {ours[1]} {ours[0] * 1e3:.1f}us "
                      f"[{best_cfg}] {row['speedup_vs_bf16']:.2f}x{a}{bwf} fused {res.get('triton_fused', 0) * 1e3:.1f}us"
                      f" deq {res.get('triton_dequant_cublas', 0) * 1e3:.1f}us", flush=True)
                if "in_graph" in row:
                    g = row["in_graph"]
                    print(f"   in a graph of {args.in_graph}: bf16 {g['bf16'] * 1e3:.1f}us ours {g['ours'] * 1e3:.1f}us "
                          f"{g['speedup_vs_bf16']:.2f}x" + (f" anchor {g['anchor'] * 1e3:.1f}us ({g['vs_anchor']:.2f}x)"
                                                            if g["vs_anchor"] else "")
                          + (f" bw {g['bw_frac']:.0%} (bf16 {g['bf16_bw_frac']:.0%})" if g["bw_frac"] else ""), flush=True)
                if errs:
                    print("   rejected:", json.dumps(errs)[:400], flush=True)
            del qt, wdq, fns, gw
            torch.cuda.empty_cache()
    act_rows = [] if args.no_act else activation_quantized(shapes, tokens, args.act_choices.split(","), args.reps, flush,
                                                           gen, shard)
    meta = dict(device=dev, torch=torch.__version__, triton=tlin.triton.__version__, copy_bw_TBps=bw / 1e12,
                reps=args.reps, in_graph_copies=args.in_graph, seconds=time.time() - t_start)
    (out / "bench.json").write_text(json.dumps(dict(meta=meta, rows=rows, activation_quantized=act_rows), indent=1))
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
    graphed = [r for r in rows if "in_graph" in r]
    if graphed:
        lines += ["", f"In a graph: what one more layer adds to a CUDA graph of {args.in_graph} layers, each with its own "
                  "weight (no fixed replay cost), microseconds:", "",
                  "| N x K | bits | tokens | bf16 | ours | x bf16 | best anchor | ours / anchor | bw @1 tok | bf16 bw |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in graphed:
            g = r["in_graph"]
            anc = "-" if g["vs_anchor"] is None else f"{r['anchor']} {g['anchor'] * 1e3:.1f}"
            va = "-" if g["vs_anchor"] is None else f"{g['vs_anchor']:.2f}x"
            bwf, bbw = ("-", "-") if g["bw_frac"] is None else (f"{g['bw_frac']:.0%}", f"{g['bf16_bw_frac']:.0%}")
            lines.append(f"| {r['N']}x{r['K']} | {r['bits']} | {r['tokens']} | {g['bf16'] * 1e3:.1f} | "
                         f"{g['ours'] * 1e3:.1f} | {g['speedup_vs_bf16']:.2f}x | {anc} | {va} | {bwf} | {bbw} |")
    lines += ["", "Activation-quantized (per-channel weights, per-token 8-bit activations), microseconds; x quantized "
              "by our kernel, and (unfused) in torch ops:", "",
              "| N x K | choice | tokens | bf16 | rounded x + weight-only | fused (default tile) | best fused tile | "
              "unpack + _int_mm | e4m3-rounded x + weight-only | unpack + _scaled_mm | int8 _int_mm (byte codes) | "
              "unfused | fp8 _scaled_mm (byte codes) | unfused | best x bf16 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    paths = ("a8_rounded_x", "a8_fused", "best_a8_tile", "a8_unpack_int_mm", "f8_rounded_x", "f8_unpack_scaled_mm",
             "int8_int_mm", "int8_int_mm_unfused", "fp8_scaled_mm", "fp8_scaled_mm_unfused")
    for r in act_rows:
        ms = dict(r["ms"])
        if r["best_a8_tile"] is not None:
            ms["best_a8_tile"] = ms[r["best_a8_tile"]]
        got = [v for name, v in ms.items() if not name.endswith("_unfused")]
        us = " | ".join(f"{ms[name] * 1e3:.1f}" if name in ms else "-" for name in paths)
        best = f"{r['bf16_ms'] / min(got):.2f}x" if got else "-"
        lines.append(f"| {r['N']}x{r['K']} | {r['choice']} | {r['tokens']} | {r['bf16_ms'] * 1e3:.1f} | {us} | {best} |")
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print(f"done in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
