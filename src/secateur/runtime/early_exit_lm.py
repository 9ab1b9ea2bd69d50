"""Early exit for causal LMs (CALM): a token leaves the stack at the first exit confident enough.

After chosen blocks ``k`` the model carries an exit head (the same :class:`ExitHeads` as encoders:
a linear adapter initialised to the identity) whose output goes through the model's own final norm
and (tied) output head: ``logits_k = head(norm(adapter_k(h_k)))``. The ``early_exit`` method trains
the adapters by distillation from the model's own last layer (backbone frozen).

Decoding one token at a time (:class:`ExitLM`), the token's hidden state runs block by block; after
an exit block the exit's next-token distribution is computed and its **confidence** is the softmax
margin, the top probability minus the second (CALM's softmax response). At or above
``threshold`` the token exits: its logits are the exit's, and the blocks it skipped still need
this position's keys and values for later tokens. They are computed from the exit state, as CALM
does (*state propagation*): each skipped block's attention norm and key/value projections (with
rotary) read the exit's hidden state ``h_k``. That costs two small projections a skipped block
instead of the whole block (attention, output projection, MLP). Computing the skipped blocks'
keys and values lazily, when a later token runs them, would have been the alternative; it needs
every skipped position's input kept and a wider attention step later, for the same arithmetic on
the tokens that go deep, so the copy was chosen. Where the skipped blocks' attention norms are
RMSNorms and their key/value projections plain fp32 ``nn.Linear`` layers, the propagation is one
matrix product: every skipped block's norm weight is folded into its key and value weights, and
the folded weights of the blocks after each exit are stacked once (the norm's scale is the same
for all of them); otherwise it runs block by block.

The **confidence** is the exit's softmax margin, or, when the heads carry exit classifiers (the
method's ``confidence: classifier``), CALM's learned classifier: a linear map of the exit's hidden
state whose sigmoid is the probability that the exit's top-1 token is the final layer's. The
classifier is read *before* the exit's logits are computed, so an exit that is not taken costs one
dot product instead of the norm, the output head and a softmax. ``exits`` restricts the exits that
are checked at all (a check not made costs nothing).

:func:`exit_nll` prices a threshold on whole windows (teacher forcing): every row of a batch runs
every block, but a row that exited keeps its exit state (``torch.where``), so the keys and values
each block writes for it are the ones :class:`ExitLM` writes from the propagated state: the
arithmetic of batch-1 decoding, batched (tested against :class:`ExitLM`). ``threshold=None``
computes no exit at all: the model itself (tested against transformers' forward).

The blocks run from the architecture table's paths (attention norm, q/k/v/o projections, MLP
norm, MLP, rotary embedding), so any Llama-family model in the table (llama, mistral, qwen2) and
any of secateur's quantized layers in it run; models without rotary embeddings are refused.

Paper: CALM (Schuster et al. 2022, arXiv:2207.07061).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SecateurError
from .early_exit import ExitHeads, heads_of


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def margin(logits: torch.Tensor) -> torch.Tensor:
    """Top probability minus the second, over the last dimension (the exit's confidence)."""
    top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def logit_of(threshold: float) -> float:
    """The classifier logit at which its sigmoid reaches ``threshold`` (±inf outside (0, 1))."""
    if threshold <= 0.0:
        return -math.inf
    if threshold >= 1.0:
        return math.inf
    return math.log(threshold / (1.0 - threshold))


CONFIDENCES = ("margin", "classifier")


def _confidence(heads: Optional[ExitHeads], confidence: Optional[str]) -> str:
    """``confidence`` checked against the heads; None: the classifier when the heads have one."""
    if confidence is None:
        return "classifier" if heads is not None and heads.classifiers is not None else "margin"
    if confidence not in CONFIDENCES:
        raise SecateurError(f"unknown exit confidence '{confidence}'; valid: {', '.join(CONFIDENCES)}")
    if confidence == "classifier" and (heads is None or heads.classifiers is None):
        raise SecateurError("confidence 'classifier' needs exit classifiers; train the heads with "
                            "early_exit's confidence: classifier")
    return confidence


def _checked(heads: Optional[ExitHeads], exits: Optional[tuple[int, ...]], n: int) -> list[int]:
    """The exits checked: ``exits`` (each one the heads have), else all of the heads' below ``n``."""
    have = [b for b in (heads.blocks if heads is not None else ()) if b < n]
    if exits is None:
        return have
    wrong = [b for b in exits if b not in have]
    if wrong:
        raise SecateurError(f"exits {wrong} have no head; the model's exits are {have}")
    return sorted(set(int(b) for b in exits))


class _Stack:
    """The model's parts, resolved once from the architecture table."""

    def __init__(self, model: nn.Module):
        from ..models.arch import arch_of

        facts = arch_of(model, strict=False)
        if facts is None or facts.kind != "causal" or facts.arch.rotary is None or "q" not in facts.arch.attn:
            raise SecateurError(f"early exit decoding runs Llama-family causal LMs (llama, mistral, qwen2: rotary "
                                f"attention with q/k/v/o projections); got {type(model).__name__}")
        arch = facts.arch
        self.model = model
        self.blocks = list(arch.get_blocks(model))
        self.embed = arch.get_embeddings(model)[0]
        self.norm = arch.get_final_norm(model)
        self.head = arch.get_head(model)
        self.rotary = arch.base(model).get_submodule(arch.rotary)
        cfg = model.config
        self.heads_n = cfg.num_attention_heads
        self.kv_n = getattr(cfg, "num_key_value_heads", None) or self.heads_n
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads_n
        self.scale = self.head_dim ** -0.5
        self._folded: dict[int, Optional[tuple[torch.Tensor, Optional[torch.Tensor], float]]] = {}
        self.parts = []
        for block in self.blocks:
            get = block.get_submodule
            self.parts.append({"attn_norm": get(arch.norms["attn"]), "mlp_norm": get(arch.norms["mlp"]),
                               **{r: get(arch.attn[r]) for r in ("q", "k", "v", "o")},
                               "mlp": get(arch.mlp["down"].rsplit(".", 1)[0]) if "." in arch.mlp["down"] else block})

    def cos_sin(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(hidden, positions)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def kv(self, i: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``i``'s keys and values for ``hidden`` (its input): ``[B, kv_heads, T, head_dim]``."""
        p = self.parts[i]
        x = p["attn_norm"](hidden)
        b, t, _ = x.shape
        k = p["k"](x).view(b, t, self.kv_n, self.head_dim).transpose(1, 2)
        v = p["v"](x).view(b, t, self.kv_n, self.head_dim).transpose(1, 2)
        return k * cos + _rotate_half(k) * sin, v

    def _fold(self, start: int) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor], float]]:
        """Blocks ``start…``'s key and value weights with their attention norm's weight folded in,
        stacked: ``[blocks × 2 × kv_heads × head_dim, hidden]`` (and the biases), with the norms'
        epsilon; None when a norm is not an RMSNorm or a projection not a plain fp32 Linear."""
        if start not in self._folded:
            parts = self.parts[start:]
            norms = [p["attn_norm"] for p in parts]
            eps = {getattr(m, "variance_epsilon", getattr(m, "eps", None)) for m in norms}
            plain = all(type(p[r]) is nn.Linear and p[r].weight.dtype == torch.float32 for p in parts for r in "kv")
            if (not parts or not plain or len(eps) != 1 or None in eps
                    or not all(type(m).__name__.endswith("RMSNorm") and getattr(m, "weight", None) is not None
                               for m in norms)):
                self._folded[start] = None
            else:
                weights = [p[r].weight * p["attn_norm"].weight[None, :].float() for p in parts for r in "kv"]
                biased = any(p[r].bias is not None for p in parts for r in "kv")
                biases = ([p[r].bias if p[r].bias is not None else torch.zeros(p[r].out_features)
                           for p in parts for r in "kv"] if biased else None)
                self._folded[start] = (torch.cat(weights).detach(),
                                       torch.cat(biases).detach() if biases else None, float(eps.pop()))
        return self._folded[start]

    def propagate(self, start: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: "Cache",
                  position: int) -> None:
        """State propagation: blocks ``start…`` (0-based) get this position's keys and values computed
        from ``hidden`` (the exit state), in one product where the weights fold (see the module docstring)."""
        folded = self._fold(start)
        if folded is None:
            for j in range(start, len(self.blocks)):
                k, v = self.kv(j, hidden, cos, sin)
                cache.write(j, position, k, v)
            return
        weight, bias, eps = folded
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        b, t, _ = x.shape
        out = F.linear(x, weight, bias).view(b, t, -1, 2, self.kv_n, self.head_dim).permute(2, 3, 0, 4, 1, 5)
        k, v = out[:, 0], out[:, 1]                      # [skipped blocks, B, kv_heads, T, head_dim]
        cache.write_from(start, position, k * cos + _rotate_half(k) * sin, v)

    def block(self, i: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: "Cache",
              start: int) -> torch.Tensor:
        """Block ``i`` on ``hidden`` at positions ``start…``, its keys and values written to ``cache``."""
        p = self.parts[i]
        x = p["attn_norm"](hidden)
        b, t, _ = x.shape
        q = p["q"](x).view(b, t, self.heads_n, self.head_dim).transpose(1, 2)
        k = p["k"](x).view(b, t, self.kv_n, self.head_dim).transpose(1, 2)
        v = p["v"](x).view(b, t, self.kv_n, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        keys, values = cache.write(i, start, k, v)
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=t > 1, scale=self.scale,
                                             enable_gqa=self.kv_n != self.heads_n)
        hidden = hidden + p["o"](out.transpose(1, 2).reshape(b, t, self.heads_n * self.head_dim))
        return hidden + p["mlp"](p["mlp_norm"](hidden))

    def exit_logits(self, heads: ExitHeads, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Exit ``i`` (1-based block number)'s logits for ``hidden`` (the state after block ``i``)."""
        return self.head(self.norm(heads(i, hidden)))

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))


class Cache:
    """Keys and values of every block, preallocated for ``max_len`` positions of ``batch`` rows."""

    def __init__(self, stack: _Stack, batch: int, max_len: int, dtype: torch.dtype):
        shape = (len(stack.blocks), batch, stack.kv_n, max_len, stack.head_dim)
        self.k, self.v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        self.max_len = max_len

    def write(self, i: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.max_len:
            raise SecateurError(f"the sequence is longer than the cache ({self.max_len} positions)")
        self.k[i, :, :, start:end] = k
        self.v[i, :, :, start:end] = v
        return self.k[i, :, :, :end], self.v[i, :, :, :end]

    def write_from(self, first: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Blocks ``first…``'s keys and values ``[blocks, B, kv_heads, T, head_dim]`` at ``start…``."""
        end = start + k.shape[3]
        if end > self.max_len:
            raise SecateurError(f"the sequence is longer than the cache ({self.max_len} positions)")
        self.k[first:first + k.shape[0], :, :, start:end] = k
        self.v[first:first + k.shape[0], :, :, start:end] = v


def _need_heads(model: nn.Module) -> ExitHeads:
    heads = heads_of(model)
    if heads is None:
        raise SecateurError("this model has no exit heads; add them with the early_exit method")
    return heads


@dataclass
class Decoded:
    tokens: list[int]                        # the new tokens
    blocks: list[int]                        # blocks each new token ran through
    seconds: float                           # wall time of the decode steps (the prompt excluded)
    exits: dict[int, int] = field(default_factory=dict)

    @property
    def mean_blocks(self) -> float:
        return sum(self.blocks) / max(1, len(self.blocks))


class ExitLM:
    """Greedy decoding of one sequence with per-token early exit (see the module docstring).
    ``threshold=None`` never computes an exit: the same loop without exits (the fair baseline).
    ``confidence``: ``margin`` or ``classifier`` (None: the classifier when the heads have one);
    ``exits``: the exits checked (None: all)."""

    def __init__(self, model: nn.Module, threshold: Optional[float], max_len: int = 512,
                 confidence: Optional[str] = None, exits: Optional[tuple[int, ...]] = None):
        self.stack = _Stack(model.eval())
        self.heads = _need_heads(model) if threshold is not None else heads_of(model)
        self.threshold = threshold
        self.max_len = max_len
        self.n = len(self.stack.blocks)
        self.confidence = _confidence(self.heads, confidence) if threshold is not None else "margin"
        self.exits = _checked(self.heads, exits, self.n) if threshold is not None else []
        self.cut = logit_of(threshold) if threshold is not None and self.confidence == "classifier" else None
        self.dtype = next(model.parameters()).dtype

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """The prompt through every block (no exit); the last position's logits."""
        s = self.stack
        hidden = s.embed(ids)
        cos, sin = s.cos_sin(hidden, torch.arange(ids.shape[1]).unsqueeze(0))
        for i in range(self.n):
            hidden = s.block(i, hidden, cos, sin, cache, 0)
        return s.final_logits(hidden[:, -1:])[:, -1]

    @torch.no_grad()
    def step(self, token: int, position: int, cache: Cache) -> tuple[torch.Tensor, int]:
        """One token at ``position``: its next-token logits and the number of blocks it ran."""
        s = self.stack
        hidden = s.embed(torch.tensor([[token]]))
        cos, sin = s.cos_sin(hidden, torch.tensor([[position]]))
        for i in range(self.n):
            hidden = s.block(i, hidden, cos, sin, cache, position)
            done = i + 1
            if done in self.exits:
                if self.cut is not None:
                    if float(self.heads.confidence_logit(done, hidden)) < self.cut:
                        continue
                    logits = s.exit_logits(self.heads, done, hidden)
                else:
                    logits = s.exit_logits(self.heads, done, hidden)
                    if float(margin(logits[:, -1])) < self.threshold:
                        continue
                if done < self.n:  # state propagation: the skipped blocks' K/V from h_done
                    s.propagate(done, hidden, cos, sin, cache, position)
                return logits[:, -1], done
        return s.final_logits(hidden)[:, -1], self.n

    def cache(self) -> Cache:
        return Cache(self.stack, 1, self.max_len, self.dtype)

    @torch.no_grad()
    def greedy(self, prompt: list[int], new_tokens: int) -> Decoded:
        if len(prompt) + new_tokens > self.max_len:
            raise SecateurError(f"prompt ({len(prompt)}) + new tokens ({new_tokens}) exceed max_len {self.max_len}")
        cache = self.cache()
        logits = self.prefill(torch.tensor([prompt]), cache)
        token = int(logits.argmax(-1))
        tokens, blocks, exits = [token], [self.n], {}
        began = time.perf_counter()
        for position in range(len(prompt), len(prompt) + new_tokens - 1):
            logits, used = self.step(token, position, cache)
            token = int(logits.argmax(-1))
            tokens.append(token)
            blocks.append(used)
            if used < self.n:
                exits[used] = exits.get(used, 0) + 1
        return Decoded(tokens, blocks[1:], time.perf_counter() - began, exits)


@dataclass
class WindowNLL:
    nll: float                               # total NLL of the predicted tokens
    tokens: int                              # predicted tokens
    blocks: int                              # blocks run, summed over the predicted tokens
    exits: dict[int, int] = field(default_factory=dict)

    @property
    def perplexity(self) -> float:
        import math

        return math.exp(self.nll / max(1, self.tokens))

    @property
    def mean_blocks(self) -> float:
        return self.blocks / max(1, self.tokens)


@torch.no_grad()
def exit_nll(model: nn.Module, windows: torch.Tensor, threshold: Optional[float], batch: int = 64,
             confidence: Optional[str] = None, exits: Optional[tuple[int, ...]] = None) -> WindowNLL:
    """Teacher-forced NLL of ``windows`` ``[N, L]`` (each scored on its own, tokens 2…L from the ones
    before, as P1 does) when every token exits as :class:`ExitLM` would at ``threshold`` (with the
    same ``confidence`` and ``exits``; see the module docstring); the blocks each predicted token ran."""
    stack = _Stack(model.eval())
    heads = _need_heads(model) if threshold is not None else None
    n = len(stack.blocks)
    mode = _confidence(heads, confidence) if threshold is not None else "margin"
    exits_at = _checked(heads, exits, n) if threshold is not None else []
    cut = logit_of(threshold) if threshold is not None and mode == "classifier" else None
    dtype = next(model.parameters()).dtype
    total = WindowNLL(0.0, 0, 0)
    for start in range(0, windows.shape[0], batch):
        rows = windows[start:start + batch]
        b, length = rows.shape
        cache = Cache(stack, b, length, dtype)
        for t in range(length - 1):
            hidden = stack.embed(rows[:, t:t + 1])
            cos, sin = stack.cos_sin(hidden, torch.full((b, 1), t))
            out = torch.zeros(b, model.config.vocab_size)
            running = torch.ones(b, dtype=torch.bool)
            used = torch.full((b,), n)
            for i in range(n):
                moved = stack.block(i, hidden, cos, sin, cache, t)
                hidden = torch.where(running[:, None, None], moved, hidden)
                done = i + 1
                if done in exits_at and bool(running.any()):
                    logits = stack.exit_logits(heads, done, hidden)[:, -1].float()
                    if cut is not None:
                        sure = heads.confidence_logit(done, hidden)[:, -1] >= cut
                    else:
                        sure = margin(logits) >= threshold
                    leave = running & sure
                    out[leave] = logits[leave]
                    used[leave] = done
                    running &= ~leave
            final = stack.final_logits(hidden)[:, -1].float()
            out[running] = final[running]
            nll = F.cross_entropy(out, rows[:, t + 1], reduction="sum")
            total.nll += float(nll)
            total.tokens += b
            total.blocks += int(used.sum())
            for e in used[used < n].tolist():
                total.exits[e] = total.exits.get(e, 0) + 1
    return total


CURVE_THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def exit_curve(model: nn.Module, windows: torch.Tensor, thresholds: tuple[float, ...] = CURVE_THRESHOLDS,
               batch: int = 64, confidence: Optional[str] = None,
               exits: Optional[tuple[int, ...]] = None) -> list[dict[str, Any]]:
    """The exit curve on ``windows``: first the model without exits (``threshold`` None), then each
    threshold with its mean blocks per predicted token, NLL per token, perplexity, increase over
    the model without exits in percent, and how many tokens left at each exit (:func:`exit_nll`)."""
    if not thresholds:
        raise SecateurError("exit_curve needs at least one threshold")
    base = exit_nll(model, windows, None, batch)
    rows = [{"threshold": None, "mean_blocks": base.mean_blocks, "nll": base.nll / max(1, base.tokens),
             "perplexity": base.perplexity, "increase_pct": 0.0, "exits": {}}]
    for t in sorted(float(x) for x in thresholds):
        r = exit_nll(model, windows, t, batch, confidence, exits)
        rows.append({"threshold": t, "mean_blocks": r.mean_blocks, "nll": r.nll / max(1, r.tokens),
                     "perplexity": r.perplexity, "increase_pct": 100.0 * (r.perplexity / base.perplexity - 1.0),
                     "exits": {str(k): v for k, v in sorted(r.exits.items())}})
    return rows


__all__ = ["ExitLM", "Decoded", "Cache", "WindowNLL", "exit_nll", "exit_curve", "margin", "logit_of",
           "CONFIDENCES", "CURVE_THRESHOLDS"]
