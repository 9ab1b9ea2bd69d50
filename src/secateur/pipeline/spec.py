"""A pipeline file: one base model, a family of variants each made by a recipe from a parent, and
the gates a variant must pass to be admitted. Validated as strictly as a recipe: an unknown key, a
missing parent, a cycle or a bad gate is one line naming its path.

    name: stories-family
    base: models/stories260K/hf
    data: {source: tinystories, samples: 128, seq_len: 256}   # every variant's calibration data
    eval: [{task: perplexity, data: tinystories}]               # evaluated on the base and every variant
    speed: true                                                 # P4 speed of the base and every variant
    gates:                                                      # every variant must pass these
      - {quality: perplexity, max_drop_pct: 50}                 # vs the base (or against: parent)
      - {speed: decode, min_speedup: 0.9}                       # measured, same process, alternating
      - {max_bytes: 2MB}
    variants:
      student: {steps: [{method: structured, drop_layers: 1, mlp: 0.0}, {method: distill, steps: 300}]}
      student-w4:
        parent: student
        steps: [{method: gptq, bits: 4}]
        aliases: [small]
        gates: [{quality: perplexity, max_drop_pct: 10, against: parent}]

A variant's recipe is its ``steps`` with the pipeline's ``data`` and ``eval`` (a variant may give
its own ``data``). Its parent is ``base`` (the default) or another variant.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

from ..errors import ConfigError, did_you_mean, one_of
from ..config import parse_bytes
from ..recipe import MAX_RECIPE_BYTES, Recipe, _check_size, _expand_env, _parse_yaml, _reject_unknown, read_file

BASE = "base"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
@dataclass(frozen=True)
class Gate:
    """One admission test. Exactly one kind: ``quality`` (a task evaluated by the pipeline: the most
    it may get worse, ``max_drop`` in the metric's units or ``max_drop_pct`` in percent; for
    perplexity worse means higher), ``speed`` (``min_speedup`` measured against the reference in
    ``runtime``), ``max_bytes`` (the artifact's weights on disk) or ``max_peak_rss`` (peak resident
    memory of a fresh process that loads the variant and runs the P4 speed protocol)."""

    quality: Optional[str] = None
    data: Optional[str] = None
    max_drop: Optional[float] = None
    max_drop_pct: Optional[float] = None
    speed: Optional[Literal["decode", "prefill", "latency"]] = None
    min_speedup: Optional[float] = None
    runtime: Literal["eager", "fused", "compiled"] = "eager"
    max_bytes: Optional[int] = None
    max_peak_rss: Optional[int] = None
    against: Literal["base", "parent"] = "base"

    KINDS = ("quality", "speed", "max_bytes", "max_peak_rss")

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) is not None)

    def describe(self) -> str:
        if self.kind == "quality":
            limit = f"{self.max_drop_pct}%" if self.max_drop_pct is not None else f"{self.max_drop}"
            return f"{self.quality}{'(' + self.data + ')' if self.data else ''} drop <= {limit} vs {self.against}"
        if self.kind == "speed":
            return f"{self.speed} speedup >= {self.min_speedup}x vs {self.against} ({self.runtime})"
        if self.kind == "max_bytes":
            return f"weights on disk <= {self.max_bytes:,} bytes"
        return f"peak RSS <= {self.max_peak_rss / 2**20:.0f} MiB"

    def to_dict(self) -> dict[str, Any]:
        keep = {"quality": ("quality", "data", "max_drop", "max_drop_pct", "against"),
                "speed": ("speed", "min_speedup", "runtime", "against")}.get(self.kind, (self.kind,))
        return {k: getattr(self, k) for k in keep if getattr(self, k) is not None}

    @classmethod
    def from_dict(cls, raw: Any, path: str) -> "Gate":
        if not isinstance(raw, Mapping):
            raise ConfigError(path, f"got {raw!r}, expected a mapping such as {{quality: perplexity, max_drop_pct: 5}}")
        keys = [f.name for f in dataclasses.fields(cls)]
        _reject_unknown(raw, keys, path)
        kinds = [k for k in cls.KINDS if raw.get(k) is not None]
        if len(kinds) != 1:
            raise ConfigError(path, f"a gate names exactly one of {', '.join(cls.KINDS)}; got "
                                    f"{', '.join(kinds) or 'none'}")
        kind = kinds[0]
        data = dict(raw)
        for key in ("max_bytes", "max_peak_rss"):
            if key in data:
                data[key] = parse_bytes(data[key], f"{path}.{key}")
        allowed = {"quality": {"quality", "data", "max_drop", "max_drop_pct", "against"},
                   "speed": {"speed", "min_speedup", "runtime", "against"},
                   "max_bytes": {"max_bytes"}, "max_peak_rss": {"max_peak_rss"}}[kind]
        for key in data:
            if key not in allowed:
                raise ConfigError(f"{path}.{key}", f"does not apply to a {kind} gate; its keys: {one_of(sorted(allowed))}")
        if kind == "quality":
            if (data.get("max_drop") is None) == (data.get("max_drop_pct") is None):
                raise ConfigError(path, "a quality gate takes one of max_drop (metric units) or max_drop_pct (percent)")
            for key in ("max_drop", "max_drop_pct"):
                value = data.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or value != value or value < 0 or value == float("inf")):
                    raise ConfigError(f"{path}.{key}", f"got {value!r}, expected a finite number >= 0")
        if kind == "speed":
            value = data.get("min_speedup")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
                raise ConfigError(f"{path}.min_speedup", f"got {value!r}, expected a positive number such as 1.5")
        for key in ("quality", "data"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ConfigError(f"{path}.{key}", f"got {data[key]!r}, expected a string")
        if kind == "speed" and data["speed"] not in ("decode", "prefill", "latency"):
            raise ConfigError(f"{path}.speed", f"got {data['speed']!r}{did_you_mean(str(data['speed']), ['decode', 'prefill', 'latency'])}; "
                                               "expected one of 'decode', 'prefill', 'latency'")
        for key, valid in (("runtime", ("eager", "fused", "compiled")), ("against", ("base", "parent"))):
            if key in data and data[key] not in valid:
                raise ConfigError(f"{path}.{key}", f"got {data[key]!r}{did_you_mean(str(data[key]), valid)}; "
                                                   f"expected one of {one_of(valid)}")
        return cls(**{k: (float(v) if k in ("max_drop", "max_drop_pct", "min_speedup") else v) for k, v in data.items()})


@dataclass(frozen=True)
class Variant:
    name: str
    parent: str
    recipe: Recipe                   # steps + the data and evaluations they use (model: unset)
    gates: tuple[Gate, ...] = ()
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pipeline:
    name: str
    base: str
    family: str
    variants: dict[str, Variant]
    eval: tuple[Any, ...] = ()
    gates: tuple[Gate, ...] = ()
    source: Optional[str] = None     # the file it was read from
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    speed: bool = True               # time the base and every variant together (P4, alternating) for the report
    KEYS = ("name", "family", "base", "data", "eval", "gates", "speed", "variants")
    VARIANT_KEYS = ("parent", "steps", "data", "gates", "aliases")

    # --- the DAG ----------------------------------------------------------------------------
    def order(self) -> list[str]:
        """Variants parents first (file order among siblings)."""
        done: list[str] = []
        while len(done) < len(self.variants):
            for name, v in self.variants.items():
                if name not in done and (v.parent == BASE or v.parent in done):
                    done.append(name)
        return done

    def gates_of(self, name: str) -> tuple[Gate, ...]:
        return self.gates + self.variants[name].gates

    def chain(self, name: str) -> list[str]:
        """``name`` and its ancestors, base excluded, root first."""
        out = []
        while name != BASE:
            out.append(name)
            name = self.variants[name].parent
        return out[::-1]

    # --- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Pipeline":
        return cls.from_dict(read_file(path, "pipeline"), source=str(Path(path).expanduser()))

    @classmethod
    def from_yaml(cls, text: str) -> "Pipeline":
        _check_size(len(text.encode("utf-8", "surrogatepass")), "the pipeline text")
        return cls.from_dict(_parse_yaml(text, None))

    @classmethod
    def from_dict(cls, data: Any, source: Optional[str] = None) -> "Pipeline":
        if not isinstance(data, Mapping):
            raise ConfigError("", "a pipeline must be a mapping with 'base' and 'variants'")
        _reject_unknown(data, list(cls.KEYS), "")
        for key in ("name", "base"):
            if not isinstance(data.get(key), str) or not data[key].strip():
                raise ConfigError(key, f"missing or not a string; expected the pipeline's {key}"
                                       + (" (a model directory, artifact or hub id)" if key == "base" else ""))
        name = data["name"]
        family = data.get("family", name)
        for key, value in (("name", name), ("family", family)):
            if not isinstance(value, str) or not NAME.match(value):
                raise ConfigError(key, f"got {value!r}, expected letters, digits, '.', '_' or '-' (at most 64)")
        base = _expand_env(data["base"], "base")
        gates = _gates(data.get("gates"), "gates")
        shared = {k: data[k] for k in ("data", "eval") if data.get(k) is not None}
        raw_variants = data.get("variants")
        if not isinstance(raw_variants, Mapping) or not raw_variants:
            raise ConfigError("variants", "expected a mapping of variant name -> {parent, steps, ...} with at least one variant")
        variants: dict[str, Variant] = {}
        for vname, raw in raw_variants.items():
            path = f"variants.{vname}"
            if not isinstance(vname, str) or not NAME.match(vname) or vname == BASE:
                raise ConfigError(path, f"variant name {vname!r}: letters, digits, '.', '_' or '-' (at most 64), not 'base'")
            if not isinstance(raw, Mapping):
                raise ConfigError(path, f"got {raw!r}, expected a mapping with 'steps' (and 'parent', 'gates', 'aliases')")
            _reject_unknown(raw, list(cls.VARIANT_KEYS), path)
            parent = raw.get("parent", BASE)
            if not isinstance(parent, str):
                raise ConfigError(f"{path}.parent", f"got {parent!r}, expected 'base' or a variant name")
            recipe_dict = {**shared, **{k: raw[k] for k in ("steps", "data") if k in raw}}
            try:
                recipe = Recipe.from_dict(recipe_dict)
            except ConfigError as exc:
                raise ConfigError(f"{path}.{exc.path}" if exc.path else path, str(exc).split(": ", 1)[-1]) from None
            aliases = raw.get("aliases", ())
            if isinstance(aliases, str):
                aliases = (aliases,)
            if not isinstance(aliases, (list, tuple)) or not all(isinstance(a, str) and NAME.match(a) for a in aliases):
                raise ConfigError(f"{path}.aliases", f"got {aliases!r}, expected a list of names such as [fast]")
            variants[vname] = Variant(vname, parent, recipe, _gates(raw.get("gates"), f"{path}.gates"), tuple(aliases))
        names = list(variants)
        for vname, v in variants.items():
            if v.parent != BASE and v.parent not in variants:
                raise ConfigError(f"variants.{vname}.parent", f"unknown parent {v.parent!r}"
                                  f"{did_you_mean(v.parent, names + [BASE])}; valid: {one_of([BASE] + names)}")
        _check_acyclic(variants)
        taken: dict[str, str] = {}
        for vname, v in variants.items():
            for alias in v.aliases:
                if alias in taken:
                    raise ConfigError(f"variants.{vname}.aliases", f"alias {alias!r} is already given to {taken[alias]!r}")
                taken[alias] = vname
        evals = variants[names[0]].recipe.eval
        located = [(f"gates[{i}]", g) for i, g in enumerate(gates)]
        located += [(f"variants.{n}.gates[{i}]", g) for n, v in variants.items() for i, g in enumerate(v.gates)]
        for where, gate in located:
            if gate.kind == "quality" and not any(e.task == gate.quality and (gate.data is None or e.data == gate.data)
                                                  for e in evals):
                raise ConfigError(f"{where}.quality", f"{gate.quality!r}{'/' + gate.data if gate.data else ''} is not "
                                                      "evaluated; add it to the pipeline's eval: list (evaluated: "
                                                      f"{one_of([e.task for e in evals]) if evals else 'nothing'})")
        speed = data.get("speed", True)
        if not isinstance(speed, bool):
            raise ConfigError("speed", f"got {speed!r}, expected true (time every variant beside the base) or false")
        return cls(name, base, family, variants, evals, gates, source, dict(data), speed)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.raw)


def _gates(raw: Any, path: str) -> tuple[Gate, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(path, f"got {raw!r}, expected a list of gates such as [{{max_bytes: 2MB}}]")
    return tuple(Gate.from_dict(g, f"{path}[{i}]") for i, g in enumerate(raw))


def _check_acyclic(variants: dict[str, Variant]) -> None:
    for start in variants:
        seen, name = [start], variants[start].parent
        while name != BASE:
            if name in seen:
                cycle = " -> ".join(seen[seen.index(name):] + [name])
                raise ConfigError(f"variants.{start}.parent", f"the parents form a cycle: {cycle}")
            seen.append(name)
            name = variants[name].parent


__all__ = ["Pipeline", "Variant", "Gate", "parse_bytes", "BASE", "MAX_RECIPE_BYTES"]
