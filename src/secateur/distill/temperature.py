"""Temperature calibration of a causal LM on real text (Guo et al. 2017, "On calibration of modern
neural networks": one scalar, fitted by cross-entropy on held-back labels).

A student distilled mostly on teacher-generated text matches the teacher on the kind of text the
teacher writes; on real text it tends to be over-confident (measured on stories260K). One softmax
temperature ``τ`` (logits ``z / τ``), fitted by next-token cross-entropy on the real text of the
training data, corrects that without touching anything else, and is folded into the weights: the
final norm's weight (and bias) divided by ``τ`` scales the logits by exactly ``1/τ`` when the head
has no bias. The model stays a stock checkpoint.

The cross-entropy is convex in ``β = 1/τ`` (``β·z_y`` is linear, ``logsumexp(β·z)`` convex), so a
safeguarded Newton iteration from ``β = 1`` finds the minimum in a few passes over the text:
``d/dβ = E[E_q[z] − z_y]``, ``d²/dβ² = E[Var_q(z)]`` with ``q = softmax(β·z)``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SecateurError

BETA_RANGE = (0.25, 4.0)   # τ between 0.25 and 4


def folds_into(model: nn.Module) -> nn.Module:
    """The final norm a temperature is folded into; a clear error when the model has none."""
    from ..models.arch import arch_of

    facts = arch_of(model, strict=False)
    if facts is None or facts.kind != "causal" or facts.arch.final_norm is None:
        raise SecateurError(f"fitting a temperature needs a causal LM with a final norm (Llama, OPT, GPT-2); got "
                            f"{type(model).__name__}")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise SecateurError("fitting a temperature folds it into the final norm, which scales the logits only when "
                            "the output head has no bias")
    return facts.arch.get_final_norm(model)


@torch.no_grad()
def _statistics(model: nn.Module, batches: list[torch.Tensor], beta: float) -> tuple[float, float, float]:
    """Mean next-token NLL at ``β``, and its first and second derivatives in ``β``."""
    nll = grad = hess = 0.0
    count = 0
    device = next(model.parameters()).device
    for ids in batches:
        ids = ids.to(device)
        z = model(input_ids=ids, use_cache=False).logits[:, :-1].float().flatten(0, 1)
        y = ids[:, 1:].flatten()
        log_q = F.log_softmax(beta * z, dim=-1)
        q = log_q.exp()
        z_y = z.gather(1, y[:, None]).squeeze(1)
        mean_z = (q * z).sum(-1)
        nll += float(-log_q.gather(1, y[:, None]).sum())
        grad += float((mean_z - z_y).sum())
        hess += float(((q * z * z).sum(-1) - mean_z ** 2).clamp_min(0).sum())
        count += y.numel()
    return nll / count, grad / count, hess / count


def _batches(sequences: Iterable[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    by_length: dict[int, list[torch.Tensor]] = {}
    for seq in sequences:
        if len(seq) >= 2:
            by_length.setdefault(len(seq), []).append(seq)
    return [torch.stack(group[i:i + batch_size]) for group in by_length.values()
            for i in range(0, len(group), batch_size)]


@torch.no_grad()
def best_temperature(model: nn.Module, sequences: list[torch.Tensor], *, batch_size: int = 16,
                     iterations: int = 12) -> dict[str, Any]:
    """The ``τ`` that minimises the next-token cross-entropy of ``model`` on ``sequences`` (real
    text, token ids), with the NLL before and after; the model is not changed."""
    batches = _batches(sequences, batch_size)
    if not batches:
        raise SecateurError("fitting a temperature needs real text: at least one sequence of 2 or more tokens")
    was_training = model.training
    model.eval()
    try:
        beta = 1.0
        nll, grad, hess = first = _statistics(model, batches, beta)
        for _ in range(iterations):
            if abs(grad) < 1e-5 or hess <= 0:
                break
            step = grad / hess
            while True:  # Newton step, halved until the NLL goes down (convex: it does)
                candidate = min(max(beta - step, BETA_RANGE[0]), BETA_RANGE[1])
                stats = _statistics(model, batches, candidate)
                if stats[0] <= nll or abs(step) < 1e-4:
                    break
                step /= 2
            if stats[0] > nll:
                break
            converged = abs(candidate - beta) < 1e-4
            beta, (nll, grad, hess) = candidate, stats
            if converged:
                break
    finally:
        model.train(was_training)
    tokens = sum(b[:, 1:].numel() for b in batches)
    return {"temperature": 1.0 / beta, "nll_before": first[0], "nll_after": nll, "tokens": tokens}


@torch.no_grad()
def fit_temperature(model: nn.Module, sequences: list[torch.Tensor], *, batch_size: int = 16,
                    iterations: int = 12) -> dict[str, Any]:
    """Fit ``τ`` by next-token cross-entropy on ``sequences`` (real text, token ids) and divide the
    final norm's parameters by it. Returns ``τ`` and the NLL before and after."""
    norm = folds_into(model)
    fitted = best_temperature(model, sequences, batch_size=batch_size, iterations=iterations)
    norm.weight.div_(fitted["temperature"])
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(fitted["temperature"])
    return fitted
