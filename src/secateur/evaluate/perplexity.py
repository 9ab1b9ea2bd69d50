"""Perplexity of a causal LM over non-overlapping windows, by protocol P1 or P3.

P1 (``data="tinystories"``): the evaluation paragraphs, each ``BOS + tokenizer(paragraph)``,
concatenated; 512-token windows, tail dropped; each window predicts its tokens 2..512 from the
ones before them; PPL = exp(total NLL / predicted tokens). stories260K gives 5.508.

P3 (``data="wikitext2"``, GPTQ/SparseGPT convention): the test rows joined with ``"\\n\\n"`` and
tokenized once; windows of the model's context length (or ``seq_len``), tail dropped;
PPL = exp(sum over windows of mean NLL x window length / (windows x window length)).
Any other dataset or file is windowed and scored the P3 way over its texts joined with ``"\\n\\n"``
(the result then names no protocol).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ..data import TextSource, fingerprint, paragraph_stream, source, text_ids, tokenizer_info
from ..errors import SecateurError
from ..models.arch import arch_of
from ..progress import track
from .results import EvalResult, environment

log = logging.getLogger(__name__)

P1_SEQ_LEN = 512


def context_length(model: Any) -> int | None:
    """The longest sequence the model's positions cover, from its config."""
    facts = arch_of(model, strict=False)
    if facts is not None and facts.sizes.get("context"):
        return int(facts.sizes["context"])
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return None


def check_causal(model: Any, task: str) -> None:
    facts = arch_of(model, strict=False)
    if facts is not None and facts.kind != "causal":
        raise SecateurError(f"{task} needs a causal language model; '{facts.model_type}' is an encoder "
                            "(use task 'sts' or 'speed' for it)")


def window_nll(model: Any, windows: Any, batch: int = 8) -> Any:
    """Sum of next-token NLL inside each window (float64, one value per window); each window of
    length L contributes L-1 predictions, scored on its own."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    sums = []
    starts = range(0, windows.shape[0], batch)
    with torch.inference_mode():
        for start in track(starts, "perplexity", total=len(starts)):
            ids = windows[start:start + batch].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            sums.append(nll.view(ids.shape[0], -1).double().sum(dim=1).cpu())
    return torch.cat(sums)


def perplexity(model: Any, tokenizer: Any, data: str | TextSource, *, split: str | None = None,
               seq_len: int | None = None, batch: int = 8, max_windows: int | None = None) -> EvalResult:
    """Perplexity of ``model`` on ``data`` (a dataset name or a file path), P1 or P3 as above.

    ``max_windows`` scores only the first windows (a quick run; the result then names no protocol).
    """
    import torch

    check_causal(model, "perplexity")
    if tokenizer is None:
        raise SecateurError("perplexity needs the model's tokenizer; the model was loaded without one")
    if batch < 1 or (max_windows is not None and max_windows < 1) or (seq_len is not None and seq_len < 2):
        raise SecateurError(f"perplexity needs batch >= 1, max_windows >= 1 and seq_len >= 2 "
                            f"(got batch={batch}, max_windows={max_windows}, seq_len={seq_len})")
    src = source(data)
    split = split or src.eval_split
    context = context_length(model)
    convention = "P1" if src.named and src.name == "tinystories" else "P3"
    length = seq_len or (P1_SEQ_LEN if convention == "P1" else context)
    if length is None:
        raise SecateurError("the model's config gives no context length; pass seq_len")
    if context is not None and length > context:
        raise SecateurError(f"windows of {length} tokens are longer than the model's context of {context}; "
                            f"pass seq_len <= {context}")

    texts = src.texts(split)
    if convention == "P1":
        stream = paragraph_stream(tokenizer, texts)
    else:
        stream = text_ids(tokenizer, "\n\n".join(texts))
    available = len(stream) // length
    if available == 0:
        raise SecateurError(f"{src.name}:{split} gives {len(stream)} tokens, fewer than one window of {length}")
    n = available if max_windows is None else min(available, max_windows)
    windows = torch.tensor(stream[: n * length], dtype=torch.long).view(n, length)
    vocab = model.get_input_embeddings().num_embeddings
    if int(windows.max()) >= vocab:
        raise SecateurError(f"the tokenizer gives token id {int(windows.max())} but the model's vocabulary has "
                            f"{vocab} entries; use the tokenizer that belongs to the model")

    was_training = model.training
    model.eval()
    try:
        sums = window_nll(model, windows, batch)
    finally:
        model.train(was_training)
    predicted = n * (length - 1)
    if convention == "P1":  # total NLL over predicted tokens
        nll = float(sums.sum()) / predicted
    else:  # GPTQ: mean NLL of each window x window length, over windows x window length
        nll = float((sums / (length - 1) * length).sum()) / (n * length)
    value = math.exp(nll)

    deviations = []
    if convention == "P1":
        if split != "evaluation":
            deviations.append(f"split {split} (P1: evaluation)")
        if length != P1_SEQ_LEN:
            deviations.append(f"seq_len {length} (P1: {P1_SEQ_LEN})")
    elif not (src.named and src.name == "wikitext2" and split == "test"):
        deviations.append("data is not wikitext2:test")
    if n < available:
        deviations.append(f"max_windows {max_windows} of {available}")
    protocol = None if deviations else convention
    if deviations:
        log.info("perplexity on %s:%s deviates from %s: %s", src.name, split, convention, ", ".join(deviations))
    settings = {
        "protocol": protocol, "convention": convention, "data": src.describe(split),
        "fingerprint": fingerprint(windows), "tokenizer": tokenizer_info(tokenizer),
        "seq_len": length, "windows": n, "max_windows": max_windows, "batch": batch,
        "scoring": "exp(total NLL / predicted tokens)" if convention == "P1"
        else "exp(sum(window mean NLL * seq_len) / (windows * seq_len))",
        **environment(model), "deviations": deviations,
    }
    extra = {"nll": nll, "windows": n, "predicted_tokens": predicted, "stream_tokens": len(stream),
             "unscored_tokens": len(stream) - n * length}
    return EvalResult("perplexity", protocol, "perplexity", value, extra, settings)
