"""Check and time the stream-K one-token GEMV (`Config(stream=True)`) against every tile a latency table tries
today (`tile_candidates`), tinygemm (4-bit) and cuBLAS bf16, in one run on one GPU: L2 flushed, graph replay,
median of --reps. The sweep covers (columns per program, warps) x programs per SM.
Writes stream.json and stream.txt under --out."""
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
from kernels.gpu_backends import gpu_candidates  # noqa: E402
from kernels.gpu_layout import repack_for_gpu  # noqa: E402
from kernels.latency import L2_FLUSH_BYTES, time_cuda  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (28672, 8192)]


class Log:
    """Lines printed and appended to a file as they come (a run cut short still leaves what it measured)."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def __call__(self, line: str, show: bool = True) -> None:
        with self.path.open("a") as f:
            f.write(line + "\n")
        if show:
            print(line, flush=True)


def check(gen: torch.Generator, bits_list: list[int], sms: int, log: Log) -> int:
    """Relative errors vs float64 of stream-K tiles and the default kernel on odd shapes, groups, zero points;
    returns the number of failures."""
    fails = 0
    for bits, (n, k, g, sym) in product(bits_list, [(67, 203, 32, False), (45, 600, None, True),
                                                    (4100, 1100, 64, False), (40, 384, 128, False)]):
        w = torch.randn(n, k, device="cuda", generator=gen)
        qt = quantize(w, QuantSpec(bits, g, sym, "bfloat16"), clip_search=False)
        gw = repack_for_gpu(qt, "cuda")
        for dtype, (bn, warps, programs) in [(torch.bfloat16, (128, 4, 3)), (torch.float16, (512, 4, 2 * sms))]:
            cfg = tlin.Config(1, bn, programs, warps, 1, stream=True)
            x = torch.randn(1, k, device="cuda", generator=gen).to(dtype) + (30 if n == 40 else 0)
            ref = x.double() @ qt.dequantize(torch.float64).t()
            out = tlin.linear(x, gw, cfg)
            again = tlin.linear(x, gw, cfg)  # the workspace and counters were left zeroed
            e = float((out.double() - ref).norm() / ref.norm())
            e2 = float((again.double() - ref).norm() / ref.norm())
            e0 = float((tlin.linear(x, gw).double() - ref).norm() / ref.norm())
            ok = max(e, e2) < max(2 * e0, 4e-3)
            fails += not ok
            log(f"check bits={bits} n={n} k={k} g={g} sym={sym} {dtype} {cfg.label}: stream {e:.2e} "
                f"{e2:.2e} default {e0:.2e} {'OK' if ok else 'FAIL'}", show=not ok)
    return fails


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--bits", default="2,3,4,5,6,8")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--tiles", default="256x2,512x4,512x8,1024x8", help="columns per program x warps")
    ap.add_argument("--per-sm", default="1,2,4,8", help="programs per SM")
    ap.add_argument("--no-check", action="store_true")
    a = ap.parse_args()
    bits_list = [int(b) for b in a.bits.split(",")]
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    tiles = [tuple(map(int, t.split("x"))) for t in a.tiles.split(",")]
    per_sm = [int(v) for v in a.per_sm.split(",")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.time()
    log = Log(out / "stream.txt")
    log(f"device {torch.cuda.get_device_name()} ({sms} SMs) torch {torch.__version__} triton {tlin.triton.__version__}")
    if not a.no_check:
        log(f"checks: {check(gen, bits_list, sms, log)} failed, {time.time() - t0:.0f} s")
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
    rows = []
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda", generator=gen)
        wb = w.bfloat16()
        x = torch.randn(1, k, device="cuda", generator=gen).bfloat16()
        bf16 = time_cuda(lambda v: F.linear(v, wb), x, a.reps, flush)
        for bits in bits_list:
            qt = quantize(w, QuantSpec(bits, 128, True, "bfloat16"), clip_search=False)
            gw = repack_for_gpu(qt, "cuda")
            ref = x.double() @ qt.dequantize(torch.float64).t()
            times: dict[str, float] = {}
            fns, _ = gpu_candidates(qt, torch.bfloat16, gw)
            if "tinygemm_int4" in fns:
                times["tinygemm"] = time_cuda(fns["tinygemm_int4"], x, a.reps, flush)
            today = {c.label: c for c in tlin.tile_candidates(1, gw, torch.bfloat16)}
            stream = {c.label: c for c in (tlin.Config(1, bn, p * sms, warps, 1, stream=True)
                                           for (bn, warps), p in product(tiles, per_sm))}
            for label, cfg in {**today, **stream}.items():
                fn = lambda v, cfg=cfg: tlin.linear(v, gw, cfg)  # noqa: E731
                try:
                    e = float((fn(x).double() - ref).norm() / ref.norm())
                    if e > 2e-2:
                        log(f"{n}x{k} b{bits} {label}: wrong result, rel err {e:.2e}")
                        continue
                    times[label] = time_cuda(fn, x, a.reps, flush)
                except Exception as ex:  # noqa: BLE001 (a tile that does not compile is reported, not fatal)
                    log(f"{n}x{k} b{bits} {label}: {type(ex).__name__} {str(ex)[:120]}")
            best_today = min((times[c], c) for c in today if c in times)
            best_stream = min((times[c], c) for c in stream if c in times)
            nbytes = gw.nbytes + 2 * (n + k)
            rows.append(dict(n=n, k=k, bits=bits, bf16_ms=bf16, times=times, best_today=best_today[1],
                             best_stream=best_stream[1], bytes=nbytes))
            s = (f"{n}x{k} b{bits}: bf16 {bf16 * 1e3:.1f} us; today {best_today[0] * 1e3:.1f} us {best_today[1]} "
                 f"({bf16 / best_today[0]:.2f}x bf16); stream {best_stream[0] * 1e3:.1f} us {best_stream[1]} "
                 f"({bf16 / best_stream[0]:.2f}x bf16, {best_today[0] / best_stream[0]:.3f}x today, "
                 f"{nbytes / best_stream[0] / 1e9:.2f} TB/s)")
            if "tinygemm" in times:
                s += f"; tinygemm {times['tinygemm'] * 1e3:.1f} us"
            log(s)
            (out / "stream.json").write_text(json.dumps(rows, indent=1))
            del qt, gw, fns
            torch.cuda.empty_cache()
    log(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
