"""Artifacts the registry tests share: a tiny Llama base and a magnitude-pruned child of it."""

from __future__ import annotations

from pathlib import Path

import pytest

import secateur
from secateur import artifacts
from secateur.testing import tiny_model


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base (tiny llama, with its tokenizer) -> pruned (magnitude 0.5), as artifacts."""
    root = tmp_path_factory.mktemp("made")
    model, tokenizer = tiny_model("llama", with_tokenizer=True)
    out = {"base": secateur.save(model, root / "base", tokenizer=tokenizer)}
    loaded = artifacts.load(out["base"])
    secateur.compress_(loaded.model, secateur.MagnitudeConfig(sparsity=0.5))
    out["pruned"] = secateur.save(loaded.model, root / "pruned", tokenizer=loaded.tokenizer)
    return out
