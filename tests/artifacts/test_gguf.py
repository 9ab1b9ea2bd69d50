"""GGUF export, run in llama.cpp itself (llama-cpp-python, built from source by the test extras).

Tolerances (llama.cpp's KV cache set to float32): F32 logits within 1e-3 of secateur's (llama.cpp's
kernels sum in another order; measured ~2e-5); F16 within 2% of the largest logit;
Q8_0 within 5% of the largest logit (llama.cpp also rounds the activations to 8 bits in its
Q8_0 dot products); the tokenizer's ids equal transformers' on real text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

PROMPT = [1, 400, 261, 330, 283, 271, 420, 300, 379, 261, 287, 264, 345]


def _llama(path):
    from llama_cpp import Llama

    # the KV cache in float32 (type 0): llama.cpp's default float16 cache alone moves logits by ~0.05
    return Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)


def _llama_logits(path, tokens=PROMPT):
    llm = _llama(path)
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)]), llm


def _secateur_logits(model, tokens=PROMPT):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def test_f32_and_f16_run_in_llama_cpp_with_secateurs_logits_and_tokens(stories_dir, tmp_path):
    from secateur.artifacts import load
    from secateur.artifacts.gguf import export_gguf

    loaded = load(stories_dir)
    ref = _secateur_logits(loaded.model)
    got, llm = _llama_logits(export_gguf(stories_dir, tmp_path / "s.gguf", "f32"))
    assert np.abs(got - ref).max() < 1e-3, np.abs(got - ref).max()
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside."
    assert llm.tokenize(text.encode(), add_bos=True) == loaded.tokenizer(text)["input_ids"]
    got16, _ = _llama_logits(export_gguf(stories_dir, tmp_path / "s16.gguf", "f16"))
    assert np.abs(got16 - ref).max() < 0.02 * np.abs(ref).max()


def test_our_q8_0_integers_are_carried_over_and_run(stories_dir, tmp_path):
    """An RTN W8 model in groups of 32 is Q8_0's own scheme: the file holds our integers."""
    import gguf

    from secateur.api import compress_
    from secateur.artifacts import load, save
    from secateur.artifacts.gguf import export_gguf
    from secateur.recipe import Recipe

    loaded = load(stories_dir)
    compress_(loaded.model, Recipe.from_dict({"steps": [{"method": "rtn", "bits": 8, "strategy": "group",
                                                         "group_size": 32}]}))
    artifact = save(loaded.model, tmp_path / "w8", tokenizer=loaded.tokenizer)
    model = load(artifact).model
    out = export_gguf(artifact, tmp_path / "w8.gguf", "q8_0")
    record = json.loads((tmp_path / "w8.gguf.json").read_text())
    q = record["tensors"]["blk.0.attn_output.weight"]
    assert q["type"] == "Q8_0" and q["how"].startswith("carried")
    assert record["tensors"]["blk.0.ffn_down.weight"]["how"].startswith("float16")  # 172-wide rows
    reader = gguf.GGUFReader(str(out))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_output.weight")
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    layer = model.model.layers[0].self_attn.o_proj
    q8 = layer.weight_q.numpy().astype(np.float32)
    scale16 = layer.weight_scale.float().numpy().astype(np.float16).astype(np.float32)
    expected = (q8.reshape(q8.shape[0], -1, 32) * scale16[..., None]).reshape(q8.shape)
    assert np.array_equal(values.reshape(expected.shape), expected)  # our integers, scales in float16
    ref = _secateur_logits(model)
    got, _ = _llama_logits(out)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_q4_0_requantizes_a_dense_model_and_bad_input_is_one_line(stories_dir, minilm_dir, tmp_path, capsys):
    from secateur.artifacts.gguf import export_gguf
    from secateur.testing import run_cli

    out = export_gguf(stories_dir, tmp_path / "q4.gguf", "q4_0")
    record = json.loads((tmp_path / "q4.gguf.json").read_text())
    assert record["tensors"]["blk.0.attn_q.weight"] == {"type": "Q4_0", "how": "requantized from float weights"}
    got, _ = _llama_logits(out)
    assert np.isfinite(got).all()
    code, _, err = run_cli(capsys, "export", str(stories_dir), str(tmp_path / "x.gguf"), "--format", "gguf",
                           "--type", "q5_k")
    assert code != 0 and "valid types" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "export", str(minilm_dir), str(tmp_path / "m.gguf"), "--format", "gguf")
    assert code != 0 and "Llama-family" in err
    code, _, err = run_cli(capsys, "export", str(stories_dir), str(tmp_path / "y"), "--format", "ggml")
    assert code != 0 and "valid formats" in err
