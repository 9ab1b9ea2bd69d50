"""Compiled decoding (static KV cache + torch.compile): the same tokens as eager greedy decoding,
QuantLinear kernels included, and clear errors for what it cannot time.

The reference is :func:`secateur.evaluate.speed.greedy_decode` (eager, dynamic cache), itself tested
against ``model.generate(do_sample=False)``. Compilation uses Inductor's default mode here (the
benchmarks use max-autotune; it is slower to compile and chooses between kernels, not semantics).
"""

from __future__ import annotations

import pytest
import torch

from secateur.errors import SecateurError
from secateur.evaluate.compiled import CompiledLM
from secateur.evaluate.speed import greedy_decode, speed
from secateur.testing import tiny_model


def _quantize_all(model, bits, group, activation):
    from secateur.quant.linear import QuantLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear):
            w = module.weight.detach()
            out, cols = w.shape
            g = group or cols
            qmax = 2 ** (bits - 1) - 1
            scale = (w.reshape(out, -1, g).abs().amax(-1) / qmax).clamp_min(1e-8)
            q = torch.round(w.reshape(out, -1, g) / scale.unsqueeze(-1)).clamp(-qmax - 1, qmax).to(torch.int8)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    QuantLinear.from_quantized(q.reshape(out, cols), scale, None, bits, group, module.bias, activation))
    return model


@pytest.mark.parametrize("variant", ["fp32", "W4A16", "W8A8"])
def test_compiled_greedy_matches_eager(variant):
    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    if variant == "W4A16":
        _quantize_all(model, 4, 32, None)
    elif variant == "W8A8":
        _quantize_all(model, 8, None, "int8")
    prompt = torch.randint(0, model.config.vocab_size, (1, 12))
    eager, _, _ = greedy_decode(model, prompt, 10)
    compiled = CompiledLM(model, 12 + 10, mode=None)
    tokens, prefill, steps = compiled.greedy(prompt, 10)
    assert prefill > 0 and len(steps) == 10
    assert torch.equal(tokens, eager), (tokens, eager)
    again, _, _ = compiled.greedy(prompt, 10)  # the cache is reset between runs
    assert torch.equal(again, eager)
    with pytest.raises(SecateurError, match="exceed the static cache"):
        compiled(prompt, 15)


def test_speed_compile_errors_and_settings():
    model = tiny_model("llama")
    with pytest.raises(SecateurError, match="batch 1"):
        speed(model, batch=2, prompt_len=8, new_tokens=2, compile=True)
    with pytest.raises(SecateurError, match="warm-up"):
        speed(model, prompt_len=8, new_tokens=2, warmup=0, compile=True)
    with pytest.raises(SecateurError, match="causal LM"):
        speed(tiny_model("bert"), prompt_len=8, compile=True)
