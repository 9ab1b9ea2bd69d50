"""Sentence similarity by protocol P2 (STS benchmark).

Each sentence is embedded as the mean of the model's ``last_hidden_state`` over its non-padding
tokens, L2-normalised (max_length 128, batch 64, fp32); the score is Spearman's rank correlation
x 100 between the cosine similarity of the two sentences and the gold score.
all-MiniLM-L6-v2 gives 86.72 on the dev split.
"""

from __future__ import annotations

import logging
from typing import Any

from ..data import TextSource, fingerprint, source, tokenizer_info
from ..errors import SecateurError
from ..progress import track
from .results import EvalResult, environment

log = logging.getLogger(__name__)

P2_BATCH, P2_MAX_LENGTH = 64, 128


def sentence_embeddings(model: Any, tokenizer: Any, texts: list[str], batch: int = P2_BATCH,
                        max_length: int = P2_MAX_LENGTH) -> Any:
    """L2-normalised mean-pooled embeddings ``[len(texts), hidden]`` in float32, in input order.

    Works for encoders and causal LMs alike (the base model's last hidden state is pooled). The model
    runs as it was given (:func:`secateur.runtime.optimize_` gives a W8A8 encoder fused blocks).
    """
    import torch

    from ..runtime.batching import mean_pooled

    out = []
    starts = range(0, len(texts), batch)
    for start in track(starts, "embedding", total=len(starts)):
        out.append(mean_pooled(model, tokenizer, texts[start:start + batch], max_length))
    return torch.cat(out)


def sts(model: Any, tokenizer: Any, data: str | TextSource = "stsb", *, split: str | None = None,
        batch: int = P2_BATCH, max_length: int = P2_MAX_LENGTH, max_pairs: int | None = None) -> EvalResult:
    """Spearman x 100 between embedding cosine and gold score on sentence pairs (P2 on ``stsb``).

    ``data`` is ``stsb`` (split ``dev`` by default, or ``train``) or a file with sentence1,
    sentence2, score; ``max_pairs`` scores only the first pairs (the result then names no protocol).
    """
    from scipy.stats import pearsonr, spearmanr

    if tokenizer is None:
        raise SecateurError("sts needs the model's tokenizer; the model was loaded without one")
    if batch < 1 or max_length < 2 or (max_pairs is not None and max_pairs < 2):
        raise SecateurError(f"sts needs batch >= 1, max_length >= 2 and max_pairs >= 2 "
                            f"(got batch={batch}, max_length={max_length}, max_pairs={max_pairs})")
    src = source(data)
    split = split or src.eval_split
    first, second, gold = src.pairs(split)
    available = len(gold)
    if max_pairs is not None:
        first, second, gold = first[:max_pairs], second[:max_pairs], gold[:max_pairs]
    if len(gold) < 2:
        raise SecateurError(f"{src.name}:{split} holds {len(gold)} sentence pairs; a correlation needs at least 2")

    was_training = model.training
    model.eval()
    try:
        a = sentence_embeddings(model, tokenizer, first, batch, max_length)
        b = sentence_embeddings(model, tokenizer, second, batch, max_length)
    finally:
        model.train(was_training)
    cosine = (a * b).sum(dim=-1).double().numpy()
    spearman = float(spearmanr(cosine, gold)[0]) * 100
    pearson = float(pearsonr(cosine, gold)[0]) * 100

    env = environment(model)
    deviations = []
    if not (src.named and src.name == "stsb"):
        deviations.append("data is not stsb")
    if env["dtype"] != "float32":
        deviations.append(f"dtype {env['dtype']} (P2: float32)")
    if batch != P2_BATCH:
        deviations.append(f"batch {batch} (P2: {P2_BATCH})")
    if max_length != P2_MAX_LENGTH:
        deviations.append(f"max_length {max_length} (P2: {P2_MAX_LENGTH})")
    if len(gold) < available:
        deviations.append(f"max_pairs {max_pairs} of {available}")
    protocol = None if deviations else "P2"
    settings = {
        "protocol": protocol, "convention": "P2", "data": src.describe(split),
        "fingerprint": fingerprint(list(zip(first, second, gold))), "tokenizer": tokenizer_info(tokenizer),
        "pairs": len(gold), "max_pairs": max_pairs, "batch": batch, "max_length": max_length,
        "pooling": "mean over non-padding tokens of last_hidden_state, L2-normalised",
        **env, "deviations": deviations,
    }
    extra = {"pearson": pearson, "pairs": len(gold)}
    return EvalResult("sts", protocol, "spearman", spearman, extra, settings)
