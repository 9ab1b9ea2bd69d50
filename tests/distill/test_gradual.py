"""Gradual pruning (Zhu & Gupta schedule, magnitude and movement scores, soft masks) against slow,
obviously-correct references: the schedule by hand, masks by sorting Python lists, movement scores
by explicit autograd on ``x @ (W*M).T``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from secateur.distill.gradual import GradualPruner, cubic_sparsity, is_update_step
from secateur.errors import SecateurError
from secateur.models.layers import weight_matrix
from secateur.targets import select_modules
from secateur.testing import VOCAB, tiny_model


# --- references -------------------------------------------------------------------------------
def hand_sparsity(step: int, final: float, initial: float, start: int, end: int, every: int) -> float:
    """Updates at start, start+every, … below end, and at end; the cubic formula at the latest one."""
    updates = list(range(start, end, every)) + [end]
    done = [u for u in updates if u <= step]
    if not done:
        return initial
    t = done[-1]
    return final + (initial - final) * (1 - (t - start) / (end - start)) ** 3


def oracle_keep(scores: list[list[list[float]]], sparsity: float, scope: str) -> list[list[list[bool]]]:
    """Remove the floor(n·s) lowest scores per matrix ("layer") or over all of them ("global");
    ties: the earlier index (in concatenation order) goes first."""
    groups = [[i] for i in range(len(scores))] if scope == "layer" else [list(range(len(scores)))]
    doomed: set[tuple[int, int, int]] = set()
    for group in groups:
        flat = [(v, order, (i, r, c)) for order, (i, r, c, v) in enumerate(
            (i, r, c, v) for i in group for r, row in enumerate(scores[i]) for c, v in enumerate(row))]
        doomed |= {where for _, _, where in sorted(flat)[:int(len(flat) * sparsity + 1e-9)]}
    return [[[(i, r, c) not in doomed for c in range(len(row))] for r, row in enumerate(m)]
            for i, m in enumerate(scores)]


def token_batches(count: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 12), generator=gen) for _ in range(count)]


def train(model: nn.Module, pruner: GradualPruner, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor],
          steps: range) -> None:
    model.train()
    for step in steps:
        ids = batches[step - 1]
        model(input_ids=ids, labels=ids).loss.backward()
        pruner.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.after_step(step)


# --- the schedule -----------------------------------------------------------------------------
def test_schedule_by_hand():
    kw = dict(final=0.8, initial=0.0, start=10, end=30, every=5)
    by_hand = {0: 0.0, 9: 0.0, 10: 0.0, 14: 0.0, 15: 0.8 * (1 - 0.75 ** 3), 19: 0.8 * (1 - 0.75 ** 3),
               20: 0.8 * (1 - 0.5 ** 3), 25: 0.8 * (1 - 0.25 ** 3), 29: 0.8 * (1 - 0.25 ** 3), 30: 0.8, 31: 0.8,
               1000: 0.8}
    for step, expected in by_hand.items():
        assert cubic_sparsity(step, **kw) == pytest.approx(expected, abs=1e-12), step
    # end - start not a multiple of every: updates at 0, 5, 10 and 12; exactly final from 12 on
    kw = dict(final=0.5, initial=0.1, start=0, end=12, every=5)
    assert cubic_sparsity(0, **kw) == pytest.approx(0.1)
    assert cubic_sparsity(7, **kw) == pytest.approx(0.5 - 0.4 * (7 / 12) ** 3)
    assert cubic_sparsity(11, **kw) == pytest.approx(0.5 - 0.4 * (2 / 12) ** 3)
    assert cubic_sparsity(12, **kw) == 0.5 and cubic_sparsity(13, **kw) == 0.5


@pytest.mark.parametrize("start,end,every,initial", [(0, 40, 5, 0.0), (3, 17, 4, 0.2), (5, 6, 10, 0.0),
                                                     (0, 32, 5, 0.1)])
def test_schedule_against_reference(start, end, every, initial):
    kw = dict(final=0.7, initial=initial, start=start, end=end, every=every)
    values = [cubic_sparsity(t, **kw) for t in range(60)]
    for t, value in enumerate(values):
        assert value == pytest.approx(hand_sparsity(t, 0.7, initial, start, end, every), abs=1e-12)
        if t < start:
            assert value == initial
        if t >= end:
            assert value == 0.7  # exactly
        if t > 0 and value != values[t - 1]:
            assert is_update_step(t, start=start, end=end, every=every), t
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert [t for t in range(60) if is_update_step(t, start=start, end=end, every=every)] == \
        sorted(set(range(start, end, every)) | {end})


# --- masks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_masks_match_oracle(family, scope):
    model = tiny_model(family)
    modules = select_modules(model, ["Linear"], ["lm_head"])
    weights = {name: weight_matrix(m).detach().clone() for name, m in modules.items()}
    pruner = GradualPruner(modules, 0.6, 10, end=0.5, every=2, scope=scope)
    pruner.attach()
    pruner.after_step(1)
    assert all(bool(keep.all()) for keep in pruner.masks().values())  # not an update step
    pruner.after_step(4)
    expected = oracle_keep([w.abs().tolist() for w in weights.values()], hand_sparsity(4, 0.6, 0.0, 0, 5, 2), scope)
    masks = pruner.masks()
    for (name, w), keep in zip(weights.items(), expected):
        assert masks[name].tolist() == keep, name
        seen = modules[name].weight.t() if family == "gpt2" else modules[name].weight  # Conv1D: [in, out]
        assert torch.equal(seen, w * masks[name])  # the forward's weight


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_movement_matches_explicit_autograd(scope):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False)).double()
    W = [net[0].weight.detach().clone(), net[2].weight.detach().clone()]
    M = [torch.ones_like(w, dtype=torch.bool) for w in W]
    S = [torch.zeros_like(w) for w in W]
    pruner = GradualPruner({"0": net[0], "2": net[2]}, 0.6, 12, end=0.75, every=3, score="movement", scope=scope)
    pruner.attach()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 13):
        G = [torch.zeros_like(w) for w in W]
        for _ in range(2):  # two micro-batches of gradient accumulation
            x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
            y = torch.randn(4, 3, generator=gen, dtype=torch.float64)
            ((net(x) - y) ** 2).mean().backward()
            # reference: explicit autograd through the effective weights W*M
            eff = [(w * m).requires_grad_() for w, m in zip(W, M)]
            ((torch.tanh(x @ eff[0].T) @ eff[1].T - y) ** 2).mean().backward()
            G = [g + e.grad for g, e in zip(G, eff)]
        pruner.after_backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.after_step(step)
        S = [s - w * g for s, w, g in zip(S, W, G)]
        W = [w - 0.1 * (g * m) for w, g, m in zip(W, G, M)]  # masked weights get no gradient
        if step in (3, 6, 9):
            keep = oracle_keep([s.tolist() for s in S], hand_sparsity(step, 0.6, 0.0, 0, 9, 3), scope)
            M = [torch.tensor(k) for k in keep]
        state = pruner.state_dict()
        for name, s, m, w in zip(("0", "2"), S, M, W):
            assert torch.allclose(state["scores"][name].double(), s, rtol=1e-5, atol=1e-7), (step, name)
            assert torch.equal(state["masks"][name], m), (step, name)
            assert torch.allclose(pruner.modules[name].parametrizations.weight.original, w, atol=1e-12)
    removed = sum(int((~m).sum()) for m in M)
    assert pruner.metrics()["sparsity"] == pytest.approx(removed / (30 + 15))


# --- soft masks: a weight pruned early comes back ---------------------------------------------
def two_update_pruner(weight: list[float], score: str) -> tuple[nn.Linear, GradualPruner]:
    """One output, two inputs; updates after steps 1 and 2, each at sparsity 0.5 (one weight off)."""
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([weight]))
    pruner = GradualPruner({"w": lin}, 0.5, 2, start=0.5, end=1.0, every=1, initial=0.5, score=score)
    pruner.attach()
    return lin, pruner


def test_magnitude_weight_comes_back():
    lin, pruner = two_update_pruner([0.5, 1.0], "magnitude")
    pruner.after_step(1)
    assert pruner.masks()["w"].tolist() == [[False, True]]
    dense = lin.parametrizations.weight.original
    optimizer = torch.optim.SGD([dense], lr=0.45)
    lin(torch.tensor([[1.0, 1.0]])).pow(2).sum().backward()  # shrinks the kept weight 1.0 -> 0.1
    pruner.after_backward()
    optimizer.step()
    pruner.after_step(2)
    assert dense[0].tolist() == pytest.approx([0.5, 0.1])  # the masked weight kept its value
    assert pruner.masks()["w"].tolist() == [[True, False]]
    assert lin.weight[0].tolist() == pytest.approx([0.5, 0.0])


def test_movement_weight_comes_back():
    lin, pruner = two_update_pruner([1.0, 1.0], "movement")
    (-lin(torch.tensor([[0.0, 1.0]]))).sum().backward()  # S = [0, 1]
    pruner.after_backward()
    pruner.after_step(1)
    assert pruner.masks()["w"].tolist() == [[False, True]]
    dense = lin.parametrizations.weight.original
    dense.grad = None
    (-10 * lin(torch.tensor([[1.0, 0.0]]))).sum().backward()  # straight-through: S += [10, 0]
    assert dense.grad.tolist() == [[0.0, 0.0]]  # what the optimizer sees: no gradient for the masked weight
    pruner.after_backward()
    pruner.after_step(2)
    assert pruner.state_dict()["scores"]["w"].tolist() == [[10.0, 1.0]]
    assert pruner.masks()["w"].tolist() == [[True, False]]


# --- a toy training run -----------------------------------------------------------------------
@pytest.mark.parametrize("score,scope", [("magnitude", "layer"), ("movement", "layer"), ("magnitude", "global")])
def test_toy_training_run(score, scope):
    torch.manual_seed(0)
    model = tiny_model("llama")
    keys = list(model.state_dict())
    modules = select_modules(model, ["Linear"], ["lm_head"])
    params = {name: m.weight for name, m in modules.items()}
    pruner = GradualPruner(modules, 0.6, 40, end=0.8, every=5, score=score, scope=scope)
    pruner.attach()
    assert set(model.state_dict()) != set(keys)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = token_batches(40)
    train(model, pruner, optimizer, batches, range(1, 31))
    assert 0 < pruner.metrics()["sparsity"] < 0.6
    train(model, pruner, optimizer, batches, range(31, 41))

    masks = pruner.masks()
    counts = {name: (int((~keep).sum()), keep.numel()) for name, keep in masks.items()}
    if scope == "layer":
        for name, (removed, total) in counts.items():
            assert removed == int(total * 0.6), name
    removed, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    if scope == "global":
        assert removed == int(total * 0.6)
    assert pruner.metrics()["sparsity"] == pytest.approx(removed / total)

    model.eval()
    with torch.no_grad():
        before = model(batches[0]).logits
    summary = pruner.finalize()
    with torch.no_grad():
        after = model(batches[0]).logits
    assert torch.equal(before, after)
    assert list(model.state_dict()) == keys
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    for name, module in modules.items():
        assert type(module) is nn.Linear and module.weight is params[name]  # the optimizer's Parameter
        assert torch.equal(module.weight != 0, masks[name])
        assert summary["layers"][name]["sparsity"] == round(counts[name][0] / counts[name][1], 6)
    assert summary["sparsity"] == round(removed / total, 6) and summary["score"] == score
    assert summary["schedule"]["end_step"] == 32 and summary["schedule"]["every"] == 5


# --- checkpoints ------------------------------------------------------------------------------
def fresh_run(seed: int) -> tuple[nn.Module, GradualPruner]:
    model = tiny_model("llama", seed=seed)
    pruner = GradualPruner(select_modules(model, ["Linear"], ["lm_head"]), 0.5, 20, start=0.1, end=0.8, every=3,
                           score="movement")
    return model, pruner


def test_resume_is_bit_identical(tmp_path):
    batches = token_batches(20)
    model, pruner = fresh_run(seed=0)
    pruner.attach()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, pruner, optimizer, batches, range(1, 21))

    model_a, pruner_a = fresh_run(seed=0)
    pruner_a.attach()
    optimizer_a = torch.optim.AdamW(model_a.parameters(), lr=1e-2)
    train(model_a, pruner_a, optimizer_a, batches, range(1, 8))
    torch.save({"model": model_a.state_dict(), "optimizer": optimizer_a.state_dict(),
                "pruner": pruner_a.state_dict()}, tmp_path / "ckpt.pt")

    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model_b, pruner_b = fresh_run(seed=1)  # different weights: everything must come from the file
    pruner_b.load_state_dict(state["pruner"])   # before attach …
    pruner_b.attach()
    model_b.load_state_dict(state["model"])     # … and the model after (strict)
    optimizer_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2)
    optimizer_b.load_state_dict(state["optimizer"])
    assert pruner_b.step == 7
    train(model_b, pruner_b, optimizer_b, batches, range(8, 21))

    for name, keep in pruner.masks().items():
        assert torch.equal(pruner_b.masks()[name], keep), name
    scores, scores_b = pruner.state_dict()["scores"], pruner_b.state_dict()["scores"]
    assert all(torch.equal(scores[n], scores_b[n]) for n in scores)
    reference = model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in model_b.state_dict().items())
    pruner.finalize()
    pruner_b.finalize()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in model_b.state_dict().items())


def test_state_dict_mismatch_is_refused():
    model = tiny_model("llama")
    state = GradualPruner(select_modules(model, ["Linear"], ["lm_head"]), 0.5, 10).state_dict()
    other = GradualPruner(select_modules(model, ["re:mlp"]), 0.5, 10)
    with pytest.raises(SecateurError, match="checkpoint"):
        other.load_state_dict(state)


# --- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,words", [
    (dict(start=0.5, end=0.5), "start"), (dict(start=0.6, end=0.2), "start"), (dict(end=1.5), "end"),
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"), (dict(score="taylor"), "score"),
    (dict(scope="row"), "scope"), (dict(every=0), "every"), (dict(total_steps=0), "total_steps"),
    (dict(initial=0.9), "initial"), (dict(total_steps=3, start=0.0, end=0.2), "steps"),
    (dict(score="movement", initial=0.2), "movement"),
])
def test_bad_input(kwargs, words):
    model = nn.Sequential(nn.Linear(4, 4))
    args = dict(modules={"0": model[0]}, sparsity=0.5, total_steps=10)
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(SecateurError, match=words) as info:
        GradualPruner(args.pop("modules"), args.pop("sparsity"), args.pop("total_steps"), **kwargs)
    assert "\n" not in str(info.value)


def test_unsupported_module_is_refused():
    with pytest.raises(SecateurError, match="Embedding"):
        GradualPruner({"emb": nn.Embedding(10, 4)}, 0.5, 10)
