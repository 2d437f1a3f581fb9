"""W<b>A8: b-bit per-channel weight codes times 8-bit per-token activations (int8 or float8), picked by measurement.

A layer's output is out[m, n] = sx[m] * sw[n] * sum_k xq[m, k] * (code[n, k] - 2^(b-1)), x quantized per token by
its absmax. The weight stays in the packed bit-plane layout of `gpu_layout` (a 4-bit weight half a byte a code,
as the plan's memory counts it). `linear` runs one of `PATHS`:
- "a8_fused": one Triton kernel turns the codes into signed int8 in registers (a shift and a mask a code, a
  thread's codes of one word side by side in the operand's K order; `quantize_rows(..., per=PER)` permutes x's
  columns to match) and runs one int8 `tl.dot` a K block; per-channel scales factor out of the K sum. Split-K
  writes float32 slices, summed and cast by a second kernel (the atomic split-K of `triton_linear` summed some
  tiles of this kernel wrong on an H100, session 25). Offline its K loop waits for the tensor cores before it
  unpacks the next block, once per token tile: 1042 us at 512 tokens, 28672x8192, 4-bit (bf16: 302).
- "a8_unpack_int_mm": `_unpack_kernel` writes the signed codes a byte each ([N, KP] in the same K order, freed
  after the call), then cuBLAS's int8 GEMM (`torch._int_mm`) and `scale_int_product`; the analogue of the
  weight-only dequantize + cuBLAS path. Needs N % 8 == 0.
- "a8_rounded_x": x rounded to its int8 levels in x's dtype (`round_rows`), then the weight-only "triton" path of
  `gpu_backends` on the same packed weight (its measured kernel and tile). The product is the int8 one up to the
  rounding of x's dequantized levels to x's dtype (2^-9 relative in bfloat16), and it runs at the weight-only
  decode's speed (3-4x the fused kernel at one token, session 25).
Float8 activations (w<b>gcf8: x per token in e4m3, scaled by absmax / 448; codes of up to 5 bits are exact in
e4m3) have two paths of the same kinds: "f8_unpack_scaled_mm" (the codes unpacked to e4m3 bytes, then
`torch._scaled_mm` with row-wise scales; N % 16 == 0) and "f8_rounded_x" (x rounded to its e4m3 values, then the
weight-only path). A latency table measured on CUDA times a choice's paths per (shape, bits, tokens) and installs
the fastest (`use_measured`, `DISPATCH`, per activation format); without one, `default_path` picks by the token
count.

Backends "int8_act_packed" and "fp8_act_packed" (layout "gpu_planes"; never picked automatically: `apply`
forces them for a plan's w<b>gca8 layers with b < 8 (and w8gca8 layers whose shape torch._int_mm does not take)
and its w<b>gcf8 layers, `act_backend`): these paths on CUDA; in Triton's CPU interpreter the int8 ones; on the
CPU the same products in torch ops (the codes unpacked per call).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from . import triton_linear as tlin
from .backends import Backend, QuantizedWeightLike, register_backend
from .choice import QuantSpec
from .gpu_activation_quant import (FP8_MAX_EXACT_BITS, FP8_REQUIREMENT, INT8_ACT, fp8_available, int8_matmul,
                                   never_fast, quantize_rows, round_activations, round_rows, scale_int_product,
                                   signed_codes)
from .gpu_backends import GPU_LAYOUT, gpu_weight, run_gpu_weight
from .gpu_layout import WORD_ROWS, GpuPackedWeight, dense_to_gpu_bytes, gpu_bytes_to_dense
from .triton_linear import HAVE_TRITON, Config, tl, triton

A8_WEIGHT_BITS = (2, 3, 4, 5, 6, 8)  # 8-bit: where torch._int_mm ("int8_act") cannot run the shape (`act_backend`)
# activation format -> the paths a layer of it can run
PATHS = {"int": ("a8_fused", "a8_unpack_int_mm", "a8_rounded_x"), "fp8": ("f8_unpack_scaled_mm", "f8_rounded_x")}
ALL_PATHS = tuple(p for names in PATHS.values() for p in names)
# `default_path` without a measurement, timed against each other on an H100 in session 27
# (docs/gpu_runs/a8_paths_session27_h100.md; 28672x8192 4-bit): up to ROUNDED_X_MAX_M rows the weight-only kernels
# on rounded x (1 token: 69.8 us, the fused kernel 166.9, bf16 170.9); from UNPACK_MIN_M rows unpack + torch._int_mm
# (512 tokens: 478.7 us, fused 1041.0, rounded x 543.6) or + torch._scaled_mm (424.5 us; 356.4 with session 28's
# e4m3 unpack, bf16 302.4, docs/gpu_runs/a8_paths_session28_h100.md); the fused kernel in between (64 tokens:
# 207.3 us, rounded x 249.2). These picked the fastest path in 39 of the run's 45 cases (3 shapes, w2gca8 /
# w4gca8 / w4gcf8, 1..512 tokens), at worst 1.15x slower; a latency table installs the fastest.
ROUNDED_X_MAX_M = 16
UNPACK_MIN_M = 128
# (N, K, bits, activation format, tokens) -> the path a latency table measured fastest on this device (`use_measured`)
DISPATCH: dict[tuple[int, int, int, str, int], str] = {}

if HAVE_TRITON:
    @triton.jit
    def _code(a, b, i: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, ZERO: tl.constexpr,
              FP8: tl.constexpr = False):
        """Signed code c = code - ZERO of slot i of plane-0 words a and plane-1 words b (unused if W1 == 0): int8,
        or with FP8 float8 e4m3 (exact for |c| <= 16). The float8 value is made without an int-to-float
        conversion (I2F issues at a quarter of the integer rate): 0x6410 + c are the float16 bits of 1040 + c,
        less 1040 exactly, then one float16 -> e4m3 conversion per pair. On an H100 (session 28) this took the e4m3
        unpack from 218 to 149 us over torch._scaled_mm at 28672x8192, 4 bits, the int8 unpack's 147."""
        u = (a >> (i * W0)) & ((1 << W0) - 1)
        if W1 > 0:
            u = u | (((b >> (i * W1)) & ((1 << W1) - 1)) << W0)
        if FP8:
            c = ((u + (0x6410 - ZERO)).to(tl.int16).to(tl.float16, bitcast=True) - 1040.0).to(tl.float8e4nv)
        else:
            c = (u - ZERO).to(tl.int8)
        return c

    @triton.jit
    def _join8(c0, c1, c2, c3, c4, c5, c6, c7):
        """[..., 2, 2, 2] whose element (b2, b1, b0) is c_(4 b2 + 2 b1 + b0). `tl.join` keeps its new dimension in
        the thread's registers, so a thread holds the eight codes of its word side by side (a broadcast over a new
        slot dimension spread the slots over threads and stored the operand a byte at a time)."""
        return tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))

    @triton.jit
    def _block_codes(a, b, PER: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, ZERO: tl.constexpr,
                     FP8: tl.constexpr = False):
        """The block's signed codes [BN, 16 PER] (int8, or e4m3 with FP8) from its words a, b [BN, 16]: column
        j * PER + i is slot i of word row j (input column 16 i + j of the block; `quantize_rows(..., per=PER)`
        orders x the same way)."""
        if PER == 4:  # byte codes: (b1, b0) is slot 2 b1 + b0
            w = tl.join(tl.join(_code(a, b, 0, W0, W1, ZERO, FP8), _code(a, b, 2, W0, W1, ZERO, FP8)),
                        tl.join(_code(a, b, 1, W0, W1, ZERO, FP8), _code(a, b, 3, W0, W1, ZERO, FP8)))
        elif PER == 8:
            w = _join8(_code(a, b, 0, W0, W1, ZERO, FP8), _code(a, b, 1, W0, W1, ZERO, FP8),
                       _code(a, b, 2, W0, W1, ZERO, FP8), _code(a, b, 3, W0, W1, ZERO, FP8),
                       _code(a, b, 4, W0, W1, ZERO, FP8), _code(a, b, 5, W0, W1, ZERO, FP8),
                       _code(a, b, 6, W0, W1, ZERO, FP8), _code(a, b, 7, W0, W1, ZERO, FP8))
        else:  # 16 slots: the first join (the slowest dimension) pairs slot i with slot i + 8
            w = _join8(tl.join(_code(a, b, 0, W0, W1, ZERO, FP8), _code(a, b, 8, W0, W1, ZERO, FP8)),
                       tl.join(_code(a, b, 1, W0, W1, ZERO, FP8), _code(a, b, 9, W0, W1, ZERO, FP8)),
                       tl.join(_code(a, b, 2, W0, W1, ZERO, FP8), _code(a, b, 10, W0, W1, ZERO, FP8)),
                       tl.join(_code(a, b, 3, W0, W1, ZERO, FP8), _code(a, b, 11, W0, W1, ZERO, FP8)),
                       tl.join(_code(a, b, 4, W0, W1, ZERO, FP8), _code(a, b, 12, W0, W1, ZERO, FP8)),
                       tl.join(_code(a, b, 5, W0, W1, ZERO, FP8), _code(a, b, 13, W0, W1, ZERO, FP8)),
                       tl.join(_code(a, b, 6, W0, W1, ZERO, FP8), _code(a, b, 14, W0, W1, ZERO, FP8)),
                       tl.join(_code(a, b, 7, W0, W1, ZERO, FP8), _code(a, b, 15, W0, W1, ZERO, FP8)))
        return tl.reshape(w, (a.shape[0], 16 * PER))

    @triton.jit(do_not_specialize=["M", "KP", "KW", "rows_per_split", "SPLIT"])
    def _a8_kernel(xq, sx, p0, p1, s, out, M, N, KP, KW, stride_sn, rows_per_split, SPLIT, stride_om,
                   PER: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, ZERO: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, GROUP_M: tl.constexpr):
        """One tile of out^T = W xq^T, [BN weight rows, BM tokens], over one K-slice. Per K block the words
        [BN, 16] (N contiguous) become the signed codes [BN, 16 PER] (`_block_codes`), the dot's first operand;
        xq^T [16 PER, BM] (xq's rows KP long, in the same column order) is the second. Both are K-contiguous, as
        int8 tensor cores take them. With SPLIT > 1, `out` is the float32 [SPLIT, M, N] of partial sums."""
        pid_m, pid_n = tlin._tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
        pid_k = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        nmask = cols < N
        j = tl.arange(0, 16)
        kk = tl.arange(0, 16 * PER)
        acc = tl.zeros([BN, BM], dtype=tl.int32)
        r_lo = pid_k * rows_per_split
        r_hi = tl.minimum(r_lo + rows_per_split, KW)
        offs = (r_lo + j)[None, :] * N + cols[:, None]
        a = tl.load(p0 + offs, mask=nmask[:, None], other=0)
        b = tl.load(p1 + offs, mask=nmask[:, None], other=0).to(tl.int32) if W1 > 0 else a
        for r0 in range(r_lo, r_hi, 16):
            # the next block's words are loaded before this block's codes are made: Triton's pipeliner leaves
            # loads that reach the dot through `tl.join` alone, and each block would wait for its words
            offs += 16 * N
            nxt = nmask[:, None] & (r0 + 16 < r_hi)
            a_next = tl.load(p0 + offs, mask=nxt, other=0)
            b_next = tl.load(p1 + offs, mask=nxt, other=0).to(tl.int32) if W1 > 0 else a_next
            w = _block_codes(a, b, PER, W0, W1, ZERO)
            xt = tl.load(xq + rm[None, :] * KP + (r0 * PER + kk)[:, None], mask=rm[None, :] < M, other=0)
            acc = tl.dot(w, xt, acc, out_dtype=tl.int32)
            a, b = a_next, b_next
        sw = tl.load(s + cols * stride_sn, mask=nmask, other=0.0).to(tl.float32)
        y = acc.to(tl.float32) * sw[:, None] * tl.load(sx + rm, mask=rm < M, other=0.0)[None, :]
        omask = nmask[:, None] & (rm[None, :] < M)
        base = out + pid_k.to(tl.int64) * M * N if SPLIT > 1 else out
        tl.store(base + rm[None, :] * stride_om + cols[:, None], y.to(out.dtype.element_ty), mask=omask)

    @triton.jit(do_not_specialize=["KP"])
    def _unpack_kernel(p0, p1, out, N, KP, PER: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                       ZERO: tl.constexpr, FP8: tl.constexpr, BN: tl.constexpr):
        """One K block of BN weight rows: its signed codes into out [N, KP] int8, in `_block_codes`' column order
        (x quantized with `quantize_rows(..., per=PER)` matches it)."""
        r0 = tl.program_id(0) * 16
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        nmask = cols < N
        offs = (r0 + tl.arange(0, 16))[None, :] * N + cols[:, None]
        a = tl.load(p0 + offs, mask=nmask[:, None], other=0)
        b = tl.load(p1 + offs, mask=nmask[:, None], other=0).to(tl.int32) if W1 > 0 else a
        kk = r0 * PER + tl.arange(0, 16 * PER)
        codes = _block_codes(a, b, PER, W0, W1, ZERO, FP8)
        tl.store(out + cols[:, None].to(tl.int64) * KP + kk[None, :], codes, mask=nmask[:, None])

    @triton.jit(do_not_specialize=["MN", "SPLIT"])
    def _sum_slices_kernel(parts, out, MN, SPLIT, BLOCK: tl.constexpr):
        """out (contiguous, MN elements) = the sum of the SPLIT float32 slices of `parts`, in out's dtype: one
        kernel where `parts.sum(0).to(dtype)` was two."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(SPLIT):
            acc += tl.load(parts + i * MN + offs, mask=mask, other=0.0)
        tl.store(out + offs, acc.to(out.dtype.element_ty), mask=mask)


def default_config(m: int, gw: GpuPackedWeight) -> Config:
    """Tile for m token rows (block_m tokens x block_n weight rows), the fastest of `bench_kernels_gpu.py`'s sweep
    on an H100 (session 25): up to 16 rows, 64 weight rows split K to fill the device; up to 64, 256 weight rows;
    above, one tile a program, 64 x 256 at 2/3 bits and 128 x 128 at 4..6 bits."""
    n, blocks = gw.shape[0], gw.planes[0].shape[0] // WORD_ROWS
    if m <= 16:
        return Config(16, 64, tlin.split_for(-(-n // 64), blocks, waves=2), 4, 1)
    if m <= 64:
        bm = 32 if m <= 32 else 64
        return Config(bm, 256, tlin.split_for(-(-n // 256) * -(-m // bm), blocks, waves=2), 8, 1)
    return Config(64, 256, 1, 8, 3) if gw.per == 16 else Config(128, 128, 1, 8, 4)


def supported(gw: GpuPackedWeight) -> str | None:
    """Why the W<b>A8 paths cannot run `gw` (None: they can)."""
    if gw.bits not in A8_WEIGHT_BITS or gw.zeros is not None or gw.spec.group_size is not None:
        return (f"the W<b>A8 kernel runs symmetric per-channel {A8_WEIGHT_BITS}-bit weights; got {gw.spec}")
    return None


def _code_args(gw: GpuPackedWeight) -> tuple[torch.Tensor, dict[str, int]]:
    """The plane-1 pointer (plane 0 again when there is none) and the code constants the kernels take."""
    widths = gw.widths
    return gw.planes[1] if len(widths) > 1 else gw.planes[0], dict(
        PER=gw.per, W0=widths[0], W1=widths[1] if len(widths) > 1 else 0, ZERO=1 << (gw.bits - 1))


def unpack_codes(gw: GpuPackedWeight, fp8: bool = False) -> torch.Tensor:
    """The signed codes of `gw` as int8 (or float8 e4m3) [N, KP] (K padded to whole blocks), each block's columns
    in the fused kernel's order (`quantize_rows(..., per=gw.per)` orders x the same way)."""
    n = gw.shape[0]
    kw = gw.planes[0].shape[0]
    out = torch.empty(n, kw * gw.per, dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=gw.scales.device)
    p1, consts = _code_args(gw)
    _unpack_kernel[(kw // WORD_ROWS, triton.cdiv(n, 128))](gw.planes[0], p1, out, n, kw * gw.per, FP8=fp8, BN=128,
                                                           num_warps=4, **consts)
    return out


def unpack_matmul(x: torch.Tensor, gw: GpuPackedWeight) -> torch.Tensor:
    """x [M, K] @ W^T as the prefill path runs it: the codes unpacked to int8 bytes (`unpack_codes`), x quantized
    per token in their order, torch._int_mm, the product scaled by x's and W's scales. Needs N % 8 == 0."""
    m = x.shape[0]
    xq, sx = quantize_rows(x.contiguous(), fp8=False, multiple=8, minimum=24, per=gw.per)  # CUDA: > 16 rows
    return scale_int_product(torch._int_mm(xq, unpack_codes(gw).t()), sx, gw.scales.reshape(-1), m, x.dtype)


def unpack_scaled_mm(x: torch.Tensor, gw: GpuPackedWeight) -> torch.Tensor:
    """x [M, K] @ W^T with x and the codes in float8 e4m3 ("f8_unpack_scaled_mm"): the codes unpacked to e4m3
    bytes, x quantized per token to e4m3 in their order, torch._scaled_mm with x's and W's scales (row-wise scales
    give bfloat16 only: other dtypes are cast from it). Needs N % 16 == 0 (CUDA, compute capability >= 8.9)."""
    m = x.shape[0]
    xq, sx = quantize_rows(x.contiguous(), fp8=True, multiple=16, minimum=16, per=gw.per)
    sw = gw.scales.reshape(1, -1).float()
    y = torch._scaled_mm(xq, unpack_codes(gw, fp8=True).t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)
    return y[:m].to(x.dtype)


def fused(x: torch.Tensor, gw: GpuPackedWeight, config: Config | None = None) -> torch.Tensor:
    """x [M, K] @ W^T by the fused kernel ("a8_fused") at `config` (default: `default_config`)."""
    m, n = x.shape[0], gw.shape[0]
    cfg = config or default_config(m, gw)
    xq, sx = quantize_rows(x.contiguous(), fp8=False, multiple=1, minimum=1, per=gw.per)
    kw = gw.planes[0].shape[0]
    rows_per_split, split = tlin.k_slices(kw, cfg.split_k)
    out = torch.empty((split, m, n) if split > 1 else (m, n), dtype=torch.float32 if split > 1 else x.dtype,
                      device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    p1, consts = _code_args(gw)
    _a8_kernel[grid](xq, sx, gw.planes[0], p1, gw.scales, out, m, n, xq.shape[1], kw, gw.scales.stride(1),
                     rows_per_split, split, n, BM=cfg.block_m, BN=cfg.block_n, GROUP_M=8, num_warps=cfg.num_warps,
                     num_stages=cfg.num_stages, **consts)
    if split == 1:
        return out
    total = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _sum_slices_kernel[(triton.cdiv(m * n, 1024),)](out, total, m * n, split, BLOCK=1024, num_warps=4)
    return total


def rounded_x(x: torch.Tensor, gw: GpuPackedWeight, fp8: bool = False) -> torch.Tensor:
    """x [M, K] @ W^T as "a8_rounded_x" ("f8_rounded_x" with fp8): x rounded to its int8 levels (e4m3 values) by
    `round_rows`, then the weight-only path."""
    return run_gpu_weight(round_rows(x.contiguous(), fp8), gw)


_RUN = {"a8_fused": fused, "a8_unpack_int_mm": unpack_matmul, "a8_rounded_x": rounded_x,
        "f8_unpack_scaled_mm": unpack_scaled_mm, "f8_rounded_x": functools.partial(rounded_x, fp8=True)}


def path_error(path: str, gw: GpuPackedWeight) -> str | None:
    """Why `path` (one of PATHS) cannot run `gw` (None: it can)."""
    if path == "a8_unpack_int_mm" and gw.shape[0] % 8:
        return f"a8_unpack_int_mm needs N % 8 == 0 (torch._int_mm on CUDA); N is {gw.shape[0]}"
    if path == "f8_unpack_scaled_mm" and gw.shape[0] % 16:
        return f"f8_unpack_scaled_mm needs N % 16 == 0 (torch._scaled_mm); N is {gw.shape[0]}"
    return None


def path_format(path: str) -> str:
    """The activation format ("int" or "fp8") whose paths `path` is one of; ValueError for other names."""
    for fmt, names in PATHS.items():
        if path in names:
            return fmt
    raise ValueError(f"path={path!r} is not a W<b>A8 path; choose from {ALL_PATHS}")


def default_path(m: int, gw: GpuPackedWeight, act_format: str = "int") -> str:
    """The path for m token rows without a measurement (see ROUNDED_X_MAX_M and UNPACK_MIN_M)."""
    if act_format == "fp8":
        unpack = m >= UNPACK_MIN_M and path_error("f8_unpack_scaled_mm", gw) is None
        return "f8_unpack_scaled_mm" if unpack else "f8_rounded_x"
    if m >= UNPACK_MIN_M and path_error("a8_unpack_int_mm", gw) is None:
        return "a8_unpack_int_mm"
    return "a8_rounded_x" if m <= ROUNDED_X_MAX_M else "a8_fused"


def use_measured(shape: tuple[int, int], bits: int, tokens: int, path: str) -> None:
    """Run W<b>A8 layers of this [N, K] shape and bit width (and the activation format of `path`) at `tokens` token
    rows by `path` (a latency table's measured winner; one of PATHS)."""
    DISPATCH[(shape[0], shape[1], bits, path_format(path), tokens)] = path


def pick(m: int, gw: GpuPackedWeight, act_format: str = "int") -> str:
    """The path for m token rows: the measured winner at the nearest measured token count (m itself if measured;
    the lower of two equally near), else `default_path`."""
    layer = (*gw.shape, gw.bits, act_format)
    near = [key for key in DISPATCH if key[:4] == layer]
    if not near:
        return default_path(m, gw, act_format)
    return DISPATCH[min(near, key=lambda key: (abs(key[4] - m), key[4]))]


def paths(gw: GpuPackedWeight, act_format: str = "int") -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> fn(x [M, K]) for every path of `act_format` that can run `gw` (what a latency table times on CUDA)."""
    return {p: (lambda x, run=_RUN[p]: run(x, gw)) for p in PATHS[act_format] if path_error(p, gw) is None}


def linear(x: torch.Tensor, gw: GpuPackedWeight, config: Config | None = None,
           act_format: str = "int") -> torch.Tensor:
    """x [M, K] @ W^T in x's dtype, x quantized per token (absmax) to int8, or to e4m3 with act_format "fp8": by
    `pick`'s path, or with a config by the fused int8 kernel at that tile."""
    reason = supported(gw)
    if reason is not None:
        raise ValueError(reason)
    k = gw.shape[1]
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}, the weight expects [M, {k}]")
    if config is not None:
        if act_format != "int":
            raise ValueError(f"config={config.label!r} tiles the fused int8 kernel; float8 activations have none")
        return fused(x, gw, config)
    return _RUN[pick(x.shape[0], gw, act_format)](x, gw)


def _supports(spec: QuantSpec, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    return (spec.bits in A8_WEIGHT_BITS and spec.symmetric and spec.group_size is None and dtype.is_floating_point
            and hasattr(torch, "_int_mm") and (device.type == "cpu" or (device.type == "cuda" and HAVE_TRITON)))


def _linear(x: torch.Tensor, qw: QuantizedWeightLike) -> torch.Tensor:
    if HAVE_TRITON and (x.is_cuda or not tlin.ASM):
        return linear(x, gpu_weight(qw))
    return int8_matmul(x, signed_codes(gpu_weight(qw)).to(torch.int8).t(), qw.scales.reshape(-1), fused=False)


INT8_ACT_PACKED = register_backend(Backend("int8_act_packed", _supports, _linear, layout=GPU_LAYOUT,
                                           to_layout=dense_to_gpu_bytes, from_layout=gpu_bytes_to_dense, fast=never_fast,
                                           group_major=True))


def _fp8_supports(spec: QuantSpec, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    return (spec.bits <= FP8_MAX_EXACT_BITS and spec.symmetric and spec.group_size is None
            and dtype.is_floating_point and (device.type == "cpu" or (HAVE_TRITON and fp8_available(device))))


def _fp8_linear(x: torch.Tensor, qw: QuantizedWeightLike) -> torch.Tensor:
    """On CUDA `linear`'s fp8 paths; elsewhere (Triton's CPU interpreter too: it rounds to e4m3 wrongly) x rounded
    to its e4m3 values per token, times the codes in float32, scaled: what the e4m3 product computes."""
    if x.is_cuda:
        return linear(x, gpu_weight(qw), act_format="fp8")
    codes = signed_codes(gpu_weight(qw)).float()
    return ((round_activations(x.float(), 8, "fp8") @ codes.t()) * qw.scales.reshape(1, -1).float()).to(x.dtype)


def _fp8_why_not(spec: QuantSpec, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type == "cuda" and not fp8_available(device):
        return f"{FP8_REQUIREMENT}, which {torch.cuda.get_device_name(device)} lacks"
    return None


FP8_ACT_PACKED = register_backend(Backend("fp8_act_packed", _fp8_supports, _fp8_linear, layout=GPU_LAYOUT,
                                          to_layout=dense_to_gpu_bytes, from_layout=gpu_bytes_to_dense,
                                          fast=never_fast, group_major=True, why_not=_fp8_why_not))


def act_backend(spec: QuantSpec, shape: tuple[int, int], act_format: str = "int") -> Backend:
    """The backend a linear layer of `spec` and [out, in] `shape` with 8-bit activations runs: for float8
    activations "fp8_act_packed"; for int8 ones "int8_act" (cuBLAS's int8 GEMM on the codes a byte each) for
    8-bit weights whose out and in are multiples of 8 (what torch._int_mm takes on CUDA), else "int8_act_packed"."""
    if act_format == "fp8":
        return FP8_ACT_PACKED
    if spec.bits == 8 and shape[0] % 8 == 0 and shape[1] % 8 == 0:
        return INT8_ACT
    return INT8_ACT_PACKED
