"""Triton weight-only b-bit linear (b in 2, 3, 4, 5, 6, 8) on the bit-plane layout of `gpu_layout`.

The kernels unpack with a shift and a mask per code and plane, then the fp32 "magic number" conversion
`bitcast(u | 0x4B000000) - (2^23 + zero)` (one FADD instead of an int-to-float and a subtract):
- `_gemv_kernel`: one token row per program, split-K over the grid, fp32 FMAs reduced in registers
  (decode, M <= GEMV_MAX_M); wide tiles along N keep each column's K-reduction inside one thread;
- `_gemm_kernel`: tensor-core tl.dot on the dequantized tile (codes unpacked straight into a [BK, BN]
  tile, each word read once per code from L1), M > GEMV_MAX_M; split-K for decode batches;
- `_dequant_kernel`: the float weight [K, N] for the dequantize + cuBLAS path.
Split-K partial sums go through an fp32 workspace with atomics. Group sizes that are not a multiple
of 32 have no fused kernel: `linear` says so once and uses dequantize + matmul.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .gpu_layout import GpuPackedWeight

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # CPU-only installs
    triton = tl = None
    HAVE_TRITON = False

GEMV_MAX_M = 1
MAGIC = 0x4B000000  # float32 2^23: OR-ing an integer < 2^23 into its mantissa gives 2^23 + u


@dataclass(frozen=True)
class Config:
    """Tile shape of one launch: block_k in input columns; split_k K-slices on the grid."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2

    @property
    def label(self) -> str:
        return f"m{self.block_m}n{self.block_n}k{self.block_k}s{self.split_k}w{self.num_warps}p{self.num_stages}"


if HAVE_TRITON:
    @triton.jit
    def _unpack(p0, p1, rows, cols, mask, N, PER: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr):
        """Codes [BKW, PER, BN] + 2^23 as float32 (bit pattern 0x4B000000 | u) of packed rows `rows`, columns `cols`."""
        offs = rows[:, None] * N + cols[None, :]
        a = tl.load(p0 + offs, mask=mask, other=0)
        shifts = tl.arange(0, PER)[None, :, None]
        u = (a[:, None, :] >> (shifts * W0)) & ((1 << W0) - 1)
        if W1 > 0:
            b = tl.load(p1 + offs, mask=mask, other=0).to(tl.int32)
            u = u | (((b[:, None, :] >> (shifts * W1)) & ((1 << W1) - 1)) << W0)
        return (u | 0x4B000000).to(tl.float32, bitcast=True)

    @triton.jit
    def _unpack_2d(p0, p1, ks, cols, mask, N, PER: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr):
        """Codes [BK, BN] + 2^23 as float32 of input columns `ks` (each word loaded once per code, from L1)."""
        offs = (ks // PER)[:, None] * N + cols[None, :]
        sub = (ks % PER)[:, None]
        u = (tl.load(p0 + offs, mask=mask, other=0) >> (sub * W0)) & ((1 << W0) - 1)
        if W1 > 0:
            b = tl.load(p1 + offs, mask=mask, other=0).to(tl.int32)
            u = u | (((b >> (sub * W1)) & ((1 << W1) - 1)) << W0)
        return (u | 0x4B000000).to(tl.float32, bitcast=True)

    @triton.jit(do_not_specialize=["K", "KW", "G", "rows_per_split"])
    def _gemv_kernel(x, p0, p1, s, z, out, ws, N, K, KW, G, stride_sg, stride_sn, rows_per_split, stride_xm, stride_om,
                     PER: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, ZERO: tl.constexpr,
                     HAS_Z: tl.constexpr, ATOMIC: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.program_id(2)
        cols = pid_n * BN + tl.arange(0, BN)
        nmask = cols < N
        acc = tl.zeros([BN], dtype=tl.float32)
        r_lo = pid_k * rows_per_split
        r_hi = tl.minimum(r_lo + rows_per_split, KW)
        for r0 in range(r_lo, r_hi, BKW):
            rows = r0 + tl.arange(0, BKW)
            mask = (rows < KW)[:, None] & nmask[None, :]
            offs = rows[:, None] * N + cols[None, :]
            a = tl.load(p0 + offs, mask=mask, other=0)
            if W1 > 0:
                b = tl.load(p1 + offs, mask=mask, other=0).to(tl.int32)
            g = (r0 * PER) // G
            sc = tl.load(s + g * stride_sg + cols * stride_sn, mask=nmask, other=0.0).to(tl.float32)
            if HAS_Z:
                bias = 8388608.0 + tl.load(z + g * stride_sg + cols * stride_sn, mask=nmask, other=0.0).to(tl.float32)
            else:
                bias = tl.full([BN], 8388608.0 + ZERO, tl.float32)
            part = tl.zeros([BKW, BN], dtype=tl.float32)
            for i in tl.static_range(PER):
                u = (a >> (i * W0)) & ((1 << W0) - 1)
                if W1 > 0:
                    u = u | (((b >> (i * W1)) & ((1 << W1) - 1)) << W0)
                w = (u | 0x4B000000).to(tl.float32, bitcast=True) - bias[None, :]
                ks = rows * PER + i
                xi = tl.load(x + m * stride_xm + ks, mask=ks < K, other=0.0).to(tl.float32)
                part += xi[:, None] * w
            acc += tl.sum(part, axis=0) * sc
        if ATOMIC:
            tl.atomic_add(ws + m * N + cols, acc, mask=nmask, sem="relaxed")
        else:
            tl.store(out + m * stride_om + cols, acc.to(out.dtype.element_ty), mask=nmask)

    @triton.jit(do_not_specialize=["M", "K", "KW", "G", "rows_per_split"])
    def _gemm_kernel(x, p0, p1, s, z, out, ws, M, N, K, KW, G, stride_sg, stride_sn, rows_per_split, stride_xm, stride_om,
                     PER: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, ZERO: tl.constexpr,
                     HAS_Z: tl.constexpr, ATOMIC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BKW: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        n_m = tl.cdiv(M, BM)
        n_n = tl.cdiv(N, BN)
        width = GROUP_M * n_n
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        rm = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        nmask = cols < N
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        r_lo = pid_k * rows_per_split
        r_hi = tl.minimum(r_lo + rows_per_split, KW)
        for r0 in range(r_lo, r_hi, BKW):
            ks = r0 * PER + tl.arange(0, BKW * PER)
            w = _unpack_2d(p0, p1, ks, cols, (ks < KW * PER)[:, None] & nmask[None, :], N, PER, W0, W1)
            g = (r0 * PER) // G
            sc = tl.load(s + g * stride_sg + cols * stride_sn, mask=nmask, other=0.0).to(tl.float32)
            if HAS_Z:
                bias = 8388608.0 + tl.load(z + g * stride_sg + cols * stride_sn, mask=nmask, other=0.0).to(tl.float32)
                w = w - bias[None, :]
            else:
                w = w - (8388608.0 + ZERO)
            xt = tl.load(x + rm[:, None] * stride_xm + ks[None, :], mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0)
            acc = tl.dot(xt, (w * sc[None, :]).to(xt.dtype), acc)
        omask = (rm[:, None] < M) & nmask[None, :]
        if ATOMIC:
            tl.atomic_add(ws + rm[:, None] * N + cols[None, :], acc, mask=omask, sem="relaxed")
        else:
            tl.store(out + rm[:, None] * stride_om + cols[None, :], acc.to(out.dtype.element_ty), mask=omask)

    @triton.jit(do_not_specialize=["K", "KW", "G"])
    def _dequant_kernel(p0, p1, s, z, out, N, K, KW, G, stride_sg, stride_sn, PER: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                        ZERO: tl.constexpr, HAS_Z: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr):
        rows = tl.program_id(0) * BKW + tl.arange(0, BKW)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        nmask = cols < N
        w = _unpack(p0, p1, rows, cols, (rows < KW)[:, None] & nmask[None, :], N, PER, W0, W1) - 8388608.0
        ks = rows[:, None] * PER + tl.arange(0, PER)[None, :]
        g = ks // G
        mask = (ks < K)[:, :, None] & nmask[None, None, :]
        offs = g[:, :, None] * stride_sg + cols[None, None, :] * stride_sn
        if HAS_Z:
            w = w - tl.load(z + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            w = w - ZERO
        w = w * tl.load(s + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + ks[:, :, None] * N + cols[None, None, :], w.to(out.dtype.element_ty), mask=mask)


def fused_supported(gw: GpuPackedWeight) -> bool:
    """Whether the fused kernels run this weight: the group width must be a multiple of 32 columns."""
    return gw.group % 32 == 0


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def default_config(m: int, gw: GpuPackedWeight) -> Config:
    """Heuristic tile shape for m token rows (the latency table measures the alternatives)."""
    n, k = gw.shape
    kw = gw.planes[0].shape[0]
    if m <= GEMV_MAX_M:
        bn, bk = 512, _pow2_divisor(gw.group, 16 * gw.per)
        bk = max(bk, min(32, gw.group))
        split = split_for(-(-n // bn), kw * gw.per // bk)
        return Config(1, bn, bk, split, 4, 1)
    if m <= 64:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        bn, bk = 64, _pow2_divisor(gw.group, 64)
        split = split_for(-(-n // bn) * -(-m // bm), kw * gw.per // bk, waves=2)
        return Config(bm, bn, bk, split, 4, 3)
    return Config(128, 128, _pow2_divisor(gw.group, 64), 1, 8, 3)


def split_for(programs: int, k_tiles: int, waves: int = 4, sms: int = 132) -> int:
    """K-slices giving about `waves` programs per SM, at least one K tile per slice."""
    return max(1, min(-(-waves * sms // programs), k_tiles))


def _check_config(cfg: Config, gw: GpuPackedWeight) -> None:
    if gw.group % cfg.block_k or cfg.block_k % gw.per or cfg.block_k < max(16, gw.per):
        raise ValueError(f"block_k={cfg.block_k} must divide the group width {gw.group}, be a multiple of "
                         f"{gw.per} columns and at least 16")


def _args(gw: GpuPackedWeight):
    widths = gw.widths
    p1 = gw.planes[1] if len(widths) > 1 else gw.planes[0]
    z = gw.zeros if gw.zeros is not None else gw.scales
    if gw.zeros is not None and gw.zeros.stride() != gw.scales.stride():
        raise ValueError("scales and zeros must have the same strides")
    return dict(p0=gw.planes[0], p1=p1, s=gw.scales, z=z, stride_sg=gw.scales.stride(0),
                stride_sn=gw.scales.stride(1)), dict(
        PER=gw.per, W0=widths[0], W1=widths[1] if len(widths) > 1 else 0,
        ZERO=float(1 << (gw.bits - 1)), HAS_Z=gw.zeros is not None)


def dequantize(gw: GpuPackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The float weight transposed, [K, N] in `dtype`, computed on the GPU."""
    n, k = gw.shape
    kw = gw.planes[0].shape[0]
    out = torch.empty(k, n, dtype=dtype, device=gw.scales.device)
    tensors, consts = _args(gw)
    bkw = max(1, 64 // gw.per)
    grid = (triton.cdiv(kw, bkw), triton.cdiv(n, 128))
    _dequant_kernel[grid](out=out, N=n, K=k, KW=kw, G=gw.group, BN=128, BKW=bkw, **tensors, **consts)
    return out


_warned: set[str] = set()


def _fallback(x2: torch.Tensor, gw: GpuPackedWeight, why: str) -> torch.Tensor:
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"triton_linear: {why}; using dequantize + matmul for this weight", stacklevel=3)
    return x2 @ dequantize(gw, x2.dtype)


def linear(x: torch.Tensor, gw: GpuPackedWeight, config: Config | None = None) -> torch.Tensor:
    """y = x @ W^T for x [..., K] (float16 / bfloat16, CUDA) and a GPU-layout weight W [N, K]."""
    n, k = gw.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight expects {k}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"x.dtype={x.dtype} is not supported; use float16 or bfloat16")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if not fused_supported(gw):
        return _fallback(x2, gw, f"group width {gw.group} is not a multiple of 32").view(*lead, n)
    cfg = config or default_config(m, gw)
    _check_config(cfg, gw)
    kw = gw.planes[0].shape[0]
    bkw = cfg.block_k // gw.per
    rows_per_split = triton.cdiv(triton.cdiv(kw, cfg.split_k), bkw) * bkw
    split = triton.cdiv(kw, rows_per_split)
    atomic = split > 1
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws = torch.zeros(m, n, dtype=torch.float32, device=x.device) if atomic else out
    tensors, consts = _args(gw)
    if m <= GEMV_MAX_M and cfg.block_m == 1:
        grid = (triton.cdiv(n, cfg.block_n), split, m)
        _gemv_kernel[grid](x2, **tensors, out=out, ws=ws, N=n, K=k, KW=kw, G=gw.group,
                           rows_per_split=rows_per_split, stride_xm=x2.stride(0), stride_om=out.stride(0),
                           ATOMIC=atomic, BN=cfg.block_n, BKW=bkw, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages, **consts)
    else:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
        _gemm_kernel[grid](x2, **tensors, out=out, ws=ws, M=m, N=n, K=k, KW=kw, G=gw.group,
                           rows_per_split=rows_per_split, stride_xm=x2.stride(0), stride_om=out.stride(0),
                           ATOMIC=atomic, BM=cfg.block_m, BN=cfg.block_n, BKW=bkw, GROUP_M=8,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages, **consts)
    if atomic:
        out.copy_(ws)
    return out.view(*lead, n)


def dequant_matmul(x: torch.Tensor, gw: GpuPackedWeight) -> torch.Tensor:
    """Dequantize on the GPU, then cuBLAS: the prefill fallback."""
    return (x.reshape(-1, gw.shape[1]) @ dequantize(gw, x.dtype)).view(*x.shape[:-1], gw.shape[0])
