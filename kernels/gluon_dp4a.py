"""One-token integer-dot decode with a TMA ring (Gluon): the dp4a decode of `dp4a_linear`, its word tiles streamed
into shared memory STAGES K blocks ahead.

Session 18's profile of `dp4a_linear._gemv_dp4a_kernel` found it neither issue- nor DRAM-bound: each warp loads a
block's 16 word rows into registers, waits, sums them, and too few warps fit to cover the wait. Here the bytes in
flight live in shared memory instead of registers: one mbarrier per ring slot, TMA copies of [16, BN] word tiles
(and the second plane's), and every warp reads its columns of a slot's rows, then the slot is refilled with the
block STAGES ahead while the warps sum. The sums are `dp4a_linear`'s (same helpers, same activation digits from
`dp4a_linear.prepare_x`): the same arithmetic as `Config(dp4a=True)`. Not dispatched: written and compiled
for sm_90a in session 18, not yet run on a GPU (docs/kernels_gpu.md, "Session 18").
"""
from __future__ import annotations

import torch

from . import dp4a_linear as dl
from . import triton_linear as tlin
from .gpu_layout import WORD_ROWS, GpuPackedWeight

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except ImportError:  # Triton without Gluon, or no Triton
    HAVE_GLUON = False

TMA_BOX_MAX = 256  # elements per dimension of one TMA copy


def unsupported_reason(gw: GpuPackedWeight, block_n: int, device: torch.device) -> str | None:
    """Why the ring decode cannot run this weight at `block_n` columns per program on `device` (None: it can)."""
    if not (HAVE_GLUON and tlin.ASM and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)):
        return "the TMA ring decode needs Triton's Gluon and a CUDA device with TMA (compute capability 9.0 or newer)"
    if not dl.supported(gw):
        return f"the dp4a decode does not run group {gw.group} at {gw.bits} bits (dp4a_linear.supported)"
    if block_n > TMA_BOX_MAX or block_n % 32:
        return f"block_n={block_n}: a TMA copy takes a multiple of 32 and at most {TMA_BOX_MAX} columns"
    for p in gw.planes:
        if (p.stride(0) * p.element_size()) % 16 or p.data_ptr() % 16 or p.stride(1) != 1:
            return (f"TMA needs 16-byte aligned rows: a {p.dtype} plane of {gw.shape[0]} columns is not (N must be a "
                    f"multiple of {16 // p.element_size()})")
    return None


if HAVE_GLUON:
    @gluon.jit
    def _issue(d0, d1, ring0, ring1, bars, slot, r0, c0, pred, W1: gl.constexpr, TX_BYTES: gl.constexpr):
        """TMA copies of the K block at word row r0 (both planes) into ring slot `slot`, signalling bars[slot]."""
        bar = bars.index(slot)
        mbarrier.expect(bar, TX_BYTES, pred=pred)
        tma.async_copy_global_to_shared(d0, [r0, c0], bar, ring0.index(slot), pred=pred)
        if W1 > 0:
            tma.async_copy_global_to_shared(d1, [r0, c0], bar, ring1.index(slot), pred=pred)

    @gluon.jit
    def _gemv_dp4a_ring_kernel(xq, xs, xz, d0, d1, s, z, out, ws, cnt, N, K, KW, NB, G, stride_sg, stride_sn,
                               rows_per_split, SPLIT, stride_om, PER: gl.constexpr, W0: gl.constexpr,
                               W1: gl.constexpr, ZERO: gl.constexpr, HAS_Z: gl.constexpr, ATOMIC: gl.constexpr,
                               REGROUP: gl.constexpr, STAGES: gl.constexpr, TX_BYTES: gl.constexpr, BN: gl.constexpr,
                               WARPS: gl.constexpr):
        CPB: gl.constexpr = 8 // W0
        row_l: gl.constexpr = gl.BlockedLayout([1, BN // (32 * WARPS)], [1, 32], [1, WARPS], [1, 0])
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        m = gl.program_id(2)
        c0 = pid_n * BN
        cols = c0 + gl.arange(0, BN, layout=gl.SliceLayout(0, row_l))[None, :]
        nmask = cols < N
        acc = gl.zeros([1, BN], gl.float32, row_l)
        r_lo = pid_k * rows_per_split
        nblk = (gl.minimum(r_lo + rows_per_split, KW) - r_lo) // 16

        ring0 = gl.allocate_shared_memory(d0.dtype, [STAGES, 16, BN], d0.layout)
        if W1 > 0:
            ring1 = gl.allocate_shared_memory(d1.dtype, [STAGES, 16, BN], d1.layout)
        else:
            ring1 = ring0
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        fence_async_shared()
        for i in gl.static_range(STAGES):
            _issue(d0, d1, ring0, ring1, bars, i, r_lo + 16 * i, c0, i < nblk, W1, TX_BYTES)

        for b in range(nblk):
            slot = b % STAGES
            mbarrier.wait(bars.index(slot), (b // STAGES) & 1)
            words = ()
            spread = ()
            for j in gl.static_range(16):
                words = words + (ring0.index(slot).slice(j, 1).load(row_l).to(gl.int32),)
                if W1 > 0:
                    spread = spread + (dl._spread(ring1.index(slot).slice(j, 1).load(row_l).to(gl.int32),
                                                  W1 * CPB),)
                else:
                    spread = words
            gl.thread_barrier()  # every warp holds its columns of the slot: refill it
            _issue(d0, d1, ring0, ring1, bars, slot, r_lo + 16 * (b + STAGES), c0, b + STAGES < nblk, W1, TX_BYTES)

            r0 = r_lo + 16 * b
            zeros = gl.zeros([1, BN], gl.int32, row_l)
            lo0, hi0, lo1, hi1 = dl._block_sums(words, spread, xq + ((m * KW + r0) * CPB) * 2, zeros, zeros, zeros,
                                                zeros, CPB, W0, W1, REGROUP, True)
            acc = dl._add_block(acc, lo0, hi0, lo1, hi1, r0, m, s, z, xs, xz, cols, nmask, K, NB, G, stride_sg,
                                stride_sn, PER, ZERO, HAS_Z, REGROUP)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        tlin._finish(acc, out + m * stride_om + cols, ws + m * N + cols, nmask, cnt + m * gl.num_programs(0) + pid_n,
                     SPLIT, ATOMIC)


def _descriptor(plane: torch.Tensor, bn: int) -> "TensorDescriptor":
    bits = plane.element_size() * 8
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=bits, rank=2)
    return TensorDescriptor.from_tensor(plane, [WORD_ROWS, bn], layout)


def linear(x2: torch.Tensor, gw: GpuPackedWeight, block_n: int, split_k: int, num_warps: int,
           stages: int) -> torch.Tensor:
    """y = x2 @ W^T for x2 [M, K] (float16 / bfloat16): `dp4a_linear.prepare_x`, then one program per (column tile,
    K-slice, token) streaming its K-slice's word tiles through a `stages`-slot TMA ring."""
    reason = unsupported_reason(gw, block_n, x2.device)
    if reason is not None:
        raise ValueError(reason)
    m, k = x2.shape
    n = gw.shape[0]
    kw = gw.planes[0].shape[0]
    rows_per_split, split = tlin.k_slices(kw, split_k)
    xq, xs, xz = dl.prepare_x(x2, gw)
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    grid = (-(-n // block_n), split, m)
    ws, cnt = tlin._workspace(x2.device, m * n, m * grid[0]) if split > 1 else (out, out)
    tensors, consts = tlin._args(gw)
    d0 = _descriptor(gw.planes[0], block_n)
    d1 = _descriptor(gw.planes[1], block_n) if len(gw.planes) > 1 else d0
    _gemv_dp4a_ring_kernel[grid](xq, xs, xz, d0, d1, tensors["s"], tensors["z"], out, ws, cnt, n, k, kw,
                                 kw // WORD_ROWS, gw.group, tensors["stride_sg"], tensors["stride_sn"],
                                 rows_per_split, split, out.stride(0), ATOMIC=split > 1, REGROUP=dl._regroup(gw),
                                 STAGES=stages, TX_BYTES=WORD_ROWS * block_n * sum(p.element_size() for p in gw.planes),
                                 BN=block_n, WARPS=num_warps, num_warps=num_warps, **consts)
    return out
