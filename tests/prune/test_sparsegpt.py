"""SparseGPT against the textbook Optimal Brain Surgeon procedure, and on real activations.

The oracle below knows nothing of Cholesky factors or lazy batches: it keeps the set of columns
still free, F = {i, i+1, …}, and for every column i inverts H restricted to F explicitly
(float64). The fast code reads the same numbers off one factor. Why they agree:

Let H⁻¹ = UᵀU with U upper triangular, and V = U⁻¹ (also upper), so H = V Vᵀ. For an upper V,
(V Vᵀ)[a, b] = Σ_k V[a, k] V[b, k] over k ≥ max(a, b); for a, b ≥ i only k ≥ i appear, hence
H_{≥i} = V_{≥i} V_{≥i}ᵀ (trailing blocks), and, the inverse of a triangular matrix's trailing
block being the trailing block of its inverse, (H_{≥i})⁻¹ = U_{≥i}ᵀ U_{≥i}. Its entries in row i:

    [(H_{≥i})⁻¹]_{i,j} = Σ_{k ≥ i} U[k, i] U[k, j] = U[i, i] · U[i, j]      (U[k, i] = 0 for k > i)

so  [(H_{≥i})⁻¹]_{ii} = U[i, i]²  and the OBS update  −w_i · [(H_{≥i})⁻¹]_{i,j} / [(H_{≥i})⁻¹]_{ii}
equals −(w_i / U[i, i]) · U[i, j]; the OBS saliency w_i² / [(H_{≥i})⁻¹]_{ii} is exactly the fast
score w_i² / U[i, i]² (SparseGPT's w²/[Hinv]_ii², Hinv there being the Cholesky factor U). The mask
of a block is chosen from the weights at the block's start (every earlier column's update
applied), N:M groups from the weights at the group's first column.
"""

from __future__ import annotations

import math

import pytest
import torch

from secateur.api import methods
from secateur.config import ConfigError
from secateur.prune.masks import nm_mask, reconstruction_error, row_mask
from secateur.prune.sparsegpt import SparseGPTConfig, inverse_hessian_factor, sparsegpt_prune
from secateur.prune.wanda import wanda_masks


# --- the oracle ---------------------------------------------------------------------------------
def oracle_sparsegpt(weight, H, sparsity, pattern=None, block_size=128, dampening=0.01):
    """Sequential OBS with explicit inverses of H restricted to the free columns."""
    W = weight.double().clone()
    H = H.double().clone()
    rows, cols = W.shape
    keep = [[True] * cols for _ in range(rows)]
    for j in range(cols):                      # dead inputs
        if H[j, j] == 0:
            H[j, j] = 1.0
            W[:, j] = 0.0
    lam = dampening * sum(H[j, j].item() for j in range(cols)) / cols
    for j in range(cols):
        H[j, j] += lam
    inv_free = [torch.linalg.inv(H[i:, i:]) for i in range(cols)]     # (H_{≥i})⁻¹
    d2 = [inv_free[i][0, 0].item() for i in range(cols)]              # [(H_{≥i})⁻¹]_ii

    def saliency(r, j):                                               # OBS: w² / [(H_F)⁻¹]_jj
        return W[r, j].item() ** 2 / d2[j]

    n = m = None
    if pattern:
        n, m = map(int, pattern.split(":"))
        block_size = -(-block_size // m) * m
    removed = lambda count: int(count * sparsity + 1e-9)  # noqa: E731 - floor, like the paper's per-row count
    for i in range(cols):
        if m is None and i % block_size == 0:                           # choose this block's mask
            end = min(i + block_size, cols)
            k = removed(end) - removed(i)
            for r in range(rows):
                for _, j in sorted((saliency(r, j), j) for j in range(i, end))[:k]:
                    keep[r][j] = False
        if m is not None and i % m == 0:                                # choose this group's mask
            for r in range(rows):
                for _, j in sorted((saliency(r, j), j) for j in range(i, i + m))[:m - n]:
                    keep[r][j] = False
        inv = inv_free[i]
        for r in range(rows):                                           # OBS: remove w_ri, compensate
            if not keep[r][i]:
                W[r, i:] -= W[r, i] / inv[0, 0] * inv[0, :]
                W[r, i] = 0.0
    return W, torch.tensor(keep)


def problem(rows, cols, seed, dead=()):
    """Weights and H = 2/n XᵀX from correlated inputs with uneven scales."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    mix = torch.eye(cols, dtype=torch.float64) + 0.3 * torch.randn(cols, cols, generator=gen, dtype=torch.float64)
    x = torch.randn(4 * cols, cols, generator=gen, dtype=torch.float64) @ mix
    x *= torch.rand(cols, generator=gen, dtype=torch.float64) * 3 + 0.2
    x[:, list(dead)] = 0.0
    return weight, 2.0 / x.shape[0] * x.T @ x


# --- fast == oracle ---------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 4, 128])
@pytest.mark.parametrize("pattern", [None, "2:4"])
@pytest.mark.parametrize("dead", [(), (5,)])
def test_matches_oracle(block_size, pattern, dead):
    weight, H = problem(12, 48, seed=block_size + len(dead), dead=dead)
    sparsity = 0.5 if pattern is None else 0.0
    expected_w, expected_keep = oracle_sparsegpt(weight, H, sparsity, pattern, block_size, dampening=0.01)
    new_w, keep = sparsegpt_prune(weight, H, sparsity, pattern, block_size=block_size, dampening=0.01)
    assert new_w.dtype == torch.float64
    assert torch.equal(keep, expected_keep)
    scale = float(expected_w.abs().max())
    torch.testing.assert_close(new_w, expected_w, rtol=1e-8, atol=1e-8 * scale)
    assert bool((new_w[~keep] == 0).all())                   # every removed weight is exactly zero


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_matches_oracle_other_sparsities(sparsity):
    weight, H = problem(7, 40, seed=11)
    expected_w, expected_keep = oracle_sparsegpt(weight, H, sparsity, block_size=16, dampening=0.05)
    new_w, keep = sparsegpt_prune(weight, H, sparsity, block_size=16, dampening=0.05)
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(new_w, expected_w, rtol=1e-8, atol=1e-8 * float(expected_w.abs().max()))


def test_cholesky_factor_equivalence():
    """The identity the fast code relies on, checked directly (see the module docstring)."""
    _, H = problem(1, 20, seed=5)
    U = inverse_hessian_factor(H)
    assert torch.equal(U, U.triu())
    for i in range(20):
        inv = torch.linalg.inv(H[i:, i:])
        assert inv[0, 0].item() == pytest.approx(U[i, i].item() ** 2, rel=1e-10)
        torch.testing.assert_close(inv[0, :] / inv[0, 0], U[i, i:] / U[i, i], rtol=1e-9, atol=1e-12)


# --- properties -------------------------------------------------------------------------------
def test_counts_sparsity_zero_and_dead_input_float32():
    weight, H = problem(16, 64, seed=2, dead=(3, 40))
    w32, h32 = weight.float(), H.float()
    new_w, keep = sparsegpt_prune(w32, h32, 0.6, block_size=24)
    assert new_w.dtype == torch.float32 and torch.isfinite(new_w).all()
    assert torch.all((~keep).sum(1) == int(64 * 0.6))
    assert torch.all(new_w[:, [3, 40]] == 0)
    assert not keep[:, [3, 40]].any()          # dead inputs are removed first (their weights are already zero)
    same, keep0 = sparsegpt_prune(w32, h32, 0.0)
    assert torch.equal(same, w32) and keep0.all()
    nm_w, nm_keep = sparsegpt_prune(w32, h32, 0.0, pattern="2:4", block_size=6)
    assert torch.all(nm_keep.reshape(16, -1, 4).sum(-1) == 2) and torch.isfinite(nm_w).all()


def test_reconstruction_error_is_relative_output_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=gen, dtype=torch.float64)
    w = torch.randn(8, 24, generator=gen, dtype=torch.float64)
    w_hat = w * (torch.rand(8, 24, generator=gen) > 0.5)
    direct = float(((x @ w.T - x @ w_hat.T) ** 2).sum() / (x @ w.T).pow(2).sum())
    assert reconstruction_error(w, w_hat, 2 / 300 * x.T @ x) == pytest.approx(direct, rel=1e-12)
    assert reconstruction_error(w, w, x.T @ x) == 0.0


def test_reconstruction_error_of_float32_weights_matches_float64():
    """float32 weights: float32 products, float64 sums; against the float64 definition at a width
    where the 64 MiB slicing cuts H into several column slices."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 4608, generator=gen)
    w = torch.randn(40, 4608, generator=gen)
    w_hat = w * (torch.rand(40, 4608, generator=gen) > 0.5) + 1e-3 * torch.randn(40, 4608, generator=gen)
    H = x.T @ x
    H = (H + H.T) / 2  # exactly symmetric, so its rows are its columns
    xd = x.double()
    direct = float(((xd @ (w.double() - w_hat.double()).T) ** 2).sum() / (xd @ w.double().T).pow(2).sum())
    got = reconstruction_error(w, w_hat, H)
    assert got == pytest.approx(direct, rel=1e-5)
    assert reconstruction_error(w, w_hat, lambda a, b: H[a:b]) == got  # H read back in rows from disk


def test_sparsegpt_beats_its_own_mask_without_update():
    weight, H = problem(16, 64, seed=9)
    new_w, keep = sparsegpt_prune(weight, H, 0.5, block_size=16)
    assert reconstruction_error(weight, new_w, H) < reconstruction_error(weight, weight * keep, H)


# --- config -----------------------------------------------------------------------------------
def test_registered():
    spec = methods()["sparsegpt"]
    assert spec.config is SparseGPTConfig and spec.kind == "prune" and spec.needs_data
    config = SparseGPTConfig(pattern="2:4", block_size=64, dampening=0.1, overrides={"o_proj": 0.2})
    assert SparseGPTConfig.from_dict(config.to_dict()) == config
    names = [row["name"] for row in SparseGPTConfig.describe()]
    expected = ["targets", "ignore", "sparsity", "pattern", "overrides", "owl", "owl_lambda", "owl_threshold",
                "block_size", "dampening"]
    assert [n for n in names if n in expected] == expected


@pytest.mark.parametrize("kwargs,path,needle", [
    ({"pattern": "2-4"}, "pattern", "N:M"),
    ({"overrides": {"re:mlp": 1.5}}, "overrides.re:mlp", "[0.0, 1.0]"),
    ({"owl_lambda": -0.1}, "owl_lambda", "[0.0, 0.5]"),
    ({"block_size": 0}, "block_size", ">= 1"),
    ({"dampening": 2.0}, "dampening", "[0.0, 1.0]"),
])
def test_config_errors(kwargs, path, needle):
    with pytest.raises(ConfigError) as info:
        SparseGPTConfig(**kwargs)
    assert info.value.path == path and needle in str(info.value)


# --- real activations ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stories_stats(stories_dir, data_dir):
    """Inputs of two projections of block 1 of stories260K on 16 P1 windows of 256 tokens."""
    from secateur import load
    from secateur.data import calibration_set

    model, tokenizer, _ = load(stories_dir)
    calib = calibration_set("tinystories", tokenizer, n_samples=16, seq_len=256)
    names = ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    captured: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda mod, args, name=name: captured.__setitem__(name, args[0].detach().reshape(-1, args[0].shape[-1])))
        for name in names]
    try:
        with torch.no_grad():
            model(calib.input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    stats = {}
    for name in names:
        x = captured[name].double()
        stats[name] = (model.get_submodule(name).weight.detach().clone(), (x ** 2).sum(0), 2.0 / x.shape[0] * x.T @ x)
    return stats


@pytest.mark.parametrize("module", ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_real_activations_order(stories_stats, module, pattern):
    weight, col_sq, H = stories_stats[module]
    if pattern:
        magnitude = nm_mask(weight.abs(), 2, 4)
    else:
        magnitude = row_mask(weight.abs(), 0.5)
    wanda = wanda_masks(weight, col_sq.float(), 0.5, pattern)
    new_w, keep = sparsegpt_prune(weight, H.float(), 0.5, pattern)
    errors = {"magnitude": reconstruction_error(weight, weight * magnitude, H),
              "wanda": reconstruction_error(weight, weight * wanda, H),
              "sparsegpt": reconstruction_error(weight, new_w, H)}
    for keep_mask in (magnitude, wanda, keep):
        assert float((~keep_mask).float().mean()) == 0.5
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], f"{module} {pattern or '50%'}: {errors}"
