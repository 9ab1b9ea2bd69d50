"""A table-driven contract every registered method must meet, on every supported family.

A new method gets these checks for free by registering itself: its config round-trips through a
recipe, its `explain` example is a valid recipe, and applying it to a tiny model of each family
keeps the model runnable and savable (stock transformers reloads identical outputs).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from secateur import compress_, load, save
from secateur.api import methods
from secateur.recipe import Recipe, example_yaml
from secateur.testing import FAMILIES, tiny_model

DATA_FREE = [name for name, m in methods().items() if not m.needs_data and not m.trains]
TRAINING = [name for name, m in methods().items() if m.trains]


def outputs(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", sorted(methods()))
def test_config_round_trip_and_example(name):
    spec = methods()[name]
    config = spec.config()
    assert spec.config.from_dict(config.to_dict()) == config
    recipe = Recipe.from_yaml(example_yaml(name))
    assert recipe.steps[0].method == name
    assert Recipe.from_yaml(recipe.dump()) == recipe


def _training_run(name, family):
    """Training steps read token windows and imitate a teacher: two short steps on random windows."""
    from secateur.data.calibration import CalibrationSet

    ids = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    config = methods()[name].config(steps=2, batch_size=2, eval_every=0, checkpoint_every=0, holdout=0.0)
    return config, {"data": CalibrationSet(ids, "contract"), "teacher": tiny_model(family, seed=1)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", DATA_FREE + TRAINING)
def test_apply_save_stock_reload(name, family, tmp_path):
    """Quantized models are compared on their reference path (dequantize, then a float matmul), which
    is what stock transformers computes; a card that says its checkpoint is not stock-loadable (GPT-2's
    Conv1D, which compressed-tensors does not quantize) is held to secateur.load only."""
    from secateur.runtime.linear import reference_only

    model = tiny_model(family)
    ids = torch.randint(3, 100, (2, 12))
    config, extra = _training_run(name, family) if name in TRAINING else (methods()[name].config(), {})
    compress_(model, config, **extra)
    with reference_only():
        expected = outputs(model, ids)
    assert torch.isfinite(expected).all()
    path = save(model, tmp_path / "artifact")
    card = load(path).info["card"]
    if (card.get("quantization") or {}).get("stock_transformers", True):
        auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
        stock = auto.from_pretrained(path).eval()
        assert torch.equal(outputs(stock, ids), expected)
    else:
        assert family == "gpt2" and methods()[name].kind == "quantize"
    with reference_only():
        assert torch.equal(outputs(load(path).model, ids), expected)
