"""CPU backends: torch's int8 and int4 weight-only matmuls where their contracts hold, else dequantize.

- "cpu_int8": torch._weight_int8pack_mm(x [M,K] f32/bf16/f16, w int8 [N,K], scales [N] in x's dtype);
  used for 8-bit symmetric per-channel weights (bf16 activations: only K % 32 == 0, see below). Our codes q in [0, 255] (zero 128) become int8 q - 128
  = q XOR 0x80, so the stored layout is the same bytes reinterpreted.
- "cpu_int4": torch._convert_weight_to_int4pack_for_cpu(int32 [N,K] codes 0..15, innerKTiles) -> uint8
  [N, K/2] (a permutation of the nibbles, same bytes as our dense packing) and
  torch._weight_int4pack_mm_for_cpu(x [M,K], packed, group, scale_and_zero [K/group, N, 2] in x's
  dtype) computing w = (q - 8) * scale + zero. Contract (torch 2.13, checked by the tests): N % 16 == 0,
  group in (32, 64, 128, 256), K % group == 0. Asymmetric zero points map to zero = (8 - z) * scale.
- "dequant": unpack + dequantize in the activation dtype + F.linear; runs everything, on any device.

Both torch ops run any float activation dtype, but on x86 (AVX2 and AVX512) their vectorized kernels
exist for bfloat16 only; float32/float16 go to a scalar loop that measured 30-60x slower than
"dequant" here (docs/kernels_cpu.md). So they are picked automatically for bfloat16 activations only
(`fast`), and can be forced by name for the others.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .backends import Backend, QuantizedWeightLike, register_backend
from .choice import QuantSpec
from .packing import pack_bits, unpack_bits, unpack_float
from .quantizer import dequantize_codes

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FAST_DTYPES = (torch.bfloat16,)  # activation dtypes with vectorized x86 kernels in both ops
# the vectorized bf16 int8 kernel steps K by whole vectors with no tail: K=33 or 100 segfaults on AVX2
# (8 lanes); 32 covers AVX2/AVX512 vector widths
INT8_BF16_K_MULTIPLE = 32
INT4_GROUPS = (32, 64, 128, 256)
INT4_N_MULTIPLE = 16
INT4_ROW_BLOCK = 64  # rows the CPU int4 kernels tile N by (a multiple of their 16/32/64-row tiles)


def dequantized_matrix(qw: QuantizedWeightLike, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] float weight of a dense-layout layer, in `dtype`."""
    out, inp = qw.matrix_shape
    codes = unpack_float(qw.qweight, qw.spec.bits, out * inp).view(out, inp)
    return dequantize_codes(codes, qw.scales, qw.zeros, qw.spec).to(dtype)


def _dequant_linear(x: torch.Tensor, qw: QuantizedWeightLike) -> torch.Tensor:
    return F.linear(x, dequantized_matrix(qw, x.dtype))


def _int8_supports(spec: QuantSpec, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    k_ok = dtype != torch.bfloat16 or shape[1] % INT8_BF16_K_MULTIPLE == 0
    return (device.type == "cpu" and dtype in FLOAT_DTYPES and spec.bits == 8 and spec.symmetric
            and spec.group_size is None and k_ok and hasattr(torch, "_weight_int8pack_mm"))


def _bf16_only(spec: QuantSpec, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    return dtype in FAST_DTYPES


def _int8_linear(x: torch.Tensor, qw: QuantizedWeightLike) -> torch.Tensor:
    out, inp = qw.matrix_shape
    w = qw.qweight.view(torch.int8).view(out, inp)
    return torch._weight_int8pack_mm(x.contiguous(), w, qw.scales.reshape(-1).to(x.dtype))


def flip_sign_bit(qweight: torch.Tensor, spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    return qweight ^ 0x80


def int4_group(spec: QuantSpec, inp: int) -> int | None:
    """The op's qGroupSize for this spec and K, or None when the op cannot run it."""
    group = inp if spec.group_size is None else spec.group_size
    return group if group in INT4_GROUPS and inp % group == 0 else None


def _int4_supports(spec: QuantSpec, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    out, inp = shape
    return (device.type == "cpu" and dtype in FLOAT_DTYPES and spec.bits == 4 and out % INT4_N_MULTIPLE == 0
            and int4_group(spec, inp) is not None and hasattr(torch, "_weight_int4pack_mm_for_cpu"))


def int4_scale_and_zero(qw: QuantizedWeightLike, dtype: torch.dtype) -> torch.Tensor:
    """The ops' scale_and_zero [K/group, N, 2] in `dtype` from scales and zero points [N, groups]."""
    scale = qw.scales.float()
    zero = torch.zeros_like(scale) if qw.zeros is None else (8.0 - qw.zeros.float()) * scale
    return torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()


def _int4_linear(x: torch.Tensor, qw: QuantizedWeightLike) -> torch.Tensor:
    out, inp = qw.matrix_shape
    packed = qw.qweight.view(out, inp // 2)
    return torch._weight_int4pack_mm_for_cpu(x.contiguous(), packed, int4_group(qw.spec, inp), int4_scale_and_zero(qw, x.dtype))


def _int4_to_layout(dense: torch.Tensor, spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    out, inp = shape
    codes = unpack_bits(dense.cpu(), 4, out * inp).view(out, inp).to(torch.int32)
    return torch._convert_weight_to_int4pack_for_cpu(codes, 1).reshape(-1).to(dense.device)


def _cpu_int4pack(codes: torch.Tensor) -> torch.Tensor:
    """The CPU op's packed bytes (flat uint8) of int32 codes [N, K]."""
    return torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1).reshape(-1)


def _int4_nibbles(codes: torch.Tensor, pack: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Nibbles of `pack`'s bytes in stream order (low nibble first), as int64 [N*K]."""
    packed = pack(codes)
    return torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1).to(torch.int64)


def int4_source_index(shape: tuple[int, int], pack: Callable[[torch.Tensor], torch.Tensor] = _cpu_int4pack,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """For each nibble of an int4 packer's layout of `shape` (`pack`: int32 codes [N, K] on `device` -> flat
    uint8 bytes, one code a nibble), the flat index n*K + k of the code it holds.

    Found by packing the digits of the row and column indices (so it holds whatever tiling the packer
    uses, e.g. the CPU's ISA); costs ~2*log16(size) conversions of a `shape` matrix.
    """
    out, inp = shape
    index = torch.zeros(out * inp, dtype=torch.int64, device=device)
    for size, dim, stride in ((out, 0, inp), (inp, 1, 1)):
        ramp = torch.arange(size, dtype=torch.int32, device=device)
        shift = 0
        while (1 << shift) < size:
            digit = ((ramp >> shift) & 15).view((size, 1) if dim == 0 else (1, size)).expand(out, inp)
            index += (_int4_nibbles(digit.contiguous(), pack) << shift) * stride
            shift += 4
    return index


@functools.lru_cache(maxsize=None)
def _int4_rows_independent(inp: int) -> bool:
    """Whether the op packs every block of INT4_ROW_BLOCK rows on its own (true for the AVX2/AVX512 kernels)."""
    codes = torch.randint(0, 16, (INT4_ROW_BLOCK * 2 + INT4_N_MULTIPLE, inp), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(0))
    whole = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    parts = [torch._convert_weight_to_int4pack_for_cpu(codes[i:i + INT4_ROW_BLOCK].contiguous(), 1)
             for i in range(0, codes.shape[0], INT4_ROW_BLOCK)]
    return torch.equal(whole, torch.cat(parts))


def _int4_from_layout(qweight: torch.Tensor, spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    out, inp = shape
    packed = qweight.cpu()
    nibbles = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)
    codes = torch.empty(out * inp, dtype=torch.uint8)
    if not _int4_rows_independent(inp):
        codes[int4_source_index(shape)] = nibbles
        return pack_bits(codes, 4).to(qweight.device)
    full = out // INT4_ROW_BLOCK * INT4_ROW_BLOCK
    if full:
        block = INT4_ROW_BLOCK * inp
        codes[:full * inp].view(-1, block)[:, int4_source_index((INT4_ROW_BLOCK, inp))] = nibbles[:full * inp].view(-1, block)
    if full < out:
        codes[full * inp:][int4_source_index((out - full, inp))] = nibbles[full * inp:]
    return pack_bits(codes, 4).to(qweight.device)


DEQUANT = register_backend(Backend("dequant", lambda spec, shape, device, dtype: dtype.is_floating_point, _dequant_linear, priority=0))
CPU_INT8 = register_backend(Backend("cpu_int8", _int8_supports, _int8_linear, priority=10, layout="int8_signed",
                                    to_layout=flip_sign_bit, from_layout=flip_sign_bit, fast=_bf16_only))
CPU_INT4 = register_backend(Backend("cpu_int4", _int4_supports, _int4_linear, priority=10, layout="cpu_int4pack",
                                    to_layout=_int4_to_layout, from_layout=_int4_from_layout, fast=_bf16_only))
