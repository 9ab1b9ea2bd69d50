"""One loaded variant and the worker thread that runs it: the gateway's batching.

Each variant the gateway serves is an :class:`Engine` holding the model (loaded from its artifact
and given the runtime's fastest eager form by :func:`secateur.runtime.optimize_`), its tokenizer
and one worker thread. Request handlers (asyncio) hand it a job and await the job's events; the
worker owns the model and is the only thread that runs it.

* :class:`LMEngine` (causal LMs) does **continuous batching** with
  :class:`secateur.runtime.batching.DecodeBatch`: the worker loops *admit waiting sequences →
  one decode step of every running sequence → drop the finished ones*. A new request therefore
  joins the running batch at the next step boundary (its prompt is prefilled, with any others
  that arrived, as one left-padded batch) instead of waiting for the batch to drain. When the
  worker is idle, the first request waits ``window_ms`` for company (or until ``max_batch``
  sequences are waiting) before the first prefill. At most ``max_batch`` sequences run at once;
  the rest wait in the queue (the ``queue_depth`` gauge).
* :class:`EncoderEngine` (encoders) batches texts: after the window, up to ``max_batch`` texts
  from any number of requests go through one forward pass
  (:func:`secateur.runtime.batching.mean_pooled`), and each request gets its rows back.

Text is produced in the worker as tokens arrive: each choice decodes its tokens after one anchor
token of the prompt (so a SentencePiece word's leading space survives), cuts at the first stop
string (the row then stops), and holds back a tail that could still become a stop string or is
an incomplete UTF-8 character. Events go to the request's ``asyncio.Queue`` with
``loop.call_soon_threadsafe``. A cancelled job (timeout, client gone) leaves the batch at the next
step. If a forward pass raises, every job in that batch gets the error and the worker goes on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..runtime.batching import DecodeBatch, Sampling, Sequence, mean_pooled

log = logging.getLogger(__name__)


@dataclass
class Event:
    """What a job's queue receives: ``token`` (a choice's text delta and its token), ``done`` (a
    choice finished, with its reason) or ``error`` (the job failed: ``error`` holds the exception)."""

    kind: str
    index: int = 0
    text: str = ""
    token: Optional[int] = None
    logprob: float = 0.0
    top: list[tuple[int, float]] = field(default_factory=list)
    finish: Optional[str] = None
    error: Optional[BaseException] = None
    embeddings: Any = None


class Job:
    """A request's work in an engine, with the queue its events go to."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.submitted = time.perf_counter()

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop closed (server shutting down): nobody is listening
            pass

    def cancel(self) -> None:
        self.cancelled = True


class _Text:
    """One choice's text so far: decoded after an anchor token, cut at the first stop string."""

    def __init__(self, tokenizer: Any, anchor: list[int], stops: tuple[str, ...]):
        self.tokenizer, self.anchor, self.stops = tokenizer, anchor, stops
        self.prefix = tokenizer.decode(anchor, skip_special_tokens=True) if anchor else ""
        self.sent = 0
        self.text = ""
        self.stopped = False

    def update(self, tokens: list[int], final: bool) -> tuple[str, bool]:
        """The new text to send and whether a stop string was reached."""
        full = self.tokenizer.decode(self.anchor + tokens, skip_special_tokens=True)
        full = full[len(self.prefix):] if full.startswith(self.prefix) else full
        hits = [i for i in (full.find(s) for s in self.stops) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        else:
            end = len(full)
            if not final:
                if full.endswith("\ufffd"):  # a multi-byte character split across tokens
                    end = len(full.rstrip("\ufffd"))
                for stop in self.stops:  # a tail that could still grow into a stop string
                    for k in range(min(len(stop) - 1, end), 0, -1):
                        if full[:end].endswith(stop[:k]):
                            end -= k
                            break
        end = max(end, self.sent)
        delta, self.sent = full[self.sent:end], end
        self.text += delta
        return delta, self.stopped


class GenerateJob(Job):
    """Completions of one or more prompts (one choice each) with one sampling setting."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompts: list[list[int]], max_new: int, sampling: Sampling,
                 stops: tuple[str, ...], tokenizer: Any, eos: frozenset[int]):
        super().__init__(loop)
        self.prompts, self.max_new, self.sampling, self.stops = prompts, max_new, sampling, stops  # (Ray backend)
        self.sequences = [Sequence(ids, max_new, sampling, eos, tag=(self, i)) for i, ids in enumerate(prompts)]
        self.texts = [_Text(tokenizer, ids[-1:], stops) for ids in prompts]


class EmbedJob(Job):
    """Embeddings of several texts; the job finishes when every row is back."""

    def __init__(self, loop: asyncio.AbstractEventLoop, texts: list[str]):
        super().__init__(loop)
        self.texts = texts
        self.rows: list[Any] = [None] * len(texts)
        self.left = len(texts)


class Engine:
    """A loaded variant with its worker thread (see the module text)."""

    kind = "base"

    def __init__(self, variant: str, model: Any, tokenizer: Any, *, window_ms: float, max_batch: int,
                 observe: Optional[Callable[[str, str, float], None]] = None):
        self.variant, self.model, self.tokenizer = variant, model, tokenizer
        self.window, self.max_batch = window_ms / 1000.0, max_batch
        self.observe = observe or (lambda *_: None)
        self.context = _context_length(model, tokenizer)
        self.cond = threading.Condition()
        self.waiting: collections.deque[Any] = collections.deque()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name=f"secateur-serve-{variant}", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            self._enqueue(job)
            self.observe("queue", self.variant, float(len(self.waiting)))
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()

    def _enqueue(self, job: Job) -> None:
        self.waiting.append(job)

    def _gather(self, busy: bool) -> list[Any]:
        """Wait for work (and, from idle, for the batching window); take what fits. Holds the lock."""
        while not self.closed and not self.waiting and not busy:
            self.cond.wait()
        if not busy and self.waiting and self.window > 0:
            end = time.monotonic() + self.window
            while not self.closed and len(self.waiting) < self.max_batch and (left := end - time.monotonic()) > 0:
                self.cond.wait(left)
        return self._take(busy)

    def _take(self, busy: bool) -> list[Any]:
        raise NotImplementedError

    def _run(self) -> None:
        raise NotImplementedError


class LMEngine(Engine):
    """A causal LM's engine: continuous batching of sequences (see the module text)."""

    kind = "causal"

    def __init__(self, variant: str, model: Any, tokenizer: Any, **kwargs: Any):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.batch = DecodeBatch(model, pad_id=pad)
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
        super().__init__(variant, model, tokenizer, **kwargs)

    def _enqueue(self, job: Job) -> None:
        self.waiting.extend(job.sequences)

    def _take(self, busy: bool) -> list[Sequence]:
        room = self.max_batch - len(self.batch)
        taken = []
        while self.waiting and len(taken) < room:
            taken.append(self.waiting.popleft())
        if taken:
            self.observe("queue", self.variant, float(len(self.waiting)))
        return taken

    def _run(self) -> None:
        while True:
            with self.cond:
                new = self._gather(busy=len(self.batch) > 0)
                if self.closed:
                    return
            new = [s for s in new if not s.tag[0].cancelled]
            try:
                if new:
                    self.batch.admit(new)
                    self.observe("prefill", self.variant, float(len(new)))
                    for seq in new:
                        self._emit(seq)
                        if seq.finish is not None and seq not in self.batch.rows:
                            self._finished(seq)
                if len(self.batch):
                    for seq in self.batch.rows:
                        if seq.tag[0].cancelled:
                            seq.finish_now("cancelled")
                    for seq in self.batch.drop():
                        self._finished(seq)
                if len(self.batch):
                    self.observe("decode", self.variant, float(len(self.batch)))
                    self.batch.step()
                    for seq in self.batch.rows:
                        self._emit(seq)
                    for seq in self.batch.drop():
                        self._finished(seq)
            except Exception as exc:  # noqa: BLE001 - a failed pass fails its jobs, never the worker
                log.exception("variant %s: a forward pass failed", self.variant)
                jobs = {id(s.tag[0]): s.tag[0] for s in list(self.batch.rows) + new}
                self.batch = DecodeBatch(self.model, pad_id=self.batch.pad_id)
                for job in jobs.values():
                    job.emit(Event("error", error=exc))

    def _emit(self, seq: Sequence) -> None:
        """Send the newest token of ``seq`` (and its text delta) to its job."""
        job, index = seq.tag
        token = seq.tokens[-1]
        final = seq.finish is not None
        delta, stopped = ("", False) if token in self.eos else job.texts[index].update(seq.tokens, final)
        if stopped:
            seq.finish_now("stop")
        top = seq.top[-1] if seq.top else []
        job.emit(Event("token", index, delta, token, seq.logprobs[-1], top))

    def _finished(self, seq: Sequence) -> None:
        job, index = seq.tag
        text = job.texts[index]
        if not text.stopped and seq.finish != "cancelled":  # flush what was held back for a possible stop string
            tokens = [t for t in seq.tokens if t not in self.eos]
            delta, _ = text.update(tokens, final=True)
            if delta:
                job.emit(Event("token", index, delta, None))
        job.emit(Event("done", index, finish=seq.finish))


class EncoderEngine(Engine):
    """An encoder's engine: texts from concurrent requests embedded together (mean pooled, L2 normed)."""

    kind = "encoder"

    def __init__(self, variant: str, model: Any, tokenizer: Any, *, max_length: int = 256, **kwargs: Any):
        self.max_length = max_length
        super().__init__(variant, model, tokenizer, **kwargs)

    def _enqueue(self, job: Job) -> None:
        self.waiting.extend((job, i) for i in range(len(job.texts)))

    def _take(self, busy: bool) -> list[tuple[EmbedJob, int]]:
        taken = []
        while self.waiting and len(taken) < self.max_batch:
            taken.append(self.waiting.popleft())
        self.observe("queue", self.variant, float(len(self.waiting)))
        return taken

    def _run(self) -> None:
        while True:
            with self.cond:
                items = self._gather(busy=False)
                if self.closed:
                    return
            items = [(job, i) for job, i in items if not job.cancelled]
            if not items:
                continue
            try:
                self.observe("embed", self.variant, float(len(items)))
                rows = mean_pooled(self.model, self.tokenizer, [job.texts[i] for job, i in items], self.max_length)
            except Exception as exc:  # noqa: BLE001
                log.exception("variant %s: an embedding pass failed", self.variant)
                for job in {id(j): j for j, _ in items}.values():
                    job.emit(Event("error", error=exc))
                continue
            for (job, i), row in zip(items, rows):
                job.rows[i] = row
                job.left -= 1
                if job.left == 0:
                    job.emit(Event("done", embeddings=job.rows))


def _context_length(model: Any, tokenizer: Any) -> int:
    """Positions the model can attend over: its config's ``max_position_embeddings`` (or the
    tokenizer's ``model_max_length`` when that is a real number), else 2048."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 2048


__all__ = ["Engine", "LMEngine", "EncoderEngine", "Job", "GenerateJob", "EmbedJob", "Event"]
