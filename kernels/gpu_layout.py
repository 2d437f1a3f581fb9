"""GPU layout of a quantized weight: codes split into bit planes, packed along the input dim, N-contiguous.

A b-bit code is stored as one or two bit planes of widths (1, 2, 4, 8): 2 = 2, 3 = 2+1, 4 = 4, 5 = 4+1,
6 = 4+2, 8 = 8. A word holds `per = 32 // width(plane 0)` codes in every plane (plane 0 words are int32,
plane 1 words have per * width(plane 1) bits: int16 for 3 and 6 bits, int8 for 5). Each plane is a tensor
[Kp // per, N], N contiguous, so a tile of output columns is one coalesced wide load. Input columns come in
blocks of B = 16 * per (Kp = in_features padded to a multiple of B); in block b, word row 16 b + j holds in
slot i the code of column b B + 16 i + j:
    code = (plane0[16 b + j] >> i*w0) & m0 | ((plane1[16 b + j] >> i*w1) & m1) << w0.
So slot i of a block's 16 word rows is 16 *consecutive* columns: a kernel unpacks it with one shift and one
mask per code and multiplies it by a contiguous slice of x (or feeds it to a K=16 tensor-core dot).
Scales (and zero points) are read as [n_groups, N] (transposed views of the canonical [N, n_groups]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .choice import QuantSpec
from .packing import pack_bits, unpack_bits
from .quantizer import QuantizedTensor

PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}
WORD_ROWS = 16  # word rows per block: slot i of a block covers 16 consecutive input columns
CONVERT_BYTES = 64 << 20  # an int64 temporary of the conversion to planes, per block of output columns
_WORD_DTYPE = {8: torch.int8, 16: torch.int16, 32: torch.int32}


@dataclass
class GpuPackedWeight:
    """A quantized [out, in] weight in the GPU layout (see module docstring)."""

    planes: tuple[torch.Tensor, ...]
    scales: torch.Tensor           # [n_groups, N], stored scale dtype
    zeros: torch.Tensor | None     # [n_groups, N] zero points in the scale dtype (asymmetric) or None (zero = 2^(b-1))
    shape: tuple[int, int]         # (out_features N, in_features K)
    spec: QuantSpec

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def widths(self) -> tuple[int, ...]:
        return PLANES[self.spec.bits]

    @property
    def per(self) -> int:
        """Input columns per word."""
        return 32 // self.widths[0]

    @property
    def block(self) -> int:
        """Input columns per block of WORD_ROWS word rows."""
        return WORD_ROWS * self.per

    @property
    def group(self) -> int:
        """Group width in input columns (per-channel: the whole padded row)."""
        k = self.shape[1]
        return self.spec.group_width(k) if self.spec.group_size is not None else self.planes[0].shape[0] * self.per

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.planes, self.scales)) + (
            0 if self.zeros is None else self.zeros.numel() * self.zeros.element_size())

    def to(self, device: torch.device | str) -> "GpuPackedWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return GpuPackedWeight(tuple(p.to(device) for p in self.planes), move(self.scales), move(self.zeros),
                               self.shape, self.spec)

    def codes(self) -> torch.Tensor:
        """uint8 codes [N, K] (torch reference of the kernels' unpack)."""
        n, k = self.shape
        widths, per = self.widths, self.per
        kw = self.planes[0].shape[0]
        codes = torch.zeros(kw, per, n, dtype=torch.int32, device=self.planes[0].device)
        offset = 0
        for plane, w in zip(self.planes, widths):
            shifts = (torch.arange(per, device=plane.device, dtype=torch.int32) * w).view(1, per, 1)
            codes |= ((plane.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << w) - 1)) << offset
            offset += w
        codes = codes.view(kw // WORD_ROWS, WORD_ROWS, per, n).permute(0, 2, 1, 3).reshape(kw * per, n)
        return codes[:k].t().to(torch.uint8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight [N, K] (torch reference)."""
        n, k = self.shape
        gid = torch.arange(k, device=self.scales.device) // self.spec.group_width(k)
        zero = float(1 << (self.bits - 1)) if self.zeros is None else self.zeros[gid].t().float()
        return ((self.codes().float() - zero) * self.scales[gid].t().float()).to(dtype)


def _pack_plane(codes: torch.Tensor, width: int) -> torch.Tensor:
    """codes [Kp // per, per, N] int64 of `width` bits (word row, slot, column) -> words [Kp // per, N]."""
    per = codes.shape[1]
    shifts = (torch.arange(per, device=codes.device, dtype=torch.int64) * width).view(1, per, 1)
    words = (codes << shifts).sum(dim=1)
    word_bits = per * width
    words = torch.where(words >= (1 << (word_bits - 1)), words - (1 << word_bits), words)  # two's complement
    return words.to(_WORD_DTYPE[word_bits]).contiguous()


def _codes_to_planes(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """uint8 codes [N, K] -> the bit planes [Kp // per, N], a block of columns at a time: the int64 temporaries of a
    block stay near CONVERT_BYTES each (a whole weight at once holds several int64 copies of its codes: about 2 GiB
    for a 32000x2048 one, in a layer's first forward on the GPU)."""
    n, k = codes.shape
    per = 32 // PLANES[bits][0]
    step = max(1, CONVERT_BYTES // (_padded_k(k, per) * 8))
    blocks = [_block_planes(codes[i:i + step], bits) for i in range(0, n, step)]
    return blocks[0] if len(blocks) == 1 else tuple(torch.cat(planes, dim=1) for planes in zip(*blocks))


def _block_planes(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    n, k = codes.shape
    widths = PLANES[bits]
    per = 32 // widths[0]
    kp = _padded_k(k, per)
    codes_t = torch.zeros(kp, n, dtype=torch.int64, device=codes.device)
    codes_t[:k] = codes.t()
    slots = codes_t.view(kp // (WORD_ROWS * per), per, WORD_ROWS, n).permute(0, 2, 1, 3).reshape(kp // per, per, n)
    planes, offset = [], 0
    for w in widths:
        planes.append(_pack_plane((slots >> offset) & ((1 << w) - 1), w))
        offset += w
    return tuple(planes)


def _padded_k(k: int, per: int) -> int:
    block = WORD_ROWS * per
    return -(-k // block) * block


def _plane_specs(bits: int, shape: tuple[int, int]) -> list[tuple[torch.dtype, int, int]]:
    """(word dtype, rows, columns) of each plane of a [N, K] weight."""
    n, k = shape
    widths = PLANES[bits]
    per = 32 // widths[0]
    rows = _padded_k(k, per) // per
    return [(_WORD_DTYPE[per * w], rows, n) for w in widths]


def layout_nbytes(bits: int, shape: tuple[int, int]) -> int:
    """Bytes of the planes of a [N, K] weight (= the dense packing of [N, K padded to a block of 16 words])."""
    return sum(r * c * torch.empty(0, dtype=d).element_size() for d, r, c in _plane_specs(bits, shape))


def planes_from_bytes(buf: torch.Tensor, bits: int, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Views of the planes stored back to back in a uint8 1-D buffer (no copy)."""
    planes, offset = [], 0
    for dtype, rows, cols in _plane_specs(bits, shape):
        size = rows * cols * torch.empty(0, dtype=dtype).element_size()
        planes.append(buf[offset:offset + size].view(dtype).view(rows, cols))
        offset += size
    return tuple(planes)


def dense_to_gpu_bytes(dense: torch.Tensor, spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    """Dense packed codes (pack_bits stream) -> the planes as one uint8 1-D buffer."""
    n, k = shape
    codes = unpack_bits(dense, spec.bits, n * k).view(n, k)
    return torch.cat([p.reshape(-1).view(torch.uint8) for p in _codes_to_planes(codes, spec.bits)])


def gpu_bytes_to_dense(buf: torch.Tensor, spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `dense_to_gpu_bytes`."""
    planes = planes_from_bytes(buf, spec.bits, shape)
    gw = GpuPackedWeight(planes, torch.empty(0, 0), None, shape, spec)
    return pack_bits(gw.codes().contiguous(), spec.bits)


def repack_for_gpu(qt: QuantizedTensor, device: torch.device | str | None = None) -> GpuPackedWeight:
    """The canonical QuantizedTensor (dense bitstream, scales [out, n_groups]) in the GPU layout."""
    zeros = None if qt.zeros is None else qt.zeros.t().to(qt.scales.dtype).contiguous()
    gw = GpuPackedWeight(_codes_to_planes(qt.codes(), qt.spec.bits), qt.scales.t().contiguous(), zeros,
                         qt.shape, qt.spec)
    return gw if device is None else gw.to(device)
