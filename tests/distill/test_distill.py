"""Distillation: losses against explicit per-position formulas, the data order, the one training
loop (schedule, accumulation, early stopping, bit-exact resume after a kill) and the distill step."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from secateur import lineage
from secateur import compress_
from secateur.api import Context
from secateur.data.calibration import CalibrationSet
from secateur.distill import losses
from secateur.distill.data import TrainingSet, collate, generate, split
from secateur.distill.distill import DistillConfig
from secateur.distill.train import TrainingConfig, lr_at, train
from secateur.errors import ConfigError, SecateurError
from secateur.testing import tiny_model


# --- losses against explicit formulas -----------------------------------------------------------------
def _softmax(row, t):
    m = max(row)
    e = [math.exp((v - m) / t) for v in row]
    return [x / sum(e) for x in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


@pytest.mark.parametrize("direction", ["forward", "reverse", "mix"])
def test_kl_loss_matches_per_position_formula(direction):
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    T = 2.0
    total, count = 0.0, 0
    for b in range(2):
        for i in range(3):
            if not mask[b, i]:
                continue
            p, q = _softmax(t[b, i].tolist(), T), _softmax(s[b, i].tolist(), T)
            value = {"forward": _kl(p, q), "reverse": _kl(q, p), "mix": 0.3 * _kl(p, q) + 0.7 * _kl(q, p)}[direction]
            total, count = total + value, count + 1
    expected = total / count * T * T
    got = losses.kl_loss(s, t, T, direction, 0.3, mask)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_kl_is_zero_for_identical_logits_and_ce_matches_formula():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 6)
    assert float(losses.kl_loss(logits, logits.clone(), 3.0)) == pytest.approx(0.0, abs=1e-6)
    ids = torch.randint(0, 6, (2, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    nll = []
    for b in range(2):
        for i in range(3):
            if mask[b, i + 1]:
                p = _softmax(logits[b, i].tolist(), 1.0)
                nll.append(-math.log(p[int(ids[b, i + 1])]))
    assert float(losses.ce_loss(logits, ids, mask)) == pytest.approx(sum(nll) / len(nll), rel=1e-5)


def test_hidden_and_embedding_losses_match_formulas():
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    rows = [(b, i) for b in range(2) for i in range(3) if mask[b, i]]
    mse = sum(float(((s[b, i] - t[b, i]) ** 2).mean()) for b, i in rows) / len(rows)
    cos = sum(1 - float(s[b, i] @ t[b, i] / (s[b, i].norm() * t[b, i].norm())) for b, i in rows) / len(rows)
    assert float(losses.hidden_loss(s, t, "mse", mask)) == pytest.approx(mse, rel=1e-5)
    assert float(losses.hidden_loss(s, t, "cosine", mask)) == pytest.approx(cos, rel=1e-5)
    pooled = torch.stack([sum(s[0, i] for i in (0, 2)) / 2, s[1].mean(0)])
    assert torch.allclose(losses.mean_pool(s, mask), pooled, atol=1e-6)
    es, et = torch.randn(3, 4), torch.randn(3, 4)
    rel = float(((es - et) ** 2).sum() / (et ** 2).sum())
    cosd = sum(1 - float(es[r] @ et[r] / (es[r].norm() * et[r].norm())) for r in range(3)) / 3
    assert float(losses.embedding_loss(es, et)) == pytest.approx(rel + cosd, rel=1e-5)


def test_layer_map_even_and_explicit():
    assert losses.layer_map(3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert losses.layer_map(2, 2) == [(1, 1), (2, 2)]
    assert losses.layer_map(3, 6, (1, 5, 6)) == [(1, 1), (2, 5), (3, 6)]


# --- data ---------------------------------------------------------------------------------------------
def test_training_set_order_is_a_function_of_the_batch_index():
    seqs = [torch.full((4,), i) for i in range(10)]
    data = TrainingSet(seqs, [], seed=3)
    first = [int(data.batch(k, 3)["input_ids"][r, 0]) for k in range(10) for r in range(3)]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))  # epochs cover all
    again = TrainingSet(seqs, [], seed=3)
    assert torch.equal(again.batch(7, 3)["input_ids"], data.batch(7, 3)["input_ids"])
    assert not torch.equal(TrainingSet(seqs, [], seed=4).batch(0, 10)["input_ids"], data.batch(0, 10)["input_ids"])


def test_collate_pads_right_and_split_holds_out_a_seeded_fraction():
    batch = collate([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    seqs = [torch.tensor([i]) for i in range(20)]
    train_part, hold = split(seqs, 0.1, 0)
    assert len(hold) == 2 and len(train_part) == 18
    assert {int(s) for s in train_part} | {int(s) for s in hold} == set(range(20))
    assert [int(s) for s in hold] == [int(s) for s in split(seqs, 0.1, 0)[1]]


def test_generation_is_seeded_and_starts_at_bos():
    model, tok = tiny_model("llama", with_tokenizer=True)
    a = generate(model, tok, 3, 8, seed=5, batch=2)
    b = generate(model, tok, 3, 8, seed=5, batch=2)
    assert len(a) == 3 and all(len(x) == 8 and int(x[0]) == tok.bos_token_id for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, generate(model, tok, 3, 8, seed=6, batch=2)))


def _reference_samples(model, bos, n, length, temperature, seed, batch):
    """Ancestral sampling written out: the whole prefix through the model at every step, no cache,
    softmax(logits / T), one multinomial draw; batch ``i`` seeded as ``generate`` seeds it."""
    out = []
    for start in range(0, n, batch):
        torch.manual_seed(seed * 1_000_003 + start)
        ids = torch.full((min(batch, n - start), 1), bos)
        while ids.shape[1] < length:
            probs = torch.softmax(model(ids).logits[:, -1].float() / temperature, dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1)], 1)
        out += list(ids)
    return out


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_generation_matches_plain_sampling_and_runs_past_end_of_sequence(arch):
    model, tok = tiny_model(arch, with_tokenizer=True)
    eos = tok.eos_token_id
    model.lm_head.register_forward_hook(lambda m, i, o: o + 4.0 * torch.nn.functional.one_hot(
        torch.tensor(eos), o.shape[-1]).to(o.dtype))   # end-of-sequence becomes frequent
    state = torch.get_rng_state()
    got = generate(model, tok, 5, 24, seed=3, batch=2, temperature=0.7)
    assert torch.equal(torch.get_rng_state(), state)   # the caller's random stream is left alone
    with torch.no_grad():
        want = _reference_samples(model, tok.bos_token_id, 5, 24, 0.7, 3, 2)
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    samples = torch.stack(got)
    assert samples.shape == (5, 24) and (samples == eos).float().mean() > 0.1
    assert model.generation_config.eos_token_id == eos   # the model's defaults are restored


# --- the loop -------------------------------------------------------------------------------------------
def _windows(n=24, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(3, 120, (n, length), generator=g))


def _cfg(**kw):
    base = dict(steps=12, batch_size=4, lr=3e-3, eval_every=4, checkpoint_every=4, holdout=0.0, warmup=0.25)
    base.update(kw)
    return TrainingConfig(**base)


def test_lr_schedule_warmup_then_cosine():
    c = _cfg(steps=10, warmup=0.2, lr=1.0, min_lr=0.1)
    assert [round(lr_at(s, c), 6) for s in (0, 1)] == [0.5, 1.0]
    for s in range(2, 10):
        progress = (s - 2) / 8
        assert lr_at(s, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def test_distillation_lowers_kl_to_the_teacher():
    teacher, student = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    data = TrainingSet(_windows(32), _windows(8, seed=1))
    with torch.no_grad():
        before = float(sum(losses.kl_loss(student(**b).logits, teacher(**b).logits) for b in data.holdout_batches(8)))
    result = train(student, teacher, data, _cfg(steps=30, lr=1e-2, temperature=1.0, checkpoint_every=0, holdout=0.1))
    with torch.no_grad():
        after = float(sum(losses.kl_loss(student(**b).logits, teacher(**b).logits) for b in data.holdout_batches(8)))
    assert after < 0.7 * before
    assert result.steps == 30 and len(result.history) == 30 and result.evals[-1]["step"] == 30


def test_accumulation_equals_a_bigger_batch():
    teacher = tiny_model("llama", seed=1)
    a, b = tiny_model("llama", seed=2), tiny_model("llama", seed=2)
    data = TrainingSet(_windows(), [])
    train(a, teacher, data, _cfg(batch_size=8, accumulate=1, clip=0.0, checkpoint_every=0))
    train(b, teacher, data, _cfg(batch_size=4, accumulate=2, clip=0.0, checkpoint_every=0))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


class _Kill:
    """Raises after a given optimizer step, as a killed process would stop there."""

    def __init__(self, at):
        self.at = at

    def after_step(self, step):
        if step == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_resume_after_a_kill_is_bit_exact(family, tmp_path):
    """bert has dropout: the random state must be restored too."""
    teacher = tiny_model(family, seed=1)
    kind = "encoder" if family == "bert" else "causal"
    data = TrainingSet(_windows(), _windows(4, seed=9))
    config = _cfg(holdout=0.1, hidden=1.0, generate=0)
    whole = tiny_model(family, seed=2)
    expected = train(whole, teacher, data, config, kind=kind)
    killed = tiny_model(family, seed=2)
    with pytest.raises(KeyboardInterrupt):
        train(killed, teacher, data, config, kind=kind, checkpoint_dir=tmp_path, hooks=(_Kill(7),))
    before_kill = torch.load(tmp_path / "train.pt", weights_only=True)["seconds"]
    resumed = tiny_model(family, seed=2)
    result = train(resumed, teacher, data, config, kind=kind, checkpoint_dir=tmp_path)
    assert result.resumed_from_step == 4
    assert before_kill > 0 and result.seconds > before_kill  # the training time before the kill counts
    for (n, p), (_, q) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n
    assert result.history == expected.history


def test_a_checkpoint_of_another_job_is_refused(tmp_path):
    teacher = tiny_model("llama", seed=1)
    data = TrainingSet(_windows(), [])
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model("llama", seed=2), teacher, data, _cfg(), checkpoint_dir=tmp_path, hooks=(_Kill(5),))
    with pytest.raises(SecateurError, match="different training job"):
        train(tiny_model("llama", seed=2), teacher, data, _cfg(lr=1e-3), checkpoint_dir=tmp_path)


def test_an_option_added_at_its_default_keeps_a_checkpoint_resumable(tmp_path):
    """A job checkpointed by a version without an option resumes under one that has it, left at a
    default that keeps the old behaviour; set away from it, the checkpoint belongs to another job."""
    from secateur.config import param

    @dataclasses.dataclass(frozen=True)
    class Later(TrainingConfig):
        added_option: bool = param(False, "an option a later version adds")

    teacher = tiny_model("llama", seed=1)
    data = TrainingSet(_windows(), [])
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model("llama", seed=2), teacher, data, _cfg(), checkpoint_dir=tmp_path, hooks=(_Kill(5),))
    settings = {k: v for k, v in _cfg().to_dict().items() if k != "method"}
    resumed = tiny_model("llama", seed=2)
    result = train(resumed, teacher, data, Later(**settings), checkpoint_dir=tmp_path)
    assert result.resumed_from_step == 4   # the last checkpoint before the kill
    with pytest.raises(SecateurError, match="different training job"):
        train(tiny_model("llama", seed=2), teacher, data, Later(**settings, added_option=True), checkpoint_dir=tmp_path)


def test_early_stopping_restores_the_best_weights():
    teacher, student = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    data = TrainingSet(_windows(), _windows(6, seed=3))
    config = _cfg(steps=40, lr=5.0, warmup=0.0, min_lr=1.0, eval_every=2, patience=2, clip=0.0, holdout=0.1,
                  checkpoint_every=0)
    result = train(student, teacher, data, config)
    assert result.stopped_early and result.steps < 40
    best = min(e["holdout_loss"] for e in result.evals)
    assert result.best["holdout_loss"] == best
    from secateur.distill.train import Objective

    objective = Objective(student, teacher, config, "causal")
    student.eval()
    with torch.no_grad():
        total = sum(float(objective(student, b)[0]) * len(b["input_ids"]) for b in data.holdout_batches(4))
    assert total / len(data.holdout) == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt", "gpt2"])  # GPT-2's Conv1D: was wiped
def test_zeros_of_a_pruned_student_stay_zero(family):
    from transformers.pytorch_utils import Conv1D

    from secateur import MagnitudeConfig

    teacher = tiny_model(family, seed=1)
    student = compress_(tiny_model(family, seed=1), MagnitudeConfig(sparsity=0.5))
    zeros = {n: (m.weight == 0) for n, m in student.named_modules()
             if isinstance(m, (torch.nn.Linear, Conv1D)) and n != "lm_head"}
    assert zeros
    train(student, teacher, TrainingSet(_windows(), []), _cfg(checkpoint_every=0))
    for n, z in zeros.items():
        w = student.get_submodule(n).weight
        assert bool((w[z] == 0).all()) and float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01), n


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="patience"):
        TrainingConfig(patience=2, eval_every=0)
    with pytest.raises(ConfigError, match="encoder has no logits"):
        TrainingConfig(kl=1.0).weights("encoder")
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        TrainingConfig(kl=0.0).weights("causal")
    with pytest.raises(ConfigError, match="layer_map"):
        train(tiny_model("llama", seed=2), tiny_model("llama"), TrainingSet(_windows(), []),
              _cfg(hidden=1.0, layer_map=(1,)))


# --- the step ---------------------------------------------------------------------------------------------
def _calibration(n=16, length=12):
    ids = torch.stack(_windows(n, length))
    return CalibrationSet(ids, "test-fingerprint")


def test_recipe_structured_then_distill_uses_the_input_model_as_teacher():
    from secateur.prune.structured import StructuredConfig

    model = tiny_model("llama", seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked outputs: a random tiny model is otherwise nearly uniform
    original = copy.deepcopy(model)
    data = _calibration()
    batch = {"input_ids": data.input_ids[:4]}
    cut = compress_(copy.deepcopy(model), StructuredConfig(mlp=0.0, blocks=(1,)))
    with torch.no_grad():
        kl_cut = float(losses.kl_loss(cut(**batch).logits, original(**batch).logits))
    steps = [StructuredConfig(mlp=0.0, blocks=(1,)), DistillConfig(steps=40, batch_size=4, lr=3e-3, temperature=1.0,
                                                                   eval_every=0, checkpoint_every=0, holdout=0.0)]
    compress_(model, steps, data=data)
    assert model.config.num_hidden_layers == 1
    with torch.no_grad():
        kl_distilled = float(losses.kl_loss(model(**batch).logits, original(**batch).logits))
    assert kl_distilled < 0.6 * kl_cut
    record = lineage.of(model).history()[-1]
    assert record["step"]["method"] == "distill" and record["result"]["steps"] == 40


def test_distill_step_reads_sources_through_the_tokenizer_and_generates(tmp_path):
    model, tok = tiny_model("llama", seed=3, with_tokenizer=True)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"once upon a time there was a cat number {i} who liked fish" for i in range(40)))
    config = DistillConfig(data=(str(text),), seq_len=16, generate=6, steps=3, batch_size=4, eval_every=0,
                           checkpoint_every=0)
    compress_(model, config, teacher=tiny_model("llama", seed=4), tokenizer=tok)
    settings = lineage.of(model).history()[-1]["result"]["settings"]
    assert settings["data"]["generated"]["sequences"] == 6 and settings["data"][str(text)] > 0
    with pytest.raises(SecateurError, match="tokenizer"):
        compress_(model, config, teacher=tiny_model("llama", seed=4))
    with pytest.raises(SecateurError, match="needs data"):
        compress_(model, DistillConfig(steps=1), teacher=tiny_model("llama"))


def test_teacher_samples_are_cached_in_the_generation_dir_and_read_back(tmp_path, monkeypatch):
    import secateur.distill.run as distill

    model, tok = tiny_model("llama", seed=3, with_tokenizer=True)
    teacher = tiny_model("llama", seed=4)
    config = DistillConfig(seq_len=16, generate=6, steps=2, batch_size=4, eval_every=0, checkpoint_every=0, holdout=0.0)
    first = distill.training_set(config, Context(tokenizer=tok, generation_dir=tmp_path), teacher, "causal")
    assert [p.name for p in tmp_path.iterdir()] == ["generated-6x16-t1.0-s0.pt"]

    def no_sampling(*args, **kwargs):
        raise AssertionError("the cached samples should have been read")

    monkeypatch.setattr(distill, "generate", no_sampling)
    ctx = Context(tokenizer=tok, generation_dir=tmp_path, checkpoint_dir=tmp_path / "run")
    again = distill.training_set(config, ctx, teacher, "causal")
    assert again.fingerprint == first.fingerprint and not (tmp_path / "run").exists()


def test_generated_text_is_cut_into_paragraphs_like_a_data_source(stories_dir):
    """The reference: every paragraph tokenized on its own with the tokenizer's defaults (BOS first),
    concatenated in order and cut into windows; the samples hold the same stories the way a teacher
    writes them (BOS per story, newlines between its paragraphs, two stories in one row)."""
    from transformers import AutoTokenizer

    from secateur.distill.data import as_paragraphs

    tok = AutoTokenizer.from_pretrained(stories_dir)
    stories = [["Tom had a red ball.", "He threw it far, and the dog ran after it."],
               ["Once upon a time, a cat sat on a mat.", '"Hi!" said the dog.', "They played all day."],
               ["The sun was warm.", "Lily smiled."]]
    rows = [tok("\n".join(stories[0]))["input_ids"] + tok("\n".join(stories[1]))["input_ids"],
            tok("\n".join(stories[2]))["input_ids"]]
    got = as_paragraphs([torch.tensor(r) for r in rows], tok, 8)
    stream = [t for story in stories for paragraph in story for t in tok(paragraph)["input_ids"]]
    assert stream.count(tok.bos_token_id) == 7
    n = len(stream) // 8
    assert n >= 4 and [w.tolist() for w in got] == [stream[i * 8:(i + 1) * 8] for i in range(n)]
    with pytest.raises(SecateurError, match="fewer than one window"):
        as_paragraphs([torch.tensor(rows[1])], tok, 512)


def test_a_distill_step_trains_on_generated_paragraphs_when_asked():
    import secateur.distill.run as distill
    from secateur.distill.data import as_paragraphs

    model, tok = tiny_model("llama", seed=3, with_tokenizer=True)
    teacher = tiny_model("llama", seed=4)
    raw = DistillConfig(seq_len=16, generate=12, steps=1, batch_size=4, eval_every=0, checkpoint_every=0, holdout=0.0)
    ctx = Context(tokenizer=tok)
    samples = distill.training_set(raw, ctx, teacher, "causal")
    cut = distill.training_set(dataclasses.replace(raw, generate_paragraphs=True), ctx, teacher, "causal")
    expected = as_paragraphs(samples.train, tok, 16)
    assert [w.tolist() for w in cut.train] == [w.tolist() for w in expected]
    assert cut.describe["generated"] == {"sequences": 12, "temperature": 1.0, "paragraph_windows": len(expected)}
    assert cut.fingerprint != samples.fingerprint


def test_the_steps_of_a_recipe_sample_a_loaded_teacher_once(tmp_path, monkeypatch):
    import secateur.distill.run as distill

    calls, real = [], distill.generate

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, "generate", counting)
    common = dict(seq_len=16, generate=6, batch_size=4, eval_every=0, checkpoint_every=1, holdout=0.0)
    steps = [DistillConfig(steps=2, **common), DistillConfig(steps=3, lr=1e-3, **common)]
    model, tok = tiny_model("llama", seed=3, with_tokenizer=True)
    lineage.set_(model, lineage.Lineage(lineage.Base(weights_sha256="ab" * 32)))  # as secateur.load records it
    compress_(model, steps, tokenizer=tok, checkpoint_dir=tmp_path / "run")
    assert calls == [6]                                     # the input model, snapshotted, is both steps' teacher
    shared = tmp_path / "run" / f"samples-{'ab' * 8}"
    assert [p.name for p in shared.iterdir()] == ["generated-6x16-t1.0-s0.pt"]
    # the model has changed since its hash was taken: a further call samples its own text, in its step's folder
    compress_(model, steps[:1], tokenizer=tok, checkpoint_dir=tmp_path / "again")
    assert calls == [6, 6] and not (tmp_path / "again" / shared.name).exists()
    # a teacher built in memory has no hash: each step keeps its own samples
    other, _ = tiny_model("llama", seed=5, with_tokenizer=True)
    compress_(other, steps, teacher=tiny_model("llama", seed=4), tokenizer=tok, checkpoint_dir=tmp_path / "memory")
    assert calls == [6, 6, 6, 6] and not list((tmp_path / "memory").glob("samples-*"))

def test_a_quantized_student_trains_through_fake_quantization_and_stays_packed():
    from secateur import RTNConfig
    from secateur.runtime.linear import QuantLinear, reference_only

    teacher = tiny_model("llama", seed=1)
    student = compress_(tiny_model("llama", seed=1), RTNConfig(bits=4, strategy="channel"))
    batch = {"input_ids": _calibration().input_ids[:8]}
    with torch.no_grad(), reference_only():
        before = float(losses.kl_loss(student(**batch).logits, teacher(**batch).logits))
    compress_(student, DistillConfig(steps=30, batch_size=8, lr=1e-3, temperature=1.0, eval_every=0,
                                     checkpoint_every=0, holdout=0.0), data=_calibration(), teacher=teacher)
    names = [n for n, m in student.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 14 and student.get_submodule(names[0]).bits == 4
    with torch.no_grad(), reference_only():
        after = float(losses.kl_loss(student(**batch).logits, teacher(**batch).logits))
    assert after < before


def test_hidden_loss_maps_a_cut_student_to_the_blocks_it_kept():
    import transformers

    from secateur.distill.train import Objective
    from secateur.prune.structured import StructuredConfig
    from secateur.testing import _config

    config3 = _config("llama")
    config3.num_hidden_layers = 3
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(config3).eval()
    student = compress_(copy.deepcopy(teacher), StructuredConfig(mlp=0.0, blocks=(1,)))   # keeps blocks 0 and 2
    objective = Objective(student, teacher, TrainingConfig(hidden=1.0), "causal")
    assert objective.pairs == [(1, 1), (2, 3)]
    explicit = Objective(student, teacher, TrainingConfig(hidden=1.0, layer_map=(2, 3)), "causal")
    assert explicit.pairs == [(1, 2), (2, 3)]
    assert Objective(tiny_model("llama"), teacher, TrainingConfig(hidden=1.0), "causal").pairs == [(1, 2), (2, 3)]
    ids = torch.randint(3, 100, (2, 8))
    with torch.no_grad():
        hs_s = student(ids, output_hidden_states=True).hidden_states
        hs_t = teacher(ids, output_hidden_states=True).hidden_states
    assert torch.equal(hs_s[1], hs_t[1])    # the kept first block imitates itself: nothing to learn there


def test_a_fresh_student_takes_the_teachers_config_with_overrides():
    from secateur.distill.students import fresh, parse_overrides

    teacher = tiny_model("llama", seed=1)
    student = fresh(teacher, **parse_overrides("num_hidden_layers=1,intermediate_size=32"))
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 1
    assert student.model.layers[0].mlp.up_proj.weight.shape == (32, 32)
    assert teacher.config.num_hidden_layers == 2   # the teacher's config is not touched
    assert torch.equal(fresh(teacher, num_hidden_layers=1).lm_head.weight, fresh(teacher, num_hidden_layers=1).lm_head.weight)
    with pytest.raises(SecateurError, match="did you mean 'num_hidden_layers'"):
        fresh(teacher, num_hidden_layer=1)
    with pytest.raises(SecateurError, match="KEY=VALUE"):
        parse_overrides("layers")


def test_gradual_pruning_resumes_bit_exactly_through_the_loop(tmp_path):
    """A killed gradual-pruning run resumes with the same masks, movement scores and weights."""
    from secateur.distill.gradual import GradualPruner
    from secateur.targets import select_modules

    teacher = tiny_model("llama", seed=1)
    data = TrainingSet(_windows(), [])
    config = _cfg(steps=16, checkpoint_every=5, eval_every=0)

    def run(model, checkpoint_dir=None, extra=()):
        pruner = GradualPruner(select_modules(model, ("Linear",), ("lm_head",)), 0.5, 16, end=0.75, every=2,
                               score="movement")
        pruner.attach()
        train(model, teacher, data, config, checkpoint_dir=checkpoint_dir, hooks=(pruner, *extra))
        return pruner.finalize()

    whole = tiny_model("llama", seed=2)
    expected = run(whole)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model("llama", seed=2), tmp_path, (_Kill(8),))
    resumed = tiny_model("llama", seed=2)
    assert run(resumed, tmp_path) == expected
    for (n, p), (_, q) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n
    assert expected["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_qat_w8a8_trains_and_saves_a_checkpoint_stock_transformers_loads(tmp_path):
    import transformers

    from secateur import QATConfig, load, save
    from secateur.runtime.linear import QuantLinear, reference_only

    teacher = tiny_model("llama", seed=1)
    model = tiny_model("llama", seed=1)
    config = QATConfig(bits=8, strategy="channel", activations="int8", steps=4, batch_size=4, lr=1e-4,
                       eval_every=0, checkpoint_every=0, holdout=0.0)
    compress_(model, config, data=_calibration(), teacher=teacher)
    modules = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(modules) == 14 and all(m.activation == "int8" and m.bits == 8 for m in modules)
    result = lineage.of(model).history()[-1]["result"]
    assert result["bits"] == 8 and result["activations"] == "int8" and result["steps"] == 4
    ids = torch.randint(3, 100, (2, 10))
    with torch.no_grad(), reference_only():
        expected = model(ids).logits
    path = save(model, tmp_path / "qat")
    stock = transformers.AutoModelForCausalLM.from_pretrained(path).eval()   # compressed-tensors' int8 runtime
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            theirs = stock.get_submodule(name)
            assert torch.equal(theirs.weight, module.weight_q), name
            assert torch.equal(theirs.weight_scale.float().view(-1), module.weight_scale.view(-1)), name
    with torch.no_grad(), reference_only():
        assert torch.equal(load(path).model(ids).logits, expected)


def test_texts_of_different_lengths_are_batched_by_length_and_each_epoch_reads_all():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.arange(int(n)) for n in torch.randint(2, 60, (300,), generator=g)]
    data = TrainingSet(seqs, [], seed=1)
    batches = [data.batch(k, 10) for k in range(30)]               # one epoch
    seen = sorted(int(b["attention_mask"][r].sum()) for b in batches for r in range(10))
    assert seen == sorted(len(s) for s in seqs)
    padded = sum(b["input_ids"].numel() for b in batches)
    assert padded < 1.3 * sum(len(s) for s in seqs)                # little padding
    assert torch.equal(TrainingSet(seqs, [], seed=1).batch(17, 10)["input_ids"], batches[17]["input_ids"])


# --- temperature calibration and repeated real text ----------------------------------------------------
def _grid_temperature(model, sequences, taus):
    """Reference: the cross-entropy of softmax(logits / τ) written out for every τ of a grid; the best τ."""
    with torch.no_grad():
        logits = [model(s[None]).logits[0, :-1].double() for s in sequences]
    best = None
    for tau in taus:
        total = count = 0
        for z, s in zip(logits, sequences):
            for t in range(len(s) - 1):
                row = z[t] / tau
                total += float(torch.logsumexp(row, 0) - row[int(s[t + 1])])
                count += 1
        if best is None or total / count < best[1]:
            best = (tau, total / count)
    return best


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fitted_temperature_matches_a_grid_search_and_is_folded_into_the_final_norm(family):
    from secateur.distill.temperature import fit_temperature

    model, tok = tiny_model(family, seed=2, with_tokenizer=True)
    text = generate(model, tok, 12, 24, seed=1, batch=6)       # text the model itself would write
    norm = model.transformer.ln_f if family == "gpt2" else model.model.norm
    with torch.no_grad():                                       # make it over-confident: logits × 1.6
        norm.weight.mul_(1.6)
        if getattr(norm, "bias", None) is not None:
            norm.bias.mul_(1.6)
        before = model(text[0][None]).logits
    tau_ref, nll_ref = _grid_temperature(model, text, [1.0 + 0.01 * i for i in range(121)])
    got = fit_temperature(model, text, batch_size=5)
    assert abs(got["temperature"] - tau_ref) <= 0.01 and got["nll_after"] == pytest.approx(nll_ref, abs=1e-4)
    assert got["nll_after"] < got["nll_before"] and 1.2 < got["temperature"] < 2.0   # towards the 1.6 put in
    assert got["tokens"] == 12 * 23
    with torch.no_grad():
        assert torch.allclose(model(text[0][None]).logits, before / got["temperature"], atol=1e-4)


def test_distill_step_fits_the_temperature_on_real_text_only_and_repeats_it():
    model, tok = tiny_model("llama", seed=3, with_tokenizer=True)
    calib = CalibrationSet(input_ids=torch.randint(7, 100, (6, 16)), fingerprint="t")
    config = DistillConfig(generate=8, repeat_real=3, fit_temperature=True, seq_len=16, steps=2, batch_size=4,
                           eval_every=0, checkpoint_every=0, holdout=0.2)
    compress_(model, config, data=calib, teacher=tiny_model("llama", seed=4), tokenizer=tok)
    result = lineage.of(model).history()[-1]["result"]
    assert result["settings"]["train_sequences"] == 5 * 3 + 8 and result["settings"]["data"]["repeat_real"] == 3
    assert result["calibrated"]["tokens"] == 6 * 15                 # the real windows, held-out ones too
    assert result["calibrated"]["nll_after"] <= result["calibrated"]["nll_before"]
    with pytest.raises(SecateurError, match="real text"):
        compress_(tiny_model("llama", seed=3), DistillConfig(generate=4, fit_temperature=True, seq_len=8, steps=1),
                  teacher=tiny_model("llama", seed=4), tokenizer=tok)
    with pytest.raises(SecateurError, match="causal LM"):
        compress_(tiny_model("bert"), DistillConfig(fit_temperature=True, steps=1),
                  data=CalibrationSet(input_ids=torch.randint(7, 100, (4, 8)), fingerprint="b"), teacher=tiny_model("bert"))


def test_a_calibrated_teacher_is_the_teacher_with_its_fitted_temperature_folded_in():
    model, tok = tiny_model("llama", seed=3, with_tokenizer=True)
    teacher = tiny_model("llama", seed=4)
    with torch.no_grad():                                       # an over-confident teacher: logits × 1.6
        teacher.model.norm.weight.mul_(1.6)
    calib = CalibrationSet(input_ids=generate(teacher, tok, 6, 16, seed=1, batch=6), fingerprint="t")
    untouched = copy.deepcopy(teacher.state_dict())
    config = DistillConfig(calibrate_teacher=True, seq_len=16, steps=3, batch_size=4, lr=1e-2,
                           eval_every=0, checkpoint_every=0, holdout=0.2)
    student = copy.deepcopy(model)
    compress_(student, config, data=calib, teacher=teacher, tokenizer=tok)
    fitted = lineage.of(student).history()[-1]["result"]["teacher_calibrated"]
    tau_ref, nll_ref = _grid_temperature(teacher, list(calib.input_ids), [1.0 + 0.01 * i for i in range(121)])
    assert abs(fitted["temperature"] - tau_ref) <= 0.01 and fitted["nll_after"] == pytest.approx(nll_ref, abs=1e-4)
    assert fitted["temperature"] > 1.2 and fitted["tokens"] == 6 * 15       # every real window, held-out ones too
    assert all(torch.equal(v, untouched[k]) for k, v in teacher.state_dict().items())   # the teacher is not changed
    # the reference: the same run toward a copy of the teacher whose final norm is divided by that τ
    folded = copy.deepcopy(teacher)
    with torch.no_grad():
        folded.model.norm.weight.div_(fitted["temperature"])
    reference = copy.deepcopy(model)
    compress_(reference, dataclasses.replace(config, calibrate_teacher=False), data=calib, teacher=folded,
              tokenizer=tok)
    losses_of = [[h["kl"] for h in lineage.of(m).history()[-1]["result"]["history"]] for m in (student, reference)]
    assert losses_of[0] == pytest.approx(losses_of[1], rel=1e-4)
    got, want, start = student.state_dict(), reference.state_dict(), model.state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-4) for k in want)   # Adam steps of 1e-2: float noise only
    assert float((got["lm_head.weight"] - start["lm_head.weight"]).abs().max()) > 1e-2   # it did train
    with pytest.raises(SecateurError, match="real text"):
        compress_(copy.deepcopy(model), DistillConfig(generate=4, calibrate_teacher=True, seq_len=8, steps=1),
                  teacher=teacher, tokenizer=tok)
