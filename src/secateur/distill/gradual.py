"""Gradual pruning during training — sparsity rises while the model trains and recovers.

Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model compression"
(2017, arXiv:1710.01878): instead of cutting once, raise the sparsity from ``initial`` to
``final`` along a cubic schedule, updating the masks every ``every`` optimizer steps; the cuts are
large early, while many redundant weights remain, and small near the end. The score of a weight
is its magnitude |W|.

Sanh, Wolf & Rush, "Movement Pruning: Adaptive Sparsity by Fine-Tuning" (2020,
arXiv:2005.07683): score weights by where training moves them, not by where they are,
``S = -Σ_t W ⊙ ∂L/∂W'`` over the optimizer steps, with ``W' = W ⊙ M`` the weight the forward
uses. The gradient is taken with respect to ``W'``, which is dense, so masked weights keep being
scored as if they were present (the straight-through estimator): a weight that training would
grow away from zero regains a high score.

How it is done here:

* **Soft masks.** :meth:`GradualPruner.attach` puts a ``torch.nn.utils.parametrize``
  parametrization on each module's ``weight``: the forward sees ``W ⊙ M`` while the dense ``W``
  keeps its values, so a weight masked at one update comes back at a later one if its score
  recovers. The masks (and movement scores) are non-persistent buffers of the parametrization:
  they follow ``model.to(device)`` but are not in ``model.state_dict()``, whose keys become
  ``<module>.parametrizations.weight.original``; they live in :meth:`GradualPruner.state_dict`.
* **What the optimizer sees.** The optimizer holds the dense ``W`` (the same Parameter before,
  during and after). Its gradient is ``∂L/∂W' ⊙ M``: masked weights get zero gradient, as in
  Zhu & Gupta. They are not frozen: weight decay and the optimizer's momentum still move them,
  which is invisible in the forward; they only matter again if they win back their place.
* **Call order** in a training loop (``step`` counts optimizer steps, 1-based)::

      pruner = GradualPruner(select_modules(model, ["Linear"], ["lm_head"]), 0.5, total_steps)
      pruner.attach()
      for step in range(1, total_steps + 1):
          for batch in micro_batches:
              model(**batch).loss.backward()
          pruner.after_backward()            # movement: fold ∂L/∂W' into the scores
          optimizer.step(); optimizer.zero_grad()
          pruner.after_step(step)            # update the masks on schedule
      summary = pruner.finalize()            # weights := W ⊙ M, plain nn.Linear again
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..api import register
from ..config import TargetedConfig, param
from ..errors import SecateurError, one_of
from ..models.layers import is_projection, is_transposed
from ..prune.masks import global_masks, matrix_mask
from .train import TrainingConfig

log = logging.getLogger(__name__)

SCORES = ("magnitude", "movement")
SCOPES = ("layer", "global")


# --- the schedule -----------------------------------------------------------------------------
def last_update(step: int, *, start: int, end: int, every: int) -> int | None:
    """The latest mask update at or before ``step`` (None before ``start``).

    Updates happen at ``start, start + every, start + 2·every, …`` while below ``end``, and at
    ``end`` itself, so the last one lands on ``end`` even when ``end - start`` is not a multiple
    of ``every`` (the last interval is then shorter).
    """
    if step < start:
        return None
    if step >= end:
        return end
    return start + (step - start) // every * every


def is_update_step(step: int, *, start: int, end: int, every: int) -> bool:
    """Whether the masks are recomputed after optimizer step ``step``."""
    return start <= step <= end and last_update(step, start=start, end=end, every=every) == step


def cubic_sparsity(step: int, *, final: float, initial: float = 0.0, start: int, end: int, every: int) -> float:
    """Zhu & Gupta's sparsity after ``step`` optimizer steps: ``initial`` before ``start``, ``final``
    at and after ``end``, in between ``s_f + (s_i - s_f)·(1 - (t - start)/(end - start))³`` at the
    latest update step ``t`` (see :func:`last_update`) — constant between updates.

    With ``end - start = n·every`` this is the paper's ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(nΔt))³``.
    """
    if not (start < end and every >= 1):
        raise SecateurError(f"cubic_sparsity: expected start < end and every >= 1, got start={start}, "
                            f"end={end}, every={every}")
    t = last_update(step, start=start, end=end, every=every)
    if t is None:
        return initial
    if t == end:
        return final
    return final + (initial - final) * (1.0 - (t - start) / (end - start)) ** 3


# --- the soft mask ----------------------------------------------------------------------------
class SoftMask(nn.Module):
    """Parametrization ``W -> W ⊙ M``; with ``movement`` it records ``∂L/∂(W ⊙ M)`` (summed over
    backward passes until :meth:`GradualPruner.after_backward` folds it into ``scores``).

    Tensors are in the module's stored layout (``[in, out]`` for Conv1D)."""

    def __init__(self, weight: torch.Tensor, movement: bool):
        super().__init__()
        self.movement = movement
        self.capture = False  # switched on once attached, so registration's trial forward records nothing
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool), persistent=False)
        if movement:
            self.register_buffer("scores", torch.zeros_like(weight, dtype=torch.float32), persistent=False)
            self.register_buffer("grad_sum", torch.zeros_like(weight, dtype=torch.float32), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        effective = weight * self.mask
        if self.movement and self.capture and effective.requires_grad:
            effective.register_hook(self._record)
        return effective

    def _record(self, grad: torch.Tensor) -> None:
        self.grad_sum.add_(grad.float())


# --- the pruner -------------------------------------------------------------------------------
def _step_of(fraction: float, total_steps: int) -> int:
    """A fraction of the training as an optimizer step (floor, robust to float noise: 0.7·40 -> 28)."""
    return int(round(fraction * total_steps, 6))


class GradualPruner:
    """Soft masks on ``modules`` (name -> nn.Linear or Conv1D) pruned to ``sparsity`` over training.

    ``start`` and ``end`` are fractions of ``total_steps``: masks are updated every ``every``
    optimizer steps from ``start`` to ``end`` along :func:`cubic_sparsity`, from ``initial`` to
    ``sparsity``. ``score`` is ``magnitude`` (|W| of the dense weight) or ``movement`` (Sanh et al.);
    ``scope`` ``layer`` gives every module exactly the scheduled sparsity, ``global`` one threshold
    over all of them. See the module docstring for the call order.
    """

    def __init__(self, modules: dict[str, nn.Module], sparsity: float, total_steps: int, *, start: float = 0.0,
                 end: float = 0.7, every: int = 10, score: Literal["magnitude", "movement"] = "magnitude",
                 scope: Literal["layer", "global"] = "layer", initial: float = 0.0):
        _check(modules, sparsity, total_steps, start, end, every, score, scope, initial)
        self.modules = dict(modules)
        self.sparsity, self.initial, self.score, self.scope = float(sparsity), float(initial), score, scope
        self.total_steps, self.every = int(total_steps), int(every)
        self.start_step, self.end_step = _step_of(start, total_steps), _step_of(end, total_steps)
        if self.start_step >= self.end_step:
            raise SecateurError(f"gradual pruning: start={start} and end={end} of {total_steps} steps give steps "
                                f"{self.start_step} and {self.end_step}; they must differ: train longer or widen "
                                f"the window")
        if score == "movement" and self.start_step == 0 and initial > 0:
            raise SecateurError(f"gradual pruning: movement scores are all zero before training, so initial={initial} "
                                f"cannot be applied at step 0; set start > 0 or initial: 0")
        self.step = 0
        self.attached = False
        self._soft = {name: SoftMask(m.weight, movement=score == "movement") for name, m in self.modules.items()}
        # decided now: once attached, the class is parametrize's "ParametrizedConv1D"
        self._transposed = {name: is_transposed(m) for name, m in self.modules.items()}
        self._reached = 0.0
        if is_update_step(0, start=self.start_step, end=self.end_step, every=self.every):
            self._update(0)

    # --- schedule
    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(step, final=self.sparsity, initial=self.initial, start=self.start_step,
                              end=self.end_step, every=self.every)

    def schedule(self) -> dict[str, Any]:
        return {"kind": "cubic", "initial": self.initial, "final": self.sparsity, "start_step": self.start_step,
                "end_step": self.end_step, "every": self.every, "total_steps": self.total_steps}

    # --- the training loop's hooks
    def attach(self) -> None:
        """Put the soft masks on the modules (forward uses ``W ⊙ M``; ``W`` stays dense)."""
        if self.attached:
            raise SecateurError("gradual pruning: attach() called twice; the masks are already on the modules")
        for name, module in self.modules.items():
            if parametrize.is_parametrized(module, "weight"):
                raise SecateurError(f"gradual pruning: {name}.weight already has a parametrization; "
                                    f"remove it before attaching soft masks")
            parametrize.register_parametrization(module, "weight", self._soft[name])
            self._soft[name].capture = True
        self.attached = True
        log.debug("gradual pruning: soft masks on %d modules (%s, %s)", len(self.modules), self.score, self.scope)

    @torch.no_grad()
    def after_backward(self) -> None:
        """Once per optimizer step, after all backward passes: movement adds ``-W ⊙ ∂L/∂W'``."""
        if self.score != "movement":
            return
        for name, soft in self._soft.items():
            soft.scores.sub_(self._dense(name).float() * soft.grad_sum)
            soft.grad_sum.zero_()

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After optimizer step number ``step`` (1-based): recompute the masks on update steps."""
        self.step = int(step)
        if is_update_step(self.step, start=self.start_step, end=self.end_step, every=self.every):
            self._update(self.step)

    @torch.no_grad()
    def finalize(self) -> dict[str, Any]:
        """Make the masks hard (``W := W ⊙ M``), take the parametrizations off, return a summary."""
        layers = {}
        for name, module in self.modules.items():
            soft = self._soft[name]
            soft.capture = False
            if self.attached:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module.weight.masked_fill_(~soft.mask, 0.0)  # +0.0, not the -0.0 W·0 leaves on negative weights
            layers[name] = {"sparsity": round(float((~soft.mask).sum()) / soft.mask.numel(), 6)}
        self.attached = False
        summary = {"sparsity": round(self._mask_sparsity(), 6), "layers": layers, "score": self.score,
                   "scope": self.scope, "schedule": self.schedule(), "step": self.step}
        log.info("gradual pruning: finalized %d modules at sparsity %.4f (target %.4f)", len(layers),
                 summary["sparsity"], self.sparsity)
        return summary

    def metrics(self) -> dict[str, float]:
        """The current mask sparsity over all targeted weights (for the progress bar)."""
        return {"sparsity": self._reached}

    def masks(self) -> dict[str, torch.Tensor]:
        """Keep masks (True = kept) as ``[out, in]``, copies."""
        return {name: self._matrix(name, soft.mask).clone() for name, soft in self._soft.items()}

    # --- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step, "score": self.score, "scope": self.scope,
                                 "schedule": self.schedule(),
                                 "masks": {name: soft.mask.detach().cpu().clone() for name, soft in self._soft.items()}}
        if self.score == "movement":
            state["scores"] = {name: soft.scores.detach().cpu().clone() for name, soft in self._soft.items()}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (before or after :meth:`attach`)."""
        if state.get("score") != self.score or set(state.get("masks", {})) != set(self._soft):
            raise SecateurError(f"gradual pruning: the checkpoint is for score {state.get('score')!r} on "
                                f"{len(state.get('masks', {}))} modules; this run uses {self.score!r} on "
                                f"{len(self._soft)} modules ({next(iter(self._soft))!r}, …)")
        if state.get("schedule") != self.schedule():
            log.warning("gradual pruning: resuming with a different schedule (%s, was %s)", self.schedule(),
                        state.get("schedule"))
        for name, soft in self._soft.items():
            _copy(soft.mask, state["masks"][name], name)
            if self.score == "movement":
                _copy(soft.scores, state["scores"][name], name)
                soft.grad_sum.zero_()
        self.step = int(state["step"])
        self._reached = self._mask_sparsity()

    # --- internals
    def _dense(self, name: str) -> torch.Tensor:
        """The module's dense weight W (not W ⊙ M), stored layout."""
        module = self.modules[name]
        return module.parametrizations.weight.original if self.attached else module.weight

    def _matrix(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A stored-layout tensor as ``[out, in]`` (a view)."""
        return tensor.t() if self._transposed[name] else tensor

    def _scores(self, name: str) -> torch.Tensor:
        soft = self._soft[name]
        scores = soft.scores if self.score == "movement" else self._dense(name).detach().abs()
        return self._matrix(name, scores)

    def _update(self, step: int) -> None:
        target = self.sparsity_at(step)
        names = list(self._soft)
        scores = [self._scores(name) for name in names]
        if self.scope == "global":
            keeps = global_masks(scores, target)
        else:
            keeps = [matrix_mask(s, target) for s in scores]
        for name, keep in zip(names, keeps):
            self._matrix(name, self._soft[name].mask).copy_(keep)
        self._reached = self._mask_sparsity()
        log.info("gradual pruning: step %d, sparsity %.4f (scheduled %.4f, final %.4f at step %d)", step,
                 self._reached, target, self.sparsity, self.end_step)

    def _mask_sparsity(self) -> float:
        total = sum(soft.mask.numel() for soft in self._soft.values())
        removed = sum(int((~soft.mask).sum()) for soft in self._soft.values())
        return removed / max(total, 1)


def _copy(target: torch.Tensor, source: Any, name: str) -> None:
    if not isinstance(source, torch.Tensor) or source.shape != target.shape:
        raise SecateurError(f"gradual pruning: the checkpoint's state for {name!r} has shape "
                            f"{getattr(source, 'shape', None)}, expected {tuple(target.shape)}")
    target.copy_(source)


def _check(modules: dict[str, nn.Module], sparsity: float, total_steps: int, start: float, end: float, every: int,
           score: str, scope: str, initial: float) -> None:
    """One-line SecateurErrors for bad arguments, naming the argument and what is valid."""
    if not 0.0 <= sparsity < 1.0:
        raise SecateurError(f"gradual pruning: sparsity {sparsity!r} is outside [0, 1); expected e.g. 0.5")
    if not 0.0 <= initial <= sparsity:
        raise SecateurError(f"gradual pruning: initial sparsity {initial!r} must be in [0, sparsity={sparsity}]")
    if not (isinstance(total_steps, int) and total_steps >= 1):
        raise SecateurError(f"gradual pruning: total_steps {total_steps!r} must be a positive integer")
    if not 0.0 <= start < end <= 1.0:
        raise SecateurError(f"gradual pruning: start={start!r}, end={end!r} are fractions of the training steps; "
                            f"expected 0 <= start < end <= 1")
    if not (isinstance(every, int) and every >= 1):
        raise SecateurError(f"gradual pruning: every {every!r} must be a positive integer (optimizer steps "
                            f"between mask updates)")
    if score not in SCORES:
        raise SecateurError(f"gradual pruning: unknown score {score!r}; valid scores: {one_of(SCORES)}")
    if scope not in SCOPES:
        raise SecateurError(f"gradual pruning: unknown scope {scope!r}; valid scopes: {one_of(SCOPES)}")
    if not modules:
        raise SecateurError("gradual pruning: no modules to prune; expected a dict of name -> nn.Linear")
    for name, module in modules.items():
        if not is_projection(module):
            raise SecateurError(f"gradual pruning: module {name!r} is a {type(module).__name__}; only nn.Linear "
                                f"and GPT-2's Conv1D are supported")


# --- the registered step --------------------------------------------------------------------------
@dataclass(frozen=True)
class GradualConfig(TargetedConfig, TrainingConfig):
    """Prune while training: sparsity rises on a cubic schedule, the model recovers as it goes."""

    sparsity: float = param(0.5, "final fraction of weights set to zero in each targeted module", range=(0.0, 0.99))
    score: Literal["magnitude", "movement"] = param("magnitude", "weight score: |W| (Zhu & Gupta) or movement "
                                                                 "-Σ W·∂L/∂W' (Sanh et al.)")
    scope: Literal["layer", "global"] = param("layer", "the sparsity holds per module, or over all targeted modules")
    start: float = param(0.0, "fraction of the steps at which pruning starts", range=(0.0, 1.0))
    end: float = param(0.7, "fraction of the steps at which the final sparsity is reached", range=(0.0, 1.0))
    every: int = param(10, "optimizer steps between mask updates", range=(1, 1 << 20))
    initial: float = param(0.0, "sparsity at the first update", range=(0.0, 0.99))

    def validate(self) -> None:
        TrainingConfig.validate(self)
        if self.end <= self.start:
            from ..errors import ConfigError

            raise ConfigError("end", f"got {self.end}, expected a fraction after start ({self.start})")


@register("gradual", GradualConfig, kind="prune",
          uses="training text (its data: field) or the recipe's calibration windows",
          trains=True, paper="Zhu & Gupta arXiv:1710.01878; Sanh et al. arXiv:2005.07683")
def apply(model: nn.Module, config: GradualConfig, ctx: Any) -> dict[str, Any]:
    from ..targets import select_modules
    from .run import run_training

    modules = select_modules(model, config.targets, config.ignore)
    pruner = GradualPruner(modules, config.sparsity, config.steps, start=config.start, end=config.end,
                           every=config.every, score=config.score, scope=config.scope, initial=config.initial)
    pruner.attach()
    try:
        out = run_training(model, config, ctx, hooks=(pruner,))
    finally:
        pruner_summary = pruner.finalize()
    out["pruning"] = pruner_summary
    return out
