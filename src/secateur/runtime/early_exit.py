"""Early exit for sentence encoders: easy inputs pay for fewer blocks.

After chosen blocks ``k`` the model carries an exit head: a linear map (initialised to the
identity) from the mean-pooled hidden states after block ``k`` to the final sentence embedding
(the P2 pooling: mean over real tokens, then L2 normalisation). The heads are trained by the
``early_exit`` method (distillation from the model's own last layer, backbone frozen) and live on
the model as ``model.secateur_exits`` (an :class:`ExitHeads`), so they are saved with it.

:class:`ExitEncoder` runs a batch block by block. At each exit it computes every still-running
input's exit embedding; an input *exits* when its embedding agrees with the one from the previous
exit (cosine ≥ ``threshold``: two successive views of the sentence no longer move it, DeeBERT's
idea with PABEE-style agreement instead of a learned classifier). Inputs that continue are
gathered into a smaller batch, so later blocks run only on them. The last block always answers
(its embedding is the model's own, no head). ``threshold > 1`` never exits: the output is then
exactly the model's own embedding (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTRIBUTE = "secateur_exits"


class ResidualMLP(nn.Module):
    """``x + down(gelu(up(x)))`` with ``down`` zero: the identity at the start, more than linear after."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.up, self.down = nn.Linear(hidden, width), nn.Linear(width, hidden)
        with torch.no_grad():
            self.down.weight.zero_()
            self.down.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


HEAD_KINDS = ("linear", "mlp")


class ExitHeads(nn.Module):
    """One head per exit block (1-based block numbers: exit ``k`` reads block ``k``'s output): a
    linear map initialised to the identity, or (``kind="mlp"``) a residual MLP of ``width``
    (default 2 × hidden) that starts as the identity."""

    def __init__(self, hidden: int, blocks: tuple[int, ...], kind: str = "linear", width: int = 0,
                 classifier: bool = False):
        super().__init__()
        if kind not in HEAD_KINDS:
            from ..errors import SecateurError

            raise SecateurError(f"unknown exit head kind '{kind}'; valid: {', '.join(HEAD_KINDS)}")
        self.blocks = tuple(sorted(int(b) for b in blocks))
        self.kind, self.width = kind, width or 2 * hidden
        # causal LMs: a learned exit classifier per exit (hidden state -> logit of "this exit's top-1 is the
        # final layer's"), read before the exit's logits are computed; None: the softmax margin decides
        self.classifiers = nn.ModuleDict({str(b): nn.Linear(hidden, 1) for b in self.blocks}) if classifier else None
        if kind == "mlp":
            self.heads = nn.ModuleDict({str(b): ResidualMLP(hidden, self.width) for b in self.blocks})
            return
        self.heads = nn.ModuleDict({str(b): nn.Linear(hidden, hidden) for b in self.blocks})
        with torch.no_grad():
            for head in self.heads.values():
                head.weight.copy_(torch.eye(hidden))
                head.bias.zero_()

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> "ExitHeads":
        """The heads whose ``state_dict()`` is ``tensors`` (keys ``heads.<block>.…`` and, with exit
        classifiers, ``classifiers.<block>.…``): what loading an artifact rebuilds."""
        blocks = tuple(sorted({int(k.split(".")[1]) for k in tensors if k.startswith("heads.")}))
        if not blocks:
            from ..errors import SecateurError

            raise SecateurError("the saved exit heads hold no 'heads.<block>' tensors; the artifact is damaged")
        up = next((t for k, t in tensors.items() if k.startswith("heads.") and k.endswith(".up.weight")), None)
        classifier = any(k.startswith("classifiers.") for k in tensors)
        if up is not None:  # residual MLP heads: up is [width, hidden]
            heads = cls(up.shape[1], blocks, kind="mlp", width=up.shape[0], classifier=classifier)
        else:
            hidden = next(t for k, t in tensors.items() if k.startswith("heads.")).shape[-1]
            heads = cls(hidden, blocks, classifier=classifier)
        heads.load_state_dict(tensors)
        return heads

    def forward(self, block: int, pooled: torch.Tensor) -> torch.Tensor:
        return self.heads[str(block)](pooled)

    def confidence_logit(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        """The exit classifier's logit for ``hidden`` (the state after ``block``), last dimension dropped."""
        return self.classifiers[str(block)](hidden).squeeze(-1)

    def _head_text(self) -> str:
        return "linear (hidden -> hidden)" if self.kind == "linear" else f"residual MLP (hidden -> {self.width} -> hidden)"

    def describe(self, kind: str = "encoder") -> dict[str, Any]:
        if kind == "causal":
            return {"exits_after_blocks": list(self.blocks),
                    "head": f"{self._head_text()} adapter, then the model's final norm and output head",
                    "confidence": ("learned classifier (a linear map of the exit's hidden state, sigmoid: the "
                                   "probability that the exit's top-1 token is the final layer's)"
                                   if self.classifiers is not None else
                                   "softmax margin (top-1 minus top-2 probability)"),
                    "skipped_blocks": "keys and values from the exit state (CALM state propagation)"}
        return {"exits_after_blocks": list(self.blocks), "head": f"{self._head_text()} on the mean-pooled states"}


def heads_of(model: nn.Module) -> Optional[ExitHeads]:
    return getattr(model, ATTRIBUTE, None)


def attach(model: nn.Module, heads: ExitHeads) -> None:
    setattr(model, ATTRIBUTE, heads)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _encoder(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def _extended_mask(encoder: nn.Module, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask a BERT block takes: 0 where attended, the dtype's minimum elsewhere."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def _blocks(model: nn.Module) -> nn.ModuleList:
    from ..models.arch import arch_of

    return arch_of(model).arch.get_blocks(model)


@torch.no_grad()
def exit_embeddings(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every exit's (unnormalised) embedding and the final one (key = number of blocks), for a whole
    batch, without exiting: what training targets and threshold calibration read."""
    heads = heads_of(model)
    hidden, mask = _embed(model, input_ids, attention_mask)
    blocks = _blocks(model)
    out: dict[int, torch.Tensor] = {}
    for i, block in enumerate(blocks, start=1):
        hidden = _run_block(block, hidden, mask)
        if heads is not None and i in heads.blocks and i < len(blocks):
            out[i] = heads(i, mean_pool(hidden, attention_mask))
    out[len(blocks)] = mean_pool(hidden, attention_mask)
    return out


def _embed(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    encoder = _encoder(model)
    hidden = encoder.embeddings(input_ids=input_ids)
    return hidden, _extended_mask(encoder, attention_mask, hidden.dtype)


def _run_block(block: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = block(hidden, attention_mask=mask)
    return out[0] if isinstance(out, tuple) else out


def simulate(exits: dict[int, torch.Tensor], threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What :class:`ExitEncoder` would answer at ``threshold``, from every exit's embedding of a
    batch (:func:`exit_embeddings`): the normalised embeddings and the blocks each input ran. One
    pass of the model then prices every threshold of a calibration grid (tested against the encoder)."""
    order = sorted(exits)
    final = order[-1]
    views = {b: F.normalize(exits[b].float(), dim=-1) for b in order}
    result = views[final].clone()
    blocks = torch.full((result.shape[0],), final, dtype=torch.long)
    done = torch.zeros(result.shape[0], dtype=torch.bool)
    for previous, block in zip(order, order[1:-1]):
        agree = ((views[block] * views[previous]).sum(-1) >= threshold) & ~done
        result[agree], blocks[agree] = views[block][agree], block
        done |= agree
    return result, blocks


ENCODER_THRESHOLDS = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


@torch.no_grad()
def exit_curve(model: nn.Module, sequences: list[torch.Tensor], thresholds: tuple[float, ...] = ENCODER_THRESHOLDS,
               batch: int = 64, pad_id: int = 0) -> list[dict[str, Any]]:
    """The exit curve on ``sequences`` (1-D token ids each, padded per batch): first the model
    without exits (``threshold`` None), then each threshold with the mean blocks per input, the
    **agreement** (mean cosine between the embedding :class:`ExitEncoder` answers and the model's own
    final embedding) and how many inputs left at each exit (:func:`simulate`, one pass of the model)."""
    if not thresholds:
        from ..errors import SecateurError

        raise SecateurError("exit_curve needs at least one threshold")
    views: dict[int, list[torch.Tensor]] = {}
    for start in range(0, len(sequences), batch):
        part = sequences[start:start + batch]
        width = max(len(x) for x in part)
        ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for row, x in enumerate(part):
            ids[row, :len(x)], mask[row, :len(x)] = x, 1
        for block, emb in exit_embeddings(model, ids, mask).items():
            views.setdefault(block, []).append(emb.float())
    exits = {b: torch.cat(v) for b, v in views.items()}
    n = max(exits)
    final = F.normalize(exits[n], dim=-1)
    rows = [{"threshold": None, "mean_blocks": float(n), "agreement": 1.0, "exits": {}}]
    for t in sorted(float(x) for x in thresholds):
        answered, blocks = simulate(exits, t)
        counts = {str(b): int((blocks == b).sum()) for b in sorted(set(blocks.tolist())) if b < n}
        rows.append({"threshold": t, "mean_blocks": float(blocks.float().mean()),
                     "agreement": float((answered * final).sum(-1).mean()), "exits": counts})
    return rows


@dataclass
class Encoded:
    embeddings: torch.Tensor                 # [B, D], L2-normalised
    blocks: torch.Tensor                     # [B]: blocks each input ran through
    exits: dict[int, int] = field(default_factory=dict)   # exit block -> inputs that left there

    @property
    def mean_blocks(self) -> float:
        return float(self.blocks.float().mean())


class ExitEncoder:
    """Encode with per-input early exit (see the module docstring)."""

    def __init__(self, model: nn.Module, threshold: float):
        heads = heads_of(model)
        if heads is None:
            from ..errors import SecateurError

            raise SecateurError("this model has no exit heads; add them with the early_exit method")
        self.model, self.heads, self.threshold = model.eval(), heads, float(threshold)
        self.n_blocks = len(_blocks(model))

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Encoded:
        batch = input_ids.shape[0]
        hidden, mask = _embed(self.model, input_ids, attention_mask)
        alive = torch.arange(batch)
        result = torch.zeros(batch, hidden.shape[-1])
        used = torch.full((batch,), self.n_blocks, dtype=torch.long)
        exits: dict[int, int] = {}
        previous: Optional[torch.Tensor] = None
        valid = attention_mask
        for i, block in enumerate(_blocks(self.model), start=1):
            hidden = _run_block(block, hidden, mask)
            if i == self.n_blocks:
                result[alive] = F.normalize(mean_pool(hidden, valid).float(), dim=-1)
                break
            if i not in self.heads.blocks:
                continue
            current = F.normalize(self.heads(i, mean_pool(hidden, valid)).float(), dim=-1)
            if previous is not None:
                done = (current * previous).sum(-1) >= self.threshold
                if bool(done.any()):
                    result[alive[done]] = current[done]
                    used[alive[done]] = i
                    exits[i] = int(done.sum())
                    keep = ~done
                    if not bool(keep.any()):
                        break
                    alive, hidden, mask, valid, current = alive[keep], hidden[keep], mask[keep], valid[keep], current[keep]
            previous = current
        return Encoded(result, used, exits)


__all__ = ["ExitHeads", "ExitEncoder", "Encoded", "exit_embeddings", "exit_curve", "simulate",
           "ENCODER_THRESHOLDS", "heads_of", "attach", "mean_pool", "ATTRIBUTE"]
