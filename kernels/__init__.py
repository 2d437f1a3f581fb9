"""Quantization kernels: specs, quantizer, bit packing, exact memory model, quantized modules, backends and the
latency tables measured by running them (`measure`)."""
from .backends import BACKENDS, Backend, get_backend, register_backend, select_backend
from .choice import SUPPORTED_BITS, Choice, QuantSpec
from .latency import LatencyTable, measure
from .layout import matrix_to_weight, module_kind, weight_matrix
from .memory import weight_nbytes
from .modules import (QuantizedConv, QuantizedLinear, quantize_module, quantized_module_from_config,
                      quantized_module_from_state)
from .packing import pack_bits, packed_nbytes, unpack_bits
from .quantizer import QuantizedTensor, dequantize_codes, fake_quantize, quantize

__all__ = [
    "BACKENDS", "Backend", "Choice", "LatencyTable", "QuantSpec", "QuantizedConv", "QuantizedLinear", "QuantizedTensor",
    "SUPPORTED_BITS", "dequantize_codes", "fake_quantize", "get_backend", "matrix_to_weight", "measure", "module_kind",
    "pack_bits", "packed_nbytes", "quantize", "quantize_module", "quantized_module_from_config",
    "quantized_module_from_state",
    "register_backend", "select_backend", "unpack_bits", "weight_matrix", "weight_nbytes",
]
