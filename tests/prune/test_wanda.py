"""Wanda (and the shared OWL helpers) against slow, obviously-correct oracles written with Python lists."""

from __future__ import annotations

import math

import pytest
import torch

from secateur.api import methods
from secateur.config import ConfigError
from secateur.prune.masks import outlier_ratio, owl_sparsities
from secateur.prune.wanda import WandaConfig, wanda_masks, wanda_scores


# --- oracles ----------------------------------------------------------------------------------
def oracle_scores(weight: torch.Tensor, col_sq: torch.Tensor) -> list[list[float]]:
    norms = [math.sqrt(v) for v in col_sq.tolist()]
    return [[abs(w) * n for w, n in zip(row, norms)] for row in weight.tolist()]


def oracle_mask(weight: torch.Tensor, col_sq: torch.Tensor, sparsity: float) -> list[list[bool]]:
    """Per row: sort |w|·||x||, remove the k = floor(sparsity·in) lowest."""
    out = []
    for row in oracle_scores(weight, col_sq):
        k = int(len(row) * sparsity + 1e-9)
        doomed = {j for _, j in sorted((s, j) for j, s in enumerate(row))[:k]}
        out.append([j not in doomed for j in range(len(row))])
    return out


def oracle_nm_mask(weight: torch.Tensor, col_sq: torch.Tensor, n: int, m: int) -> list[list[bool]]:
    """Per row, per group of m consecutive inputs: keep the n highest scores."""
    out = []
    for row in oracle_scores(weight, col_sq):
        keep = []
        for g in range(0, len(row), m):
            ranked = sorted(range(g, g + m), key=lambda j: row[j], reverse=True)
            keep.extend(j in ranked[:n] for j in range(g, g + m))
        out.append(keep)
    return out


def random_problem(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and Σx² with a few outlier features; every row's scores are distinct (no ties)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    x = torch.randn(64, cols, generator=gen, dtype=torch.float64)
    x[:, torch.randperm(cols, generator=gen)[:max(1, cols // 8)]] *= 20.0   # outlier features
    col_sq = (x ** 2).sum(0)
    for row in oracle_scores(weight, col_sq):
        assert len(set(row)) == len(row)
    return weight, col_sq


# --- the math against the oracles -------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 16), (16, 64), (5, 40), (33, 24)])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7, 0.9])
def test_unstructured_matches_oracle(shape, sparsity):
    weight, col_sq = random_problem(*shape, seed=shape[0] * 100 + int(sparsity * 10))
    keep = wanda_masks(weight, col_sq, sparsity)
    assert keep.dtype == torch.bool and keep.shape == weight.shape
    assert keep.tolist() == oracle_mask(weight, col_sq, sparsity)


@pytest.mark.parametrize("shape", [(8, 16), (16, 64), (3, 40)])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_matches_oracle(shape, pattern):
    n, m = map(int, pattern.split(":"))
    if shape[1] % m:
        pytest.skip("input dimension not divisible by M")
    weight, col_sq = random_problem(*shape, seed=shape[1] + m)
    keep = wanda_masks(weight, col_sq, 0.9, pattern=pattern)   # sparsity is ignored with a pattern
    assert keep.tolist() == oracle_nm_mask(weight, col_sq, n, m)


def test_scores_and_float32():
    weight, col_sq = random_problem(6, 12, seed=1)
    expected = torch.tensor(oracle_scores(weight, col_sq), dtype=torch.float64)
    assert torch.allclose(wanda_scores(weight, col_sq), expected, rtol=1e-12, atol=0)
    scores32 = wanda_scores(weight.half(), col_sq.float())
    assert scores32.dtype == torch.float32
    assert torch.allclose(scores32, expected.float(), rtol=2e-3)


def test_activations_change_the_choice():
    """Magnitude would remove column 0; a large input norm there makes Wanda remove column 1."""
    weight = torch.tensor([[0.1, 1.0]])
    col_sq = torch.tensor([10_000.0, 1.0])
    assert wanda_masks(weight, col_sq, 0.5).tolist() == [[True, False]]


def test_zero_sparsity_keeps_everything():
    weight, col_sq = random_problem(7, 24, seed=3)
    assert wanda_masks(weight, col_sq, 0.0).all()


# --- config -----------------------------------------------------------------------------------
def test_registered():
    spec = methods()["wanda"]
    assert spec.config is WandaConfig and spec.kind == "prune" and spec.needs_data
    assert "2306.11695" in spec.paper
    config = WandaConfig(sparsity=0.6, overrides={"re:down_proj$": 0.4}, owl=True)
    assert WandaConfig.from_dict(config.to_dict()) == config
    names = [row["name"] for row in WandaConfig.describe()]
    expected = ["targets", "ignore", "sparsity", "pattern", "overrides", "owl", "owl_lambda", "owl_threshold"]
    assert [n for n in names if n in expected] == expected


@pytest.mark.parametrize("kwargs,path,needle", [
    ({"pattern": "4:2"}, "pattern", "N:M"),
    ({"pattern": "half"}, "pattern", "N:M"),
    ({"overrides": {"q_proj": 1.5}}, "overrides.q_proj", "[0.0, 1.0]"),
    ({"overrides": {"re:(": 0.5}}, "overrides.re:(", "invalid regex"),
    ({"owl_lambda": 0.7}, "owl_lambda", "[0.0, 0.5]"),
    ({"owl_threshold": 0.0}, "owl_threshold", "> 0"),
    ({"sparsity": 1.5}, "sparsity", "[0.0, 1.0]"),
    ({"owl": True, "pattern": "2:4"}, "owl", "N:M"),
])
def test_config_errors(kwargs, path, needle):
    with pytest.raises(ConfigError) as info:
        WandaConfig(**kwargs)
    assert info.value.path == path and needle in str(info.value)


# --- OWL ----------------------------------------------------------------------------------------
def test_outlier_ratio_matches_oracle():
    gen = torch.Generator().manual_seed(0)
    parts = [torch.rand(4, 10, generator=gen) ** 6 for _ in range(3)]
    values = [v for p in parts for v in p.flatten().tolist()]
    mean = sum(values) / len(values)
    expected = sum(v > 3.0 * mean for v in values) / len(values)
    assert expected > 0
    assert outlier_ratio(parts, 3.0) == pytest.approx(expected, abs=1e-15)
    assert outlier_ratio(parts[0], 3.0) == pytest.approx(
        sum(v > 3.0 * parts[0].double().mean().item() for v in parts[0].flatten().tolist()) / 40)


@pytest.mark.parametrize("target,lam", [(0.5, 0.08), (0.7, 0.1), (0.3, 0.0)])
def test_owl_keeps_the_mean_and_inverts_the_order(target, lam):
    ratios = [0.010, 0.030, 0.002, 0.020, 0.015]
    out = owl_sparsities(ratios, target, lam)
    assert sum(out) / len(out) == pytest.approx(target, abs=1e-12)
    if lam == 0:
        assert out == pytest.approx([target] * 5, abs=1e-12)
        return
    assert max(out) - min(out) == pytest.approx(2 * lam, abs=1e-12)
    by_ratio = [s for _, s in sorted(zip(ratios, out))]
    assert all(a > b for a, b in zip(by_ratio, by_ratio[1:]))   # more outliers -> lower sparsity


def test_owl_weighted_mean_and_clamping():
    ratios = [0.1, 0.0, 0.05]
    weights = [1.0, 3.0, 2.0]
    out = owl_sparsities(ratios, 0.5, 0.2, weights=weights)
    assert sum(w * s for w, s in zip(weights, out)) / sum(weights) == pytest.approx(0.5, abs=1e-12)
    assert out[0] < out[2] < out[1]
    clamped = owl_sparsities([0.0, 0.5, 1.0], 0.95, 0.3)      # 0.95 + 0.3 would exceed 1
    assert all(0.0 <= s <= 1.0 for s in clamped) and max(clamped) == 1.0
    assert sum(clamped) / 3 == pytest.approx(0.95, abs=1e-12)
    assert clamped[0] >= clamped[1] >= clamped[2]
    assert owl_sparsities([0.2, 0.2], 0.5, 0.1) == [0.5, 0.5] and owl_sparsities([], 0.5, 0.1) == []
