"""Quantizer vs a float64 reference, clip search, error vs bits, and the exact memory model."""
import pytest
import torch
from torch import nn

from kernels import (SUPPORTED_BITS, QuantSpec, fake_quantize, matrix_to_weight, module_kind, quantize,
                     weight_matrix, weight_nbytes)
from kernels.quantizer import CLIP_RATIOS


def reference_quantize(w: torch.Tensor, spec: QuantSpec, ratios=CLIP_RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64, loop-over-groups reference: (dequantized weight, stored scales)."""
    w = w.double()
    out, inp = w.shape
    maxq = 2**spec.bits - 1
    width = inp if spec.group_size is None else spec.group_size
    sdtype = getattr(torch, spec.scale_dtype)
    deq, scales = torch.empty_like(w), []
    for j0 in range(0, inp, width):
        g = w[:, j0:j0 + width]
        best_err = torch.full((out,), float("inf"), dtype=torch.float64)
        best_deq, best_s = torch.empty_like(g), torch.empty(out, dtype=torch.float64)
        for r in ratios:
            if spec.symmetric:
                s = g.abs().amax(1) * r * 2 / maxq
                z = torch.full_like(s, 2.0 ** (spec.bits - 1))
            else:
                hi, lo = g.amax(1).clamp(min=0) * r, g.amin(1).clamp(max=0) * r
                s = (hi - lo) / maxq
            s = s.clamp(torch.finfo(sdtype).tiny).to(sdtype).double()
            if not spec.symmetric:
                z = torch.round(-lo / s).clamp(0, maxq)
            d = (torch.round(g / s[:, None] + z[:, None]).clamp(0, maxq) - z[:, None]) * s[:, None]
            err = ((d - g) ** 2).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_deq[better], best_s[better] = d[better], s[better]
        deq[:, j0:j0 + width] = best_deq
        scales.append(best_s)
    return deq, torch.stack(scales, 1)


SPECS = [QuantSpec(b, g, sym) for b in SUPPORTED_BITS for g in (None, 32) for sym in (True, False)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("clip", [False, True])
def test_matches_float64_reference(spec, clip):
    torch.manual_seed(spec.bits * 7 + clip)
    w = torch.randn(19, 77) * torch.rand(19, 1) * 3  # odd shape, short last group (77 = 2*32 + 13)
    qt = quantize(w, spec, clip_search=clip)
    ref, ref_scales = reference_quantize(w, spec, CLIP_RATIOS if clip else (1.0,))
    assert qt.scales.shape == (19, spec.n_groups(77)) and qt.scales.dtype == torch.float16
    assert torch.equal(qt.scales.double(), ref_scales)
    assert torch.allclose(qt.dequantize(torch.float64), ref, rtol=0, atol=1e-6)
    assert qt.nbytes == weight_nbytes(w.shape, spec)


def test_dequantize_equals_codes_times_stored_scales():
    w = torch.randn(8, 40)
    qt = quantize(w, QuantSpec(5, 16, symmetric=False))
    codes = qt.codes().double()
    s = qt.scales.double().repeat_interleave(16, 1)[:, :40]
    z = qt.zeros.double().repeat_interleave(16, 1)[:, :40]
    assert torch.equal(qt.dequantize(torch.float64), (codes - z) * s)
    assert codes.max() <= 31 and qt.zeros.dtype == torch.uint8


@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_worse_and_error_falls_with_bits(group, symmetric):
    torch.manual_seed(0)
    w = torch.randn(64, 300)
    errors = []
    for bits in SUPPORTED_BITS:
        spec = QuantSpec(bits, group, symmetric)
        plain = (fake_quantize(w, spec, clip_search=False) - w).pow(2).mean().item()
        searched = (fake_quantize(w, spec) - w).pow(2).mean().item()
        assert searched <= plain
        errors.append(searched)
    assert all(a > 3 * b for a, b in zip(errors, errors[1:]))  # each extra bit cuts MSE by ~4x
    assert errors[2] < 0.012  # 4 bits on unit Gaussians


def test_scales_stay_positive_for_zero_and_tiny_groups():
    w = torch.zeros(4, 64)
    w[1] = 1e-9
    w[2, :32] = 5.0
    for spec in (QuantSpec(4, 32), QuantSpec(3, 32, False), QuantSpec(8, None, scale_dtype="bfloat16")):
        qt = quantize(w, spec)
        assert (qt.scales.float() > 0).all()
        assert torch.allclose(qt.dequantize()[:2], w[:2], atol=1e-4)
        assert torch.allclose(qt.dequantize()[2], w[2], atol=0.5)


def test_fake_quantize_keeps_dtype_and_conv_shape():
    w = torch.randn(6, 3, 3, 3, dtype=torch.bfloat16)
    out = fake_quantize(w, QuantSpec(8))
    assert out.shape == w.shape and out.dtype == torch.bfloat16
    assert (out.float() - w.float()).abs().max() < 0.05


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(3), QuantSpec(4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(torch.tensor([[1.0, float("nan")]]), QuantSpec(4))
    with pytest.raises(TypeError, match="spec="):
        quantize(torch.randn(2, 2), 4)
    with pytest.raises(ValueError, match="ratios"):
        quantize(torch.randn(2, 2), QuantSpec(4), ratios=(1.5,))
    with pytest.raises(ValueError, match="shape="):
        weight_nbytes((10,), QuantSpec(4))


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 129), (33, 4096), (5, 3, 3, 3)])
@pytest.mark.parametrize("spec", [QuantSpec(3, 128), QuantSpec(5, None, False), QuantSpec(6, 7, scale_dtype="float32")], ids=str)
def test_weight_nbytes_equals_stored_bytes(shape, spec):
    w = torch.randn(shape)
    qt = quantize(w.reshape(shape[0], -1), spec, clip_search=False)
    stored = qt.packed.numel() + qt.scales.numel() * qt.scales.element_size()
    stored += 0 if qt.zeros is None else qt.zeros.numel()
    assert weight_nbytes(shape, spec) == stored == qt.nbytes


def test_weight_nbytes_by_hand():
    # 4096x4096 at 4 bits, groups of 128: 8 MiB codes + 4096*32 fp16 scales
    assert weight_nbytes((4096, 4096), QuantSpec(4, 128)) == 4096 * 4096 // 2 + 4096 * 32 * 2
    # 3 bits, 10x10 = 100 codes = 300 bits = 38 bytes; per-channel asym: 10 scales + 10 zero points
    assert weight_nbytes((10, 10), QuantSpec(3, None, False)) == 38 + 20 + 10


def test_weight_matrix_layouts_round_trip():
    from transformers.pytorch_utils import Conv1D

    cases = [(nn.Linear(5, 3), "linear", (3, 5)), (nn.Conv1d(4, 6, 3), "conv1d", (6, 12)),
             (nn.Conv2d(4, 8, 3, groups=2), "conv2d", (8, 18)), (Conv1D(7, 5), "hf_conv1d", (7, 5))]
    for module, kind, shape in cases:
        assert module_kind(module) == kind
        m = weight_matrix(module)
        assert tuple(m.shape) == shape
        assert torch.equal(matrix_to_weight(m, kind, tuple(module.weight.shape)), module.weight.detach())
    with pytest.raises(TypeError, match="Embedding"):
        module_kind(nn.Embedding(3, 3))
