"""Compressed storage of sparse weights: the bitmask-v1 format, save → load round trips, the card's
``storage`` entry, dense export for stock transformers, and damage detection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import secateur
from secateur import artifacts
from secateur.artifacts import bitmask
from secateur.artifacts import card_summary, export_dense, materialize_dense, save, verify
from secateur.errors import ArtifactError
from secateur.prune.magnitude import MagnitudeConfig
from secateur.testing import tiny_model

IDS = torch.tensor([[1, 7, 9, 33, 54, 2, 80, 100]])


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def pruned(family: str, sparsity: float = 0.5):
    model, tokenizer = tiny_model(family, with_tokenizer=True)
    secateur.compress_(model, MagnitudeConfig(sparsity=sparsity))
    return model, tokenizer


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        return fh.metadata() or {}


def keys(path: Path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        return set(fh.keys())


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def auto_class(family: str):
    import transformers

    return transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM


# --- the format ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols", [1, 8, 13, 64])
def test_encode_decode_is_exact(dtype: torch.dtype, cols: int) -> None:
    torch.manual_seed(cols)
    weight = torch.randn(5, cols).to(dtype)
    weight[torch.rand(5, cols) < 0.5] = 0
    weight[0, 0] = float("nan")
    parts = bitmask.encode(weight)
    keep = (weight != 0).numpy()
    assert parts["bitmask"].dtype == torch.uint8 and tuple(parts["bitmask"].shape) == (5, (cols + 7) // 8)
    assert np.array_equal(parts["bitmask"].numpy(), np.packbits(keep, axis=1))   # numpy's layout exactly
    assert parts["values"].dtype == dtype and parts["values"].numel() == int(keep.sum())
    assert parts["shape"].dtype == torch.int64 and parts["shape"].tolist() == [5, cols]
    back = bitmask.decode(**parts)
    assert back.dtype == dtype
    assert torch.equal(back.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       weight.view(torch.int16 if dtype != torch.float32 else torch.int32))  # same bits, NaN included


def test_negative_zeros_come_back_as_zeros() -> None:
    weight = torch.tensor([[-0.0, 1.5, 0.0, -2.0]])
    back = bitmask.decode(**bitmask.encode(weight))
    assert torch.equal(back, weight) and back.tolist() == [[0.0, 1.5, 0.0, -2.0]]
    assert not torch.signbit(back[0, 0])


def test_decode_rejects_parts_that_disagree() -> None:
    parts = bitmask.encode(torch.tensor([[0.0, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="bitmask marks 2 entries but 1 values"):
        bitmask.decode(parts["bitmask"], parts["values"][:1], parts["shape"])
    with pytest.raises(ValueError, match="does not fit a \\[2, 3\\] weight"):
        bitmask.decode(parts["bitmask"], parts["values"], torch.tensor([2, 3]))


# --- save → load round trips -----------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_half_sparse_model_is_smaller_and_loads_back_identical(family: str, tmp_path: Path) -> None:
    model, tokenizer = pruned(family)
    expected = outputs(model)
    path = save(model, tmp_path / "sparse", tokenizer=tokenizer, sparse="auto")
    dense = save(model, tmp_path / "dense", sparse="none")

    card = verify(path)
    storage = card["storage"]
    assert storage["format"] == "bitmask-v1" and storage["sparse_modules"] > 0
    assert storage["bytes"] == weight_bytes(path) == card_summary(card)["weights_bytes"]
    assert storage["dense_bytes"] == weight_bytes(dense)            # exactly what the plain save took
    assert storage["ratio"] == pytest.approx(storage["bytes"] / storage["dense_bytes"], abs=1e-6)
    assert storage["ratio"] < 0.75, storage                         # 1/32 mask + 1/2 values + dense rest
    assert card_summary(card)["storage"] == "bitmask-v1" and card_summary(card)["storage_ratio"] == storage["ratio"]
    assert metadata(path) == {"format": "pt", "secateur_sparse": "bitmask-v1"}
    head = (path / "model.safetensors").read_bytes()[8:200]
    assert b'{"__metadata__":{"format":"pt","secateur_sparse":"bitmask-v1"}' in head   # sorted: same bytes every run
    stored = keys(path)
    compressed = {k[: -len(".bitmask")] for k in stored if k.endswith(".bitmask")}
    assert len(compressed) == storage["sparse_modules"]
    assert all({f"{k}.values", f"{k}.shape", k} <= stored for k in compressed)

    loaded = secateur.load(path)
    assert loaded.model.name_or_path == str(path)
    assert_same_state(loaded.model, model)
    assert torch.equal(outputs(loaded.model), expected)
    assert loaded.tokenizer("hello").input_ids == tokenizer("hello").input_ids
    assert loaded.info["card"]["storage"] == storage
    state = materialize_dense(path)
    assert all(torch.equal(state[k], v) for k, v in materialize_dense(dense).items())

    # stock transformers: a dense export loads and agrees; the compressed directory fails loudly
    exported = export_dense(path, tmp_path / "exported")
    ecard = verify(exported)
    assert ecard["storage"]["format"] == "dense" and ecard["storage"]["ratio"] == 1.0
    assert ecard["storage"]["exported_from"] == {"path": str(path), "format": "bitmask-v1",
                                                 "weights_sha256": card["weights_sha256"]}
    assert ecard["history"] == card["history"] and ecard["recipe"] == card["recipe"]
    assert "secateur_sparse" not in metadata(exported) and set(ecard["files"]) == set(card["files"])
    stock = auto_class(family).from_pretrained(exported).eval()
    assert torch.equal(outputs(stock), expected)
    with pytest.raises(RuntimeError, match="mismatch"):
        auto_class(family).from_pretrained(path)


def test_zeros_written_as_positive_zeros_come_back_bit_for_bit(tmp_path: Path) -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers"):
                module.weight.masked_fill_(module.weight.abs() < module.weight.abs().median(), 0.0)
    loaded = secateur.load(save(model, tmp_path / "a", sparse="auto")).model
    before, after = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(before[k].view(torch.int32), after[k].view(torch.int32)) for k in before)


def test_resaving_a_loaded_sparse_artifact_gives_the_same_weights(tmp_path: Path) -> None:
    model, _ = pruned("llama")
    first = verify(save(model, tmp_path / "first", sparse="auto"))
    second = verify(save(secateur.load(tmp_path / "first").model, tmp_path / "second", sparse="auto"))
    assert second["weights_sha256"] == first["weights_sha256"]


def test_dense_model_stays_in_the_plain_format(tmp_path: Path) -> None:
    model, tokenizer = tiny_model("llama", with_tokenizer=True)
    path = save(model, tmp_path / "dense", tokenizer=tokenizer, sparse="auto")
    storage = verify(path)["storage"]
    assert storage == {"format": "dense", "sparse_modules": 0, "dense_bytes": weight_bytes(path),
                       "bytes": weight_bytes(path), "ratio": 1.0, "min_zeros": bitmask.MIN_ZEROS}
    assert metadata(path) == {"format": "pt"} and not any(k.endswith(".bitmask") for k in keys(path))
    assert torch.equal(outputs(auto_class("llama").from_pretrained(path).eval()), outputs(model))


def test_modes_and_threshold(tmp_path: Path) -> None:
    model, _ = pruned("llama", sparsity=0.2)                       # below the auto threshold
    assert verify(save(model, tmp_path / "auto", sparse="auto"))["storage"]["format"] == "dense"
    forced = save(model, tmp_path / "forced", sparse="bitmask")     # every Linear weight, pruned or not
    storage = verify(forced)["storage"]
    linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert storage["format"] == "bitmask-v1" and storage["sparse_modules"] == linear
    assert storage["min_zeros"] is None                             # no threshold applied
    assert_same_state(secateur.load(forced).model, model)

    half, _ = pruned("llama")
    assert verify(save(half, tmp_path / "none", sparse="none"))["storage"]["format"] == "dense"
    default = save(half, tmp_path / "default")                      # the default stays stock-loadable
    assert verify(default)["storage"] == {"format": "dense", "sparse_modules": 0, "dense_bytes": weight_bytes(default),
                                          "bytes": weight_bytes(default), "ratio": 1.0, "min_zeros": None}
    assert torch.equal(outputs(auto_class("llama").from_pretrained(default).eval()), outputs(half))
    with pytest.raises(ArtifactError, match=r"sparse='zip' is not a storage mode; valid modes: 'auto', 'bitmask'"):
        save(half, tmp_path / "bad", sparse="zip")
    assert not (tmp_path / "bad").exists()


def test_sharded_sparse_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = pruned("llama")
    real = model.save_pretrained
    monkeypatch.setattr(model, "save_pretrained", lambda directory, **kw: real(directory, max_shard_size="30KB", **kw))
    path = save(model, tmp_path / "sharded", sparse="auto")
    card = verify(path)
    shards = sorted(n for n in card["files"] if n.endswith(".safetensors"))
    assert len(shards) > 1 and card["storage"]["format"] == "bitmask-v1"
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in shards:
        with safe_open(str(path / shard), framework="pt") as fh:
            assert all(index[key] == shard for key in fh.keys())
    assert_same_state(secateur.load(path).model, model)
    exported = export_dense(path, tmp_path / "dense")
    dense_index = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.endswith((".bitmask", ".values", ".shape")) for k in dense_index)
    assert torch.equal(outputs(auto_class("llama").from_pretrained(exported).eval()), outputs(model))


# --- damage and refusals ------------------------------------------------------------------------

def test_tampering_with_a_sparse_artifact_is_caught(tmp_path: Path) -> None:
    model, _ = pruned("llama")
    path = save(model, tmp_path / "a", sparse="auto")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors sha256 mismatch"):
        secateur.load(path)
    with pytest.raises(ArtifactError, match=r"model\.safetensors sha256 mismatch"):
        export_dense(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_its_own_source(tmp_path: Path) -> None:
    path = save(pruned("llama")[0], tmp_path / "a", sparse="auto")
    with pytest.raises(ArtifactError, match="is the artifact itself"):
        export_dense(path, path)
    verify(path)


# --- a real model -------------------------------------------------------------------------------

def test_stories260k_half_sparse_storage(stories_dir: Path, tmp_path: Path) -> None:
    model, tokenizer, _ = secateur.load(stories_dir)
    secateur.compress_(model, MagnitudeConfig(sparsity=0.5))
    expected = outputs(model)
    path = save(model, tmp_path / "stories", tokenizer=tokenizer, sparse="auto")
    storage = verify(path)["storage"]
    message = (f"stories260K at 50% magnitude: {storage['bytes']} of {storage['dense_bytes']} dense bytes "
               f"(ratio {storage['ratio']:.3f}, {storage['sparse_modules']} compressed weights)")
    assert storage["format"] == "bitmask-v1" and storage["ratio"] < 0.65, message
    loaded = secateur.load(path)
    assert_same_state(loaded.model, model)
    assert torch.equal(outputs(loaded.model), expected), message
    assert artifacts.card_summary(loaded.info["card"])["storage_ratio"] == storage["ratio"]
