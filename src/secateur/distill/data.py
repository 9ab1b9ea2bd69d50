"""Training text for distillation: token sequences from any text source, from the recipe's
calibration windows, or sampled from the teacher (sequence-level distillation, Kim & Rush 2016).

A :class:`TrainingSet` is a list of token sequences split into train and held-out parts, read in
a fixed order per epoch (a seeded permutation): micro-batch ``k`` of a run is a pure function of
``k``, so a resumed run reads exactly the batches the killed one would have read.

Causal LMs train on consecutive windows of ``seq_len`` tokens cut from each source's text stream
(``BOS + paragraph``, concatenated, as in P1); encoders on one sequence per text (a sentence, a
line), truncated to ``seq_len`` tokens and padded per batch.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

from ..errors import SecateurError

log = logging.getLogger(__name__)

GROUP = 50  # batches sorted together by length (texts of different lengths only)


@dataclass
class TrainingSet:
    train: list[torch.Tensor]
    holdout: list[torch.Tensor]
    pad_id: int = 0
    seed: int = 0
    describe: dict[str, Any] = field(default_factory=dict)
    real: list[torch.Tensor] = field(default_factory=list)   # the real text (train and held out), not generated

    def __post_init__(self) -> None:
        self._orders: dict[tuple[int, int], list[int]] = {}
        if not self.train:
            raise SecateurError("the training set is empty; give more text (data sources, samples) or a shorter seq_len")

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for part in (self.train, self.holdout):
            for seq in part:
                digest.update(seq.to(torch.int64).numpy().tobytes())
                digest.update(b"|")
            digest.update(b"#")
        return digest.hexdigest()[:16]

    def order(self, epoch: int, size: int = 1) -> list[int]:
        """The reading order of ``epoch``: a seeded permutation. When lengths differ (sentences), each
        window of ``GROUP`` batches is sorted by length, cut into batches and the batches shuffled,
        so a batch pads to about its own length instead of the longest text (same texts per epoch)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.train), generator=generator).tolist()
        if len({len(s) for s in self.train}) == 1:
            return perm
        out: list[int] = []
        window = size * GROUP
        for start in range(0, len(perm), window):
            chunk = sorted(perm[start:start + window], key=lambda i: len(self.train[i]))
            batches = [chunk[b:b + size] for b in range(0, len(chunk), size)]
            for b in torch.randperm(len(batches), generator=generator).tolist():
                out += batches[b]
        return out

    def batch(self, k: int, size: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``k`` (0-based) of ``size`` sequences: positions ``k·size …`` of the stream of
        per-epoch orders."""
        n = len(self.train)
        rows, epoch, order = [], -1, None
        for p in range(k * size, (k + 1) * size):
            if p // n != epoch:
                epoch = p // n
                if (epoch, size) not in self._orders:  # keep the current epoch's order only
                    self._orders = {(epoch, size): self.order(epoch, size)}
                order = self._orders[(epoch, size)]
            rows.append(self.train[order[p % n]])
        return collate(rows, self.pad_id)

    def holdout_batches(self, size: int) -> Iterable[dict[str, torch.Tensor]]:
        for start in range(0, len(self.holdout), size):
            yield collate(self.holdout[start:start + size], self.pad_id)


def collate(rows: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (1 on real tokens)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def split(sequences: list[torch.Tensor], holdout: float, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A seeded held-out fraction (at least one sequence when ``holdout > 0`` and there are two)."""
    if holdout <= 0 or len(sequences) < 2:
        return sequences, []
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(seed)).tolist()
    n_hold = max(1, min(len(sequences) - 1, round(holdout * len(sequences))))
    hold = sorted(order[:n_hold])
    keep = sorted(order[n_hold:])
    return [sequences[i] for i in keep], [sequences[i] for i in hold]


def parse_source(spec: str) -> tuple[str, Optional[str]]:
    """``name[:split]`` (``stsb:train``, ``wikitext2:validation``, ``c4``) or a file path."""
    from pathlib import Path

    from ..data.sources import NAMED

    name, sep, part = spec.partition(":")
    if sep and name.lower() in NAMED and not Path(spec).exists():
        return name.lower(), part or None
    return spec, None


def source_sequences(spec: str, tokenizer: Any, kind: str, seq_len: int) -> list[torch.Tensor]:
    """The sequences of one source: windows (causal) or one per text (encoder)."""
    from ..data import source

    name, split_name = parse_source(spec)
    src = source(name)
    texts = src.texts(split_name or src.calib_split)
    texts = [t for t in (t.strip() for t in texts) if t]
    if kind == "causal":
        return paragraph_windows(tokenizer, texts, seq_len, f"data '{spec}'", "use a shorter seq_len or more text")
    encoded = tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]
    return [torch.tensor(ids, dtype=torch.long) for ids in encoded if len(ids) > 2]


def paragraph_windows(tokenizer: Any, texts: list[str], seq_len: int, what: str, hint: str) -> list[torch.Tensor]:
    """Consecutive ``seq_len``-token windows of the ``BOS + paragraph`` stream of ``texts``."""
    from ..data.calibration import paragraph_stream

    stream = paragraph_stream(tokenizer, texts)
    n = len(stream) // seq_len
    if n == 0:
        raise SecateurError(f"{what} holds {len(stream)} tokens, fewer than one window of {seq_len}; {hint}")
    return list(torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len))


def as_paragraphs(samples: list[torch.Tensor], tokenizer: Any, seq_len: int) -> list[torch.Tensor]:
    """Teacher samples cut the way a ``data:`` source is: each sample split into stories at BOS and
    into paragraphs at line breaks, every paragraph tokenized as ``BOS + paragraph``, the stream
    cut into ``seq_len`` windows. A teacher trained on whole stories writes a paragraph break as a
    newline, while real text here (P1 included) starts every paragraph with BOS; a student trained
    on the raw samples meets that format only in the few real windows."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise SecateurError("cutting generated text into paragraphs needs a tokenizer with a BOS token")
    stories = [list(run) for row in samples
               for is_bos, run in itertools.groupby(row.tolist(), key=lambda token: token == bos) if not is_bos]
    texts = [paragraph for story in tokenizer.batch_decode(stories, skip_special_tokens=True)
             for paragraph in (line.strip() for line in story.split("\n")) if paragraph]
    return paragraph_windows(tokenizer, texts, seq_len, "the generated text cut into paragraphs",
                             "generate more sequences")


@torch.no_grad()
def generate(teacher: Any, tokenizer: Any, n: int, length: int, *, temperature: float = 1.0, seed: int = 0,
             batch: int = 128) -> list[torch.Tensor]:
    """``n`` sequences of ``length`` tokens sampled from a causal teacher, each starting at BOS:
    plain ancestral sampling (no top-k or top-p) through ``generate`` with a static KV cache
    (much faster than a growing cache on a small model). Batch ``i`` is drawn from its own
    seed, so the same seed gives the same text. End-of-sequence does not stop a row: sampling runs
    past the end of a story into the next one, as the training stream does."""
    from transformers import GenerationConfig

    from ..progress import track

    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise SecateurError("generating text needs a tokenizer with a BOS token")
    if length < 2:
        raise SecateurError(f"generated sequences need at least 2 tokens (BOS and one sampled); got {length}")
    settings = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=length - 1,
                                eos_token_id=None, bos_token_id=bos, pad_token_id=bos,  # no row ends: never padded
                                cache_implementation="static")
    out: list[torch.Tensor] = []
    was_training, defaults = teacher.training, teacher.generation_config
    teacher.eval()
    # generate() fills unset fields from the model's own defaults, its end-of-sequence id included;
    # a copy without it is swapped in for the call
    teacher.generation_config = copy.deepcopy(defaults)
    teacher.generation_config.eos_token_id = None
    device = next(teacher.parameters()).device
    starts = range(0, n, batch)
    try:
        for start in track(starts, "generating", total=len(starts)):
            b = min(batch, n - start)
            ids = torch.full((b, 1), bos, dtype=torch.long, device=device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed * 1_000_003 + start)
                sampled = teacher.generate(ids, attention_mask=torch.ones_like(ids), generation_config=settings)
            if sampled.shape[1] != length:
                raise SecateurError(f"the teacher stopped after {sampled.shape[1]} of {length} tokens")
            out.extend(sampled.cpu())
    finally:
        teacher.train(was_training)
        teacher.generation_config = defaults
    return out
