"""ONNX export, run in ONNX Runtime (secateur.artifacts.onnx, secateur.runtime.ort_session).

Tolerances, as ``max |onnx - secateur| / max(1, max |secateur|)`` against secateur's reference path
(``reference_only``: the integers dequantized exactly, then float math):

* float graphs and weight-only QDQ graphs (dense, RTN W8, GPTQ W4): ``1e-4`` (the same float math
  in another order; measured ~1e-6);
* W8A8 (SmoothQuant MiniLM): ``5e-2`` on random token ids (a value on an int8 rounding boundary can
  round one step the other way after float reordering; secateur's own int8 kernels differ from its
  reference path by about as much); on real sentences the embeddings are within ``2e-2`` of
  secateur's, cosine above 0.999 to its reference path and above 0.995 to its int8 kernels (which
  are themselves at cosine 0.9989 to the reference path on one of these sentences);
* greedy tokens through the ONNX KV cache equal secateur's exactly.

The integer initializers in the file equal the artifact's integers bit for bit (transposed to
``[in, out]``)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

FLOAT_TOL, W8A8_TOL = 1e-4, 5e-2
SENTENCES = ["A man is playing a guitar.", "A woman is slicing an onion into thin rings on a board.",
             "The cat sleeps.", "Two dogs run across a snowy field while children watch from the fence."]
PROMPT_TEXT = "Once upon a time, there was a little girl named Lily. She"


def _rel(got, ref) -> float:
    ref = ref.detach().float().numpy() if isinstance(ref, torch.Tensor) else ref
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))


def _initializers(path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path / "model.onnx"))
    return model, {t.name: t for t in model.graph.initializer}, numpy_helper


def _assert_our_integers(path, model):
    """Every quantized layer's integer initializer equals its weight_q, transposed, bit for bit."""
    from onnx import TensorProto

    from secateur.artifacts.compressed_tensors import quantized_modules

    proto, inits, numpy_helper = _initializers(path)
    quantized = {n: m for n, m in quantized_modules(model).items() if not n.startswith("pooler.")}  # not exported
    assert quantized
    card = json.loads((path / "onnx_export.json").read_text())
    assert set(card["quantization"]) == set(quantized)
    for name, module in quantized.items():
        tensor = inits[f"{name}.weight_q"]
        assert tensor.data_type == (TensorProto.INT4 if module.bits <= 4 else TensorProto.INT8), name
        stored = numpy_helper.to_array(tensor).astype(np.int8)
        assert np.array_equal(stored, module.weight_q.numpy().T), name
        scale = numpy_helper.to_array(inits[f"{name}.weight_scale"])
        assert np.array_equal(scale.reshape(-1), module.weight_scale.float().numpy().T.reshape(-1)), name
    return proto, card


def _secateur_greedy(model, prompt, new):
    tokens, sequence = [], torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new):
            tokens.append(int(model(input_ids=sequence, use_cache=False).logits[0, -1].argmax()))
            sequence = torch.cat([sequence, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens


def _batch(tokenizer, texts):
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


# --- variants, built once ----------------------------------------------------------------------

def _variant(source, steps, out, calibration=None):
    from secateur.api import compress_
    from secateur.artifacts import load, save
    from secateur.data import calibration_set
    from secateur.recipe import Recipe

    loaded = load(source)
    data = calibration_set(*calibration[:1], loaded.tokenizer, *calibration[1:3], **calibration[3]) if calibration else None
    compress_(loaded.model, Recipe.from_dict({"steps": steps}), data=data)
    return save(loaded.model, out, tokenizer=loaded.tokenizer)


@pytest.fixture(scope="module")
def minilm_w8a8(minilm_dir, data_dir, tmp_path_factory):
    return _variant(minilm_dir, [{"method": "smoothquant"}], tmp_path_factory.mktemp("sq") / "a",
                    ("stsb", 16, 64, {"split": "train"}))


@pytest.fixture(scope="module")
def stories_rtn8(stories_dir, tmp_path_factory):
    return _variant(stories_dir, [{"method": "rtn", "bits": 8, "strategy": "channel"}],
                    tmp_path_factory.mktemp("rtn8") / "a")


@pytest.fixture(scope="module")
def stories_gptq4(stories_dir, data_dir, tmp_path_factory):
    # groups of 32 where the width allows; the 172-wide down projection falls back to per channel
    return _variant(stories_dir, [{"method": "gptq", "bits": 4, "group_size": 32}],
                    tmp_path_factory.mktemp("gptq4") / "a", ("tinystories", 16, 128, {}))


# --- encoders -----------------------------------------------------------------------------------

def test_minilm_dense_gives_secateurs_hidden_states_and_sts_embeddings(minilm_dir, tmp_path):
    from secateur.artifacts import load
    from secateur.artifacts.onnx import export_onnx
    from secateur.evaluate.sts import sentence_embeddings
    from secateur.runtime import ort_session

    out = export_onnx(minilm_dir, tmp_path / "onnx")
    card = json.loads((out / "onnx_export.json").read_text())
    assert card["verification"]["passed"] and card["kind"] == "encoder" and card["opset"] == 21
    assert card["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert card["source"]["weights_sha256"] and not card["quantization"]
    model, tokenizer, _ = load(minilm_dir)
    sess = ort_session.session(out)
    for texts in (SENTENCES, SENTENCES[:1]):  # dynamic batch and sequence axes
        ids, mask = _batch(tokenizer, texts)
        got = ort_session.embed(sess, ids.numpy(), mask.numpy())
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask)[0]
        assert got["last_hidden_state"].shape == tuple(hidden.shape)
        assert _rel(got["last_hidden_state"], hidden) < FLOAT_TOL
        assert _rel(got["sentence_embedding"], sentence_embeddings(model, tokenizer, texts)) < FLOAT_TOL
    assert (out / "tokenizer.json").is_file()


def test_minilm_w8a8_keeps_our_int8_weights_and_matches_secateur(minilm_w8a8, tmp_path):
    from secateur.artifacts import load
    from secateur.artifacts.onnx import export_onnx
    from secateur.evaluate.sts import sentence_embeddings
    from secateur.runtime import ort_session
    from secateur.runtime.linear import reference_only

    out = export_onnx(minilm_w8a8, tmp_path / "onnx")
    model, tokenizer, _ = load(minilm_w8a8)
    proto, card = _assert_our_integers(out, model)
    ops = {n.op_type for n in proto.graph.node}
    assert "MatMulInteger" in ops and "DequantizeLinear" not in ops  # integer products, no float copy
    assert all(e["activations"] == "int8" for e in card["quantization"].values())
    verification = card["verification"]
    assert verification["passed"] and verification["tolerance"] == W8A8_TOL
    ids, mask = _batch(tokenizer, SENTENCES)
    got = ort_session.embed(ort_session.session(out), ids.numpy(), mask.numpy())["sentence_embedding"]
    ours = sentence_embeddings(model, tokenizer, SENTENCES).numpy()  # secateur's int8 kernels
    with reference_only():
        reference = sentence_embeddings(model, tokenizer, SENTENCES).numpy()
    assert _rel(got, ours) < 2e-2 and _rel(got, reference) < 2e-2
    assert (got * reference).sum(-1).min() > 0.999
    assert (got * ours).sum(-1).min() > 0.995  # secateur's kernels vs its own reference: 0.9989 here


def test_tiny_encoders_bert_and_roberta(tmp_path):
    import transformers as tf

    from secateur.artifacts.onnx import write
    from secateur.testing import tiny_model

    roberta = tf.RobertaModel(tf.RobertaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               max_position_embeddings=130, pad_token_id=1)).eval()
    for name, model in (("bert", tiny_model("bert")), ("roberta", roberta)):
        card = json.loads((write(model, tmp_path / name) / "onnx_export.json").read_text())
        assert card["verification"]["passed"], name


# --- causal LMs ---------------------------------------------------------------------------------

def test_stories_dense_logits_and_greedy_decoding_through_the_kv_cache(stories_dir, tmp_path):
    from secateur.artifacts import load
    from secateur.artifacts.onnx import export_onnx
    from secateur.runtime import ort_session

    out = export_onnx(stories_dir, tmp_path / "onnx")
    card = json.loads((out / "onnx_export.json").read_text())
    assert card["verification"]["passed"] and card["kind"] == "causal"
    assert card["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.4.value" in card["inputs"] and "present.4.value" in card["outputs"]
    model, tokenizer, _ = load(stories_dir)
    prompt = tokenizer(PROMPT_TEXT)["input_ids"]
    sess = ort_session.session(out)
    logits, cache = ort_session.step(sess, np.asarray([prompt]), ort_session.empty_cache(sess))
    assert cache["past_key_values.0.key"].shape == (1, 4, len(prompt), 8)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([prompt]), use_cache=False).logits
    assert _rel(logits, ref) < FLOAT_TOL
    assert ort_session.greedy_decode(sess, prompt, 12) == _secateur_greedy(model, prompt, 12)


def _runs_like_secateur(out, model, tokenizer):
    """The export's logits on the prompt within FLOAT_TOL of secateur's reference path, and the same
    8 greedy tokens through the KV cache."""
    from secateur.runtime import ort_session
    from secateur.runtime.linear import reference_only

    prompt = tokenizer(PROMPT_TEXT)["input_ids"]
    sess = ort_session.session(out)
    logits, _ = ort_session.step(sess, np.asarray([prompt]), ort_session.empty_cache(sess))
    with torch.no_grad(), reference_only():
        ref = model(input_ids=torch.tensor([prompt]), use_cache=False).logits
        tokens = _secateur_greedy(model, prompt, 8)
    assert _rel(logits, ref) < FLOAT_TOL
    assert ort_session.greedy_decode(sess, prompt, 8) == tokens


def test_stories_rtn_w8_keeps_our_integers_as_qdq(stories_rtn8, tmp_path):
    from secateur.artifacts import load
    from secateur.artifacts.onnx import export_onnx

    out = export_onnx(stories_rtn8, tmp_path / "onnx")
    model, tokenizer, _ = load(stories_rtn8)
    proto, card = _assert_our_integers(out, model)
    assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) == len(card["quantization"])
    _runs_like_secateur(out, model, tokenizer)


def test_stories_gptq_w4_keeps_our_int4_integers_in_blocks(stories_gptq4, tmp_path):
    from secateur.artifacts import load
    from secateur.artifacts.onnx import export_onnx

    out = export_onnx(stories_gptq4, tmp_path / "onnx")
    model, tokenizer, _ = load(stories_gptq4)
    proto, card = _assert_our_integers(out, model)
    dq = {n.input[0]: {a.name: a.i for a in n.attribute} for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    assert dq["model.layers.0.self_attn.q_proj.weight_q"] == {"axis": 0, "block_size": 32}
    assert dq["model.layers.0.mlp.down_proj.weight_q"] == {"axis": 1}  # 172 columns: per channel
    _runs_like_secateur(out, model, tokenizer)


def test_tiny_causal_families_with_gqa_biases_and_sliding_window(tmp_path):
    import transformers as tf

    from secateur.artifacts.onnx import write
    from secateur.testing import tiny_model

    torch.manual_seed(0)
    mistral = tf.AutoModelForCausalLM.from_config(tf.MistralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=4)).eval()  # shorter than the check input
    for name, model in (("llama", tiny_model("llama")), ("qwen2", tiny_model("qwen2")), ("mistral-window", mistral)):
        card = json.loads((write(model, tmp_path / name) / "onnx_export.json").read_text())
        assert card["verification"]["passed"], name


# --- the command line and bad input -------------------------------------------------------------

def test_cli_exports_onnx_and_names_the_valid_formats(capsys, stories_dir, tmp_path):
    from secateur.testing import run_cli

    code, out, _ = run_cli(capsys, "export", str(stories_dir), str(tmp_path / "o"), "--format", "onnx")
    assert code == 0 and (tmp_path / "o" / "model.onnx").is_file(), out
    code, out, _ = run_cli(capsys, "export", str(stories_dir), str(tmp_path / "o"), "--format", "onnx")
    assert code == 0  # an earlier export is replaced
    code, _, err = run_cli(capsys, "export", str(stories_dir), str(tmp_path / "x"), "--format", "onx")
    assert code != 0 and "onnx" in err and "dense" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_models_outside_the_table_or_not_written_get_one_line_errors(capsys, tmp_path):
    from secateur.artifacts import save
    from secateur.testing import run_cli, tiny_model

    foreign = tmp_path / "t5"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "t5"}))
    code, _, err = run_cli(capsys, "export", str(foreign), str(tmp_path / "o"), "--format", "onnx")
    assert code != 0 and "outside secateur's architecture table" in err and "llama" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    gpt2 = save(tiny_model("gpt2"), tmp_path / "gpt2")
    code, _, err = run_cli(capsys, "export", str(gpt2), str(tmp_path / "o"), "--format", "onnx")
    assert code != 0 and "gpt2" in err and "not written yet" in err and len(err.strip().splitlines()) == 1
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    from secateur.errors import SecateurError
    from secateur.artifacts.onnx import write

    with pytest.raises(SecateurError, match="not an ONNX export"):
        write(tiny_model("llama"), occupied)
    assert (occupied / "keep.txt").read_text() == "mine"


def test_import_secateur_does_not_import_onnx():
    code = ("import sys, secateur, secateur.artifacts, secateur.runtime; "
            "assert not {'onnx', 'onnxruntime'} & set(sys.modules), 'onnx imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
