"""The one training loop of secateur: distillation, recovery after pruning, quantization-aware
training and gradual pruning all run :func:`train`. Read it top to bottom:

1. the step config fields every training step shares (:class:`TrainingConfig`);
2. the objective: a weighted sum of the losses of :mod:`secateur.distill.losses` between the
   student's and the teacher's outputs on the same batch (plus the learned projections when
   hidden widths differ);
3. the loop: AdamW, linear warm-up then cosine decay, gradient accumulation and clipping,
   bfloat16 autocast where the CPU supports it, evaluation on a held-out split every N steps with
   early stopping (the best weights are restored at the end), a checkpoint every N steps, and
   hooks (gradual pruning, kept sparsity) called around each optimizer step.

Resume is bit-exact: a checkpoint holds the student, the projections, AdamW's moments, the step,
the random state and every hook's state; batch ``k`` is a pure function of ``k`` (see
:class:`~secateur.distill.data.TrainingSet`), so a run killed at any point and started again
with the same arguments ends with the same weights as an uninterrupted one (tested). Checkpoints
are written atomically and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Protocol

import torch
import torch.nn as nn

from ..config import StepConfig, param
from ..errors import ConfigError, SecateurError
from . import losses
from .data import TrainingSet

log = logging.getLogger(__name__)


# --- 1. the fields every training step shares ------------------------------------------------------
@dataclass(frozen=True)
class TrainingConfig(StepConfig):
    """Teacher, losses, data and optimisation of a training step (distill, qat, gradual)."""

    teacher: Optional[str] = param(None, "teacher model directory or hub id; null: the model as it was before the "
                                         "recipe's first step (or compress_'s teacher argument)")
    # losses (weights of a sum; null: kl 1 for causal LMs, embedding 1 for encoders, 0 for the rest)
    kl: Optional[float] = param(None, "weight of the KL divergence on logits (causal LMs)", range=(0.0, 1e6))
    temperature: float = param(2.0, "softmax temperature of the KL term", range=(1e-3, 100.0))
    kl_direction: Literal["forward", "reverse", "mix"] = param("forward", "KL(teacher‖student), KL(student‖teacher), "
                                                                          "or a mix of both")
    kl_mix: float = param(0.5, "weight of the forward KL in the mix", range=(0.0, 1.0))
    ce: Optional[float] = param(None, "weight of the hard-label next-token cross-entropy (causal LMs)", range=(0.0, 1e6))
    hidden: Optional[float] = param(None, "weight of the hidden-state loss", range=(0.0, 1e6))
    hidden_loss: Literal["mse", "cosine"] = param("mse", "distance between hidden states")
    layer_map: tuple[int, ...] = param((), "for each student block, the teacher block whose output it imitates "
                                           "(1-based); empty: the block it was cut from when a structured step "
                                           "removed blocks, else evenly spaced, last to last")
    embedding: Optional[float] = param(None, "weight of the sentence-embedding loss (relative MSE + cosine; encoders)",
                                       range=(0.0, 1e6))
    # data
    data: tuple[str, ...] = param((), "training text: dataset[:split] names or files; empty: the recipe's "
                                      "calibration windows")
    seq_len: int = param(256, "tokens per training window (causal) or maximum tokens per text (encoder)",
                         range=(4, 1 << 20))
    samples: int = param(0, "at most this many sequences from the data (0: all)", range=(0, 1 << 30))
    generate: int = param(0, "sequences sampled from the teacher and added to the data (causal)", range=(0, 1 << 24))
    repeat_real: int = param(1, "each real training sequence is read this many times per epoch: weighs a small "
                                "real corpus against many generated samples", range=(1, 1 << 16))
    generate_temperature: float = param(1.0, "sampling temperature of the generated sequences", range=(1e-3, 10.0))
    generate_paragraphs: bool = param(False, "cut the generated text into paragraphs at line breaks, each "
                                             "tokenized as BOS + paragraph like the data: sources (causal)")
    holdout: float = param(0.05, "fraction of sequences held out for evaluation and early stopping", range=(0.0, 0.5))
    # optimisation
    steps: int = param(500, "optimizer steps", range=(1, 1 << 30))
    batch_size: int = param(16, "sequences per micro-batch", range=(1, 1 << 16))
    accumulate: int = param(1, "micro-batches per optimizer step", range=(1, 1 << 16))
    lr: float = param(1e-4, "peak learning rate (AdamW)", range=(0.0, 10.0))
    weight_decay: float = param(0.0, "AdamW weight decay (matrices only)", range=(0.0, 10.0))
    warmup: float = param(0.05, "fraction of steps of linear warm-up", range=(0.0, 1.0))
    min_lr: float = param(0.1, "final learning rate as a fraction of the peak (cosine decay)", range=(0.0, 1.0))
    clip: float = param(1.0, "gradient norm clipping (0: off)", range=(0.0, 1e6))
    dtype: Literal["auto", "float32", "bfloat16"] = param(
        "float32", "compute dtype of the forward passes: bfloat16 autocast (~2.5x faster on CPUs with AVX-512 BF16), "
                   "float32, or auto (bfloat16 where supported)")
    seed: int = param(0, "seed of the data order, dropout and generation")
    eval_every: int = param(100, "evaluate on the held-out split every N steps (0: only at the end)",
                            range=(0, 1 << 30))
    patience: int = param(0, "stop after N evaluations without improvement (0: never stop early)", range=(0, 1 << 20))
    checkpoint_every: int = param(100, "write a resumable checkpoint every N steps (0: never)", range=(0, 1 << 30))
    fit_temperature: bool = param(False, "after training, fit one softmax temperature on the real text of the data "
                                         "(next-token cross-entropy) and fold it into the final norm (causal LMs)")
    calibrate_teacher: bool = param(False, "before training, fit the teacher's softmax temperature on the real text "
                                           "of the data and distill toward its logits divided by it: a target "
                                           "calibrated on real text (causal LMs; the teacher is not changed)")
    keep_sparsity: bool = param(True, "zeros of an already-pruned Linear stay zero (weights >= 10% exact zeros)")

    def validate(self) -> None:
        if self.patience and not self.eval_every:
            raise ConfigError("patience", "early stopping needs eval_every > 0")
        if self.patience and self.holdout == 0:
            raise ConfigError("patience", "early stopping needs a held-out split (holdout > 0)")

    def weights(self, kind: str) -> dict[str, float]:
        """Loss weights with the defaults of ``kind`` (causal: KL; encoder: embedding) filled in."""
        causal = kind == "causal"
        w = {"kl": self.kl if self.kl is not None else (1.0 if causal else 0.0),
             "ce": self.ce or 0.0, "hidden": self.hidden or 0.0,
             "embedding": self.embedding if self.embedding is not None else (0.0 if causal else 1.0)}
        if not causal and (w["kl"] or w["ce"]):
            raise ConfigError("kl" if w["kl"] else "ce", "an encoder has no logits; use embedding and hidden losses")
        if not any(w.values()):
            raise ConfigError("kl", "every loss weight is 0; give at least one of kl, ce, hidden, embedding")
        return w


# --- 2. the objective ------------------------------------------------------------------------------
class Objective(nn.Module):
    """``Σ weight · loss`` between student and teacher outputs on one batch. Holds the learned
    projections (student width → teacher width) of the hidden-state loss; the teacher is not a
    submodule (it is never trained nor saved)."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], config: TrainingConfig, kind: str,
                 teacher_temperature: float = 1.0):
        super().__init__()
        self.config, self.kind, self.w = config, kind, config.weights(kind)
        self.teacher_temperature = teacher_temperature   # the teacher's logits are divided by it (KL target)
        object.__setattr__(self, "teacher", teacher)
        if teacher is None and any(self.w[k] for k in ("kl", "hidden", "embedding")):
            raise SecateurError("distillation needs a teacher: pass teacher=..., set 'teacher: PATH' in the step, "
                                "or use only the ce loss")
        self.pairs: list[tuple[int, int]] = []
        self.proj = nn.ModuleList()
        if self.w["hidden"]:
            s_layers, t_layers = student.config.num_hidden_layers, teacher.config.num_hidden_layers
            if config.layer_map and len(config.layer_map) != s_layers:
                raise ConfigError("layer_map", f"got {len(config.layer_map)} entries for a student of {s_layers} blocks")
            if any(not 0 <= t <= t_layers for t in config.layer_map):
                raise ConfigError("layer_map", f"teacher block indices must lie in 0..{t_layers}")
            self.pairs = losses.layer_map(s_layers, t_layers, config.layer_map or _kept_blocks(student, t_layers))
            ds, dt = student.config.hidden_size, teacher.config.hidden_size
            for _ in self.pairs:
                self.proj.append(nn.Identity() if ds == dt else nn.Linear(ds, dt, bias=False))

    def _run(self, model: nn.Module, batch: dict[str, torch.Tensor], hidden: bool) -> Any:
        call: dict[str, Any] = dict(batch, output_hidden_states=hidden)
        if self.kind == "causal":
            call["use_cache"] = False
            return model(**call)
        return getattr(model, "base_model", model)(**call)

    def forward(self, student: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        w, mask = self.w, batch["attention_mask"]
        need_hidden = bool(w["hidden"])
        out_s = self._run(student, batch, need_hidden)
        out_t = None
        if self.teacher is not None and (w["kl"] or w["hidden"] or w["embedding"]):
            with torch.no_grad():
                out_t = self._run(self.teacher, batch, need_hidden)
        parts: dict[str, torch.Tensor] = {}
        if w["kl"]:
            target = out_t.logits if self.teacher_temperature == 1.0 else out_t.logits / self.teacher_temperature
            parts["kl"] = losses.kl_loss(out_s.logits, target, self.config.temperature, self.config.kl_direction,
                                         self.config.kl_mix, mask)
        if w["ce"]:
            parts["ce"] = losses.ce_loss(out_s.logits, batch["input_ids"], mask)
        if w["hidden"]:
            terms = [losses.hidden_loss(p(out_s.hidden_states[i]), out_t.hidden_states[j], self.config.hidden_loss, mask)
                     for p, (i, j) in zip(self.proj, self.pairs)]
            parts["hidden"] = torch.stack(terms).mean()
        if w["embedding"]:
            last = "last_hidden_state"
            parts["embedding"] = losses.embedding_loss(losses.mean_pool(getattr(out_s, last), mask),
                                                       losses.mean_pool(getattr(out_t, last), mask))
        total = sum(w[k] * v for k, v in parts.items())
        return total, {k: float(v.detach()) for k, v in parts.items()}


def _kept_blocks(student: nn.Module, teacher_layers: int) -> tuple[int, ...]:
    """For a student made by removing blocks from a teacher-sized model (a structured step earlier
    in this recipe), the 1-based teacher block each student block was, the last one mapped to the
    teacher's last (transformers applies the final norm to the last hidden state); else ()."""
    from .. import lineage

    for record in reversed(lineage.read(student).steps):
        result = record.result
        kept = result.get("kept_blocks")
        if record.method == "structured" and kept is not None:
            if (result.get("before") or {}).get("layers") == teacher_layers \
                    and len(kept) == student.config.num_hidden_layers:
                return tuple(k + 1 for k in kept[:-1]) + (teacher_layers,)
            return ()
    return ()


# --- 3. the loop -------------------------------------------------------------------------------------
class Hook(Protocol):
    """What a training-time method plugs into the loop (all optional)."""

    def after_backward(self) -> None: ...            # gradients of one optimizer step are complete
    def after_step(self, step: int) -> None: ...     # ``step`` optimizer steps are done
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def metrics(self) -> dict[str, float]: ...
    # ``end_step``: evaluations before it are not candidates for the best weights


class KeepZeros:
    """Zeros of an already-pruned Linear (or GPT-2 Conv1D) stay zero: the weight is re-masked after
    every step (weights held as parameters only: a parametrized weight is computed, not stored)."""

    MIN_ZEROS = 0.10

    def __init__(self, model: nn.Module):
        from ..models.layers import is_projection

        self.masks = {name: (m.weight != 0) for name, m in model.named_modules()
                      if is_projection(m) and isinstance(m.weight, nn.Parameter) and float((m.weight == 0).float().mean()) >= self.MIN_ZEROS}
        self.modules = {name: model.get_submodule(name) for name in self.masks}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        for name, module in self.modules.items():
            module.weight.mul_(self.masks[name])


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    best: Optional[dict[str, Any]] = None
    stopped_early: bool = False
    resumed_from_step: Optional[int] = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def lr_at(step: int, config: TrainingConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to ``min_lr``."""
    warm = int(round(config.warmup * config.steps))
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, config.steps - warm)
    return config.lr * (config.min_lr + (1 - config.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def use_bfloat16(dtype: str) -> bool:
    if dtype == "auto":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return dtype == "bfloat16"


def _optimizer(params: list[tuple[str, nn.Parameter]], config: TrainingConfig) -> torch.optim.AdamW:
    decay = [p for n, p in params if p.dim() >= 2 and n.endswith("weight")]
    rest = [p for n, p in params if not (p.dim() >= 2 and n.endswith("weight"))]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.999), eps=1e-8)


def _job_key(config: TrainingConfig, data: TrainingSet, student: nn.Module) -> str:
    """What a checkpoint must match to be resumed: the fields set away from their defaults (an
    option added later, at a default that keeps the old behaviour, does not orphan a running job's
    checkpoints), the data and the student's shapes."""
    shapes = [(n, tuple(p.shape)) for n, p in student.named_parameters()]
    text = json.dumps([config.method, config.changed(), data.fingerprint, shapes], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _holdout_loss(objective: Objective, student: nn.Module, data: TrainingSet, config: TrainingConfig,
                  autocast: Any) -> Optional[float]:
    if not data.holdout:
        return None
    total, count = 0.0, 0
    with torch.no_grad(), autocast():
        for batch in data.holdout_batches(config.batch_size):
            loss, _ = objective(student, batch)
            total += float(loss) * len(batch["input_ids"])
            count += len(batch["input_ids"])
    return total / count


def train(student: nn.Module, teacher: Optional[nn.Module], data: TrainingSet, config: TrainingConfig, *,
          kind: str = "causal", checkpoint_dir: Any = None, hooks: tuple[Any, ...] = (),
          evaluate: Optional[Callable[[nn.Module], dict[str, float]]] = None,
          teacher_temperature: float = 1.0, objective: Optional[nn.Module] = None) -> TrainResult:
    """Train ``student`` in place on ``data`` with ``config``'s objective and schedule.

    ``evaluate(student) -> {name: value}`` adds metrics to every evaluation (e.g. STS-B dev);
    early stopping watches the held-out loss. With ``checkpoint_dir``, a re-run of the same call
    resumes from the last checkpoint there. ``teacher_temperature`` divides the teacher's logits
    before the KL term (its calibration on real text). ``objective`` replaces the losses of
    ``config`` by a method's own (``objective(student, batch) -> (loss, parts)``; its parameters
    train too: early exit's heads).
    """
    from ..progress import Bar

    torch.manual_seed(config.seed)
    objective = objective if objective is not None else Objective(student, teacher, config, kind, teacher_temperature)
    if teacher is not None:
        teacher.eval()
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    params += [(f"objective.{n}", p) for n, p in objective.named_parameters()]
    if not params:
        raise SecateurError("the student has no trainable parameters")
    optimizer = _optimizer(params, config)
    bf16 = use_bfloat16(config.dtype)

    def autocast() -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    hooks = tuple(hooks) + ((KeepZeros(student),) if config.keep_sparsity else ())
    result = TrainResult(0, 0.0, settings={"kind": kind, "bfloat16": bf16, "train_sequences": len(data.train),
                                           "holdout_sequences": len(data.holdout), "data": data.describe,
                                           "data_fingerprint": data.fingerprint, "threads": torch.get_num_threads()})
    start_step, best_state, since_best, earlier_seconds = 0, None, 0, 0.0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    key = _job_key(config, data, student)
    if ckpt is not None and (ckpt / "train.pt").exists():
        state = torch.load(ckpt / "train.pt", weights_only=True)
        if state["key"] != key:
            raise SecateurError(f"checkpoint in '{ckpt}' belongs to a different training job (other config, data or "
                                "student); remove it or choose another output")
        student.load_state_dict(state["student"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        for hook, hook_state in zip(hooks, state["hooks"]):
            if hasattr(hook, "load_state_dict"):
                hook.load_state_dict(hook_state)
        start_step, since_best = state["step"], state["since_best"]
        earlier_seconds = float(state.get("seconds", 0.0))  # training time before the kill
        result.history, result.evals, result.best = json.loads(state["log"])
        if (ckpt / "best.pt").exists():
            best_state = torch.load(ckpt / "best.pt", weights_only=True)
        result.resumed_from_step = start_step
        log.info("resuming training from step %d (%s)", start_step, ckpt)

    def checkpoint(step: int) -> None:
        ckpt.mkdir(parents=True, exist_ok=True)
        hook_states = [h.state_dict() if hasattr(h, "state_dict") else {} for h in hooks]
        _save_atomic({"key": key, "step": step, "since_best": since_best,
                      "seconds": earlier_seconds + time.perf_counter() - started, "student": student.state_dict(),
                      "objective": objective.state_dict(), "optimizer": optimizer.state_dict(),
                      "rng": torch.get_rng_state(), "hooks": hook_states,
                      "log": json.dumps([result.history, result.evals, result.best])}, ckpt / "train.pt")

    def evaluation(step: int) -> bool:
        """Evaluate; True when training should stop early."""
        nonlocal best_state, since_best
        student.eval()
        entry: dict[str, Any] = {"step": step, "holdout_loss": _holdout_loss(objective, student, data, config, autocast)}
        if evaluate is not None:
            entry.update(evaluate(student))
        student.train()
        entry.update({k: v for h in hooks if hasattr(h, "metrics") for k, v in h.metrics().items()})
        result.evals.append(entry)
        log.info("step %d: %s", step, entry)
        score = entry["holdout_loss"]
        if score is None or step < max((getattr(h, "end_step", 0) for h in hooks), default=0):
            return False  # no held-out split, or a hook still changing the model (pruning before its end)
        if result.best is None or score < result.best["holdout_loss"]:
            result.best, since_best = dict(entry), 0
            best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            if ckpt is not None:
                ckpt.mkdir(parents=True, exist_ok=True)
                _save_atomic(best_state, ckpt / "best.pt")
            return False
        since_best += 1
        return bool(config.patience) and since_best >= config.patience

    started = time.perf_counter()
    student.train()
    step = start_step
    with Bar(config.steps, "training", completed=start_step) as bar:
        while step < config.steps:
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            running: dict[str, float] = {}
            for micro in range(config.accumulate):
                batch = data.batch(step * config.accumulate + micro, config.batch_size)
                with autocast():
                    loss, parts = objective(student, batch)
                (loss / config.accumulate).backward()
                for k, v in {"loss": float(loss.detach()), **parts}.items():
                    running[k] = running.get(k, 0.0) + v / config.accumulate
            for hook in hooks:
                if hasattr(hook, "after_backward"):
                    hook.after_backward()
            trainable = [p for _, p in params]
            norm = float(nn.utils.clip_grad_norm_(trainable, config.clip if config.clip > 0 else float("inf")))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            for hook in hooks:
                if hasattr(hook, "after_step"):
                    hook.after_step(step)
            result.history.append({"step": step, "lr": lr, "grad_norm": round(norm, 6),
                                   **{k: round(v, 6) for k, v in running.items()}})
            shown = {"loss": running["loss"], "lr": lr}
            for hook in hooks:
                shown.update(hook.metrics() if hasattr(hook, "metrics") else {})
            bar.update(step, **shown)
            stop = False
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                stop = evaluation(step)
            if ckpt is not None and config.checkpoint_every and step % config.checkpoint_every == 0 \
                    and step < config.steps:
                checkpoint(step)
            if stop:
                result.stopped_early = True
                log.info("early stop at step %d: no improvement in %d evaluations", step, config.patience)
                break
    evaluation(step)
    if best_state is not None and result.best is not None and result.best["step"] != step:
        student.load_state_dict(best_state)
        log.info("restored the best weights (step %d)", result.best["step"])
    student.eval()
    result.steps, result.seconds = step, round(earlier_seconds + time.perf_counter() - started, 3)
    return result
