"""Recipes: an ordered list of steps plus the model, calibration data and evaluations they use.

    name: llama-50
    model: ${MODELS}/stories260K        # ${VAR} and ${VAR:-default} are expanded on load
    data: {source: tinystories, samples: 128, seq_len: 256}
    steps:
      - {method: magnitude, sparsity: 0.5, scope: row}
    eval:
      - {task: perplexity, data: tinystories}

Loading is strict: an unknown key anywhere, a wrong type, an out-of-range value or an unknown
method raises :class:`~secateur.errors.ConfigError` whose path names the field
(``steps[1].sparsty``), with a did-you-mean and the valid choices. ``data: NAME`` and
``eval: [perplexity]`` are accepted as shorthands for ``{source: NAME}`` and ``{task: ...}``.

``Recipe.load(path)`` reads YAML or JSON by suffix, ``Recipe.from_yaml(text_or_path)`` and
``Recipe.from_dict(mapping)`` the rest; ``dump()`` writes YAML that loads back to an equal recipe;
``with_overrides(["steps[0].sparsity=0.6"])`` returns a changed copy (the CLI's ``--set``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .config import StepConfig, _type_name, check_value
from .errors import ConfigError, SecateurError, did_you_mean, one_of

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
# bounds on what a recipe may hold: a hostile file gets the recipe's own one-line error, never a
# RecursionError, a conversion ValueError or an exponential walk through YAML aliases
MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 100_000
MAX_STRING = 10_000
MAX_INT = 2 ** 63


# --- small specs: validated like step configs -------------------------------------------------
def _spec_field(default: Any, doc: str, *, minimum: int | None = None) -> Any:
    meta = {"doc": doc, "minimum": minimum}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


def _check(value: Any, tp: Any, path: str) -> Any:
    """:func:`check_value`, but ``Optional[X]`` checks ``X`` directly so Literal errors keep their hint."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(arms) < len(typing.get_args(tp)):
            return None
        if len(arms) == 1:
            return check_value(value, arms[0], path)
    return check_value(value, tp, path)


@dataclass(frozen=True)
class _Spec:
    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _check(getattr(self, f.name), hints[f.name], f.name)
            minimum = f.metadata.get("minimum")
            if minimum is not None and value is not None and value < minimum:
                raise ConfigError(f.name, f"got {value!r}, expected an integer >= {minimum}")
            object.__setattr__(self, f.name, value)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Any, path: str) -> Any:
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"got {data!r} ({type(data).__name__}), expected a mapping with keys: "
                                    f"{', '.join(cls.keys())}")
        _reject_unknown(data, cls.keys(), path)
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data:
                raise ConfigError(f"{path}.{f.name}", f"missing; expected {f.metadata['doc']}")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise _prefixed(path, exc) from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
            rows.append({"name": f.name, "type": _type_name(hints[f.name]),
                         "default": None if default is dataclasses.MISSING else default,
                         "minimum": f.metadata.get("minimum"), "doc": f.metadata.get("doc", "")})
        return rows


@dataclass(frozen=True)
class DataSpec(_Spec):
    """Calibration data: which text, how many sequences of which length."""

    source: str = _spec_field(dataclasses.MISSING, "a named dataset (tinystories, wikitext2, c4) or a path")
    split: Optional[str] = _spec_field(None, "dataset split; null means the source's calibration default")
    samples: int = _spec_field(128, "number of calibration sequences", minimum=1)
    seq_len: int = _spec_field(256, "tokens per sequence", minimum=8)
    seed: int = _spec_field(0, "seed for sampling sequences")
    mode: Optional[Literal["consecutive", "random"]] = _spec_field(
        None, "how sequences are cut: consecutive chunks or random windows; null means the source's default")


@dataclass(frozen=True)
class EvalSpec(_Spec):
    """One evaluation run after the steps."""

    task: Literal["perplexity", "sts", "speed"] = _spec_field(dataclasses.MISSING, "the evaluation task")
    data: Optional[str] = _spec_field(None, "a named evaluation set or a path; null means the task's default")
    options: dict[str, Any] = _spec_field({}, "task-specific options")

    def to_dict(self) -> dict[str, Any]:
        """Like the other specs, but an unset ``data`` and empty ``options`` are left out."""
        return {k: v for k, v in super().to_dict().items() if k == "task" or v not in (None, {})}


# --- the recipe -------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Recipe:
    """An ordered list of steps with the model, calibration data and evaluations they use."""

    name: Optional[str] = None
    model: Optional[str] = None
    data: Optional[DataSpec] = None
    steps: tuple[StepConfig, ...] = ()
    eval: tuple[EvalSpec, ...] = ()

    def __post_init__(self) -> None:
        for key in ("name", "model"):
            check_value(getattr(self, key), Optional[str], key)
        if self.data is not None and not isinstance(self.data, DataSpec):
            raise ConfigError("data", f"expected a DataSpec(...), got {type(self.data).__name__}; "
                                      "use Recipe.from_dict for plain mappings")
        steps = self.steps
        if isinstance(steps, StepConfig):
            steps = (steps,)
        if not isinstance(steps, (list, tuple)) or not steps:
            raise ConfigError("steps", "at least one step is required")
        for i, step in enumerate(steps):
            if not isinstance(step, StepConfig):
                raise ConfigError(f"steps[{i}]", f"expected a step config such as MagnitudeConfig(...), got "
                                                 f"{type(step).__name__}; use Recipe.from_dict for plain mappings")
        evals = self.eval
        if not isinstance(evals, (list, tuple)):
            raise ConfigError("eval", f"got {type(evals).__name__}, expected a list of EvalSpec(...)")
        for i, spec in enumerate(evals):
            if not isinstance(spec, EvalSpec):
                raise ConfigError(f"eval[{i}]", f"expected an EvalSpec(...), got {type(spec).__name__}")
        object.__setattr__(self, "steps", tuple(steps))
        object.__setattr__(self, "eval", tuple(evals))

    # --- loading ------------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        """Build from a plain mapping (as parsed from YAML/JSON), strictly; see the module docstring."""
        if data is None:
            raise ConfigError("", "the recipe is empty; expected a mapping with a 'steps' list")
        if not isinstance(data, Mapping):
            raise ConfigError("", f"a recipe must be a mapping with a 'steps' list, got {type(data).__name__}")
        _reject_unknown(data, cls.keys(), "")
        for key in ("name", "model"):
            _check(data.get(key), Optional[str], key)
        model = _expand_env(data.get("model"), "model")

        raw_data = data.get("data")
        if isinstance(raw_data, str):
            raw_data = {"source": raw_data}
        spec = None if raw_data is None else DataSpec.from_dict(_expand_key(raw_data, "source", "data"), "data")

        raw_steps = data.get("steps")
        if raw_steps is None or (isinstance(raw_steps, (list, tuple)) and not raw_steps):
            raise ConfigError("steps", "at least one step is required")
        if not isinstance(raw_steps, (list, tuple)):
            raise ConfigError("steps", f"got {raw_steps!r} ({type(raw_steps).__name__}), expected a list of steps, "
                                       "each a mapping with a 'method' key")
        steps = tuple(_step_from_dict(s, f"steps[{i}]") for i, s in enumerate(raw_steps))

        raw_eval = data.get("eval")
        if raw_eval is None:
            raw_eval = []
        if not isinstance(raw_eval, (list, tuple)):
            raise ConfigError("eval", f"got {raw_eval!r} ({type(raw_eval).__name__}), expected a list of "
                                      "evaluations such as [{task: perplexity}]")
        evals = []
        for i, item in enumerate(raw_eval):
            item = {"task": item} if isinstance(item, str) else item
            evals.append(EvalSpec.from_dict(_expand_key(item, "data", f"eval[{i}]"), f"eval[{i}]"))
        return cls(name=data.get("name"), model=model, data=spec, steps=steps, eval=tuple(evals))

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike) -> "Recipe":
        """From YAML text, or from a file when given a path (a ``Path``, or a one-line string naming a file)."""
        if _looks_like_path(text_or_path):
            return cls.load(text_or_path)
        text = str(text_or_path)
        _check_size(len(text.encode("utf-8", "surrogatepass")), "the recipe text")
        return cls.from_dict(_parse_yaml(text, None))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        """Read a ``.yaml``/``.yml`` or ``.json`` recipe file."""
        return cls.from_dict(read_file(path, "recipe"))

    # --- writing ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, scalars); ``None`` name/model/data and an empty eval are left out."""
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        if self.model is not None:
            out["model"] = self.model
        if self.data is not None:
            out["data"] = self.data.to_dict()
        out["steps"] = [_plain(s.to_dict()) for s in self.steps]
        if self.eval:
            out["eval"] = [e.to_dict() for e in self.eval]
        return out

    def dump(self) -> str:
        """YAML text that :meth:`from_yaml` reads back to an equal recipe."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)

    def save(self, path: str | os.PathLike) -> Path:
        """Write YAML or JSON by suffix; returns the path."""
        p = Path(path)
        if p.suffix.lower() not in RECIPE_SUFFIXES:
            raise SecateurError(f"recipe file '{path}' has suffix '{p.suffix}'; expected one of {one_of(RECIPE_SUFFIXES)}")
        text = json.dumps(self.to_dict(), indent=2) + "\n" if p.suffix.lower() == ".json" else self.dump()
        p.write_text(text, encoding="utf-8")
        return p

    # --- overrides ----------------------------------------------------------------------------
    def with_overrides(self, overrides: Iterable[str] | Mapping[str, Any]) -> "Recipe":
        """A copy with ``PATH=VALUE`` assignments applied in order (values are parsed as YAML).

        ``PATH`` is ``key``, ``a.b``, ``steps[0].sparsity``, ``eval[1].options.batch``. Setting
        ``steps[i].method`` keeps the other keys the new method also has. Errors name the path
        and the override they came from.
        """
        if isinstance(overrides, str):
            overrides = [overrides]
        items: list[tuple[str, str, Any]]
        if isinstance(overrides, Mapping):
            items = [(f"{k}={v!r}", k, v) for k, v in overrides.items()]
        else:
            items = []
            for text in overrides:
                key, sep, raw = str(text).partition("=")
                if not sep or not key.strip():
                    raise ConfigError(str(text), "expected PATH=VALUE, e.g. steps[0].sparsity=0.6")
                items.append((text, key.strip(), _parse_scalar(raw, text)))
        recipe = self
        for text, key, value in items:
            try:
                data = _full_dict(recipe)
                _assign(data, _parse_path(key), value, key)
                recipe = Recipe.from_dict(data)
            except ConfigError as exc:
                message = str(exc).split(": ", 1)[-1] if exc.path else str(exc)
                raise ConfigError(exc.path, f"{message} (in override '{text}')") from None
        return recipe

    @property
    def needs_data(self) -> bool:
        """Whether some step's method needs calibration data."""
        from .api import methods

        table = methods()
        return any(table[s.method].needs_data for s in self.steps if s.method in table)


def read_file(path: str | os.PathLike, what: str) -> Any:
    """The parsed content of a ``.yaml``/``.yml`` or ``.json`` file (a recipe, a pipeline), with the
    same bounds and one-line errors for both."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SecateurError(f"{what} file '{path}' does not exist")
    if not p.is_file():
        raise SecateurError(f"{what} path '{path}' is not a file; expected a .yaml, .yml or .json {what}")
    suffix = p.suffix.lower()
    if suffix not in RECIPE_SUFFIXES:
        raise SecateurError(f"{what} file '{path}' has suffix '{p.suffix}'; expected one of {one_of(RECIPE_SUFFIXES)}")
    _check_size(p.stat().st_size, f"{what} file '{path}'")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{what} file '{path}' is not UTF-8 text (byte {exc.start})") from None
    return _parse_json(text, str(path)) if suffix == ".json" else _parse_yaml(text, str(path))


def example_yaml(method: Any) -> str:
    """An example recipe using ``method`` (a :class:`~secateur.api.Method` or its name) with its defaults."""
    from .api import get_method

    spec = get_method(method) if isinstance(method, str) else method
    recipe = Recipe(name=f"{spec.name}-example", model="path/to/model-or-hub-id",
                    data=DataSpec(source="tinystories") if spec.needs_data else None,
                    steps=(spec.config(),), eval=(EvalSpec(task="perplexity"),))
    return recipe.dump()


# --- helpers: validation ----------------------------------------------------------------------
def _prefixed(path: str, exc: ConfigError) -> ConfigError:
    inner = exc.path
    joined = f"{path}.{inner}" if inner and not inner.startswith("[") else f"{path}{inner}"
    message = str(exc).split(": ", 1)[-1] if inner else str(exc)
    return ConfigError(joined, message)


def _reject_unknown(data: Mapping[str, Any], valid: list[str], path: str, what: str = "key") -> None:
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in valid:
            raise ConfigError(f"{prefix}{key}", f"unknown {what}{did_you_mean(str(key), valid)}; "
                                                f"valid keys: {', '.join(valid)}")


def _step_from_dict(raw: Any, path: str) -> StepConfig:
    from .api import methods
    from .targets import check_patterns

    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"got {raw!r} ({type(raw).__name__}), expected a mapping with a 'method' key")
    table = methods()
    name = raw.get("method")
    if name is None:
        raise ConfigError(f"{path}.method", f"missing; valid methods: {one_of(table)}")
    if not isinstance(name, str) or name not in table:
        hint = did_you_mean(name, table) if isinstance(name, str) else ""
        raise ConfigError(f"{path}.method", f"unknown method {name!r}{hint}; valid methods: {one_of(table)}")
    cls = table[name].config
    try:
        step = cls.from_dict(dict(raw), path)
    except TypeError as exc:  # a config with a required field, or a validate() bug
        raise ConfigError(path, f"invalid step for method '{name}': {exc}") from None
    for key in ("targets", "ignore"):
        if isinstance(getattr(step, key, None), tuple):
            check_patterns(getattr(step, key), f"{path}.{key}")
    return step


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, path: str) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in a string; an unset variable without default is an error."""
    if not isinstance(value, str):
        return value

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(path, f"environment variable '{name}' is not set (used as '{match.group(0)}'); "
                                f"set it or write '${{{name}:-default}}'")

    return _ENV.sub(sub, value)


def _expand_key(data: Any, key: str, path: str) -> Any:
    if isinstance(data, Mapping) and isinstance(data.get(key), str):
        return {**data, key: _expand_env(data[key], f"{path}.{key}")}
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --- helpers: YAML and JSON -------------------------------------------------------------------
# YAML 1.1 reads 1e-5 as a string; recipes mean a number.
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """Safe loader that also reads ``1e-5`` as a float and rejects duplicate keys."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Safe dumper writing short lists of scalars inline (``targets: [Linear]``)."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> Any:
    flow = all(not isinstance(v, (list, dict)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def _check_size(nbytes: int, what: str) -> None:
    if nbytes > MAX_RECIPE_BYTES:
        raise ConfigError("", f"{what} holds {nbytes:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}")


def _check_bounds(data: Any, source: str | None) -> Any:
    """Walk the parsed data once (iteratively, aliases included): depth, node count, string and
    integer sizes within the bounds above, or one ConfigError naming the bound."""
    of = f" in {source}" if source else ""
    stack, nodes = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if depth > MAX_DEPTH:
            raise ConfigError("", f"the recipe{of} is nested deeper than {MAX_DEPTH} levels")
        if nodes > MAX_NODES:
            raise ConfigError("", f"the recipe{of} holds more than {MAX_NODES:,} values (YAML aliases count each time)")
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise ConfigError("", f"a string of {len(value):,} characters{of}; recipe strings are at most {MAX_STRING:,}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise ConfigError("", f"an integer of {len(str(abs(value)))} digits{of}; recipe integers stay within ±2^63")
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for kv in value.items() for v in kv)
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)
    return data


def _parse_yaml(text: str, source: str | None) -> Any:
    try:
        return _check_bounds(yaml.load(text, Loader=_Loader), source)  # noqa: S506 - a SafeLoader subclass
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError("", f"the recipe{f' in {source}' if source else ''} is nested too deeply "
                              f"(at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        raise ConfigError("", f"invalid YAML{f' in {source}' if source else ''}: "
                              f"{' '.join(str(exc).split())[:200]}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        of = f" of {source}" if source else ""
        problem = " ".join(str(exc.problem or exc.context or "syntax error").split())
        raise ConfigError("", f"invalid YAML{where}{of}: {problem}") from None
    except yaml.YAMLError as exc:
        of = f" in {source}" if source else ""
        raise ConfigError("", f"invalid YAML{of}: {' '.join(str(exc).split())}") from None


def _parse_json(text: str, source: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError("", f"invalid JSON in {source}: duplicate key {key!r}")
            out[key] = value
        return out

    try:
        return _check_bounds(json.loads(text, object_pairs_hook=no_duplicates), source)
    except ConfigError:
        raise
    except json.JSONDecodeError as exc:
        raise ConfigError("", f"invalid JSON at line {exc.lineno}, column {exc.colno} of {source}: {exc.msg}") from None
    except RecursionError:
        raise ConfigError("", f"the recipe in {source} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        raise ConfigError("", f"invalid JSON in {source}: {' '.join(str(exc).split())[:200]}") from None


def _looks_like_path(value: Any) -> bool:
    if isinstance(value, os.PathLike):
        return True
    text = str(value)
    return "\n" not in text and ": " not in text and not text.lstrip().startswith(("{", "[", "-")) and (
        text.endswith(RECIPE_SUFFIXES) or os.path.isfile(text))


def _parse_scalar(raw: str, text: str) -> Any:
    try:
        return yaml.load(raw, Loader=_Loader) if raw.strip() else None  # noqa: S506
    except yaml.YAMLError:
        raise ConfigError(text.partition("=")[0], f"cannot parse value {raw!r} as YAML (in override '{text}'); "
                                                  "quote strings that contain ':' or '#'") from None


# --- helpers: override paths ------------------------------------------------------------------
_INDEX = re.compile(r"\[(\d+)\]")
_KEY = re.compile(r"[^.\[\]]+")


def _parse_path(path: str) -> list[str | int]:
    """``steps[0].sparsity`` -> ``['steps', 0, 'sparsity']``."""
    bad = ConfigError(path, "invalid override path; expected a form like steps[0].sparsity or data.samples")
    tokens: list[str | int] = []
    pos = 0
    while pos < len(path):
        if path[pos] == "[":
            match = _INDEX.match(path, pos)
            if match is None or not tokens:
                raise bad
            tokens.append(int(match.group(1)))
        else:
            if tokens:
                if path[pos] != ".":
                    raise bad
                pos += 1
            match = _KEY.match(path, pos)
            if match is None:
                raise bad
            tokens.append(match.group(0))
        pos = match.end()
    if not tokens:
        raise bad
    return tokens


def _full_dict(recipe: Recipe) -> dict[str, Any]:
    """Every key present (None/empty included), so that overrides can reach fields left out of dump()."""
    return {"name": recipe.name, "model": recipe.model,
            "data": recipe.data.to_dict() if recipe.data is not None else None,
            "steps": [_plain(s.to_dict()) for s in recipe.steps], "eval": [e.to_dict() for e in recipe.eval]}


def _closed_keys(tokens: list[str | int], node: dict[str, Any]) -> list[str] | None:
    """Valid keys of the mapping at ``tokens`` when it is a schema object; None for free mappings."""
    if not tokens:
        return Recipe.keys()
    if tokens == ["data"]:
        return DataSpec.keys()
    if len(tokens) == 2 and tokens[0] == "eval" and isinstance(tokens[1], int):
        return EvalSpec.keys()
    if len(tokens) == 2 and tokens[0] == "steps" and isinstance(tokens[1], int):
        from .api import methods

        method = methods().get(node.get("method"))
        return ["method", *(f.name for f in dataclasses.fields(method.config))] if method else None
    return None


def _format_path(tokens: list[str | int]) -> str:
    out = ""
    for t in tokens:
        out += f"[{t}]" if isinstance(t, int) else (f".{t}" if out else t)
    return out


def _assign(data: dict[str, Any], tokens: list[str | int], value: Any, path: str) -> None:
    node: Any = data
    for depth, token in enumerate(tokens):
        here = tokens[:depth]
        last = depth == len(tokens) - 1
        where = _format_path(tokens[:depth + 1])
        if isinstance(token, int):
            if not isinstance(node, list):
                raise ConfigError(where, f"'{_format_path(here)}' is not a list; it cannot be indexed")
            if token >= len(node):
                raise ConfigError(where, f"index {token} is out of range: '{_format_path(here)}' has {len(node)} "
                                         f"item{'s' if len(node) != 1 else ''}; replace the whole list with "
                                         f"{_format_path(here)}=[...]")
        else:
            if not isinstance(node, dict):
                raise ConfigError(where, f"'{_format_path(here)}' is a {type(node).__name__}, not a mapping; "
                                         f"it has no key '{token}'")
            valid = _closed_keys(here, node)
            if valid is not None and token not in valid:
                owner = f" for method '{node.get('method')}'" if here[:1] == ["steps"] and len(here) == 2 else ""
                raise ConfigError(where, f"unknown key{owner}{did_you_mean(token, valid)}; valid keys: {', '.join(valid)}")
        if last:
            if here[:1] == ["steps"] and len(here) == 2 and token == "method":
                _switch_method(node, value)
            else:
                node[token] = value
            return
        child = node[token] if isinstance(token, int) else node.get(token)
        if child is None:  # e.g. data.samples=64 on a recipe without data: start an empty section
            child = {}
            node[token] = child
        node = child


def _switch_method(step: dict[str, Any], name: Any) -> None:
    """Set a step's method, keeping the keys the new method also has (its defaults fill the rest)."""
    from .api import methods

    method = methods().get(name) if isinstance(name, str) else None
    if method is not None:
        keep = {f.name for f in dataclasses.fields(method.config)}
        for key in [k for k in step if k != "method" and k not in keep]:
            del step[key]
    step["method"] = name
