"""Dense bit packing of integer codes: n codes of b bits take exactly ceil(n*b/8) bytes.

Code i occupies bits [i*b, (i+1)*b) of the little-endian bitstream (least significant bit first), so
a tensor is one continuous stream with no per-row padding. 3, 5 and 6 bits work on blocks of 8 codes
(= b bytes), one column of the block at a time (8 vectorized steps, no per-element loop); 2 and 4 bits,
which divide a byte, work on bytes directly.
"""
from __future__ import annotations

import torch

from .choice import SUPPORTED_BITS


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of `numel` codes of `bits` bits packed densely."""
    return -(-numel * bits // 8)


def _check(bits: int) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; choose from {SUPPORTED_BITS}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 `codes` (any shape, values < 2**bits) into a 1-D uint8 tensor of ceil(n*bits/8) bytes."""
    _check(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes.dtype={codes.dtype} is not supported; pack_bits wants torch.uint8")
    flat = codes.reshape(-1)
    n = flat.numel()
    if bits == 8:
        return flat.clone()
    if bits in (2, 4):
        per = 8 // bits
        padded = torch.zeros(-(-n // per) * per, dtype=torch.uint8, device=flat.device)
        padded[:n] = flat
        cols = padded.view(-1, per)
        out = cols[:, 0].clone()
        for j in range(1, per):
            out |= cols[:, j] << (j * bits)
        return out
    block = torch.zeros(-(-n // 8) * 8, dtype=torch.int16, device=flat.device)
    block[:n] = flat
    block = block.view(-1, 8)
    out = torch.zeros(block.shape[0], bits, dtype=torch.int16, device=flat.device)
    for j in range(8):  # code j of each block starts at bit j*bits: byte `lo`, bit `off`
        lo, off = divmod(j * bits, 8)
        out[:, lo] |= (block[:, j] << off) & 0xFF
        if off + bits > 8:
            out[:, lo + 1] |= block[:, j] >> (8 - off)
    return out.to(torch.uint8).view(-1)[: packed_nbytes(n, bits)].clone()


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` codes of the stream, as a 1-D uint8 tensor."""
    _check(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed.dtype={packed.dtype} is not supported; unpack_bits wants torch.uint8")
    flat = packed.reshape(-1)
    need = packed_nbytes(numel, bits)
    if flat.numel() < need:
        raise ValueError(f"packed has {flat.numel()} bytes but numel={numel} codes of {bits} bits need {need}")
    if bits == 8:
        return flat[:numel].clone()
    mask = (1 << bits) - 1
    if bits in (2, 4):
        shifts = torch.arange(8 // bits, device=flat.device, dtype=torch.uint8) * bits
        codes = (flat[:need].unsqueeze(1) >> shifts) & mask
        return codes.reshape(-1)[:numel].clone()
    n_blocks = -(-numel // 8)
    buf = torch.zeros(n_blocks * bits, dtype=torch.int16, device=flat.device)
    buf[:need] = flat[:need]
    block = buf.view(n_blocks, bits)
    out = torch.empty(n_blocks, 8, dtype=torch.int16, device=flat.device)
    for j in range(8):
        lo, off = divmod(j * bits, 8)
        code = block[:, lo] >> off
        if off + bits > 8:
            code |= block[:, lo + 1] << (8 - off)
        out[:, j] = code & mask
    return out.to(torch.uint8).view(-1)[:numel]
