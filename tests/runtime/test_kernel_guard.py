"""A pathology guard, not a speed bar: every quantized runtime path, with the kernel this machine
chose for it, must run a mid-size shape at most 2x slower than float32 ``F.linear`` (a fused W8A8
encoder block: than the same block in float32). It exists because on an AMD EPYC without AMX,
oneDNN's ``qlinear_pointwise`` once ran W8A8 about 700x slower than float32 and nothing noticed.

On an Intel CPU with AMX, the same guard can be run as on a CPU without it::

    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python -m pytest tests/runtime/test_kernel_guard.py tests/runtime/test_quant_kernels.py

(``.ci/run`` does so; kernel choices measured under that cap are cached under their own key.)
Times are the fastest of several alternating runs, measured again (up to four times) while over the
limit, so a busy moment on a shared machine cannot fail the test; a pathology is slow every time.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from secateur.runtime import native
from secateur.runtime.linear import QuantLinear

IN, OUT = 768, 2048  # the timing model's MLP up-projection
LIMIT = 2.0


def ratio_of(calls: dict, rounds: int = 15, attempts: int = 4) -> tuple[float, dict]:
    """``calls["quantized"] / calls["fp32"]`` (fastest runs), measured again up to ``attempts``
    times while it is over the limit: another process on the machine can hold a core for a whole
    attempt (an OpenMP kernel then waits at its barrier), a pathology is slow in every attempt."""
    best: tuple[float, dict] = (float("inf"), {})
    for attempt in range(attempts):
        times = fastest(calls, rounds)
        names = list(calls)
        ratio = times[names[0]] / times[names[1]]
        best = min(best, (ratio, times), key=lambda r: r[0])
        if ratio <= LIMIT:
            break
        time.sleep(0.5)
    return best


def fastest(calls: dict, rounds: int = 15) -> dict:
    best = {name: float("inf") for name in calls}
    with torch.inference_mode():
        for call in calls.values():
            call()
        for _ in range(rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def quantized(scheme: str) -> QuantLinear:
    g = torch.Generator().manual_seed(0)
    bits, group, activation = {"W8A8": (8, None, "int8"), "W4A16": (4, 128, None), "W8A16": (8, None, None)}[scheme]
    hi = 2 ** (bits - 1) - 1
    groups = IN // group if group else 1
    q = torch.randint(-hi, hi + 1, (OUT, IN), generator=g, dtype=torch.int8)
    return QuantLinear.from_quantized(q, torch.rand(OUT, groups, generator=g) * 0.01 + 1e-3, None, bits, group,
                                      torch.randn(OUT, generator=g), activation)


@pytest.mark.parametrize("tokens", [1, 8, 128, 512])
@pytest.mark.parametrize("scheme", ["W8A8", "W4A16", "W8A16"])
def test_no_quantized_linear_is_more_than_twice_slower_than_float32(scheme, tokens):
    module = quantized(scheme)
    kernel = module.kernel_for(tokens)
    x = torch.randn(tokens, IN)
    weight, bias = module.dequantized_weight(), module.bias.detach().clone()
    ratio, times = ratio_of({"quantized": lambda: module(x), "fp32": lambda: F.linear(x, weight, bias)})
    assert ratio <= LIMIT, (f"{scheme} at {tokens} tokens runs {kernel} {ratio:.1f}x slower than float32 "
                            f"({times['quantized'] * 1e6:.0f} vs {times['fp32'] * 1e6:.0f} us)")


@pytest.mark.skipif(not native.available(), reason="the fused encoder needs secateur's native kernels")
def test_a_fused_w8a8_encoder_block_is_not_more_than_twice_slower_than_float32():
    import secateur
    from secateur.runtime.fused_encoder import fuse_encoder
    from secateur.quant.rtn import RTNConfig
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=2, num_attention_heads=12, intermediate_size=1536,
                        vocab_size=1000, attn_implementation="sdpa")
    dense = BertModel(config).eval()
    model = BertModel(config).eval()
    model.load_state_dict(dense.state_dict())
    secateur.compress_(model, RTNConfig(bits=8, strategy="channel", activations="int8"))
    assert fuse_encoder(model) == 2
    ids = torch.randint(0, 1000, (16, 32))
    mask = torch.ones_like(ids)
    ratio, _ = ratio_of({"w8a8": lambda: model(input_ids=ids, attention_mask=mask),
                         "fp32": lambda: dense(input_ids=ids, attention_mask=mask)}, rounds=8)
    assert ratio <= LIMIT, f"the fused W8A8 encoder runs {ratio:.1f}x slower than float32"
