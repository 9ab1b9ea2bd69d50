"""Batched decoding of a causal LM with continuous batching, and batched mean-pooled embeddings.

A :class:`DecodeBatch` holds the sequences a model is decoding together and one KV cache for all
of them (``transformers.DynamicCache``, rows = sequences). Its two operations are the only two
forward passes serving needs:

* :meth:`DecodeBatch.admit` — prefill new prompts together: left-padded to the longest, with an
  attention mask that hides the padding and position ids counted over the real tokens only
  (``cumsum(mask) - 1``), so a row's numbers are those of the prompt run alone. Each new row's
  first token is sampled from the last position's logits, then its cache joins the running batch:
  the shorter of the two caches is left-padded with masked zeros to the other's length and the
  rows are concatenated. New sequences therefore join *between decode steps* (continuous
  batching), without waiting for the running ones to finish;
* :meth:`DecodeBatch.step` — one decode step of every running row: the token each row sampled
  last goes in at that row's own next position; the mask grows by one column.

Finished rows (end of sequence, token budget, or a caller's stop) leave with :meth:`drop`; their
cache rows are removed and cache columns that only padding still occupies are cut off the left, so
a long-running batch does not keep paying for sequences that left.

Sampling is per row (:class:`Sampling`): temperature 0 is greedy (argmax), otherwise temperature
then nucleus (``top_p``) sampling with the row's own ``torch.Generator`` (seeded when asked, so a
seeded request gives the same tokens whatever else shares its batch). Every chosen token's
log-probability under the model (log-softmax of the raw logits, before temperature and top-p) is
kept with it, and the ``top_logprobs`` most likely alternatives when asked: a confidence-based
router reads them.

Greedy tokens of a prompt decoded in a batch equal those of the prompt alone (tests/serve): the
masked padding changes no real position's attention, only the float summation order of batched
matrix products, far below the gaps between competing logits on the tested models.

:func:`mean_pooled` is the sentence embedding of protocol P2 (mean of the last hidden state over
non-padding tokens, L2-normalised): evaluation's STS and the serving gateway's ``/v1/embeddings``
both call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import SecateurError


@dataclass(frozen=True)
class Sampling:
    """How a row chooses its tokens. ``temperature`` 0 is greedy; ``top_logprobs`` alternatives
    (0-20) are returned beside each chosen token's own log-probability."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 100.0 and math.isfinite(self.temperature)):
            raise SecateurError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise SecateurError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_logprobs <= 20:
            raise SecateurError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")


@dataclass(eq=False)
class Sequence:
    """One prompt being decoded: its token ids, what it generated so far, and why it stopped
    (``finish``: ``"stop"`` at an end-of-sequence token, ``"length"`` at ``max_new``, or whatever
    a caller sets with :meth:`finish_now`)."""

    prompt: list[int]
    max_new: int
    sampling: Sampling = field(default_factory=Sampling)
    eos: frozenset[int] = frozenset()
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    finish: Optional[str] = None
    tag: Any = None  # the caller's handle (the serving request)

    def __post_init__(self) -> None:
        if not self.prompt:
            raise SecateurError("a sequence needs at least one prompt token")
        if self.max_new < 1:
            raise SecateurError(f"max_new must be at least 1, got {self.max_new}")
        self._generator = None
        if self.sampling.seed is not None:
            import torch

            self._generator = torch.Generator().manual_seed(int(self.sampling.seed))

    def finish_now(self, reason: str) -> None:
        """Stop this row at the next :meth:`DecodeBatch.drop` (a stop string, a cancelled request)."""
        if self.finish is None:
            self.finish = reason

    def _take(self, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if self.sampling.top_logprobs:
            self.top.append(top)
        if token in self.eos:
            self.finish = "stop"
        elif len(self.tokens) >= self.max_new:
            self.finish = "length"


def choose(logits: Any, rows: list[Sequence]) -> list[int]:
    """Sample one token per row from ``logits`` ``[rows, vocab]`` and record it (with its
    log-probability) on the row; returns the tokens."""
    import torch

    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    chosen: list[int] = []
    for i, seq in enumerate(rows):
        s = seq.sampling
        if s.temperature == 0.0:
            token = int(torch.argmax(logits[i]))
        else:
            probs = torch.softmax(logits[i] / s.temperature, dim=-1)
            if s.top_p < 1.0:
                ordered, order = torch.sort(probs, descending=True)
                before = torch.cumsum(ordered, dim=0) - ordered  # mass strictly above each token
                ordered = torch.where(before < s.top_p, ordered, torch.zeros_like(ordered))
                probs = torch.zeros_like(probs).scatter(0, order, ordered)
            token = int(torch.multinomial(probs, 1, generator=seq._generator))
        top: list[tuple[int, float]] = []
        if s.top_logprobs:
            values, ids = torch.topk(logp[i], s.top_logprobs)
            top = [(int(t), float(v)) for t, v in zip(ids, values)]
        seq._take(token, float(logp[i, token]), top)
        chosen.append(token)
    return chosen


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") for layer in layers):
        raise SecateurError(f"continuous batching needs a DynamicCache with per-layer keys/values; "
                            f"got {type(cache).__name__}")
    return layers


def _pad_left(tensor: Any, width: int, dim: int) -> Any:
    """``tensor`` with ``width`` zero columns prepended along ``dim``."""
    import torch

    if width == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class DecodeBatch:
    """The rows a causal LM decodes together, with their shared KV cache (see the module text).

    Not thread-safe: one worker thread owns a batch and calls :meth:`admit`, :meth:`step` and
    :meth:`drop` in turn.
    """

    def __init__(self, model: Any, pad_id: int = 0):
        from . import cache_argument

        self.model = model.eval()
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self._cache_name = cache_argument(model)
        self.rows: list[Sequence] = []
        self.cache: Any = None
        self.mask: Any = None       # [rows, cache length] 1 = real token
        self.positions: Any = None  # [rows] the position the next fed token takes
        self.pending: Any = None    # [rows] the token each row sampled last, fed at the next step

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """Cache columns (the longest row's positions plus left padding)."""
        return 0 if self.mask is None else int(self.mask.shape[1])

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_name: cache})
        return out.logits[:, -1]

    def admit(self, seqs: list[Sequence]) -> list[int]:
        """Prefill ``seqs`` as one left-padded batch, sample each one's first token, and add the rows
        that did not finish at once to the running batch. Returns the first tokens."""
        import torch
        from transformers import DynamicCache

        if not seqs:
            return []
        longest = max(len(s.prompt) for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, longest - len(seq.prompt):] = torch.tensor(seq.prompt, dtype=torch.long)
            mask[row, longest - len(seq.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with torch.inference_mode():
            tokens = choose(self._forward(ids, mask, positions, cache), seqs)
        keep = [i for i, s in enumerate(seqs) if s.finish is None]
        if keep:
            index = torch.tensor(keep, device=self.device)
            if len(keep) < len(seqs):
                cache.batch_select_indices(index)
            self._join([seqs[i] for i in keep], cache, mask.index_select(0, index),
                       torch.tensor([len(seqs[i].prompt) for i in keep], device=self.device),
                       torch.tensor([tokens[i] for i in keep], device=self.device))
        return tokens

    def _join(self, seqs: list[Sequence], cache: Any, mask: Any, positions: Any, pending: Any) -> None:
        import torch

        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.pending = list(seqs), cache, mask, positions, pending
            return
        width = max(self.width, int(mask.shape[1]))
        for mine, theirs in zip(_layers(self.cache), _layers(cache)):
            a, b = width - mine.keys.shape[-2], width - theirs.keys.shape[-2]
            mine.keys = torch.cat([_pad_left(mine.keys, a, -2), _pad_left(theirs.keys, b, -2)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, a, -2), _pad_left(theirs.values, b, -2)], dim=0)
        self.mask = torch.cat([_pad_left(self.mask, width - self.width, 1), _pad_left(mask, width - mask.shape[1], 1)])
        self.positions = torch.cat([self.positions, positions])
        self.pending = torch.cat([self.pending, pending])
        self.rows.extend(seqs)

    def step(self) -> list[int]:
        """One decode step of every row: feeds each row's pending token, samples the next."""
        import torch

        if not self.rows:
            return []
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        with torch.inference_mode():
            logits = self._forward(self.pending[:, None], self.mask, self.positions[:, None], self.cache)
            tokens = choose(logits, self.rows)
        self.positions = self.positions + 1
        self.pending = torch.tensor(tokens, device=self.device)
        return tokens

    def drop(self) -> list[Sequence]:
        """Remove the finished rows (and the cache columns only padding occupies); returns them."""
        import torch

        done = [s for s in self.rows if s.finish is not None]
        if not done:
            return []
        keep = [i for i, s in enumerate(self.rows) if s.finish is None]
        if not keep:
            self.rows, self.cache, self.mask, self.positions, self.pending = [], None, None, None, None
            return done
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask.index_select(0, index)
        self.positions, self.pending = self.positions.index_select(0, index), self.pending.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start:
            for layer in _layers(self.cache):
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
            self.mask = self.mask[:, start:]
        return done


def mean_pooled(model: Any, tokenizer: Any, texts: list[str], max_length: int = 128) -> Any:
    """L2-normalised mean of the base model's last hidden state over each text's non-padding tokens,
    ``[len(texts), hidden]`` float32 on the CPU, in input order, as one batch (protocol P2's pooling;
    all-MiniLM-L6-v2's sentence-transformers pooling). Causal LMs run without a cache."""
    import torch
    import torch.nn.functional as F

    from ..models.arch import arch_of

    body = getattr(model, "base_model", model)
    facts = arch_of(model, strict=False)
    call = {"use_cache": False} if facts is not None and facts.kind == "causal" else {}
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    device = next(model.parameters()).device
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, seq in enumerate(encoded):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        hidden = body(input_ids=ids, attention_mask=mask, **call)[0].float()
        weights = mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return F.normalize(pooled, p=2, dim=-1).cpu()


__all__ = ["Sampling", "Sequence", "DecodeBatch", "choose", "mean_pooled"]
