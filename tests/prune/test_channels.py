"""Channel pruning of arbitrary models through Torch-Pruning: shapes, exact oracles, a hand-written
reference for the magnitude score, the Taylor path, and the errors a user can cause."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")

from secateur.errors import SecateurError  # noqa: E402
from secateur.prune.channels import prune_channels  # noqa: E402


class MLP(nn.Module):
    def __init__(self, d_in=5, h1=8, h2=8, d_out=3):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(d_in, h1), nn.Linear(h1, h2), nn.Linear(h2, d_out)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    """stem -> residual block (conv_a, conv_b added back onto the stem's output) -> strided conv -> pool -> head."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv_a, self.bn_a = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv_b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv_c = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(x))))))
        x = torch.relu(self.conv_c(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def cnn(seed=0):
    torch.manual_seed(seed)
    model = CNN()
    for bn in (model.bn, model.bn_a, model.bn_b):  # non-trivial eval-mode statistics
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def dims(model):
    return {n: [m.out_features, m.in_features] if isinstance(m, nn.Linear) else [m.out_channels, m.in_channels]
            for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def alive(n, dead):
    return [i for i in range(n) if i not in dead]


# ---------------------------------------------------------------- shapes and report

@pytest.mark.parametrize("make, x", [(cnn, torch.randn(2, 3, 8, 8)), (lambda: MLP(), torch.randn(4, 5))])
def test_half_the_channels_go_output_shape_stays_and_report_matches(make, x):
    model = make().train()
    before, params, y = dims(model), n_params(model), model.eval()(x)
    model.train()
    report = prune_channels(model, x, 0.5)
    after = dims(model)
    assert model.training and all(m.training for m in model.modules())  # mode restored after tracing
    for name, (out, _) in before.items():
        assert after[name][0] == (out if name == "head" else out // 2), name  # the head's outputs are never pruned
    assert model.eval()(x).shape == y.shape
    assert report["backend"] == "torch-pruning" and report["importance"] == "magnitude" and report["fraction"] == 0.5
    assert report["ignored"] == ["head"]
    assert report["parameters_before"] == params > report["parameters_after"] == n_params(model)
    assert report["layers"] == {n: {"before": before[n], "after": after[n]} for n in before if before[n] != after[n]}
    assert set(report["layers"]) == set(before)  # every layer shrank on one side or the other, the head on its input


def test_fraction_zero_leaves_the_model_alone():
    model, x = MLP(), torch.randn(2, 5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune_channels(model, x, 0.0)
    assert report["layers"] == {} and report["parameters_after"] == report["parameters_before"]
    assert "unchanged" in report["note"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# ---------------------------------------------------------------- oracle: dead channels go, outputs stay

def test_mlp_dead_units_are_exactly_the_ones_removed_and_outputs_do_not_change():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(32, 5)
    dead1, dead2 = [1, 4, 6, 7], [0, 2, 5, 6]
    with torch.no_grad():  # a dead unit: zero incoming row and bias (0 after ReLU) and zero outgoing column
        model.fc1.weight[dead1] = 0; model.fc1.bias[dead1] = 0; model.fc2.weight[:, dead1] = 0
        model.fc2.weight[dead2] = 0; model.fc2.bias[dead2] = 0; model.head.weight[:, dead2] = 0
    ref, w = model(x).detach(), {k: v.clone() for k, v in model.state_dict().items()}
    prune_channels(model, x, 0.5)
    a1, a2 = alive(8, dead1), alive(8, dead2)
    assert torch.allclose(model(x), ref, atol=1e-5)
    assert torch.equal(model.fc1.weight, w["fc1.weight"][a1]) and torch.equal(model.fc1.bias, w["fc1.bias"][a1])
    assert torch.equal(model.fc2.weight, w["fc2.weight"][a2][:, a1]) and torch.equal(model.fc2.bias, w["fc2.bias"][a2])
    assert torch.equal(model.head.weight, w["head.weight"][:, a2])


def test_cnn_dead_channels_through_batchnorm_and_residual_are_exactly_the_ones_removed():
    model, x = cnn(), torch.randn(3, 3, 8, 8)
    res, inner, dead_c = [0, 3, 5, 6], [1, 2, 4, 7], [0, 1, 4, 5, 9, 10, 12, 15]
    with torch.no_grad():
        for conv, bn in ((model.stem, model.bn), (model.conv_b, model.bn_b)):  # the residual stream's channels
            conv.weight[res] = 0; conv.bias[res] = 0; bn.weight[res] = 0; bn.bias[res] = 0
        model.conv_a.weight[:, res] = 0; model.conv_c.weight[:, res] = 0
        model.conv_a.weight[inner] = 0; model.conv_a.bias[inner] = 0  # inside the block
        model.bn_a.weight[inner] = 0; model.bn_a.bias[inner] = 0; model.conv_b.weight[:, inner] = 0
        model.conv_c.weight[dead_c] = 0; model.conv_c.bias[dead_c] = 0; model.head.weight[:, dead_c] = 0
    ref, w = model(x).detach(), {k: v.clone() for k, v in model.state_dict().items()}
    report = prune_channels(model, x, 0.5)
    r, i, c = alive(8, res), alive(8, inner), alive(16, dead_c)
    assert torch.allclose(model(x), ref, atol=1e-5)
    expected = {"stem.weight": w["stem.weight"][r], "bn.weight": w["bn.weight"][r], "bn.running_mean": w["bn.running_mean"][r],
                "conv_a.weight": w["conv_a.weight"][i][:, r], "bn_a.running_var": w["bn_a.running_var"][i],
                "conv_b.weight": w["conv_b.weight"][r][:, i], "bn_b.bias": w["bn_b.bias"][r],
                "conv_c.weight": w["conv_c.weight"][c][:, r], "head.weight": w["head.weight"][:, c]}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert report["layers"]["conv_c"] == {"before": [16, 8], "after": [8, 4]}


# ---------------------------------------------------------------- slow reference for the magnitude score

def reference_keep(w_in: list[list[float]], w_out: list[list[float]], keep: int, p: int) -> list[int]:
    """What Torch-Pruning 1.6's GroupMagnitudeImportance scores for a hidden unit j between two Linears:
    the mean over the group's two members of sum |w|^p -- the producer's row j (bias NOT included) and
    the consumer's column j (no root); its final division by the mean score does not change the order.
    Returns the indices of the `keep` highest scores, sorted."""
    scores = []
    for j in range(len(w_in)):
        row = sum(abs(v) ** p for v in w_in[j])
        col = sum(abs(w_out[o][j]) ** p for o in range(len(w_out)))
        scores.append((row + col) / 2)
    return sorted(sorted(range(len(scores)), key=lambda j: -scores[j])[:keep])


def seeded_mlp(seed=1):
    g, model = torch.Generator().manual_seed(seed), MLP()
    with torch.no_grad():
        model.fc1.weight.copy_(torch.randn(8, 5, generator=g)); model.fc1.bias.copy_(2 * torch.randn(8, generator=g))
        model.fc2.weight.copy_(torch.randn(8, 8, generator=g)); model.fc2.bias.copy_(2 * torch.randn(8, generator=g))
        model.head.weight.copy_(torch.randn(3, 8, generator=g))
    return model


def kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return [next(j for j in range(len(before)) if torch.equal(before[j], row)) for row in after]


@pytest.mark.parametrize("norm, p", [("l2", 2), ("l1", 1)])
def test_magnitude_keeps_the_units_a_hand_written_group_score_ranks_highest(norm, p):
    model = seeded_mlp()
    w1, w2, w3 = (m.weight.detach().clone() for m in (model.fc1, model.fc2, model.head))
    want1 = reference_keep(w1.tolist(), w2.tolist(), 4, p)
    want2 = reference_keep(w2.tolist(), w3.tolist(), 4, p)
    prune_channels(model, torch.randn(2, 5), 0.5, norm=norm)
    assert kept_rows(w1, model.fc1.weight) == want1
    assert kept_rows(w2[:, want1], model.fc2.weight) == want2


def test_the_reference_is_discriminative():
    """The seeded weights tell the mirrored score apart from the plausible alternatives: some pruned
    layer would keep different units under each of them."""
    model = seeded_mlp()
    ws = [m.weight.detach().tolist() for m in (model.fc1, model.fc2, model.head)]
    biases = [model.fc1.bias.tolist(), model.fc2.bias.tolist()]

    def top(scores):
        return sorted(sorted(range(len(scores)), key=lambda j: -scores[j])[:4])

    def alternatives(w_in, w_out, bias):
        row = [sum(v * v for v in r) for r in w_in]
        col = [sum(w_out[o][j] ** 2 for o in range(len(w_out))) for j in range(len(w_in))]
        return [top(row),  # the producer's filter norm only
                top([math.sqrt(a) + math.sqrt(b) for a, b in zip(row, col)]),  # sum of norms, not of squares
                top([a + b + c * c for a, b, c in zip(row, col, bias)])]  # bias included

    for k in range(3):
        picks = [(alternatives(ws[i], ws[i + 1], biases[i])[k], reference_keep(ws[i], ws[i + 1], 4, 2)) for i in range(2)]
        assert any(alt != ref for alt, ref in picks), k


# ---------------------------------------------------------------- taylor

def taylor_mlp():
    """Unit 0 has by far the largest weights but never fires on the data (bias -1000): zero gradient."""
    torch.manual_seed(0)
    model = MLP(d_in=3, h1=4, h2=4, d_out=2)
    with torch.no_grad():
        model.fc1.weight[0] = 10.0; model.fc1.bias[0] = -1000.0; model.fc2.weight[:, 0] = 10.0
        model.fc1.bias[1:] = 3.0  # the others always fire
    return model


def test_taylor_removes_the_big_but_useless_unit_that_magnitude_keeps():
    batches = [(torch.randn(8, 3), torch.randn(8, 2)) for _ in range(2)]

    def loss_fn(model, batch):
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    by_magnitude, by_taylor = taylor_mlp(), taylor_mlp()
    w1 = by_taylor.fc1.weight.detach().clone()
    ref = [by_taylor(b[0]).detach() for b in batches]
    prune_channels(by_magnitude, batches[0][0], 0.25)
    report = prune_channels(by_taylor, batches[0][0], 0.25, "taylor", batches=batches, loss_fn=loss_fn)
    assert 0 in kept_rows(w1, by_magnitude.fc1.weight)
    assert kept_rows(w1, by_taylor.fc1.weight) == [1, 2, 3]
    assert report["importance"] == "taylor" and report["layers"]["fc1"]["after"] == [3, 3]
    assert all(torch.allclose(by_taylor(b[0]), r, atol=1e-5) for b, r in zip(batches, ref))  # a dead unit went
    assert all(p.grad is None for p in by_taylor.parameters())  # calibration gradients are cleared


def test_taylor_needs_batches_and_loss_fn():
    for kwargs in ({}, {"batches": [torch.randn(2, 5)]}, {"loss_fn": lambda m, b: m(b).sum()}, {"batches": []}):
        with pytest.raises(SecateurError, match="batches=.*loss_fn="):
            prune_channels(MLP(), torch.randn(2, 5), 0.5, "taylor", **kwargs)


# ---------------------------------------------------------------- ignore

def test_ignore_keeps_output_channels_and_the_whole_coupled_group():
    model, x = MLP(), torch.randn(2, 5)
    report = prune_channels(model, x, 0.5, ignore=["fc1"])
    assert dims(model) == {"fc1": [8, 5], "fc2": [4, 8], "head": [3, 4]}
    assert report["ignored"] == ["fc1", "head"]
    model = cnn()  # conv_b is tied to the stem by the residual add: ignoring it keeps the stem whole too
    prune_channels(model, torch.randn(1, 3, 8, 8), 0.5, ignore=["conv_b"])
    assert dims(model) == {"stem": [8, 3], "conv_a": [4, 8], "conv_b": [8, 4], "conv_c": [8, 8], "head": [5, 8]}


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, message", [
    ({"importance": "random"}, r"unknown importance 'random'.*'magnitude', 'taylor'"),
    ({"importance": "magnitud"}, r"did you mean 'magnitude'"),
    ({"fraction": 1.0}, r"fraction must be a number in \[0, 1\).*1\.0"),
    ({"fraction": -0.1}, r"fraction must be"),
    ({"fraction": 0.95}, r"would remove all 8 output channels of 'fc[12]'"),
    ({"ignore": ["fc3"]}, r"no module named 'fc3'.*valid names include 'fc1', 'fc2', 'head'"),
    ({"norm": "l3"}, r"unknown norm 'l3'"),
    ({"round_to": 0}, r"round_to must be an integer >= 1"),
])
def test_user_errors_are_secateur_errors_and_leave_the_model_alone(kwargs, message):
    model = MLP()
    before = dims(model)
    with pytest.raises(SecateurError, match=message):
        prune_channels(model, torch.randn(2, 5), **{"fraction": 0.5, **kwargs})
    assert dims(model) == before


def test_missing_torch_pruning_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # makes `import torch_pruning` raise ImportError
    with pytest.raises(SecateurError, match=r"needs Torch-Pruning: pip install 'secateur\[torch-pruning\]'"):
        prune_channels(MLP(), torch.randn(2, 5), 0.5)
