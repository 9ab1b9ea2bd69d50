"""QuantLinear's low-precision kernels (secateur.runtime.kernels) against slow references.

Every candidate of every operation (``dispatch.OPS``) is forced in turn and checked; one that cannot
run on this machine or take the weight is skipped. W8A8 is checked against an explicit per-token loop that reproduces the activation rounding, with
exact integer dot products: the kernel may differ only by float rounding. The weight-only kernels
compute in bfloat16 and are checked against ``x @ dequantized_weight.T + bias`` in float64 with a
bound derived from bf16 rounding (see ``bf16_bound``).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from secateur.errors import SecateurError
from secateur.runtime import dispatch, kernels, native
from secateur.runtime.linear import QuantLinear, reference_only
from secateur.quant.primitives import quantize_activations_per_token

IN, OUT = 256, 64
TOKENS = (1, 3, 17)  # 17 > kernels.FEW_TOKENS: past secateur's GEMVs
GROUPS = (32, 64, 128, None)


@pytest.fixture(params=["native", "torch"])
def backend(request, monkeypatch):
    """Every kernel test runs twice: with secateur's own few-token GEMV kernels (runtime/native.py)
    and with torch's kernels only (as on a machine where the C++ file cannot be built)."""
    if request.param == "native":
        if not native.available():
            pytest.skip("secateur's native kernels are not built on this machine")
    else:
        monkeypatch.setattr(native, "available", lambda: False)
    return request.param


@contextlib.contextmanager
def forcing(module: QuantLinear, name: str, tokens: int):
    """Run ``module`` with kernel ``name`` forced; skip where it cannot take the weight here."""
    with dispatch.forced({module.op: name}):
        if module.kernel_for(tokens) != name:
            pytest.skip(f"{name} cannot run this {module.op} weight at {tokens} tokens on this machine")
        yield


def make(bits: int, group: int | None, activation: str | None = None, *, asym: bool = False, bias: bool = True,
         out: int = OUT, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    groups = IN // group if group else 1
    q = torch.randint(lo, hi + 1, (out, IN), generator=g, dtype=torch.int8)
    scale = torch.rand(out, groups, generator=g) * 0.02 + 0.001
    zero = torch.randint(lo, hi + 1, (out, groups), generator=g, dtype=torch.int8) if asym else None
    b = torch.randn(out, generator=g) if bias else None
    return QuantLinear.from_quantized(q, scale, zero, bits, group, b, activation)


def inputs(tokens: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(tokens, IN, generator=torch.Generator().manual_seed(seed))
    x[0, :5] = 0.0  # some exact zeros and a ...
    x[-1, 7] = 4.0  # ... larger value per row
    return x


def run(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module(x)


def slow_w8a8(module: QuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row by row: scale = max|x_row| / 127 (fp32, at least 1e-12), q = round(x_row / scale),
    integer dot products with q_w - zp (int64, exact), then * x_scale * w_scale + bias in float64.
    Returns (reference, magnitude) where magnitude bounds the size of every term."""
    wq = (module.weight_q.long() - module.weight_zero_point.long())  # [out, in], per-channel zero points
    ws = module.weight_scale.double().reshape(-1)
    bias = torch.zeros(module.out_features, dtype=torch.float64) if module.bias is None else module.bias.double()
    rows, mags = [], []
    for row in x.float():
        s = (row.abs().max() / 127).clamp_min(1e-12)
        q = torch.round(row / s).long()
        acc = (q * wq).sum(-1)  # exact
        rows.append(acc.double() * s.double() * ws + bias)
        mags.append((q.abs() * wq.abs()).sum(-1).double() * s.double() * ws + bias.abs())
    return torch.stack(rows), torch.stack(mags)


def bf16_bound(module: QuantLinear, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Error bound of the bf16 kernels. Each of x, scale and -zp*scale is rounded to bf16 (relative
    2^-9 each), the many-token path also rounds q*scale and its sum with the zero (2^-9 each), the
    accumulation is fp32 (negligible here) and the output is rounded to bf16 (2^-9 of |y|). So
    |y - ref| <= 2^-7 * sum_k |x_k| (|q_k| + |zp|) s + 2^-8 |ref| (first order, with margin)."""
    s = module.weight_scale.double()
    out, groups = s.shape
    mag = (module.weight_q.double().abs().view(out, groups, -1) + module.weight_zero_point.double().abs()[..., None])
    mag = (mag * s[..., None]).view(out, -1)
    return 2.0 ** -7 * (x.double().abs() @ mag.T) + 2.0 ** -8 * ref.abs()


def reference(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    out = x.double() @ module.dequantized_weight(torch.float64).T
    return out if module.bias is None else out + module.bias.double()


# --- W8A8 ---------------------------------------------------------------------------------------

def test_per_token_quantization_matches_primitives_and_is_row_wise():
    x = torch.randn(17, IN) * torch.logspace(-3, 2, 17)[:, None]
    x[4] = 0.0
    q, s = kernels.quantize_per_token(x)
    q_ref, s_ref = quantize_activations_per_token(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    for i in range(17):  # a row's integers do not depend on the other rows
        qi, si = kernels.quantize_per_token(x[i:i + 1])
        assert torch.equal(qi[0], q[i]) and torch.equal(si[0], s[i])


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bits,asym", [(8, False), (8, True), (4, True)], ids=["w8", "w8-asym", "w4-asym"])
@pytest.mark.parametrize("kernel", dispatch.OPS["w8a8"])
def test_w8a8_matches_the_per_token_loop(tokens, bias, bits, asym, kernel, backend):
    module = make(bits, None, "int8", asym=asym, bias=bias)
    assert module.kernel == "w8a8"
    x = inputs(tokens)
    with forcing(module, kernel, tokens):
        got = run(module, x)
    ref, magnitude = slow_w8a8(module, x)
    # the integers and their dot products are exact (int32); what is left is float32 rounding of
    # acc * w_scale (the op), of the zero-point correction (asymmetric 8-bit), and of * x_scale +
    # bias (one fused addcmul): a few ulps of the largest term, 1e-6 ~ 17 * 2^-24
    assert got.dtype == torch.float32
    assert ((got.double() - ref).abs() <= 1e-6 * magnitude + 1e-30).all()
    with reference_only():  # the reference path runs the same integers
        assert ((run(module, x).double() - ref).abs() <= 1e-6 * magnitude + 1e-30).all()


@pytest.mark.parametrize("kernel", ["onednn", "int_mm", "fp32", None])
def test_w8a8_rows_do_not_depend_on_the_batch(kernel, backend):
    """Whatever kernel a bucket gets (forced, or measured: None), a row's output is the same alone
    or among 16 others: the GEMMs and the few-token GEMV give the same floats."""
    module = make(8, None, "int8")
    with dispatch.forced({"w8a8": kernel} if kernel else {}):
        if kernel and module.kernel_for(17) != kernel:
            pytest.skip(f"{kernel} cannot run here")
        _rows_alone_and_together(module)


def _rows_alone_and_together(module):
    x = inputs(17) * torch.logspace(-2, 2, 17)[:, None]  # very different row ranges
    batch = run(module, x)
    for i in range(17):
        assert torch.equal(run(module, x[i:i + 1])[0], batch[i])
    three_d = run(module, x[:15].reshape(3, 5, IN))
    assert three_d.shape == (3, 5, OUT) and torch.equal(three_d.reshape(15, OUT), batch[:15])


def test_w8a8_needs_per_channel_scales():
    with pytest.raises(SecateurError, match="per-channel"):
        make(8, 64, "int8")


# --- weight-only --------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("group", GROUPS, ids=lambda g: f"g{g}" if g else "channel")
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("kernel", dispatch.OPS["w4a16"])
def test_w4a16_matches_the_reference_up_to_bf16(tokens, group, asym, kernel, backend):
    module = make(4, group, asym=asym, bias=tokens != 3)
    assert module.kernel == "w4a16"
    x = inputs(tokens)
    with forcing(module, kernel, tokens):
        got = run(module, x)
    ref = reference(module, x)
    assert got.dtype == torch.float32 and got.shape == (tokens, OUT)
    if kernel == "fp32":
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5)
    else:
        assert ((got.double() - ref).abs() <= bf16_bound(module, x, ref)).all()
        assert (got.double() - ref).abs().max() > 0  # it did run in bf16


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kernel", dispatch.OPS["w8a16"])
def test_w8a16_matches_the_reference_up_to_bf16(tokens, bias, kernel):
    module = make(8, None, bias=bias)
    assert module.kernel == "w8a16"
    x = inputs(tokens)
    ref = reference(module, x)
    with forcing(module, kernel, tokens):
        got = run(module, x)
    assert ((got.double() - ref).abs() <= bf16_bound(module, x, ref)).all()


def test_int4_kernel_convention_alone():
    """(q - zp) * s == (u - 8) * s + z with u = q + 8, z = -zp * s, scales_and_zeros [groups, out, 2]."""
    module = make(4, 64, asym=True, bias=False)
    packed = kernels.pack_int4(module.weight_q, module.weight_scale, module.weight_zero_point, 64)
    assert packed.group == 64 and packed.scales_and_zeros.shape == (IN // 64, OUT, 2)
    sz = packed.scales_and_zeros.float()
    assert torch.equal(sz[..., 0].T, module.weight_scale.to(torch.bfloat16).float())
    assert torch.equal(sz[..., 1].T, (-module.weight_zero_point.float() * module.weight_scale).bfloat16().float())
    x = inputs(1)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed.packed, 64, packed.scales_and_zeros)
    ref = reference(module, x)
    assert ((got.double() - ref).abs() <= bf16_bound(module, x, ref)).all()


@pytest.mark.parametrize("bits,group,out", [(4, 16, OUT), (4, 64, 40), (8, 64, OUT)],
                         ids=["w4-g16", "w4-out40", "w8-grouped"])
def test_shapes_some_kernels_cannot_take_fall_back_to_one_that_can(bits, group, out, backend):
    """torch's int4 op needs 16 | out and groups of 32+, its int8 op per-channel scales; secateur's
    GEMV takes any out and groups of 16+. Forcing a kernel that cannot take the weight falls back to
    the measured choice among those that can; every token count still gets a correct answer."""
    module = make(bits, group, out=out)
    refused = "int4pack" if bits == 4 else "int8pack"
    assert module.packed(refused) is None
    with dispatch.forced({module.op: refused}):
        for tokens in (1, 3, kernels.SMALL_BATCH + 1):
            x = inputs(tokens)
            assert module.kernel_for(tokens) != refused
            ref = reference(module, x)
            assert ((run(module, x).double() - ref).abs() <= bf16_bound(module, x, ref)).all()
    if backend == "native" and bits == 4:
        assert module.packed("gemv") is not None


def test_bf16_input_gives_bf16_output(backend):
    for module in (make(4, 128), make(8, None), make(8, None, "int8")):
        x = inputs(3).bfloat16()
        got = run(module, x)
        ref = reference(module, x.float())
        assert got.dtype == torch.bfloat16
        assert ((got.double() - ref).abs() <= 2 * bf16_bound(module, x.float(), ref) + 0.01 * ref.abs()).all()


# --- the module ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group,activation", [(8, None, "int8"), (4, 64, None), (8, None, None)])
def test_state_dict_round_trip_holds_only_the_integers(bits, group, activation):
    module = make(bits, group, activation, asym=True)
    x = inputs(3)
    before = run(module, x)  # kernel prepared and cached
    state = module.state_dict()
    assert set(state) == {"weight_q", "weight_scale", "weight_zero_point", "bias"}
    assert state["weight_q"].dtype == torch.int8 and state["weight_zero_point"].dtype == torch.int8
    fresh = QuantLinear(IN, OUT, bits, group, activation, bias=True)
    fresh.load_state_dict(state)
    assert torch.equal(run(fresh, x), before)
    no_bias = make(bits, group, activation, bias=False)
    assert set(no_bias.state_dict()) == {"weight_q", "weight_scale", "weight_zero_point"}
    # loading new integers into a module whose kernel is cached repacks them
    other = make(bits, group, activation, asym=True, seed=5)
    module.load_state_dict(other.state_dict())
    assert torch.equal(run(module, x), run(other, x))
    assert torch.equal(run(copy.deepcopy(module), x), run(other, x))


def test_reference_switches_and_repr():
    module = make(4, 128)
    x = inputs(3)
    with dispatch.forced({"w4a16": "dequant_bf16"}):
        fast = run(module, x)
    with reference_only():
        assert module.kernel == "reference"
        slow = run(module, x)
    module.use_kernels = False
    assert torch.equal(run(module, x), slow) and not torch.equal(fast, slow)
    assert torch.allclose(slow.double(), reference(module, x), rtol=1e-5, atol=1e-6)
    assert "bits=4, group_size=128, activation=None" in repr(module)
    assert "per-channel, activation=int8" in repr(make(8, None, "int8"))


def test_from_quantized_checks_its_inputs():
    q = torch.zeros(OUT, IN, dtype=torch.int8)
    with pytest.raises(SecateurError, match="lie in"):
        QuantLinear.from_quantized(q + 8, torch.ones(OUT, 1), None, 4, None)
    with pytest.raises(SecateurError, match="scale must be"):
        QuantLinear.from_quantized(q, torch.ones(OUT, 2), None, 4, None)
    with pytest.raises(SecateurError, match="does not divide"):
        QuantLinear.from_quantized(q, torch.ones(OUT, 1), None, 4, 100)
    with pytest.raises(SecateurError, match="activation"):
        QuantLinear.from_quantized(q, torch.ones(OUT, 1), None, 8, None, activation="int4")


def test_reference_only_in_one_thread_never_switches_another():
    """reference_only is a context variable: a thread inside it gets the reference path while
    another thread, running at the same moment, keeps its kernels (a threaded server's requests)."""
    import threading

    module = make(4, 128)
    x = inputs(3)
    with dispatch.forced({"w4a16": "dequant_bf16"}):  # a bf16 kernel: its output differs from the reference
        fast = run(module, x)
        with reference_only():
            slow = run(module, x)
        assert not torch.equal(fast, slow)
        inside, done = threading.Event(), threading.Event()
        got = {}

        def switched():
            with reference_only():
                inside.set()
                done.wait(10)  # stays inside while the other thread runs
                got["switched"] = run(module, x)

        def plain():
            inside.wait(10)
            got["plain"] = run(module, x)
            done.set()

        threads = [threading.Thread(target=switched), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    assert torch.equal(got["plain"], fast) and torch.equal(got["switched"], slow)
