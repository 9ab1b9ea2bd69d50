"""The registry: round trips through the store, lineage from the cards, aliases and their history,
refs wherever a model path is accepted, errors that name what exists, plain checkpoints, gc."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
from pathlib import Path

import pytest
import torch

import secateur
from secateur import artifacts, lineage
from secateur.errors import SecateurError
from secateur.evaluate import EvalResult
from secateur.registry import Registry, RegistryError, resolve_model
from secateur.registry import store
from secateur.testing import run_cli, tiny_model, tiny_tokenizer

IDS = torch.tensor([[1, 7, 9, 33, 54, 2, 80, 100]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def made(made: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared base → pruned (tests/registry/conftest.py), then pruned70 (magnitude 0.7), plus a
    plain Hugging Face checkpoint (no card) and a compressed-tensors checkpoint without a card (what
    llm-compressor writes)."""
    root = tmp_path_factory.mktemp("more")
    out = dict(made)
    tokenizer = artifacts.load(out["base"]).tokenizer
    loaded = artifacts.load(out["pruned"])
    secateur.compress_(loaded.model, secateur.MagnitudeConfig(sparsity=0.7))
    out["pruned70"] = secateur.save(loaded.model, root / "pruned70", tokenizer=loaded.tokenizer)
    plain = root / "plain-gpt2"
    tiny_model("gpt2").save_pretrained(plain)
    tiny_tokenizer("gpt2").save_pretrained(plain)
    out["plain"] = plain
    quantized = tiny_model("llama")
    secateur.compress_(quantized, secateur.RTNConfig(bits=4, group_size=16))
    ct = secateur.save(quantized, root / "rtn", tokenizer=tokenizer)
    (ct / "compression.json").unlink()  # a compressed-tensors checkpoint as other tools write it: no card
    out["llmcompressor"] = ct
    return out


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("SECATEUR_HOME", str(path))
    return path


@pytest.fixture
def reg(home: Path):
    with Registry() as registry:
        yield registry


def objects(home: Path) -> list[str]:
    return store.stored_keys(home / "objects")


# --- the database -------------------------------------------------------------------------------

def test_the_database_is_wal_with_foreign_keys_and_a_schema_version(reg: Registry, home: Path) -> None:
    assert reg.home == home and (home / "registry.db").is_file()
    conn = sqlite3.connect(home / "registry.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"families", "variants", "edges", "evaluations", "runs", "aliases", "alias_history", "search_points"} <= tables
    conn.close()
    assert reg.db.read(lambda c: c.execute("PRAGMA foreign_keys").fetchone()[0]) == 1
    assert reg.integrity() == "ok"


def test_a_newer_schema_is_refused_in_one_line(home: Path) -> None:
    Registry(home).close()
    conn = sqlite3.connect(home / "registry.db")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RegistryError, match=r"schema version 99, newer than this secateur reads \(2\); upgrade"):
        Registry(home)


def test_the_home_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from secateur import settings

    monkeypatch.delenv("SECATEUR_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert settings.home() == tmp_path / "xdg" / "secateur"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert settings.home() == Path.home() / ".local" / "share" / "secateur"
    monkeypatch.setenv("SECATEUR_HOME", str(tmp_path / "h"))
    assert settings.home() == tmp_path / "h"
    assert Registry.existing() is None and not (tmp_path / "h").exists()  # looking never creates one


# --- adding and the store -----------------------------------------------------------------------

def test_add_round_trip_stores_once_by_content(reg: Registry, made: dict[str, Path], home: Path) -> None:
    card = artifacts.verify(made["base"])
    v = reg.add(made["base"], "stories", "base")
    assert v.id.startswith("v-") and len(v.id) == 14 and v.ref == "stories/base" and v.status == "admitted"
    assert v.weights_sha256 == card["weights_sha256"] == artifacts.weights_hash(made["base"])
    assert v.bytes == sum(p.stat().st_size for p in made["base"].iterdir())
    assert v.parameters == card["sparsity"]["parameters"] and v.model_type == "llama"
    assert v.card == card and v.path == home / "objects" / v.store_key
    assert artifacts.verify(v.path) == card  # the stored object is a complete, verified artifact
    assert all(not os.stat(p).st_mode & stat.S_IWUSR for p in v.path.iterdir())  # read-only
    for ref in (v.id, "stories/base"):
        assert reg.resolve(ref) == v
    assert reg.add(made["base"], "stories").id == v.id  # the same content again: the same variant
    other = reg.add(made["base"], "copies", "base")  # another family: a new variant, the same object
    assert other.id != v.id and other.store_key == v.store_key and objects(home) == [v.store_key]
    assert [x.id for x in reg.list()] == [v.id, other.id] and [x.id for x in reg.list("copies")] == [other.id]
    assert reg.families() == ["copies", "stories"]
    assert not list((home / "objects").glob(".*"))  # no temporary left behind


def test_the_store_key_is_the_manifest_hash(reg: Registry, made: dict[str, Path]) -> None:
    import hashlib

    v = reg.add(made["base"], "stories")
    lines = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_size} {p.name}\n"
                    for p in sorted(made["base"].iterdir()))
    assert v.store_key == hashlib.sha256(lines.encode()).hexdigest()


def test_a_name_taken_by_other_content_is_refused(reg: Registry, made: dict[str, Path], home: Path) -> None:
    reg.add(made["base"], "stories", "x")
    with pytest.raises(RegistryError, match=r"already has a variant named 'x' \(v-[0-9a-f]{12}\) with other content"):
        reg.add(made["pruned"], "stories", "x")
    assert len(objects(home)) == 1  # the refused copy was taken back out of the store
    for bad in ("a/b", "a@b", "", "-x", "v-0123456789ab"):
        with pytest.raises(RegistryError, match="name"):
            reg.add(made["base"], bad if bad != "-x" else "stories", "ok" if bad != "-x" else bad)


def test_add_refuses_what_is_not_a_model_directory(reg: Registry, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="no config.json"):
        reg.add(tmp_path / "empty", "f")
    (tmp_path / "pickles").mkdir()
    (tmp_path / "pickles" / "config.json").write_text("{}")
    (tmp_path / "pickles" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(RegistryError, match=r"no \.safetensors weights \(it holds pytorch_model.bin"):
        reg.add(tmp_path / "pickles", "f")
    with pytest.raises(RegistryError, match="not a directory"):
        reg.add(tmp_path / "missing", "f")


def test_a_damaged_artifact_is_not_stored(reg: Registry, made: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(made["base"], bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(SecateurError, match="sha256 mismatch"):
        reg.add(bad, "stories")
    assert reg.list() == [] and objects(reg.home) == []
    assert not list((reg.home / "objects").glob(".*"))


def test_a_plain_hugging_face_checkpoint(reg: Registry, made: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    v = reg.add(made["plain"], "gpt2s")
    assert v.name == "plain-gpt2" and v.card is None and v.model_type == "gpt2"
    assert v.weights_sha256 == artifacts.weights_hash(made["plain"])
    assert v.parameters == sum(t.numel() for t in load_file(made["plain"] / "model.safetensors").values())
    assert v.info["config"]["architectures"] == ["GPT2LMHeadModel"]
    assert v.headline()["storage"] == "dense" and v.headline()["weights_bytes"] > 0
    loaded = secateur.load("gpt2s/plain-gpt2")
    assert loaded.model.config.model_type == "gpt2" and loaded.info["registry"]["variant"] == v.id


def test_a_compressed_tensors_checkpoint_without_a_card(reg: Registry, made: dict[str, Path]) -> None:
    v = reg.add(made["llmcompressor"], "q", "w4")
    assert v.card is None and v.info["config"]["quantization"]["quant_method"] == "compressed-tensors"
    assert "compressed-tensors" in v.headline()["storage"]
    loaded = secateur.load("q/w4")  # read back into QuantLinear modules
    assert any(type(m).__name__ == "QuantLinear" for m in loaded.model.modules())


# --- lineage ------------------------------------------------------------------------------------

def test_lineage_from_the_cards(reg: Registry, made: dict[str, Path]) -> None:
    base = reg.add(made["base"], "stories", "base")
    pruned = reg.add(made["pruned"], "stories", "pruned")
    deeper = reg.add(made["pruned70"], "stories", "pruned70")
    assert pruned.parent_id == base.id and deeper.parent_id == pruned.id  # found by the cards' base hashes
    root = reg.lineage("stories/pruned")
    assert root.variant == base and [c.variant.id for c in root.children] == [pruned.id]
    node = root.children[0]
    assert node.target and [s["step"]["method"] for s in node.steps] == ["magnitude"]
    assert node.steps[0]["step"]["sparsity"] == 0.5
    assert [c.variant.id for c in node.children] == [deeper.id] and node.children[0].steps[0]["step"]["sparsity"] == 0.7
    assert [n.label for n in root.walk()] == ["stories/base", "stories/pruned", "stories/pruned70"]


def test_a_child_registered_before_its_parent_is_linked_when_the_parent_arrives(reg: Registry,
                                                                                made: dict[str, Path]) -> None:
    pruned = reg.add(made["pruned"], "stories", "pruned")
    root = reg.lineage(pruned.id)
    assert root.variant is None and root.weights_sha256 == artifacts.verify(made["base"])["weights_sha256"]
    assert [c.variant.id for c in root.children] == [pruned.id]  # the base, known only by its hash
    base = reg.add(made["base"], "stories", "base")
    assert reg.resolve(pruned.id).parent_id == base.id and reg.lineage(pruned.id).variant == base


def test_an_explicit_parent_and_a_plain_checkpoint(reg: Registry, made: dict[str, Path]) -> None:
    base = reg.add(made["base"], "stories", "base")
    plain = reg.add(made["plain"], "stories", "imported", parent="stories/base")
    assert plain.parent_id == base.id
    with pytest.raises(RegistryError, match="family 'stories' has no variant named 'nope'"):
        reg.add(made["pruned"], "stories", parent="stories/nope")


# --- aliases ------------------------------------------------------------------------------------

def test_alias_moves_and_rollback_history(reg: Registry, made: dict[str, Path]) -> None:
    a = reg.add(made["base"], "stories", "a")
    b = reg.add(made["pruned"], "stories", "b")
    c = reg.add(made["pruned70"], "stories", "c")
    reg.set_alias("stories", "fast", a.id)
    reg.set_alias("stories", "fast", "stories/b")
    move = reg.set_alias("stories", "fast", c)
    assert (move.variant_id, move.previous_id) == (c.id, b.id) and reg.resolve("stories@fast") == c
    assert reg.rollback("stories", "fast").variant_id == b.id and reg.resolve("stories@fast").id == b.id
    assert reg.rollback("stories", "fast").variant_id == a.id  # each rollback takes back one move
    with pytest.raises(RegistryError, match=r"stories@fast has no earlier target to roll back to"):
        reg.rollback("stories", "fast")
    history = reg.alias_history("stories", "fast")
    assert [(h.action, h.variant_id, h.undone) for h in history] == [
        ("set", a.id, False), ("set", b.id, True), ("set", c.id, True), ("rollback", b.id, False),
        ("rollback", a.id, False)]
    reg.set_alias("stories", "fast", c.id)  # a new move after rollbacks rolls back to where it was
    assert reg.rollback("stories", "fast").variant_id == a.id
    assert [x.ref for x in reg.aliases("stories")] == ["stories@fast"]


def test_rejected_variants_and_other_families_get_no_alias(reg: Registry, made: dict[str, Path]) -> None:
    bad = reg.add(made["pruned"], "stories", "bad", status="rejected", evidence={"gate": "ppl", "drop": 12.5})
    assert bad.status == "rejected" and bad.info["evidence"]["drop"] == 12.5
    with pytest.raises(RegistryError, match="was rejected by its gates; a rejected variant gets no alias"):
        reg.set_alias("stories", "fast", bad.id)
    other = reg.add(made["base"], "minilm", "base")
    reg.add(made["base"], "stories", "base")
    with pytest.raises(RegistryError, match="belongs to family 'minilm', not 'stories'"):
        reg.set_alias("stories", "fast", other.id)


# --- errors that name what exists ---------------------------------------------------------------

def test_errors_name_what_exists(reg: Registry, made: dict[str, Path]) -> None:
    v = reg.add(made["base"], "stories", "base")
    reg.set_alias("stories", "fast", v.id)
    reg.set_alias("stories", "champion", v.id)
    reg.add(made["plain"], "minilm", "base")
    with pytest.raises(RegistryError) as info:
        reg.resolve("storys@fast")
    assert "unknown family 'storys' (did you mean 'stories'?)" in str(info.value)
    assert "families: 'minilm', 'stories'" in str(info.value)
    with pytest.raises(RegistryError, match=r"family 'stories' has no alias 'fats' \(did you mean 'fast'\?\); "
                                            r"its aliases: 'champion', 'fast'"):
        reg.resolve("stories@fats")
    with pytest.raises(RegistryError, match=r"family 'minilm' has no alias 'fast'; it has no aliases"):
        reg.resolve("minilm@fast")
    with pytest.raises(RegistryError, match=r"family 'stories' has no variant named 'bas' \(did you mean 'base'\?\)"):
        reg.resolve("stories/bas")
    with pytest.raises(RegistryError, match=r"no variant 'v-000000000000' in registry .*; 2 variants exist, e\.g\."):
        reg.resolve("v-000000000000")
    with pytest.raises(RegistryError, match="is not a registry ref; expected FAMILY@ALIAS, FAMILY/NAME or a variant"):
        reg.resolve("just-a-name")
    for error in (RegistryError("x"),):
        assert isinstance(error, SecateurError)
    with pytest.raises(RegistryError) as info:
        reg.rollback("stories", "fastest")
    assert "(did you mean 'fast'?)" in str(info.value) and "\n" not in str(info.value)


# --- refs where a model path is accepted --------------------------------------------------------

def test_secateur_load_takes_refs(reg: Registry, made: dict[str, Path]) -> None:
    v = reg.add(made["pruned"], "stories", "pruned")
    reg.set_alias("stories", "fast", v.id)
    expected = logits(artifacts.load(made["pruned"]).model)
    assert secateur.load is secateur.registry.load
    for ref in ("stories@fast", v.id, "stories/pruned"):
        loaded = secateur.load(ref)
        assert torch.equal(logits(loaded.model), expected)
        assert loaded.info["registry"] == {"ref": ref, "variant": v.id, "family": "stories", "name": "pruned",
                                           "path": str(v.path)}
        assert lineage.of(loaded.model).base.name == "stories/pruned"
        assert lineage.of(loaded.model).base.weights_sha256 == v.weights_sha256
    assert secateur.load(made["pruned"]).info["name"] == str(made["pruned"])  # a path is a path
    with pytest.raises(RegistryError, match="has no alias 'slow'"):
        secateur.load("stories@slow")


def test_a_child_made_from_a_ref_links_back_to_it(reg: Registry, made: dict[str, Path], tmp_path: Path) -> None:
    v = reg.add(made["base"], "stories", "base")
    reg.set_alias("stories", "champion", v.id)
    loaded = secateur.load("stories@champion")
    secateur.compress_(loaded.model, secateur.MagnitudeConfig(sparsity=0.3))
    child = reg.add(secateur.save(loaded.model, tmp_path / "p30", tokenizer=loaded.tokenizer), "stories")
    assert child.parent_id == v.id and child.card["base_model"]["name"] == "stories/base"
    assert reg.lineage(child.id).children[0].steps[0]["step"]["sparsity"] == 0.3


def test_refs_resolve_only_when_they_are_refs(home: Path, made: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    assert resolve_model(str(made["base"])) == str(made["base"])  # an existing path
    assert resolve_model("org/model") == "org/model" and not home.exists()  # a hub id; nothing created
    with pytest.raises(RegistryError, match=r"'stories@fast' names a registry variant, but there is no registry in"):
        resolve_model("stories@fast")
    with Registry() as reg:
        reg.add(made["base"], "stories", "base")
    assert resolve_model("org/model") == "org/model"  # 'org' is no family: still a hub id
    assert Path(resolve_model("stories/base")).parent == home / "objects"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stories@fast").mkdir()  # a directory of that name wins over the ref
    assert resolve_model("stories@fast") == "stories@fast"


def test_secateur_eval_and_info_take_refs(reg: Registry, made: dict[str, Path], tmp_path: Path, capsys) -> None:
    v = reg.add(made["pruned"], "stories", "pruned")
    reg.set_alias("stories", "fast", v.id)
    text = tmp_path / "t.txt"
    text.write_text("a small story about a cat and a dog.\n" * 50)

    def run(*args: str) -> tuple[int, str, str]:
        return run_cli(capsys, *args)

    code, out, err = run("eval", "stories@fast", "--task", "perplexity", "--data", str(text), "--max-windows", "2",
                         "--seq-len", "32", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "perplexity" and result["settings"]["model"]["name"] == "stories/pruned"
    reg.record_evaluation("stories@fast", result)
    assert reg.evaluations(v.id)[0].value == result["value"]
    code, out, err = run("info", "stories@fast", "--json")
    assert code == 0 and json.loads(out)["source"]["registry"]["variant"] == v.id
    code, out, err = run("eval", "stories@fastest", "--task", "perplexity", "--data", str(text))
    assert code == 2 and "has no alias 'fastest' (did you mean 'fast'?)" in err and len(err.strip().splitlines()) == 1


# --- evaluations and runs -----------------------------------------------------------------------

def test_evaluations_keep_every_setting(reg: Registry, made: dict[str, Path]) -> None:
    v = reg.add(made["base"], "stories", "base")
    settings = {"fingerprint": "abc123", "threads": 2, "machine": {"cpu": "Test CPU", "flags": ["avx2"]},
                "data": {"name": "tinystories", "split": "validation"}, "seq_len": 256}
    result = EvalResult("perplexity", "P1", "perplexity", 5.5, {"tokens": 1000}, settings)
    e = reg.record_evaluation("stories/base", result)
    assert (e.task, e.protocol, e.metric, e.value, e.data_fingerprint) == ("perplexity", "P1", "perplexity", 5.5,
                                                                           "abc123")
    assert e.machine == {"cpu": "Test CPU", "flags": ["avx2"], "threads": 2} and e.settings == settings
    assert e.to_result() == result and e.at.endswith("Z")
    e2 = reg.record_evaluation(v.id, {"task": "speed", "protocol": None, "metric": "decode_tokens_per_s",
                                      "value": float("nan")})
    assert e2.value is None and e2.protocol is None
    with pytest.raises(RegistryError, match="evaluation value 'high' is not a number"):
        reg.record_evaluation(v.id, {"task": "sts", "metric": "spearman", "value": "high"})
    with pytest.raises(RegistryError, match="lacks value"):
        reg.record_evaluation(v.id, {"task": "sts", "metric": "spearman"})
    assert [x.id for x in reg.evaluations(v.id)] == [e.id, e2.id]


def test_pipeline_runs(reg: Registry, made: dict[str, Path]) -> None:
    run = reg.start_run("stories-family", {"file": "stories.yaml"})
    assert run.status == "running" and run.id.startswith("r-") and run.finished is None
    v = reg.add(made["base"], "stories", "base", run=run.id)
    reg.record_evaluation(v.id, {"task": "sts", "metric": "spearman", "value": 0.8}, run=run.id)
    done = reg.finish_run(run.id, "failed", timings={"base": 1.5},
                          verdicts=[{"variant": "base", "kind": "quality", "passed": False, "value": -3.2}])
    assert done.status == "failed" and done.timings == {"base": 1.5} and done.verdicts[0]["value"] == -3.2
    assert v.run_id == run.id and reg.evaluations(v.id)[0].run_id == run.id and reg.runs() == [done]
    with pytest.raises(RegistryError, match="no pipeline run 'r-000000000000'.*recent runs: "):
        reg.finish_run("r-000000000000")
    with pytest.raises(RegistryError, match="run status 'done' is not valid"):
        reg.finish_run(run.id, "done")


# --- compare, remove, gc ------------------------------------------------------------------------

def test_compare(reg: Registry, made: dict[str, Path]) -> None:
    a = reg.add(made["base"], "stories", "base")
    b = reg.add(made["pruned"], "stories", "pruned")
    reg.record_evaluation(a.id, {"task": "perplexity", "protocol": "P1", "metric": "perplexity", "value": 9.0})
    reg.record_evaluation(a.id, {"task": "perplexity", "protocol": "P1", "metric": "perplexity", "value": 8.0})
    reg.record_evaluation(b.id, {"task": "perplexity", "protocol": "P1", "metric": "perplexity", "value": 11.0})
    rows = reg.compare(["stories/base", b.id])
    assert [r.variant.id for r in rows] == [a.id, b.id]
    assert [e.value for e in rows[0].evaluations] == [8.0]  # the latest per task, metric and protocol
    assert rows[1].headline["sparsity"] > rows[0].headline["sparsity"] and rows[1].headline["steps"] == ["magnitude"]


def test_remove_and_gc_keep_referenced_objects_only(reg: Registry, made: dict[str, Path], home: Path) -> None:
    a = reg.add(made["base"], "stories", "base")
    b = reg.add(made["pruned"], "stories", "pruned")
    c = reg.add(made["pruned70"], "stories", "pruned70")
    shared = reg.add(made["pruned"], "elsewhere", "pruned")  # the same object as b
    reg.set_alias("stories", "fast", b.id)
    reg.record_evaluation(b.id, {"task": "sts", "metric": "spearman", "value": 0.8})
    with pytest.raises(RegistryError, match=r"is the target of stories@fast; move or drop those aliases first"):
        reg.remove(b.id)
    reg.remove("stories/pruned", force=True)
    assert reg.aliases("stories") == [] and reg.alias_history("stories", "fast")[-1].action == "drop"
    assert reg.counts()["evaluations"] == 0  # its evaluations went with it
    assert reg.resolve(c.id).parent_id is None  # its child keeps an edge to it by hash
    assert reg.lineage(c.id).weights_sha256 == b.weights_sha256
    reg.remove(a.id)
    assert reg.gc().removed == [a.store_key]  # b's object is still shared's
    assert sorted(objects(home)) == sorted({c.store_key, shared.store_key})
    assert artifacts.verify(reg.path(c.id)) and artifacts.verify(reg.path(shared.id))
    reg.remove(shared.id)
    report = reg.gc()
    assert report.removed == [b.store_key] and report.freed_bytes > 0 and report.kept == 1
    assert objects(home) == [c.store_key] and reg.gc().removed == []
    assert reg.integrity() == "ok"


def test_set_status_admits_or_rejects_with_evidence(reg: Registry, made: dict[str, Path]) -> None:
    v = reg.add(made["pruned"], "stories", "p", status="rejected", evidence={"verdicts": [{"passed": False}]})
    assert reg.add(made["pruned"], "stories", "p", status="admitted").status == "rejected"  # add returns it as it is
    admitted = reg.set_status(v.id, "admitted", evidence={"verdicts": [{"passed": True}]})
    assert admitted.status == "admitted" and admitted.info["evidence"] == {"verdicts": [{"passed": True}]}
    reg.set_alias("stories", "fast", v.id)
    with pytest.raises(RegistryError, match="is the target of stories@fast; move those aliases before rejecting it"):
        reg.set_status(v.id, "rejected")
    with pytest.raises(RegistryError, match="status 'maybe' is not valid"):
        reg.set_status(v.id, "maybe")
