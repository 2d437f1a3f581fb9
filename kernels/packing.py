"""Dense bit packing of integer codes: n codes of b bits take exactly ceil(n*b/8) bytes.

Code i occupies bits [i*b, (i+1)*b) of the little-endian bitstream (least significant bit first), so
a tensor is one continuous stream with no per-row padding. No per-element loops: 2 and 4 bits
reinterpret a word of 8 // b bytes (one code each) against the byte holding those codes; at 3, 5 and 6
bits a block of 8 codes is b bytes: unpacking puts each code together from at most two of its byte
columns (about 2x faster than spreading the block as one int64 on the CPU, docs/kernels_cpu.md), and
packing works on the 8 code columns of the blocks. Shifts and masks only, on a little-endian host.
`unpack_float` gives the codes as float32 (what dequantizing wants); at 2 and 3 bits it looks up 4 codes at a
time in a small table (one byte, or 12 bits of 3 bytes, per row), about 1.5-1.8x faster than unpacking then
converting on the CPU (docs/kernels_cpu.md).
"""
from __future__ import annotations

import functools
import sys

import torch

from .choice import SUPPORTED_BITS

if sys.byteorder != "little":
    raise ImportError("kernels.packing reinterprets bytes as little-endian integers; this host is big-endian")

_WORD = {2: torch.int32, 4: torch.int16}  # 8 // b codes of one byte <-> one word of 8 // b bytes


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of `numel` codes of `bits` bits packed densely."""
    return -(-numel * bits // 8)


def _check(bits: int) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; choose from {SUPPORTED_BITS}")


def _padded(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    """A fresh, zero-padded copy of `flat` whose length is a multiple of `multiple`."""
    out = torch.zeros(-(-flat.numel() // multiple) * multiple, dtype=torch.uint8, device=flat.device)
    out[: flat.numel()] = flat
    return out


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 `codes` (any shape, values < 2**bits) into a 1-D uint8 tensor of ceil(n*bits/8) bytes."""
    _check(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes.dtype={codes.dtype} is not supported; pack_bits wants torch.uint8")
    flat = codes.reshape(-1)
    n = flat.numel()
    if bits == 8:
        return flat.clone()
    mask = (1 << bits) - 1
    if bits in _WORD:  # one byte per code in a word -> all codes of the word in one byte
        per = 8 // bits
        word = _padded(flat, per).view(_WORD[bits])
        out = word & mask
        for j in range(1, per):
            out |= (word >> (8 * j - bits * j)) & (mask << (bits * j))
        return out.to(torch.uint8)
    block = _padded(flat, 8).view(-1, 8).to(torch.int16)
    out = torch.zeros(block.shape[0], bits, dtype=torch.int16, device=flat.device)
    for j in range(8):  # code j of each block starts at bit j*b: byte `lo`, bit `off`
        lo, off = divmod(j * bits, 8)
        out[:, lo] |= (block[:, j] << off) & 0xFF
        if off + bits > 8:
            out[:, lo + 1] |= block[:, j] >> (8 - off)
    return out.to(torch.uint8).view(-1)[: packed_nbytes(n, bits)].clone()  # own storage of exactly that size


def _stream(packed: torch.Tensor, bits: int, numel: int, caller: str) -> tuple[torch.Tensor, int]:
    """The packed bytes as 1-D and how many of them `numel` codes take, after checking the arguments."""
    _check(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed.dtype={packed.dtype} is not supported; {caller} wants torch.uint8")
    flat = packed.reshape(-1)
    need = packed_nbytes(numel, bits)
    if flat.numel() < need:
        raise ValueError(f"packed has {flat.numel()} bytes but numel={numel} codes of {bits} bits need {need}")
    return flat, need


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` codes of the stream, as a 1-D uint8 tensor."""
    flat, need = _stream(packed, bits, numel, "unpack_bits")
    if bits == 8:
        return flat[:numel].clone()
    mask = (1 << bits) - 1
    if bits in _WORD:  # each byte's codes spread into one byte each of a word
        per = 8 // bits
        byte = flat[:need].to(_WORD[bits])
        word = byte & mask
        for j in range(1, per):
            word |= (byte & (mask << (bits * j))) << (8 * j - bits * j)
        return word.view(torch.uint8)[:numel]
    cols = _padded(flat[:need], bits).view(-1, bits).t().contiguous()  # byte i of every block of 8 codes
    codes = []
    for j in range(8):  # code j starts at bit j*b: byte `lo`, bit `off`, and may run into byte lo + 1
        lo, off = divmod(j * bits, 8)
        code = cols[lo] >> off
        if off + bits > 8:
            code |= cols[lo + 1] << (8 - off)  # uint8: the bits above the byte fall off
        codes.append(code if off + bits == 8 else code & mask)
    return torch.stack(codes, 1).view(-1)[:numel]


_LUT_BITS = {2: 8, 3: 12}  # widths unpacked by table, and the stream bits per table row (4 codes)


@functools.cache
def _float_table(bits: int, device: torch.device) -> torch.Tensor:
    """[2^span, 4] float32 on `device`: row i holds the 4 codes of the `span`-bit field value i."""
    i = torch.arange(1 << _LUT_BITS[bits], device=device)
    return torch.stack([((i >> (bits * j)) & ((1 << bits) - 1)).float() for j in range(4)], 1)


def unpack_float(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """`unpack_bits(packed, bits, numel)` as float32 (1-D). At 2 and 3 bits the codes come from a table lookup per
    4 codes (2 bits: the byte is the row; 3 bits: 3 bytes are two 12-bit rows), not from unpacking then converting."""
    if bits not in _LUT_BITS:
        return unpack_bits(packed, bits, numel).float()
    flat, need = _stream(packed, bits, numel, "unpack_float")
    if bits == 2:
        rows = flat[:need].long()
    else:
        b = torch.zeros(-(-need // 3) * 3, dtype=torch.int32, device=flat.device)
        b[:need] = flat[:need]
        b = b.view(-1, 3)
        rows = torch.stack((b[:, 0] | ((b[:, 1] & 15) << 8), (b[:, 1] >> 4) | (b[:, 2] << 4)), 1).view(-1)
    return _float_table(bits, flat.device).index_select(0, rows).view(-1)[:numel]
