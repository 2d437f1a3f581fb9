"""W<b>A8: b-bit per-channel weight codes (b < 8) times int8 per-token activations, fused on int8 tensor cores.

out[m, n] = sx[m] * sw[n] * sum_k xq[m, k] * (code[n, k] - 2^(b-1)): x is quantized per token by
`gpu_activation_quant.quantize_rows` (one Triton kernel), the codes are read from the bit-plane layout of
`gpu_layout` (the packed bytes: a 4-bit weight stays half a byte a code in memory) and turned into signed int8
in registers (a shift and a mask per code, no float conversion), and each K block is one int8 `tl.dot`
accumulating in int32. Per-channel scales factor out of the K sum, so the float step is one multiply per output
at the end. Split-K (decode) writes one float32 slice of partial sums per K-slice, summed by a second kernel: the
atomic split-K of `triton_linear` summed some tiles of this kernel wrong on an H100 (session 25).

Backend "int8_act_packed" (layout "gpu_planes"; never picked automatically: `apply` forces it for a plan's
w<b>gca8 layers with b < 8, as it forces "int8_act" for w8gca8): this kernel on CUDA and in Triton's CPU
interpreter; on the CPU the codes unpacked to int8 and `torch._int_mm`, per call.
"""
from __future__ import annotations

import torch

from . import triton_linear as tlin
from .backends import Backend, QuantizedWeightLike, register_backend
from .choice import QuantSpec
from .gpu_activation_quant import int8_matmul, quantize_rows
from .gpu_backends import GPU_LAYOUT, gpu_weight
from .gpu_layout import WORD_ROWS, GpuPackedWeight, dense_to_gpu_bytes, gpu_bytes_to_dense
from .triton_linear import HAVE_TRITON, Config, tl, triton

A8_WEIGHT_BITS = (2, 3, 4, 5, 6)  # 8-bit weights run "int8_act" (cuBLAS's int8 GEMM on byte-wide codes)

if HAVE_TRITON:
    @triton.jit(do_not_specialize=["M", "K", "KW", "rows_per_split", "SPLIT"])
    def _a8_kernel(xq, sx, p0, p1, s, out, M, N, K, KW, stride_sn, rows_per_split, SPLIT, stride_om,
                   PER: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, ZERO: tl.constexpr,
                   EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """One tile of out^T = W xq^T, [BN weight rows, BM tokens], over one K-slice. Per K block the words are
        read as [BN, 16] (N contiguous), their codes become signed int8 [BN, PER, 16] and, reshaped to
        [BN, 16 PER] (column i * 16 + j is input column 16 i + j of the block, so no data moves), are the dot's
        first operand; xq^T [16 PER, BM] is the second. Both are K-contiguous, as int8 tensor cores take them.
        With SPLIT > 1, `out` is the float32 [SPLIT, M, N] of partial sums, one slice per K-slice."""
        pid_m, pid_n = tlin._tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
        pid_k = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        nmask = cols < N
        j = tl.arange(0, 16)
        slot = tl.arange(0, PER)
        kk = tl.arange(0, 16 * PER)
        acc = tl.zeros([BN, BM], dtype=tl.int32)
        r_lo = pid_k * rows_per_split
        r_hi = tl.minimum(r_lo + rows_per_split, KW)
        for r0 in range(r_lo, r_hi, 16):
            offs = (r0 + j)[None, :] * N + cols[:, None]
            a = tl.load(p0 + offs, mask=nmask[:, None], other=0)
            u = (a[:, None, :] >> (slot * W0)[None, :, None]) & ((1 << W0) - 1)
            if W1 > 0:
                b = tl.load(p1 + offs, mask=nmask[:, None], other=0).to(tl.int32)
                u = u | (((b[:, None, :] >> (slot * W1)[None, :, None]) & ((1 << W1) - 1)) << W0)
            w = tl.reshape((u - ZERO).to(tl.int8), (BN, 16 * PER))
            ks = r0 * PER + kk
            if EVEN_K:
                xt = tl.load(xq + rm[None, :] * K + ks[:, None], mask=rm[None, :] < M, other=0)
            else:
                xt = tl.load(xq + rm[None, :] * K + ks[:, None], mask=(rm[None, :] < M) & (ks[:, None] < K), other=0)
            acc = tl.dot(w, xt, acc, out_dtype=tl.int32)
        sw = tl.load(s + cols * stride_sn, mask=nmask, other=0.0).to(tl.float32)
        y = acc.to(tl.float32) * sw[:, None] * tl.load(sx + rm, mask=rm < M, other=0.0)[None, :]
        omask = nmask[:, None] & (rm[None, :] < M)
        base = out + pid_k.to(tl.int64) * M * N if SPLIT > 1 else out
        tl.store(base + rm[None, :] * stride_om + cols[:, None], y.to(out.dtype.element_ty), mask=omask)


def default_config(m: int, gw: GpuPackedWeight) -> Config:
    """Tile for m token rows (block_m tokens x block_n weight rows): decode tiles split K to fill the device;
    prefill tiles one 128 x 128 tile a program."""
    n, blocks = gw.shape[0], gw.planes[0].shape[0] // WORD_ROWS
    if m <= 64:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        return Config(bm, 64, tlin.split_for(-(-n // 64) * -(-m // bm), blocks, waves=2), 4, 1)
    return Config(128, 128, 1, 8, 3 if gw.per <= 8 else 2)


def supported(gw: GpuPackedWeight) -> str | None:
    """Why the fused kernel cannot run `gw` (None: it can)."""
    if gw.bits not in A8_WEIGHT_BITS or gw.zeros is not None or gw.spec.group_size is not None:
        return (f"the W<b>A8 kernel runs symmetric per-channel {A8_WEIGHT_BITS}-bit weights; got {gw.spec}")
    return None


def linear(x: torch.Tensor, gw: GpuPackedWeight, config: Config | None = None) -> torch.Tensor:
    """x [M, K] @ W^T in x's dtype, x quantized to int8 per token (absmax), W's codes signed in int8 on the fly."""
    reason = supported(gw)
    if reason is not None:
        raise ValueError(reason)
    n, k = gw.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}, the weight expects [M, {k}]")
    m = x.shape[0]
    cfg = config or default_config(m, gw)
    xq, sx = quantize_rows(x.contiguous(), fp8=False, multiple=1, minimum=1)
    kw = gw.planes[0].shape[0]
    rows_per_split, split = tlin.k_slices(kw, cfg.split_k)
    out = torch.empty((split, m, n) if split > 1 else (m, n), dtype=torch.float32 if split > 1 else x.dtype,
                      device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    widths = gw.widths
    _a8_kernel[grid](xq, sx, gw.planes[0], gw.planes[1] if len(widths) > 1 else gw.planes[0], gw.scales, out, m, n,
                     k, kw, gw.scales.stride(1), rows_per_split, split, n, PER=gw.per, W0=widths[0],
                     W1=widths[1] if len(widths) > 1 else 0, ZERO=1 << (gw.bits - 1), EVEN_K=k % gw.block == 0,
                     BM=cfg.block_m, BN=cfg.block_n, GROUP_M=8, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.sum(dim=0).to(x.dtype) if split > 1 else out


def signed_codes(qw: QuantizedWeightLike) -> torch.Tensor:
    """The layer's codes as signed int8 [out, in] (code - 2^(b-1)), from its "gpu_planes" bytes."""
    gw = gpu_weight(qw)
    return (gw.codes().to(torch.int16) - (1 << (qw.spec.bits - 1))).to(torch.int8)


def _supports(spec: QuantSpec, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    return (spec.bits in A8_WEIGHT_BITS and spec.symmetric and spec.group_size is None and dtype.is_floating_point
            and hasattr(torch, "_int_mm") and (device.type == "cpu" or (device.type == "cuda" and HAVE_TRITON)))


def _linear(x: torch.Tensor, qw: QuantizedWeightLike) -> torch.Tensor:
    if HAVE_TRITON and (x.is_cuda or not tlin.ASM):
        return linear(x, gpu_weight(qw))
    return int8_matmul(x, signed_codes(qw).t(), qw.scales.reshape(-1), fused=False)


def _never(spec: QuantSpec, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    return False


INT8_ACT_PACKED = register_backend(Backend("int8_act_packed", _supports, _linear, layout=GPU_LAYOUT,
                                           to_layout=dense_to_gpu_bytes, from_layout=gpu_bytes_to_dense, fast=_never,
                                           group_major=True))
