"""quant/fakequant.py (quantization-aware training) against element-by-element references written
here, and its whole-model lifecycle on the tiny Llama: prepare -> train -> convert -> save/load."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import secateur
from secateur.errors import SecateurError
from secateur.quant import rtn
from secateur.quant.common import to_quant_linear
from secateur.quant.fakequant import (MIN_SCALE, FakeQuantLinear, convert_qat, fake_quant_modules,
                                      fake_quantize_per_token, prepare_qat)
from secateur.runtime.linear import QuantLinear, reference_only
from secateur.quant.primitives import Scheme, mse_params, quantize_weight
from secateur.testing import tiny_model

STRATEGIES = ["tensor", "channel", "group"]
GROUP = 4
f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731


def qrange(bits):
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def cell(r, c, strategy):
    """Index of the scale that weight element (r, c) uses."""
    return (0, 0) if strategy == "tensor" else (r, 0) if strategy == "channel" else (r, c // GROUP)


def slow_params(w, bits, symmetric, strategy):
    """Min-max scale and zero point of every cell, from its values one by one (float32 arithmetic)."""
    qmin, qmax = qrange(bits)
    rows, cols = w.shape
    shape = (1, 1) if strategy == "tensor" else (rows, 1) if strategy == "channel" else (rows, cols // GROUP)
    members: dict = {}
    for r in range(rows):
        for c in range(cols):
            members.setdefault(cell(r, c, strategy), []).append(float(w[r, c]))
    scale, zero = torch.zeros(shape), torch.zeros(shape, dtype=torch.int8)
    for (i, j), vals in members.items():
        lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
        if symmetric:
            s, z = f32(max(-lo, hi)) / ((qmax - qmin) / 2), 0
        else:
            s = (f32(hi) - f32(lo)) / (qmax - qmin)
            z = min(max(int(torch.round(qmin - f32(lo) / s)), qmin), qmax)
        scale[i, j], zero[i, j] = s if s > 0 else 1.0, z
    return scale, zero


def slow_fake_quant(w, scale, zero, bits, strategy):
    """``(clamp(round(w / s) + z) - z) · s`` element by element."""
    qmin, qmax = qrange(bits)
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            s, z = scale[cell(r, c, strategy)].float(), int(zero[cell(r, c, strategy)])
            q = min(max(int(torch.round(w[r, c].float() / s)) + z, qmin), qmax)
            out[r, c] = (q - z) * s
    return out


def slow_token_quant(x):
    """Symmetric int8 per row: s = max|row| / 127, x̂ = round(x / s) · s."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        s = max(f32(max(abs(float(v)) for v in x[t])) / 127, f32(1e-12))
        for c in range(x.shape[1]):
            out[t, c] = torch.round(x[t, c] / s) * s
    return out


def linear(out=6, inp=8, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(inp, out, bias=bias)


# --- one module ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forward_is_the_elementwise_fake_quantized_linear(bits, symmetric, strategy):
    lin = linear(seed=bits)
    fq = FakeQuantLinear.from_linear(lin, Scheme(bits, symmetric, strategy, GROUP))
    scale, zero = slow_params(lin.weight.detach(), bits, symmetric, strategy)
    assert torch.equal(fq.scale.detach(), scale) and torch.equal(fq.zero_point, zero)
    x = torch.randn(3, 8)
    expected = F.linear(x, slow_fake_quant(lin.weight.detach(), scale, zero, bits, strategy), lin.bias)
    assert torch.equal(fq(x), expected)
    assert fq.weight.data_ptr() != lin.weight.data_ptr() and fq.bias.data_ptr() != lin.bias.data_ptr()


def test_mse_observer_sets_the_initial_scales():
    lin = linear(out=4, inp=16)
    scheme = Scheme(3, True, "channel", observer="mse")
    scale, zero = mse_params(lin.weight.detach(), scheme)
    fq = FakeQuantLinear.from_linear(lin, scheme)
    assert torch.equal(fq.scale.detach(), scale) and torch.equal(fq.zero_point, zero)


def test_w8a8_input_is_fake_quantized_per_token():
    lin = linear(out=6, inp=16)
    fq = FakeQuantLinear.from_linear(lin, Scheme(8, True, "channel"), activation="int8")
    x = torch.randn(5, 16) * torch.tensor([[0.01], [1.0], [30.0], [0.0], [5.0]])
    scale, zero = slow_params(lin.weight.detach(), 8, True, "channel")
    expected = F.linear(slow_token_quant(x), slow_fake_quant(lin.weight.detach(), scale, zero, 8, "channel"), lin.bias)
    assert torch.equal(fq(x), expected)
    assert torch.equal(fake_quantize_per_token(x)[2], fake_quantize_per_token(x[2:3])[0])
    other = x.clone()
    other[[0, 1, 3, 4]] = torch.randn(4, 16) * 100  # a token's output ignores the rest of the batch
    assert torch.equal(fq(other)[2], fq(x)[2])
    x.requires_grad_(True)
    fq(x).sum().backward()  # straight-through: the input gradient is that of the plain linear
    assert torch.allclose(x.grad, fq.quantized_weight().detach().sum(0).expand(5, 16), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_straight_through_and_lsq_gradients(strategy, symmetric):
    """d/dw is the plain linear's weight gradient G = gᵀx where round(w/s)+z lies in [qmin, qmax]
    (clamp's bounds included) and 0 outside; d/ds sums, over the scale's cell, G times
    round(w/s) - w/s inside and q_clamped - z outside (LSQ through fake_quantize's STE graph).
    Autograd multiplies by s then divides by s, hence a tolerance of float rounding."""
    bits = 3
    qmin, qmax = qrange(bits)
    lin = linear(seed=1)
    fq = FakeQuantLinear.from_linear(lin, Scheme(bits, symmetric, strategy, GROUP))
    with torch.no_grad():
        fq.scale.mul_(0.6)  # clip a few weights on both sides
    x, g = torch.randn(5, 8), torch.randn(5, 6)
    (fq(x) * g).sum().backward()
    G = g.t() @ x
    w, s_all, z_all = lin.weight.detach(), fq.scale.detach(), fq.zero_point
    w_grad, s_grad = torch.zeros_like(w), torch.zeros_like(s_all)
    clipped = 0
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            s, z = s_all[cell(r, c, strategy)], int(z_all[cell(r, c, strategy)])
            u = w[r, c] / s
            q = int(torch.round(u)) + z
            if qmin <= q <= qmax:
                w_grad[r, c] = G[r, c]
                s_grad[cell(r, c, strategy)] += G[r, c] * (torch.round(u) - u)
            else:
                clipped += 1
                s_grad[cell(r, c, strategy)] += G[r, c] * (min(max(q, qmin), qmax) - z)
    assert clipped > 0
    assert torch.equal(fq.weight.grad == 0, w_grad == 0)
    assert torch.allclose(fq.weight.grad, w_grad, rtol=1e-6, atol=1e-7)
    assert torch.allclose(fq.scale.grad, s_grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(fq.bias.grad, g.sum(0))


def test_learn_scales_parameter_or_buffer():
    lin = linear()
    fixed = FakeQuantLinear.from_linear(lin, Scheme(4, False, "group", GROUP), learn_scales=False)
    assert "scale" not in dict(fixed.named_parameters()) and "scale" in dict(fixed.named_buffers())
    learned = FakeQuantLinear.from_linear(lin, Scheme(4, False, "group", GROUP))
    assert "scale" in dict(learned.named_parameters()) and "zero_point" in dict(learned.named_buffers())
    assert "zero_point" not in dict(learned.named_parameters())
    before = learned.scale.detach().clone()
    opt = torch.optim.SGD(learned.parameters(), lr=0.1)
    learned(torch.randn(4, 8)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(learned.scale.detach(), before)
    assert "learn_scales=True" in repr(learned) and "group_size=4" in repr(learned)


SCHEMES = [(Scheme(4, True, "group", GROUP), None), (Scheme(3, False, "channel"), None),
           (Scheme(8, True, "tensor"), "int8"), (Scheme(8, False, "channel"), "int8")]


@pytest.mark.parametrize("scheme, activation", SCHEMES)
def test_from_quant_linear_starts_where_the_integers_are(scheme, activation):
    lin = linear(out=16, inp=16)
    q, scale, zero = quantize_weight(lin.weight.detach(), scheme)
    ql = to_quant_linear(lin, q, scale, zero, scheme, activation)
    fq = FakeQuantLinear.from_quant_linear(ql)
    assert torch.equal(fq.weight.detach(), ql.dequantized_weight()) and fq.activation == activation
    x = torch.randn(5, 16)
    with torch.no_grad(), reference_only():
        assert torch.equal(fq(x), ql(x))
    assert torch.equal(fq.to_quant_linear().weight_q, ql.weight_q)


@pytest.mark.parametrize("scheme, activation", SCHEMES)
def test_trained_module_converts_to_the_same_function(scheme, activation):
    fq = FakeQuantLinear.from_linear(linear(out=16, inp=16, seed=3), scheme, activation=activation)
    q0 = fq.to_quant_linear().weight_q
    opt = torch.optim.SGD(fq.parameters(), lr=0.05)
    torch.manual_seed(0)
    for _ in range(4):
        opt.zero_grad()
        F.mse_loss(fq(torch.randn(8, 16)), torch.randn(8, 16)).backward()
        opt.step()
    ql = fq.to_quant_linear()
    assert isinstance(ql, QuantLinear) and ql.activation == activation and not torch.equal(ql.weight_q, q0)
    x = torch.randn(7, 16)
    with torch.no_grad():
        assert torch.equal(ql.reference_forward(x), fq(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(ql.reference_forward(x), fq(x))
        assert torch.equal(ql.reference_forward(x.bfloat16()), fq(x.bfloat16()))


def test_autocast_forward_and_backward():
    fq = FakeQuantLinear.from_linear(linear(out=16, inp=16), Scheme(4, False, "group", GROUP))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fq(torch.randn(3, 16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert fq.weight.grad.dtype == torch.float32 and torch.isfinite(fq.scale.grad).all()


def test_scales_are_kept_positive():
    fq = FakeQuantLinear.from_linear(linear(), Scheme(4, True, "channel"))
    with torch.no_grad():
        fq.scale[0] = -1.0  # an optimizer step overshot
    x = torch.randn(3, 8)
    y = fq(x)
    assert torch.isfinite(y).all()
    ql = fq.to_quant_linear()
    assert float(ql.weight_scale[0, 0]) == pytest.approx(MIN_SCALE) and (ql.weight_scale > 0).all()
    assert torch.equal(ql.reference_forward(x), y.detach())


# --- whole models ----------------------------------------------------------------------------------
def logits(model, ids):
    with torch.no_grad(), reference_only():
        return model(ids).logits


@pytest.mark.parametrize("family, config", [
    ("llama", rtn.RTNConfig(bits=4, group_size=16, symmetric=False)),
    ("llama", rtn.RTNConfig(bits=8, strategy="channel", activations="int8")),
    ("gpt2", rtn.RTNConfig(bits=4, group_size=16)),  # Conv1D, transposed
])
def test_prepared_model_equals_rtn_before_training(family, config):
    model = tiny_model(family)
    ids = torch.randint(3, 100, (2, 10))
    dense = logits(model, ids)
    reference = copy.deepcopy(model)
    rtn.apply(reference, config)
    new = prepare_qat(model, config)
    assert set(new) == {n for n, m in reference.named_modules() if isinstance(m, QuantLinear)}
    assert fake_quant_modules(model) == new
    assert not torch.allclose(logits(model, ids), dense)
    assert torch.equal(logits(model, ids), logits(reference, ids))


@pytest.mark.parametrize("already", [["re:mlp\\."], ["Linear"]])
def test_prepare_from_quantized_layers(already):
    """A model whose layers are (partly) QuantLinears (a GPTQ artifact, here RTN) starts from them."""
    config = rtn.RTNConfig(bits=4, group_size=16)
    model = tiny_model("llama")
    rtn.apply(model, rtn.RTNConfig(bits=4, group_size=16, targets=already))
    reference = tiny_model("llama")
    rtn.apply(reference, config)
    new = prepare_qat(model, config)
    assert len(new) == 14 and not any(isinstance(m, QuantLinear) for m in model.modules())
    ids = torch.randint(3, 100, (2, 10))
    assert torch.equal(logits(model, ids), logits(reference, ids))


def test_train_convert_save_load(tmp_path):
    model = tiny_model("llama")
    config = rtn.RTNConfig(bits=4, group_size=16, symmetric=False)
    new = prepare_qat(model, config)
    scales = {n: m.scale.detach().clone() for n, m in new.items()}
    ids = torch.randint(3, 100, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final = float(model(ids, labels=ids).loss)
        trained = model(ids).logits
    w = new["model.layers.0.mlp.down_proj"].weight.detach().clone()
    assert final < losses[0]
    assert any(not torch.equal(m.scale.detach(), scales[n]) for n, m in new.items())
    layers = convert_qat(model)
    assert set(layers) == set(new) and not fake_quant_modules(model)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in new)
    row = layers["model.layers.0.mlp.down_proj"]
    deq = model.get_submodule("model.layers.0.mlp.down_proj").dequantized_weight()
    assert row["bits"] == 4 and row["strategy"] == "group"
    assert row["relative_weight_error"] == pytest.approx(float(((deq - w) ** 2).sum() / (w ** 2).sum()), abs=1e-8)
    assert torch.equal(logits(model, ids), trained)
    path = secateur.save(model, tmp_path / "artifact")
    assert torch.equal(logits(secateur.load(path).model, ids), trained)


# --- bad input -------------------------------------------------------------------------------------
def one_line_error(call, match):
    with pytest.raises(SecateurError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_bad_input_is_one_clear_error():
    model = tiny_model("llama")
    one_line_error(lambda: prepare_qat(model, rtn.RTNConfig(targets=["model.embed_tokens"])), "supports Linear")
    one_line_error(lambda: prepare_qat(model, rtn.RTNConfig(group_size=24, fallback=False)), "does not divide")
    one_line_error(lambda: prepare_qat(model, rtn.RTNConfig(targets=["re:nothing_here"])), r"targets\[0\]")
    assert not fake_quant_modules(model)  # every check runs before the first replacement
    prepare_qat(model, rtn.RTNConfig(group_size=16))
    one_line_error(lambda: prepare_qat(model, rtn.RTNConfig(targets=["model.layers.0.mlp.up_proj"])), "already")
    quantized = tiny_model("llama")  # a pattern naming only QuantLinears is fine, the next one is still checked
    rtn.apply(quantized, rtn.RTNConfig(group_size=16))
    one_line_error(lambda: prepare_qat(quantized, rtn.RTNConfig(targets=["Linear", "re:nothing"])), r"^targets\[1\]")
    one_line_error(lambda: FakeQuantLinear.from_linear(linear(), Scheme(8, True, "channel"), activation="int4"),
                   "activation must be")
    one_line_error(lambda: FakeQuantLinear.from_linear(linear(), Scheme(8, True, "group", 4), activation="int8"),
                   "W8A8")
    one_line_error(lambda: FakeQuantLinear.from_linear(linear(), Scheme(4, True, "group", 3)), "does not divide")
    one_line_error(lambda: FakeQuantLinear.from_quant_linear(linear()), "takes a QuantLinear")
