"""layer_stats on real artifacts of a tiny Llama, against slow, obviously correct references
computed from the model in memory (element by element, before it was ever written)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import secateur
from secateur import report
from secateur.errors import SecateurError
from secateur.testing import tiny_model

pytest.importorskip("compressed_tensors", reason="quantized artifacts need the quant extra (in dev)")


def reference(model: torch.nn.Module) -> dict[str, dict[str, float | int]]:
    """Per projection module: the fraction of its (dequantized) weight entries that are exactly
    zero, counted one by one in Python, and its bits per stored weight."""
    from secateur.runtime.linear import QuantLinear

    sparsity, bits = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            weight, width = module.dequantized_weight(torch.float32), module.bits
        elif isinstance(module, torch.nn.Linear):
            weight, width = module.weight.detach(), module.weight.element_size() * 8
        else:
            continue
        values = [v for row in weight.tolist() for v in row]
        sparsity[name] = sum(1 for v in values if v == 0.0) / len(values)
        bits[name] = width
    return {"sparsity": sparsity, "bits": bits}


def check(stats: dict, ref: dict) -> None:
    assert set(stats) == {"sparsity", "bits"}
    assert set(stats["sparsity"]) == set(ref["sparsity"]) == set(stats["bits"])
    for name, value in ref["sparsity"].items():
        assert stats["sparsity"][name] == pytest.approx(value, abs=1e-6), name
    assert stats["bits"] == ref["bits"]


def stored(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def build(tmp_path, name: str, *steps, sparse: str = "none"):
    model = tiny_model("llama")
    for step in steps:
        secateur.compress_(model, step)
    ref = reference(model)
    path = secateur.save(model, tmp_path / name, sparse=sparse)
    return path, ref


@pytest.mark.parametrize("sparse", ["none", "auto"])
def test_magnitude_sparsity_read_from_dense_and_bitmask_files(tmp_path, sparse):
    path, ref = build(tmp_path, f"magnitude-{sparse}", secateur.MagnitudeConfig(sparsity=0.5), sparse=sparse)
    stats = report.layer_stats(path)
    check(stats, ref)
    blocks = [n for n in stats["sparsity"] if ".layers." in n]
    assert len(blocks) == 14 and all(stats["sparsity"][n] == pytest.approx(0.5) for n in blocks)
    assert stats["sparsity"]["lm_head"] == 0.0 and stats["bits"]["lm_head"] == 32
    assert not [n for n in stats["sparsity"] if "embed" in n]
    if sparse == "auto":  # the bitmask layout really was used
        assert any(k.endswith(".weight.bitmask") for k in stored(path))
    assert list(stats["sparsity"])[-1] == "lm_head"  # blocks first, in order, then the rest


def test_rtn_bits_and_sparsity_read_from_packed_integers(tmp_path):
    path, ref = build(tmp_path, "rtn", secateur.RTNConfig(bits=4, group_size=16))
    stats = report.layer_stats(path)
    check(stats, ref)
    card = json.loads((path / "compression.json").read_text())
    assert {n: e["bits"] for n, e in card["quantization"]["layers"].items()} == \
        {n: b for n, b in stats["bits"].items() if n != "lm_head"}
    # 4-bit rounding sends some small weights to exactly zero: a real (and small) sparsity
    assert all(0 < stats["sparsity"][n] < 0.3 for n in stats["sparsity"] if n != "lm_head")


def test_pruned_then_asymmetric_4_bit_keeps_its_zeros(tmp_path):
    path, ref = build(tmp_path, "prune-quant", secateur.MagnitudeConfig(sparsity=0.5),
                      secateur.RTNConfig(bits=4, group_size=16, symmetric=False))
    assert any(k.endswith(".weight_zero_point") for k in stored(path))  # packed zero points, really
    stats = report.layer_stats(path)
    check(stats, ref)
    assert all(stats["sparsity"][n] >= 0.5 for n in stats["sparsity"] if n != "lm_head")


def test_w8a8_int_quantized_layout(tmp_path):
    path, ref = build(tmp_path, "w8a8", secateur.RTNConfig(bits=8, strategy="channel", activations="int8"))
    assert stored(path)["model.layers.0.mlp.down_proj.weight"] == "I8"  # int8 weights, not packed
    stats = report.layer_stats(path)
    check(stats, ref)
    assert {b for n, b in stats["bits"].items() if n != "lm_head"} == {8}


def test_bits_from_the_config_when_the_card_is_gone(tmp_path):
    path, ref = build(tmp_path, "no-card", secateur.RTNConfig(bits=4, group_size=16))
    (path / "compression.json").unlink()
    check(report.layer_stats(path), ref)


def test_a_directory_without_weights_is_one_line(tmp_path):
    with pytest.raises(SecateurError, match="holds no safetensors weights"):
        report.layer_stats(tmp_path)
    with pytest.raises(SecateurError, match="holds no safetensors weights"):
        report.layer_stats(tmp_path / "missing")


def test_real_artifacts_make_a_report(tmp_path):
    """The report of a base and two real variants, their cards and layer statistics as read here."""
    base = tiny_model("llama")
    base_dir = secateur.save(base, tmp_path / "base")
    a, _ = build(tmp_path, "sparse", secateur.MagnitudeConfig(sparsity=0.5), sparse="auto")
    b, _ = build(tmp_path, "w4", secateur.RTNConfig(bits=4, group_size=16))

    def entry(name, path, parent=None, status="admitted"):
        card = json.loads((path / "compression.json").read_text())
        return {"name": name, "parent": parent, "status": status, "card": card, "layers": report.layer_stats(path)}

    family = {"family": "tiny", "machine": {"cpu": "test", "threads": 1},
              "base": entry("base", base_dir, status="base"),
              "variants": [entry("sparse", a, "base"), entry("w4", b, "sparse", "rejected")]}
    text = report.render(family)
    for plot in ("heatmap-sparsity", "heatmap-bits"):
        figure = re.search(rf'<figure class="plot" data-plot="{plot}">.*?</figure>', text, re.S).group(0)
        assert figure.count('class="mark variant') == 2 and figure.count('class="mark base"') == 1
        assert len(re.findall(r'<rect class="cell"', figure)) == 3 * 15  # 3 models x (14 projections + lm_head)
    assert "bitmask-v1" in text and "compressed-tensors pack-quantized, 4-bit, group 16" in text
    assert "50.0% zeros" in text and "4-bit</title>" in text
