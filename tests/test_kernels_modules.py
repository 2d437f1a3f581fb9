"""Quantized modules: every CPU backend vs a float64 reference, dispatch/fallback, bytes, save/load."""
import json

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kernels import (BACKENDS, QuantizedConv, QuantizedLinear, QuantSpec, quantize_module, quantized_module_from_config,
                     quantized_module_from_state, weight_nbytes)
from kernels.cpu_backends import int4_group


def reference(q: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """float64 dequantized weight @ float64 x (+ bias)."""
    y = x.double() @ q.quantized_tensor().dequantize(torch.float64).t()
    return y if q.bias is None else y + q.bias.double()


def fresh_linear(out: int, inp: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inp, out, bias=bias)


def run_twice(q: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward twice (the first call may switch the codes to the backend's layout); both must agree."""
    y = q(x)
    assert torch.equal(q(x), y) and torch.isfinite(y).all()
    return y


# (spec, shape [out, in], backend that runs it (forced, float32), backend the dispatch picks for bfloat16 inputs);
# float32 inputs always get "dequant" by default
CASES = [
    (QuantSpec(8, None), (48, 256), "cpu_int8", "cpu_int8"),
    (QuantSpec(8, None), (7, 33), "cpu_int8", "dequant"),      # bf16 int8 kernel needs K % 32 == 0 (segfaults else)
    (QuantSpec(8, None), (5, 200), "cpu_int8", "dequant"),
    (QuantSpec(4, 128), (64, 384), "cpu_int4", "cpu_int4"),
    (QuantSpec(4, 32), (32, 96), "cpu_int4", "cpu_int4"),
    (QuantSpec(4, 64, symmetric=False), (48, 256), "cpu_int4", "cpu_int4"),
    (QuantSpec(4, None), (16, 256), "cpu_int4", "cpu_int4"),   # per-channel with K in (32..256): one group of K
    (QuantSpec(4, 128), (64, 300), "dequant", "dequant"),      # K not a multiple of the group
    (QuantSpec(4, 128), (40, 256), "dequant", "dequant"),      # N not a multiple of 16
    (QuantSpec(4, 16), (32, 64), "dequant", "dequant"),        # group 16 not allowed by the int4 op
    (QuantSpec(4, None), (32, 384), "dequant", "dequant"),     # per-channel K=384 is no allowed group
    (QuantSpec(8, 64), (32, 200), "dequant", "dequant"),       # grouped 8-bit: int8 op is per-channel only
    (QuantSpec(8, None, symmetric=False), (32, 64), "dequant", "dequant"),
    (QuantSpec(3, 64), (33, 131), "dequant", "dequant"),
    (QuantSpec(2, None), (5, 17), "dequant", "dequant"),
    (QuantSpec(5, 32, symmetric=False), (16, 70), "dequant", "dequant"),
    (QuantSpec(6, 128, scale_dtype="bfloat16"), (24, 129), "dequant", "dequant"),
]
CASE_IDS = [f"w{c[0].bits}g{c[0].group_size}{'s' if c[0].symmetric else 'a'}-{c[1][0]}x{c[1][1]}" for c in CASES]


@pytest.mark.parametrize("spec,shape,backend,bf16_backend", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("rows", [(1,), (37,), (3, 5)])
def test_backend_matches_float64_reference(spec, shape, backend, bf16_backend, rows):
    q = quantize_module(fresh_linear(*shape, seed=shape[0] + shape[1]), spec, backend=backend)
    x = torch.randn(*rows, shape[1])
    y = run_twice(q, x)
    assert q.backend == backend and y.shape == (*rows, shape[0]) and y.dtype == torch.float32
    ref = reference(q, x)
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6


@pytest.mark.parametrize("spec,shape,backend,bf16_backend", CASES, ids=CASE_IDS)
def test_dispatch_picks_fast_op_for_bf16_and_falls_back_elsewhere(spec, shape, backend, bf16_backend):
    q = quantize_module(fresh_linear(*shape), spec)
    x = torch.randn(7, shape[1])
    y = q(x.bfloat16())
    assert q.backend == bf16_backend and y.dtype == torch.bfloat16
    ref = reference(q, x.bfloat16())
    assert (y.double() - ref).abs().max() <= 2e-2 * ref.abs().max()
    q(x)
    assert q.backend == "dequant"  # x86 int8/int4 ops have scalar-only float32 kernels


@pytest.mark.parametrize("spec,shape,backend", [(QuantSpec(8, None), (32, 96), "cpu_int8"), (QuantSpec(4, 32), (32, 96), "cpu_int4")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_ops_in_half_precision(spec, shape, backend, dtype):
    q = quantize_module(fresh_linear(*shape), spec, backend=backend)
    x = torch.randn(9, shape[1], dtype=dtype)
    y = q(x)
    assert q.backend == backend and y.dtype == dtype
    ref = reference(q, x)
    assert (y.double() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_forcing_each_backend_agrees_with_dequant():
    lin = fresh_linear(64, 256)
    x = torch.randn(4, 256)
    for spec, name in [(QuantSpec(8, None), "cpu_int8"), (QuantSpec(4, 64), "cpu_int4")]:
        fast = quantize_module(lin, spec, backend=name)
        slow = quantize_module(lin, spec, backend="dequant")
        assert torch.allclose(fast(x), slow(x), rtol=1e-5, atol=1e-5)
        assert fast.backend == name and slow.backend == "dequant"
    with pytest.raises(ValueError, match="backend='cpu_int4' does not support"):
        quantize_module(lin, QuantSpec(3, 64), backend="cpu_int4")(x)
    with pytest.raises(ValueError, match="backend='nope' is not registered"):
        quantize_module(lin, QuantSpec(3, 64), backend="nope")


def test_int4_contract_is_what_the_backend_assumes():
    # torch 2.13: group in (32, 64, 128, 256), K % group == 0, N % 16 == 0, else the op raises
    codes = torch.randint(0, 16, (32, 64), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert packed.dtype == torch.uint8 and packed.shape == (32, 32)  # same bytes as the dense packing
    sz = torch.stack([torch.ones(2, 32), torch.zeros(2, 32)], -1)
    y = torch._weight_int4pack_mm_for_cpu(torch.eye(64), packed, 32, sz)
    assert torch.equal(y, (codes - 8).float().t())  # w = (q - 8) * scale + zero
    with pytest.raises(RuntimeError, match="qGroupSize"):
        torch._weight_int4pack_mm_for_cpu(torch.eye(64), packed, 16, torch.stack([torch.ones(4, 32), torch.zeros(4, 32)], -1))
    with pytest.raises(RuntimeError, match="dividable by 16"):
        torch._convert_weight_to_int4pack_for_cpu(codes[:8].contiguous(), 1)
    assert int4_group(QuantSpec(4, None), 128) == 128 and int4_group(QuantSpec(4, 128), 300) is None


@pytest.mark.parametrize("spec", [QuantSpec(8, None), QuantSpec(4, 64), QuantSpec(4, 64, False), QuantSpec(3, 100), QuantSpec(5, None, False)], ids=str)
def test_module_bytes_equal_weight_nbytes_before_and_after_forward(spec):
    lin = fresh_linear(64, 320)
    q = quantize_module(lin, spec)
    assert q.weight_nbytes() == weight_nbytes((64, 320), spec)
    assert not any(t.is_floating_point() and t.numel() >= 64 * 320 for t in q.buffers())  # no float weight copy
    q(torch.randn(2, 320))  # switching to a backend layout keeps the byte count
    assert q.weight_nbytes() == weight_nbytes((64, 320), spec)
    assert len(list(q.parameters())) == 0


@pytest.mark.parametrize("spec,backend,out", [(QuantSpec(8, None), "cpu_int8", 64), (QuantSpec(4, 64, False), "cpu_int4", 80),
                                              (QuantSpec(4, 32), "cpu_int4", 208), (QuantSpec(6, 32), None, 64)],
                         ids=["int8", "int4-80rows", "int4-208rows", "w6"])
def test_state_dict_round_trips_bit_for_bit(spec, backend, out, tmp_path):
    from safetensors.torch import load_file, save_file

    q = quantize_module(fresh_linear(out, 256), spec, backend=backend)
    dense = {k: v.clone() for k, v in q.state_dict().items()}
    x = torch.randn(3, 256)
    y = q(x)  # moves codes into the backend layout
    assert q.layout != "dense" or backend is None
    saved = q.state_dict()
    assert saved.keys() == dense.keys() and all(torch.equal(saved[k], dense[k]) for k in dense)
    save_file(saved, tmp_path / "q.safetensors")
    config = json.loads(json.dumps(q.config()))
    rebuilt = quantized_module_from_state(config, load_file(tmp_path / "q.safetensors"), backend=backend)
    assert torch.equal(rebuilt(x), y)
    assert all(torch.equal(rebuilt.state_dict()[k], dense[k]) for k in dense)


def test_quantized_conv_and_hf_conv1d_configs_round_trip():
    torch.manual_seed(1)
    for layer, x in [(nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=1, groups=2), torch.randn(2, 6, 9, 11)),
                     (nn.Conv1d(4, 5, 3, padding=2, padding_mode="reflect"), torch.randn(2, 4, 13)),
                     (Conv1D(12, 20), torch.randn(3, 20))]:
        q = quantize_module(layer, QuantSpec(4, None, symmetric=False))
        rebuilt = quantized_module_from_config(q.config())
        rebuilt.load_state_dict(q.state_dict())
        assert torch.equal(rebuilt(x), q(x))
    with pytest.raises(ValueError, match="missing key 'spec'"):
        quantized_module_from_config({"kind": "linear", "weight_shape": [2, 2], "bias": False})


@pytest.mark.parametrize("make,x", [
    (lambda: nn.Linear(96, 40), torch.randn(4, 7, 96)),
    (lambda: Conv1D(40, 96), torch.randn(4, 7, 96)),
    (lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), torch.randn(2, 8, 15, 13)),
    (lambda: nn.Conv2d(3, 12, (3, 5), padding="same", bias=False), torch.randn(2, 3, 10, 9)),
    (lambda: nn.Conv1d(5, 7, 4, stride=1, dilation=2, padding_mode="circular", padding=3), torch.randn(2, 5, 21)),
])
def test_quantize_module_close_to_float_layer_at_8_bits(make, x):
    torch.manual_seed(0)
    layer = make()
    q = quantize_module(layer, QuantSpec(8, None))
    expected = layer(x).detach()
    assert isinstance(q, QuantizedConv if isinstance(layer, (nn.Conv1d, nn.Conv2d)) else QuantizedLinear)
    got = q(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
    assert torch.allclose(q.dequantized_weight(), layer.weight, atol=layer.weight.abs().max().item() / 100)


def test_hf_conv1d_is_transposed_and_reported():
    layer = Conv1D(48, 64)  # weight [in=64, out=48]
    q = quantize_module(layer, QuantSpec(4, 32))
    assert q.kind == "hf_conv1d" and (q.out_features, q.in_features) == (48, 64)
    assert q.dequantized_weight().shape == layer.weight.shape
    q(torch.randn(2, 64, dtype=torch.bfloat16))
    assert "kind=hf_conv1d" in repr(q) and "backend=cpu_int4" in repr(q)


def test_casting_the_model_keeps_scales_in_their_spec_dtype():
    q = quantize_module(fresh_linear(32, 64), QuantSpec(4, 32, scale_dtype="float32"))
    scales = q.scales.clone()
    q.to(torch.bfloat16)
    assert q.bias.dtype == torch.bfloat16 and torch.equal(q.scales, scales)
    assert q.weight_nbytes() == weight_nbytes((32, 64), q.spec)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    ref = reference(q, x)
    assert (q(x).double() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_bad_inputs_are_named():
    q = quantize_module(nn.Linear(32, 16), QuantSpec(4, 32))
    with pytest.raises(ValueError, match="in_features=32"):
        q(torch.randn(2, 31))
    with pytest.raises(TypeError, match="Embedding"):
        quantize_module(nn.Embedding(4, 4), QuantSpec(4))
    with pytest.raises(ValueError, match="backend='cpu_int8' needs a pointwise convolution"):
        quantize_module(nn.Conv2d(2, 2, 3), QuantSpec(8), backend="cpu_int8")
    with pytest.raises(ValueError, match="does not have the layer's 64 channels"):
        quantize_module(nn.Conv2d(64, 8, 1), QuantSpec(8))(torch.randn(2, 63, 4, 4))


def test_registry_lists_cpu_backends():
    assert {"dequant", "cpu_int8", "cpu_int4"} <= set(BACKENDS)


def test_group_major_backend_gets_group_major_scales_and_saves_row_major(tmp_path):
    """A backend that reads scales group by group (like the "triton" one) gets them stored group-major on the
    first forward, same shape and bytes; state dicts and safetensors files stay row-major and load back."""
    from safetensors.torch import load_file, save_file

    from kernels.backends import Backend, register_backend

    seen = []

    def linear(x, qw):
        seen.append((qw.scales.t().is_contiguous(), qw.zeros.t().is_contiguous()))
        return BACKENDS["dequant"].linear(x, qw)

    register_backend(Backend("test_group_major", lambda *a: True, linear, priority=-1, group_major=True))
    try:
        q = quantize_module(fresh_linear(40, 96), QuantSpec(4, 32, False), backend="test_group_major")
        rowmajor = {k: v.clone() for k, v in q.state_dict().items()}
        x = torch.randn(3, 96)
        y = q(x)
        assert seen == [(True, True)] and q.scales.shape == (40, 3) and not q.scales.is_contiguous()
        assert q.weight_nbytes() == quantize_module(fresh_linear(40, 96), QuantSpec(4, 32, False)).weight_nbytes()
        saved = q.state_dict()
        assert all(v.is_contiguous() and torch.equal(v, rowmajor[k]) for k, v in saved.items())
        save_file(saved, tmp_path / "q.safetensors")
        rebuilt = quantized_module_from_state(json.loads(json.dumps(q.config())), load_file(tmp_path / "q.safetensors"),
                                              backend="test_group_major")
        assert torch.equal(rebuilt(x), y)
        q.forced_backend = "dequant"
        assert torch.equal(q(x), y) and q.scales.is_contiguous()
    finally:
        BACKENDS.pop("test_group_major")


@pytest.mark.parametrize("make,x", [(lambda: nn.Conv2d(64, 48, 1), torch.randn(2, 64, 5, 7)),
                                    (lambda: nn.Conv1d(64, 48, 1, bias=False), torch.randn(3, 64, 9))],
                         ids=["conv2d-1x1", "conv1d-k1"])
@pytest.mark.parametrize("spec", [QuantSpec(8, None), QuantSpec(4, 32)], ids=["w8", "w4g32"])
def test_pointwise_convs_run_on_the_linear_backends(make, x, spec, tmp_path):
    """A 1x1 conv is a linear over the channels: it dispatches like a QuantizedLinear (bf16 on the CPU: the int8 /
    int4 ops), matches the conv of its dequantized weight, and saves and loads like any quantized layer."""
    from safetensors.torch import load_file, save_file

    layer = make()
    q = quantize_module(layer, spec)
    assert q.pointwise and not quantize_module(nn.Conv2d(64, 48, 3), spec).pointwise
    conv = nn.functional.conv2d if x.dim() == 4 else nn.functional.conv1d
    for dtype, fast in ((torch.bfloat16, {8: "cpu_int8", 4: "cpu_int4"}[spec.bits]), (torch.float32, "dequant")):
        xd = x.to(dtype)
        ref = conv(xd.double(), q.dequantized_weight(torch.float64), None if q.bias is None else q.bias.double())
        y = q(xd)
        assert q.backend == fast and y.dtype == dtype and y.shape == ref.shape and y.is_contiguous()
        assert (y.double() - ref).norm() / ref.norm() < (2e-2 if dtype == torch.bfloat16 else 1e-5)
    save_file(q.state_dict(), tmp_path / "q.safetensors")
    rebuilt = quantized_module_from_state(json.loads(json.dumps(q.config())), load_file(tmp_path / "q.safetensors"))
    assert torch.equal(rebuilt(x.bfloat16()), q(x.bfloat16()))
    forced = quantize_module(layer, spec, backend="dequant")
    assert torch.allclose(forced(x), q(x)) and forced.backend == "dequant"
