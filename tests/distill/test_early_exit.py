"""Early exit for encoders: the runtime answers exactly what the model answers when nothing exits,
the offline simulation of a threshold is what the encoder does, the heads train (backbone frozen),
and they survive a save and a load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from secateur.errors import SecateurError
from secateur.runtime.early_exit import ExitEncoder, ExitHeads, attach, exit_embeddings, heads_of, mean_pool, simulate
from secateur.testing import tiny_model


def _batch(vocab: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (5, 12), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate((12, 3, 7, 12, 5)):  # padded rows of different lengths
        mask[row, length:] = 0
        ids[row, length:] = 0
    return ids, mask


def _three_blocks(exits=(1, 2)):
    import transformers as tf

    config = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           vocab_size=128, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    model = tf.BertModel(config).eval()
    heads = ExitHeads(32, exits)
    with torch.no_grad():  # heads away from the identity, so that exits differ from the states
        for head in heads.heads.values():
            head.weight.add_(0.3 * torch.randn_like(head.weight))
    attach(model, heads)
    return model


def test_nothing_exits_above_one_and_the_answer_is_the_models_own(minilm_dir):
    from secateur.artifacts import load

    loaded = load(minilm_dir)
    model, tok = loaded.model, loaded.tokenizer
    attach(model, ExitHeads(model.config.hidden_size, (2, 3, 4, 5)))
    enc = tok(["a short one", "a much longer sentence with many more words than the first one"], padding=True,
              return_tensors="pt")
    with torch.no_grad():  # reference: transformers' own forward, pooled as P2 does
        ref = F.normalize(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]), dim=-1)
    out = ExitEncoder(model, 1.5).encode(enc["input_ids"], enc["attention_mask"])
    assert torch.equal(out.blocks, torch.tensor([6, 6]))
    assert torch.allclose(out.embeddings, ref, atol=1e-6)


@pytest.mark.parametrize("threshold", [-1.0, 0.5, 0.9, 0.99, 2.0])
def test_the_simulation_of_a_threshold_is_what_the_encoder_does(threshold):
    model = _three_blocks()
    ids, mask = _batch()
    encoded = ExitEncoder(model, threshold).encode(ids, mask)
    simulated, blocks = simulate(exit_embeddings(model, ids, mask), threshold)
    assert torch.equal(encoded.blocks, blocks)
    assert torch.allclose(encoded.embeddings, simulated, atol=1e-5)
    # one input at a time gives the same answers as the batch (the batch shrinks as inputs exit)
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        one = ExitEncoder(model, threshold).encode(ids[row:row + 1, :n], mask[row:row + 1, :n])
        assert torch.allclose(one.embeddings[0], encoded.embeddings[row], atol=1e-5)


def test_agreeing_exits_leave_early_and_the_rest_continue():
    """A reference rule, by hand: with heads after blocks 1 and 2 of a 3-block model, an input
    leaves after block 2 when its two normalised exit embeddings have cosine >= threshold."""
    model = _three_blocks()
    ids, mask = _batch()
    views = exit_embeddings(model, ids, mask)
    cos = (F.normalize(views[1], dim=-1) * F.normalize(views[2], dim=-1)).sum(-1)
    threshold = float(cos.median())
    out = ExitEncoder(model, threshold).encode(ids, mask)
    expected = torch.where(cos >= threshold, 2, 3)
    assert torch.equal(out.blocks, expected) and 0 < int((expected == 2).sum()) < ids.shape[0]
    assert torch.allclose(out.embeddings[expected == 2], F.normalize(views[2], dim=-1)[expected == 2], atol=1e-6)


def test_the_method_trains_the_heads_only_and_they_are_saved(tmp_path):
    from secateur.api import compress_
    from secateur.artifacts import load, save
    from secateur.recipe import Recipe
    import transformers as tf

    config = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           vocab_size=128, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    model = tf.BertModel(config).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 128, (48, 16), generator=torch.Generator().manual_seed(0))
    from secateur.data import CalibrationSet

    recipe = Recipe.from_dict({"steps": [{"method": "early_exit", "steps": 40, "batch_size": 8, "lr": 1e-2,
                                          "seq_len": 16, "eval_every": 0, "holdout": 0.1}]})
    compress_(model, recipe, data=CalibrationSet(ids, "random"))
    heads = heads_of(model)
    assert heads is not None and heads.blocks == (1, 2)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if not n.startswith("secateur_"))
    from secateur import lineage

    history = lineage.read(model).history()[0]["result"]["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    save(model, tmp_path / "exits")
    again = heads_of(load(tmp_path / "exits").model)
    assert again is not None and again.blocks == heads.blocks
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), heads.state_dict().values()))
    assert type(tf.AutoModel.from_pretrained(tmp_path / "exits")).__name__ == "BertModel"  # stock transformers


def test_bad_exits_and_decoders_are_refused():
    from secateur.api import compress_
    from secateur.errors import ConfigError
    from secateur.recipe import Recipe

    with pytest.raises(ConfigError, match="exits"):
        compress_(tiny_model("bert"), Recipe.from_dict({"steps": [{"method": "early_exit", "exits": [1, 2], "steps": 1}]}),
                  data=torch.randint(3, 128, (8, 8)))
    with pytest.raises(SecateurError, match="Llama-family"):
        compress_(tiny_model("gpt2"), Recipe.from_dict({"steps": [{"method": "early_exit", "steps": 1}]}),
                  data=torch.randint(3, 128, (8, 8)))
    with pytest.raises(SecateurError, match="no exit heads"):
        ExitEncoder(tiny_model("bert"), 0.9)


def _bert3():
    import transformers as tf

    config = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           vocab_size=128, max_position_embeddings=128, pad_token_id=0, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return tf.BertModel(config).eval()


def test_mlp_heads_start_as_the_identity_and_survive_a_save(tmp_path):
    from secateur.api import compress_
    from secateur.artifacts import load, save
    from secateur.data import CalibrationSet
    from secateur.recipe import Recipe

    heads = ExitHeads(32, (1, 2), kind="mlp")
    x = torch.randn(5, 32)
    assert torch.equal(heads(1, x), x) and heads.width == 64
    with pytest.raises(SecateurError, match="valid: linear, mlp"):
        ExitHeads(32, (1, 2), kind="conv")
    model = _bert3()
    ids = torch.randint(3, 128, (48, 16), generator=torch.Generator().manual_seed(0))
    recipe = Recipe.from_dict({"steps": [{"method": "early_exit", "head": "mlp", "steps": 20, "batch_size": 8,
                                          "lr": 1e-2, "seq_len": 16, "eval_every": 0, "holdout": 0.1}]})
    compress_(model, recipe, data=CalibrationSet(ids, "random"))
    trained = heads_of(model)
    assert trained.kind == "mlp" and not torch.equal(trained(1, x), x)
    save(model, tmp_path / "mlp-exits")
    again = heads_of(load(tmp_path / "mlp-exits").model)
    assert again.kind == "mlp" and again.width == trained.width and again.blocks == (1, 2)
    assert torch.allclose(again(2, x), trained(2, x))


def test_a_jointly_tuned_backbone_trains_and_its_final_output_is_held_to_the_original():
    """tune_backbone: the backbone's weights move too, and the objective has a 'final' term holding
    the tuned model's last layer to the model as it was before the step."""
    from secateur import lineage
    from secateur.api import compress_
    from secateur.data import CalibrationSet
    from secateur.recipe import Recipe

    model = _bert3()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 128, (48, 16), generator=torch.Generator().manual_seed(1))
    recipe = Recipe.from_dict({"steps": [{"method": "early_exit", "tune_backbone": True, "steps": 20, "batch_size": 8,
                                          "lr": 1e-3, "seq_len": 16, "eval_every": 0, "holdout": 0.1}]})
    compress_(model, recipe, data=CalibrationSet(ids, "random"))
    moved = [n for n, p in model.named_parameters() if not n.startswith("secateur_") and not torch.equal(before[n], p)]
    assert moved and all(not p.requires_grad for p in heads_of(model).parameters())
    history = lineage.read(model).history()[0]["result"]["history"]
    assert "final" in history[-1] and history[-1]["final"] < 0.05


def test_the_exit_curve_is_the_encoder_one_input_at_a_time():
    """The slow reference: each input alone through ExitEncoder at each threshold, its answer's cosine to the
    model's own final embedding (the last block's mean-pooled state), averaged; blocks averaged."""
    from secateur.runtime.early_exit import exit_curve

    model = _three_blocks()
    ids, mask = _batch()
    sequences = [ids[row, :int(mask[row].sum())] for row in range(ids.shape[0])]
    thresholds = (-1.0, 0.5, 0.9, 0.99, 1.0)
    curve = exit_curve(model, sequences, thresholds, batch=2)
    assert [c["threshold"] for c in curve] == [None, *thresholds] and curve[0] == {
        "threshold": None, "mean_blocks": 3.0, "agreement": 1.0, "exits": {}}
    spread = set()
    for c in curve[1:]:
        cosines, blocks = [], []
        for x in sequences:
            one = ExitEncoder(model, c["threshold"]).encode(x[None], torch.ones_like(x)[None])
            with torch.no_grad():
                final = F.normalize(mean_pool(model(input_ids=x[None]).last_hidden_state, torch.ones_like(x)[None]), dim=-1)
            cosines.append(float((one.embeddings * final).sum()))
            blocks.append(int(one.blocks[0]))
        assert c["agreement"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-5), c["threshold"]
        assert c["mean_blocks"] == pytest.approx(sum(blocks) / len(blocks)), c["threshold"]
        assert c["exits"] == {str(b): blocks.count(b) for b in sorted(set(blocks)) if b < 3}
        spread.add(c["mean_blocks"])
    assert min(spread) == 2.0 and max(spread) == 3.0  # -1: every input leaves at the second exit; 1.0: none
    assert curve[1]["agreement"] < 1.0


def test_the_encoder_step_records_its_curve_and_refuses_a_classifier():
    from secateur import lineage
    from secateur.api import compress_
    from secateur.data import CalibrationSet
    from secateur.errors import ConfigError
    from secateur.recipe import Recipe

    model = _bert3()
    ids = torch.randint(3, 128, (40, 16), generator=torch.Generator().manual_seed(2))
    recipe = Recipe.from_dict({"steps": [{"method": "early_exit", "steps": 4, "batch_size": 8, "lr": 1e-3,
                                          "seq_len": 16, "eval_every": 0, "holdout": 0.1, "curve": [0.9, 0.99]}]})
    compress_(model, recipe, data=CalibrationSet(ids, "random"))
    curve = lineage.read(model).history()[0]["result"]["curve"]
    assert curve["metric"] == "agreement" and curve["higher_is_better"] and "4 inputs" in curve["data"]
    assert [p["threshold"] for p in curve["points"]] == [None, 0.9, 0.99]
    assert all(0.0 < p["agreement"] <= 1.0 + 1e-6 and 2.0 <= p["mean_blocks"] <= 3.0 for p in curve["points"])
    with pytest.raises(ConfigError, match="classifier"):
        compress_(_bert3(), Recipe.from_dict({"steps": [{"method": "early_exit", "confidence": "classifier",
                                                         "steps": 1}]}), data=CalibrationSet(ids, "random"))
