"""Early exit: exit heads after chosen blocks, trained by distillation from the model's own last
layer with the one training loop (the backbone frozen).

**Causal LMs** (CALM): each exit is a linear adapter (initialised to the identity) on the hidden
states after block ``k``, followed by the model's own final norm and (tied) output head; the
objective is the KL divergence between the model's own next-token distribution and each exit's,
summed over the exits (at the step's ``temperature``). :class:`secateur.runtime.early_exit_lm.ExitLM`
decodes with them (a token exits when the exit's softmax margin passes the threshold) and
:func:`secateur.runtime.early_exit_lm.exit_nll` prices a threshold on windows.

**Sentence encoders** (DeeBERT, PABEE):
Each head maps the mean-pooled hidden states after block ``k`` to the final sentence embedding
(:class:`secateur.runtime.early_exit.ExitHeads`, initialised to the identity). The objective is
the encoders' embedding loss (relative MSE + cosine distance, as ``distill`` uses) between every
head's output and the model's own final mean-pooled embedding on the same batch, summed over the
heads; only the heads' parameters train. The heads ride on the model (``secateur_exits``), are
saved in the artifact and described in its card; stock ``transformers`` still loads the backbone
(the heads' tensors are extra keys it ignores). At inference,
:class:`secateur.runtime.early_exit.ExitEncoder` exits an input when two successive exits agree;
its threshold is chosen on calibration data (``benchmarks/early_exit.py`` shows how), never on the
evaluation split.

**Training choices** (CALM's): ``tune_backbone`` trains the backbone jointly, its final output held
to the model as it was before the step by the same loss (weight ``final_weight``);
``exit_weighting: depth`` weighs exit ``k``'s loss in proportion to ``k`` (later exits more,
normalised to sum to the number of exits); ``confidence: classifier`` (causal LMs) also trains a
linear exit classifier per exit on the exit's hidden state (detached), by binary cross-entropy
against "the exit's top-1 token is the final layer's".

**The exit curve**: after training, every threshold of ``curve`` (empty: the runtime's default
grid) is priced on the training set's **held-out split** and recorded in the step's result (so in
the card): mean blocks per token (per input) and the quality there — NLL and perplexity for causal
LMs (:func:`secateur.runtime.early_exit_lm.exit_curve`), the agreement with the model's own final
embedding for encoders (:func:`secateur.runtime.early_exit.exit_curve`) — with the model without
exits as the first point. ``secateur eval --task speed`` on a causal exit model adds the measured
decode speed at those thresholds; the report draws both.

Papers: DeeBERT (Xin et al. 2020, arXiv:2004.12993), PABEE (Zhou et al. 2020, arXiv:2006.04152),
CALM (Schuster et al. 2022, arXiv:2207.07061).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..api import register
from ..config import param
from ..errors import ConfigError, SecateurError
from .losses import embedding_loss, kl_loss
from .run import kind_of, resolve_teacher, run_training
from .train import TrainingConfig


@dataclass(frozen=True)
class EarlyExitConfig(TrainingConfig):
    """Add exit heads after chosen blocks and train them to predict the final sentence embedding."""

    exits: tuple[int, ...] = param((), "blocks (1-based) with an exit head; empty: every block but the last. "
                                       "Encoders: an input leaves at a head whose embedding agrees with the "
                                       "previous head's, so the first head only compares. Causal LMs: a token "
                                       "leaves at the first head confident enough")
    head: Literal["linear", "mlp"] = param("linear", "exit head: a linear map initialised to the identity, or a "
                                                     "residual MLP (hidden -> 2 x hidden -> hidden) that starts as one")
    tune_backbone: bool = param(False, "train the backbone jointly with the heads, its final output held to the "
                                       "model as it was before the step (the teacher) by the same loss")
    final_weight: float = param(1.0, "weight of the final output's hold to the teacher (tune_backbone)",
                                range=(0.0, 1e6))
    exit_weighting: Literal["equal", "depth"] = param("equal", "weights of the exits' losses: equal, or in "
                                                               "proportion to the block number (later exits more)")
    confidence: Literal["margin", "classifier"] = param("margin", "causal LMs: what decides an exit — the exit's "
                                                                  "softmax margin, or a learned exit classifier")
    curve: tuple[float, ...] = param((), "thresholds priced on the held-out split after training and recorded "
                                         "(empty: the runtime's default grid)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(b < 1 for b in self.exits):
            raise ConfigError("exits", "block numbers start at 1 (exit after block 1 = the first block)")
        if any(not 0.0 <= t <= 1.0 for t in self.curve):
            raise ConfigError("curve", "thresholds are margins, probabilities or cosines, in [0, 1]")


def exit_weights(blocks: tuple[int, ...], weighting: str) -> dict[int, float]:
    """Each exit's loss weight: 1, or (``depth``) its block number scaled so the weights sum to the exits."""
    if weighting == "equal":
        return {b: 1.0 for b in blocks}
    return {b: len(blocks) * b / sum(blocks) for b in blocks}


class ExitObjective(nn.Module):
    """Σ over heads of the embedding loss between the head's output and the model's final embedding.
    With a ``teacher`` (the backbone tuned jointly) the target is the teacher's final embedding, and
    the student's own final embedding is held to it by the same loss."""

    def __init__(self, heads: nn.Module, teacher: Optional[nn.Module] = None, weights: Optional[dict[int, float]] = None,
                 final_weight: float = 1.0):
        super().__init__()
        self.heads = heads
        self.weights = weights or {b: 1.0 for b in heads.blocks}
        self.final_weight = final_weight
        object.__setattr__(self, "teacher", teacher)  # frozen, never trained nor saved

    def forward(self, student: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        from ..runtime.early_exit import mean_pool

        mask = batch["attention_mask"]
        tuned = self.teacher is not None
        with torch.set_grad_enabled(tuned and torch.is_grad_enabled()):  # frozen: the states are inputs
            out = getattr(student, "base_model", student)(**batch, output_hidden_states=True)
            states = [mean_pool(h.float(), mask) for h in out.hidden_states]
        if tuned:
            with torch.no_grad():
                target = mean_pool(getattr(self.teacher, "base_model", self.teacher)(**batch).last_hidden_state.float(),
                                   mask)
        else:
            target = states[-1]
        parts = {f"exit{b}": embedding_loss(self.heads(b, states[b]), target) for b in self.heads.blocks}
        weights = {f"exit{b}": self.weights[b] for b in self.heads.blocks}
        if tuned:
            parts["final"], weights["final"] = embedding_loss(states[-1], target), self.final_weight
        total = torch.stack([weights[k] * v for k, v in parts.items()]).sum()
        return total, {k: float(v.detach()) for k, v in parts.items()}


class CausalExitObjective(nn.Module):
    """Σ over exits of weight × KL(the model's own next-token distribution ‖ the exit's), on real
    tokens; with a teacher, the final output's KL to it (``final_weight``); with exit classifiers,
    Σ of their binary cross-entropy against "the exit's top-1 is the final layer's"."""

    def __init__(self, heads: nn.Module, model: nn.Module, temperature: float, teacher: Optional[nn.Module] = None,
                 weights: Optional[dict[int, float]] = None, final_weight: float = 1.0):
        super().__init__()
        from ..models.arch import arch_of

        arch = arch_of(model).arch
        self.heads, self.temperature = heads, temperature
        self.weights = weights or {b: 1.0 for b in heads.blocks}
        self.final_weight = final_weight
        object.__setattr__(self, "norm", arch.get_final_norm(model))   # the model's own: not the objective's
        object.__setattr__(self, "head", arch.get_head(model))
        object.__setattr__(self, "teacher", teacher)

    def forward(self, student: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["attention_mask"]
        tuned = self.teacher is not None
        with torch.set_grad_enabled(tuned and torch.is_grad_enabled()):
            out = student(**batch, output_hidden_states=True, use_cache=False)
        if tuned:
            with torch.no_grad():
                target = self.teacher(**batch, use_cache=False).logits
        else:
            target = out.logits
        parts, weights = {}, {}
        final_top = target.argmax(-1)
        real = mask.bool()
        for b in self.heads.blocks:
            hidden = out.hidden_states[b]
            logits = self.head(self.norm(self.heads(b, hidden)))
            parts[f"exit{b}"] = kl_loss(logits, target, self.temperature, "forward", 0.5, mask)
            weights[f"exit{b}"] = self.weights[b]
            if self.heads.classifiers is not None:
                agree = (logits.detach().argmax(-1) == final_top).float()
                said = self.heads.confidence_logit(b, hidden.detach())
                parts[f"classifier{b}"] = F.binary_cross_entropy_with_logits(said[real].float(), agree[real])
                weights[f"classifier{b}"] = 1.0
        if tuned:
            parts["final"] = kl_loss(out.logits, target, self.temperature, "forward", 0.5, mask)
            weights["final"] = self.final_weight
        total = torch.stack([weights[k] * v for k, v in parts.items()]).sum()
        return total, {k: float(v.detach()) for k, v in parts.items()}


def _curve(model: nn.Module, heads: nn.Module, kind: str, thresholds: tuple[float, ...], data: Any,
           confidence: str) -> dict[str, Any]:
    """The exit curve of ``model`` with ``heads`` on ``data``'s held-out split (see the module
    docstring), as the card records it."""
    from ..runtime.early_exit import ATTRIBUTE, attach

    held = list(data.holdout)
    if not held:
        return {"curve": {"skipped": "no held-out split (holdout 0): the curve is priced on held-out text only"}}
    was = model.training
    model.eval()
    attach(model, heads)  # for the pricing only: the step attaches them for good once training is undone
    try:
        if kind == "causal":
            from ..runtime.early_exit_lm import CURVE_THRESHOLDS, exit_curve

            length = max(len(x) for x in held)
            windows = torch.stack([x for x in held if len(x) == length]).long()
            points = exit_curve(model, windows, thresholds or CURVE_THRESHOLDS, confidence=confidence)
            described = {"data": f"held-out split of the training text: {windows.shape[0]} windows of {length} "
                                 f"tokens, {windows.shape[0] * (length - 1)} predicted tokens",
                         "metric": "perplexity", "higher_is_better": False, "confidence": confidence,
                         "unit": "blocks per token"}
        else:
            from ..runtime.early_exit import ENCODER_THRESHOLDS, exit_curve

            points = exit_curve(model, held, thresholds or ENCODER_THRESHOLDS, pad_id=data.pad_id)
            described = {"data": f"held-out split of the training text: {len(held)} inputs",
                         "metric": "agreement", "higher_is_better": True,
                         "confidence": "cosine of successive exits' embeddings", "unit": "blocks per input",
                         "agreement": "mean cosine between the embedding answered and the model's own final one"}
    finally:
        delattr(model, ATTRIBUTE)
        model.train(was)
    return {"curve": {**described, "blocks": model.config.num_hidden_layers, "points": points}}


@register("early_exit", EarlyExitConfig, kind="distill",
          uses="training text (its data: field) or the recipe's calibration windows",
          trains=True, paper="DeeBERT arXiv:2004.12993; PABEE arXiv:2006.04152; CALM arXiv:2207.07061")
def apply(model: nn.Module, config: EarlyExitConfig, ctx: Any) -> dict[str, Any]:
    from ..runtime.early_exit import ExitHeads, attach, heads_of

    kind = kind_of(model)
    if heads_of(model) is not None:
        raise SecateurError("this model already has exit heads")
    n = model.config.num_hidden_layers
    exits = config.exits or tuple(range(1, n))
    if kind == "causal":
        from ..runtime.early_exit_lm import _Stack

        _Stack(model)  # refuses, in one line, what the exit decoder cannot run
        if not exits or any(b >= n for b in exits):
            raise ConfigError("exits", f"the model has {n} blocks: give exits in 1..{n - 1} (the last block always "
                                       "answers)")
    elif len(exits) < 2 or any(b >= n for b in exits):
        raise ConfigError("exits", f"the model has {n} blocks: give at least two exits in 1..{n - 1} (an input leaves "
                                   "when two successive exits agree; the last block always answers)")
    if config.confidence == "classifier" and kind != "causal":
        raise ConfigError("confidence", "a learned exit classifier is for causal LMs; encoders exit when two "
                                        "successive exits agree (confidence: margin)")
    heads = ExitHeads(model.config.hidden_size, exits, kind=config.head, classifier=config.confidence == "classifier")
    teacher = None
    if config.tune_backbone:
        teacher = resolve_teacher(config, ctx)
        if teacher is None:
            raise SecateurError("tune_backbone needs a teacher to hold the final output to (compress_ gives the "
                                "model as it was before the step unless the step names one)")
    weights = exit_weights(heads.blocks, config.exit_weighting)
    objective = (CausalExitObjective(heads, model, config.temperature, teacher, weights, config.final_weight)
                 if kind == "causal" else ExitObjective(heads, teacher, weights, config.final_weight))
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(config.tune_backbone)
    try:
        out = run_training(model, config, ctx, objective=objective,
                           after=lambda data: _curve(model, heads, kind, config.curve, data, config.confidence))
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])
    for p in heads.parameters():
        p.requires_grad_(False)
    attach(model, heads)
    out["exits"] = heads.describe(kind)
    return out
