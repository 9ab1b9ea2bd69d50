"""The facade: one method table, filled by ``@register`` in each method's file, and ``compress_``.

    model = compress_(model, MagnitudeConfig(sparsity=0.5))
    model = compress_(model, recipe, data=calibration_set, teacher=teacher)

``compress_`` edits the model in place (trailing underscore, as in torch) and returns it. Each
applied step is added to the model's lineage (:mod:`secateur.lineage`) so that :func:`secateur.save`
can write the resolved recipe and per-step results into the compression card.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import lineage
from .config import StepConfig
from .errors import ConfigError, SecateurError, did_you_mean, one_of


@dataclass(frozen=True)
class Method:
    name: str
    config: type[StepConfig]
    apply: Callable[..., dict[str, Any] | None]
    kind: str            # "prune" | "quantize" | "distill" | ...
    needs_data: bool
    paper: str
    trains: bool = False  # runs the training loop (needs a teacher; checkpoints like calibrated steps)
    uses: str = ""  # what data it reads beyond calibration windows, in words ("" when none)

    @property
    def needs(self) -> str:
        """What the method needs to run, in words (``secateur methods``)."""
        if self.needs_data:
            return "calibration windows (the recipe's data:)"
        return self.uses or "nothing"


METHODS: dict[str, Method] = {}

# Files whose import registers methods. Importing them is cheap (torch only).
_METHOD_MODULES = ("secateur.prune.magnitude", "secateur.prune.wanda", "secateur.prune.sparsegpt",
                   "secateur.prune.structured", "secateur.quant.rtn", "secateur.quant.gptq", "secateur.quant.awq",
                   "secateur.quant.smoothquant", "secateur.quant.fp8", "secateur.quant.mixed",
                   "secateur.distill.distill", "secateur.distill.qat", "secateur.distill.gradual",
                   "secateur.distill.early_exit")


def register(name: str, config: type[StepConfig], *, kind: str, needs_data: bool = False, paper: str = "",
             trains: bool = False, uses: str = "") -> Callable:
    """Decorator for a method's ``apply``: puts the callable itself and its config class in the table
    (and names the config's ``method``). Usage, at the bottom of the method's own file::

        @dataclass(frozen=True)
        class MagnitudeConfig(TargetedConfig): ...

        @register("magnitude", MagnitudeConfig, kind="prune", paper="Han et al. 2015")
        def apply(model, config, ctx) -> dict: ...
    """
    if name in METHODS and METHODS[name].config is not config:
        raise SecateurError(f"method '{name}' is registered twice ({METHODS[name].config.__name__} and "
                            f"{config.__name__})")

    def decorate(apply: Callable[..., dict[str, Any] | None]) -> Callable[..., dict[str, Any] | None]:
        config.method = name
        METHODS[name] = Method(name, config, apply, kind, needs_data, paper, trains, uses)
        return apply

    return decorate


def methods() -> dict[str, Method]:
    """The method table, with every built-in method registered."""
    for module in _METHOD_MODULES:
        importlib.import_module(module)
    return METHODS


def get_method(name: str) -> Method:
    table = methods()
    if name not in table:
        raise SecateurError(f"unknown method '{name}'{did_you_mean(name, table)}; valid methods: {one_of(table)}")
    return table[name]


def _load_model(path: str) -> Any:
    from .artifacts import load

    return load(path).model


@dataclass
class Context:
    """What a method may need besides the model and its config: one run's typed context."""

    data: Any = None                  # a CalibrationSet (input_ids [n, seq_len] + fingerprint) or None
    teacher: Any = None               # the model training steps imitate (compress_'s, or the input's snapshot)
    arch: Any = None                  # secateur.models.arch.ArchFacts, resolved from the model when missing
    tokenizer: Any = None             # reads training steps' data: sources; samples teacher text
    checkpoint_root: Optional[Path] = None   # compress_'s checkpoint_dir: resume state of the whole run
    checkpoint_dir: Optional[Path] = None    # this step's own resume folder under it (None: no resume)
    generation_dir: Optional[Path] = None    # where teacher samples are kept (default: under checkpoint_root)
    device: Any = None                # where the calibration loop runs blocks (None: the model's device)
    block_hooks: Any = None           # streamed runs: artifacts.stream.BlockStream (load each block, write it when done)
    evaluate: Optional[Callable[[Any], dict[str, float]]] = None  # extra metrics at each training evaluation
    load: Callable[[str], Any] = _load_model  # a teacher named by path -> model (secateur.load by default)
    teachers: dict[str, Any] = field(default_factory=dict)   # teachers loaded by path, shared by the steps
    training: list[Any] = field(default_factory=list)        # each training step's full result, in order


def _step_checkpoint(root: Any, index: int, step: StepConfig, data: Any, model: Any) -> str:
    """A resume folder unique to this step, its data and its base model."""
    import hashlib
    import json
    import os

    source = lineage.base_hash(model)
    key = json.dumps([index, step.to_dict(), getattr(data, "fingerprint", None), source], sort_keys=True, default=str)
    return os.path.join(str(root), f"step{index}-{step.method}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")


def compress_(model: Any, recipe_or_step: Any, data: Any = None, teacher: Any = None,
              checkpoint_dir: Any = None, *, tokenizer: Any = None, block_hooks: Any = None) -> Any:
    """Apply a step, a list of steps, or a :class:`~secateur.recipe.Recipe` to ``model`` in place.

    With ``checkpoint_dir``, calibrated steps checkpoint after every block there and training
    steps every ``checkpoint_every`` steps, and a re-run of the same call on the same model and
    data resumes where a killed run stopped; text sampled from a teacher loaded from disk is kept
    there once per teacher, shared by the steps. Training steps (distill, qat, gradual) imitate
    ``teacher``, or their own ``teacher:``, or else a frozen copy of ``model`` taken before the
    first step; ``tokenizer`` reads their ``data:`` sources. ``block_hooks`` streams the model
    block by block (:class:`secateur.artifacts.stream.BlockStream`; see ``run_streamed``).
    """
    import copy

    from .models.arch import arch_of

    steps = [recipe_or_step] if isinstance(recipe_or_step, StepConfig) else getattr(recipe_or_step, "steps",
                                                                                      recipe_or_step)
    ctx = Context(data=data, teacher=teacher, arch=arch_of(model, strict=False), tokenizer=tokenizer,
                  checkpoint_root=Path(checkpoint_dir) if checkpoint_dir is not None else None,
                  block_hooks=block_hooks)
    if teacher is None and any(isinstance(s, StepConfig) and get_method(s.method).trains
                               and getattr(s, "teacher", None) is None for s in steps):
        ctx.teacher = copy.deepcopy(model).eval()  # the input model, frozen, for every step without a teacher
        for p in ctx.teacher.parameters():
            p.requires_grad_(False)
    record = lineage.of(model)
    for index, step in enumerate(steps):
        if not isinstance(step, StepConfig):
            raise SecateurError(f"steps[{index}]: expected a step config such as MagnitudeConfig(...), got {type(step).__name__}")
        method = get_method(step.method)
        if method.needs_data and data is None:
            raise SecateurError(f"steps[{index}]: method '{step.method}' needs calibration data; pass data=...")
        ctx.checkpoint_dir = (Path(_step_checkpoint(checkpoint_dir, index, step, data, model))
                              if checkpoint_dir is not None and (method.needs_data or method.trains) else None)
        start = time.perf_counter()
        try:
            result = method.apply(model, step, ctx) or {}
        except ConfigError as exc:  # a field that only the model could check: name the step too
            raise ConfigError(f"steps[{index}].{exc.path}", str(exc).split(": ", 1)[-1]) from None
        record.add(lineage.Step(step.to_dict(), round(time.perf_counter() - start, 3),
                                getattr(data, "fingerprint", None), result))
    return model
