"""Dense bit packing: exact byte counts and lossless round trips."""
import pytest
import torch

from kernels import SUPPORTED_BITS, pack_bits, packed_nbytes, unpack_bits
from kernels.packing import unpack_float


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 13, 1001, 4099])
def test_round_trip_every_width_and_odd_sizes(bits, n):
    g = torch.Generator().manual_seed(bits * 10007 + n)
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n * bits // 8) == packed_nbytes(n, bits)
    assert packed.untyped_storage().nbytes() == packed.numel()  # no hidden padding kept alive
    assert torch.equal(unpack_bits(packed, bits, n), codes)
    as_float = unpack_float(packed, bits, n)  # the table lookup at 2 and 3 bits, unpack + convert otherwise
    assert as_float.dtype == torch.float32 and torch.equal(as_float, codes.float())


def test_stream_is_little_endian_and_unpadded():
    # 3-bit codes 1..8 (mod 8) -> one 24-bit word 0b000_111_110_101_100_011_010_001 = 0x1AC688 ... little-endian bytes
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack_bits(codes, 3).tolist() == [word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]
    # a 2-D tensor is one stream: rows of 3 codes at 6 bits do not start on byte boundaries
    rows = torch.tensor([[63, 1, 2], [3, 4, 5]], dtype=torch.uint8)
    assert pack_bits(rows, 6).numel() == 5
    assert torch.equal(unpack_bits(pack_bits(rows, 6), 6, 6).view(2, 3), rows)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"bits=7 is not supported"):
        pack_bits(torch.zeros(3, dtype=torch.uint8), 7)
    with pytest.raises(TypeError, match="codes.dtype=torch.int32"):
        pack_bits(torch.zeros(3, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="need 2"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 4, 4)
    with pytest.raises(ValueError, match="need 3"):
        unpack_float(torch.zeros(2, dtype=torch.uint8), 3, 8)
    with pytest.raises(TypeError, match="packed.dtype=torch.int32"):
        unpack_float(torch.zeros(3, dtype=torch.int32), 2, 4)
