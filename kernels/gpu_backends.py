"""CUDA backends: our Triton kernels in the registry of `kernels.backends`, and the library anchors.

- "triton" (registered, layout "gpu_planes"): fused b-bit kernels for decode; for prefill, the fused GEMM
  or dequantize + cuBLAS. The path and the fused kernel's tile are what `DISPATCH` holds for the layer's
  (shape, spec, tokens): the winners a LatencyTable measured on this device (`LatencyTable.use_dispatch`);
  without one, `triton_linear.default_config` and dequantize + cuBLAS from PREFILL_DEQUANT_MIN_M rows.
- "tinygemm" (registered, layout "tinygemm_int4pack", never picked automatically): torch's `_weight_int4pack_mm`
  for layers forced onto it by a `Choice(kernel="tinygemm")` ("w4@tinygemm"): codes in the layout
  `_convert_weight_to_int4pack` makes (same bytes), scales held beside a zero each (`backends.with_zero_beside`),
  bfloat16 activations on CUDA; such a layer runs "dequant" elsewhere.
- `gpu_candidates(qt, dtype)`: every way this device can run one quantized weight, by name, for the latency
  table and the benchmark: "triton_fused", "triton_dequant_cublas", "tinygemm_int4" (torch's
  _weight_int4pack_mm, bf16, 4-bit, groups 32..256) and "gemlite" (2/4/8-bit, when importable).
  A candidate that cannot run is left out with its reason in `skipped`.
"""
from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch

from . import triton_linear as tlin
from .backends import Backend, QuantizedWeightLike, layer_view, register_backend, scale_zero
from .choice import QuantSpec, tinygemm_reason
from .cpu_backends import int4_scale_and_zero, int4_source_index
from .packing import pack_bits, unpack_bits
from .gpu_layout import GpuPackedWeight, dense_to_gpu_bytes, gpu_bytes_to_dense, planes_from_bytes, repack_for_gpu
from .quantizer import QuantizedTensor

GPU_LAYOUT = "gpu_planes"
ACT_DTYPES = (torch.float16, torch.bfloat16)
PREFILL_DEQUANT_MIN_M = 256
# (N, K, bits, group width, symmetric, tokens) -> (path, tile): a latency table's measured winner among our paths
DISPATCH: dict[tuple[int, int, int, int, bool, int], tuple[str, tlin.Config | None]] = {}


def _key(spec: QuantSpec, shape: tuple[int, int]) -> tuple[int, int, int, int, bool]:
    return shape[0], shape[1], spec.bits, spec.group_width(shape[1]), spec.symmetric


def use_measured(spec: QuantSpec, shape: tuple[int, int], tokens: int, path: str) -> None:
    """Run "triton" layers of this spec and shape at `tokens` token rows by `path`, a latency table's name for one
    of our paths: "triton_dequant_cublas", "triton_fused" (the default tile) or "triton_fused[<tile label>]"."""
    if not is_ours(path):
        raise ValueError(f"path={path!r} is not one of ours; use 'triton_dequant_cublas', 'triton_fused' or "
                         "'triton_fused[<tile label>]'")
    tile = tlin.Config.parse(path[len("triton_fused["):-1]) if path.endswith("]") else None
    DISPATCH[(*_key(spec, shape), tokens)] = path.split("[")[0], tile


def is_ours(path: str) -> bool:
    """Whether a latency table's path name is one `use_measured` can install."""
    return path in ("triton_fused", "triton_dequant_cublas") or (path.startswith("triton_fused[")
                                                                  and path.endswith("]"))


def pick(m: int, gw: GpuPackedWeight, dtype: torch.dtype = torch.bfloat16) -> tuple[str, tlin.Config | None]:
    """The (path, tile) a "triton" layer runs for m token rows of `dtype`: the winner measured at m rows, else at the
    nearest measured token count (a prompt of 300 tokens runs what won at 512), with its tile where that tile can
    run m rows of `dtype` here and the default tile (None) where not (a decode tile of fewer rows, a Gluon tile
    measured on a device with Gluon, a bfloat16 tensor-core tile for float16 rows); with nothing measured for the
    layer, dequantize + cuBLAS from PREFILL_DEQUANT_MIN_M rows and the fused kernel's default tile below."""
    layer = _key(gw.spec, gw.shape)
    measured = DISPATCH.get((*layer, m))
    if measured is None:
        near = [key for key in DISPATCH if key[:5] == layer]
        if not near:
            return ("triton_dequant_cublas" if m >= PREFILL_DEQUANT_MIN_M else "triton_fused"), None
        measured = DISPATCH[min(near, key=lambda key: abs(key[5] - m))]
    path, tile = measured
    if tile is not None and tlin.config_error(tile, m, gw, dtype, gw.scales.device) is not None:
        return path, None
    return path, tile


def gpu_weight(qw: QuantizedWeightLike) -> GpuPackedWeight:
    """Views of a "gpu_planes" layer's buffers as a GpuPackedWeight (no copy; scales read transposed)."""
    zeros = None if qw.zeros is None else qw.zeros.t()
    return GpuPackedWeight(planes_from_bytes(qw.qweight, qw.spec.bits, qw.matrix_shape), qw.scales.t(), zeros,
                           qw.matrix_shape, qw.spec)


def run_gpu_weight(x: torch.Tensor, gw: GpuPackedWeight) -> torch.Tensor:
    """x [M, K] @ W^T by the path and tile `pick` chooses for M rows of x's dtype."""
    path, tile = pick(x.shape[0], gw, x.dtype)
    if path == "triton_dequant_cublas":
        return tlin.dequant_matmul(x, gw)
    return tlin.linear(x, gw, tile)


def _triton_supports(spec: QuantSpec, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and tlin.HAVE_TRITON and dtype in ACT_DTYPES


def _triton_linear(x: torch.Tensor, qw: QuantizedWeightLike) -> torch.Tensor:
    return run_gpu_weight(x, gpu_weight(qw))


def _triton_verified(spec: QuantSpec, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    """Picked automatically where the fused kernels run (group widths that are multiples of 32 columns);
    other groups would dequantize + matmul anyway, which the plain `dequant` backend does without the repack."""
    return _triton_supports(spec, shape, device, dtype) and tlin.fused_supported_spec(spec, shape)


def _triton_dequantize(qw: QuantizedWeightLike, dtype: torch.dtype) -> torch.Tensor:
    """The float weight [out, in] by `triton_linear.dequantize` (one kernel; it writes [in, out])."""
    return tlin.dequantize(gpu_weight(qw), dtype).t()


TRITON = register_backend(Backend("triton", _triton_supports, _triton_linear, priority=20, layout=GPU_LAYOUT,
                                  to_layout=dense_to_gpu_bytes, from_layout=gpu_bytes_to_dense,
                                  fast=_triton_verified, group_major=True, dequantize=_triton_dequantize))


TINYGEMM_LAYOUT = "tinygemm_int4pack"


def _inner_k_tiles(k: int) -> int:
    """The innerKTiles of torch's int4 CUDA packing for K (a multiple of 64: `tinygemm_reason`)."""
    return 8 if k % 128 == 0 else 4


def _tinygemm_pack(codes: torch.Tensor) -> torch.Tensor:
    """torch's int4 CUDA packing of codes [N, K] (0..15, on CUDA) as flat bytes."""
    codes = codes.to(torch.int32)
    packed = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    return torch._convert_weight_to_int4pack(packed, _inner_k_tiles(codes.shape[1])).view(torch.uint8).reshape(-1)


def _tinygemm_to_layout(dense: torch.Tensor, spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    n, k = shape
    return _tinygemm_pack(unpack_bits(dense.to("cuda"), 4, n * k).view(n, k)).to(dense.device)


def _tinygemm_from_layout(qweight: torch.Tensor, spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    """Dense codes from the packing: each block of 8 rows is packed on its own (the packing's outermost dimension
    is N / 8), so the index found for one block serves them all."""
    n, k = shape
    packed = qweight.to("cuda")
    nibbles = torch.stack([packed & 15, packed >> 4], dim=1).reshape(n // 8, 8 * k)
    codes = torch.empty(n // 8, 8 * k, dtype=torch.uint8, device="cuda")
    codes[:, int4_source_index((8, k), _tinygemm_pack, "cuda")] = nibbles
    return pack_bits(codes.reshape(-1), 4).to(qweight.device)


def _tinygemm_supports(spec: QuantSpec, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
    return _tinygemm_why_not(spec, shape, device, dtype) is None


def _tinygemm_why_not(spec: QuantSpec, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda" or dtype != torch.bfloat16:
        return "tinygemm runs bfloat16 activations on CUDA"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "tinygemm needs compute capability 8.0 or newer"
    if spec.scale_dtype != "bfloat16" or not spec.symmetric:
        return "tinygemm reads symmetric weights with bfloat16 scales"
    return tinygemm_reason(spec, shape)


def _tinygemm_mm(x: torch.Tensor, packed: torch.Tensor, shape: tuple[int, int], spec: QuantSpec,
                 scale_and_zero: torch.Tensor) -> torch.Tensor:
    """torch._weight_int4pack_mm on codes in `_tinygemm_pack`'s flat bytes."""
    n, k = shape
    tiles = _inner_k_tiles(k)
    w = packed.view(torch.int32).view(n // 8, k // (16 * tiles), 32, tiles // 2)
    return torch._weight_int4pack_mm(x.contiguous(), w, k if spec.group_size is None else spec.group_size,
                                     scale_and_zero)


def _tinygemm_linear(x: torch.Tensor, qw: QuantizedWeightLike) -> torch.Tensor:
    return _tinygemm_mm(x, qw.qweight, qw.matrix_shape, qw.spec, scale_zero(qw.scales))


def _tinygemm(qt: QuantizedTensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The anchor: torch's tinygemm on `qt` (any 4-bit spec it takes; asymmetric zero points as float zeros)."""
    packed = _tinygemm_pack(qt.codes().to("cuda"))
    sz = int4_scale_and_zero(qt, torch.bfloat16).to("cuda")
    return lambda x: _tinygemm_mm(x, packed, qt.shape, qt.spec, sz)


TINYGEMM = register_backend(Backend("tinygemm", _tinygemm_supports, _tinygemm_linear, priority=-1,
                                    layout=TINYGEMM_LAYOUT, to_layout=_tinygemm_to_layout,
                                    from_layout=_tinygemm_from_layout, fast=lambda *args: False,
                                    why_not=_tinygemm_why_not, zero_beside=True, fallback="dequant"))


def gemlite_reason(spec: QuantSpec, shape: tuple[int, int]) -> str | None:
    """Why gemlite's A16Wn kernels cannot run this weight (None: they can)."""
    try:
        import gemlite  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"gemlite is not importable ({type(e).__name__}: {e})"
    n, k = shape
    group = k if spec.group_size is None else spec.group_size
    if spec.bits not in (2, 4, 8):
        return "gemlite has 8/4/2/1-bit weights only"
    if k % group or k % 128:
        return f"gemlite needs the group to divide K and K % 128 == 0 (group {group}, K {k})"
    return None


def _gemlite(qt: QuantizedTensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """gemlite's A16Wn layer for `qt`, with its K slices summed in float32 (`set_native_atomic_bfp16(False)`):
    by default its split-K kernels add their partial sums into a bfloat16 output by atomics on Hopper, one
    rounding a slice (its 1-token kernel at 2/4 bits takes K / (2 x its K block) slices: 112 to 896 at K = 14336,
    as its tuning picks the block). That is the likely cause of the recorded "wrong results": 2.5-3.5e-2 relative
    error against float64 (session 29, K = 14336), just above the 2e-2 check. Its 8-bit GEMV keeps bfloat16
    atomics whatever the setting."""
    import gemlite
    from gemlite.helper import A16Wn
    gemlite.set_native_atomic_bfp16(False)
    n, k = qt.shape
    group = k if qt.spec.group_size is None else qt.spec.group_size
    zeros = torch.full_like(qt.scales, float(1 << (qt.spec.bits - 1)), dtype=torch.float32) if qt.zeros is None \
        else qt.zeros.float()
    layer = A16Wn(device="cuda:0", dtype=dtype).from_weights(
        qt.codes().to("cuda"), qt.scales.to("cuda", dtype), zeros.to("cuda", dtype), qt.spec.bits, group)
    return layer.forward


def gpu_candidates(qt: QuantizedTensor, dtype: torch.dtype,
                   gw: GpuPackedWeight | None = None) -> tuple[dict[str, Callable], dict[str, str]]:
    """(name -> fn(x [M, K]) -> [M, N]) for every path that can run `qt` on CUDA, and name -> reason skipped;
    `gw`: `qt` already repacked for the GPU."""
    if dtype not in ACT_DTYPES:
        raise ValueError(f"dtype={dtype} is not supported on CUDA; use float16 or bfloat16")
    fns: dict[str, Callable] = {}
    skipped: dict[str, str] = {}
    gw = gw if gw is not None else repack_for_gpu(qt, "cuda")
    fns["triton_fused"] = lambda x: tlin.linear(x, gw)
    fns["triton_dequant_cublas"] = lambda x: tlin.dequant_matmul(x, gw)
    reason = tinygemm_reason(qt.spec, qt.shape) or (None if dtype == torch.bfloat16 else "tinygemm is bfloat16 only")
    if reason is None:
        fns["tinygemm_int4"] = _tinygemm(qt)
    else:
        skipped["tinygemm_int4"] = reason
    reason = gemlite_reason(qt.spec, qt.shape)
    if reason is None:
        try:
            fns["gemlite"] = _gemlite(qt, dtype)
        except Exception as e:  # noqa: BLE001 - a library failing to build is reported, not fatal
            skipped["gemlite"] = f"gemlite failed to build the layer: {type(e).__name__}: {e}"
    else:
        skipped["gemlite"] = reason
    return fns, skipped


def tile_fns(gw: GpuPackedWeight, m: int, dtype: torch.dtype) -> dict[str, Callable]:
    """Our fused kernel at each tile `triton_linear.tile_candidates` offers for m rows besides the default
    ("triton_fused"), by name "triton_fused[<tile label>]" (the name `use_measured` installs)."""
    if not tlin.fused_supported(gw):
        return {}
    return {f"triton_fused[{cfg.label}]": (lambda x, cfg=cfg: tlin.linear(x, gw, cfg))
            for cfg in tlin.tile_candidates(m, gw, dtype)[1:]}


def module_view(qt: QuantizedTensor, device: str = "cuda") -> SimpleNamespace:
    """A QuantizedWeightLike of `qt` as a "triton" layer holds it (for tests)."""
    return layer_view(qt, TRITON, device)