"""A search space: choices per axis, the constraints a variant must meet, and how it is measured.
Validated as strictly as a recipe: an unknown key, method or option is one line naming its path.

    name: stories-search
    data: {source: tinystories, samples: 64, seq_len: 256}     # calibration (default: by model kind)
    eval: {task: perplexity, data: tinystories}                # the quality protocol (default: by kind)
    speed: {metric: decode}                                    # decode tok/s (LMs) or latency (encoders)
    axes:                                                      # each a list of choices; none = skip the axis
      structured: [none, {drop_layers: 1, mlp: 0.0}, {heads: 0.25, mlp: 0.25}]
      recovery: [0, 300]                                       # distillation steps after pruning
      sparsity: [none, {method: [wanda, sparsegpt], sparsity: [0.3, 0.5]}, {method: sparsegpt, pattern: "2:4"}]
      quant: [none, {method: gptq, bits: [4, 8], group_size: 32}, {method: smoothquant}]
    constraints: ["latency <= 0.5x", "bytes <= 0.3x", "quality_drop <= 1%"]
    trials: 12                                                 # measured trials at most (the budget also stops it)

A choice mapping whose values are lists stands for every combination of them. A candidate takes one
choice per axis, applied in the order structured → sparsity → recovery → quant; each applied axis is
one stage of a pipeline, so candidates that share a prefix (one pruned and distilled student, say)
build it once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import ConfigError, did_you_mean, one_of

AXES = ("structured", "sparsity", "recovery", "quant")
KEYS = ("name", "data", "eval", "speed", "axes", "constraints", "trials", "seed", "proxy_samples")
SPARSITY_METHODS = ("magnitude", "wanda", "sparsegpt")
QUANT_METHODS = ("rtn", "gptq", "awq", "smoothquant", "fp8")
METRICS = ("latency", "speedup", "bytes", "quality_drop")
CONSTRAINT = re.compile(r"^\s*(?P<metric>[a-z_]+)\s*(?P<op><=|>=|<|>)\s*(?P<value>[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)"
                        r"\s*(?P<unit>x|%)?\s*$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# what a model kind is measured by and calibrated on when the space does not say
DEFAULTS = {
    "causal": {"data": {"source": "tinystories", "samples": 64, "seq_len": 256},
               "eval": {"task": "perplexity", "data": "tinystories"},
               "speed": {"metric": "decode", "prompt_len": 128, "new_tokens": 32},
               "recovery_data": {}},
    "encoder": {"data": {"source": "stsb", "split": "train", "samples": 128, "seq_len": 128},
                "eval": {"task": "sts", "data": "stsb"},
                "speed": {"metric": "latency", "batch": 64, "prompt_len": 32, "new_tokens": 0},
                "recovery_data": {"data": ["stsb:train"], "seq_len": 128, "batch_size": 64, "dtype": "bfloat16",
                                  "eval_every": 0}},
}

# the default space per model kind: `secateur search MODEL --budget 30m` with no file
DEFAULT_AXES = {
    "causal": {
        "structured": ["none", {"drop_layers": 1, "mlp": 0.0}, {"heads": 0.25, "mlp": 0.25}],
        "sparsity": ["none", {"method": ["wanda", "sparsegpt"], "sparsity": [0.3, 0.5]}],
        "recovery": [0, 300],
        "quant": ["none", {"method": "gptq", "bits": [4, 8], "strategy": "group", "group_size": 32},
                  {"method": "rtn", "bits": 8, "strategy": "channel"}],
    },
    "encoder": {
        "structured": ["none", {"drop_layers": [1, 2, 3], "mlp": 0.0}, {"mlp": 0.25, "importance": "taylor"}],
        "sparsity": ["none"],
        "recovery": [0, 150],
        "quant": ["none", {"method": "smoothquant"}],
    },
}


@dataclass(frozen=True)
class Constraint:
    """``metric op value[unit]``: latency and bytes as a fraction of the dense model's (``0.5x``);
    speedup as a multiple (``3x``); quality_drop in percent (``1%``) or in the metric's units."""

    metric: str
    op: str
    value: float
    unit: Optional[str]
    text: str

    @classmethod
    def parse(cls, text: Any, path: str) -> "Constraint":
        if not isinstance(text, str):
            raise ConfigError(path, f"got {text!r}, expected a string such as 'latency <= 0.5x'")
        m = CONSTRAINT.match(text)
        if not m:
            raise ConfigError(path, f"cannot read {text!r}; expected '<metric> <op> <number>[x|%]' with a metric of "
                                    f"{one_of(METRICS)}, e.g. 'latency <= 0.5x', 'bytes <= 0.3x', 'quality_drop <= 1%'")
        metric, op, value, unit = m["metric"], m["op"], float(m["value"]), m["unit"]
        if metric not in METRICS:
            raise ConfigError(path, f"unknown metric {metric!r}{did_you_mean(metric, METRICS)}; valid: {one_of(METRICS)}")
        if metric in ("latency", "bytes", "speedup") and unit == "%":
            raise ConfigError(path, f"{metric} is a ratio to the dense model: write it as '{value / 100:g}x'")
        if metric == "quality_drop" and unit == "x":
            raise ConfigError(path, "quality_drop is in percent ('1%') or in the metric's units ('0.5')")
        return cls(metric, op, value, unit, text.strip())

    def holds(self, value: float) -> bool:
        return {"<=": value <= self.value, "<": value < self.value, ">=": value >= self.value,
                ">": value > self.value}[self.op]

    def value_of(self, point: Mapping[str, Any]) -> Optional[float]:
        """This constraint's quantity for a point: ``{latency, speedup, bytes, quality_drop, quality_drop_pct}``
        (ratios to the dense model; drops: positive is worse)."""
        key = "quality_drop_pct" if (self.metric == "quality_drop" and self.unit == "%") else self.metric
        value = point.get(key)
        return None if value is None else float(value)


@dataclass(frozen=True)
class Candidate:
    """One point of the space: a choice per axis (None where the axis is skipped)."""

    structured: Optional[dict[str, Any]]
    sparsity: Optional[dict[str, Any]]
    recovery: int
    quant: Optional[dict[str, Any]]

    def choices(self) -> dict[str, Any]:
        return {"structured": self.structured, "sparsity": self.sparsity, "recovery": self.recovery,
                "quant": self.quant}

    @property
    def id(self) -> str:
        return _digest(self.choices())[:12]

    def label(self) -> str:
        """A short human name: ``drop1+wanda50+d300+gptq-w4g32``."""
        parts = []
        if self.structured:
            s = self.structured
            bits = []
            if s.get("drop_layers"):
                bits.append(f"drop{s['drop_layers']}")
            for key, short in (("heads", "h"), ("mlp", "mlp"), ("hidden", "hid")):
                if s.get(key):
                    bits.append(f"{short}{round(100 * float(s[key]))}")
            parts.append("-".join(bits) or "structured")
        if self.sparsity:
            s = self.sparsity
            parts.append(f"{s['method']}{s['pattern'] if s.get('pattern') else round(100 * float(s.get('sparsity', 0.5)))}")
        if self.recovery:
            parts.append(f"d{self.recovery}")
        if self.quant:
            q = self.quant
            if q["method"] in ("smoothquant", "fp8") or q.get("activations"):
                parts.append(f"{q['method']}-w8a8" if q["method"] != "fp8" else "fp8")
            else:
                group = f"g{q.get('group_size', 128)}" if q.get("strategy", "group") == "group" else q.get("strategy", "")
                parts.append(f"{q['method']}-w{q.get('bits', 4)}{group}")
        return "+".join(parts) or "dense"

    def prefixes(self) -> list[tuple[str, dict[str, Any]]]:
        """The stages that build this candidate, root first: (axis, its choice)."""
        out = []
        for axis in AXES:
            value = getattr(self, axis)
            if value:
                out.append((axis, value))
        return out


@dataclass(frozen=True)
class SearchSpace:
    name: str
    kind: str
    data: dict[str, Any]
    eval: dict[str, Any]
    speed: dict[str, Any]
    axes: dict[str, list[Any]]                 # expanded: every choice a plain dict (or None / an int)
    constraints: tuple[Constraint, ...] = ()
    trials: int = 12
    seed: int = 0
    proxy_samples: int = 16
    recovery_options: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    # --- reading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, kind: str, default_name: str = "search") -> "SearchSpace":
        from ..recipe import read_file

        return cls.from_dict(read_file(path, "search space"), kind, default_name)

    @classmethod
    def default(cls, kind: str, name: str = "search") -> "SearchSpace":
        return cls.from_dict({"name": name}, kind, name)

    @classmethod
    def from_dict(cls, raw: Any, kind: str, default_name: str = "search") -> "SearchSpace":
        from ..recipe import DataSpec, EvalSpec, _reject_unknown

        if kind not in DEFAULTS:
            raise ConfigError("", f"cannot search a model of kind {kind!r}; secateur searches {one_of(DEFAULTS)} models")
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError("", f"a search space must be a mapping with 'axes' (got {type(raw).__name__})")
        _reject_unknown(raw, list(KEYS), "")
        name = raw.get("name", default_name)
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError("name", f"got {name!r}, expected letters, digits, '.', '_' or '-' (at most 64)")
        defaults = DEFAULTS[kind]
        data = raw.get("data", defaults["data"])
        if isinstance(data, str):
            data = {"source": data}
        DataSpec.from_dict(data, "data")
        evaluation = raw.get("eval", defaults["eval"])
        if isinstance(evaluation, str):
            evaluation = {"task": evaluation}
        spec = EvalSpec.from_dict(evaluation, "eval")
        if spec.task == "speed":
            raise ConfigError("eval.task", "the quality task is 'perplexity' or 'sts'; speed is measured by 'speed:'")
        speed = {**defaults["speed"], **_mapping(raw.get("speed", {}), "speed")}
        _reject_unknown(speed, ["metric", "batch", "prompt_len", "new_tokens", "runs"], "speed")
        valid_metric = ("decode", "prefill") if kind == "causal" else ("latency",)
        if speed["metric"] not in valid_metric:
            raise ConfigError("speed.metric", f"got {speed['metric']!r}; a {kind} model is timed by {one_of(valid_metric)}")
        for key in ("batch", "prompt_len", "new_tokens", "runs"):
            value = speed.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"speed.{key}", f"got {value!r}, expected a whole number >= 0")
        raw_axes = raw.get("axes", DEFAULT_AXES[kind])
        if not isinstance(raw_axes, Mapping):
            raise ConfigError("axes", f"got {raw_axes!r}, expected a mapping of {one_of(AXES)} to lists of choices")
        _reject_unknown(raw_axes, list(AXES), "axes", "axis")
        axes = {axis: _expand_axis(axis, raw_axes.get(axis, ["none"] if axis != "recovery" else [0]), f"axes.{axis}")
                for axis in AXES}
        constraints = raw.get("constraints", [])
        if isinstance(constraints, str):
            constraints = [constraints]
        if not isinstance(constraints, (list, tuple)):
            raise ConfigError("constraints", f"got {constraints!r}, expected a list such as ['latency <= 0.5x']")
        parsed = tuple(Constraint.parse(c, f"constraints[{i}]") for i, c in enumerate(constraints))
        out = {}
        for key, low in (("trials", 1), ("seed", 0), ("proxy_samples", 1)):
            value = raw.get(key, {"trials": 12, "seed": 0, "proxy_samples": 16}[key])
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(key, f"got {value!r}, expected a whole number >= {low}")
            out[key] = value
        space = cls(name, kind, dict(data), spec.to_dict(), speed, axes, parsed, out["trials"], out["seed"],
                    out["proxy_samples"], dict(defaults["recovery_data"]), dict(raw))
        if not space.candidates():
            raise ConfigError("axes", "the space holds no candidate besides the dense model; give at least one axis "
                                      "a choice other than none")
        return space

    # --- the candidates ----------------------------------------------------------------------------
    def candidates(self) -> list[Candidate]:
        """Every distinct compressed candidate (the dense model itself excluded). Recovery needs
        something to recover from: it is kept only after structured or sparsity pruning."""
        seen, out = set(), []
        for s, p, r, q in itertools.product(*(self.axes[a] for a in AXES)):
            if r and not (s or p):
                continue
            c = Candidate(s, p, int(r or 0), q)
            if not c.prefixes() or c.id in seen:
                continue
            seen.add(c.id)
            out.append(c)
        return out

    def steps_for(self, axis: str, choice: Any, base: str) -> list[dict[str, Any]]:
        """The recipe steps of one stage."""
        if axis == "structured":
            return [{"method": "structured", **choice}]
        if axis == "recovery":
            options = {**self.recovery_options, **({"steps": choice} if isinstance(choice, int) else choice)}
            return [{"method": "distill", "teacher": base, **options}]
        return [dict(choice)]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "data": self.data, "eval": self.eval, "speed": self.speed,
                "axes": self.axes, "constraints": [c.text for c in self.constraints], "trials": self.trials,
                "seed": self.seed, "proxy_samples": self.proxy_samples}

    def fingerprint(self) -> str:
        return _digest({k: v for k, v in self.to_dict().items() if k not in ("trials", "name")})[:16]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"got {value!r}, expected a mapping")
    return dict(value)


def _expand_axis(axis: str, choices: Any, path: str) -> list[Any]:
    """Every choice of one axis as plain data: None for 'none', an int for recovery steps, else a
    step mapping (validated by building the method's config)."""
    if not isinstance(choices, (list, tuple)) or not choices:
        raise ConfigError(path, f"got {choices!r}, expected a non-empty list of choices (none allowed)")
    out: list[Any] = []
    for i, choice in enumerate(choices):
        where = f"{path}[{i}]"
        if choice is None or (isinstance(choice, str) and choice.lower() == "none") or choice == 0:
            out.append(None if axis != "recovery" else 0)
            continue
        if axis == "recovery":
            if isinstance(choice, bool) or not isinstance(choice, (int, Mapping)) or (isinstance(choice, int) and choice < 0):
                raise ConfigError(where, f"got {choice!r}, expected distillation steps (an integer >= 0) or a "
                                         "mapping of distill options such as {steps: 300, lr: 0.001}")
            if isinstance(choice, Mapping):
                from ..recipe import _step_from_dict

                _step_from_dict({"method": "distill", **choice}, where)
                out.append(dict(choice))
            else:
                out.append(int(choice))
            continue
        if not isinstance(choice, Mapping):
            raise ConfigError(where, f"got {choice!r}, expected none or a mapping of {axis} options")
        lists = {k: v for k, v in choice.items() if isinstance(v, (list, tuple))}
        for k, v in lists.items():
            if not v:
                raise ConfigError(f"{where}.{k}", "an empty list of values")
        keys = list(lists)
        for combo in itertools.product(*(lists[k] for k in keys)) if keys else [()]:
            step = {**choice, **dict(zip(keys, combo))}
            out.append(_check_step(axis, step, where))
    unique = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def _check_step(axis: str, step: dict[str, Any], where: str) -> dict[str, Any]:
    from ..recipe import _step_from_dict

    if axis == "structured":
        if "method" in step and step["method"] != "structured":
            raise ConfigError(f"{where}.method", "the structured axis takes the structured method's options "
                                                 "(drop_layers, heads, mlp, hidden, importance, ...) without 'method'")
        step = {k: v for k, v in step.items() if k != "method"}
        _step_from_dict({"method": "structured", **step}, where)
        return step
    valid = SPARSITY_METHODS if axis == "sparsity" else QUANT_METHODS
    method = step.get("method")
    if method not in valid:
        raise ConfigError(f"{where}.method", f"got {method!r}{did_you_mean(str(method), valid)}; the {axis} axis "
                                             f"takes {one_of(valid)}")
    if axis == "sparsity" and step.get("pattern") is not None:
        step = {k: v for k, v in step.items() if k != "sparsity"}
    _step_from_dict(step, where)
    return step


def kind_of(model_path: str | Path) -> str:
    """``causal`` or ``encoder``, from the model's config (no weights read)."""
    from ..planner.shapes import ModelShape

    return ModelShape.of(model_path).kind


__all__ = ["SearchSpace", "Candidate", "Constraint", "AXES", "DEFAULTS", "DEFAULT_AXES", "kind_of"]
