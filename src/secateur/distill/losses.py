"""Distillation losses: tensors in, a scalar out; no modules, no state (the projections between
hidden widths live in the objective of :mod:`secateur.distill.train`).

Symbols: student logits ``z_s``, teacher logits ``z_t``, temperature ``T``,
``p = softmax(z_t / T)``, ``q = softmax(z_s / T)``; ``mask`` marks real (non-padding) positions.

``kl_loss``        forward ``KL(p ‖ q)`` (Hinton et al. 2015; mean-seeking), reverse ``KL(q ‖ p)``
                   (MiniLLM, Gu et al. 2024; mode-seeking), or ``mix``: ``λ·forward + (1-λ)·reverse``;
                   times ``T²`` so that gradients keep their scale when ``T`` changes;
                   averaged over the real positions.
``ce_loss``        hard-label cross-entropy on the next token (causal LMs: the labels are the text).
``hidden_loss``    MSE or cosine distance between (projected) student and teacher hidden states
                   (TinyBERT, Jiao et al. 2020; DistilBERT's cosine loss), over real positions.
``embedding_loss`` for sentence encoders: relative MSE + cosine distance between mean-pooled sentence
                   embeddings (the pooling of the P2 protocol).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

Direction = Literal["forward", "reverse", "mix"]


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``values [B, T]`` over the positions where ``mask`` is 1 (all when None)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, direction: Direction = "forward",
            mix: float = 0.5, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL divergence between the temperature-softened distributions of ``[B, T, V]`` logits."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    forward = (log_p.exp() * (log_p - log_q)).sum(-1) if direction != "reverse" else None
    reverse = (log_q.exp() * (log_q - log_p)).sum(-1) if direction != "forward" else None
    if direction == "forward":
        per_token = forward
    elif direction == "reverse":
        per_token = reverse
    else:
        per_token = mix * forward + (1.0 - mix) * reverse
    return _masked_mean(per_token, mask) * temperature ** 2


def ce_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token cross-entropy: position ``t`` predicts token ``t+1`` (real targets only)."""
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
    target_mask = None if mask is None else mask[:, 1:]
    return _masked_mean(nll.view(input_ids.shape[0], -1), target_mask)


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, kind: Literal["mse", "cosine"] = "mse",
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Distance between hidden states ``[B, T, D]`` of equal width (project the student first)."""
    s, t = student.float(), teacher.float()
    if kind == "mse":
        per_token = ((s - t) ** 2).mean(-1)
    else:
        per_token = 1.0 - F.cosine_similarity(s, t, dim=-1)
    return _masked_mean(per_token, mask)


def mean_pool(hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``hidden [B, T, D]`` over real tokens (the P2 sentence embedding before normalising)."""
    if mask is None:
        return hidden.float().mean(1)
    weights = mask.unsqueeze(-1).float()
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relative MSE ``Σ‖s - t‖² / Σ‖t‖²`` + mean cosine distance between sentence embeddings
    ``[B, D]``: the MSE matches the teacher's space (scale-free, so its weight does not depend on
    the model), the cosine term what a similarity search reads."""
    s, t = student.float(), teacher.float()
    relative_mse = ((s - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12)
    return relative_mse + (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def layer_map(student_layers: int, teacher_layers: int, explicit: tuple[int, ...] = ()) -> list[tuple[int, int]]:
    """Pairs ``(student hidden-state index, teacher index)`` for hidden-state losses. Index 0 is
    the embedding output, ``i`` the output of block ``i``. ``explicit`` names the teacher block
    each student block imitates (one per student block); otherwise block ``i`` of ``L_s`` imitates
    block ``round(i · L_t / L_s)`` of ``L_t``, so the last matches the last."""
    if explicit:
        return [(i + 1, int(t)) for i, t in enumerate(explicit)]
    return [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]
