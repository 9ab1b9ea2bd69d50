"""llama2.c import: stories260K.bin + tok512.model must reproduce the shared Hugging Face stories260K
(weights, logits, greedy text, tokenizer), the newer export versions must read back the same
weights, and bad inputs must fail with one clear SecateurError line."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from secateur.errors import SecateurError
from secateur.models.llama2c import MAGIC, import_llama2c

BIN, TOK = "stories260K.bin", "tok512.model"


# --- an independent reader/writer of the llama2.c layouts, to make v1/v2/untied test files ----------

def _v0_blocks(path: Path) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    """The 7 header ints and each v0 block (all layers of one tensor kind, flat float32)."""
    raw = path.read_bytes()
    dims = struct.unpack("<7i", raw[:28])
    dim, hidden, layers, heads, kv_heads, vocab, seq = dims
    kv = dim // heads * kv_heads
    sizes = {"embed": abs(vocab) * dim, "attn_norm": layers * dim, "wq": layers * dim * dim,
             "wk": layers * kv * dim, "wv": layers * kv * dim, "wo": layers * dim * dim,
             "ffn_norm": layers * dim, "w1": layers * hidden * dim, "w2": layers * hidden * dim,
             "w3": layers * hidden * dim, "final_norm": dim, "freqs": seq * (dim // heads)}
    floats = np.frombuffer(raw, dtype="<f4", offset=28)
    blocks, at = {}, 0
    for name, size in sizes.items():
        blocks[name] = floats[at:at + size]
        at += size
    assert at == floats.size, "the shared stories260K.bin is not the expected shared-classifier v0 file"
    return dims, blocks


_MATRICES = ("embed", "wq", "wk", "wv", "wo", "w1", "w2", "w3")
_NORMS = ("attn_norm", "ffn_norm", "final_norm")


def _header(version: int, dims: tuple[int, ...], extra: bytes = b"") -> bytes:
    head = struct.pack("<Ii7iB", MAGIC, version, *dims, 1) + extra
    return head + b"\0" * (256 - len(head))


def _write_v1(path: Path, dims: tuple[int, ...], blocks: dict[str, np.ndarray]) -> None:
    path.write_bytes(_header(1, dims) + b"".join(blocks[n].tobytes() for n in _NORMS + _MATRICES))


def _write_v2(path: Path, dims: tuple[int, ...], blocks: dict[str, np.ndarray],
              group: int = 64) -> dict[str, np.ndarray]:
    """Write a Q8_0 file and return the dequantized blocks the importer should read back."""
    values, scales, dequantized = [], [], {}
    for name in _MATRICES:
        w = blocks[name].reshape(-1, group).astype(np.float64)
        scale = (np.abs(w).max(axis=1) / 127.0).astype(np.float32)
        q = np.round(w / scale[:, None]).astype(np.int8)
        values.append(q.tobytes())
        scales.append(scale.tobytes())
        dequantized[name] = (q.astype(np.float32) * scale[:, None]).reshape(-1)
    body = b"".join(blocks[n].tobytes() for n in _NORMS) + b"".join(values) + b"".join(scales)
    path.write_bytes(_header(2, dims, struct.pack("<i", group)) + body)
    return dequantized


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


# --- fixtures: convert once, load once ---------------------------------------------------------

@pytest.fixture(scope="module")
def spm():
    """sentencepiece is an optional extra: tests that build a tokenizer skip without it."""
    return pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def imported(spm, llama2c_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llama2c") / "stories260K"
    assert import_llama2c(llama2c_dir / BIN, llama2c_dir / TOK, out) == out
    return out


@pytest.fixture(scope="module")
def pair(imported: Path, stories_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(path: Path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(path)

    return load(imported), load(stories_dir)


@pytest.fixture(scope="module")
def paragraphs(shared_dir: Path) -> list[str]:
    path = shared_dir / "data" / "tinystories" / "tinystories_val.txt"
    if not path.exists():
        pytest.skip(f"TinyStories validation text not found at {path}")
    text = path.read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()][:100]


# --- reproducing the shared Hugging Face model ---------------------------------------------------

def test_writes_safetensors_only_and_atomically(imported: Path) -> None:
    names = sorted(p.name for p in imported.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert not [p for p in imported.parent.iterdir() if ".tmp-" in p.name]


def test_config_matches_shared(imported: Path, stories_dir: Path) -> None:
    mine = json.loads((imported / "config.json").read_text())
    ref = json.loads((stories_dir / "config.json").read_text())
    fields = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
              "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id",
              "hidden_act", "attention_bias", "mlp_bias", "dtype")
    assert {f: mine.get(f) for f in fields} == {f: ref.get(f) for f in fields}


def test_weights_and_logits_match_shared(imported: Path, stories_dir: Path, pair, paragraphs: list[str]) -> None:
    mine, ref = _weights(imported), _weights(stories_dir)
    assert mine.keys() == ref.keys()
    assert max((mine[k] - ref[k]).abs().max().item() for k in ref) == 0.0   # a pure reshuffle: exact
    (model, _), (ref_model, ref_tok) = pair
    ids = ref_tok("\n".join(paragraphs[:8]), return_tensors="pt").input_ids[:, :512]
    assert ids.shape[1] > 256
    with torch.no_grad():
        diff = (model(ids).logits - ref_model(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_greedy_generation_identical(pair) -> None:
    (model, tok), (ref_model, ref_tok) = pair
    bos = torch.tensor([[tok.bos_token_id]])
    with torch.no_grad():
        out = model.generate(bos, max_new_tokens=200, do_sample=False)
        ref = ref_model.generate(bos, max_new_tokens=200, do_sample=False)
    assert out.tolist() == ref.tolist()
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text == ref_tok.decode(ref[0], skip_special_tokens=True)
    # what llama2.c's own run.c prints at temperature 0 (stories260K.md)
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside")


def test_tokenizer_matches_shared(pair, paragraphs: list[str]) -> None:
    (_, tok), (_, ref_tok) = pair
    assert type(tok).__name__ == "LlamaTokenizer" and tok.is_fast
    assert len(paragraphs) == 100
    ids, ref_ids = tok(paragraphs).input_ids, ref_tok(paragraphs).input_ids
    assert ids == ref_ids
    assert all(i[0] == tok.bos_token_id for i in ids)
    decoded = tok.batch_decode(ids, skip_special_tokens=True)
    assert decoded == ref_tok.batch_decode(ref_ids, skip_special_tokens=True)
    assert decoded == paragraphs


def test_tokenizer_matches_sentencepiece(spm, llama2c_dir: Path, pair, paragraphs: list[str]) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(llama2c_dir / TOK))
    (_, tok), _ = pair
    assert tok(paragraphs, add_special_tokens=False).input_ids == [sp.encode(p) for p in paragraphs]


# --- other layouts of the same weights ---------------------------------------------------------------

def test_version1_and_version2_files(imported: Path, llama2c_dir: Path, tmp_path: Path) -> None:
    dims, blocks = _v0_blocks(llama2c_dir / BIN)
    reference = _weights(imported)

    _write_v1(tmp_path / "v1.bin", dims, blocks)
    (tmp_path / "v1").mkdir()   # an existing empty directory is fine
    v1 = _weights(import_llama2c(tmp_path / "v1.bin", llama2c_dir / TOK, tmp_path / "v1"))
    assert all(torch.equal(v1[k], reference[k]) for k in reference)

    dequantized = _write_v2(tmp_path / "v2.bin", dims, blocks)
    v2 = _weights(import_llama2c(tmp_path / "v2.bin", llama2c_dir / TOK, tmp_path / "v2"))
    embed = torch.from_numpy(dequantized["embed"].reshape(v2["model.embed_tokens.weight"].shape))
    assert torch.equal(v2["model.embed_tokens.weight"], embed)
    assert torch.equal(v2["model.norm.weight"], reference["model.norm.weight"])
    for key, tensor in reference.items():   # within half a quantization step of the fp32 weights
        assert (v2[key] - tensor).abs().max().item() <= tensor.abs().max().item() / 254 + 1e-6, key


def test_untied_classifier(spm, llama2c_dir: Path, tmp_path: Path) -> None:
    raw = (llama2c_dir / BIN).read_bytes()
    dims, blocks = _v0_blocks(llama2c_dir / BIN)
    wcls = (blocks["embed"] * 2).astype("<f4")
    header = struct.pack("<7i", *dims[:5], -dims[5], dims[6])
    (tmp_path / "untied.bin").write_bytes(header + raw[28:] + wcls.tobytes())
    out = import_llama2c(tmp_path / "untied.bin", llama2c_dir / TOK, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    w = _weights(out)
    assert torch.equal(w["lm_head.weight"], 2 * w["model.embed_tokens.weight"])


# --- errors --------------------------------------------------------------------------------------------

def _error(*args) -> str:
    with pytest.raises(SecateurError) as info:
        import_llama2c(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_files(llama2c_dir: Path, tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nope.bin", llama2c_dir / TOK, tmp_path / "out")
    assert "tokenizer model" in _error(llama2c_dir / BIN, tmp_path / "nope.model", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint(llama2c_dir: Path, tmp_path: Path) -> None:
    raw = (llama2c_dir / BIN).read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[: len(raw) // 2])
    message = _error(tmp_path / "cut.bin", llama2c_dir / TOK, tmp_path / "out")
    assert "truncated" in message and str(len(raw) // 2) in message and str(len(raw)) in message
    (tmp_path / "tiny.bin").write_bytes(raw[:10])
    assert "too short" in _error(tmp_path / "tiny.bin", llama2c_dir / TOK, tmp_path / "out")
    (tmp_path / "junk.bin").write_bytes(b"\xff" * 4096)
    assert "does not look like a llama2.c checkpoint" in _error(tmp_path / "junk.bin", llama2c_dir / TOK,
                                                                 tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_version(llama2c_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "v3.bin").write_bytes(_header(3, (64, 172, 5, 8, 4, 512, 512)))
    message = _error(tmp_path / "v3.bin", llama2c_dir / TOK, tmp_path / "out")
    assert "version 3" in message and "supported versions" in message


def test_non_empty_out_dir_refused(llama2c_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "not empty" in _error(llama2c_dir / BIN, llama2c_dir / TOK, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    assert "is a file" in _error(llama2c_dir / BIN, llama2c_dir / TOK, tmp_path / "file")


def test_bad_tokenizer(spm, llama2c_dir: Path, tmp_path: Path) -> None:
    # llama2.c's own tokenizer export is not a SentencePiece model
    message = _error(llama2c_dir / BIN, llama2c_dir / "tok512.bin", tmp_path / "out")
    assert "not a SentencePiece .model" in message
    assert [p for p in tmp_path.iterdir()] == []


def test_sentencepiece_missing(llama2c_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sentencepiece", None)   # makes `import sentencepiece` fail
    assert "pip install 'secateur[llama2c]'" in _error(llama2c_dir / BIN, llama2c_dir / TOK, tmp_path / "out")
