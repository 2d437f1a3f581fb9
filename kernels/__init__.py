"""Quantization kernels: specs, quantizer, bit packing, exact memory model and quantized modules."""
from .choice import SUPPORTED_BITS, Choice, QuantSpec
from .layout import matrix_to_weight, module_kind, weight_matrix
from .memory import weight_nbytes
from .packing import pack_bits, packed_nbytes, unpack_bits
from .quantizer import QuantizedTensor, dequantize_codes, fake_quantize, quantize

__all__ = [
    "SUPPORTED_BITS", "Choice", "QuantSpec", "QuantizedTensor", "dequantize_codes", "fake_quantize",
    "matrix_to_weight", "module_kind", "pack_bits", "packed_nbytes", "quantize", "unpack_bits",
    "weight_matrix", "weight_nbytes",
]
