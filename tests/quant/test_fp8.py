"""FP8 against a slow reference: per-token FP8 casts of the activations, then a float product."""

from __future__ import annotations

import pytest
import torch

from secateur import compress_
from secateur.quant.fp8 import FP8Config
from secateur.runtime.fp8_linear import FP8Linear
from secateur.testing import tiny_model


def reference(x, layer):
    """Token by token: cast x to FP8 with its own scale, multiply in float64 by the FP8 weight."""
    fmax = torch.finfo(layer.weight_fp8.dtype).max
    w = layer.weight_fp8.double() * layer.weight_scale.double()
    rows = []
    for t in x.reshape(-1, x.shape[-1]):
        s = max(float(t.abs().max()) / fmax, 1e-12)
        t8 = (t.float() / s).clamp(-fmax, fmax).to(layer.weight_fp8.dtype).double() * s
        y = t8 @ w.t()
        rows.append(y + (layer.bias.double() if layer.bias is not None else 0))
    return torch.stack(rows).reshape(*x.shape[:-1], -1).float()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_fp8_linear_matches_reference_and_is_batch_independent(fmt, strategy):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 24)
    model = torch.nn.Sequential(lin)
    compress_(model, FP8Config(format=fmt, strategy=strategy, targets=("Linear",), ignore=()))
    layer = model[0]
    assert isinstance(layer, FP8Linear)
    x = torch.randn(5, 32) * torch.tensor([1.0, 10, 0.1, 1, 3]).unsqueeze(1)
    y = layer(x)
    assert torch.allclose(y, reference(x, layer), rtol=1e-4, atol=1e-4)
    assert torch.equal(layer(x[2:3]), y[2:3])


def test_fp8_model_quality_and_weight_only():
    model = tiny_model("llama")
    ids = torch.randint(7, 128, (2, 16))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    compress_(model, FP8Config())
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - dense).abs().max() < 0.1 * dense.abs().max()
    assert sum(isinstance(m, FP8Linear) for m in model.modules()) == 14


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_reference_path_is_per_token_fake_quant_then_linear(fmt, strategy):
    """Inside reference_only(): the input cast to FP8 per token and back, then F.linear with the
    dequantized weight (what stock transformers runs); the FP8 GEMM differs by float rounding."""
    from secateur.runtime.linear import reference_only

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 24))
    compress_(model, FP8Config(format=fmt, strategy=strategy, targets=("Linear",), ignore=()))
    layer = model[0]
    assert layer.strategy == strategy
    x = torch.randn(2, 5, 32) * torch.tensor([1.0, 10, 0.1, 1, 3]).reshape(1, 5, 1)
    fmax = torch.finfo(layer.weight_fp8.dtype).max
    s = x.abs().amax(-1, keepdim=True) / fmax
    xq = (x / s).clamp(-fmax, fmax).to(layer.weight_fp8.dtype).float() * s
    expected = torch.nn.functional.linear(xq, layer.weight_fp8.float() * layer.weight_scale, layer.bias)
    with reference_only():
        got = layer(x)
    assert torch.equal(got, expected)
    assert torch.allclose(layer(x), got, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got, reference(x, layer), rtol=1e-4, atol=1e-4)
    layer.activations = None  # weight-only: the same path either way
    with reference_only():
        assert torch.equal(layer(x), layer.reference_forward(x))
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias))


def test_reference_path_is_compressed_tensors_forward():
    """The very functions stock transformers calls: compute_dynamic_scales_and_zp + fake_quantize
    on the input (3-D, per token), decompression of the float-quantized weight, then F.linear."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    from secateur.runtime.linear import reference_only

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(48, 16))
    compress_(model, FP8Config(targets=("Linear",), ignore=()))
    layer = model[0]
    x = torch.randn(3, 7, 48) * 5
    a = QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True)
    w = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
    scale, zero = compute_dynamic_scales_and_zp(x, a, layer)
    weight = dequantize(layer.weight_fp8, layer.weight_scale, None, w)
    expected = torch.nn.functional.linear(fake_quantize(x, scale, zero, a), weight, layer.bias)
    with reference_only():
        assert torch.equal(layer(x), expected)


def test_strategy_is_inferred_when_unknown():
    from secateur.artifacts import compressed_tensors as formats

    torch.manual_seed(2)
    w8 = (torch.randn(4, 8) * 10).to(torch.float8_e4m3fn)
    per_tensor = FP8Linear(w8, torch.full((4, 1), 0.5), None, "fp8")
    per_row = FP8Linear(w8, torch.tensor([0.5, 0.25, 1.0, 2.0]), None, None)
    assert per_tensor.strategy is None
    assert formats.scheme_of(per_tensor)["strategy"] == "tensor"
    assert formats.scheme_of(per_row)["strategy"] == "channel"
    assert formats.scheme_of(per_row)["activations"] is None and formats.scheme_of(per_row)["fp8_format"] == "e4m3"
