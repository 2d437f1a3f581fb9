"""Prefill on Hopper tensor cores (Gluon `wgmma`): the weight dequantized in registers as the A operand.

Weight-only layers at hundreds of tokens ran dequantize + cuBLAS (which writes and reads the whole bf16 weight)
or Triton's fused GEMM (which unpacks the codes into shared memory and waits for it once per token tile). Here
out^T = W x^T: a CTA owns BN = 16 x num_warps weight rows and BM tokens.
- A (the weight, registers): a thread's words of one K block are exactly what its A-operand registers need. In
  the GPU layout, word row j of a block holds in slot i the code of input column 16 i + j, and `wgmma`'s A
  fragment gives lane l the columns 2(l % 4) + {0, 1, 8, 9} of every 16, on rows l // 4 + {0, 8} of its warp's
  16. So a thread needs 4 words of each of its 2 rows per block (8 x 32 bits, coalesced 32-byte runs across the
  warp), and slot i of the words of rows j and j + 1 is one A register: their 16-bit halves side by side (PRMT), a
  shift and a LOP3 with the magic exponent give 128 + code in both bfloat16 halves (1024 + code in float16), then
  one packed subtract of 128 + zero and one packed multiply by the group's scale (`_pair_asm`: about 2
  instructions a weight). 8-bit codes with bfloat16 (which does not hold 128 + code exactly) take one more LOP3
  and packed add for bit 7 (exact; on an H100, session 33, 8192x8192 at 512 tokens with m128w8p4 went from 192.8
  to 158.1 us against converting through float32, which spilled; the fastest tile there, m256w4p3, 137.7 ->
  136.4).
- How the words arrive (RING): plane-0 words are copied by `cp.async` into a ring of AHEAD blocks in shared
  memory, each thread its own words, and read back (LDS.64) as their block starts; plane 1 (3/5/6 bits: int16 /
  int8, RING1) is copied as int32 words across the CTA and read back transposed (ldmatrix), where N is a multiple
  of the fields a word holds. Loaded into registers two blocks ahead instead, ptxas moves each fresh load into the
  loop-carried registers right after issuing it, so every block start waits out a global load: on an H100
  (session 32) the rings with the scales below took 4-bit 8192x8192 at 512 tokens from 127.8 to 110.6 us, 3-bit
  from 129.9 to 117.6. 8-bit (a block a step) lost with the ring at its fastest tiles (session 33: m256w4p3 136.4
  -> 140.2 us, m128w8p4 158.1 -> 176.2) and keeps registers, as do 3/5/6 bits where N does not allow the int32
  view. 8-bit words (a K block a step) alternate between two register sets, two steps a loop iteration
  (`PAIRS`, `_paired_step`): each set is reloaded in place and read two steps later, with no register copy of a
  load in flight (session 34, H100, 512 tokens, m256w4p3: 8192x8192 135.0 -> 117.7 us, with zero points 140.6
  -> 127.9; 28672x8192 with zero points, split, 503.4 -> 453.9). Keeping one `wgmma` in flight while the next
  operand is made in the other of two operand sets (`warpgroup_mma_wait(1)`) lost at every tile (m128w4p4 158 ->
  234 registers; 8192x8192 m256w4p3 116.5 -> 136.6 us).
- B (x^T): [BM, 64] tiles of x through TMA into a ring of STAGES buffers (zero-filled past M and K), read by
  `wgmma` as the transposed view.
- One loop iteration per 64-column step: its `wgmma` is issued asynchronously, the next step's operand is made
  while it runs, then it is waited for (its operand registers kept live until then). Leaving one `wgmma` in flight
  across iterations raced (session 30: a register copy at the loop's back edge overwrote its A registers;
  `test_wgmma_prefill_keeps_inflight_operands_offline` scans the SASS for that).
- The output tile goes through shared memory (the dead x ring) into a layout with 16 bytes of consecutive output
  columns a thread (`_store_tile`); the accumulator's own layout stored it 2 bytes at a time. K slices each store
  their float32 part that way (`_store_part`, in one pass through a swizzled buffer) and the second to finish sums
  both (`_sum_parts`; see SPLITS). On an H100 (session 35, 512 tokens) 8192x8192 4-bit went from 111.2 to 108.7
  us, 14336x4096 from 118.6 to 111.9, and split tiles gained more (4096x4096 48.2 -> 38.6, 4096x14336 112.3 ->
  103.7) against atomics into a zeroed sum and a copy.
- Group scales: where a group spans whole K blocks (4/5/6/8 bits at group 128) the next block's is loaded as a
  block starts; where a block holds several groups of 64 columns or more (2/3 bits at group 128, group 64) the next
  step's is loaded with each step (on an H100, session 31, 2-bit 8192x8192 at 512 tokens went from 144.9 to 114.7
  us against loading each where it is used); groups of 16 or 32 are loaded per slot where they are used.
Latency tables offer TILES above `triton_linear.TUNED_MAX_M` tokens (`tile_candidates`), so emitted models run it
where it was measured fastest (docs/kernels_gpu.md, "Session 31" to "Session 33").
Needs Triton's Gluon (triton >= 3.6), a CUDA device of compute capability 9.x (Hopper) and K a multiple of 8 (TMA
reads x in 16-byte aligned rows; x is copied first where its rows are not); Gluon does not run in Triton's CPU
interpreter.
"""
from __future__ import annotations

import torch

from .gpu_layout import WORD_ROWS, GpuPackedWeight

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except ImportError:  # CPU-only installs, older Triton
    HAVE_GLUON = False

STEP = 64  # input columns per TMA tile of x and per asynchronous wgmma (4 slots of 16)
# (block_m tokens, num_warps, TMA stages): each was the fastest somewhere in 28672x8192, 8192x8192 and 4096x14336,
# 2/4-bit, 128 and 512 tokens, on an H100 (session 30; m256w8p4, two warpgroups sharing each x tile, in session 37:
# 28672x8192 4-bit at 512 tokens, split, 366.9 us against 378.0 at m256w4p3); block_n = 16 x num_warps
TILES = ((256, 4, 3), (128, 4, 4), (128, 8, 4), (64, 4, 4), (256, 8, 4))
# K slices: with split 2 the column tiles that fill complete rounds of CTAs run whole and the rest (the last,
# part-filled round's; all of them where the tiles fill less than one round, as at N = 4096 with 512 tokens) in
# two K slices, a second launch. Each slice stores its float32 part and counts itself in at the tile's counter
# (`triton_linear._workspace`'s, left zero again); the second to arrive sums part 0 + part 1 (the same bits
# whichever is second) and stores the output, so no memset, float32 atomics or copy kernel run. On an H100
# (session 33) splitting the last round took 28672x8192 4-bit at 512 tokens (896 tiles of m256w4p3, 3.4 rounds of
# 264) from 428.8 to 405.0 us, where splitting every tile had taken 494.6; the parts above (session 35), 400.2 to
# 382.1 in another run.
SPLITS = (1, 2)


def unsupported_reason(gw: GpuPackedWeight, dtype: torch.dtype, device: torch.device, block_m: int,
                       num_warps: int, split_k: int = 1) -> str | None:
    """Why this kernel cannot run rows of `dtype` through this weight with this tile on `device` (None: it can)."""
    from . import triton_linear as tlin
    if split_k not in SPLITS:
        return f"split_k={split_k}: the wgmma prefill splits K in {SPLITS}"
    if not (HAVE_GLUON and tlin.gluon_available(device)) or torch.cuda.get_device_capability(device)[0] != 9:
        return ("the wgmma prefill needs Triton >= 3.6 (Gluon) and a Hopper GPU (compute capability 9.x); Gluon does "
                "not run in the CPU interpreter")
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype={dtype}: the wgmma prefill takes float16 or bfloat16 rows"
    if gw.shape[1] % 8:
        return f"in_features={gw.shape[1]}: TMA needs 16-byte rows of x (a multiple of 8)"
    if gw.group % WORD_ROWS:
        return f"group width {gw.group} is not a multiple of {WORD_ROWS}"
    if num_warps not in (4, 8) or block_m not in (64, 128, 256):
        return f"tile m{block_m} w{num_warps}: block_m in (64, 128, 256), num_warps in (4, 8)"
    return None


if HAVE_GLUON:
    @gluon.constexpr_function
    def _a_word_layout(BN, WARPS):
        """[BN, 16] words (weight row, word row j of a block) as `wgmma`'s bf16 A fragment wants their codes:
        registers: j bit 0, row + 8, j + 8; lanes: j bits 1, 2 (l % 4), rows 1, 2, 4 (l // 4); warps: 16 rows."""
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [8, 0], [0, 8]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[16 << b, 0] for b in range(WARPS.bit_length() - 1)], block_bases=[], shape=[BN, 16])

    @gluon.constexpr_function
    def _ring_layout():
        """The plane-0 ring [BN, 16] int32 words, the 8-word halves of each row swapped in every other pair of rows.
        A warp's 64-bit read (`_a_word_layout`) takes 8 words from each of 8 rows 16 words apart: unswizzled, even
        rows land on banks 0-7 and odd rows on 16-23 (4 wavefronts); swizzled, on all 32 (2, the fewest for 256
        bytes)."""
        return gl.SwizzledSharedLayout(vec=8, per_phase=2, max_phase=2, order=[1, 0])

    @gluon.constexpr_function
    def _ring1_layout(PW, BYTES):
        """The plane-1 ring [16, BN // PW] as elements of BYTES (4: the int32 words copied in; 2 or 1: the int16 /
        int8 fields read back, PW to a word), its 16-byte chunks XOR-swizzled by the row. Read back transposed, one
        instruction takes the same weight rows from 4 (LDS) or 8 (ldmatrix) word rows; unswizzled, rows of 64 or 128
        bytes put them all on the same banks: 4 to 8 wavefronts where 1 suffices. int16 rows (8 chunks or more)
        swizzle by each row, for ldmatrix's 8; int8 rows (4 chunks at BN 64) by pairs of rows, for the 4 even rows
        one LDS takes."""
        per_phase, max_phase = (1, 8) if PW == 2 else (2, 4)
        return gl.SwizzledSharedLayout(vec=16 // BYTES, per_phase=per_phase, max_phase=max_phase, order=[1, 0])

    @gluon.constexpr_function
    def _copy_layout(COLS, WARPS):
        """[16, COLS] int32 words over the CTA's threads, one word each, COLS (up to 32) lanes along a row."""
        lanes = min(32, COLS)
        return gl.BlockedLayout([1, 1], [32 // lanes, lanes], [WARPS, 1], [1, 0])

    @gluon.constexpr_function
    def _pair_asm(i, W0, W1, FP16, HAS_Z, PACK1):
        """PTX for slot i of a thread's words of rows j and j + 1 ($1, $2; second plane $3, $4) as the operand
        register $0 of columns j and j + 1: the 16-bit half of each that holds the slot side by side (one PRMT, which
        ptxas shares between the slots of a half), shifted to the slot, the code as 128 + code
        (bfloat16; 1024 + code in float16) by one LOP3 with the magic exponent, the second plane's field above it,
        then less the pair 128 + zero ($7) and times the scale pair ($5), two packed half-precision ops.
        8-bit codes in bfloat16 (8 significant bits: 128 + code is not exact above 127): 128 + the low 7 bits, plus
        -256 or -128 by bit 7 (one more LOP3 and a packed add) is code - 128, then less zero - 128 (skipped without
        zero points: it is 0) and times the scale; every intermediate an integer within +-256, so exact."""
        half = (i * W0) // 16
        sh = (i * W0) % 16
        body = f"prmt.b32 t, $1, $2, {0x7632 if half else 0x5410}; " + (f"shr.b32 t, t, {sh}; " if sh else "")
        kind = "f16x2" if FP16 else "bf16x2"
        if W0 == 8 and not FP16:
            body += ("lop3.b32 u, t, 0x00800080, 0xC300C300, 0xAE; lop3.b32 t, t, 0x007F007F, 0x43004300, 0xEA; "
                     "add.rn.bf16x2 t, t, u; ")
            body += "sub.rn.bf16x2 t, t, $7; " if HAS_Z else ""
        else:
            m = (1 << W0) - 1
            body += f"lop3.b32 t, t, {m | (m << 16)}, {0x64006400 if FP16 else 0x43004300}, 0xEA; "
            if W1:
                d = i * W1 - W0
                m1 = ((1 << W1) - 1) << W0
                src = "$3" if PACK1 else "u"
                body += ("" if PACK1 else "prmt.b32 u, $3, $4, 0x5410; ") + (
                    f"shr.b32 u, {src}, {d}; " if d > 0 else f"shl.b32 u, {src}, {-d}; " if d < 0 else
                    "mov.b32 u, $3; " if PACK1 else "")
                body += f"lop3.b32 t, t, u, {m1 | (m1 << 16)}, 0xF8; "
            body += f"sub.rn.{kind} t, t, $7; "
        return "{.reg .b32 t, u; " + body + f"mul.rn.{kind} $0, t, $5;" + "}"

    @gluon.jit
    def _slot_values(w0, w1, i: gl.constexpr, sc, zb, W0: gl.constexpr, W1: gl.constexpr, HAS_Z: gl.constexpr,
                     DT: gl.constexpr, PACK1: gl.constexpr):
        """Slot i of words w0 (plane 0) and w1 (plane 1) as (code - zero) x scale in DT [BN, 16], two columns per
        register in packed half-precision math (`_pair_asm`; sc, zb: [BN, 1] int32 pairs of the scale and the
        magic + zero, `_scale_bias`)."""
        if DT == gl.float16:
            return gl.inline_asm_elementwise(_pair_asm(i, W0, W1, True, HAS_Z, PACK1), "=r,r,r,r,r,r,r,r,r",
                                             [w0, w1, sc, zb], dtype=gl.float16, is_pure=True, pack=2)
        else:
            return gl.inline_asm_elementwise(_pair_asm(i, W0, W1, False, HAS_Z, PACK1), "=r,r,r,r,r,r,r,r,r",
                                             [w0, w1, sc, zb], dtype=gl.bfloat16, is_pure=True, pack=2)

    @gluon.jit
    def _half_pair(v, DT: gl.constexpr):
        """[BN, 1] int32 holding v rounded to DT twice (both halves)."""
        h = v.to(DT).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return h | (h << 16)

    @gluon.jit
    def _copy_block(ring, p0, blk, KW, N, offs, nmask, AHEAD: gl.constexpr):
        """Start copying the plane-0 words of K block `blk` at `offs` (word row j x N + weight row) into ring slot
        blk % AHEAD (zeros past the last block) as one commit group. Each thread copies the words it reads back
        itself, in the same layout."""
        ok = nmask & (blk * 16 < KW)
        cp.async_copy_global_to_shared(ring.index(blk % AHEAD), p0 + blk * 16 * N + offs, mask=ok)
        cp.commit_group()

    @gluon.jit
    def _copy_plane1(ring1, p1, blk, KW, N1W, offs1, mask1, AHEAD: gl.constexpr):
        """Start copying the plane-1 words (int16 / int8, as int32 words of N1W a word row) of K block `blk` into
        ring slot blk % AHEAD, in the current commit group; read back by other threads (`_ring1_words`)."""
        cp.async_copy_global_to_shared(ring1.index(blk % AHEAD), p1 + blk * 16 * N1W + offs1,
                                       mask=mask1 & (blk * 16 < KW))

    @gluon.jit
    def _ring1_words(ring1, blk, PW: gl.constexpr, BN: gl.constexpr, w_l: gl.constexpr, AHEAD: gl.constexpr):
        """Block `blk`'s plane-1 words [BN, 16] from ring slot blk % AHEAD as int32, in `_a_word_layout`: the
        words of rows j and j + 1 as one int32 pair, row j's in the low half and j + 1's in the high half (int16 as
        `ldmatrix` delivers them; int8 spread to the halves by a PRMT), given to both (`_pair_asm` with PACK1 reads
        $3 only).
        Sign-extending each to int32 and packing them again per slot took 24-40 instructions a step; shifting the
        pair as one word keeps every field a slot's mask reads in its own half (the fields of a row span at most
        16 - W1 bits and move down by less than 17 - W0 - W1)."""
        view = ring1.index(blk % AHEAD)._reinterpret(gl.int16 if PW == 2 else gl.int8, [16, BN],
                                                     _ring1_layout(PW, 4 // PW))
        raw = view.permute((1, 0)).load(w_l)
        spread: gl.constexpr = ("mov.b32 $0, $2; mov.b32 $1, $2;" if PW == 2 else
                                "prmt.b32 $0, $2, 0, 0x4140; mov.b32 $1, $0;")
        return gl.inline_asm_elementwise(spread, "=r,=r,r", [raw], dtype=gl.int32, is_pure=True, pack=2)

    @gluon.jit
    def _plane_words(p, blk, KW, N, offs, nmask):
        """A plane's words of K block `blk` at `offs` as int32 (zero past the last block), loaded into registers."""
        return gl.load(p + blk * 16 * N + offs, mask=nmask & (blk * 16 < KW), other=0).to(gl.int32)

    @gluon.jit
    def _load_scale(s, z, col, K, G, n, nmask, stride_sg, stride_sn, HAS_Z: gl.constexpr):
        """Scale and zero point [BN] of the group holding input column `col` as stored (scale 0 past K; the zero
        is the scale again where there is none), for `_scale_bias` to convert once they have arrived."""
        offs = (col // G) * stride_sg + n * stride_sn
        ok = nmask & (col < K)
        sc = gl.load(s + offs, mask=ok, other=0.0)
        if HAS_Z:
            return sc, gl.load(z + offs, mask=ok, other=0.0)
        return sc, sc

    @gluon.jit
    def _scale_bias(sc, zero, ZERO: gl.constexpr, HAS_Z: gl.constexpr, DT: gl.constexpr, W0: gl.constexpr):
        """A group's scale and magic + zero point (from `_load_scale`) as the [BN, 1] pairs `_slot_values` takes:
        magic 1024 in float16, 128 in bfloat16, -128 for 8-bit codes in bfloat16 (`_pair_asm`)."""
        sc = sc.to(gl.float32)
        if HAS_Z:
            zero = zero.to(gl.float32)
        else:
            zero = gl.zeros_like(sc) + ZERO
        magic: gl.constexpr = 1024.0 if DT == gl.float16 else -128.0 if W0 == 8 else 128.0
        return _half_pair(sc, DT)[:, None], _half_pair(zero + magic, DT)[:, None]

    @gluon.jit
    def _slot_scale(s, z, col, K, G, n, nmask, stride_sg, stride_sn, ZERO: gl.constexpr, HAS_Z: gl.constexpr,
                    DT: gl.constexpr, W0: gl.constexpr):
        """`_scale_bias` of the group holding column `col`, loaded and used at once (groups of 16 or 32)."""
        sc, zero = _load_scale(s, z, col, K, G, n, nmask, stride_sg, stride_sn, HAS_Z)
        return _scale_bias(sc, zero, ZERO, HAS_Z, DT, W0)

    @gluon.jit
    def _step_operand(w0, w1, sc, zb, s, z, col, K, G, n, nmask, stride_sg, stride_sn, W0: gl.constexpr,
                      W1: gl.constexpr, ZERO: gl.constexpr, HAS_Z: gl.constexpr, SCALES: gl.constexpr,
                      DT: gl.constexpr, PACK1: gl.constexpr = False):
        """Slots 0..3 of words w0, w1 (shifted so that a step's slots come first) as the A operand [BN, 64] of the
        step at input column `col` (its column 16 i + j is slot i of word row j). SCALES < 2: the step lies in one
        group, whose sc, zb are given; 2: each slot's (a group of 16 or 32 columns) is loaded here."""
        if SCALES == 2:
            sc, zb = _slot_scale(s, z, col, K, G, n, nmask, stride_sg, stride_sn, ZERO, HAS_Z, DT, W0)
        v0 = _slot_values(w0, w1, 0, sc, zb, W0, W1, HAS_Z, DT, PACK1)
        if SCALES == 2:
            sc, zb = _slot_scale(s, z, col + 16, K, G, n, nmask, stride_sg, stride_sn, ZERO, HAS_Z, DT, W0)
        v1 = _slot_values(w0, w1, 1, sc, zb, W0, W1, HAS_Z, DT, PACK1)
        if SCALES == 2:
            sc, zb = _slot_scale(s, z, col + 32, K, G, n, nmask, stride_sg, stride_sn, ZERO, HAS_Z, DT, W0)
        v2 = _slot_values(w0, w1, 2, sc, zb, W0, W1, HAS_Z, DT, PACK1)
        if SCALES == 2:
            sc, zb = _slot_scale(s, z, col + 48, K, G, n, nmask, stride_sg, stride_sn, ZERO, HAS_Z, DT, W0)
        v3 = _slot_values(w0, w1, 3, sc, zb, W0, W1, HAS_Z, DT, PACK1)
        both = gl.join(gl.join(v0, v1), gl.join(v2, v3))  # [BN, 16, 2 (slot bit 0), 2 (slot bit 1)]
        return gl.reshape(gl.permute(both, (0, 3, 2, 1)), [both.shape[0], 64])

    @gluon.jit
    def _issue_step(i, a, acc, x_smem, bars, STAGES: gl.constexpr):
        """Wait for step i's x tile and start its `wgmma` (asynchronous) with operand a."""
        cur = i % STAGES
        mbarrier.wait(bars.index(cur), (i // STAGES) & 1)
        return warpgroup_mma(a, x_smem.index(cur).permute((1, 0)), acc, is_async=True)

    @gluon.jit
    def _retire_step(i, s0, steps, acc, a, a_next, x_desc, x_smem, bars, pid_m, a_l: gl.constexpr,
                     STAGES: gl.constexpr, OVERLAP: gl.constexpr):
        """Wait for step i's `wgmma`, hand on the next step's operand and start the TMA copy of step i + STAGES - 1's
        x tile into the buffer of step i - 1 (whose `wgmma` was waited for in the step before).
        The operand a stays live up to the wait (a dependency of it), so a_next is made in other registers while
        the `wgmma` runs, and no register copy at the loop's back edge can overwrite what an unfinished `wgmma`
        reads. (Leaving one `wgmma` in flight across iterations, with its operand carried to the next wait, raced:
        4-bit 256-token tiles summed some tiles wrong on an H100 in most calls, session 30.)
        OVERLAP: the TMA copy is started before the wait. ptxas otherwise moves the wait (which names no register)
        up to just after the loads, above the unpacking of a_next, so that a warpgroup's unpacking and its `wgmma`
        did not overlap; the copy's branch and barriers keep the wait below the unpacking (and a_next's registers
        live during the `wgmma`)."""
        if not OVERLAP:
            acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
        nxt = i + STAGES - 1
        if nxt < steps:
            ns = nxt % STAGES
            mbarrier.expect(bars.index(ns), x_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [pid_m * x_desc.block_type.shape[0],
                                                     (s0 + nxt) * x_desc.block_type.shape[1]],
                                            bars.index(ns), x_smem.index(ns))
        if OVERLAP:
            acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
        return acc, gl.convert_layout(a_next, a_l, assert_trivial=True)

    @gluon.jit
    def _paired_step(i, s0, steps, acc, a, w, raw_s, raw_z, x_desc, x_smem, bars, pid_m, p0, s, z, K, KW, G, N, n,
                     nmask, offs, wmask, stride_sg, stride_sn, a_l: gl.constexpr, W0: gl.constexpr,
                     ZERO: gl.constexpr, HAS_Z: gl.constexpr, SCALES: gl.constexpr, DT: gl.constexpr,
                     STAGES: gl.constexpr, OVERLAP: gl.constexpr):
        """Step i of a weight whose K block is one step (8 bits) with its words in registers (`PAIRS`): its
        `wgmma`, while the next block's operand is made from w (and its group's raw_s, raw_z, SCALES 0), and w
        (and raw_s, raw_z) reloaded with the block two steps after that. Two sets of words alternate through
        the steps, so no loaded word is copied between registers in the loop."""
        STEP: gl.constexpr = x_desc.block_type.shape[1]
        t = s0 + i
        acc = _issue_step(i, a, acc, x_smem, bars, STAGES)
        if SCALES == 0:
            sc, zb = _scale_bias(raw_s, raw_z, ZERO, HAS_Z, DT, W0)
            raw_s, raw_z = _load_scale(s, z, (t + 3) * STEP, K, G, n, nmask, stride_sg, stride_sn, HAS_Z)
        else:
            sc, zb = raw_s, raw_z
        a_next = _step_operand(w, w, sc, zb, s, z, (t + 1) * STEP, K, G, n, nmask, stride_sg, stride_sn, W0, 0,
                               ZERO, HAS_Z, SCALES, DT)
        w = _plane_words(p0, t + 3, KW, N, offs, wmask)
        acc, a = _retire_step(i, s0, steps, acc, a, a_next, x_desc, x_smem, bars, pid_m, a_l, STAGES, OVERLAP)
        return acc, a, w, raw_s, raw_z

    @gluon.jit
    def _store_tile(base, stride_t, tile, n0, N, t0, M, WARPS: gl.constexpr):
        """tile [BN columns, BM tokens] (the accumulator's layout) stored at base + t x stride_t + c for tokens
        t0 + t, columns n0 + c (where n0 + c < N and t0 + t < M), through shared memory into a layout with 16 bytes of
        consecutive columns a thread: the accumulator's own has 2 consecutive tokens a thread, so storing it takes
        a 2- or 4-byte store for each value (the shared memory is the dead x ring's)."""
        BN: gl.constexpr = tile.shape[0]
        BM: gl.constexpr = tile.shape[1]
        V: gl.constexpr = 128 // tile.dtype.primitive_bitwidth
        o_l: gl.constexpr = gl.BlockedLayout([V, 1], [BN // V, 32 * V // BN], [1, WARPS], [0, 1])
        c = gl.arange(0, BN, layout=gl.SliceLayout(1, o_l))
        t = gl.arange(0, BM, layout=gl.SliceLayout(0, o_l))
        gl.store(base + t[None, :] * stride_t + c[:, None], gl.convert_layout(tile, o_l),
                 mask=(n0 + c < N)[:, None] & (t0 + t < M)[None, :])

    @gluon.constexpr_function
    def _part_layout():
        """A K slice's float32 part [BN columns, BM tokens] in shared memory, columns consecutive, its 16-byte
        chunks XOR-swizzled by the token (8 phases): the accumulator's layout stores 8 columns at each of 4 tokens 2
        apart an instruction (unswizzled, all on the same banks) and the read-back takes 16 bytes of consecutive
        columns a thread, both without bank conflicts (Triton's count, `get_shared_bank_conflicts`)."""
        return gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[0, 1])

    @gluon.jit
    def _store_part(base, stride_t, tile, x_smem, n0, N, t0, M, WARPS: gl.constexpr):
        """`_store_tile` for a float32 part, through the dead x ring as `_part_layout` in one pass. Triton's
        `convert_layout` of the float32 tile went in passes through a smaller scratch buffer (25 barriers, 260
        register moves); this took the split tiles 1-3% faster on an H100 (session 41, 512 tokens: 4096x14336
        6-bit 106.0 -> 104.0 us, 4096x4096 4-bit 38.1 -> 37.0). The same for the bfloat16 output of whole tiles
        (`stmatrix` either way) made 28672x8192 5-bit 4-5% slower (m256w4p3 397.0 -> 414.8 us), so those keep
        `_store_tile`."""
        BN: gl.constexpr = tile.shape[0]
        BM: gl.constexpr = tile.shape[1]
        o_l: gl.constexpr = gl.BlockedLayout([4, 1], [BN // 4, 128 // BN], [1, WARPS], [0, 1])
        gl.thread_barrier()  # every warpgroup's wgmma has read its last x tile
        buf = x_smem._reinterpret(gl.float32, [BN, BM], _part_layout())
        buf.store(tile)
        gl.thread_barrier()
        c = gl.arange(0, BN, layout=gl.SliceLayout(1, o_l))
        t = gl.arange(0, BM, layout=gl.SliceLayout(0, o_l))
        gl.store(base + t[None, :] * stride_t + c[:, None], buf.load(o_l),
                 mask=(n0 + c < N)[:, None] & (t0 + t < M)[None, :])

    @gluon.jit
    def _sum_parts(ws, out, t0, w0, n0, M, N, stride_wm, stride_om, BM: gl.constexpr, BN: gl.constexpr,
                   WARPS: gl.constexpr, DT: gl.constexpr):
        """Tokens t0 .. t0 + BM of a tile's two K slices' float32 parts (ws [2, rows, columns], columns from w0)
        summed (part 0 + part 1, the same bits whichever slice finished last) into out's columns n0 .. n0 + BN, 32
        tokens at a time in a layout with each thread's 4 columns side by side (the accumulator is dead by now, so
        this needs few registers; the accumulator's own layout stores 2-byte pieces)."""
        LANES: gl.constexpr = BN // 4
        l: gl.constexpr = gl.BlockedLayout([1, 4], [32 // LANES, LANES], [WARPS, 1], [1, 0])
        c = gl.arange(0, BN, layout=gl.SliceLayout(0, l))
        cmask = (n0 + c < N)[None, :]
        for r in range(0, BM, 32):
            t = t0 + r + gl.arange(0, 32, layout=gl.SliceLayout(1, l))
            mask = (t < M)[:, None] & cmask
            p = ws + t[:, None] * stride_wm + w0 + c[None, :]
            total = gl.load(p, mask=mask, other=0.0, cache_modifier=".cg") + gl.load(
                p + M * stride_wm, mask=mask, other=0.0, cache_modifier=".cg")
            gl.store(out + t[:, None] * stride_om + n0 + c[None, :], total.to(DT), mask=mask)

    @gluon.jit
    def _wgmma_prefill_kernel(x_desc, p0, p1, s, z, out, ws, cnt, M, N, K, KW, stride_sg, stride_sn, stride_om,
                              stride_wm, split_steps, whole_n, G: gl.constexpr, PER: gl.constexpr, W0: gl.constexpr,
                              W1: gl.constexpr, ZERO: gl.constexpr, HAS_Z: gl.constexpr, SCALES: gl.constexpr,
                              STAGES: gl.constexpr, RING: gl.constexpr, RING1: gl.constexpr, AHEAD: gl.constexpr,
                              ATOMIC: gl.constexpr, PAIRS: gl.constexpr, OVERLAP: gl.constexpr, PACK1: gl.constexpr,
                              WARPS: gl.constexpr):
        BM: gl.constexpr = x_desc.block_type.shape[0]
        STEP: gl.constexpr = x_desc.block_type.shape[1]
        DT: gl.constexpr = x_desc.dtype
        BN: gl.constexpr = 16 * WARPS
        SUB: gl.constexpr = PER // 4  # 64-column steps per K block
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BM, 16])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        w_l: gl.constexpr = _a_word_layout(BN, WARPS)
        pid_m = gl.program_id(0)
        pid_n = gl.program_id(1)
        if ATOMIC:  # column tile whole_n + pid_n, K slice s0 .. s0 + steps - 1 (whole blocks)
            pid_n = pid_n + whole_n
            s0 = gl.program_id(2) * split_steps
            steps = gl.minimum(KW * PER // STEP - s0, split_steps)
        else:  # all of K (constants keep the unsplit kernel's registers: 8-bit m128w8p4 spilled more otherwise)
            s0 = 0
            steps = KW * PER // STEP
        b0 = s0 // SUB
        n = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, w_l))
        nmask = n < N
        j = gl.arange(0, 16, layout=gl.SliceLayout(0, w_l))
        offs = j[None, :] * N + n[:, None]
        wmask = nmask[:, None]
        x_smem = gl.allocate_shared_memory(DT, [STAGES, BM, STEP], x_desc.layout)
        if RING:
            ring = gl.allocate_shared_memory(gl.int32, [AHEAD, BN, 16], _ring_layout())
        if RING1:  # p1 is plane 1 as int32 words: RING1 (2 or 4) weight rows' plane-1 fields a word
            PW: gl.constexpr = RING1
            c_l: gl.constexpr = _copy_layout(BN // PW, WARPS)
            N1W = N // PW
            c1 = pid_n * (BN // PW) + gl.arange(0, BN // PW, layout=gl.SliceLayout(0, c_l))
            offs1 = gl.arange(0, 16, layout=gl.SliceLayout(1, c_l))[:, None] * N1W + c1[None, :]
            mask1 = (c1 < N1W)[None, :]
            ring1 = gl.allocate_shared_memory(gl.int32, [AHEAD, 16, BN // PW], _ring1_layout(PW, 4))
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(STAGES):
            mbarrier.init(bars.index(st), count=1)
        for st in gl.static_range(STAGES - 1):
            if st < steps:
                mbarrier.expect(bars.index(st), x_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(x_desc, [pid_m * BM, (s0 + st) * STEP], bars.index(st),
                                                x_smem.index(st))
        acc = gl.zeros([BN, BM], gl.float32, layout=mma)
        if RING:
            for b in gl.static_range(AHEAD):
                if RING1:
                    _copy_plane1(ring1, p1, b0 + b, KW, N1W, offs1, mask1, AHEAD)
                _copy_block(ring, p0, b0 + b, KW, N, offs, wmask, AHEAD)
            cp.wait_group(AHEAD - 1)
            cw0 = ring.index(b0 % AHEAD).load(w_l)
        else:
            cw0 = _plane_words(p0, b0, KW, N, offs, wmask)
            nw0 = _plane_words(p0, b0 + 1, KW, N, offs, wmask)
            fw0 = _plane_words(p0, b0 + 2, KW, N, offs, wmask)
        if RING1:
            cw1 = _ring1_words(ring1, b0, PW, BN, w_l, AHEAD)
        elif W1 > 0:
            cw1 = _plane_words(p1, b0, KW, N, offs, wmask)
            nw1 = _plane_words(p1, b0 + 1, KW, N, offs, wmask)
            fw1 = _plane_words(p1, b0 + 2, KW, N, offs, wmask)
        else:
            cw1 = cw0
        sc, zb = _slot_scale(s, z, s0 * STEP, K, G, n, nmask, stride_sg, stride_sn, ZERO, HAS_Z, DT, W0)
        a = gl.convert_layout(_step_operand(cw0, cw1, sc, zb, s, z, s0 * STEP, K, G, n, nmask, stride_sg, stride_sn,
                                            W0, W1, ZERO, HAS_Z, SCALES, DT, PACK1), a_l, assert_trivial=True)
        if SCALES < 2:  # the group of the slice's second step (SCALES 1) or block (SCALES 0)
            raw_s, raw_z = _load_scale(s, z, s0 * STEP + (STEP if SCALES == 1 else 16 * PER), K, G, n, nmask,
                                       stride_sg, stride_sn, HAS_Z)
        if PAIRS:  # a K block a step (8 bits), words in registers: two sets alternate, two steps an iteration
            if SCALES == 0:
                rb_s, rb_z = _load_scale(s, z, (s0 + 2) * STEP, K, G, n, nmask, stride_sg, stride_sn, HAS_Z)
            else:
                raw_s, raw_z, rb_s, rb_z = sc, zb, sc, zb
            for u in range(0, (steps - 1) // 2):
                acc, a, nw0, raw_s, raw_z = _paired_step(
                    2 * u, s0, steps, acc, a, nw0, raw_s, raw_z, x_desc, x_smem, bars, pid_m, p0, s, z, K, KW, G,
                    N, n, nmask, offs, wmask, stride_sg, stride_sn, a_l, W0, ZERO, HAS_Z, SCALES, DT, STAGES,
                    OVERLAP)
                acc, a, fw0, rb_s, rb_z = _paired_step(
                    2 * u + 1, s0, steps, acc, a, fw0, rb_s, rb_z, x_desc, x_smem, bars, pid_m, p0, s, z, K, KW,
                    G, N, n, nmask, offs, wmask, stride_sg, stride_sn, a_l, W0, ZERO, HAS_Z, SCALES, DT, STAGES,
                    OVERLAP)
            if steps % 2 == 0:
                acc, a, nw0, raw_s, raw_z = _paired_step(
                    steps - 2, s0, steps, acc, a, nw0, raw_s, raw_z, x_desc, x_smem, bars, pid_m, p0, s, z, K, KW,
                    G, N, n, nmask, offs, wmask, stride_sg, stride_sn, a_l, W0, ZERO, HAS_Z, SCALES, DT, STAGES,
                    OVERLAP)
            acc = _issue_step(steps - 1, a, acc, x_smem, bars, STAGES)
            acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
        else:
            # One iteration per step, the same code for each (ptxas then keeps the operands of the steps in
            # flight apart; a loop over blocks with the steps unrolled had it copy them through one register quad,
            # waiting on each wgmma): a block's words are shifted by a step's slots after each step. i counts the
            # slice's steps (ring buffers and phases), t = s0 + i the weight's (columns, blocks).
            for i in range(0, steps):
                t = s0 + i
                acc = _issue_step(i, a, acc, x_smem, bars, STAGES)
                if SUB == 1 or (t + 1) % SUB == 0:  # the next step starts block nb
                    nb = (t + 1) // SUB
                    if RING:  # copied AHEAD - 1 blocks ago
                        if RING1:
                            _copy_plane1(ring1, p1, nb + AHEAD - 1, KW, N1W, offs1, mask1, AHEAD)
                        _copy_block(ring, p0, nb + AHEAD - 1, KW, N, offs, wmask, AHEAD)
                        cp.wait_group(AHEAD - 1)
                        cw0 = ring.index(nb % AHEAD).load(w_l)
                    else:  # loaded two blocks ago
                        cw0 = nw0
                        nw0 = fw0
                        fw0 = _plane_words(p0, nb + 2, KW, N, offs, wmask)
                    if RING1:
                        cw1 = _ring1_words(ring1, nb, PW, BN, w_l, AHEAD)
                    elif W1 > 0:
                        cw1 = nw1
                        nw1 = fw1
                        fw1 = _plane_words(p1, nb + 2, KW, N, offs, wmask)
                    else:
                        cw1 = cw0
                    if SCALES == 0:  # the block's group was loaded a block ago; load the next block's
                        sc, zb = _scale_bias(raw_s, raw_z, ZERO, HAS_Z, DT, W0)
                        raw_s, raw_z = _load_scale(s, z, (nb + 1) * 16 * PER, K, G, n, nmask, stride_sg, stride_sn,
                                                   HAS_Z)
                else:
                    cw0 = cw0 >> (4 * W0)
                    cw1 = cw1 >> (4 * W1)
                if SCALES == 1:  # step t + 1's group was loaded an iteration ago; load step t + 2's
                    sc, zb = _scale_bias(raw_s, raw_z, ZERO, HAS_Z, DT, W0)
                    raw_s, raw_z = _load_scale(s, z, (t + 2) * STEP, K, G, n, nmask, stride_sg, stride_sn, HAS_Z)
                a_next = _step_operand(cw0, cw1, sc, zb, s, z, (t + 1) * STEP, K, G, n, nmask, stride_sg, stride_sn, W0,
                                       W1, ZERO, HAS_Z, SCALES, DT, PACK1)
                acc, a = _retire_step(i, s0, steps, acc, a, a_next, x_desc, x_smem, bars, pid_m, a_l, STAGES,
                                      OVERLAP)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        for st in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(st))
        if RING:  # copies of blocks past the slice (zeros past K) may still be writing the rings; the epilogue's
            cp.wait_group(0)  # layout change may use that shared memory
        if ATOMIC:  # two K slices: each stores its float32 part, the second to finish sums both into out
            _store_part(ws + (gl.program_id(2) * M + pid_m * BM) * stride_wm + gl.program_id(1) * BN, stride_wm, acc,
                        x_smem, pid_n * BN, N, pid_m * BM, M, WARPS)
            gl.thread_barrier()
            tile = cnt + pid_m * gl.num_programs(1) + gl.program_id(1)
            if gl.atomic_add(tile, 1, sem="acq_rel") == 1:
                _sum_parts(ws, out, pid_m * BM, gl.program_id(1) * BN, pid_n * BN, M, N, stride_wm, stride_om, BM,
                           BN, WARPS, DT)
                gl.atomic_xchg(tile, 0, sem="relaxed")
        else:
            _store_tile(out + pid_m * BM * stride_om + pid_n * BN, stride_om, acc.to(DT), pid_n * BN, N, pid_m * BM, M,
                        WARPS)


def launch_constants(gw: GpuPackedWeight, dtype: torch.dtype, block_m: int, num_warps: int,
                     stages: int, split_k: int = 1) -> dict:
    """The kernel's constexprs and launch options for this weight, rows of `dtype` and tile (what `linear` launches
    with and benchmarks/compile_decode_offline.py compiles). SCALES: 0 a block's group loaded a block ahead, 1 a
    step's group loaded a step ahead, 2 each slot's group loaded where it is used; RING: plane-0 words through a
    shared-memory ring of AHEAD blocks (2/4 bits, and 3/5/6 with RING1), else registers; RING1: plane 1 through a
    ring as int32 words of RING1 fields (N a multiple of them), else 0; ATOMIC: one of two K slices, its float32
    part added by the second to finish (see the module); PAIRS: 8-bit words in two register sets, two steps an
    iteration (`_paired_step`; not in the tiles held to 128 registers, where m128w8p4 spilled 96 bytes with it);
    OVERLAP: a step's operand made while the `wgmma` before it runs (`_retire_step`; not in the tiles held to 128
    registers, where the second operand's registers made m128w8p4 spill 8 to 72 bytes); G: the group width (a
    constant: the group of a column is then a shift, not a division in every step). With OVERLAP, G and PACK1, on
    an H100 (session 37, 512 tokens, m256w4p3) 8192x8192 3-bit went from 120.0 to 109.0 us, 8-bit from 117.0 to
    102.4, 2-bit from 105.3 to 99.4.
    Tiles of 8 warps and up to 128 tokens are held to 128 registers a thread (3-bit spills 16 bytes), so that two
    CTAs share an SM: on an H100, with the version measured in session 30, that took 28672x8192 4-bit at 128 tokens
    from 222.7 to 159.1 us and 8192x8192 at 512 from 217.6 to 158.4 (docs/kernels_gpu.md, "Session 30")."""
    scales = 0 if gw.group % gw.block == 0 else 1 if gw.group % STEP == 0 else 2
    per_word = 4 // gw.planes[-1].element_size()  # plane-1 fields an int32 word holds (1: no plane 1)
    ring1 = per_word if len(gw.planes) > 1 and gw.shape[0] % per_word == 0 else 0
    ring, capped = gw.bits in (2, 4) or ring1 > 0, num_warps == 8 and block_m <= 128
    return dict(SCALES=scales, STAGES=stages, RING=ring, RING1=ring1, AHEAD=2, ATOMIC=split_k > 1,
                PAIRS=not (ring or capped) and len(gw.planes) == 1 and gw.per == 4, OVERLAP=not capped, PACK1=ring1 > 0,
                G=gw.group, WARPS=num_warps, num_warps=num_warps, **({"maxnreg": 128} if capped else {}))


def split_steps(gw: GpuPackedWeight, split_k: int) -> tuple[int, int]:
    """(64-column steps per K slice, slices): whole K blocks, split_k slices or fewer (each with at least one
    block)."""
    steps, sub = gw.planes[0].shape[0] * gw.per // STEP, gw.per // 4
    per_slice = -(-steps // split_k)
    per_slice = -(-per_slice // sub) * sub  # rounded up to whole blocks
    return per_slice, -(-steps // per_slice)


_AT_ONCE: dict[tuple, int] = {}


def _launch_args(x: torch.Tensor, gw: GpuPackedWeight, block_m: int, num_warps: int, stages: int,
                 per_slice: int) -> tuple[object, dict, dict]:
    """(x's TMA descriptor, the kernel's arguments but ws / cnt / stride_wm / whole_n, the unsplit kernel's constants)
    for x [M, K] with 16-byte aligned rows; out is allocated here."""
    from . import triton_linear as tlin
    m, k = x.shape
    out = torch.empty(m, gw.shape[0], dtype=x.dtype, device=x.device)
    dt = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([block_m, STEP], dt)
    desc = TensorDescriptor(x, [m, k], [x.stride(0), 1], [block_m, STEP], layout)
    tensors, consts = tlin._args(gw)
    unsplit = launch_constants(gw, x.dtype, block_m, num_warps, stages)
    if unsplit["RING1"]:  # plane 1 copied as int32 words
        tensors["p1"] = gw.planes[1].view(torch.int32)
    return desc, dict(out=out, M=m, N=gw.shape[0], K=k, KW=gw.planes[0].shape[0],
                      stride_om=out.stride(0), split_steps=per_slice, **tensors, **consts), unsplit


def ctas_at_once(x: torch.Tensor, gw: GpuPackedWeight, block_m: int, num_warps: int, stages: int) -> int:
    """CTAs of the unsplit kernel for this weight, rows like x and tile that run at once on x's device: its SMs
    times the CTAs an SM holds by registers (allocated per warp in units of 256), shared memory (1 KiB reserved
    per CTA) and threads, from the compiled kernel (compiled here if it is not yet; cached)."""
    key = (x.device, x.dtype, gw.widths, gw.group, gw.zeros is not None,
           *launch_constants(gw, x.dtype, block_m, num_warps, stages).items())
    if key not in _AT_ONCE:
        desc, args, unsplit = _launch_args(x, gw, block_m, num_warps, stages, split_steps(gw, 1)[0])
        kernel = _wgmma_prefill_kernel.warmup(desc, ws=args["out"], cnt=args["out"], stride_wm=0, whole_n=0,
                                              grid=(1, 1), **unsplit, **args)
        kernel._init_handles()
        props = torch.cuda.get_device_properties(x.device)
        regs = num_warps * -(-kernel.n_regs * 32 // 256) * 256
        per_sm = min(getattr(props, "regs_per_multiprocessor", 65536) // regs,
                     getattr(props, "shared_memory_per_multiprocessor", 233472) // (kernel.metadata.shared + 1024),
                     props.max_threads_per_multi_processor // (32 * num_warps))
        _AT_ONCE[key] = props.multi_processor_count * max(per_sm, 1)
    return _AT_ONCE[key]


def whole_tiles(m_tiles: int, n_tiles: int, at_once: int) -> int:
    """Column tiles run whole (K not split) when `at_once` CTAs of the unsplit kernel run at once: those that fill
    complete rounds, so that only the last, part-filled round's tiles are split (all of them where the tiles fill
    less than one round)."""
    return (m_tiles * n_tiles // at_once) * at_once // m_tiles


def launch_rows(m: int, block_m: int) -> int:
    """Token rows x is launched with: m, rounded up to whole token tiles where an eighth of the last tile or more
    would lie past m (`linear` pads x with zero rows there)."""
    return m - m % -block_m if 8 * (-m % block_m) >= block_m else m


def linear(x: torch.Tensor, gw: GpuPackedWeight, block_m: int = 128, num_warps: int = 8,
           stages: int = 4, split_k: int = 1) -> torch.Tensor:
    """out = x W^T for x [M, K] (float16 / bfloat16, CUDA, Hopper) through the wgmma prefill kernel. split_k 2:
    the column tiles that fill complete rounds of CTAs run whole, then the rest (`whole_tiles`: the last,
    part-filled round's; all where they fill less than one) in two K slices, summed in float32: a second launch.
    Where an eighth of the last token tile or more lies past M, x is first copied into whole tiles with zero rows:
    TMA boxes partly past the tensor ran slower the more rows they missed (on an H100, session 33, 8192x8192 4-bit
    m256w4p3: 111.3 us at 512 tokens, 196.1 at 384 and 224.6 at 320, against 113.6 and 111.5 padded; one row
    short cost nothing, where the copy costs about 5 us)."""
    from . import triton_linear as tlin
    if split_k > 1 and 16 * num_warps > 32 * stages:  # `_store_part`: [16 x num_warps, block_m] float32
        raise ValueError(f"tile m{block_m}w{num_warps}p{stages} with split_k={split_k}: a K slice's float32 part "
                         f"goes through the x ring, which holds it with stages >= {num_warps // 2}")
    reason = unsupported_reason(gw, x.dtype, x.device, block_m, num_warps, split_k)
    if reason is not None:
        raise ValueError(reason)
    m, rows = x.shape[0], launch_rows(x.shape[0], block_m)
    if rows > m:  # zero rows up to whole token tiles (see the docstring)
        x = torch.nn.functional.pad(x, (0, 0, 0, rows - m))
    elif x.stride(-1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:  # TMA: 16-byte aligned rows
        x = x.clone(memory_format=torch.contiguous_format)
    per_slice, slices = split_steps(gw, split_k)
    desc, args, unsplit = _launch_args(x, gw, block_m, num_warps, stages, per_slice)
    n, bn = gw.shape[0], 16 * num_warps
    m_tiles, n_tiles = -(-m // block_m), -(-n // bn)
    whole = n_tiles if slices == 1 else whole_tiles(m_tiles, n_tiles, ctas_at_once(x, gw, block_m, num_warps, stages))
    out = args["out"]
    if whole:
        _wgmma_prefill_kernel[(m_tiles, whole)](desc, ws=out, cnt=out, stride_wm=0, whole_n=0, **unsplit, **args)
    if whole < n_tiles:  # each slice's part in ws, the second to finish a tile stores the sum
        ws = torch.empty(2, rows, (n_tiles - whole) * bn, dtype=torch.float32, device=x.device)
        _, cnt = tlin._workspace(x.device, 0, m_tiles * (n_tiles - whole))
        _wgmma_prefill_kernel[(m_tiles, n_tiles - whole, slices)](
            desc, ws=ws, cnt=cnt, stride_wm=ws.stride(1), whole_n=whole, **dict(unsplit, ATOMIC=True), **args)
    return out[:m]
