"""quant/primitives.py against element-by-element Python references."""

from __future__ import annotations

import math

import pytest
import torch

from secateur.errors import SecateurError
from secateur.quant.primitives import (Scheme, dequantize, dequantize_fp8, fake_quantize, minmax_params, mse_params,
                                       quantize, quantize_activations_per_token, quantize_fp8, quantize_weight,
                                       resolve_group)


def slow_rtn(w, bits, symmetric, group):
    """Element by element: the group's range, its scale and zero point, round, clamp (float32
    arithmetic, as the library's, so that ties round the same way)."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows, cols = w.shape
    q = torch.zeros(rows, cols, dtype=torch.int64)
    deq = torch.zeros(rows, cols)
    g = cols if group is None else group
    for r in range(rows):
        for start in range(0, cols, g):
            vals = [float(w[r, c]) for c in range(start, start + g)]
            lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
            if symmetric:
                scale = f32(max(-lo, hi)) / ((qmax - qmin) / 2)
                zero = 0
            else:
                scale = (f32(hi) - f32(lo)) / (qmax - qmin)
                zero = min(max(int(torch.round(qmin - f32(lo) / scale)), qmin), qmax)
            scale = scale if scale > 0 else f32(1.0)
            for c in range(start, start + g):
                v = min(max(int(torch.round(w[r, c] / scale)) + zero, qmin), qmax)
                q[r, c] = v
                deq[r, c] = (v - zero) * float(scale)
    return q, deq


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [None, 4])
def test_rtn_matches_element_by_element(bits, symmetric, group):
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(bits))
    scheme = Scheme(bits, symmetric, "channel" if group is None else "group", group or 128)
    q, scale, zero = quantize_weight(w, scheme)
    ref_q, ref_deq = slow_rtn(w, bits, symmetric, group)
    assert torch.equal(q.long(), ref_q)
    assert torch.allclose(dequantize(q, scale, zero, scheme), ref_deq, atol=1e-6)
    assert scale.shape == (5, 1 if group is None else 3) and zero.dtype == torch.int8


def test_per_tensor_and_zero_groups():
    w = torch.randn(4, 8)
    scheme = Scheme(8, True, "tensor")
    q, scale, zero = quantize_weight(w, scheme)
    assert scale.shape == (1, 1)
    assert torch.allclose(dequantize(q, scale, zero, scheme), w, atol=float(w.abs().max()) / 127)
    z = torch.zeros(2, 8)
    q, scale, zero = quantize_weight(z, Scheme(4, False, "group", 4))
    assert torch.equal(dequantize(q, scale, zero, Scheme(4, False, "group", 4)), z)


def test_mse_search_is_the_best_clip_ratio():
    w = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    w[0, 0] = 4.0  # an outlier worth clipping
    scheme = Scheme(3, True, "channel", observer="mse")
    scale, zero = mse_params(w, scheme)
    for r in range(3):  # brute force over the same grid of ratios, row by row
        best, best_scale = math.inf, None
        amax = float(w[r].abs().max())
        for k in range(80):
            s = (1 - k / 100) * amax / 3.5
            deq = torch.clamp(torch.round(w[r] / s), -4, 3) * s
            err = float((deq - w[r]).abs().pow(2.4).sum())
            if err < best - 1e-9:
                best, best_scale = err, s
        assert abs(float(scale[r, 0]) - best_scale) < 1e-5
    mm, mz = minmax_params(w, Scheme(3, True, "channel"))
    assert float(scale[0, 0]) < float(mm[0, 0])  # the outlier row got clipped
    err = lambda s, z: float((dequantize(quantize(w, s, z, scheme), s, z, scheme) - w).abs().pow(2.4).sum())  # noqa
    assert err(scale, zero) < err(mm, mz)


def test_group_size_that_does_not_divide():
    scheme = Scheme(4, True, "group", 128)
    with pytest.raises(SecateurError, match="does not divide its 172 input columns"):
        resolve_group(172, scheme, where="mlp.down_proj")
    assert resolve_group(172, scheme, fallback=True).strategy == "channel"
    assert resolve_group(256, scheme) is scheme
    with pytest.raises(SecateurError, match="bits must be 2..8"):
        Scheme(bits=9)


def test_fake_quantize_forward_and_straight_through_gradients():
    w = torch.randn(4, 8, requires_grad=True)
    scheme = Scheme(4, True, "channel")
    scale, zero = minmax_params(w, scheme)
    scale = scale.clone().requires_grad_(True)
    out = fake_quantize(w, scale, zero, scheme)
    assert torch.allclose(out, dequantize(quantize(w.detach(), scale.detach(), zero, scheme), scale.detach(), zero,
                                          scheme), atol=1e-6)
    out.sum().backward()
    inside = (torch.round(w / scale) >= -8) & (torch.round(w / scale) <= 7)
    assert torch.equal(w.grad, inside.float())  # identity inside the clamp range, zero outside
    assert scale.grad is not None and torch.isfinite(scale.grad).all()


def test_per_token_activations_are_batch_independent():
    x = torch.randn(6, 16)
    q, s = quantize_activations_per_token(x)
    q1, s1 = quantize_activations_per_token(x[2:3])
    assert torch.equal(q[2:3], q1) and torch.equal(s[2:3], s1)
    assert (q.float() * s - x).abs().max() <= s.max() / 2 + 1e-6


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_fp8_round_trip(fmt, strategy):
    w = torch.randn(8, 16) * 3
    w8, scale = quantize_fp8(w, fmt, strategy)
    assert w8.dtype == (torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2)
    back = dequantize_fp8(w8, scale)
    rel = (back - w).abs() / w.abs().clamp_min(1e-3)
    assert float(rel.median()) < (0.07 if fmt == "e4m3" else 0.13)  # 3 / 2 mantissa bits
    amax = w.abs().amax() if strategy == "tensor" else w.abs().amax(1)
    assert torch.allclose(back.abs().amax() if strategy == "tensor" else back.abs().amax(1), amax, rtol=1e-6)
    with pytest.raises(SecateurError, match="valid: e4m3, e5m2"):
        quantize_fp8(w, "e3m4")
