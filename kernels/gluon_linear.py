"""Tensor-core decode in Gluon (`Config(mma=True, gluon=True)`): `triton_linear._gemv_mma_kernel`'s algorithm with
explicit layouts, so the weight words are loaded straight into the A-operand registers of mma_v2 (as vector
loads: the operand's rows are a permutation of the tile's columns, `_relabel`).

An int32 [BN, 16] tensor in `DotOperandLayout(0, mma, k_width=1)`, each word joined with itself and turned into its
bfloat16 pair of codes (`triton_linear._pair_asm`), is exactly the bfloat16 A operand [BN, 32] (k_width 2): the
layout conversion is checked to be trivial at compile time, and the words never pass through shared memory.
x^T (one column per token, half and run of fields sharing a group, as in the Triton kernel) is staged once per
block through shared memory, with its column sums (the 128 * 2^-p offsets, the zero point). Needs Triton's Gluon
(triton >= 3.6) and a CUDA device: Gluon does not run in Triton's CPU interpreter.
"""
from __future__ import annotations

from . import triton_linear as tlin

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    HAVE_GLUON = True
except ImportError:  # CPU-only installs, older Triton
    HAVE_GLUON = False


if HAVE_GLUON:
    @gluon.constexpr_function
    def _word_layout(BN, WARPS):
        """Layout of the [BN, 16] words as loaded: each thread holds 2T consecutive columns (T = BN / (16 WARPS)
        row tiles per warp), so its words of one row are one vector load; registers: columns 1..2T-1, then word
        rows 4, 8; lanes: word rows 1, 2, then columns 2T, 4T, 8T; warps: columns 16T. Read with the columns
        relabelled (`_relabel`), it is mma_v2's A-operand layout up to the order of registers."""
        t = BN // (16 * WARPS)
        return gl.DistributedLinearLayout(
            reg_bases=[[1 << b, 0] for b in range((2 * t).bit_length() - 1)] + [[0, 4], [0, 8]],
            lane_bases=[[0, 1], [0, 2], [2 * t, 0], [4 * t, 0], [8 * t, 0]],
            warp_bases=[[16 * t << b, 0] for b in range(WARPS.bit_length() - 1)], block_bases=[], shape=[BN, 16])

    @gluon.jit
    def _relabel(v, BN: gl.constexpr, WARPS: gl.constexpr):
        """[BN, 16] words loaded in `_word_layout`, as the operand's rows: column ((w 8 + g) T + i) 2 + e of the
        tile becomes row 16 WARPS i + 16 w + 8 e + g (w: warp, g: lane // 4, i: row tile, e: upper half)."""
        T: gl.constexpr = BN // (16 * WARPS)
        return gl.reshape(gl.permute(gl.reshape(v, [WARPS, 8, T, 2, 16]), (2, 0, 3, 1, 4)), [BN, 16])

    @gluon.jit
    def _column_of_row(r, BN: gl.constexpr, WARPS: gl.constexpr):
        """The tile column whose words feed operand row r (the inverse of `_relabel`)."""
        T: gl.constexpr = BN // (16 * WARPS)
        return ((((r // 16) % WARPS) * 8 + r % 8) * T + r // (16 * WARPS)) * 2 + (r // 8) % 2

    @gluon.jit
    def _pairs(ww, uu, f: gl.constexpr, W: gl.constexpr, W1: gl.constexpr):
        """bfloat16 pairs of field f of words ww (second plane spread in uu), as `triton_linear._pair_codes`."""
        if W1 > 0:
            return gl.inline_asm_elementwise(tlin._pair_asm(f, W, W1), "=r,r,r,r,r", [ww, uu], dtype=gl.bfloat16,
                                             is_pure=True, pack=2)
        else:
            return gl.inline_asm_elementwise(tlin._pair_asm(f, W, 0), "=r,r,r", [ww], dtype=gl.bfloat16,
                                             is_pure=True, pack=2)

    @gluon.jit
    def _store_tokens(total, tcol, on, onmask, out, ws, cnt_ptr, M, N, SPLIT, stride_om, TOK: gl.constexpr,
                      ATOMIC: gl.constexpr):
        """Token t's output at rows `on` is the sum of the columns of `total` [rows, columns] where tcol == t:
        stored, or (split-K) added to the fp32 workspace, the last K-slice to arrive storing the sum and zeroing
        its workspace and counter again (as `triton_linear._finish`)."""
        if ATOMIC:
            for t in gl.static_range(TOK):
                res = gl.sum(gl.where((tcol == t)[None, :], total, 0.0), axis=1)
                gl.atomic_add(ws + t * N + on, res, mask=onmask & (t < M), sem="relaxed")
            gl.thread_barrier()
            arrived = gl.atomic_add(cnt_ptr, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                for t in gl.static_range(TOK):
                    omask = onmask & (t < M)
                    done = gl.load(ws + t * N + on, mask=omask, other=0.0, cache_modifier=".cg")
                    gl.store(out + t * stride_om + on, done.to(out.dtype.element_ty), mask=omask)
                    gl.store(ws + t * N + on, gl.zeros_like(done), mask=omask)
                gl.atomic_xchg(cnt_ptr, 0, sem="relaxed")
        else:
            for t in gl.static_range(TOK):
                res = gl.sum(gl.where((tcol == t)[None, :], total, 0.0), axis=1)
                gl.store(out + t * stride_om + on, res.to(out.dtype.element_ty), mask=onmask & (t < M))

    @gluon.jit
    def gemv_mma_gluon(x, p0, p1, s, z, out, ws, cnt, M, N, K, KW, G, stride_sg, stride_sn, rows_per_split, SPLIT,
                       stride_xm, stride_om, PER: gl.constexpr, W0: gl.constexpr, W1: gl.constexpr,
                       ZERO: gl.constexpr, HAS_Z: gl.constexpr, ATOMIC: gl.constexpr, RUN: gl.constexpr,
                       EVEN_K: gl.constexpr, BN: gl.constexpr, NC: gl.constexpr, NCP: gl.constexpr,
                       TOK: gl.constexpr, WARPS: gl.constexpr):
        HALF: gl.constexpr = PER // 2
        NR: gl.constexpr = HALF // RUN
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        w_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=1)
        x_l: gl.constexpr = gl.BlockedLayout([1, NC], [32, 1], [WARPS, 1], [1, 0])
        p_l: gl.constexpr = gl.BlockedLayout([1, NCP], [32, 1], [WARPS, 1], [1, 0])
        sh: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
        sh1: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        v_l: gl.constexpr = _word_layout(BN, WARPS)
        n = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, v_l))
        nmask = n < N
        j16 = gl.arange(0, 16, layout=gl.SliceLayout(0, v_l))
        rows = gl.arange(0, 32 * HALF, layout=gl.SliceLayout(1, x_l))
        f = rows // 32
        jj = (rows % 32) // 2
        h = rows % 2
        col = gl.arange(0, NC, layout=gl.SliceLayout(0, x_l))
        tok = col // (2 * NR)
        shift = gl.exp2(-((f % tlin._half_view(W0)) * W0).to(gl.float32))
        xmask = ((h[:, None] == (col % 2)[None, :]) & ((f // RUN)[:, None] == ((col // 2) % NR)[None, :])
                 & (tok < M)[None, :])
        on = pid_n * BN + _column_of_row(gl.arange(0, BN, layout=gl.SliceLayout(1, mma)), BN, WARPS)
        onmask = on < N
        oc = gl.arange(0, NCP, layout=gl.SliceLayout(0, mma))
        g_off = 16 * ((oc % 2) * HALF + ((oc // 2) % NR) * RUN)  # each column's first input column in a block
        bs = gl.allocate_shared_memory(gl.bfloat16, [32 * HALF, NCP], sh, gl.zeros([32 * HALF, NCP], gl.bfloat16, p_l))
        zeros1 = gl.zeros([NCP], gl.float32, gl.SliceLayout(0, p_l))
        off_s = gl.allocate_shared_memory(gl.float32, [NCP], sh1, zeros1)  # column sums of x^T * 128 (+ x * zero)
        xs_s = gl.allocate_shared_memory(gl.float32, [NCP], sh1, zeros1)  # column sums of x^T (zero points)
        total = gl.zeros([BN, NCP], gl.float32, layout=mma)
        r_lo = pid_k * rows_per_split
        r_hi = gl.minimum(r_lo + rows_per_split, KW)
        for r0 in range(r_lo, r_hi, 16):
            offs = (r0 + j16)[None, :] * N + n[:, None]
            words = gl.convert_layout(_relabel(gl.load(p0 + offs, mask=nmask[:, None], other=0), BN, WARPS), w_l)
            if W1 > 0:
                b1 = gl.convert_layout(_relabel(gl.load(p1 + offs, mask=nmask[:, None], other=0), BN, WARPS),
                                       w_l).to(gl.int32)
                hb: gl.constexpr = HALF * W1
                spread = (b1 & ((1 << hb) - 1)) | ((b1 << (16 - hb)) & (((1 << hb) - 1) << 16))
            else:
                spread = words
            ww = gl.join(words, words)
            uu = gl.join(spread, spread)
            c = r0 * PER + 16 * (h * HALF + f) + jj
            if EVEN_K:
                xt = gl.load(x + tok[None, :] * stride_xm + c[:, None], mask=xmask, other=0.0).to(gl.float32)
            else:
                xt = gl.load(x + tok[None, :] * stride_xm + c[:, None], mask=xmask & (c < K)[:, None],
                             other=0.0).to(gl.float32)
            b = xt * shift[:, None]
            gl.thread_barrier()  # the previous block's reads of bs and the sums are done
            bs.slice(0, NC, dim=1).store(b.to(gl.bfloat16))
            if HAS_Z:
                off_s.slice(0, NC).store(gl.sum(b * 128.0, axis=0))
                xs_s.slice(0, NC).store(gl.sum(xt, axis=0))
            else:
                off_s.slice(0, NC).store(gl.sum(b * 128.0 + xt * ZERO, axis=0))
            gl.thread_barrier()
            acc = gl.zeros([BN, NCP], gl.float32, layout=mma)
            for fi in gl.static_range(HALF):
                a = gl.convert_layout(gl.reshape(_pairs(ww, uu, fi, W0, W1), [BN, 32]), a_l, assert_trivial=True)
                acc = mma_v2(a, bs.slice(32 * fi, 32, dim=0).load(b_l), acc)
            g0 = r0 * PER + g_off
            smask = onmask[:, None] & ((oc < NC) & (g0 < K))[None, :]
            soffs = (g0 // G)[None, :] * stride_sg + on[:, None] * stride_sn
            sc = gl.load(s + soffs, mask=smask, other=0.0).to(gl.float32)
            part = acc - off_s.load(gl.SliceLayout(0, mma))[None, :]
            if HAS_Z:
                zero = gl.load(z + soffs, mask=smask, other=0.0).to(gl.float32)
                part = part - zero * xs_s.load(gl.SliceLayout(0, mma))[None, :]
            total += part * sc
        _store_tokens(total, oc // (2 * NR), on, onmask, out, ws, cnt + pid_n, M, N, SPLIT, stride_om, TOK, ATOMIC)
