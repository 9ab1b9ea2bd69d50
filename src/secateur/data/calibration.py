"""Token streams, calibration sets and fingerprints.

Two conventions cut calibration windows out of text:

``consecutive`` (P1)  every text becomes ``BOS + tokenizer(text)`` (the tokenizer's default
                      special tokens; BOS is prepended when the tokenizer has one and did not add
                      it), the texts are concatenated into one stream, and windows are cut one
                      after the other from its start, up to ``n_samples``.
``random`` (GPTQ/P3)  a seeded ``torch.Generator`` picks a random document, keeps it when it has
                      more than ``seq_len`` tokens, and takes a window at a random offset; repeated
                      ``n_samples`` times (documents may repeat, as in the reference code).

Everything is deterministic: the same source, tokenizer, sizes and seed give identical tensors,
and :func:`fingerprint` over the token bytes and the settings names the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from ..errors import SecateurError, one_of
from .sources import TextSource, source as get_source

log = logging.getLogger(__name__)

MODES = ("consecutive", "random")


def fingerprint(data: Any, settings: dict[str, Any] | None = None) -> str:
    """16 hex digits of sha256 over token ids (a tensor, as int64 bytes with its shape) or texts
    (a list of str, or of str pairs), followed by the settings as canonical JSON."""
    digest = hashlib.sha256()
    if hasattr(data, "numpy"):
        import torch

        tensor = data.detach().to("cpu", torch.int64).contiguous()
        digest.update(json.dumps(list(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    else:
        for item in data:
            digest.update(repr(item).encode("utf-8"))
            digest.update(b"\0")
    if settings:
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""), "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer) if hasattr(tokenizer, "__len__") else None}


def paragraph_stream(tokenizer: Any, texts: list[str], need: int | None = None, chunk: int = 1024) -> list[int]:
    """The P1 token stream: ``BOS + tokenizer(text)`` for every non-empty text, concatenated.

    Texts are tokenized in batches of ``chunk``; with ``need`` the work stops as soon as the
    stream holds that many tokens (the stream's start is the same either way).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    texts = [t for t in texts if t.strip()]
    stream: list[int] = []
    for start in range(0, len(texts), chunk):
        for ids in tokenizer(texts[start:start + chunk], verbose=False)["input_ids"]:
            if bos is not None and (not ids or ids[0] != bos):
                stream.append(bos)
            stream.extend(ids)
        if need is not None and len(stream) >= need:
            break
    return stream


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """One text tokenized once with the tokenizer's defaults (the P3 convention)."""
    return list(tokenizer(text, verbose=False)["input_ids"])


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """``input_ids`` is a LongTensor ``[n, seq_len]``; ``settings`` says how it was made."""

    input_ids: Any
    fingerprint: str
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batches(self, size: int) -> list[Any]:
        """The windows in batches of ``size`` (the last one may be smaller)."""
        return list(self.input_ids.split(size))

    def to_dict(self) -> dict[str, Any]:
        """What a result or a compression card records about it (no tensors)."""
        return {"fingerprint": self.fingerprint, **self.settings}


def calibration_set(source: str | TextSource, tokenizer: Any, n_samples: int = 128, seq_len: int = 256,
                    seed: int = 0, mode: str = "consecutive", *, split: str | None = None) -> CalibrationSet:
    """Cut ``n_samples`` windows of ``seq_len`` tokens from a source's calibration split.

    ``source`` is a dataset name, a file path or a :class:`TextSource`; ``split`` defaults to the
    source's calibration split (tinystories: the first 430 paragraphs; c4: validation).
    """
    import torch

    if mode not in MODES:
        raise SecateurError(f"unknown calibration mode '{mode}'; valid modes: {one_of(MODES)}")
    if n_samples < 1 or seq_len < 2:
        raise SecateurError(f"calibration needs n_samples >= 1 and seq_len >= 2 (got {n_samples} and {seq_len})")
    src = get_source(source)
    split = split or src.calib_split
    texts = src.texts(split)
    where = f"{src.name}:{split}"
    if mode == "consecutive":
        stream = paragraph_stream(tokenizer, texts, need=n_samples * seq_len)
        n = min(n_samples, len(stream) // seq_len)
        if n == 0:
            raise SecateurError(f"{where} holds {len(stream)} tokens, fewer than one window of {seq_len}; "
                                "use a shorter seq_len or more text")
        if n < n_samples:
            log.warning("%s holds only %d windows of %d tokens; using %d instead of %d",
                        where, n, seq_len, n, n_samples)
        input_ids = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
        used_seed = None  # nothing random happens in this mode
    else:
        input_ids = _random_windows(tokenizer, texts, n_samples, seq_len, seed, where)
        used_seed = seed
    settings = {"source": src.describe(split), "tokenizer": tokenizer_info(tokenizer), "mode": mode,
                "n_samples": int(input_ids.shape[0]), "n_requested": n_samples, "seq_len": seq_len, "seed": used_seed}
    return CalibrationSet(input_ids, fingerprint(input_ids, settings), settings)


def _random_windows(tokenizer: Any, texts: list[str], n: int, seq_len: int, seed: int, where: str) -> Any:
    """GPTQ's sampler on a seeded generator; documents are tokenized only when picked (cached for
    this call only)."""
    import torch

    if not texts:
        raise SecateurError(f"{where} holds no text")
    generator = torch.Generator().manual_seed(seed)
    cache: dict[int, list[int]] = {}
    long_enough = 0
    windows = []
    while len(windows) < n:
        doc = int(torch.randint(len(texts), (1,), generator=generator))
        if doc not in cache:
            cache[doc] = text_ids(tokenizer, texts[doc])
            long_enough += len(cache[doc]) > seq_len
        ids = cache[doc]
        if len(ids) <= seq_len:
            if not long_enough and len(cache) == len(texts):
                longest = max(len(v) for v in cache.values())
                raise SecateurError(f"no text in {where} is longer than {seq_len} tokens (longest: {longest}); "
                                    "use a shorter seq_len or mode='consecutive'")
            continue
        start = int(torch.randint(len(ids) - seq_len, (1,), generator=generator))
        windows.append(ids[start:start + seq_len])
    return torch.tensor(windows, dtype=torch.long)
