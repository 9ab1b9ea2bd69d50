"""Magnitude pruning against a slow, obviously-correct oracle written with Python lists."""

from __future__ import annotations

import pytest
import torch

from secateur import lineage
from secateur import compress_
from secateur.config import ConfigError
from secateur.prune.magnitude import MagnitudeConfig
from secateur.models.layers import weight_matrix
from secateur.testing import tiny_model


def oracle_prune(rows: list[list[float]], count: int) -> list[list[float]]:
    """Zero the `count` smallest |w| of a list of values; ties: earlier index first."""
    flat = [(abs(v), i) for i, v in enumerate(rows)]
    doomed = {i for _, i in sorted(flat)[:count]}
    return [0.0 if i in doomed else v for i, v in enumerate(rows)]


def oracle(weights: list[torch.Tensor], sparsity: float, scope: str) -> list[torch.Tensor]:
    out = []
    if scope == "global":
        values = [v for w in weights for v in w.flatten().tolist()]
        pruned = oracle_prune(values, int(len(values) * sparsity + 1e-9))
        offset = 0
        for w in weights:
            out.append(torch.tensor(pruned[offset:offset + w.numel()]).view_as(w))
            offset += w.numel()
        return out
    for w in weights:
        if scope == "row":
            out.append(torch.tensor([oracle_prune(r, int(len(r) * sparsity + 1e-9)) for r in w.tolist()]))
        else:
            out.append(torch.tensor(oracle_prune(w.flatten().tolist(), int(w.numel() * sparsity + 1e-9))).view_as(w))
    return out


def linear_weights(model, skip=("lm_head",)):
    return {n: weight_matrix(m).detach().clone() for n, m in model.named_modules()
            if type(m).__name__ in ("Linear", "Conv1D") and n not in skip}


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "bert"])
@pytest.mark.parametrize("scope", ["row", "matrix", "global"])
def test_matches_oracle(family, scope):
    model = tiny_model(family)
    before = linear_weights(model)
    compress_(model, MagnitudeConfig(sparsity=0.3, scope=scope))
    after = linear_weights(model)
    expected = dict(zip(before, oracle(list(before.values()), 0.3, scope)))
    for name in before:
        assert torch.equal(after[name], expected[name]), name


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_exact_counts(sparsity):
    model = tiny_model("llama")
    compress_(model, MagnitudeConfig(sparsity=sparsity, scope="row"))
    for name, w in linear_weights(model).items():
        zeros_per_row = (w == 0).sum(dim=1)
        assert torch.all(zeros_per_row == int(w.shape[1] * sparsity + 1e-9)), name
    model = tiny_model("llama")
    compress_(model, MagnitudeConfig(sparsity=sparsity, scope="global"))
    ws = list(linear_weights(model).values())
    total = sum(w.numel() for w in ws)
    assert sum(int((w == 0).sum()) for w in ws) == int(total * sparsity + 1e-9)


def test_lm_head_and_embeddings_untouched_and_history():
    model = tiny_model("llama")
    head = model.lm_head.weight.clone()
    emb = model.model.embed_tokens.weight.clone()
    compress_(model, MagnitudeConfig(sparsity=0.9))
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.model.embed_tokens.weight, emb)
    (entry,) = lineage.of(model).history()
    assert entry["step"]["method"] == "magnitude" and 0.87 <= entry["result"]["sparsity"] <= 0.9


def test_zero_sparsity_is_identity():
    model = tiny_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compress_(model, MagnitudeConfig(sparsity=0.0, scope="global"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nm_pattern():
    model = tiny_model("mistral")
    compress_(model, MagnitudeConfig(pattern="2:4"))
    for name, w in linear_weights(model).items():
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert torch.all(groups <= 2), name
        # the kept two are the two largest of each group
        a = w.abs().reshape(w.shape[0], -1, 4)
        assert torch.all((a == 0).sum(-1) >= 2)


def test_ignore_by_regex():
    model = tiny_model("llama")
    down = model.model.layers[0].mlp.down_proj.weight.clone()
    compress_(model, MagnitudeConfig(sparsity=0.5, ignore=("lm_head", "re:.*down_proj")))
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, down)
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5


@pytest.mark.parametrize("kwargs,path,needle", [
    ({"sparsity": 1.5}, "sparsity", "[0.0, 1.0]"),
    ({"scope": "rows"}, "scope", "did you mean 'row'"),
    ({"pattern": "4:2"}, "pattern", "N:M"),
    ({"sparsity": "half"}, "sparsity", "expected a number"),
])
def test_config_errors(kwargs, path, needle):
    with pytest.raises(ConfigError) as info:
        MagnitudeConfig(**kwargs)
    assert info.value.path == path and needle in str(info.value)


def test_nm_tail_group_keeps_the_density():
    from secateur.prune.masks import nm_mask

    scores = torch.arange(1.0, 11.0).repeat(3, 1)          # 10 inputs: two groups of 4, a tail of 2
    keep = nm_mask(scores, 2, 4)
    assert keep[:, :8].reshape(3, 2, 4).sum(-1).eq(2).all()
    assert keep[:, 8:].sum(-1).eq(1).all() and keep[:, 9].all()   # ceil(2·2/4) = 1 kept: the larger
    keep = nm_mask(torch.arange(1.0, 13.0).view(1, 12), 4, 8)       # tail of 4 keeps ceil(4·4/8) = 2
    assert keep[0, 8:].tolist() == [False, False, True, True]
