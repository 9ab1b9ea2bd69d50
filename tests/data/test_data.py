"""secateur.data: file sources, named datasets, calibration sets, fingerprints, errors."""

from __future__ import annotations

import json
import logging
import sys
import time

import pytest
import torch

from secateur.data import CalibrationSet, calibration_set, fingerprint, paragraph_stream, source, text_ids
from secateur.errors import SecateurError
from secateur.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("llama")


@pytest.fixture(scope="module")
def stories_tok(stories_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories_dir)


# --- file sources ---------------------------------------------------------------------------------

def test_txt_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("  first para\nline two  \n\n\n\nsecond\n\n   \n\nthird\n", encoding="utf-8")
    src = source(str(path))
    assert src.texts() == ["first para\nline two", "second", "third"]
    assert src.splits == ("all",)
    info = src.describe()
    assert info["split"] == "all" and info["path"] == str(path) and len(info["sha256"]) == 64


def test_jsonl_default_and_named_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a b", "body": "x"}\n\n{"text": "c", "body": "y"}\n', encoding="utf-8")
    assert source(path).texts() == ["a b", "c"]
    assert source(path, field="body").texts() == ["x", "y"]
    with pytest.raises(SecateurError, match="no field 'nope'.*'body', 'text'"):
        source(path, field="nope").texts()
    (tmp_path / "bad.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(SecateurError, match="bad.jsonl:1 is not valid JSON"):
        source(tmp_path / "bad.jsonl").texts()


@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_tsv_column(tmp_path, suffix, sep):
    path = tmp_path / f"table{suffix}"
    quoted = '"bye, then"' if sep == "," else 'he said "bye'  # csv unquotes; tsv keeps quotes as text
    path.write_text(sep.join(["id", "content"]) + "\n" + sep.join(["1", "hello world"]) + "\n"
                    + sep.join(["2", quoted]) + "\n", encoding="utf-8")
    expected = "bye, then" if sep == "," else 'he said "bye'
    assert source(path, field="content").texts() == ["hello world", expected]
    with pytest.raises(SecateurError, match="no column 'text'.*'content', 'id'"):
        source(path).texts()


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["one", "two"], "url": ["u1", "u2"]}), path)
    assert source(path).texts() == ["one", "two"]
    assert source(path, field="url").texts() == ["u1", "u2"]
    with pytest.raises(SecateurError, match="no column 'body'"):
        source(path, field="body").texts()


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "docs.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SecateurError, match=r"pip install 'secateur\[data\]'"):
        source(path).texts()


def test_path_errors(tmp_path):
    with pytest.raises(SecateurError, match="does not exist"):
        source(str(tmp_path / "missing.txt"))
    with pytest.raises(SecateurError, match="is a directory"):
        source(str(tmp_path))
    (tmp_path / "x.docx").write_text("hi")
    with pytest.raises(SecateurError, match="unknown file type '.docx'; valid types: .txt, .jsonl"):
        source(str(tmp_path / "x.docx"))
    with pytest.raises(SecateurError, match="has no split 'train'.*'all'"):
        source(_txt(tmp_path)).texts("train")


def _txt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hello\n\nworld\n")
    return str(path)


def test_unknown_name_suggests():
    with pytest.raises(SecateurError) as err:
        source("tinystory")
    message = str(err.value)
    assert "did you mean 'tinystories'?" in message and "'wikitext2'" in message and "'c4'" in message
    assert "\n" not in message


# --- named datasets -------------------------------------------------------------------------------

def test_named_datasets(data_dir):
    stories = source("tinystories")
    calib, evaluation = stories.texts("calibration"), stories.texts("evaluation")
    assert (len(calib), len(evaluation), len(stories.texts("all"))) == (430, 3870, 4300)
    assert stories.texts("all") == calib + evaluation
    info = stories.describe("evaluation")
    assert info["sha256"] == "5fc1fb0113df62b567fb271806cd645ce8d75f59c58ca0b764c03d3b6ff34ca6"
    assert info["items"] == "430:4300"

    wiki = source("wikitext2").texts("test")   # rows as the HF dataset gives them
    assert len(wiki) == 4358 and wiki[0] == "" and wiki[1] == " = Robert Boulter = \n"
    assert sum(len(r.encode()) + 4 for r in wiki) == 1305088  # HF num_bytes of the test split
    assert len(source("wikitext2").texts("validation")) == 3760

    first, second, scores = source("stsb").pairs("dev")
    assert len(first) == len(second) == len(scores) == 1500
    assert first[0] == "A man with a hard hat is dancing." and scores[0] == 5.0
    assert len(source("stsb").pairs("train")[2]) == 5749
    assert source("stsb").texts("train")[:2] == ["A plane is taking off.", "An air plane is taking off."]
    with pytest.raises(SecateurError, match="has no sentence pairs"):
        source("c4").pairs()


def test_c4_parquet(data_dir):
    pytest.importorskip("pyarrow")
    texts = source("c4").texts()
    assert len(texts) == 2000 and all(isinstance(t, str) and t for t in texts[:10])


def test_missing_data_dir_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SECATEUR_DATA_DIR", str(tmp_path))
    with pytest.raises(SecateurError, match=r"SECATEUR_DATA_DIR=.* has no tinystories/tinystories_val\.txt"):
        source("tinystories").texts()
    monkeypatch.delenv("SECATEUR_DATA_DIR")
    with pytest.raises(SecateurError, match=r"SECATEUR_DATA_DIR is not set.*wikitext2/wiki\.test\.raw"):
        source("wikitext2").texts("test")
    with pytest.raises(SecateurError, match="no split 'tset' \\(did you mean 'test'\\?\\)"):
        source("wikitext2").texts("tset")


# --- calibration sets -----------------------------------------------------------------------------

def test_consecutive_calibration_is_p1_stream(data_dir, tok):
    calib = calibration_set("tinystories", tok, n_samples=8, seq_len=64)
    assert isinstance(calib, CalibrationSet) and calib.input_ids.shape == (8, 64)
    assert calib.input_ids.dtype == torch.long and len(calib) == 8
    stream = paragraph_stream(tok, source("tinystories").texts("calibration"))
    assert calib.input_ids.flatten().tolist() == stream[: 8 * 64]
    assert calib.input_ids[0, 0] == tok.bos_token_id
    assert calib.settings["source"]["split"] == "calibration" and calib.settings["mode"] == "consecutive"
    assert calib.to_dict()["fingerprint"] == calib.fingerprint and len(calib.fingerprint) == 16


def test_p1_calibration_set_with_real_tokenizer(data_dir, stories_tok):
    calib = calibration_set("tinystories", stories_tok)   # P1: 128 consecutive windows of 256
    assert calib.input_ids.shape == (128, 256)
    assert calib.input_ids[0, 0] == 1  # BOS
    again = calibration_set("tinystories", stories_tok)
    assert torch.equal(calib.input_ids, again.input_ids) and calib.fingerprint == again.fingerprint


def test_paragraph_stream_adds_bos_once(tok):
    assert paragraph_stream(tok, ["ab", "", "c"]) == [1, 72, 73, 1, 74]
    assert paragraph_stream(tok, ["ab", "c", "d"], need=2, chunk=1) == [1, 72, 73]  # stops once enough


def test_paragraph_stream_with_real_tokenizer(stories_tok):
    assert paragraph_stream(stories_tok, ["Once upon a time."])[0] == 1
    assert paragraph_stream(stories_tok, ["Once upon a time."]).count(1) == 1


def test_tokenizing_the_evaluation_split_is_fast(data_dir, stories_tok):
    texts = source("tinystories").texts("evaluation")
    start = time.perf_counter()
    stream = paragraph_stream(stories_tok, texts)
    elapsed = time.perf_counter() - start
    assert len(stream) == 343128
    assert elapsed < 4.0  # ~0.25 s measured; the bound leaves room for a loaded CI machine


def test_random_calibration_is_deterministic_and_seeded(tmp_path, tok):
    path = tmp_path / "docs.jsonl"
    docs = [" ".join(f"word{i}x{j}" for j in range(40 + 7 * i)) for i in range(12)] + ["short"]
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    a = calibration_set(str(path), tok, n_samples=6, seq_len=50, seed=0, mode="random")
    b = calibration_set(str(path), tok, n_samples=6, seq_len=50, seed=0, mode="random")
    c = calibration_set(str(path), tok, n_samples=6, seq_len=50, seed=1, mode="random")
    assert a.input_ids.shape == (6, 50)
    assert torch.equal(a.input_ids, b.input_ids) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.input_ids, c.input_ids) and a.fingerprint != c.fingerprint
    assert a.settings["seed"] == 0 and c.settings["seed"] == 1
    encoded = [text_ids(tok, d) for d in docs]
    for window in a.input_ids.tolist():  # every window is a slice of one document
        assert any(any(ids[k:k + 50] == window for k in range(len(ids) - 49)) for ids in encoded)


def test_random_calibration_on_c4(data_dir, stories_tok):
    pytest.importorskip("pyarrow")
    calib = calibration_set("c4", stories_tok, n_samples=16, seq_len=128, mode="random")
    assert calib.input_ids.shape == (16, 128)
    assert calib.settings["source"]["name"] == "c4"
    assert calib.fingerprint != calibration_set("c4", stories_tok, n_samples=16, seq_len=128, seed=3,
                                                mode="random").fingerprint


def test_calibration_settings_change_fingerprint(tmp_path, tok):
    path = _txt(tmp_path)
    a = calibration_set(path, tok, n_samples=2, seq_len=4)
    b = calibration_set(path, tok, n_samples=2, seq_len=5)
    assert a.fingerprint != b.fingerprint
    assert fingerprint(a.input_ids) == fingerprint(a.input_ids.clone())
    assert fingerprint(["a", "b"]) != fingerprint(["ab"])


def test_calibration_errors_and_short_sources(tmp_path, tok, caplog):
    path = _txt(tmp_path)  # "hello", "world": 12 tokens with BOS
    with caplog.at_level(logging.WARNING, logger="secateur.data"):
        calib = calibration_set(path, tok, n_samples=5, seq_len=4)
    assert len(calib) == 3 and "only 3 windows" in caplog.text
    with pytest.raises(SecateurError, match="fewer than one window of 64"):
        calibration_set(path, tok, n_samples=5, seq_len=64)
    with pytest.raises(SecateurError, match="no text in .* is longer than 64 tokens"):
        calibration_set(path, tok, n_samples=2, seq_len=64, mode="random")
    with pytest.raises(SecateurError, match="unknown calibration mode 'rand'; valid modes: 'consecutive', 'random'"):
        calibration_set(path, tok, mode="rand")


def test_an_sts_file_in_the_published_layout_is_read_as_it_comes(tmp_path, data_dir):
    """secateur eval --task sts --data FILE took only sentence1,sentence2,score with a header; the
    benchmark's own files (tab-separated, headerless, genre/file/year/id columns) are read too."""
    from secateur.data.sources import read_pairs_file, read_stsb

    published = data_dir / "stsb" / "sts-dev.csv"
    for name in ("copy.csv", "copy.tsv", "copy.txt"):
        path = tmp_path / name
        path.write_bytes(published.read_bytes())
        first, second, scores = read_pairs_file(path)
        assert (first, second, scores) == read_stsb(published) and len(scores) == 1500
    header = tmp_path / "pairs.csv"
    header.write_text("sentence1,sentence2,score\na cat,a dog,1.5\n")
    assert read_pairs_file(header) == (["a cat"], ["a dog"], [1.5])
