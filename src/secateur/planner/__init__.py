"""The resource planner: what each stage of a pipeline will take — wall time and peak resident
memory on this machine — before anything runs, and whether the run fits.

    plan = plan_stages(base_dir, stages)       # stages: name -> (parent, steps, data, cached)
    print(plan.peak_bytes, plan.seconds, plan.fits)

Predictions come from the model's shapes (read from its config, :mod:`.shapes`), the calibration
size, the method and its settings (:mod:`.predict`), priced by this machine's cost model
(:mod:`.costs`: unit prices measured once and cached; :mod:`.probe`: corrections measured on real
stages of small synthetic models). A run whose predicted peak exceeds the memory available is
refused before it starts, naming the settings that would fit: activation offload, bf16 compute,
fewer calibration samples, smaller training batches (:func:`Plan.suggestions`).

``secateur plan PIPELINE.yaml`` prints the plan; ``secateur run`` checks it first (``--no-plan``
skips the check). ``SECATEUR_MEMORY_LIMIT`` (e.g. ``8GB``) caps the memory the planner counts as
available (default: what the machine and its cgroup have free, plus what this process holds).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import SecateurError
from .costs import CostModel, cost_model
from .predict import CALIBRATED, TRAINING, Data, Estimate, stage
from .shapes import ModelShape

GiB = float(1 << 30)


@dataclass
class StageSpec:
    """What the planner needs of a stage: its parent's name, its steps, its calibration set, and,
    when it is already built, its artifact (then it costs nothing and its shape is read from it)."""
    parent: str
    steps: list[Any]
    data: Optional[Data] = None
    artifact: Optional[str] = None


@dataclass
class StagePlan:
    variant: str
    parent: str
    steps: list[str]
    runs: bool
    seconds: float
    peak_bytes: float
    time: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    shape: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Plan:
    stages: list[StagePlan]
    held_bytes: float               # what the run keeps besides the stage being built (the base, for its gates)
    available_bytes: float
    available_source: str
    suggestions: list[str] = field(default_factory=list)
    cost_model: str = ""

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages if s.runs)

    @property
    def peak_bytes(self) -> float:
        running = [s.peak_bytes for s in self.stages if s.runs]
        return max(running, default=0.0) + (self.held_bytes if running else 0.0)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.available_bytes

    def refusal(self) -> str:
        """One line: the predicted peak, what is available, and the settings that would fit."""
        worst = max((s for s in self.stages if s.runs), key=lambda s: s.peak_bytes)
        line = (f"this run needs about {gib(self.peak_bytes)} at its peak (variant '{worst.variant}') but "
                f"{gib(self.available_bytes)} is available ({self.available_source})")
        if self.suggestions:
            return line + "; would fit: " + "; ".join(self.suggestions)
        return line + "; no setting the planner knows makes it fit: use a machine with more memory"

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages], "seconds": self.seconds, "peak_bytes": self.peak_bytes,
                "held_bytes": self.held_bytes, "available_bytes": self.available_bytes,
                "available_source": self.available_source, "fits": self.fits, "suggestions": self.suggestions,
                "cost_model": self.cost_model}


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / (1 << 20):.0f} MiB"


def training_texts(steps: list[Any], tokenizer: Any, data: Data, samples: int = 200) -> Data:
    """Fill ``data`` for the encoder training steps among ``steps``: the length a batch pads to and
    the seconds that reading and tokenizing the texts took here. The training loop sorts each
    window of ``GROUP`` batches by length before cutting it into batches (so a batch pads to about
    its own length), so the expected padded length is the mean, over ``samples`` random windows
    sorted and cut the same way, of each batch's longest text."""
    import random
    import time

    from ..distill.data import GROUP, source_sequences

    for step in steps:
        if step.method not in TRAINING or not getattr(step, "data", ()):
            continue
        start = time.perf_counter()
        lengths = [len(s) for spec in step.data for s in source_sequences(spec, tokenizer, "encoder", step.seq_len)]
        data.text_seconds += time.perf_counter() - start
        if not lengths:
            continue
        rng, size = random.Random(0), min(step.batch_size, len(lengths))
        window = min(size * GROUP, len(lengths))
        padded = []
        for _ in range(samples):
            chunk = sorted(rng.sample(lengths, window))
            padded += [max(chunk[b:b + size]) for b in range(0, window, size)]
        data.text_tokens = sum(padded) / len(padded)
    return data


# --- memory available ---------------------------------------------------------------------------------
def _parse_bytes(text: str) -> float:
    from ..config import parse_bytes  # the one parser of "8GB", "512MiB"

    return float(parse_bytes(text, "SECATEUR_MEMORY_LIMIT"))


def _own_rss() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return float(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0.0


def available_memory() -> tuple[float, str]:
    """Bytes a run started now may use, and where the figure comes from: the setting
    ``SECATEUR_MEMORY_LIMIT``, else MemAvailable (and the cgroup's limit, when lower), plus the
    resident set of this process (a stage's prediction already counts a process like it)."""
    setting = os.environ.get("SECATEUR_MEMORY_LIMIT")
    if setting:
        return _parse_bytes(setting), "SECATEUR_MEMORY_LIMIT"
    free, source = float("inf"), "unknown"
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: line.split()[1] for line in fh}
        free, source = float(info["MemAvailable"]) * 1024, "MemAvailable"
    except (OSError, KeyError, IndexError, ValueError):
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = float(open("/sys/fs/cgroup/memory.current").read())
        if limit != "max" and float(limit) - used < free:
            free, source = float(limit) - used, "the cgroup's memory.max"
    except (OSError, ValueError):
        pass
    return free + _own_rss(), f"{source} + this process"


# --- planning -------------------------------------------------------------------------------------------
def plan_stages(base: str, stages: dict[str, StageSpec], costs: Optional[CostModel] = None,
                available: Optional[tuple[float, str]] = None) -> Plan:
    """The plan of ``stages`` (in an order where parents come first) built from the model at ``base``."""
    costs = costs or cost_model()
    shapes: dict[str, ModelShape] = {"base": ModelShape.of(base)}
    out: list[StagePlan] = []
    for name, spec in stages.items():
        parent = shapes.get(spec.parent)
        if parent is None:
            raise SecateurError(f"planner: stage '{name}' names parent '{spec.parent}', which is not planned before it")
        if spec.artifact is not None:
            shapes[name] = ModelShape.of(spec.artifact)
            out.append(StagePlan(name, spec.parent, [s.method for s in spec.steps], False, 0.0, 0.0,
                                 shape=shapes[name].describe()))
            continue
        est, shapes[name] = stage(costs, parent, list(spec.steps), spec.data)
        out.append(StagePlan(name, spec.parent, [s.method for s in spec.steps], True, round(est.seconds, 3),
                             est.peak_bytes, {k: round(v, 4) for k, v in est.time.items()}, est.memory,
                             shapes[name].describe()))
    held = costs.load_rss_per_byte * shapes["base"].memory_bytes
    plan = Plan(out, held, *(available or available_memory()), cost_model=str(_cache_name(costs)))
    if not plan.fits:
        plan.suggestions = _suggestions(plan, stages, shapes, costs)
    return plan


def plan_recipe(model: str, steps: list[Any], data: Optional[Data], streamed: bool = False,
                costs: Optional[CostModel] = None) -> Estimate:
    """The estimate of one recipe run (``secateur compress``, streamed or not) on the model at ``model``."""
    est, _ = stage(costs or cost_model(), ModelShape.of(model), list(steps), data, streamed=streamed)
    return est


def _cache_name(costs: CostModel) -> str:
    from .costs import cache_path

    return str(cache_path()) if costs.measured_at else "(given)"


def _alternatives(step: Any, data: Optional[Data]) -> list[tuple[str, Any, Optional[Data]]]:
    """Settings of one step that lower its memory, as (what to write, new step, new data)."""
    out: list[tuple[str, Any, Optional[Data]]] = []
    if step.method in CALIBRATED:
        if not getattr(step, "offload", False):
            out.append(("offload: true", dataclasses.replace(step, offload=True), data))
        if getattr(step, "compute_dtype", None) != "bfloat16":
            out.append(("compute_dtype: bfloat16", dataclasses.replace(step, compute_dtype="bfloat16",
                                                                      activation_dtype="bfloat16"), data))
        if data is not None and data.samples > 1:
            samples = data.samples
            while samples > 1:
                samples //= 2
                out.append((f"data.samples: {samples}", step, Data(samples, data.seq_len)))
    if step.method in TRAINING:
        batch = getattr(step, "batch_size", 16)
        while batch > 1:
            batch //= 2
            out.append((f"batch_size: {batch}", dataclasses.replace(step, batch_size=batch), data))
        if getattr(step, "dtype", "auto") != "bfloat16":
            out.append(("dtype: bfloat16", dataclasses.replace(step, dtype="bfloat16"), data))
    return out


def _suggestions(plan: Plan, stages: dict[str, StageSpec], shapes: dict[str, ModelShape], costs: CostModel) -> list[str]:
    """For each stage over the limit, the first setting (in the order offload, bf16, fewer samples /
    smaller batches) that brings the run under it."""
    room = plan.available_bytes - plan.held_bytes
    lines = []
    for sp in plan.stages:
        if not sp.runs or sp.peak_bytes <= room:
            continue
        spec = stages[sp.variant]
        found = None
        for index, step in enumerate(spec.steps):
            for text, new_step, new_data in _alternatives(step, spec.data):
                steps = list(spec.steps)
                steps[index] = new_step
                est, _ = stage(costs, shapes[spec.parent], steps, new_data)
                if est.peak_bytes <= room:
                    found = f"variant '{sp.variant}' step {index + 1} ({step.method}) with {text} " \
                            f"(about {gib(est.peak_bytes + plan.held_bytes)})"
                    break
            if found:
                break
        if found:
            lines.append(found)
        else:
            return []
    return lines


__all__ = ["Plan", "StagePlan", "StageSpec", "Data", "Estimate", "CostModel", "ModelShape", "cost_model",
           "plan_stages", "plan_recipe", "available_memory", "training_texts", "gib"]
