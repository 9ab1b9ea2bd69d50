"""Low-precision CPU kernels behind :class:`~secateur.quant.linear.QuantLinear`.

Each kernel is a ``pack_*`` function, run once when a module first needs it (the module caches the
result, which is never saved), and a ``*_linear(x, packed, bias)`` taking a 2-D ``x [tokens, in]``
and returning ``[tokens, out]`` in ``x``'s dtype (float32 or bfloat16). ``pack_*`` returns None
where the kernel cannot take the weight (shape, group size, zero points); the module then runs its
reference path, ``x @ dequantized_weight.T + bias``.

Integer convention (project-wide, :mod:`secateur.quant.primitives`): signed ``q`` of ``b`` bits,
integer zero point ``zp`` in the same range, ``w = (q - zp) * scale`` with one scale per output
row (``[out, 1]``) or per ``group_size`` consecutive input columns (``[out, in / group_size]``).

==========  ==============================================  =========================================
scheme      kernel (torch op)                               result vs. the float32 reference
==========  ==============================================  =========================================
W8A8        per-token int8 ``x`` (amax / 127, round half    exact int32 dot products; same integers
            to even); <= W8A8_GEMV_TOKENS: secateur's       as ``primitives.quantize_activations_
            VNNI GEMV (:mod:`.native`), else                per_token``; float rounding only
            ``onednn.qlinear_pointwise`` (oneDNN brgemm:
            AMX / VNNI); rescale ``x_s ⊗ w_s``
W4A16       <= W4_GEMV_TOKENS: secateur's bf16 GEMV        bf16 rounding of ``x``; the native GEMV
            (:mod:`.native`, float32 out); <= SMALL_BATCH   keeps scales and output in float32, the
            ``aten._weight_int4pack_mm_for_cpu`` on bf16    torch ops round scale, zero and output
            ``x``, else bf16 dequantize + bf16 ``F.linear``  to bf16
W8A16       ``aten._weight_int8pack_mm`` on bf16 ``x``      bf16 rounding of ``x``, scale, output
            (<= SMALL_BATCH tokens), else as W4A16
==========  ==============================================  =========================================

Speed: see benchmarks/quant_kernels.py.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import native

# tokens up to which secateur's own GEMV kernels (quant/native.py) are used when built: where they
# beat torch's kernels for a 2048 x 768 weight on 2 threads (int8: 11 vs 56 us at 1 token, 45 vs
# 66 at 8, even at 16; int4: 28 vs 45 us at 1 token, even at 2, slower from 4)
W8A8_GEMV_TOKENS = 8
W4_GEMV_TOKENS = 2
SMALL_BATCH = 16  # weight-only: tokens up to which the packed GEMV kernels beat dequantize + bf16 GEMM
INT4_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts


def _has(namespace: str, name: str) -> bool:
    try:
        return hasattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch without the namespace
        return False


def _fits_int8(t: torch.Tensor) -> bool:
    return t.numel() == 0 or (int(t.min()) >= -128 and int(t.max()) <= 127)


def _zero_free(q: torch.Tensor, zero_point: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``q - zp`` as int8 (per-channel zero points), or None when it leaves the int8 range."""
    if zero_point is None or not bool(zero_point.any()):
        return q.contiguous()
    shifted = q.to(torch.int16) - zero_point.reshape(-1, 1).to(torch.int16)
    return shifted.to(torch.int8).contiguous() if _fits_int8(shifted) else None


# --- dynamic per-token int8 activations -------------------------------------------------------

def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``scale = max|x_row| / 127`` (at least 1e-12), ``q = round(x /
    scale)`` (half to even) as int8; a row's integers never depend on the other rows. Six small
    eager ops and the cast (``abs().amax()`` beats ``linalg.vector_norm(inf)`` on one token); the
    same integers and scales as :func:`secateur.quant.primitives.quantize_activations_per_token`
    (|x / scale| <= 127 by construction, so no clamp is needed)."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).div_(127).clamp_min_(1e-12)
    return torch.div(x, scale).round_().to(torch.int8), scale


# --- W8A8: int8 x int8 -> int32 on oneDNN -------------------------------------------------------

class W8A8Weight(NamedTuple):
    packed: torch.Tensor  # oneDNN-blocked int8 weight (an mkldnn tensor; not serialisable)
    scale: torch.Tensor  # float32 [out]
    zero: torch.Tensor  # int64 [out] zeros: the op's weight zero point (symmetric weights only)
    zero_scale: Optional[torch.Tensor]  # float32 [out] zp * scale where zero points did not fold into q
    gemv: Optional[native.W8A8Gemv] = None  # secateur's few-token kernel, when built (no zero_scale)


def pack_w8a8(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
              gemv: bool = True) -> Optional[W8A8Weight]:
    """``onednn.qlinear_prepack`` of per-channel int8 weights (oneDNN's blocked layout for its
    brgemm kernels, AMX tiles where the CPU has them). Zero points are folded into the integers
    when ``q - zp`` stays in int8, else kept as a correction ``- sum(x_q) ⊗ zp * scale`` (the op
    only takes zero-point-free weights). ``gemv=False`` skips the layout of secateur's few-token
    GEMV (a weight only ever multiplied by many tokens). None without oneDNN or for group-wise scales."""
    if not (torch.backends.mkldnn.is_available() and _has("onednn", "qlinear_prepack")) or scale.shape[1] != 1:
        return None
    weight = _zero_free(q, zero_point)
    zero_scale = None
    if weight is None:  # 8-bit asymmetric: q - zp needs 9 bits
        weight, zero_scale = q.contiguous(), (zero_point.reshape(-1).float() * scale.reshape(-1).float())
    out = q.shape[0]
    few = native.pack_w8a8(weight, scale) if gemv and zero_scale is None and native.available() else None
    return W8A8Weight(torch.ops.onednn.qlinear_prepack(weight, None), scale.reshape(-1).float().contiguous(),
                      torch.zeros(out, dtype=torch.int64), zero_scale, few)


def w8a8_gemm(xq: torch.Tensor, w: W8A8Weight) -> torch.Tensor:
    """``(xq @ q.T) * w_scale`` as float32 ``[tokens, out]`` for int8 ``xq [tokens, in]``: oneDNN's
    exact int32 accumulation, then the weight scales; the per-token scales and the bias are the
    caller's (one activation scale of 1.0 goes to the op, which takes only one)."""
    return torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, w.packed, w.scale, w.zero, None, 1.0, 0, torch.float32,
                                              "none", [], "")


def w8a8_linear(x: torch.Tensor, w: W8A8Weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """W8A8: :func:`quantize_per_token`, then ``torch.ops.onednn.qlinear_pointwise`` (s8 x s8 ->
    exact s32 accumulation, times the weight scales, float32 out; the op takes a single activation
    scale, so it gets 1.0 and the per-token scales are applied after, with the bias, in one
    ``addcmul``). Any number of tokens (AMX int8 GEMM for prefill). ``torch._int_mm`` is exact too
    but slower here, ``quantized.linear_dynamic`` quantizes per tensor (asymmetric). Up to
    ``W8A8_GEMV_TOKENS`` tokens, secateur's VNNI GEMV does the same in one call (same floats).
    With the native kernels built, the quantization and the ``addcmul`` are one pass each
    (:func:`native.quantize_per_token`, :func:`native.w8a8_epilogue`; again the same floats)."""
    if w.gemv is not None and x.shape[0] <= W8A8_GEMV_TOKENS:
        return native.w8a8_gemv(x.float(), w.gemv, bias).to(x.dtype)
    # under torch.compile the eager ops stay (Inductor fuses them itself); is_compiling comes first
    # so that Dynamo never traces available(), whose graph break would cost the oneDNN lowering
    # its frozen weight
    fused = not torch.compiler.is_compiling() and x.dim() == 2 and native.available()
    xq, xs = native.quantize_per_token(x.float()) if fused else quantize_per_token(x)
    out = w8a8_gemm(xq, w)
    if w.zero_scale is not None:
        out = torch.addcmul(out, xq.sum(-1, keepdim=True, dtype=torch.float32), w.zero_scale, value=-1)
    if fused:
        out = native.w8a8_epilogue(out, xs, bias)
    else:
        out = torch.addcmul(bias.float(), out, xs) if bias is not None else out.mul_(xs)
    return out.to(x.dtype)


# --- weight-only: bf16 activations --------------------------------------------------------------

class DequantBF16(NamedTuple):
    """What the many-token path needs: ``w = q * scale + zero`` in bfloat16, per group."""
    q: torch.Tensor  # int8 [out, groups, group]
    scale: torch.Tensor  # bf16 [out, groups, 1]
    zero: Optional[torch.Tensor]  # bf16 [out, groups, 1] = -zp * scale, None when symmetric


def pack_dequant_bf16(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor]) -> DequantBF16:
    out, groups = scale.shape
    s = scale.float()
    zero = None if zero_point is None or not bool(zero_point.any()) else \
        (-zero_point.float() * s).to(torch.bfloat16).unsqueeze(-1)
    return DequantBF16(q.reshape(out, groups, -1), s.to(torch.bfloat16).unsqueeze(-1), zero)


def dequant_bf16_linear(x: torch.Tensor, w: DequantBF16, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Many tokens, weight-only: dequantize to bfloat16 (``q * scale + zero``) and ``F.linear`` in
    bf16 (oneDNN's bf16 GEMM, AMX where available); the weight is rebuilt on every call, never kept."""
    weight = w.q * w.scale
    if w.zero is not None:
        weight = weight.add_(w.zero)
    out = F.linear(x.to(torch.bfloat16), weight.flatten(1))
    return _finish(out, bias, x.dtype)


def _finish(out: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """bf16 kernel output to the caller's dtype, plus the bias (one op: ``add`` promotes)."""
    if bias is not None:
        out = torch.add(bias, out)
    return out.to(dtype)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` as contiguous, 64-byte aligned bf16 (the packed kernels use aligned vector loads)."""
    x = x.to(torch.bfloat16).contiguous()
    if torch.compiler.is_compiling():  # no data pointers while tracing; compiled buffers are 64-byte aligned
        return x
    return x if x.data_ptr() % 64 == 0 else x.clone()


class Int4Weight(NamedTuple):
    packed: Optional[torch.Tensor]  # uint8 [out, in / 2], the torch op's blocked nibble layout (None: op can't)
    scales_and_zeros: Optional[torch.Tensor]  # bf16 [in / group, out, 2]
    group: int  # the torch op's group size (a divisor of ours when we have per-channel or wide groups)
    dequant: DequantBF16
    gemv: Optional[native.W4Gemv] = None  # secateur's few-token kernel, when built


def int4_group(group_size: Optional[int], in_features: int) -> Optional[int]:
    """The kernel group size for our scales: the largest of 256/128/64/32 dividing ``group_size``
    (or ``in_features`` per channel); each of our scales is then repeated over its kernel groups."""
    span = group_size or in_features
    return next((g for g in INT4_GROUPS if span % g == 0), None)


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
              group_size: Optional[int]) -> Optional[Int4Weight]:
    """secateur's GEMV layout (:func:`secateur.quant.native.pack_w4`, when built) and
    ``aten._convert_weight_to_int4pack_for_cpu`` of ``q + 8`` (the op wants unsigned nibbles
    0..15 as int32 and dequantizes ``(u - 8) * s + z``). Our ``(q - zp) * scale`` is
    ``(u - 8) * scale + (-zp * scale)``, so ``scales_and_zeros[g, n] = (scale, -zp * scale)``
    in bf16, laid out ``[groups, out, 2]``. Needs ``q`` in [-8, 7] (<= 4 bits); the torch op also
    needs ``out % 16 == 0`` and a group size (or ``in_features`` per channel) that is a multiple
    of 32. None when neither kernel takes the weight."""
    out, in_features = q.shape
    if int(q.min()) < -8 or int(q.max()) > 7:
        return None
    gemv = native.pack_w4(q, scale, zero_point, group_size) if native.available() else None
    dequant = pack_dequant_bf16(q, scale, zero_point)
    group = int4_group(group_size, in_features)
    if group is None or out % 16 or not _has("aten", "_weight_int4pack_mm_for_cpu"):
        return None if gemv is None else Int4Weight(None, None, group or 0, dequant, gemv)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
    s = scale.float()
    zero = torch.zeros_like(s) if zero_point is None else -zero_point.float() * s
    repeat = (group_size or in_features) // group
    sz = torch.stack([s, zero], dim=-1).repeat_interleave(repeat, dim=1)  # [out, in / group, 2]
    sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)
    return Int4Weight(packed, sz, group, dequant, gemv)


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """W4A16. Up to ``W4_GEMV_TOKENS`` tokens: secateur's GEMV (nibbles to bf16 in registers, bf16
    dot products, float32 sums; :mod:`secateur.quant.native`). Up to ``SMALL_BATCH``:
    ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (AVX-512/AVX2 tinygemm kernel: nibbles
    dequantized in registers, fp32 FMA, bf16 out) on ``x`` cast to bf16 — its float32 path is
    scalar and ~20x slower, so the casts pay. Its time grows linearly with the tokens (4-row
    blocks), so above ``SMALL_BATCH`` tokens :func:`dequant_bf16_linear` is used instead."""
    tokens = x.shape[0]
    if w.gemv is not None and (tokens <= W4_GEMV_TOKENS or (w.packed is None and tokens <= SMALL_BATCH)):
        return native.w4_gemv(x, w.gemv, bias).to(x.dtype)
    if tokens > SMALL_BATCH or w.packed is None:
        return dequant_bf16_linear(x, w.dequant, bias)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(_bf16(x), w.packed, w.group, w.scales_and_zeros)
    return _finish(out, bias, x.dtype)


class Int8Weight(NamedTuple):
    q: torch.Tensor  # int8 [out, in], zero points folded in
    scale: torch.Tensor  # bf16 [out]
    dequant: DequantBF16


def pack_int8(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor]) -> Optional[Int8Weight]:
    """W8A16 weights for ``aten._weight_int8pack_mm``: per-channel int8 (zero points folded into
    ``q`` when ``q - zp`` fits int8) and bf16 scales. Needs ``in_features % 16 == 0`` (aligned
    16-wide loads); None for group-wise scales or unfoldable zero points."""
    if scale.shape[1] != 1 or q.shape[1] % 16 or not _has("aten", "_weight_int8pack_mm"):
        return None
    weight = _zero_free(q, zero_point)
    if weight is None:
        return None
    s = scale.reshape(-1).to(torch.bfloat16).contiguous()
    return Int8Weight(weight, s, pack_dequant_bf16(weight, scale, None))


def int8_linear(x: torch.Tensor, w: Int8Weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """W8A16: ``torch.ops.aten._weight_int8pack_mm`` (AVX-512 kernel: int8 rows widened and scaled
    in registers, fp32 FMA, bf16 out) on ``x`` cast to bf16 (its float32 path is scalar). Above
    ``SMALL_BATCH`` tokens, :func:`dequant_bf16_linear`."""
    if x.shape[0] > SMALL_BATCH:
        return dequant_bf16_linear(x, w.dequant, bias)
    return _finish(torch.ops.aten._weight_int8pack_mm(_bf16(x), w.q, w.scale), bias, x.dtype)


__all__ = ["W8A8_GEMV_TOKENS", "W4_GEMV_TOKENS", "SMALL_BATCH", "quantize_per_token", "pack_w8a8", "w8a8_linear", "pack_int4", "int4_linear", "int4_group",
           "pack_int8", "int8_linear", "pack_dequant_bf16", "dequant_bf16_linear"]
