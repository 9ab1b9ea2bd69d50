"""Artifacts: save → verify → load round trips, the card, damage detection, and atomic saving."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from secateur import lineage
import secateur
from secateur import artifacts
from secateur.artifacts import card_summary, save, verify
from secateur.errors import ArtifactError
from secateur.testing import tiny_model

IDS = torch.tensor([[1, 7, 9, 33, 54, 2, 80, 100]])


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def siblings(path: Path) -> list[str]:
    """Hidden temporary or trash directories that a save left beside ``path``."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


@pytest.fixture(scope="module")
def llama_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = tiny_model("llama", with_tokenizer=True)
    return save(model, tmp_path_factory.mktemp("art") / "llama", tokenizer=tokenizer)


def damaged_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# --- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_round_trip_secateur_and_stock_transformers(family: str, tmp_path: Path) -> None:
    import transformers

    model, tokenizer = tiny_model(family, with_tokenizer=True)
    expected = outputs(model)
    path = save(model, tmp_path / family, tokenizer=tokenizer)
    assert path == (tmp_path / family).absolute()
    assert siblings(path) == []

    card = json.loads((path / "compression.json").read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(card["files"])
    assert "compression.json" not in card["files"]
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    assert card["base_model"] is None                      # built in-process: no base in its lineage
    assert card["model"]["model_type"] == family

    loaded = secateur.load(path)
    assert loaded.info["card"] == card
    assert loaded.info["weights_sha256"] == card["weights_sha256"]
    assert torch.equal(outputs(loaded.model), expected)
    assert loaded.tokenizer("hello").input_ids == tokenizer("hello").input_ids

    auto = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    stock = auto.from_pretrained(path).eval()
    assert torch.equal(outputs(stock), expected)


def test_real_model_round_trip(stories_dir: Path, tmp_path: Path) -> None:
    model, tokenizer, _ = secateur.load(stories_dir)
    expected = outputs(model)
    path = save(model, tmp_path / "stories", tokenizer=tokenizer)
    card = verify(path)
    base = lineage.of(model).base
    assert card["base_model"] == {"name": str(stories_dir), "path": str(stories_dir),
                                  "weights_sha256": base.weights_sha256, "model_type": "llama"}
    again = secateur.load(path)
    assert torch.equal(outputs(again.model), expected)
    assert again.tokenizer("Once upon a time").input_ids == tokenizer("Once upon a time").input_ids


def test_tied_head_that_was_untied_is_saved_untied(tmp_path: Path) -> None:
    import transformers

    model = tiny_model("gpt2")
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.transformer.wte.weight
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 0.5)
    expected = outputs(model)
    path = save(model, tmp_path / "untied")
    assert model.config.tie_word_embeddings is True          # the caller's config is left as it was
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is False
    stock = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert torch.equal(outputs(stock), expected)


def test_lineage_when_saving_a_loaded_artifact(llama_artifact: Path, tmp_path: Path) -> None:
    loaded = secateur.load(llama_artifact)
    card = verify(save(loaded.model, tmp_path / "child"))
    assert card["base_model"]["path"] == str(llama_artifact)
    assert card["base_model"]["weights_sha256"] == loaded.info["weights_sha256"]
    assert card["base_model"]["is_artifact"] is True and card["base_model"]["origin"] is None
    # load reads the lineage back: the artifact's own base and steps, as typed records
    secateur.compress_(loaded.model, secateur.MagnitudeConfig(sparsity=0.25))
    child = verify(save(loaded.model, tmp_path / "pruned"))
    parent = lineage.of(secateur.load(tmp_path / "pruned").model).parent
    assert parent.base == lineage.Base.from_dict(child["base_model"]) and parent.base.artifact
    assert [s.method for s in parent.steps] == ["magnitude"]
    assert [s.to_dict() for s in parent.steps] == child["history"]


# --- the card -----------------------------------------------------------------------------------

def test_card_contents_from_history(tmp_path: Path) -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        weight = model.model.layers[0].mlp.up_proj.weight
        weight[:, : weight.shape[1] // 2] = 0
    lineage.of(model).steps[:] = [
        lineage.Step({"method": "magnitude", "sparsity": 0.5}, 0.25, None, {"sparsity": torch.tensor(0.5)}),
        lineage.Step({"method": "gptq", "bits": 4}, 1.5, "sha256:abc", {"layers": (1, 2)}),
        lineage.Step({"method": "wanda", "sparsity": 0.5}, 0.5, "sha256:abc", {}),
    ]
    metrics = {"before": {"ppl": 12.5}, "after": {"ppl": math.inf, "loss": float("nan")}}
    path = save(model, tmp_path / "a", metrics=metrics, extra={"note": "hi"})
    card = verify(path)

    assert card["format_version"] == 1 and card["secateur_version"] == secateur.__version__
    assert card["created"].endswith("Z")
    assert card["recipe"] == {"steps": [{"method": "magnitude", "sparsity": 0.5}, {"method": "gptq", "bits": 4},
                                        {"method": "wanda", "sparsity": 0.5}]}
    assert [h["result"] for h in card["history"]] == [{"sparsity": 0.5}, {"layers": [1, 2]}, {}]
    assert card["data_fingerprints"] == ["sha256:abc"]
    assert card["metrics"] == {"before": {"ppl": 12.5}, "after": {"ppl": None, "loss": None}}  # strict JSON
    assert card["extra"] == {"note": "hi"}
    env = card["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] >= 1
    assert {"python", "transformers", "safetensors", "platform"} <= set(env)

    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    total = sum(w.numel() for w in linear)
    half = weight.numel() // 2
    assert card["sparsity"]["zeros"] == half and card["sparsity"]["weights"] == total
    assert card["sparsity"]["fraction"] == pytest.approx(half / total, abs=1e-6)
    blocks = total - model.lm_head.weight.numel()
    assert card["sparsity"]["block_fraction"] == pytest.approx(half / blocks, abs=1e-6)
    assert card["sparsity"]["parameters"] == sum(p.numel() for p in model.parameters())

    summary = card_summary(card)
    assert summary["steps"] == ["magnitude", "gptq", "wanda"]
    assert summary["weights_bytes"] == (path / "model.safetensors").stat().st_size
    assert summary["total_bytes"] == sum(f.stat().st_size for f in path.iterdir() if f.name != "compression.json")
    assert summary["parameters"] == card["sparsity"]["parameters"]
    assert summary["sparsity"] == card["sparsity"]["fraction"]
    assert summary["seconds"] == 2.25 and summary["model_type"] == "llama" and summary["base_model"] is None


def test_recipe_forms(tmp_path: Path) -> None:
    class FakeRecipe:
        def to_dict(self) -> dict:
            return {"name": "r", "steps": [{"method": "magnitude", "sparsity": 0.3}]}

    model = tiny_model("llama")
    assert verify(save(model, tmp_path / "obj", recipe=FakeRecipe()))["recipe"]["name"] == "r"
    assert verify(save(model, tmp_path / "dict", recipe={"steps": []}))["recipe"] == {"steps": []}
    assert verify(save(model, tmp_path / "none"))["recipe"] == {"steps": []}
    with pytest.raises(ArtifactError, match="recipe: expected"):
        save(model, tmp_path / "bad", recipe=42)
    assert not (tmp_path / "bad").exists()


def test_gpt2_conv1d_sparsity_counts_tied_weight_once(tmp_path: Path) -> None:
    from transformers.pytorch_utils import Conv1D

    model = tiny_model("gpt2")
    card = verify(save(model, tmp_path / "g"))
    conv = sum(m.weight.numel() for m in model.modules() if isinstance(m, Conv1D))
    head = model.lm_head.weight.numel()
    assert card["sparsity"]["weights"] == conv + head


# --- damage -------------------------------------------------------------------------------------

def test_flipped_byte_is_caught(llama_artifact: Path, tmp_path: Path) -> None:
    path = damaged_copy(llama_artifact, tmp_path / "flip")
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    pattern = (r"is damaged: model\.safetensors sha256 mismatch "
               r"\(expected [0-9a-f]{12}…, got [0-9a-f]{12}…\); re-create it")
    with pytest.raises(ArtifactError, match=pattern):
        secateur.load(path)


def test_truncated_file_is_caught(llama_artifact: Path, tmp_path: Path) -> None:
    path = damaged_copy(llama_artifact, tmp_path / "trunc")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"model\.safetensors has \d+ bytes, expected \d+ \(truncated"):
        secateur.load(path)


def test_missing_listed_file_is_caught_but_extra_files_are_allowed(llama_artifact: Path, tmp_path: Path) -> None:
    path = damaged_copy(llama_artifact, tmp_path / "missing")
    (path / "README.md").write_text("notes")
    verify(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=r"is damaged: tokenizer\.json is missing; re-create it"):
        secateur.load(path)


@pytest.mark.parametrize("content, message", [
    ("{not json", r"compression\.json is not valid JSON"),
    ("[1, 2]", r"compression\.json holds a list"),
    ('{"format_version": 2, "files": {}}', r"format_version 2, newer .*; upgrade secateur"),
    ('{"format_version": "one", "files": {}}', r"unknown format_version 'one'; expected 1"),
    ('{"format_version": 1, "files": {}}', r"lists no safetensors weights"),
    ('{"format_version": 1, "files": {"../x.safetensors": {"sha256": "0", "bytes": 1}}}', r"invalid entry for file"),
])
def test_bad_card_is_caught(llama_artifact: Path, tmp_path: Path, content: str, message: str) -> None:
    path = damaged_copy(llama_artifact, tmp_path / "card")
    (path / "compression.json").write_text(content)
    with pytest.raises(ArtifactError, match=message):
        verify(path)


def test_verify_on_non_artifacts(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        verify(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="not a secateur artifact: compression.json is missing"):
        verify(tmp_path)


# --- atomic saving ------------------------------------------------------------------------------

def failing_save_pretrained(model: torch.nn.Module):
    real = model.save_pretrained

    def save_pretrained(directory, **kwargs):
        real(directory, **kwargs)
        data = (Path(directory) / "model.safetensors").read_bytes()
        (Path(directory) / "model.safetensors").write_bytes(data[: len(data) // 3])
        raise RuntimeError("disk on fire")

    return save_pretrained


def test_crash_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("llama")
    monkeypatch.setattr(model, "save_pretrained", failing_save_pretrained(model))
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        save(model, target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_crash_while_replacing_keeps_the_old_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny_model("llama", with_tokenizer=True)
    target = save(model, tmp_path / "out", tokenizer=tokenizer)
    before = verify(target)

    other = tiny_model("llama", seed=1)

    def broken_tokenizer_save(directory):
        (Path(directory) / "tokenizer.json").write_text("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken_tokenizer_save)
    with pytest.raises(ArtifactError, match=r"could not write artifact .*out: No space left on device"):
        save(other, target, tokenizer=tokenizer)
    assert verify(target) == before
    assert siblings(target) == []


def test_failed_final_rename_restores_the_old_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = save(tiny_model("llama"), tmp_path / "out")
    before = verify(target)
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in os.fspath(src):
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ArtifactError, match="Input/output error"):
        save(tiny_model("llama", seed=1), target)
    monkeypatch.undo()
    assert verify(target) == before
    assert siblings(target) == []


def test_replacing_an_artifact(tmp_path: Path) -> None:
    target = save(tiny_model("llama", seed=0), tmp_path / "out")
    second = tiny_model("llama", seed=1)
    save(second, target)
    assert torch.equal(outputs(secateur.load(target).model), outputs(second))
    assert siblings(target) == []


def test_saving_back_over_the_loaded_artifact(llama_artifact: Path, tmp_path: Path) -> None:
    path = save(secateur.load(llama_artifact).model, tmp_path / "self")
    model = secateur.load(path).model
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    expected = outputs(model)
    save(model, path)
    assert torch.equal(outputs(secateur.load(path).model), expected)
    assert siblings(path) == []


def test_refuses_to_overwrite_user_data(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactError, match=r"refusing to overwrite .*mine: it is a non-empty directory that is not "
                                            r"a secateur artifact"):
        save(tiny_model("llama"), target)
    assert (target / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]

    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="it is a file"):
        save(tiny_model("llama"), tmp_path / "file")


def test_empty_directory_and_missing_parents_are_fine(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    verify(save(tiny_model("llama"), tmp_path / "empty"))
    verify(save(tiny_model("llama"), tmp_path / "a" / "b" / "c"))


def test_never_pickles_and_stays_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    def no_pickles(*args, **kwargs):
        raise AssertionError("torch.save called")

    monkeypatch.setattr(torch, "save", no_pickles)
    monkeypatch.setenv("SECATEUR_PROGRESS", "0")
    model, tokenizer = tiny_model("gpt2", with_tokenizer=True)
    path = save(model, tmp_path / "q", tokenizer=tokenizer)
    captured = capsys.readouterr()
    assert captured.out == "" and "Writing model shards" not in captured.err
    assert all(not name.endswith((".bin", ".pt", ".pkl")) for name in verify(path)["files"])


def test_rejects_what_it_cannot_save(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="expected a Hugging Face PreTrainedModel"):
        save(torch.nn.Linear(2, 2), tmp_path / "x")
    from torch.nn.utils import prune

    model = tiny_model("llama")
    prune.l1_unstructured(model.model.layers[0].mlp.up_proj, "weight", amount=0.5)
    with pytest.raises(ArtifactError, match=r"module 'model\.layers\.0\.mlp\.up_proj' still carries"):
        save(model, tmp_path / "y")
    assert list(tmp_path.iterdir()) == []


def test_sharded_weights_are_listed_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from secateur.artifacts import weights_hash

    model = tiny_model("llama")
    real = model.save_pretrained
    monkeypatch.setattr(model, "save_pretrained", lambda directory, **kw: real(directory, max_shard_size="40KB", **kw))
    path = save(model, tmp_path / "sharded")
    card = verify(path)
    shards = [name for name in card["files"] if name.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in card["files"]
    assert card["weights_sha256"] == weights_hash(path)
    assert card_summary(card)["weights_bytes"] == sum((path / name).stat().st_size for name in shards)
    assert torch.equal(outputs(secateur.load(path).model), outputs(model))


def test_compressed_model_card(tmp_path: Path) -> None:
    pytest.importorskip("secateur.prune.magnitude")
    recipe = secateur.Recipe(name="half", steps=(secateur.MagnitudeConfig(sparsity=0.5),))
    model, tokenizer = tiny_model("llama", with_tokenizer=True)
    secateur.compress_(model, recipe)
    expected = outputs(model)
    path = save(model, tmp_path / "half", tokenizer=tokenizer, recipe=recipe,
                metrics={"before": {"ppl": 130.0}, "after": {"ppl": 131.5}})
    card = secateur.load(path).info["card"]
    assert card["recipe"] == recipe.to_dict()
    assert card["history"][0]["step"] == recipe.steps[0].to_dict()
    assert card["sparsity"]["block_fraction"] == pytest.approx(0.5)
    assert card_summary(card)["steps"] == ["magnitude"]
    assert torch.equal(outputs(secateur.load(path).model), expected)


def test_artifact_files_get_the_users_umask_not_0600(tmp_path):
    import os
    import stat

    import secateur
    from secateur.testing import tiny_model

    old = os.umask(0o022)
    try:
        path = secateur.save(tiny_model("llama"), tmp_path / "art")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("edit", ["sparsity", "recipe", "base_hash"])
def test_an_edited_card_is_refused(llama_artifact: Path, tmp_path: Path, edit: str) -> None:
    """The card is sealed by a digest over its content: editing what it records is noticed."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(llama_artifact, copy)
    card = json.loads((copy / "compression.json").read_text())
    assert card["card_sha256"]
    if edit == "sparsity":
        card["sparsity"]["fraction"] = 0.9
    elif edit == "recipe":
        card["recipe"] = {"steps": [{"method": "magnitude", "sparsity": 0.1}]}
    else:  # the base model's identity (None for a model built in memory)
        card["base_model"] = {**(card.get("base_model") or {}), "weights_sha256": "0" * 64}
    (copy / "compression.json").write_text(json.dumps(card, indent=2))
    with pytest.raises(ArtifactError, match="edited after it was written"):
        secateur.load(copy)


@pytest.mark.parametrize("stray", ["pytorch_model.bin", "extra.safetensors"])
def test_weight_files_the_card_does_not_list_are_refused_by_name(llama_artifact: Path, tmp_path: Path,
                                                                 stray: str) -> None:
    import shutil

    copy = tmp_path / "stray"
    shutil.copytree(llama_artifact, copy)
    (copy / stray).write_bytes(b"not listed")
    with pytest.raises(ArtifactError, match=f"does not list: {stray}"):
        verify(copy)


def test_a_malformed_safetensors_header_is_an_artifact_error_naming_the_file(llama_artifact: Path,
                                                                           tmp_path: Path) -> None:
    """Even with a card that matches it (hash and seal rewritten), a file whose header is not
    safetensors is named in one line, not left to the library's bare exception."""
    import shutil

    copy = tmp_path / "malformed"
    shutil.copytree(llama_artifact, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes((10**9).to_bytes(8, "little") + b"{not json")
    card = json.loads((copy / "compression.json").read_text())
    card["files"]["model.safetensors"] = {"sha256": artifacts.checkpoint._sha256(weights), "bytes": weights.stat().st_size}
    card["card_sha256"] = artifacts.card.seal(card)
    (copy / "compression.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="model.safetensors is not a safetensors file"):
        verify(copy)


def test_an_unsealed_card_of_an_older_artifact_still_loads(llama_artifact: Path, tmp_path: Path, caplog) -> None:
    import shutil

    copy = tmp_path / "old"
    shutil.copytree(llama_artifact, copy)
    card = json.loads((copy / "compression.json").read_text())
    del card["card_sha256"]
    (copy / "compression.json").write_text(json.dumps(card))
    assert verify(copy)["files"] and "unsealed" in caplog.text


def test_measuring_or_saving_a_model_leaves_it_without_a_lineage_it_did_not_have(tmp_path: Path) -> None:
    from secateur.evaluate import evaluate

    model = tiny_model("llama")
    evaluate(model, None, "speed", prompt_len=8, new_tokens=2, runs=2, warmup=1)
    save(model, tmp_path / "plain")
    assert "_secateur_lineage" not in model.__dict__
    secateur.compress_(model, secateur.MagnitudeConfig(sparsity=0.2))
    assert [s.method for s in lineage.read(model).steps] == ["magnitude"]
