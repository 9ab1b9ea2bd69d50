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

Papers: DeeBERT (Xin et al. 2020, arXiv:2004.12993), PABEE (Zhou et al. 2020, arXiv:2006.04152),
CALM (Schuster et al. 2022, arXiv:2207.07061).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn as nn

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

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(b < 1 for b in self.exits):
            raise ConfigError("exits", "block numbers start at 1 (exit after block 1 = the first block)")


class ExitObjective(nn.Module):
    """Σ over heads of the embedding loss between the head's output and the model's final embedding.
    With a ``teacher`` (the backbone tuned jointly) the target is the teacher's final embedding, and
    the student's own final embedding is held to it by the same loss."""

    def __init__(self, heads: nn.Module, teacher: Optional[nn.Module] = None):
        super().__init__()
        self.heads = heads
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
        if tuned:
            parts["final"] = embedding_loss(states[-1], target)
        total = torch.stack(list(parts.values())).sum()
        return total, {k: float(v.detach()) for k, v in parts.items()}


class CausalExitObjective(nn.Module):
    """Σ over exits of KL(the model's own next-token distribution ‖ the exit's), on real tokens."""

    def __init__(self, heads: nn.Module, model: nn.Module, temperature: float, teacher: Optional[nn.Module] = None):
        super().__init__()
        from ..models.arch import arch_of

        arch = arch_of(model).arch
        self.heads, self.temperature = heads, temperature
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
        parts = {f"exit{b}": kl_loss(self.head(self.norm(self.heads(b, out.hidden_states[b]))), target,
                                     self.temperature, "forward", 0.5, mask)
                 for b in self.heads.blocks}
        if tuned:
            parts["final"] = kl_loss(out.logits, target, self.temperature, "forward", 0.5, mask)
        total = torch.stack(list(parts.values())).sum()
        return total, {k: float(v.detach()) for k, v in parts.items()}


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
    heads = ExitHeads(model.config.hidden_size, exits, kind=config.head)
    teacher = None
    if config.tune_backbone:
        teacher = resolve_teacher(config, ctx)
        if teacher is None:
            raise SecateurError("tune_backbone needs a teacher to hold the final output to (compress_ gives the "
                                "model as it was before the step unless the step names one)")
    objective = (CausalExitObjective(heads, model, config.temperature, teacher) if kind == "causal"
                 else ExitObjective(heads, teacher))
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(config.tune_backbone)
    try:
        out = run_training(model, config, ctx, objective=objective)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])
    for p in heads.parameters():
        p.requires_grad_(False)
    attach(model, heads)
    out["exits"] = heads.describe(kind)
    return out
