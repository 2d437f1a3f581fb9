"""What to quantize with: `QuantSpec` (how one weight is stored) and `Choice` (one allocation candidate).

A `Choice` is shared by all layers of a model; `Choice.spec_for(kind, in_features)` turns it into the
`QuantSpec` of one layer (group 128 for linear kinds, one scale per output channel for convolutions).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SCALE_DTYPES = ("float16", "bfloat16", "float32")
LAYER_KINDS = ("linear", "hf_conv1d", "conv1d", "conv2d")
LINEAR_KINDS = ("linear", "hf_conv1d")
DEFAULT_LINEAR_GROUP = 128
ACT_BITS_RANGE = (2, 16)
ACT_FORMATS = ("int", "fp8")  # integer levels per token, or float8 e4m3 per token (8 bits only)
# library kernels a choice can name: a layer of that choice runs the library's kernel, in its weight format
KERNELS = ("tinygemm",)
TINYGEMM_GROUPS = (32, 64, 128, 256)

_LABEL_RE = re.compile(r"^w(\d+)(?:g(\d+)|(gc))?(?:a(\d+)|(f8))?(asym)?(?:@(\w+))?$")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int")


def _check_group(name: str, value: Any, allow_default: bool) -> None:
    if value is None or (allow_default and value == "default"):
        return
    allowed = "None, 'default' or a positive int" if allow_default else "None or a positive int"
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} is not supported; choose {allowed}")


def _check_bits(name: str, value: Any) -> None:
    _check_int(name, value)
    if value not in SUPPORTED_BITS:
        raise ValueError(f"{name}={value} is not supported; choose from {SUPPORTED_BITS}")


@dataclass(frozen=True)
class QuantSpec:
    """How one 2-D weight [out, in] is quantized.

    bits: code width; group_size: None = one scale per output channel, g = one scale per g input
    columns (last group may be short); symmetric=False adds a uint8 zero point per group;
    scale_dtype: dtype the scales are stored in (quantization uses the stored, rounded scale).
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits)
        _check_group("group_size", self.group_size, allow_default=False)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric={self.symmetric!r} must be a bool")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={self.scale_dtype!r} is not supported; choose from {SCALE_DTYPES}")

    def n_groups(self, in_features: int) -> int:
        """Number of scale groups along a row of `in_features` columns."""
        if self.group_size is None:
            return 1
        return -(-in_features // self.group_size)

    def group_width(self, in_features: int) -> int:
        """Columns per group (the full row for per-channel)."""
        return in_features if self.group_size is None else min(self.group_size, in_features)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        return cls(**d)


@dataclass(frozen=True)
class Choice:
    """One candidate of the allocation, shared by all layers.

    wbits: weight bits; abits: activation bits (None = float activations, only recorded here);
    group_size: "default" (128 for linear kinds, per-channel for convs), None (per-channel) or an int;
    act_format: "int" (abits-bit integer levels per token) or "fp8" (float8 e4m3 per token; abits 8).
    kernel: None (our kernels, or the fastest the latency table measured) or a library kernel the layer is held
    for: "tinygemm" (torch's `_weight_int4pack_mm`: 4-bit symmetric, groups 32..256, bfloat16 scales, plus the
    bfloat16 zero beside each scale that it reads, counted in the layer's bytes; CUDA with bfloat16 activations,
    dequantize + matmul elsewhere). Same weights as the choice without it, so the same cost; a solver takes it where
    the table's latency is worth the bytes.
    Label grammar: w<bits>[g<size>|gc][a<bits>|f8][asym][@<kernel>], e.g. "w4", "w8gc", "w4g64", "w4a8", "w4gcf8",
    "w4asym", "w4@tinygemm".
    """

    wbits: int
    abits: int | None = None
    group_size: int | None | str = "default"
    symmetric: bool = True
    act_format: str = "int"
    kernel: str | None = None

    def __post_init__(self) -> None:
        _check_bits("wbits", self.wbits)
        if self.abits is not None:
            _check_int("abits", self.abits)
            lo, hi = ACT_BITS_RANGE
            if not lo <= self.abits <= hi:
                raise ValueError(f"abits={self.abits} is not supported; choose None or an int in [{lo}, {hi}]")
        _check_group("group_size", self.group_size, allow_default=True)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric={self.symmetric!r} must be a bool")
        if self.act_format not in ACT_FORMATS:
            raise ValueError(f"act_format={self.act_format!r} is not supported; choose from {ACT_FORMATS}")
        if self.act_format == "fp8" and self.abits != 8:
            raise ValueError(f"act_format='fp8' takes abits=8 (float8 e4m3), not abits={self.abits}")
        if self.kernel is not None:
            self._check_kernel()

    def _check_kernel(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel={self.kernel!r} is not supported; choose None or one of {KERNELS}")
        group_ok = self.group_size == "default" or self.group_size in TINYGEMM_GROUPS
        if self.wbits != 4 or self.abits is not None or not self.symmetric or not group_ok:
            raise ValueError(f"kernel='tinygemm' runs 4-bit symmetric weights with float activations and a group in "
                             f"{TINYGEMM_GROUPS} (or 'default'); got {self.label!r}")

    @property
    def label(self) -> str:
        g = "" if self.group_size == "default" else ("gc" if self.group_size is None else f"g{self.group_size}")
        a = "" if self.abits is None else ("f8" if self.act_format == "fp8" else f"a{self.abits}")
        k = "" if self.kernel is None else f"@{self.kernel}"
        return f"w{self.wbits}{g}{a}{'' if self.symmetric else 'asym'}{k}"

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, label: str) -> "Choice":
        """Inverse of `label`: Choice.parse("w4g64a8") == Choice(4, 8, 64)."""
        m = _LABEL_RE.match(label) if isinstance(label, str) else None
        if m is None:
            raise ValueError(
                f"label={label!r} is not a valid choice label; expected w<bits>[g<size>|gc][a<bits>|f8][asym][@<kernel>], "
                f"e.g. 'w4', 'w8gc', 'w4g64', 'w4a8', 'w4gcf8', 'w4asym', 'w4@tinygemm'"
            )
        wbits, group, gc, abits, f8, asym, kernel = m.groups()
        group_size: int | None | str = None if gc else (int(group) if group else "default")
        if f8:
            return cls(int(wbits), 8, group_size, asym is None, "fp8", kernel)
        return cls(int(wbits), int(abits) if abits else None, group_size, asym is None, kernel=kernel)

    def spec_for(self, kind: str, in_features: int, scale_dtype: str = "float16") -> QuantSpec:
        """The QuantSpec of a layer of `kind` whose weight matrix has `in_features` columns (a library kernel's
        scale dtype where it names one: bfloat16 for tinygemm)."""
        if kind not in LAYER_KINDS:
            raise ValueError(f"kind={kind!r} is not supported; choose from {LAYER_KINDS}")
        _check_int("in_features", in_features)
        if in_features <= 0:
            raise ValueError(f"in_features={in_features} must be positive")
        group = self.group_size
        if group == "default":
            group = DEFAULT_LINEAR_GROUP if kind in LINEAR_KINDS else None
        if group is not None and group >= in_features:
            group = None
        return QuantSpec(self.wbits, group, self.symmetric, "bfloat16" if self.kernel == "tinygemm" else scale_dtype)

    def kernel_reason(self, kind: str, shape: tuple[int, int]) -> str | None:
        """Why a layer of `kind` with an [out, in] weight `shape` cannot be held for this choice's library kernel
        (None: it can, or the choice names none)."""
        if self.kernel is None:
            return None
        if kind not in LINEAR_KINDS:
            return f"{self.label}: tinygemm runs linear layers only, not {kind!r}"
        reason = tinygemm_reason(self.spec_for(kind, shape[1]), shape)
        return None if reason is None else f"{self.label}: {reason}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Choice":
        return cls(**d)


def tinygemm_reason(spec: QuantSpec, shape: tuple[int, int]) -> str | None:
    """Why torch._weight_int4pack_mm cannot run this weight (None: it can)."""
    n, k = shape
    group = k if spec.group_size is None else spec.group_size
    if spec.bits != 4:
        return "tinygemm is 4-bit only"
    if group not in TINYGEMM_GROUPS or k % group:
        return f"tinygemm needs a group in {TINYGEMM_GROUPS} dividing K (group {group}, K {k})"
    if k % 64 or n % 8:
        return f"tinygemm needs K % 64 == 0 and N % 8 == 0 (N {n}, K {k})"
    return None
