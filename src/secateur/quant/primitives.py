"""What every quantization method shares: affine integer quantization, FP8, range observers and a
straight-through fake-quantizer. Tensor in, tensor out; no modules, no state.

Convention (used by every method, the kernels and the formats): integers are **signed**,
``q ∈ [-2^(b-1), 2^(b-1) - 1]`` for ``b`` bits, with an integer zero point in the same range (0
when symmetric), and ``w ≈ (q - zero_point) · scale``. This is the compressed-tensors convention,
so its packed checkpoints need no conversion.

Granularity of ``scale``/``zero_point`` for a weight ``[out, in]``:

``tensor``   one pair, shape ``[1, 1]``;
``channel``  one per output row, shape ``[out, 1]``;
``group``    one per ``group_size`` consecutive input columns of each row, shape ``[out, in / g]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import SecateurError

Strategy = Literal["tensor", "channel", "group"]
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class Scheme:
    """How a weight is quantized: bits, symmetric or not, granularity, and the range observer."""

    bits: int = 4
    symmetric: bool = True
    strategy: Strategy = "group"
    group_size: int = 128
    observer: Literal["minmax", "mse"] = "minmax"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise SecateurError(f"bits must be 2..8, got {self.bits}")
        if self.strategy not in ("tensor", "channel", "group"):
            raise SecateurError(f"unknown strategy '{self.strategy}'; valid: tensor, channel, group")
        if self.strategy == "group" and self.group_size < 1:
            raise SecateurError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def group(self) -> int | None:
        """Columns per scale: the group size, None for one scale per row, 0 for the whole tensor."""
        return self.group_size if self.strategy == "group" else (None if self.strategy == "channel" else 0)


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def resolve_group(columns: int, scheme: Scheme, fallback: bool = False, where: str = "weight") -> Scheme:
    """The scheme for a weight with ``columns`` inputs: a group size that does not divide them is an
    error naming the valid sizes, or with ``fallback`` becomes per-channel."""
    if scheme.strategy != "group" or columns % scheme.group_size == 0:
        return scheme
    if fallback:
        return Scheme(scheme.bits, scheme.symmetric, "channel", scheme.group_size, scheme.observer)
    divisors = [g for g in (32, 64, 128, 256) if columns % g == 0]
    raise SecateurError(f"{where}: group_size {scheme.group_size} does not divide its {columns} input columns; "
                        f"use a divisor{' such as ' + ', '.join(map(str, divisors)) if divisors else ''}, "
                        "strategy 'channel', or fallback (per-channel where it does not divide)")


def _grouped(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """``w [out, in]`` as ``[rows, n_groups, columns_per_group]`` for the scheme's granularity."""
    out, cols = w.shape
    g = scheme.group
    if g == 0:
        return w.reshape(1, 1, out * cols)
    if g is None:
        return w.reshape(out, 1, cols)
    return w.reshape(out, cols // g, g)


def _expand(t: torch.Tensor, shape: torch.Size, scheme: Scheme) -> torch.Tensor:
    """Per-group parameters ``[rows, n_groups]`` broadcast back to the weight's shape."""
    out, cols = shape
    g = scheme.group
    if g == 0:
        return t.reshape(1, 1).expand(out, cols)
    if g is None:
        return t.reshape(out, 1).expand(out, cols)
    return t.repeat_interleave(g, dim=1)


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point mapping ``[lo, hi]`` (which always includes 0) onto the grid."""
    qmin, qmax = qrange(bits)
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        amax = torch.maximum(-lo, hi)
        scale = amax / ((qmax - qmin) / 2)
        zero = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.round(qmin - lo / scale.clamp_min(1e-30))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale is exact
    return scale.float(), zero.clamp(qmin, qmax).to(torch.int8)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Integers ``clamp(round(w / s) + z)`` as int8, shape of ``w``."""
    qmin, qmax = qrange(scheme.bits)
    s = _expand(scale, w.shape, scheme)
    z = _expand(zero, w.shape, scheme).float()
    return torch.clamp(torch.round(w.float() / s) + z, qmin, qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    return (q.float() - _expand(zero, q.shape, scheme).float()) * _expand(scale, q.shape, scheme)


def minmax_params(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from each group's min and max."""
    g = _grouped(w.detach().float(), scheme)
    return params_from_range(g.amin(-1), g.amax(-1), scheme.bits, scheme.symmetric)


def mse_params(w: torch.Tensor, scheme: Scheme, grid: int = 100, max_shrink: float = 0.8,
               norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping search: shrink each group's range by ``1 - k/grid`` (k < max_shrink·grid) and keep the
    ratio with the smallest Σ|w - ŵ|^norm (the GPTQ reference code's search)."""
    g = _grouped(w.detach().float(), scheme)
    lo0, hi0 = g.amin(-1), g.amax(-1)
    qmin, qmax = qrange(scheme.bits)
    best = torch.full(lo0.shape, math.inf)
    scale, zero = params_from_range(lo0, hi0, scheme.bits, scheme.symmetric)
    for k in range(int(max_shrink * grid)):
        p = 1 - k / grid
        s, z = params_from_range(p * lo0, p * hi0, scheme.bits, scheme.symmetric)
        q = torch.clamp(torch.round(g / s.unsqueeze(-1)) + z.unsqueeze(-1).float(), qmin, qmax)
        err = ((q - z.unsqueeze(-1).float()) * s.unsqueeze(-1) - g).abs().pow(norm).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def weight_params(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    return mse_params(w, scheme) if scheme.observer == "mse" else minmax_params(w, scheme)


def quantize_weight(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``(q, scale, zero_point)`` of ``w [out, in]``."""
    scale, zero = weight_params(w, scheme)
    return quantize(w, scale, zero, scheme), scale, zero


# --- training: the straight-through estimator -----------------------------------------------------
def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Quantize-dequantize with a straight-through estimator: the forward equals
    ``dequantize(quantize(w))``; gradients reach ``w`` (inside the clamp range) and, through the
    rounding's identity backward, ``scale`` (learnable scales, as in LSQ)."""
    qmin, qmax = qrange(scheme.bits)
    s = _expand(scale, w.shape, scheme)
    z = _expand(zero, w.shape, scheme).to(w.dtype)
    q = torch.clamp(round_ste(w / s) + z, qmin, qmax)
    return (q - z) * s


def quantize_activations_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization (one scale per row of the last dimension): a row's
    integers never depend on the other rows of the batch."""
    qmin, qmax = qrange(bits)
    scale = (x.detach().abs().amax(-1, keepdim=True).float() / qmax).clamp_min(1e-12)
    return torch.clamp(torch.round(x.float() / scale), qmin, qmax).to(torch.int8), scale


# --- FP8 ------------------------------------------------------------------------------------------
def fp8_dtype(name: str) -> torch.dtype:
    if name not in FP8:
        raise SecateurError(f"unknown FP8 format '{name}'; valid: {', '.join(FP8)}")
    return FP8[name]


def quantize_fp8(w: torch.Tensor, fmt: str = "e4m3", strategy: Strategy = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_fp8, scale)`` with ``w ≈ w_fp8 · scale`` and the largest magnitude mapped to the format's
    largest finite value, per tensor (scale ``[1, 1]``) or per output channel (``[out, 1]``)."""
    if strategy not in ("tensor", "channel"):
        raise SecateurError(f"FP8 scales are per 'tensor' or per 'channel', got '{strategy}'")
    dtype = fp8_dtype(fmt)
    w = w.detach().float()
    amax = w.abs().amax() if strategy == "tensor" else w.abs().amax(dim=1, keepdim=True)
    scale = (amax / torch.finfo(dtype).max).clamp_min(1e-12).reshape(-1, 1)
    return (w / scale).clamp(torch.finfo(dtype).min, torch.finfo(dtype).max).to(dtype), scale.float()


def dequantize_fp8(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return w8.float() * scale
