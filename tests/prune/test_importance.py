"""Importance scores (prune/importance.py) against slow, obviously-correct references, and the
policy of structured.py (how many to remove where).

The references walk units one at a time with explicit slices and run the model whole with plain
hooks — no calibration loop, no group tables from the library.
"""

from __future__ import annotations

import copy

import pytest
import torch

from secateur import lineage
from secateur import StructuredConfig, compress_
from secateur.errors import ConfigError, SecateurError
from secateur.models.arch import arch_of
from secateur.models import structure
from secateur.prune import importance
from secateur.prune.structured import _count, _global_keep, _lowest, plan_heads, plan_mlp
from secateur.testing import tiny_model

D = 8


def calib(n=6, seq=12, seed=0):
    return torch.randint(7, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def oi(module, t=None):
    t = module.weight if t is None else t
    return t.t() if type(module).__name__ == "Conv1D" else t


def slow_groups(model, elem):
    """Per-unit Σ elem over the unit's slices, one unit at a time."""
    arch = arch_of(model).arch
    out = {"heads": {}, "kv": {}, "mlp": {}}
    for i, block in enumerate(arch.get_blocks(model)):
        get = block.get_submodule
        if "qkv" in arch.attn:
            w = oi(get(arch.attn["qkv"]), elem(get(arch.attn["qkv"]).weight))
            b = elem(get(arch.attn["qkv"]).bias)
            width = w.shape[0] // 3
            q_rows = lambda h: float(w[h * D:(h + 1) * D].sum() + b[h * D:(h + 1) * D].sum())  # noqa: E731
            kv_rows = lambda g: float(sum(w[off + g * D:off + (g + 1) * D].sum() + b[off + g * D:off + (g + 1) * D].sum()  # noqa: E731
                                          for off in (width, 2 * width)))
        else:
            def rows(role, u):
                m = get(arch.attn[role])
                s = elem(m.weight)[u * D:(u + 1) * D].sum()
                return float(s + (elem(m.bias)[u * D:(u + 1) * D].sum() if m.bias is not None else 0))
            q_rows = lambda h: rows("q", h)  # noqa: E731
            kv_rows = lambda g: rows("k", g) + rows("v", g)  # noqa: E731
        o = get(arch.attn["o"])
        o_w = oi(o, elem(o.weight))
        shape = structure.block_shape(block, arch, D)
        heads = [q_rows(h) + float(o_w[:, h * D:(h + 1) * D].sum()) for h in range(shape.heads)]
        out["heads"][i] = heads
        out["kv"][i] = [kv_rows(g) + sum(heads[g * shape.groups:(g + 1) * shape.groups]) for g in range(shape.kv_heads)]
        mlp = []
        for j in range(shape.intermediate):
            total = 0.0
            for role, path in arch.mlp.items():
                m = get(path)
                w = oi(m, elem(m.weight))
                if role == "down":
                    total += float(w[:, j].sum())
                else:
                    total += float(w[j].sum()) + (float(elem(m.bias)[j]) if m.bias is not None else 0.0)
            mlp.append(total)
        out["mlp"][i] = mlp
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_magnitude_matches_slow_groups(family, norm):
    model = tiny_model(family)
    with torch.no_grad():
        for p in model.parameters():  # non-zero biases so that they count
            p.add_(0.01)
    scores = importance.magnitude(model, norm)
    elem = (lambda t: t.detach().abs()) if norm == "l1" else (lambda t: t.detach().double() ** 2)
    ref = slow_groups(model, elem)
    post = (lambda v: torch.tensor(v, dtype=torch.float64)) if norm == "l1" else \
        (lambda v: torch.tensor(v, dtype=torch.float64).sqrt())
    for i in ref["heads"]:
        assert torch.allclose(scores.heads[i], post(ref["heads"][i]), rtol=1e-5)
        assert torch.allclose(scores.kv_heads[i], post(ref["kv"][i]), rtol=1e-5)
        assert torch.allclose(scores.mlp[i], post(ref["mlp"][i]), rtol=1e-5)


def test_magnitude_hidden_matches_slow_sum_over_every_stream_slice():
    model = tiny_model("llama")  # untied head: every parameter has the stream on one axis
    scores = importance.magnitude(model, "l1")
    axis_of = {"embed_tokens": 1, "q_proj": 1, "k_proj": 1, "v_proj": 1, "gate_proj": 1, "up_proj": 1,
               "lm_head": 1, "o_proj": 0, "down_proj": 0, "norm": 0, "input_layernorm": 0,
               "post_attention_layernorm": 0}
    ref = torch.zeros(32, dtype=torch.float64)
    for name, p in model.named_parameters():
        axis = axis_of[name.split(".")[-2]]
        for c in range(32):
            ref[c] += float(p.detach().abs().select(axis, c).sum())
    assert torch.allclose(scores.hidden, ref, rtol=1e-6)


def test_activation_matches_hooks_on_the_whole_model():
    model = tiny_model("llama")
    ids = calib()
    scores = importance.activation(model, ids, batch_size=4)
    arch = arch_of(model).arch
    sums = {}

    def hook(key):
        def f(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            v = x.reshape(x.shape[0], -1, D).norm(dim=-1) if key[1] == "heads" else x.abs()
            total, n = sums.get(key, (0, 0))
            sums[key] = (total + v.double().sum(0), n + x.shape[0])
        return f

    handles = []
    for i, block in enumerate(arch.get_blocks(model)):
        for path, role in (("self_attn.o_proj", "heads"), ("mlp.down_proj", "mlp"), ("self_attn.q_proj", "h1"),
                           ("mlp.gate_proj", "h2")):
            handles.append(block.get_submodule(path).register_forward_pre_hook(hook((i, role))))
    with torch.no_grad():
        for start in range(0, len(ids), 4):
            model(input_ids=ids[start:start + 4])
    for h in handles:
        h.remove()
    mean = {k: t / n for k, (t, n) in sums.items()}
    hidden = sum(mean[(i, r)] for i in range(2) for r in ("h1", "h2"))
    for i in range(2):
        assert torch.allclose(scores.heads[i], mean[(i, "heads")], rtol=1e-4)
        assert torch.allclose(scores.kv_heads[i], mean[(i, "heads")].reshape(2, 2).sum(1), rtol=1e-4)
        assert torch.allclose(scores.mlp[i], mean[(i, "mlp")], rtol=1e-4)
    assert torch.allclose(scores.hidden, hidden, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_taylor_matches_per_batch_gradients(family):
    model = tiny_model(family)
    ids = calib(4, 10)
    scores = importance.taylor(model, ids, batch_size=2, seed=3)
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    for start in (0, 2):
        batch = ids[start:start + 2]
        model.zero_grad()
        if family == "llama":
            loss = model(input_ids=batch, labels=batch).loss
        else:
            pooled = model(input_ids=batch, attention_mask=torch.ones_like(batch)).last_hidden_state.mean(1)
            r = torch.randn(pooled.shape, generator=gen)
            loss = (pooled * (r / r.norm(dim=-1, keepdim=True))).sum()
        loss.backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                acc[n] += (p.grad * p.detach()).abs()
    model.zero_grad()
    by_param = {id(p): acc[n] for n, p in model.named_parameters()}
    ref = slow_groups(model, lambda t: by_param[id(t)])
    for i in ref["mlp"]:
        assert torch.allclose(scores.mlp[i], torch.tensor(ref["mlp"][i], dtype=torch.float64), rtol=1e-4, atol=1e-9)
        assert torch.allclose(scores.heads[i], torch.tensor(ref["heads"][i], dtype=torch.float64), rtol=1e-4, atol=1e-9)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_block_influence_matches_hooks(family):
    model = tiny_model(family)
    ids = calib()
    got = importance.influence(model, ids, batch_size=3)
    arch = arch_of(model).arch
    cos = {i: [] for i in range(2)}

    def hook(i):
        def f(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos[i].append(torch.nn.functional.cosine_similarity(x.reshape(-1, 32), y.reshape(-1, 32), dim=-1))
        return f

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(arch.get_blocks(model))]
    with torch.no_grad():
        for start in (0, 3):
            b = ids[start:start + 3]
            model(input_ids=b, attention_mask=torch.ones_like(b)) if family == "bert" else model(input_ids=b)
    for h in handles:
        h.remove()
    ref = torch.tensor([1 - float(torch.cat(cos[i]).double().mean()) for i in range(2)], dtype=torch.float64)
    assert torch.allclose(got, ref, atol=1e-5)


def test_skip_loss_equals_the_loss_of_the_model_without_the_block():
    model = tiny_model("llama")
    ids = calib(4, 16)
    got = importance.single_skip_losses(model, ids, batch_size=2)
    with torch.no_grad():
        dense = sum(float(model(input_ids=ids[s:s + 2], labels=ids[s:s + 2]).loss) for s in (0, 2)) / 2
        for i in range(2):
            pruned = copy.deepcopy(model)
            structure.remove_blocks(pruned, [i])
            loss = sum(float(pruned(input_ids=ids[s:s + 2], labels=ids[s:s + 2]).loss) for s in (0, 2)) / 2
            assert abs(float(got[i]) - (loss - dense)) < 1e-5


# --- policy ---------------------------------------------------------------------------------------
def test_counts_and_lowest():
    assert _count(0.5, 64, "x", "mlp") == 32
    assert _count(0.25, 172, "x", "mlp") == 43
    assert _count(0.5, 100, "x", "mlp", multiple=8) == 52  # keeps 48
    assert _count(0.0, 10, "x", "mlp") == 0
    with pytest.raises(ConfigError, match="rounds to removing none"):
        _count(0.1, 4, "KV head groups", "heads")
    assert _lowest(torch.tensor([3.0, 1.0, 2.0, 1.0]), 2) == [0, 2]
    assert _lowest(torch.tensor([1.0, 1.0, 1.0]), 1) == [0, 1]  # ties: the later index goes


def test_plan_heads_groups_and_query_modes():
    shapes = {0: structure.BlockShape(8, 4, 16)}
    scores = importance.Scores("t", heads={0: torch.tensor([5., 1, 4, 4, 0, 0, 9, 9], dtype=torch.float64)},
                               kv_heads={0: torch.tensor([6., 8, 0, 18], dtype=torch.float64)})
    groups = plan_heads(shapes, scores, StructuredConfig(heads=0.25, mlp=0.0))
    assert groups[0] == ([0, 1, 2, 3, 6, 7], [0, 1, 3])  # KV group 2 (and its query heads 4, 5) goes
    query = plan_heads(shapes, scores, StructuredConfig(heads=0.5, mlp=0.0, gqa="query"))
    assert query[0] == ([0, 2, 4, 6], [0, 1, 2, 3])  # the weaker query head of every group goes


def test_plan_mlp_uniform_and_global():
    shapes = {0: structure.BlockShape(2, 2, 8), 1: structure.BlockShape(2, 2, 8)}
    s0 = torch.arange(8, dtype=torch.float64) + 1
    s1 = torch.tensor([10., 10, 10, 10, 10, 10, 1, 1], dtype=torch.float64)
    scores = importance.Scores("t", mlp={0: s0, 1: s1})
    uniform = plan_mlp(shapes, scores, StructuredConfig(mlp=0.25))
    assert uniform == {0: [2, 3, 4, 5, 6, 7], 1: [0, 1, 2, 3, 4, 5]}
    glob = plan_mlp(shapes, scores, StructuredConfig(mlp=0.25, uniform=False))
    assert sum(8 - len(v) for v in glob.values()) == 4
    assert glob[1] == [0, 1, 2, 3, 4, 5]  # the two weak channels of block 1 go first
    keep = _global_keep({0: s0, 1: s1}, 3, minimum=2, multiple=2)
    assert all(len(v) % 2 == 0 for v in keep.values())


def test_config_errors_and_missing_data():
    with pytest.raises(ConfigError, match="either drop_layers"):
        StructuredConfig(drop_layers=1, blocks=(1,))
    with pytest.raises(ConfigError, match="nothing to remove"):
        StructuredConfig(mlp=0.0)
    with pytest.raises(ConfigError, match="fraction below 1"):
        StructuredConfig(mlp=1.0)
    with pytest.raises(SecateurError, match="needs calibration data"):
        compress_(tiny_model("llama"), StructuredConfig(mlp=0.5, importance="activation"))
    with pytest.raises(SecateurError, match="needs calibration data"):
        compress_(tiny_model("llama"), StructuredConfig(mlp=0.0, drop_layers=1))
    with pytest.raises(ConfigError, match=r"steps\[0\]\.drop_layers"):
        compress_(tiny_model("llama"), StructuredConfig(mlp=0.0, drop_layers=2), data=calib())
    with pytest.raises(ConfigError, match="channels"):
        compress_(tiny_model("llama"), StructuredConfig(channels=0.5))


def test_auto_importance_follows_the_data():
    model = tiny_model("llama")
    compress_(model, StructuredConfig(mlp=0.5))
    assert lineage.of(model).history()[-1]["result"]["importance"] == "magnitude-l2"
    model = tiny_model("llama")
    compress_(model, StructuredConfig(mlp=0.5, drop_layers=1), data=calib())
    result = lineage.of(model).history()[-1]["result"]
    assert result["importance"] == "activation" and result["depth_importance"] == "influence"


@pytest.mark.parametrize("fields", [dict(heads=0.5, mlp=0.25, drop_layers=1), dict(heads=0.5, gqa="query", hidden=0.25),
                                    dict(mlp=0.5, round_to=8, blocks=(0,))])
def test_dry_run_shapes_match_the_real_run(fields):
    from secateur.prune.structured import describe

    config = StructuredConfig(importance="activation", **fields)
    model = tiny_model("llama")
    with torch.device("meta"):
        meta = type(model)(model.config)
    planned = describe(meta, config)["shapes"]["after"]
    compress_(model, config, data=calib())
    actual = dict(lineage.of(model).history()[-1]["result"]["after"])
    actual.pop("parameters")
    assert planned == actual
