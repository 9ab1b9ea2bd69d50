"""Low-precision CPU kernels behind :class:`~secateur.runtime.linear.QuantLinear`: the candidates.

Each operation has several candidates (:data:`CANDIDATES`); which one runs for a shape and a
token count is decided by measurement (:mod:`secateur.runtime.dispatch`), never by the CPU's name.
A candidate is a ``pack_*`` function, run once when a module first needs it (the module caches the
result, which is never saved; None where the kernel cannot take the weight: shape, group size,
zero points), and a run function ``(x [tokens, in], packed, bias) -> [tokens, out]`` in ``x``'s
dtype (float32 or bfloat16).

Integer convention (project-wide, :mod:`secateur.quant.primitives`): signed ``q`` of ``b`` bits,
integer zero point ``zp`` in the same range, ``w = (q - zp) * scale`` with one scale per output
row (``[out, 1]``) or per ``group_size`` consecutive input columns (``[out, in / group_size]``).

======  ============  ===========================================  ===================================
op      candidate     kernel                                       result vs. the float32 reference
======  ============  ===========================================  ===================================
w8a8    gemv          secateur's VNNI GEMV (:mod:`.native`), few   per-token int8 ``x`` (amax / 127,
                      tokens                                       round half to even), exact int32
        onednn        ``onednn.qlinear_pointwise`` (brgemm: AMX,   dot products, then ``x_s ⊗ w_s``:
                      VNNI; its reference code on some CPUs)       the same integers as
        int_mm        ``torch._int_mm`` (oneDNN s8s8s32 GEMM)      ``primitives.quantize_activations_
        fp32          the same integers dequantized, ``F.linear``  per_token``; float rounding only
w4a16   gemv          secateur's bf16 GEMV, few tokens             bf16 rounding of ``x`` (scales and
        int4pack      ``aten._weight_int4pack_mm_for_cpu``         output float32 in the GEMV, bf16
        dequant_bf16  bf16 dequantize + bf16 ``F.linear``          in the torch ops)
        fp32          the dequantized weight, kept, ``F.linear``   float rounding only
w8a16   int8pack      ``aten._weight_int8pack_mm``                 bf16 rounding of ``x``, scale,
        dequant_bf16  as for w4a16                                 output
        fp32          as for w4a16                                 float rounding only
======  ============  ===========================================  ===================================

Speed: see benchmarks/quant_kernels.py and ``secateur info --machine``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..errors import SecateurError
from . import dispatch, native

# few-token kernels are offered to the dispatcher up to these token counts (their time grows with
# every token, so larger buckets are not worth timing them on)
FEW_TOKENS = 16  # secateur's own GEMVs
SMALL_BATCH = 64  # torch's packed weight-only GEMV kernels
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


# --- W8A8: int8 x int8 -> int32, on oneDNN or torch._int_mm ------------------------------------

def _fold_zero(q: torch.Tensor, scale: torch.Tensor,
               zero_point: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(int8 weight, zero_scale)``: zero points folded into the integers when ``q - zp`` stays in
    int8 (``zero_scale`` None), else ``q`` as it is and ``zp * scale`` per channel, applied as a
    correction ``- sum(x_q) * zp * scale`` (8-bit asymmetric weights need 9 bits otherwise)."""
    weight = _zero_free(q, zero_point)
    if weight is not None:
        return weight, None
    return q.contiguous(), (zero_point.reshape(-1).float() * scale.reshape(-1).float()).contiguous()


class OneDNNWeight(NamedTuple):
    packed: torch.Tensor  # oneDNN-blocked int8 weight (an mkldnn tensor; not serialisable)
    scale: torch.Tensor  # float32 [out]
    zero: torch.Tensor  # int64 [out] zeros: the op's weight zero point (symmetric weights only)
    zero_scale: Optional[torch.Tensor]  # float32 [out] zp * scale where zero points did not fold into q


class IntMMWeight(NamedTuple):
    weight_t: torch.Tensor  # int8 [in, out], contiguous: torch._int_mm's fast layout
    scale: torch.Tensor  # float32 [out]
    zero_scale: Optional[torch.Tensor]


def pack_onednn(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                group_size: Optional[int] = None) -> Optional[OneDNNWeight]:
    """``onednn.qlinear_prepack`` of per-channel int8 weights (oneDNN's blocked layout for its
    brgemm kernels; AMX tiles where the CPU has them, and on CPUs without AMX possibly its slow
    reference implementation: the dispatcher measures). None without oneDNN or for group-wise scales."""
    if group_size or scale.shape[-1] != 1 or not (torch.backends.mkldnn.is_available()
                                                   and _has("onednn", "qlinear_prepack")):
        return None
    weight, zero_scale = _fold_zero(q, scale, zero_point)
    return OneDNNWeight(torch.ops.onednn.qlinear_prepack(weight, None), scale.reshape(-1).float().contiguous(),
                        torch.zeros(q.shape[0], dtype=torch.int64), zero_scale)


def pack_int_mm(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                group_size: Optional[int] = None) -> Optional[IntMMWeight]:
    """The int8 weight transposed to ``[in, out]`` for ``torch._int_mm`` (oneDNN's s8s8s32 GEMM,
    fast without AMX too). None for group-wise scales."""
    if group_size or scale.shape[-1] != 1 or not _has("aten", "_int_mm"):
        return None
    weight, zero_scale = _fold_zero(q, scale, zero_point)
    return IntMMWeight(weight.t().contiguous(), scale.reshape(-1).float().contiguous(), zero_scale)


def pack_gemv_w8a8(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                   group_size: Optional[int] = None) -> Optional[native.W8A8Gemv]:
    """secateur's few-token VNNI GEMV layout (:func:`native.pack_w8a8`); None without the native
    kernels, for group-wise scales or for zero points that do not fold into int8."""
    if group_size or scale.shape[-1] != 1 or not native.available():
        return None
    weight, zero_scale = _fold_zero(q, scale, zero_point)
    return None if zero_scale is not None else native.pack_w8a8(weight, scale)


class ExactFp32Weight(NamedTuple):
    chunks: tuple[torch.Tensor, ...]  # float32 [out, <= EXACT_K] slices of the integer weight along ``in``
    scale: torch.Tensor  # float32 [out]
    zero_scale: Optional[torch.Tensor]


# int8 x int8 products are at most 127 * 128 in size, so float32 sums of up to 1024 of them stay
# below 2^24, where every integer is exact, in any order the GEMM adds them
EXACT_K = 1024


def pack_exact_fp32(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                    group_size: Optional[int] = None) -> Optional[ExactFp32Weight]:
    """The int8 weight as float32 integers, in slices of at most :data:`EXACT_K` inputs: a float32
    GEMM over them computes the exact integer dot products (the float32 candidate of W8A8, which
    so gives the same floats as the int8 kernels). None for group-wise scales."""
    if group_size or scale.shape[-1] != 1:
        return None
    weight, zero_scale = _fold_zero(q, scale, zero_point)
    w = weight.float()
    chunks = tuple(w[:, i:i + EXACT_K].contiguous() for i in range(0, max(w.shape[1], 1), EXACT_K))
    return ExactFp32Weight(chunks, scale.reshape(-1).float().contiguous(), zero_scale)


def w8a8_products(xq: torch.Tensor, w: OneDNNWeight | IntMMWeight | ExactFp32Weight
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(y, ws)``: ``torch._int_mm``'s int32 products and the weight scales still to apply, or
    (other kernels) float32 products with the weight scales applied and None. The native passes
    take either form and read the same floats from both (:mod:`secateur.runtime.native`). oneDNN
    takes one activation scale (1.0 here) and applies the weight scales itself; the float32 GEMM
    sums exactly within each slice of :data:`EXACT_K` inputs, and the slices are added in float64."""
    if isinstance(w, IntMMWeight):
        return torch._int_mm(xq, w.weight_t), w.scale
    if isinstance(w, ExactFp32Weight):
        x = xq.float()
        if len(w.chunks) == 1:
            return F.linear(x, w.chunks[0]).mul_(w.scale), None
        acc = sum(F.linear(x[:, i * EXACT_K:(i + 1) * EXACT_K], c).double() for i, c in enumerate(w.chunks))
        return acc.float().mul_(w.scale), None
    return torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, w.packed, w.scale, w.zero, None, 1.0, 0, torch.float32,
                                              "none", [], ""), None


def w8a8_gemm(xq: torch.Tensor, w: OneDNNWeight | IntMMWeight | ExactFp32Weight) -> torch.Tensor:
    """``(xq @ q.T) * w_scale`` as float32 ``[tokens, out]`` for int8 ``xq [tokens, in]``: exact
    integer accumulation, the sum rounded once to float32, then times the weight scales (the same
    floats from every kernel); the per-token scales, the bias and the zero-point correction are the
    caller's."""
    y, ws = w8a8_products(xq, w)
    return y if ws is None else torch.mul(y, ws)


def w8a8_gemm_linear(x: torch.Tensor, w: OneDNNWeight | IntMMWeight | ExactFp32Weight,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """W8A8 on a GEMM (oneDNN, ``torch._int_mm`` or the exact float32 one, by the packed weight's
    type): :func:`quantize_per_token`, :func:`w8a8_gemm` (exact s32
    accumulation times the weight scales), then ``* x_scale + bias`` in one ``addcmul``. With the
    native kernels built, the quantization and the epilogue are one pass each
    (:func:`native.quantize_per_token`, :func:`native.w8a8_epilogue`; the same floats)."""
    # under torch.compile the eager ops stay (Inductor fuses them itself); is_compiling comes first
    # so that Dynamo never traces available(), whose graph break would cost the oneDNN lowering
    # its frozen weight
    fused = not torch.compiler.is_compiling() and x.dim() == 2 and native.available()
    xq, xs = native.quantize_per_token(x.float()) if fused else quantize_per_token(x)
    if fused and w.zero_scale is None:  # the int32 products are rescaled in the epilogue's pass
        y, ws = w8a8_products(xq, w)
        return native.w8a8_epilogue(y, xs, bias, ws).to(x.dtype)
    out = w8a8_gemm(xq, w)
    if w.zero_scale is not None:
        out = torch.addcmul(out, xq.sum(-1, keepdim=True, dtype=torch.float32), w.zero_scale, value=-1)
    if fused:
        out = native.w8a8_epilogue(out, xs, bias)
    else:
        out = torch.addcmul(bias.float(), out, xs) if bias is not None else out.mul_(xs)
    return out.to(x.dtype)


def w8a8_gemv(x: torch.Tensor, w: native.W8A8Gemv, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """W8A8 for a few tokens: secateur's VNNI GEMV quantizes, multiplies and rescales in one call
    (the same floats as the GEMM paths)."""
    return native.w8a8_gemv(x.float(), w, bias).to(x.dtype)


def pack_fp32(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
              group_size: Optional[int] = None) -> torch.Tensor:
    """The dequantized weight ``(q - zp) * scale`` in float32, kept: the float32 candidate every
    quantized kernel is measured against (4 bytes a weight, as the dense model had)."""
    out, groups = scale.shape
    w = (q.float().view(out, groups, -1) - zero_point.float().view(out, groups, 1)) * scale.float().unsqueeze(-1) \
        if zero_point is not None else q.float().view(out, groups, -1) * scale.float().unsqueeze(-1)
    return w.reshape(out, -1).contiguous()


def fp32_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Weight-only in float32: ``x @ dequantized_weight.T + bias``."""
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


# --- weight-only: bf16 activations --------------------------------------------------------------

class DequantBF16(NamedTuple):
    """What the many-token path needs: ``w = q * scale + zero`` in bfloat16, per group."""
    q: torch.Tensor  # int8 [out, groups, group]
    scale: torch.Tensor  # bf16 [out, groups, 1]
    zero: Optional[torch.Tensor]  # bf16 [out, groups, 1] = -zp * scale, None when symmetric


def pack_dequant_bf16(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                      group_size: Optional[int] = None) -> DequantBF16:
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


class Int4Pack(NamedTuple):
    packed: torch.Tensor  # uint8 [out, in / 2], the torch op's blocked nibble layout
    scales_and_zeros: torch.Tensor  # bf16 [in / group, out, 2]
    group: int  # the torch op's group size (a divisor of ours when we have per-channel or wide groups)


def int4_group(group_size: Optional[int], in_features: int) -> Optional[int]:
    """The kernel group size for our scales: the largest of 256/128/64/32 dividing ``group_size``
    (or ``in_features`` per channel); each of our scales is then repeated over its kernel groups."""
    span = group_size or in_features
    return next((g for g in INT4_GROUPS if span % g == 0), None)


def _int4(q: torch.Tensor) -> bool:
    return q.numel() == 0 or (int(q.min()) >= -8 and int(q.max()) <= 7)


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
              group_size: Optional[int] = None) -> Optional[Int4Pack]:
    """``aten._convert_weight_to_int4pack_for_cpu`` of ``q + 8`` (the op wants unsigned nibbles
    0..15 as int32 and dequantizes ``(u - 8) * s + z``). Our ``(q - zp) * scale`` is
    ``(u - 8) * scale + (-zp * scale)``, so ``scales_and_zeros[g, n] = (scale, -zp * scale)``
    in bf16, laid out ``[groups, out, 2]``. Needs ``q`` in [-8, 7] (<= 4 bits), ``out % 16 == 0``
    and a group size (or ``in_features`` per channel) that is a multiple of 32; else None."""
    out, in_features = q.shape
    group = int4_group(group_size, in_features)
    if group is None or out % 16 or not _int4(q) or not _has("aten", "_weight_int4pack_mm_for_cpu"):
        return None
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
    s = scale.float()
    zero = torch.zeros_like(s) if zero_point is None else -zero_point.float() * s
    repeat = (group_size or in_features) // group
    sz = torch.stack([s, zero], dim=-1).repeat_interleave(repeat, dim=1)  # [out, in / group, 2]
    return Int4Pack(packed, sz.transpose(0, 1).contiguous().to(torch.bfloat16), group)


def int4pack_linear(x: torch.Tensor, w: Int4Pack, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """W4A16 through ``aten._weight_int4pack_mm_for_cpu`` (AVX-512/AVX2 tinygemm kernel: nibbles
    dequantized in registers, fp32 FMA, bf16 out) on ``x`` cast to bf16 (its float32 path is
    scalar and ~20x slower, so the casts pay). Its time grows linearly with the tokens."""
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(_bf16(x), w.packed, w.group, w.scales_and_zeros)
    return _finish(out, bias, x.dtype)


def pack_gemv_w4(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                 group_size: Optional[int] = None) -> Optional[native.W4Gemv]:
    """secateur's W4A16 GEMV layout (:func:`native.pack_w4`); None without the native kernels,
    beyond 4 bits, or for groups that are not multiples of 16."""
    return native.pack_w4(q, scale, zero_point, group_size) if native.available() and _int4(q) else None


def w4_gemv(x: torch.Tensor, w: native.W4Gemv, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """W4A16 for a few tokens: secateur's GEMV (nibbles to bf16 in registers, bf16 dot products,
    float32 sums; :mod:`secateur.runtime.native`)."""
    return native.w4_gemv(x, w, bias).to(x.dtype)


class Int8Pack(NamedTuple):
    q: torch.Tensor  # int8 [out, in], zero points folded in
    scale: torch.Tensor  # bf16 [out]


def pack_int8(q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
              group_size: Optional[int] = None) -> Optional[Int8Pack]:
    """W8A16 weights for ``aten._weight_int8pack_mm``: per-channel int8 (zero points folded into
    ``q`` when ``q - zp`` fits int8) and bf16 scales. Needs ``in_features % 16 == 0`` (aligned
    16-wide loads); None for group-wise scales or unfoldable zero points."""
    if group_size or scale.shape[1] != 1 or q.shape[1] % 16 or not _has("aten", "_weight_int8pack_mm"):
        return None
    weight = _zero_free(q, zero_point)
    if weight is None:
        return None
    return Int8Pack(weight, scale.reshape(-1).to(torch.bfloat16).contiguous())


def int8pack_linear(x: torch.Tensor, w: Int8Pack, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """W8A16: ``torch.ops.aten._weight_int8pack_mm`` (AVX-512 kernel: int8 rows widened and scaled
    in registers, fp32 FMA, bf16 out) on ``x`` cast to bf16 (its float32 path is scalar)."""
    return _finish(torch.ops.aten._weight_int8pack_mm(_bf16(x), w.q, w.scale), bias, x.dtype)


# --- the candidates of each operation, for secateur.runtime.dispatch ---------------------------------

class Candidate(NamedTuple):
    pack: Callable[..., Any]  # (q, scale, zero_point or None, group_size) -> packed weight, or None
    run: Callable[[torch.Tensor, Any, Optional[torch.Tensor]], torch.Tensor]  # (x 2-D, packed, bias)
    max_tokens: int = 1 << 30  # few-token kernels: their time grows with every token


CANDIDATES: dict[str, dict[str, Candidate]] = {
    "w8a8": {"gemv": Candidate(pack_gemv_w8a8, w8a8_gemv, FEW_TOKENS),
             "onednn": Candidate(pack_onednn, w8a8_gemm_linear),
             "int_mm": Candidate(pack_int_mm, w8a8_gemm_linear),
             "fp32": Candidate(pack_exact_fp32, w8a8_gemm_linear)},
    "w4a16": {"gemv": Candidate(pack_gemv_w4, w4_gemv, FEW_TOKENS),
              "int4pack": Candidate(pack_int4, int4pack_linear, SMALL_BATCH),
              "dequant_bf16": Candidate(pack_dequant_bf16, dequant_bf16_linear),
              "fp32": Candidate(pack_fp32, fp32_linear)},
    "w8a16": {"int8pack": Candidate(pack_int8, int8pack_linear, SMALL_BATCH),
              "dequant_bf16": Candidate(pack_dequant_bf16, dequant_bf16_linear),
              "fp32": Candidate(pack_fp32, fp32_linear)},
}
# the W8A8 GEMMs alone (int8 in, float32 out; op "w8a8_gemm"): the same packs as the w8a8 candidates
GEMMS = {name: Candidate(CANDIDATES["w8a8"][name].pack, w8a8_products) for name in ("onednn", "int_mm", "fp32")}


def op_of(bits: int, activation: Optional[str], group_size: Optional[int]) -> Optional[str]:
    """The dispatcher's operation for a QuantLinear scheme, or None where no kernel applies."""
    if activation == "int8":
        return "w8a8" if group_size is None else None
    return "w4a16" if bits <= 4 else "w8a16"


def synthetic(op: str, in_features: int, out_features: int, group_size: Optional[int] = None,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """``(q, scale, zero_point, bias)`` of the given shape, symmetric, for timing candidates."""
    g = torch.Generator().manual_seed(seed)
    hi = 7 if op == "w4a16" else 127
    groups = in_features // group_size if group_size else 1
    q = torch.randint(-hi, hi + 1, (out_features, in_features), generator=g, dtype=torch.int8)
    scale = torch.rand(out_features, groups, generator=g) * 0.01 + 1e-3
    return q, scale, None, torch.randn(out_features, generator=g)


def try_pack(candidate: Candidate, q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
             group_size: Optional[int]) -> Any:
    """``candidate.pack(...)``, or None where it cannot take the weight or this torch build lacks
    the op's CPU kernel."""
    try:
        return candidate.pack(q, scale, zero_point, group_size)
    except (RuntimeError, NotImplementedError):
        return None


def bench(op: str, in_features: int, out_features: int, group_size: Optional[int] = None
          ) -> Callable[[int], dict[str, Callable[[], Any]]]:
    """The dispatcher's ``make`` for ``op`` on this shape: rows -> {candidate: call} over synthetic
    weights (each candidate packed once, on first need); float32 inputs, int8 ones for ``w8a8_gemm``."""
    table = GEMMS if op == "w8a8_gemm" else CANDIDATES[op]
    q, scale, zero, bias = synthetic(op, in_features, out_features, group_size)
    packs: dict[str, Any] = {}

    def make(rows: int) -> dict[str, Callable[[], Any]]:
        g = torch.Generator().manual_seed(rows)
        x = (torch.randint(-127, 128, (rows, in_features), generator=g, dtype=torch.int8) if op == "w8a8_gemm"
             else torch.randn(rows, in_features, generator=g))
        calls = {}
        for name, cand in table.items():
            if rows > cand.max_tokens:
                continue
            if name not in packs:
                packs[name] = try_pack(cand, q, scale, zero, group_size)
            if packs[name] is not None:
                run = cand.run
                calls[name] = ((lambda p=packs[name], r=run: r(x, p)) if op == "w8a8_gemm" else
                               (lambda p=packs[name], r=run: r(x, p, bias)))
        return calls
    return make


class KernelSlot:
    """One weight's kernels for one operation: per token bucket, the candidate the dispatcher
    chose, packed on first use. Each candidate is packed at most once (``packs``, which a slot for
    another operation on the same weight may share); the choices are dropped when forcing changes
    (:func:`secateur.runtime.dispatch.generation`)."""

    def __init__(self, op: str, shape: tuple[int, ...], group_size: Optional[int] = None,
                 packs: Optional[dict[str, Any]] = None):
        self.op, self.shape, self.group_size = op, shape, group_size
        self.table = GEMMS if op == "w8a8_gemm" else CANDIDATES[op]
        self.packs: dict[str, Any] = {} if packs is None else packs  # name -> packed (None: cannot take it)
        self.entries: dict[int, Optional[tuple[str, Candidate, Any]]] = {}
        self.generation = -1

    def pack(self, name: str, q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor]) -> Any:
        if name not in self.packs:
            self.packs[name] = try_pack(self.table[name], q, scale, zero_point, self.group_size)
        return self.packs[name]

    def entry(self, tokens: int, q: torch.Tensor, scale: torch.Tensor,
              zero_point: Optional[torch.Tensor]) -> Optional[tuple[str, Candidate, Any]]:
        """``(kernel name, candidate, packed weight)`` for ``tokens`` rows of this weight, or None
        where no candidate can take it."""
        if self.generation != dispatch.generation():
            self.entries, self.generation = {}, dispatch.generation()
        b = dispatch.bucket(tokens)
        if b in self.entries:
            return self.entries[b]
        available = tuple(n for n, c in self.table.items()
                          if tokens <= c.max_tokens and self.packs.get(n, 0) is not None)
        entry = None
        while available:
            name = dispatch.choose(self.op, tokens, self.shape, bench(self.op, *self.shape[:2], self.group_size),
                                   available)
            packed = self.pack(name, q, scale, zero_point)
            if packed is not None:
                entry = (name, self.table[name], packed)
                break
            available = tuple(n for n in available if n != name)
        self.entries[b] = entry
        return entry

    def chosen(self) -> dict[int, str]:
        """The kernel chosen for each token bucket met so far."""
        return {b: e[0] for b, e in self.entries.items() if e}


class W8A8Gemm:
    """An int8 weight for many-token GEMMs whose kernel (oneDNN, ``torch._int_mm`` or the exact
    float32 GEMM) is chosen per token bucket by measurement: the fused encoder's four GEMMs."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                 packs: Optional[dict[str, Any]] = None):
        self.q, self.scale, self.zero_point = q, scale, zero_point
        self.slot = KernelSlot("w8a8_gemm", (q.shape[1], q.shape[0]), packs=packs)
        self.foldable = _zero_free(q, zero_point) is not None  # no zero-point correction needed

    def products(self, xq: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:func:`w8a8_products`: int32 products with the scales still to apply, or float32 ones."""
        entry = self.slot.entry(xq.shape[0], self.q, self.scale, self.zero_point)
        if entry is None:
            raise SecateurError("no int8 GEMM kernel can run here")
        return w8a8_products(xq, entry[2])

    def __call__(self, xq: torch.Tensor) -> torch.Tensor:
        """``(xq @ q.T) * scale`` as float32 (see :func:`w8a8_gemm`)."""
        y, ws = self.products(xq)
        return y if ws is None else torch.mul(y, ws)

    def secateur_kernels(self) -> dict[str, dict[int, str]]:
        chosen = self.slot.chosen()
        return {"w8a8_gemm": chosen} if chosen else {}


__all__ = ["FEW_TOKENS", "SMALL_BATCH", "CANDIDATES", "GEMMS", "Candidate", "KernelSlot", "W8A8Gemm", "op_of",
           "synthetic", "try_pack", "bench", "quantize_per_token", "w8a8_gemm", "w8a8_products", "w8a8_gemm_linear",
           "pack_onednn", "pack_int_mm", "pack_gemv_w8a8", "pack_exact_fp32", "pack_int4", "pack_gemv_w4", "pack_int8",
           "pack_fp32", "pack_dequant_bf16", "dequant_bf16_linear", "int4_group"]
