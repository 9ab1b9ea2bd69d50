"""Compiled decoding (static KV cache + torch.compile): the same tokens as eager greedy decoding,
QuantLinear kernels included, and clear errors for what it cannot time.

The reference is :func:`secateur.evaluate.speed.greedy_decode` (eager, dynamic cache), itself tested
against ``model.generate(do_sample=False)``. Compilation uses Inductor's default mode here (the
benchmarks use max-autotune; it is slower to compile and chooses between kernels, not semantics).
"""

from __future__ import annotations

import pytest
import torch

import secateur
from secateur.errors import SecateurError
from secateur.runtime.compiled import CompiledLM
from secateur.evaluate.speed import greedy_decode, speed
from secateur.runtime.linear import QuantLinear
from secateur.quant.rtn import RTNConfig
from secateur.testing import tiny_model


@pytest.mark.parametrize("variant", ["fp32", "W4A16", "W8A8"])
def test_compiled_greedy_matches_eager(variant):
    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    if variant == "W4A16":
        secateur.compress_(model, RTNConfig(bits=4, strategy="group", group_size=32))
    elif variant == "W8A8":
        secateur.compress_(model, RTNConfig(bits=8, strategy="channel", activations="int8"))
    assert variant == "fp32" or any(isinstance(m, QuantLinear) for m in model.modules())
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


def test_speed_compile_refuses_what_it_cannot_time():
    model = tiny_model("llama")
    with pytest.raises(SecateurError, match="batch 1"):
        speed(model, batch=2, prompt_len=8, new_tokens=2, compile=True)
    with pytest.raises(SecateurError, match="warm-up"):
        speed(model, prompt_len=8, new_tokens=2, warmup=0, compile=True)
    with pytest.raises(SecateurError, match="causal LM"):
        speed(tiny_model("bert"), prompt_len=8, compile=True)


def test_speed_times_a_compiled_lm_and_says_so():
    model = tiny_model("llama")
    compiled = CompiledLM(model, 8 + 6, mode=None)
    result = speed(model, prompt_len=8, new_tokens=6, runs=2, compile=compiled)
    assert result.settings["runtime"].startswith("torch.compile") and result.protocol is None  # 2 runs < P4's 10
    assert result.extra["decode_tokens_per_s"] > 0 and result.extra["prefill_ms_median"] > 0
    assert speed(model, prompt_len=8, new_tokens=2, runs=2).settings["runtime"] == "eager"
    with pytest.raises(SecateurError, match="fewer than 16 positions"):
        speed(model, prompt_len=8, new_tokens=8, compile=compiled)
    with pytest.raises(SecateurError, match="not of this model"):
        speed(tiny_model("llama"), prompt_len=8, new_tokens=6, compile=compiled)


def test_each_compiled_lm_keeps_its_own_graphs():
    """Module guards are dropped for speed, so graphs must never be shared between instances:
    interleaved calls on three models each give that model's own logits, from its own graph."""
    from torch._dynamo.utils import counters

    models = [tiny_model("llama", seed=seed).eval() for seed in range(3)]
    prompt = torch.randint(0, models[0].config.vocab_size, (1, 6))
    compiled = [CompiledLM(model, 8, mode=None) for model in models]
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        refs = [model(prompt).logits[:, -1] for model in models]
    assert not torch.allclose(refs[0], refs[1], atol=1e-3)
    for _ in range(3):
        for c, ref in zip(compiled, refs):
            c.reset()
            assert torch.allclose(c(prompt, 0), ref, atol=1e-4, rtol=1e-4)
    # two graphs each (the cache's layers are created lazily by the first call, which changes what
    # the second call sees), none shared, none added by the third round
    assert counters["stats"]["unique_graphs"] - before == 2 * len(models)
