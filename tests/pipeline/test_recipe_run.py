"""Running a recipe end to end: calibration data by convention, evaluations, the card."""

from __future__ import annotations

import json

import pytest
import torch

from secateur.errors import SecateurError
from secateur.artifacts import load
from secateur.pipeline import calibration_data, run_recipe
from secateur.recipe import Recipe


def test_calibration_data_follows_p1(stories_dir, data_dir):
    loaded = load(stories_dir)
    recipe = Recipe.from_dict({"model": str(stories_dir), "data": {"source": "tinystories"},
                               "steps": [{"method": "magnitude"}]})
    calib = calibration_data(recipe, loaded.tokenizer)
    assert calib.input_ids.shape == (128, 256) and calib.settings["mode"] == "consecutive"
    # P1: consecutive windows from the start of the calibration stream, BOS first
    assert calib.input_ids[0, 0].item() == loaded.tokenizer.bos_token_id
    again = calibration_data(recipe, loaded.tokenizer)
    assert torch.equal(calib.input_ids, again.input_ids) and calib.fingerprint == again.fingerprint
    c4 = calibration_data(recipe.with_overrides(["data.source=c4", "data.samples=4"]), loaded.tokenizer)
    assert c4.settings["mode"] == "random" and c4.input_ids.shape == (4, 256)


def test_recipe_without_model_is_refused(stories_dir):
    recipe = Recipe.from_dict({"steps": [{"method": "magnitude"}]})
    with pytest.raises(SecateurError, match="names no model"):
        run_recipe(recipe)


def test_run_records_metrics_and_fingerprint(stories_dir, data_dir, tmp_path):
    recipe = Recipe.from_dict({
        "model": str(stories_dir), "data": {"source": "tinystories", "samples": 8},
        "steps": [{"method": "magnitude", "sparsity": 0.2}],
        "eval": [{"task": "perplexity", "data": "tinystories", "options": {"max_windows": 20}}]})
    result = run_recipe(recipe, out=tmp_path / "art")
    assert result.after[0]["value"] > result.before[0]["value"]
    card = json.loads((tmp_path / "art" / "compression.json").read_text())
    assert card["metrics"]["before"][0]["value"] == result.before[0]["value"]
    assert card["data_fingerprints"] == [result.data_fingerprint]
    assert card["base_model"]["weights_sha256"] == load(stories_dir).info["weights_sha256"]
    assert card["recipe"]["steps"][0]["sparsity"] == 0.2
