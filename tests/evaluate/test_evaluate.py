"""secateur.evaluate: the P1/P2/P3 figures on the real models, P4 fields, every tiny family, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import secateur
from secateur.errors import SecateurError
from secateur.evaluate import EvalResult, evaluate, perplexity, results_table, sentence_embeddings, speed
from secateur.evaluate.speed import greedy_decode
from secateur.testing import FAMILIES, tiny_model, tiny_tokenizer

CAUSAL = [f for f in FAMILIES if f != "bert"]


@pytest.fixture(scope="module")
def stories(stories_dir):
    model, tokenizer, _ = secateur.load(stories_dir)
    return model, tokenizer


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "story.txt"
    paragraphs = [f"once upon a time there was a cat number {i} who liked fish and milk." for i in range(40)]
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    return str(path)


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.tsv"
    rows = [("a cat sits", "a cat is sitting", 4.5), ("a dog runs", "the sky is blue", 0.2),
            ("he eats", "he is eating food", 3.9), ("rain falls", "a man sings", 0.5), ("big tree", "a tall tree", 3.0)]
    path.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows), encoding="utf-8")
    return str(path)


# --- the reference figures ------------------------------------------------------------------------

def test_p1_stories260k(stories, data_dir):
    model, tokenizer = stories
    result = evaluate(model, tokenizer, "perplexity", "tinystories")
    assert round(result.value, 3) == 5.508
    assert result.protocol == "P1" and result.settings["deviations"] == []
    assert result.extra["windows"] == 670 and result.extra["predicted_tokens"] == 342370
    assert result.extra["stream_tokens"] == 343128
    assert result.settings["data"]["split"] == "evaluation" and result.settings["seq_len"] == 512
    assert result.settings["model"]["weights_sha256"]


def test_p3_stories260k_quick(stories, data_dir):
    model, tokenizer = stories
    result = evaluate(model, tokenizer, "perplexity", "wikitext2", max_windows=48, batch=16)
    # the full run (1,591 windows of 512) gives 122.33; a prefix of it is a quick smoke check
    assert math.isfinite(result.value) and result.value == pytest.approx(132.377, abs=0.01)
    assert result.settings["seq_len"] == 512 and result.extra["windows"] == 48
    assert result.protocol is None and result.settings["deviations"] == ["max_windows 48 of 1591"]
    assert result.settings["convention"] == "P3" and result.settings["data"]["name"] == "wikitext2"


def test_p2_minilm(minilm_dir, data_dir):
    model, tokenizer, _ = secateur.load(minilm_dir)
    result = evaluate(model, tokenizer, "sts")
    assert round(result.value, 2) == 86.72
    assert result.protocol == "P2" and result.extra["pairs"] == 1500
    assert result.settings["data"]["split"] == "dev" and result.settings["dtype"] == "float32"


# --- obviously-correct oracles --------------------------------------------------------------------

def test_perplexity_matches_hf_loss(text_file):
    model, tokenizer = tiny_model("llama", with_tokenizer=True)
    result = perplexity(model, tokenizer, text_file, seq_len=32, batch=3)
    ids = tokenizer("\n\n".join(secateur.data.source(text_file).texts()))["input_ids"]
    n = len(ids) // 32
    windows = torch.tensor(ids[: n * 32]).view(n, 32)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert result.extra["windows"] == n
    assert result.value == pytest.approx(math.exp(sum(losses) / n), rel=1e-5)
    assert result.protocol is None and result.settings["deviations"] == ["data is not wikitext2:test"]


def test_sentence_embeddings_ignore_padding():
    model, tokenizer = tiny_model("bert", with_tokenizer=True)
    texts = ["a", "a much longer sentence than the first", "mid length"]
    batched = sentence_embeddings(model, tokenizer, texts, batch=3)
    single = torch.cat([sentence_embeddings(model, tokenizer, [t], batch=1) for t in texts])
    assert batched.shape == (3, 32)
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_greedy_decode_matches_generate():
    model = tiny_model("llama")
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    tokens, prefill, steps = greedy_decode(model, prompt, 7)
    expected = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, 12:]
    assert torch.equal(tokens, expected) and len(steps) == 7 and prefill > 0


# --- every family ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", CAUSAL)
def test_causal_families(family, text_file, pairs_file):
    model, tokenizer = tiny_model(family, with_tokenizer=True)
    ppl = evaluate(model, tokenizer, "perplexity", text_file, seq_len=64)
    assert math.isfinite(ppl.value) and ppl.value > 1 and ppl.extra["windows"] >= 20
    similarity = evaluate(model, tokenizer, "sts", pairs_file)
    assert -100 <= similarity.value <= 100 and similarity.protocol is None
    timing = evaluate(model, tokenizer, "speed", prompt_len=16, new_tokens=8, runs=10, warmup=2)
    assert timing.metric == "decode_tokens_per_s" and timing.value > 0 and timing.protocol == "P4"


def test_encoder_family(pairs_file):
    model, tokenizer = tiny_model("bert", with_tokenizer=True)
    similarity = evaluate(model, tokenizer, "sts", pairs_file, batch=2)
    assert -100 <= similarity.value <= 100 and similarity.extra["pairs"] == 5
    timing = evaluate(model, tokenizer, "speed", prompt_len=32)
    assert timing.metric == "latency_ms_median" and timing.value > 0
    assert "decode_tokens_per_s" not in timing.extra and timing.settings["new_tokens"] is None
    with pytest.raises(SecateurError, match="needs a causal language model; 'bert' is an encoder"):
        evaluate(model, tokenizer, "perplexity", "tinystories")


def test_tinystories_quick_run_names_no_protocol(data_dir):
    model, tokenizer = tiny_model("gpt2", with_tokenizer=True)
    result = perplexity(model, tokenizer, "tinystories", seq_len=64, max_windows=3)
    assert result.extra["windows"] == 3 and result.protocol is None
    assert result.settings["deviations"][0] == "seq_len 64 (P1: 512)"
    assert result.settings["deviations"][1].startswith("max_windows 3 of ")


# --- speed fields ---------------------------------------------------------------------------------

def test_speed_fields(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :32] = 0  # half of one layer's weight
    model.save_pretrained(tmp_path)
    result = speed(model, prompt_len=24, new_tokens=6, path=str(tmp_path))
    e = result.extra
    assert result.protocol == "P4" and result.settings["runs"] == 10 and result.settings["warmup"] == 2
    assert 0 < e["prefill_ms_median"] <= e["prefill_ms_p95"] <= e["prefill_ms_p99"]
    assert 0 < e["decode_step_ms_median"] <= e["decode_step_ms_p99"] and e["decode_tokens_per_s"] > 0
    assert e["peak_rss_mib"] > 10 and e["parameters"] == sum(p.numel() for p in model.parameters())
    assert e["disk_bytes"] == sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert e["sparsity_per_layer"]["model.layers.0.mlp.down_proj"] == 0.5
    assert 0 < e["sparsity_all_linear"] < e["sparsity"] < 0.5  # lm_head dilutes the all-Linear figure
    settings = result.settings
    assert settings["threads"] == torch.get_num_threads() and settings["dtype"] == "float32"
    assert settings["batch"] == 1 and settings["prompt_len"] == 24 and settings["new_tokens"] == 6
    assert set(settings["versions"]) == {"python", "torch", "transformers", "secateur"}
    assert speed(model, prompt_len=8, new_tokens=2, runs=3).protocol is None  # fewer than 10 runs
    assert speed(model, prompt_len=8, new_tokens=2).extra["disk_bytes"] is None  # no directory known


# --- results --------------------------------------------------------------------------------------

def test_result_json_and_table(text_file):
    model, tokenizer = tiny_model("qwen2", with_tokenizer=True)
    result = evaluate(model, tokenizer, "perplexity", text_file, seq_len=32, max_windows=2)
    data = json.loads(result.to_json())
    assert data["task"] == "perplexity" and data["metric"] == "perplexity" and data["value"] == result.value
    assert data["settings"]["fingerprint"] == result.settings["fingerprint"]
    assert data["settings"]["data"]["sha256"] and data["settings"]["max_windows"] == 2
    assert EvalResult.from_dict(data).to_dict() == result.to_dict()
    timing = speed(model, prompt_len=8, new_tokens=4)
    table = results_table([result, timing], title="tiny qwen2")
    assert table.row_count == 2 and [c.header for c in table.columns][:4] == ["task", "protocol", "metric", "value"]
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(table)
    assert "story.txt:all" in console.export_text()


def test_fingerprint_follows_tokens(text_file):
    model, tokenizer = tiny_model("llama", with_tokenizer=True)
    a = perplexity(model, tokenizer, text_file, seq_len=32)
    b = perplexity(tiny_model("llama", seed=1), tokenizer, text_file, seq_len=32)
    c = perplexity(model, tokenizer, text_file, seq_len=48)
    assert a.settings["fingerprint"] == b.settings["fingerprint"] != c.settings["fingerprint"]
    assert a.value != b.value


def test_evaluate_errors(text_file):
    model, tokenizer = tiny_model("llama", with_tokenizer=True)
    with pytest.raises(SecateurError, match="unknown evaluation task 'perplexty' \\(did you mean 'perplexity'\\?\\)"):
        evaluate(model, tokenizer, "perplexty", text_file)
    with pytest.raises(SecateurError, match="has no option 'seqlen' \\(did you mean 'seq_len'\\?\\); valid options"):
        evaluate(model, tokenizer, "perplexity", text_file, seqlen=32)
    with pytest.raises(SecateurError, match="needs data: 'tinystories' \\(P1\\), 'wikitext2' \\(P3\\)"):
        evaluate(model, tokenizer, "perplexity")
    with pytest.raises(SecateurError, match="takes no data"):
        evaluate(model, tokenizer, "speed", text_file)
    with pytest.raises(SecateurError, match="longer than the model's context of 128; pass seq_len <= 128"):
        evaluate(model, tokenizer, "perplexity", text_file, seq_len=256)
    with pytest.raises(SecateurError, match="exceeds the model's context of 128"):
        evaluate(model, tokenizer, "speed")  # 128 + 64 positions do not fit a 128-position model
    with pytest.raises(SecateurError, match="unknown dataset 'wikitext'"):
        evaluate(model, tokenizer, "perplexity", "wikitext")
    with pytest.raises(SecateurError, match="sentence pairs cannot be read from .*story.txt"):
        evaluate(model, tokenizer, "sts", text_file)
    with pytest.raises(SecateurError, match="dataset 'c4' has no sentence pairs"):
        evaluate(model, tokenizer, "sts", "c4")


def test_tokenizer_model_mismatch(stories, text_file):
    _, stories_tokenizer = stories
    model = tiny_model("llama")  # vocabulary of 128, the stories tokenizer has 512
    with pytest.raises(SecateurError, match="vocabulary has 128 entries"):
        perplexity(model, stories_tokenizer, text_file, seq_len=32)
    assert perplexity(model, tiny_tokenizer("llama"), text_file, seq_len=32).value > 1
