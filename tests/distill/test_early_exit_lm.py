"""Early exit for causal LMs (CALM): with nothing exiting the runtime is the model itself (logits
and greedy tokens against transformers); the batched window pricing is exactly batch-1 decoding
with state propagation; a hand-computed rule decides who exits; the heads train alone, survive a
save and a load, and run on a quantized model."""

from __future__ import annotations

import math

import pytest
import torch

from secateur.errors import SecateurError
from secateur.runtime.early_exit import ExitHeads, attach, heads_of
from secateur.runtime.early_exit_lm import ExitLM, exit_nll, margin


def _llama(kv_heads: int = 2, layers: int = 4, seed: int = 0):
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=kv_heads, vocab_size=96, max_position_embeddings=128,
                            tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(config).eval()
    heads = ExitHeads(32, tuple(range(1, layers)))
    with torch.no_grad():  # heads away from the identity, and sharper logits so that margins spread
        for head in heads.heads.values():
            head.weight.mul_(4.0).add_(0.5 * torch.randn_like(head.weight))
    attach(model, heads)
    return model


def _windows(n: int = 6, length: int = 20, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _stepped(model, row: list[int], threshold):
    """Batch-1 decoding, teacher-forced: per-token log-probabilities of the true next token and blocks."""
    lm = ExitLM(model, threshold, max_len=len(row))
    cache = lm.cache()
    lps, blocks = [], []
    for t in range(len(row) - 1):
        logits, used = lm.step(row[t], t, cache)
        lps.append(float(torch.log_softmax(logits.float(), -1)[0, row[t + 1]]))
        blocks.append(used)
    return lps, blocks


def test_with_no_exit_the_windows_nll_is_transformers(stories_dir):
    from secateur.artifacts import load

    model = load(stories_dir).model
    windows = _windows(4, 48, model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1].float()
    ref = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum"))
    got = exit_nll(model, windows, None, batch=3)
    assert got.tokens == 4 * 47 and got.mean_blocks == model.config.num_hidden_layers
    assert got.nll == pytest.approx(ref, rel=1e-5)


def test_with_no_exit_greedy_decoding_is_transformers(stories_dir):
    from secateur.artifacts import load

    loaded = load(stories_dir)
    model, tok = loaded.model, loaded.tokenizer
    prompt = tok("Once upon a time, a little")["input_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    out = ExitLM(model, None).greedy(prompt, 24)
    assert out.tokens == ref and out.blocks == [model.config.num_hidden_layers] * 23


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 2.0])
def test_window_pricing_is_batch_one_decoding_with_state_propagation(kv_heads, threshold):
    model = _llama(kv_heads)
    windows = _windows()
    priced = exit_nll(model, windows, threshold, batch=4)
    nll, blocks, tokens = 0.0, 0, 0
    for row in windows.tolist():
        lps, used = _stepped(model, row, threshold)
        nll -= sum(lps)
        blocks += sum(used)
        tokens += len(lps)
    assert priced.tokens == tokens and priced.blocks == blocks
    assert priced.nll == pytest.approx(nll, rel=1e-5)
    if threshold == 0.0:      # every token leaves at the first exit
        assert priced.mean_blocks == 1.0
    if threshold == 2.0:      # no margin reaches 2: nothing exits, the model's own NLL
        assert priced.mean_blocks == 4.0 and priced.nll == pytest.approx(exit_nll(model, windows, None).nll, rel=1e-6)


def test_the_first_confident_exit_answers_and_skipped_blocks_get_the_exit_state():
    """By hand, for the second token of a sequence: run the blocks one by one; the token leaves at the
    first exit whose softmax margin reaches the threshold, with that exit's logits; the blocks after it
    hold keys and values computed from the exit's hidden state."""
    from secateur.runtime.early_exit_lm import _Stack

    model = _llama()
    heads = heads_of(model)
    stack = _Stack(model)
    row = _windows(1, 3)[0].tolist()
    lm = ExitLM(model, None, max_len=4)
    cache = lm.cache()
    lm.step(row[0], 0, cache)  # the first token through every block
    hidden = stack.embed(torch.tensor([[row[1]]]))
    cos, sin = stack.cos_sin(hidden, torch.tensor([[1]]))
    states, margins, exit_logits = [], [], []
    with torch.no_grad():
        for i in range(4):
            hidden = stack.block(i, hidden, cos, sin, cache, 1)
            states.append(hidden)
            if i + 1 < 4:
                logits = stack.exit_logits(heads, i + 1, hidden)[:, -1]
                exit_logits.append(logits)
                margins.append(float(margin(logits)))
    threshold = sorted(margins)[1]  # exactly one exit is under it, the rest reach it
    expected = next(i + 1 for i, m in enumerate(margins) if m >= threshold)
    lm = ExitLM(model, threshold, max_len=4)
    cache = lm.cache()
    ExitLM(model, None, max_len=4).step(row[0], 0, cache)  # the first token through every block, as above
    logits, used = lm.step(row[1], 1, cache)
    assert used == expected and torch.allclose(logits, exit_logits[expected - 1], atol=1e-6)
    with torch.no_grad():
        for j in range(expected, 4):  # state propagation: block j's K/V at position 1 from the exit state
            k, v = stack.kv(j, states[expected - 1], cos, sin)
            assert torch.allclose(cache.k[j, :, :, 1:2], k, atol=1e-6) and torch.allclose(cache.v[j, :, :, 1:2], v, atol=1e-6)
    probs = torch.softmax(exit_logits[0].float(), -1)[0].sort(descending=True).values
    assert margins[0] == pytest.approx(float(probs[0] - probs[1]), abs=1e-6)


def test_the_method_trains_the_heads_only_and_they_are_saved(stories_dir, tmp_path):
    import transformers as tf

    from secateur import lineage
    from secateur.api import compress_
    from secateur.artifacts import load, save
    from secateur.data import CalibrationSet
    from secateur.recipe import Recipe

    model = load(stories_dir).model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    windows = _windows(24, 64, model.config.vocab_size, seed=3)
    recipe = Recipe.from_dict({"steps": [{"method": "early_exit", "exits": [3, 4], "steps": 30, "batch_size": 8,
                                          "lr": 3e-3, "seq_len": 64, "temperature": 1.0, "eval_every": 0,
                                          "holdout": 0.1}]})
    compress_(model, recipe, data=CalibrationSet(windows, "random"))
    heads = heads_of(model)
    assert heads is not None and heads.blocks == (3, 4)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if not n.startswith("secateur_"))
    record = lineage.read(model).history()[0]["result"]
    assert record["history"][-1]["loss"] < record["history"][0]["loss"]
    assert record["exits"]["confidence"].startswith("softmax margin")
    save(model, tmp_path / "exits")
    again = load(tmp_path / "exits").model
    assert heads_of(again).blocks == (3, 4)
    probe = _windows(2, 32, model.config.vocab_size, seed=4)
    assert exit_nll(again, probe, 0.3).nll == pytest.approx(exit_nll(model, probe, 0.3).nll, rel=1e-6)
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "exits")  # stock transformers: the backbone
    with torch.no_grad():
        assert torch.equal(stock(probe).logits, model(probe).logits)


def test_exits_run_on_a_quantized_model(stories_dir):
    """Combined with weight quantization: the exits decode on the model's QuantLinear layers, and with
    no exit the decoder is that quantized model itself, decoding a token at a time (the int4 kernel for
    one row per sequence is not the one for a whole window, so the reference steps too)."""
    import secateur
    from secateur.artifacts import load
    from secateur.runtime.linear import QuantLinear

    model = load(stories_dir).model
    secateur.compress_(model, secateur.RTNConfig(bits=4, group_size=32))
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    attach(model, ExitHeads(model.config.hidden_size, (3, 4)))
    windows = _windows(2, 32, model.config.vocab_size, seed=5)
    from secateur.runtime import cache_argument, output_cache

    with torch.no_grad():
        out = model(input_ids=windows[:, :1], use_cache=True)
        steps = [out.logits]
        for t in range(1, windows.shape[1] - 1):
            out = model(input_ids=windows[:, t:t + 1], use_cache=True, **{cache_argument(model): output_cache(out)})
            steps.append(out.logits)
    logits = torch.cat(steps, 1).float()
    ref = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum"))
    assert exit_nll(model, windows, None).nll == pytest.approx(ref, rel=1e-6)
    priced = exit_nll(model, windows, 0.0)
    assert priced.mean_blocks == 3.0 and math.isfinite(priced.nll)
    out = ExitLM(model, 0.5).greedy([1, 5, 9], 8)
    assert len(out.tokens) == 8 and all(3 <= b <= 5 for b in out.blocks)


def test_what_cannot_exit_is_refused_in_one_line():
    from secateur.testing import tiny_model

    with pytest.raises(SecateurError, match="Llama-family") as info:
        ExitLM(tiny_model("opt"), None)
    assert "\n" not in str(info.value)
    with pytest.raises(SecateurError, match="no exit heads"):
        ExitLM(tiny_model("llama"), 0.5)
    model = _llama()
    with pytest.raises(SecateurError, match="max_len"):
        ExitLM(model, 0.5, max_len=8).greedy([1, 2, 3, 4], 8)


def _with_classifiers(model):
    """The heads of ``model`` with exit classifiers of random weights, spread so that some exit and some don't."""
    heads = heads_of(model)
    fresh = ExitHeads(heads.heads["1"].in_features, heads.blocks, classifier=True)
    fresh.heads.load_state_dict(heads.heads.state_dict())
    with torch.no_grad():
        for c in fresh.classifiers.values():
            c.weight.normal_(0.0, 1.0)
            c.bias.fill_(0.5)
    attach(model, fresh)
    return model


def _reference(model, windows, threshold, confidence="margin", exits=None):
    """The slow, obvious reference: every window one token at a time, block by block; after each checked
    exit the confidence (softmax margin, or the classifier's sigmoid) is compared with the threshold, the
    first one that reaches it answers, and every block after it gets this position's keys and values from
    the exit state, one block at a time (no fused product). Returns (perplexity, mean blocks)."""
    from secateur.runtime.early_exit_lm import Cache, _Stack

    stack, heads = _Stack(model), heads_of(model)
    n = len(stack.blocks)
    checked = [b for b in heads.blocks if exits is None or b in exits] if threshold is not None else []
    nll, blocks, tokens = 0.0, 0, 0
    with torch.no_grad():
        for row in windows.tolist():
            cache = Cache(stack, 1, len(row), torch.float32)
            for t in range(len(row) - 1):
                hidden = stack.embed(torch.tensor([[row[t]]]))
                cos, sin = stack.cos_sin(hidden, torch.tensor([[t]]))
                answer, used = None, n
                for i in range(n):
                    hidden = stack.block(i, hidden, cos, sin, cache, t)
                    if i + 1 in checked:
                        logits = stack.exit_logits(heads, i + 1, hidden)[0, -1]
                        if confidence == "margin":
                            p = torch.softmax(logits, -1).sort(descending=True).values
                            sure = float(p[0] - p[1]) >= threshold
                        else:
                            sure = float(torch.sigmoid(heads.classifiers[str(i + 1)](hidden)[0, -1, 0])) >= threshold
                        if sure:
                            answer, used = logits, i + 1
                            for j in range(i + 1, n):
                                k, v = stack.kv(j, hidden, cos, sin)
                                cache.write(j, t, k, v)
                            break
                if answer is None:
                    answer = stack.final_logits(hidden)[0, -1]
                nll -= float(torch.log_softmax(answer, -1)[row[t + 1]])
                blocks += used
                tokens += 1
    return math.exp(nll / tokens), blocks / tokens


@pytest.mark.parametrize("confidence,exits", [("margin", None), ("classifier", None), ("classifier", (2,))])
def test_the_exit_curve_is_the_slow_reference_at_each_threshold(confidence, exits):
    from secateur.runtime.early_exit_lm import exit_curve

    model = _llama()
    if confidence == "classifier":
        _with_classifiers(model)
    windows = _windows(3, 16)
    thresholds = (0.0, 0.002, 0.005, 0.008, 1.0) if confidence == "margin" else (0.0, 0.6, 0.65, 0.7, 1.0)
    curve = exit_curve(model, windows, thresholds, batch=2, confidence=confidence, exits=exits)
    assert [c["threshold"] for c in curve] == [None, *thresholds]
    ppl, blocks = _reference(model, windows, None)
    assert curve[0]["perplexity"] == pytest.approx(ppl, rel=1e-5) and curve[0]["mean_blocks"] == blocks == 4.0
    spread = set()
    for c in curve[1:]:
        ppl, blocks = _reference(model, windows, c["threshold"], confidence, exits)
        assert c["perplexity"] == pytest.approx(ppl, rel=1e-5), c["threshold"]
        assert c["mean_blocks"] == pytest.approx(blocks), c["threshold"]
        assert c["increase_pct"] == pytest.approx(100 * (ppl / curve[0]["perplexity"] - 1), abs=1e-3)
        assert sum(int(b) * k for b, k in c["exits"].items()) + 4 * (45 - sum(c["exits"].values())) \
            == pytest.approx(c["mean_blocks"] * 45)  # 3 windows x 15 predicted tokens
        spread.add(round(c["mean_blocks"], 6))
    assert len(spread) >= 3  # the thresholds do move the curve
    if exits == (2,):
        assert all(set(c["exits"]) <= {"2"} for c in curve)


def test_the_classifier_trains_it_is_saved_and_the_card_records_the_curve(stories_dir, tmp_path):
    """confidence: classifier, depth-weighted exits, a jointly tuned backbone: the classifiers' losses
    fall, the heads and classifiers survive a save and a load, the card says which confidence decides,
    and the step's result holds the exit curve priced on the held-out split (the model without exits
    first, its perplexity that of the held-out windows)."""
    from secateur import lineage
    from secateur.api import compress_
    from secateur.artifacts import load, save
    from secateur.data import CalibrationSet
    from secateur.recipe import Recipe
    from secateur.runtime.early_exit_lm import exit_curve

    model = load(stories_dir).model
    windows = _windows(40, 48, model.config.vocab_size, seed=7)
    recipe = Recipe.from_dict({"steps": [{"method": "early_exit", "exits": [2, 3, 4], "steps": 30, "batch_size": 8,
                                          "lr": 1e-3, "seq_len": 48, "temperature": 1.0, "eval_every": 0,
                                          "holdout": 0.1, "confidence": "classifier", "exit_weighting": "depth",
                                          "tune_backbone": True, "final_weight": 2.0, "curve": [0.5, 0.9]}]})
    compress_(model, recipe, data=CalibrationSet(windows, "random"))
    heads = heads_of(model)
    assert heads.classifiers is not None and sorted(heads.classifiers) == ["2", "3", "4"]
    record = lineage.read(model).history()[0]["result"]
    first, last = record["history"][0], record["history"][-1]
    assert last["classifier4"] < first["classifier4"] and "final" in last
    assert record["exits"]["confidence"].startswith("learned classifier")
    curve = record["curve"]
    assert curve["metric"] == "perplexity" and curve["confidence"] == "classifier" and "4 windows" in curve["data"]
    assert [p["threshold"] for p in curve["points"]] == [None, 0.5, 0.9]
    # the recorded points are the curve of the trained model on the held-out windows (none of the training ones)
    save(model, tmp_path / "exits")
    again = load(tmp_path / "exits").model
    assert heads_of(again).classifiers is not None
    from secateur.distill.data import split

    _, hold = split(list(windows), 0.1, 0)
    redo = exit_curve(again, torch.stack(hold), (0.5, 0.9))
    for a, b in zip(curve["points"], redo):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5) and a["mean_blocks"] == b["mean_blocks"]


def test_the_speed_evaluation_times_the_exits():
    from secateur.evaluate import evaluate

    model = _llama()
    result = evaluate(model, None, "speed", prompt_len=8, new_tokens=24, runs=1, warmup=1, exit_thresholds=(0.0, 1.0))
    curve = result.extra["exit_curve"]
    assert [c["threshold"] for c in curve] == [0.0, 1.0] and result.extra["exit_no_exits_tokens_per_s"] > 0
    assert curve[0]["mean_blocks"] == 1.0 and curve[1]["mean_blocks"] == 4.0   # margin >= 0 always; >= 1 never
    assert all(c["speedup"] > 0 and c["tokens_per_s"] > 0 for c in curve)
    from secateur.testing import tiny_model

    assert "exit_curve" not in evaluate(tiny_model("llama"), None, "speed", prompt_len=4, new_tokens=4, runs=1,
                                        warmup=1).extra


def test_bad_exit_settings_are_refused_in_one_line():
    from secateur.errors import ConfigError
    from secateur.distill.early_exit import EarlyExitConfig

    model = _llama()
    for kwargs, match in (({"confidence": "classifier"}, "needs exit classifiers"), ({"confidence": "vote"}, "valid"),
                          ({"exits": (7,)}, "have no head")):
        with pytest.raises(SecateurError, match=match) as info:
            ExitLM(model, 0.5, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(SecateurError, match="have no head"):
        exit_nll(model, _windows(1, 4), 0.5, exits=(4,))
    with pytest.raises(ConfigError, match="curve"):
        EarlyExitConfig(curve=(1.5,))
