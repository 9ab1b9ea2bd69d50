"""Text sources: local files of every common shape, and the named datasets of the protocols.

    src = source("tinystories")          # a named dataset, found under SECATEUR_DATA_DIR
    src = source("notes.jsonl", field="body")
    src.texts("calibration")             # list[str]
    src.describe("calibration")          # {"name", "path", "split", "sha256", ...}

A named dataset is read from the data directory (``secateur.settings.data_dir()``). When that is
unset or lacks the file, it comes from the Hugging Face hub through the optional ``datasets``
package, but only when that package is installed and ``HF_HUB_OFFLINE`` is not set; otherwise
the error names the setting and the file that was looked for. Files are read on every call: no
cache survives a call, so there is no global state to go stale.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SecateurError, did_you_mean, one_of
from ..settings import data_dir

log = logging.getLogger(__name__)

FILE_TYPES = (".txt", ".jsonl", ".csv", ".tsv", ".parquet")
ALL = "all"  # the single split of a file source


# --- readers: path -> list of texts (or pairs) ----------------------------------------------------

def read_paragraphs(path: Path) -> list[str]:
    """Paragraphs separated by blank lines (split on ``"\\n\\n"``), stripped, empty ones dropped."""
    text = path.read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def read_rows(path: Path) -> list[str]:
    """WikiText rows exactly as the Hugging Face ``wikitext`` dataset gives them: one row per line,
    the newline kept, whitespace-only lines as ``""``. (P3 joins these with ``"\\n\\n"``.)"""
    with open(path, encoding="utf-8") as fh:
        return [line if line.strip() else "" for line in fh]


def read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SecateurError(f"{path}:{number} is not valid JSON ({exc.msg}); "
                                    "expected one object per line") from None
            if not isinstance(row, dict) or field not in row:
                keys = one_of(row) if isinstance(row, dict) else "none (not an object)"
                raise SecateurError(f"{path}:{number} has no field '{field}'; fields there: {keys}")
            texts.append(str(row[field]))
    return texts


def _read_table(path: Path, columns: tuple[str, ...]) -> dict[str, list[Any]]:
    """Named columns of a .csv/.tsv (header row) or .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SecateurError(f"reading '{path}' needs pyarrow; "
                                "install it with: pip install 'secateur[data]'") from None
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise SecateurError(f"'{path}' has no column '{missing[0]}'; columns there: {one_of(names)}")
        table = pq.read_table(path, columns=list(columns))
        return {c: table.column(c).to_pylist() for c in columns}
    # .tsv: tab-separated without quoting (quotes are text); .csv: the usual comma and double quotes
    style = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {"delimiter": ","}
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, **style)
        names = reader.fieldnames or []
        missing = [c for c in columns if c not in names]
        if missing:
            raise SecateurError(f"'{path}' has no column '{missing[0]}' in its header row; columns there: "
                                f"{one_of(names) or 'none'}")
        try:
            rows = list(reader)
        except csv.Error as exc:
            raise SecateurError(f"'{path}' line {reader.line_num} cannot be read as {suffix[1:]}: {exc}") from None
    return {c: [row[c] for row in rows] for c in columns}


def read_column(path: Path, field: str) -> list[str]:
    return [str(v) for v in _read_table(path, (field,))[field] if v is not None]


def read_stsb(path: Path) -> tuple[list[str], list[str], list[float]]:
    """The original STS benchmark layout: tab-separated, no quoting, no header; columns genre, file,
    year, id, score, sentence1, sentence2 and sometimes extra ones (ignored)."""
    first, second, scores = [], [], []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            line = line.rstrip("\n").rstrip("\r")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) < 7:
                raise SecateurError(f"{path}:{number} has {len(parts)} tab-separated fields; the STS benchmark layout "
                                    "has at least 7 (genre, file, year, id, score, sentence1, sentence2)")
            scores.append(float(parts[4]))
            first.append(parts[5])
            second.append(parts[6])
    return first, second, scores


def _stsb_layout(path: Path) -> bool:
    """Whether ``path`` is in the published STS benchmark layout (tab-separated, headerless, the
    score in the fifth field), as the benchmark's own ``sts-*.csv`` files are."""
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline().rstrip("\r\n").split("\t")
        float(first[4]) if len(first) >= 7 else float("x")
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return True


def read_pairs_file(path: Path) -> tuple[list[str], list[str], list[float]]:
    """Sentence pairs from a user file: columns/fields ``sentence1``, ``sentence2``, ``score``, or
    the published STS benchmark layout as it comes (tab-separated, headerless: genre, file, year,
    id, score, sentence1, sentence2)."""
    names = ("sentence1", "sentence2", "score")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt") and _stsb_layout(path):
        return read_stsb(path)
    if suffix == ".jsonl":
        cols = {n: read_jsonl(path, n) for n in names}
    elif suffix in (".csv", ".tsv", ".parquet"):
        cols = _read_table(path, names)
    else:
        raise SecateurError(f"sentence pairs cannot be read from '{path}'; use a .jsonl, .csv, .tsv or .parquet file "
                            "with fields sentence1, sentence2, score (or the named dataset 'stsb')")
    return [str(s) for s in cols["sentence1"]], [str(s) for s in cols["sentence2"]], [float(s) for s in cols["score"]]


# --- the named datasets ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Named:
    """A named dataset: which file holds each split under the data directory, how to read it, and
    where the hub keeps the same text."""

    files: dict[str, str]                       # split -> path relative to the data directory
    reader: str                                 # "paragraphs" | "rows" | "parquet" | "stsb"
    eval_split: str
    calib_split: str
    hub: dict[str, tuple[str, str | None, str]]  # split -> (hub dataset, config, hub split)
    slices: dict[str, slice] | None = None      # split -> which items of the file (tinystories)
    about: str = ""
    calib_mode: str = "consecutive"             # how calibration windows are cut by convention


NAMED: dict[str, Named] = {
    "tinystories": Named(
        files={"calibration": "tinystories/tinystories_val.txt", "evaluation": "tinystories/tinystories_val.txt",
               ALL: "tinystories/tinystories_val.txt"},
        reader="paragraphs", eval_split="evaluation", calib_split="calibration",
        hub={s: ("roneneldan/TinyStories", None, "validation") for s in ("calibration", "evaluation", ALL)},
        # P1: the first 4,300 paragraphs of the validation split; the first 430 calibrate, the rest evaluate
        slices={"calibration": slice(0, 430), "evaluation": slice(430, 4300), ALL: slice(0, 4300)},
        about="TinyStories validation paragraphs (P1)"),
    "wikitext2": Named(
        files={"test": "wikitext2/wiki.test.raw", "validation": "wikitext2/wiki.valid.tokens"},
        reader="rows", eval_split="test", calib_split="validation",
        hub={"test": ("wikitext", "wikitext-2-raw-v1", "test"),
             "validation": ("wikitext", "wikitext-2-v1", "validation")},
        about="WikiText-2 (P3: test = wiki.test.raw)"),
    "c4": Named(
        files={"validation": "c4/c4_validation_2k.parquet"},
        reader="parquet", eval_split="validation", calib_split="validation",
        hub={"validation": ("allenai/c4", "en", "validation")},
        about="C4-en validation documents (P3 calibration)", calib_mode="random"),
    "stsb": Named(
        files={"train": "stsb/sts-train.csv", "dev": "stsb/sts-dev.csv"},
        reader="stsb", eval_split="dev", calib_split="train",
        hub={"train": ("sentence-transformers/stsb", None, "train"),
             "dev": ("sentence-transformers/stsb", None, "validation")},
        about="STS benchmark sentence pairs with gold scores (P2)"),
}


def _hub_allowed() -> bool:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no")
    if offline:
        return False
    import importlib.util

    return importlib.util.find_spec("datasets") is not None


def _load_hub(name: str, split: str) -> Any:
    import datasets  # optional extra: secateur[hub]

    repo, config, hub_split = NAMED[name].hub[split]
    log.info("loading %s split %s from the Hugging Face hub (%s)", name, split, repo)
    if name == "c4":  # the full C4 is huge: read one validation shard
        return datasets.load_dataset(repo, data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                     split="validation")
    return datasets.load_dataset(repo, config, split=hub_split)


def _hub_texts(name: str, split: str) -> list[str]:
    rows = _load_hub(name, split)
    if name == "tinystories":  # paragraphs of the stories, in order, as the local file holds them
        paragraphs: list[str] = []
        for story in rows["text"]:
            paragraphs.extend(p.strip() for p in story.split("\n\n") if p.strip())
            if len(paragraphs) >= 4300:
                break
        return paragraphs
    if name == "wikitext2":
        return [t if t.strip() else "" for t in rows["text"]]
    if name == "stsb":
        return [s for pair in zip(rows["sentence1"], rows["sentence2"]) for s in pair]
    return list(rows["text"])


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- the source object ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TextSource:
    """A named dataset (``path`` None) or a local file (``path`` set, one split called ``all``)."""

    name: str
    path: Path | None = None
    field: str | None = None

    @property
    def named(self) -> Named | None:
        return NAMED.get(self.name) if self.path is None else None

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.named.files) if self.named else (ALL,)

    @property
    def eval_split(self) -> str:
        return self.named.eval_split if self.named else ALL

    @property
    def calib_split(self) -> str:
        return self.named.calib_split if self.named else ALL

    @property
    def default_mode(self) -> str:
        """Calibration convention: consecutive windows (P1), random windows for c4 (GPTQ, P3)."""
        return self.named.calib_mode if self.named else "consecutive"

    def _split(self, split: str | None, default: str) -> str:
        split = split or default
        if split not in self.splits:
            raise SecateurError(f"'{self.name}' has no split '{split}'{did_you_mean(split, self.splits)}; "
                                f"valid splits: {one_of(self.splits)}")
        return split

    def local_file(self, split: str | None = None) -> Path | None:
        """The file holding ``split``, or None when a named dataset will come from the hub.
        Raises when it is neither under the data directory nor reachable on the hub."""
        if self.path is not None:
            return self.path
        split = self._split(split, self.eval_split)
        relative = self.named.files[split]
        root = data_dir()
        if root is not None and (root / relative).is_file():
            return root / relative
        if _hub_allowed():
            return None
        where = (f"SECATEUR_DATA_DIR={root} has no {relative}" if root is not None
                 else f"SECATEUR_DATA_DIR is not set (it should name a folder holding {relative})")
        raise SecateurError(f"dataset '{self.name}' split '{split}' not found: {where}; set SECATEUR_DATA_DIR to a "
                            "folder with that file, or install 'datasets' and unset HF_HUB_OFFLINE to use the hub")

    def texts(self, split: str | None = None) -> list[str]:
        """The texts of ``split`` (default: the evaluation split). For ``stsb`` these are the
        sentences of the pairs (sentence1, sentence2 of each row, in order), scores ignored."""
        if self.path is not None:
            self._split(split, ALL)
            return _read_file(self.path, self.field)
        split = self._split(split, self.eval_split)
        spec = self.named
        path = self.local_file(split)
        if path is None:
            texts = _hub_texts(self.name, split)
        elif spec.reader == "paragraphs":
            texts = read_paragraphs(path)
        elif spec.reader == "rows":
            texts = read_rows(path)
        elif spec.reader == "parquet":
            texts = read_column(path, self.field or "text")
        else:
            first, second, _ = read_stsb(path)
            texts = [s for pair in zip(first, second) for s in pair]
        if spec.slices is not None:
            texts = texts[spec.slices[split]]
        return texts

    def pairs(self, split: str | None = None) -> tuple[list[str], list[str], list[float]]:
        """Sentence pairs and gold scores: ``stsb``, or a file with sentence1, sentence2, score."""
        if self.path is not None:
            self._split(split, ALL)
            return read_pairs_file(self.path)
        if self.name != "stsb":
            raise SecateurError(f"dataset '{self.name}' has no sentence pairs; use 'stsb' or a file with "
                                "fields sentence1, sentence2, score")
        split = self._split(split, self.eval_split)
        path = self.local_file(split)
        if path is not None:
            return read_stsb(path)
        rows = _load_hub(self.name, split)
        return list(rows["sentence1"]), list(rows["sentence2"]), [float(s) for s in rows["score"]]

    def describe(self, split: str | None = None) -> dict[str, Any]:
        """Where the text comes from: name, path (or hub id), split, sha256 of the file."""
        split = self._split(split, self.eval_split)
        path = self.local_file(split)
        info: dict[str, Any] = {"name": self.name, "split": split}
        if path is None:
            repo, config, hub_split = self.named.hub[split]
            hub_id = f"hf://datasets/{repo}" + (f"/{config}" if config else "") + f"@{hub_split}"
            info.update(path=hub_id, sha256=None)
        else:
            info.update(path=str(path), sha256=_file_sha256(path))
        if self.field:
            info["field"] = self.field
        if self.named and self.named.slices is not None:
            part = self.named.slices[split]
            info["items"] = f"{part.start or 0}:{part.stop}"
        return info


def _read_file(path: Path, field: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return read_paragraphs(path)
    if suffix == ".jsonl":
        return read_jsonl(path, field or "text")
    if suffix in (".csv", ".tsv", ".parquet"):
        return read_column(path, field or "text")
    raise SecateurError(f"cannot read '{path}': unknown file type '{suffix}'; valid types: {', '.join(FILE_TYPES)}")


def source(name_or_path: str | os.PathLike | TextSource, field: str | None = None) -> TextSource:
    """Resolve a named dataset (``tinystories``, ``wikitext2``, ``c4``, ``stsb``) or a file path.

    ``field`` picks the JSON field / table column holding the text (default ``text``).
    """
    if isinstance(name_or_path, TextSource):
        return name_or_path
    text = str(name_or_path)
    if text.lower() in NAMED and not Path(text).is_file():
        return TextSource(text.lower(), field=field)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_file():
            raise SecateurError(f"data path '{text}' is a directory; expected a {'/'.join(FILE_TYPES)} file "
                                f"or a dataset name ({one_of(NAMED)})")
        if path.suffix.lower() not in FILE_TYPES:
            raise SecateurError(f"cannot read '{text}': unknown file type '{path.suffix}'; "
                                f"valid types: {', '.join(FILE_TYPES)}")
        return TextSource(str(path), path=path, field=field)
    looks_like_path = os.sep in text or "/" in text or Path(text).suffix.lower() in FILE_TYPES
    if looks_like_path:
        raise SecateurError(f"data file '{text}' does not exist; give an existing {'/'.join(FILE_TYPES)} file "
                            f"or a dataset name ({one_of(NAMED)})")
    raise SecateurError(f"unknown dataset '{text}'{did_you_mean(text.lower(), NAMED)}; valid names: {one_of(NAMED)}, "
                        "or a path to a .txt/.jsonl/.csv/.tsv/.parquet file")

