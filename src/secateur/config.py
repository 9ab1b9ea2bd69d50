"""Step configs: frozen dataclasses, validated on construction, to and from plain dicts.

A step config holds data only. Its fields are declared with :func:`param`, which records the
documentation, the valid range or choices, and the default::

    @dataclass(frozen=True)
    class MagnitudeConfig(TargetedConfig):
        sparsity: float = param(0.5, "fraction of weights set to zero", range=(0.0, 1.0))

Types come from the annotations (bool, int, float, str, Literal[...], tuple[str, ...],
dict[str, float], Optional[...]); values are checked and lists become tuples so that configs stay
hashable. The method name is a class attribute set by :func:`secateur.api.register`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from .errors import ConfigError, did_you_mean


def param(default: Any, doc: str, *, range: tuple[float, float] | None = None,
          choices: tuple[Any, ...] | None = None) -> Any:
    """Declare a config field with its documentation and constraints."""
    meta = {"doc": doc, "range": range, "choices": choices}
    if isinstance(default, (list, dict, set)):
        if isinstance(default, dict):
            return field(default_factory=lambda: dict(default), metadata=meta)
        frozen = tuple(default)
        return field(default_factory=lambda: frozen, metadata=meta)
    return field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping {_type_name(k)} -> {_type_name(v)}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def check_value(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it normalised (lists -> tuples)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = did_you_mean(str(value), [str(a) for a in allowed])
            raise ConfigError(path, f"got {value!r}, expected one of {', '.join(repr(a) for a in allowed)}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return check_value(value, option, path)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(path, f"got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(path, f"got {value!r}, expected null")
        return None
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(check_value(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")
        kt, vt = typing.get_args(tp)
        return {check_value(k, kt, path): check_value(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"got {value!r} ({type(value).__name__}), expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"got {value!r} ({type(value).__name__}), expected an integer")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(path, f"got {value!r} ({type(value).__name__}), expected {tp.__name__}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


@dataclass(frozen=True)
class StepConfig:
    """Base of every step config. Subclasses are frozen dataclasses declared with :func:`param`."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = check_value(getattr(self, f.name), hints[f.name], f.name)
            lo_hi = f.metadata.get("range")
            if lo_hi is not None and value is not None:
                lo, hi = lo_hi
                values = value.values() if isinstance(value, dict) else [value]
                for v in values:
                    if not (lo <= v <= hi):
                        raise ConfigError(f.name, f"got {v!r}, expected a value in [{lo}, {hi}]")
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(f.name, f"got {value!r}, expected one of {', '.join(map(repr, choices))}"
                                  f"{did_you_mean(str(value), map(str, choices))}")
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise :class:`ConfigError` naming the field."""

    # --- plain-dict round trip -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = "") -> "StepConfig":
        """Build from a mapping (without or with a matching ``method`` key); errors name ``path``."""
        prefix = f"{path}." if path else ""
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ConfigError(f"{prefix}method", f"got {method!r}, expected {cls.method!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"{prefix}{key}", f"unknown key for method '{cls.method}'"
                                  f"{did_you_mean(str(key), names)}; valid keys: {', '.join(names)}")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc.path}", str(exc).split(": ", 1)[-1]) from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def changed(self) -> dict[str, Any]:
        """The fields set away from their defaults."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != _default_of(f)}

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """Field name, type, default, constraints and doc, for ``secateur explain``."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            rows.append({"name": f.name, "type": _type_name(hints[f.name]), "default": _default_of(f),
                         "range": f.metadata.get("range"), "choices": f.metadata.get("choices"),
                         "doc": f.metadata.get("doc", "")})
        return rows


def _default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


@dataclass(frozen=True)
class TargetedConfig(StepConfig):
    """A step that touches a set of modules: see :mod:`secateur.targets` for the syntax."""

    targets: tuple[str, ...] = param(("Linear",), "modules to touch: a class name, an exact module name, or 're:<regex>' on the name")
    ignore: tuple[str, ...] = param(("lm_head",), "modules never touched (same syntax); embeddings are never touched by weight pruning")


@dataclass(frozen=True)
class CalibratedConfig(TargetedConfig):
    """A step that runs on the block-sequential calibration loop (:mod:`secateur.calibrate`)."""

    propagate: Literal["compressed", "dense"] = param(
        "compressed", "next block's inputs: outputs of the compressed block, or of the dense one")
    activation_dtype: Literal["float32", "bfloat16"] = param(
        "float32", "dtype in which calibration activations are stored between blocks")
    offload: bool = param(False, "keep calibration activations on disk instead of in memory")
    batch_size: int = param(8, "calibration sequences per forward pass", range=(1, 4096))
    compute_dtype: Optional[Literal["float32", "bfloat16"]] = param(
        None, "dtype of the calibration forward passes (bfloat16 is ~2.5x faster on CPUs with AVX-512 BF16); "
              "statistics still accumulate in float32 and weights are rewritten in their own dtype")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: Any, path: str) -> int:
    """``12345``, ``"2MB"``, ``"1.5 GiB"`` -> bytes; anything else is a ConfigError naming ``path``."""
    if isinstance(value, bool):
        raise ConfigError(path, f"got {value!r}, expected a size such as 2000000, '2MB' or '1.5GiB'")
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            number = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if number >= 1:
                return int(number)
    raise ConfigError(path, f"got {value!r}, expected a positive size such as 2000000, '2MB' or '1.5GiB' "
                            f"(units: {', '.join(u for u in _UNITS if u)})")
