"""The GPU bit-plane layout (runs on the CPU): exact round trips with the canonical packing."""
from __future__ import annotations

import pytest
import torch

from kernels import QuantSpec, pack_bits, quantize
from kernels.backends import convert_layout
from kernels.gpu_layout import PLANES, dense_to_gpu_bytes, gpu_bytes_to_dense, layout_nbytes, repack_for_gpu


@pytest.mark.parametrize("bits", sorted(PLANES))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("n,k,group", [(37, 203, 32), (16, 64, None), (5, 300, 128), (64, 256, 64)])
def test_repack_round_trip(bits: int, symmetric: bool, n: int, k: int, group: int | None) -> None:
    gen = torch.Generator().manual_seed(bits * 7 + n)
    qt = quantize(torch.randn(n, k, generator=gen), QuantSpec(bits, group, symmetric), clip_search=False)
    gw = repack_for_gpu(qt)
    assert torch.equal(gw.codes(), qt.codes())
    assert torch.equal(gw.dequantize(), qt.dequantize())
    buf = dense_to_gpu_bytes(qt.packed, qt.spec, qt.shape)
    assert buf.dtype == torch.uint8 and buf.numel() == layout_nbytes(bits, qt.shape)
    assert torch.equal(gpu_bytes_to_dense(buf, qt.spec, qt.shape), qt.packed)


def test_layout_bytes_equal_dense_bytes_for_aligned_k() -> None:
    for bits in PLANES:
        assert layout_nbytes(bits, (48, 4096)) == 48 * 4096 * bits // 8


def test_registered_layout_converts_through_registry() -> None:
    import kernels.gpu_backends  # noqa: F401 - registers the "triton" backend and its layout
    qt = quantize(torch.randn(24, 96), QuantSpec(3, 32), clip_search=False)
    buf = convert_layout(qt.packed, qt.spec, qt.shape, "dense", "gpu_planes")
    assert torch.equal(convert_layout(buf, qt.spec, qt.shape, "gpu_planes", "dense"), qt.packed)


def test_documented_slot_mapping() -> None:
    """Block b, word row 16 b + j, slot i holds the code of input column b * 16 * per + 16 i + j."""
    n, k = 3, 200
    codes = torch.arange(k).to(torch.uint8).repeat(n, 1)   # 8-bit code = its column
    qt = quantize(torch.randn(n, k), QuantSpec(8, None), clip_search=False)
    qt.packed = pack_bits(codes, 8)
    gw = repack_for_gpu(qt)
    per, words = gw.per, gw.planes[0][:, 1].to(torch.int64) & 0xFFFFFFFF
    for row in range(words.numel()):
        b, j = divmod(row, 16)
        for i in range(per):
            col = b * 16 * per + 16 * i + j
            assert (int(words[row]) >> (8 * i)) & 255 == (col if col < k else 0)


def test_int8_decode_columns_per_launch_and_refusal_without_a_gpu() -> None:
    """`gluon_imma`: a launch has 8, 16 or 32 activation columns (2 digits x half blocks x field classes per token),
    so 16 tokens (8 with half-block groups); the 2/3-bit field classes only while one mma's 8 columns hold them.
    `Config(imma=True)` (label suffix I) names it for `triton_linear.linear`. Where Gluon or a CUDA device is
    missing, `linear` refuses with the reason, not a Triton error."""
    from kernels import gluon_imma
    from kernels import triton_linear as tlin

    def weight(bits: int, group: int):
        return repack_for_gpu(quantize(torch.randn(8, 512), QuantSpec(bits, group), clip_search=False))
    w2h, w2, w4, w8 = weight(2, 128), weight(2, 256), weight(4, 128), weight(8, 128)
    assert [gluon_imma.halves(g) for g in (w2h, w2, w4, w8)] == [2, 1, 1, 1]
    assert [gluon_imma.max_tokens(g) for g in (w2h, w2, w4, w8)] == [8, 16, 16, 16]
    assert [gluon_imma.classes(w2h, m) for m in (1, 2)] == [2, 1]
    assert [gluon_imma.classes(w2, m) for m in (1, 2, 3)] == [2, 2, 1]
    assert [gluon_imma.columns(w4, m) for m in (1, 4, 5, 8, 9, 16)] == [8, 8, 16, 16, 32, 32]
    assert [gluon_imma.columns(w2h, m) for m in (1, 2, 3, 8)] == [8, 8, 16, 32]
    cfg = tlin.Config(4, 128, 2, 4, 2, imma=True)  # up to 4 tokens, with the next block's prefetch
    assert cfg.label == "m4n128s2w4p2I" and tlin.Config.parse(cfg.label) == cfg
    assert "at most block_m" in tlin.config_error(cfg, 5, w4, torch.bfloat16, torch.device("cuda"))
    assert "no D, T" in tlin.config_error(tlin.Config(1, 128, imma=True, dp4a=True), 1, w4, torch.bfloat16,
                                          torch.device("cuda"))
    if not gluon_imma.HAVE_GLUON or not torch.cuda.is_available():
        with pytest.raises(ValueError, match="Gluon"):
            gluon_imma.linear(torch.zeros(1, 512, dtype=torch.bfloat16), w4, 128, 1, 4)
        assert "Gluon" in tlin.config_error(cfg, 1, w4, torch.bfloat16, torch.device("cpu"))


def test_wgmma_prefill_k_slices_and_word_paths_without_a_gpu() -> None:
    """`gluon_wgmma`: split_k 2 cuts K into at most 2 slices of whole K blocks that cover it (one slice where K is
    one block), for the column tiles past the complete rounds of CTAs; 2/4-bit words go through the shared-memory
    ring, 3/5/6-bit ones too with plane 1 as int32 words where N is a multiple of the plane-1 fields a word holds
    (else registers), 8-bit ones stay in registers; x is padded to whole token tiles where an eighth of the last
    one or more would lie past the tokens.
    `Config(wgmma=True)` with split_k 2 (label ...s2...H) names it; other splits and a missing GPU are refused with
    the reason."""
    from kernels import gluon_wgmma
    from kernels import triton_linear as tlin

    def weight(bits: int, n: int, k: int):
        return repack_for_gpu(quantize(torch.randn(n, k), QuantSpec(bits, 128), clip_search=False))
    for bits in (2, 3, 4, 8):
        for k in (64, 256, 1000, 8192):
            gw = weight(bits, 8, k)
            steps, sub = gw.planes[0].shape[0] * gw.per // gluon_wgmma.STEP, gw.per // 4
            per_slice, slices = gluon_wgmma.split_steps(gw, 2)
            assert per_slice % sub == 0 and slices <= 2 and (slices - 1) * per_slice < steps <= slices * per_slice
            assert gluon_wgmma.split_steps(gw, 1)[0] >= steps
    assert gluon_wgmma.split_steps(weight(2, 8, 256), 2) == (4, 1)  # one 256-column block: one slice
    # with 264 CTAs at once: 2 x 448 tiles (28672 rows of 64 at 512 tokens) fill 3 rounds, so 396 column tiles
    # run whole and 52 in slices; tiles that fill no round are all sliced, whole rounds not at all
    assert [gluon_wgmma.whole_tiles(2, n, 264) for n in (448, 64, 132, 133)] == [396, 0, 132, 132]
    # x padded to whole token tiles where an eighth of the last one or more would lie past the tokens
    assert [gluon_wgmma.launch_rows(m, 256) for m in (512, 511, 481, 480, 320, 17)] == [512, 511, 481, 512, 512,
                                                                                      256]

    def paths(bits: int, n: int) -> tuple[bool, int]:
        consts = gluon_wgmma.launch_constants(weight(bits, n, 256), torch.bfloat16, 256, 4, 3)
        return consts["RING"], consts["RING1"]
    assert [paths(b, 64) for b in (2, 3, 4, 5, 6, 8)] == [(True, 0), (True, 2), (True, 0), (True, 4), (True, 2),
                                                          (False, 0)]
    assert [paths(b, 37) for b in (3, 5, 6)] == [(False, 0)] * 3
    assert paths(5, 38) == (False, 0) and paths(6, 38) == (True, 2)
    # 8-bit words (a K block a step, in registers) alternate between two register sets, two steps an iteration,
    # except in the tiles held to 128 registers (8 warps, up to 128 tokens), where the second set spilled
    assert [gluon_wgmma.launch_constants(weight(b, 64, 256), torch.bfloat16, *t)["PAIRS"]
            for b in (8, 4, 3) for t in gluon_wgmma.TILES] == [True, True, False, True, True] + [False] * 10
    # a step's operand made while the wgmma before it runs, but in the tiles held to 128 registers (they spilled);
    # plane-1 fields read from their ring as packed pairs; the group width a constant of the kernel
    consts = [gluon_wgmma.launch_constants(weight(3, 64, 256), torch.bfloat16, *t) for t in gluon_wgmma.TILES]
    assert [(c["OVERLAP"], c["PACK1"], c["G"]) for c in consts] == [(True, True, 128), (True, True, 128),
                                                                   (False, True, 128), (True, True, 128),
                                                                   (True, True, 128)]
    assert not gluon_wgmma.launch_constants(weight(3, 37, 256), torch.bfloat16, 256, 4, 3)["PACK1"]
    cfg = tlin.Config(256, 64, 2, 4, 3, wgmma=True)
    assert cfg.label == "m256n64s2w4p3H" and tlin.Config.parse(cfg.label) == cfg
    w4 = weight(4, 8, 256)
    assert "split_k=3" in tlin.config_error(tlin.Config(256, 64, 3, 4, 3, wgmma=True), 300, w4, torch.bfloat16,
                                            torch.device("cuda"))
    if not gluon_wgmma.HAVE_GLUON or not torch.cuda.is_available():
        with pytest.raises(ValueError, match="Gluon"):
            gluon_wgmma.linear(torch.zeros(1, 256, dtype=torch.bfloat16), w4, 256, 4, 3, 2)
        assert "Gluon" in tlin.config_error(cfg, 300, w4, torch.bfloat16, torch.device("cpu"))


def test_planes_are_built_a_block_of_columns_at_a_time(monkeypatch) -> None:
    """The conversion to planes works on blocks of output columns (bounded temporaries); blocks give the same planes
    as the whole weight at once."""
    from kernels import gpu_layout
    gen = torch.Generator().manual_seed(1)
    for bits in (2, 3, 5, 8):
        qt = quantize(torch.randn(37, 300, generator=gen), QuantSpec(bits, 64), clip_search=False)
        whole = repack_for_gpu(qt).planes
        monkeypatch.setattr(gpu_layout, "CONVERT_BYTES", 5 * 320 * 8)  # 2..5 columns a block of the 37
        blocks = repack_for_gpu(qt).planes
        monkeypatch.undo()
        assert all(torch.equal(a, b) for a, b in zip(whole, blocks, strict=True))
