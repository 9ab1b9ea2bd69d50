"""secateur's own GEMV kernels (csrc/gemv.cpp through secateur.runtime.native) against slow loops.

The layouts are unpacked element by element and compared with the integers; the W8A8 kernel is
compared with exact int64 dot products of the same per-token integers (test_quant_kernels' loop), the W4A16 kernel with a
float64 product of the bf16-rounded activations and the dequantized weights (the kernel's only
rounding is its float32 accumulation, so the bound is tight: 1e-5 of the sum of |terms|).
"""

from __future__ import annotations

import pytest
import torch

from secateur.runtime import kernels, native
from secateur.runtime.linear import QuantLinear
from test_quant_kernels import slow_w8a8  # the per-token loop with exact int64 dot products

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built on this machine")


def w8_case(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, 1, generator=g) * 0.02


def w4_case(n: int, k: int, group: int | None, asym: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    groups = k // (group or k)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, groups, generator=g) * 0.05 + 0.001
    zero = torch.randint(-8, 8, (n, groups), generator=g, dtype=torch.int8) if asym else None
    return q, scale, zero


def x_case(tokens: int, k: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(seed))
    if tokens:
        x[0, :3] = 0.0
        x[-1, -1] = 8.0
    return x


# --- layouts --------------------------------------------------------------------------------------

def test_w8a8_layout_holds_each_weight_once_where_the_kernel_reads_it():
    q, scale = w8_case(37, 24)
    packed = native.pack_w8a8(q, scale)
    blocks = (37 + 15) // 16
    assert packed.w.shape == (blocks, 24 // 4, 16, 4) and packed.n == 37
    for b in range(blocks):
        for j in range(24 // 4):
            for c in range(16):
                for t in range(4):
                    n = b * 16 + c
                    expected = int(q[n, 4 * j + t]) if n < 37 else 0
                    assert int(packed.w[b, j, c, t]) == expected
    assert torch.equal(packed.wsum[:37], q.long().sum(1).int()) and not packed.wsum[37:].any()


def test_w4_layout_two_nibbles_per_byte_as_documented():
    q, scale, zero = w4_case(20, 32, 16, asym=True)
    packed = native.pack_w4(q, scale, zero, 16)
    blocks = 2
    assert packed.w.shape == (blocks, 32 // 4, 32) and packed.sc.shape == (blocks, 2, 2, 16)
    for b in range(blocks):
        for j in range(32 // 4):
            for c in range(16):
                for t in range(2):
                    n = b * 16 + c
                    byte = int(packed.w[b, j, 2 * c + t])
                    lo = int(q[n, 4 * j + t]) + 8 if n < 20 else 0
                    hi = int(q[n, 4 * j + 2 + t]) + 8 if n < 20 else 0
                    assert (byte & 0xF, byte >> 4) == (lo, hi)
        for g in range(2):
            for c in range(16):
                n = b * 16 + c
                if n < 20:
                    s = float(scale[n, g])
                    assert float(packed.sc[b, g, 0, c]) == pytest.approx(s, rel=1e-7)
                    assert float(packed.sc[b, g, 1, c]) == pytest.approx(s * (136 + int(zero[n, g])), rel=1e-6)


def test_pack_refuses_what_the_kernels_cannot_take():
    q, scale = w8_case(16, 18)
    assert native.pack_w8a8(q, scale) is None  # in % 4
    q4, s4, _ = w4_case(16, 40, None, False)
    assert native.pack_w4(q4, s4, None, None) is None  # per channel, 40 % 16
    q4, s4, _ = w4_case(16, 64, 8, False)
    assert native.pack_w4(q4, s4, None, 8) is None  # group 8
    q5 = torch.full((16, 64), 9, dtype=torch.int8)
    assert native.pack_w4(q5, torch.ones(16, 1), None, None) is None  # beyond 4 bits


# --- W8A8 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,k,tokens", [(16, 64, 1), (37, 20, 3), (5, 4, 2), (130, 96, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_w8a8_gemv_is_the_exact_integer_dot_product(n, k, tokens, bias):
    q, scale = w8_case(n, k)
    b = torch.randn(n) if bias else None
    x = x_case(tokens, k)
    got = native.w8a8_gemv(x, native.pack_w8a8(q, scale), b)
    ref, mag = slow_w8a8(QuantLinear.from_quantized(q, scale, None, 8, None, b, "int8"), x)
    assert got.shape == (tokens, n) and got.dtype == torch.float32
    assert ((got.double() - ref).abs() <= 1e-6 * mag + 1e-30).all()


@pytest.mark.parametrize("gemm", ["onednn", "int_mm", "fp32"])
def test_w8a8_gemv_same_floats_as_the_gemm_paths(gemm):
    """The module switches kernels by token count; a row's output must not change with it."""
    q, scale = w8_case(64, 128)
    b = torch.randn(64)
    x = x_case(6, 128) * torch.logspace(-2, 2, 6)[:, None]
    candidate = kernels.CANDIDATES["w8a8"][gemm]
    batch = candidate.run(x, candidate.pack(q, scale, None), b)
    for i in range(6):
        assert torch.equal(native.w8a8_gemv(x[i:i + 1], native.pack_w8a8(q, scale), b)[0], batch[i])


@pytest.mark.parametrize("rows,k", [(1, 4), (3, 20), (70, 384), (5, 1537), (0, 16)])
def test_fused_per_token_quantization_gives_the_eager_integers_and_scales(rows, k):
    x = x_case(rows, k) * torch.logspace(-3, 3, max(rows, 1))[:rows, None]
    if rows > 2:
        x[1] = 0.0  # an all-zero row takes the 1e-12 floor
        x[2] = torch.arange(k) % 9 - 4.5  # scale exactly 1.0 below: exact halves, ties round to even
        x[2, 0] = 127.0
    q, scale = native.quantize_per_token(x)
    ref_q, ref_scale = kernels.quantize_per_token(x)
    assert q.dtype == torch.int8 and scale.shape == (rows, 1)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)


@pytest.mark.parametrize("n", [1, 16, 37, 1536])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_epilogue_gives_the_floats_of_addcmul(n, bias):
    y, xs = torch.randn(9, n) * 1e3, torch.rand(9, 1) * 1e-2
    b = torch.randn(n) if bias else None
    ref = torch.addcmul(b, y, xs) if bias else y * xs
    assert torch.equal(native.w8a8_epilogue(y, xs, b), ref)


@pytest.mark.parametrize("n", [16, 37, 1536])
@pytest.mark.parametrize("bias", [True, False])
def test_every_pass_reads_int32_products_with_their_weight_scales_as_the_float_products(n, bias):
    """torch._int_mm's int32 products plus the weight scales give each native pass exactly the
    floats it gets from torch.mul(products, scales), the separate pass the int32 form saves."""
    g = torch.Generator().manual_seed(n)
    rows = 32
    y = torch.randint(-2**22, 2**22, (rows, 3 * n if n % 16 == 0 else n), generator=g, dtype=torch.int32)
    ws = torch.rand(y.shape[1], generator=g) * 1e-4
    xs = torch.rand(rows, 1, generator=g) * 1e-2
    b = torch.randn(y.shape[1], generator=g) if bias else None
    yf = torch.mul(y, ws)
    assert torch.equal(native.w8a8_epilogue(y, xs, b, ws), native.w8a8_epilogue(yf, xs, b))
    for got, ref in zip(native.w8a8_gelu_quantize(y, xs, b, ws), native.w8a8_gelu_quantize(yf, xs, b)):
        assert torch.equal(got, ref)
    norm = torch.nn.LayerNorm(y.shape[1])
    residual = torch.randn(rows, y.shape[1], generator=g)
    for got, ref in zip(native.w8a8_residual_layernorm(y, xs, b, residual, norm, True, ws),
                        native.w8a8_residual_layernorm(yf, xs, b, residual, norm, True)):
        assert torch.equal(got, ref)
    if n % 16 == 0:  # head_dim 16, n / 16 heads, 4 sequences of 8
        heads = n // 16
        mask = torch.ones(4, 1, 8, 8, dtype=torch.bool)
        mask[1, ..., 5:] = False
        assert torch.equal(native.w8a8_encoder_attention(y, xs, b, mask, 4, heads, 0.25, ws),
                           native.w8a8_encoder_attention(yf, xs, b, mask, 4, heads, 0.25))
    with pytest.raises(RuntimeError, match="weight scales"):
        native.w8a8_epilogue(y, xs, b)


@pytest.mark.parametrize("gemm", ["onednn", "int_mm", "fp32"])
@pytest.mark.parametrize("k", [384, 2500])  # 2500 > kernels.EXACT_K: the float32 GEMM in three exact slices
def test_many_token_w8a8_is_the_exact_integer_dot_product_with_the_fused_passes(gemm, k):
    q, scale = w8_case(96, k)
    b = torch.randn(96)
    x = x_case(40, k) * torch.logspace(-2, 2, 40)[:, None]
    layer = QuantLinear.from_quantized(q, scale, None, 8, None, b, "int8")
    candidate = kernels.CANDIDATES["w8a8"][gemm]
    got = candidate.run(x, candidate.pack(q, scale, None), b)
    ref, mag = slow_w8a8(layer, x)
    assert ((got.double() - ref).abs() <= 1e-6 * mag + 1e-30).all()
    if gemm != "int_mm":  # the exact integers: the same floats as torch._int_mm
        xq, _ = kernels.quantize_per_token(x)
        int_mm = kernels.pack_int_mm(q, scale, None)
        assert torch.equal(kernels.w8a8_gemm(xq, candidate.pack(q, scale, None)), kernels.w8a8_gemm(xq, int_mm))


# --- W4A16 ------------------------------------------------------------------------------------------

def slow_w4(x: torch.Tensor, q, scale, zero, group):
    n, k = q.shape
    g = group or k
    zp = torch.zeros_like(scale) if zero is None else zero.double()
    w = torch.empty(n, k, dtype=torch.float64)
    for i in range(n):
        for j in range(k):
            w[i, j] = (int(q[i, j]) - float(zp[i, j // g])) * float(scale[i, j // g])
    xb = x.bfloat16().double()
    return xb @ w.T, xb.abs() @ (w.abs() + (136 + zp.abs().max()) * scale.double().max()).T


@pytest.mark.parametrize("n,k,group,tokens", [(16, 64, None, 1), (37, 48, 16, 3), (20, 128, 32, 2), (64, 256, 128, 1)])
@pytest.mark.parametrize("asym", [False, True])
def test_w4_gemv_matches_the_dequantized_product(n, k, group, tokens, asym):
    q, scale, zero = w4_case(n, k, group, asym)
    b = torch.randn(n)
    x = x_case(tokens, k)
    packed = native.pack_w4(q, scale, zero, group)
    got = native.w4_gemv(x, packed, b)
    ref, mag = slow_w4(x, q, scale, zero, group)
    assert got.shape == (tokens, n) and got.dtype == torch.float32
    assert ((got.double() - ref - b.double()).abs() <= 1e-5 * mag).all()
    assert torch.equal(native.w4_gemv(x.bfloat16(), packed, b), got)  # bf16 input: the same rounding


def test_kernels_are_deterministic_across_threads_and_handle_no_tokens():
    q, scale = w8_case(300, 256)
    q4, s4, z4 = w4_case(300, 256, 64, True)
    p8, p4 = native.pack_w8a8(q, scale), native.pack_w4(q4, s4, z4, 64)
    x = x_case(2, 256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.w8a8_gemv(x, p8, None), native.w4_gemv(x, p4, None)
        torch.set_num_threads(2)
        two = native.w8a8_gemv(x, p8, None), native.w4_gemv(x, p4, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert native.w8a8_gemv(x[:0], p8, None).shape == (0, 300)
    assert native.w4_gemv(x[:0], p4, None).shape == (0, 300)


def test_shape_errors_are_clear():
    q, scale = w8_case(16, 64)
    with pytest.raises(RuntimeError, match="x has 32 inputs, the weight 64"):
        native.w8a8_gemv(torch.randn(1, 32), native.pack_w8a8(q, scale), None)
    q4, s4, _ = w4_case(16, 64, None, False)
    with pytest.raises(RuntimeError, match="bias must have n entries"):
        native.w4_gemv(torch.randn(1, 64), native.pack_w4(q4, s4, None, None), torch.randn(3))


def test_ops_compile_as_opaque_calls():
    q, scale = w8_case(32, 64)
    q4, s4, _ = w4_case(32, 64, 32, False)
    p8, p4 = native.pack_w8a8(q, scale), native.pack_w4(q4, s4, None, 32)

    def f(x):
        return native.w4_gemv(torch.relu(native.w8a8_gemv(x, p8, None)).repeat(1, 2), p4, None) * 2

    x = x_case(1, 64)
    assert torch.allclose(torch.compile(f, fullgraph=True)(x), f(x))


def test_a_failed_build_is_a_visible_warning_naming_what_falls_back(monkeypatch, caplog):
    import logging

    def broken():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(native, "_build", broken)
    monkeypatch.setattr(torch.ops, "secateur", type("NoOps", (), {})())  # as before any build
    with caplog.at_level(logging.WARNING, logger="secateur.runtime.native"):
        assert native.available.__wrapped__() is False  # the check itself, not this process's cached answer
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "no compiler here" in message and "fall back" in message and "sdpa" in message
