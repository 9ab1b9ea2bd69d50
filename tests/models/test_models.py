"""Loading: local directories, the offline hub cache, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import secateur
from secateur.errors import SecateurError
from secateur.testing import tiny_model, tiny_tokenizer


def test_load_real_stories(stories_dir):
    model, tokenizer, arch = secateur.load(stories_dir)
    assert arch.model_type == "llama" and arch.sizes["layers"] == 5 and arch.sizes["kv_heads"] == 4
    assert arch.sizes["parameters"] == 260_032
    assert tokenizer("Once upon a time").input_ids[0] == tokenizer.bos_token_id == 1
    assert not model.training


def test_load_real_minilm(minilm_dir):
    loaded = secateur.load(minilm_dir)
    assert loaded.arch.kind == "encoder" and loaded.arch.sizes["layers"] == 6
    assert len(loaded.info["weights_sha256"]) == 64


def test_load_hub_id_from_offline_cache(tmp_path, monkeypatch):
    """A hub id resolves from the local Hugging Face cache with HF_HUB_OFFLINE=1."""
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / ("a" * 40)
    model = tiny_model("llama")
    model.save_pretrained(snapshot)
    tiny_tokenizer("llama").save_pretrained(snapshot)
    refs = snapshot.parents[1] / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = secateur.load("acme/tiny-llama")
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, model(ids).logits)
    with pytest.raises(SecateurError, match="neither a local directory nor available"):
        secateur.load("acme/not-cached")


def test_errors(tmp_path):
    with pytest.raises(SecateurError, match="does not exist"):
        secateur.load(tmp_path / "missing" / "dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SecateurError, match="no config.json"):
        secateur.load(tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    with pytest.raises(SecateurError, match="unsupported architecture 't5'"):
        secateur.load(other)


def test_refuses_pickled_weights(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "m")
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(SecateurError, match="never unpickles"):
        secateur.load(tmp_path / "m")
