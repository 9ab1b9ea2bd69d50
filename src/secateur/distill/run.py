"""One training step from a recipe, shared by ``distill``, ``qat`` and ``gradual``: resolve the
teacher (the step's path, the run's, or the input model's snapshot), build the training set
(the step's ``data:`` sources or the calibration windows, plus text sampled from the teacher,
kept once per teacher under the run's checkpoint folder), optionally fit the teacher's
temperature, then run the one training loop (:func:`secateur.distill.train.train`) with the
method's hooks. The method files keep only their config and their ``apply``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..errors import SecateurError
from .data import TrainingSet, as_paragraphs, generate, source_sequences, split
from .temperature import best_temperature, fit_temperature, folds_into
from .train import TrainingConfig, train

log = logging.getLogger(__name__)


def kind_of(model: nn.Module) -> str:
    from ..models.arch import arch_of

    facts = arch_of(model, strict=False)
    if facts is None:
        raise SecateurError(f"training steps support the architectures of the table (Llama, OPT, GPT-2, BERT); "
                            f"got {type(model).__name__}")
    return facts.kind


def resolve_teacher(config: TrainingConfig, ctx: Any) -> Optional[nn.Module]:
    """The step's ``teacher`` path, else the context's teacher (compress_'s argument or the input
    model's snapshot)."""
    if config.teacher is not None:
        if config.teacher not in ctx.teachers:
            ctx.teachers[config.teacher] = ctx.load(config.teacher)
        return ctx.teachers[config.teacher]
    return ctx.teacher


def training_set(config: TrainingConfig, ctx: Any, teacher: Optional[nn.Module], kind: str) -> TrainingSet:
    """Sequences from the step's ``data`` sources (needs the tokenizer), else the context's
    calibration windows; plus ``generate`` sequences sampled from the teacher; a held-out split."""
    tokenizer = ctx.tokenizer
    sequences: list[torch.Tensor] = []
    described: dict[str, Any] = {}
    if config.data:
        if tokenizer is None:
            raise SecateurError("the step names data sources but no tokenizer was given; pass tokenizer=... to "
                                "compress_ (the pipeline and the CLI do)")
        for spec in config.data:
            found = source_sequences(spec, tokenizer, kind, config.seq_len)
            described[spec] = len(found)
            sequences += found
    elif ctx.data is not None:
        sequences = list(ctx.data.input_ids)
        described["calibration"] = {"sequences": len(sequences), "fingerprint": getattr(ctx.data, "fingerprint", None)}
    elif not config.generate:
        raise SecateurError("a training step needs data: set 'data: [tinystories:calibration, ...]' in the step, "
                            "give the recipe calibration data, or set generate: N to sample from the teacher")
    if config.samples and len(sequences) > config.samples:
        pick = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(config.seed))[:config.samples]
        sequences = [sequences[int(i)] for i in sorted(pick.tolist())]
    train_part, hold = split(sequences, config.holdout, config.seed)
    if config.repeat_real > 1:
        train_part = train_part * config.repeat_real
        described["repeat_real"] = config.repeat_real
    if config.generate:
        if kind != "causal" or teacher is None:
            raise SecateurError("generate needs a causal teacher (text is sampled from it)")
        if tokenizer is None:
            raise SecateurError("generate needs the tokenizer (for the BOS token); pass tokenizer=... to compress_")
        generated = _cached_generation(teacher, tokenizer, config, ctx.generation_dir
                                       or _samples_dir(teacher, ctx) or ctx.checkpoint_dir)
        described["generated"] = {"sequences": len(generated), "temperature": config.generate_temperature}
        if config.generate_paragraphs:
            generated = as_paragraphs(generated, tokenizer, config.seq_len)
            described["generated"]["paragraph_windows"] = len(generated)
        train_part = train_part + generated   # the held-out split stays real text
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    return TrainingSet(train_part, hold, pad_id=pad or 0, seed=config.seed, describe=described, real=sequences)


def _samples_dir(teacher: nn.Module, ctx: Any) -> Any:
    """Under compress_'s checkpoint folder, one folder of samples per teacher, named by the hash of
    the weights it was loaded from: the training steps of a recipe that sample the same teacher the
    same way (a distill step continued by another, say) draw the text once. None for a teacher
    built in memory (no hash) or changed by an earlier compress_ (its hash is out of date): its
    samples stay in the step's own folder."""
    from pathlib import Path

    root = ctx.checkpoint_root
    from .. import lineage

    sha = lineage.base_hash(teacher)
    if root is None or not sha or lineage.read(teacher).steps:
        return None
    return Path(root) / f"samples-{sha[:16]}"


def _cached_generation(teacher: nn.Module, tokenizer: Any, config: TrainingConfig, directory: Any) -> list:
    """Teacher samples, saved beside the training checkpoint (or in ``generation_dir``, shared by
    several runs) so that a resumed run reads the same text."""
    from pathlib import Path

    name = f"generated-{config.generate}x{config.seq_len}-t{config.generate_temperature}-s{config.seed}.pt"
    path = Path(directory) / name if directory is not None else None
    if path is not None and path.exists():
        return list(torch.load(path, weights_only=True))
    seqs = generate(teacher, tokenizer, config.generate, config.seq_len, temperature=config.generate_temperature,
                    seed=config.seed)
    if path is not None:
        from .train import _save_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic(torch.stack(seqs), path)
    return seqs


def run_training(model: nn.Module, config: TrainingConfig, ctx: Any, hooks: tuple = (),
                 objective: Optional[nn.Module] = None,
                 after: Optional[Callable[[TrainingSet], dict[str, Any]]] = None) -> dict[str, Any]:
    """Teacher, data, then the loop; returns what the compression card records. ``objective``: a
    method's own losses (see :func:`secateur.distill.train.train`); ``after(data)``: what the
    method measures on the trained model with the same training set (its held-out split), merged
    into the record."""
    kind = kind_of(model)
    teacher = resolve_teacher(config, ctx)
    data = training_set(config, ctx, teacher, kind)
    # checked before an hour of training, not after
    if config.fit_temperature:
        folds_into(model)
    if config.calibrate_teacher and (kind != "causal" or teacher is None):
        raise SecateurError("calibrate_teacher needs a causal teacher (its logits are rescaled)")
    for option in ("fit_temperature", "calibrate_teacher"):
        if getattr(config, option) and not data.real:
            raise SecateurError(f"{option} needs real text (data sources or calibration data) to fit a temperature "
                                "on, not only generated samples")
    teacher_fit = None
    if config.calibrate_teacher:
        teacher_fit = best_temperature(teacher, data.real, batch_size=config.batch_size)
        log.info("the teacher's temperature on real text: %.4f (NLL %.4f -> %.4f); distilling toward its logits / "
                 "%.4f", teacher_fit["temperature"], teacher_fit["nll_before"], teacher_fit["nll_after"],
                 teacher_fit["temperature"])
    result = train(model, teacher, data, config, kind=kind, checkpoint_dir=ctx.checkpoint_dir,
                   hooks=hooks, evaluate=ctx.evaluate,
                   teacher_temperature=teacher_fit["temperature"] if teacher_fit else 1.0, objective=objective)
    out = result.to_dict()
    if teacher_fit is not None:
        out["teacher_calibrated"] = teacher_fit
    if config.fit_temperature:
        out["calibrated"] = fit_temperature(model, data.real, batch_size=config.batch_size)
        log.info("fitted temperature %.4f on %d real tokens (NLL %.4f -> %.4f)", out["calibrated"]["temperature"],
                 out["calibrated"]["tokens"], out["calibrated"]["nll_before"], out["calibrated"]["nll_after"])
    if after is not None:
        out.update(after(data))
    every = max(1, len(result.history) // 100)   # the card keeps about 100 points of the loss curve
    out["history"] = [h for i, h in enumerate(result.history) if (i + 1) % every == 0 or i + 1 == len(result.history)]
    ctx.training.append(result)
    return out


__all__ = ["run_training", "resolve_teacher", "training_set", "kind_of"]
