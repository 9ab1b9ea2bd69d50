"""secateur's decode attention (csrc/attention.cpp via secateur.runtime.decode_attention) against
a float64 softmax written out loop by loop, its fallbacks to transformers' sdpa, and a Llama with
head size 16 decoding through it eagerly and compiled."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from secateur.runtime.compiled import CompiledLM
from secateur.runtime.decode_attention import NAME, decode_attention_forward, use_decode_attention
from secateur.evaluate.speed import greedy_decode
from secateur.runtime import native

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built on this machine")


def slow_attention(q, k, v, mask, scale):
    """[B, H, 1, D] x [B, KVH, L, D] -> [B, 1, H, D] in float64, one head and one position at a time."""
    b_, h_, _, d_ = q.shape
    kvh, length = k.shape[1], k.shape[2]
    out = torch.zeros(b_, 1, h_, d_, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            kv = h // (h_ // kvh)
            allowed = [j for j in range(length) if mask is None or bool(mask[b % mask.shape[0], h % mask.shape[1], 0, j])]
            if not allowed:
                continue
            scores = [scale * float((q[b, h, 0].double() * k[b, kv, j].double()).sum()) for j in allowed]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            for w, j in zip(weights, allowed):
                out[b, 0, h] += (w / total) * v[b, kv, j].double()
    return out


@pytest.mark.parametrize("b,h,kvh,length,d", [(1, 4, 4, 37, 16), (2, 8, 2, 20, 64), (1, 2, 1, 5, 128)])
@pytest.mark.parametrize("mask_kind", ["none", "prefix", "per_head"])
def test_kernel_matches_a_float64_softmax(b, h, kvh, length, d, mask_kind):
    g = torch.Generator().manual_seed(b * 100 + length)
    q = torch.randn(b, 1, h, d, generator=g).transpose(1, 2)  # the strided view attention modules pass
    k, v = torch.randn(b, kvh, length, d, generator=g) * 2, torch.randn(b, kvh, length, d, generator=g)
    mask = None
    if mask_kind == "prefix":  # a static cache filled up to some position
        mask = torch.zeros(b, 1, 1, length, dtype=torch.bool)
        mask[..., : length - 3] = True
    elif mask_kind == "per_head":
        mask = torch.rand(b, h, 1, length, generator=g) > 0.4
        mask[..., 0] = True
    got = torch.ops.secateur.decode_attention(q, k, v, mask, 0.3)
    ref = slow_attention(q, k, v, mask, 0.3)
    assert got.shape == (b, 1, h, d) and got.is_contiguous()
    assert (got.double() - ref).abs().max() < 2e-6 * max(1.0, ref.abs().max().item())


def test_a_head_with_nothing_to_attend_to_gets_zeros():
    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    mask = torch.zeros(1, 2, 1, 4, dtype=torch.bool)
    mask[0, 1] = True
    got = torch.ops.secateur.decode_attention(q, k, v, mask, 0.25)
    assert torch.equal(got[0, 0, 0], torch.zeros(16))
    assert torch.allclose(got[0, 0, 1].double(), slow_attention(q, k, v, mask, 0.25)[0, 0, 1], atol=1e-6)


def test_bad_inputs_are_refused():
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 4, 16)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.secateur.decode_attention(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8),
                                            None, 1.0)
    with pytest.raises(RuntimeError, match="one query token"):
        torch.ops.secateur.decode_attention(torch.randn(1, 2, 3, 16), k, k, None, 1.0)
    with pytest.raises(RuntimeError, match="bool"):
        torch.ops.secateur.decode_attention(q, k, k, torch.zeros(1, 1, 1, 4), 1.0)


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2  # what sdpa's GQA path reads


@pytest.mark.parametrize("case", ["prefill", "float_mask", "bfloat16", "head_dim_8", "softcap"])
def test_what_the_kernel_does_not_cover_goes_to_sdpa(case, monkeypatch):
    q_len, d, dtype, extra = 1, 16, torch.float32, {}
    mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    if case == "prefill":
        q_len, mask = 6, None
    elif case == "float_mask":
        mask = torch.zeros(1, 1, 1, 6)
    elif case == "bfloat16":
        dtype = torch.bfloat16
    elif case == "head_dim_8":
        d = 8
    else:
        extra = {"softcap": 30.0}
    q, k, v = (torch.randn(1, 2, n, d).to(dtype) for n in (q_len, 6, 6))
    calls = []
    monkeypatch.setattr("transformers.integrations.sdpa_attention.sdpa_attention_forward",
                        lambda *a, **kw: calls.append(1) or sdpa_attention_forward(*a, **{**kw, "softcap": None}))
    decode_attention_forward(_Module(), q, k, v, mask, **extra)
    assert calls == [1]


def test_covered_calls_match_sdpa():
    q, k, v = torch.randn(1, 4, 1, 32), torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    mask = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    mask[..., 7:] = False
    ours, _ = decode_attention_forward(_Module(), q, k, v, mask, scaling=0.2)
    ref, _ = sdpa_attention_forward(_Module(), q, k, v, mask, scaling=0.2)
    assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=1e-6)


def llama16() -> torch.nn.Module:
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def test_a_llama_decodes_the_same_through_it_eagerly_and_compiled(monkeypatch):
    model = llama16()
    prompt = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    eager, _, _ = greedy_decode(model, prompt, 8)  # sdpa, dynamic cache
    assert model.config._attn_implementation == "sdpa"
    assert use_decode_attention(model) and model.config._attn_implementation == NAME
    kernel_calls = []
    real = torch.ops.secateur.decode_attention

    class Spy:  # torch.ops namespaces cannot be patched attribute by attribute
        def __getattr__(self, name):
            return getattr(torch.ops.secateur_real, name)

    monkeypatch.setattr(torch.ops, "secateur_real", torch.ops.secateur, raising=False)
    spy = Spy()
    spy.decode_attention = lambda *a: kernel_calls.append(1) or real(*a)
    monkeypatch.setattr(torch.ops, "secateur", spy)
    again, _, _ = greedy_decode(model, prompt, 8)
    monkeypatch.undo()
    assert torch.equal(again, eager)
    assert len(kernel_calls) == 8 * model.config.num_hidden_layers  # every one-token step, every layer
    compiled = CompiledLM(model, 7 + 8, mode=None)
    tokens, _, _ = compiled.greedy(prompt, 8)
    assert torch.equal(tokens, eager)
