"""Folding per-channel scales into the previous op (AWQ, SmoothQuant) leaves every family's function
unchanged; the scale formulas against their definitions."""

from __future__ import annotations

import pytest
import torch

from secateur.models.arch import arch_of
from secateur.quant.awq import search_clip, search_scales
from secateur.quant.common import fold_scales, smooth_groups
from secateur.quant.primitives import Scheme, dequantize, minmax_params, quantize
from secateur.quant.smoothquant import smoothing_scales
from secateur.testing import FAMILIES, tiny_model


def run(model, ids):
    with torch.no_grad():
        if arch_of(model).kind == "encoder":
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_scales_preserves_the_function(family):
    model = tiny_model(family)
    ids = torch.randint(7, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = run(model, ids)
    arch = arch_of(model).arch
    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    gen = torch.Generator().manual_seed(1)
    folded = 0
    for block in range(len(arch.get_blocks(model))):
        for prev, names in smooth_groups(model, block, targets):
            width = targets[names[0]].weight.shape[0 if type(targets[names[0]]).__name__ == "Conv1D" else 1]
            fold_scales(prev, [targets[n] for n in names], torch.rand(width, generator=gen) * 3 + 0.2)
            folded += 1
    expected_groups = {"llama": 4, "mistral": 4, "qwen2": 3, "opt": 3, "gpt2": 2, "bert": 1}[family] * 2
    if family in ("llama", "mistral"):
        expected_groups = 3 * 2  # v -> o is skipped under grouped-query attention (2 KV heads, 4 heads)
    assert folded == expected_groups
    assert torch.allclose(run(model, ids), expected, atol=1e-4, rtol=1e-4)


def test_smoothquant_scales_follow_the_formula():
    act = torch.tensor([10.0, 1.0, 0.1])
    w1 = torch.tensor([[1.0, 2.0, 4.0], [0.5, -3.0, 1.0]])
    w2 = torch.tensor([[-2.0, 0.5, 0.5]])
    s = smoothing_scales(act, [w1, w2], alpha=0.5)
    expected = torch.tensor([10.0 ** 0.5 / 2.0 ** 0.5, 1.0 / 3.0 ** 0.5, 0.1 ** 0.5 / 4.0 ** 0.5])
    assert torch.allclose(s, expected)
    assert torch.allclose(smoothing_scales(act, [w1], alpha=1.0), act)


def test_awq_scale_search_picks_the_best_exponent_and_beats_plain_rounding():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=gen)
    x[:, :2] *= 20  # two salient channels
    w = torch.randn(16, 32, generator=gen)
    scheme = Scheme(3, True, "channel")
    s, alpha, errors = search_scales([w], x, x.abs().mean(0), scheme, grid=10)
    assert errors[int(round(alpha * 10))] == min(errors)
    scale, zero = minmax_params(w, scheme)
    plain = float(((x @ dequantize(quantize(w, scale, zero, scheme), scale, zero, scheme).t() - x @ w.t()) ** 2).sum())
    assert min(errors) < plain and abs(errors[0] - plain) < 1e-3 * plain  # α = 0 is plain rounding


def test_awq_clip_search_is_per_row_best():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=gen)
    w = torch.randn(4, 16, generator=gen)
    w[0, 3] = 9.0
    scheme = Scheme(3, True, "channel")
    scale, zero = search_clip(w, x, scheme, grid=10, max_shrink=0.5)
    for r in range(4):  # brute force, one row at a time
        best, best_s = float("inf"), None
        for k in range(6):
            s = (1 - k / 10) * float(w[r].abs().max()) / 3.5
            deq = torch.clamp(torch.round(w[r] / s), -4, 3) * s
            err = float(((x @ deq - x @ w[r]) ** 2).sum())
            if err < best:
                best, best_s = err, s
        assert abs(float(scale[r, 0]) - best_s) < 1e-5
