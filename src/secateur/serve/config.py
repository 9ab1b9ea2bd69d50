"""``serve.yaml``: what the gateway serves and how, as frozen dataclasses validated on read.

Every key is optional; a file holds only what it changes::

    default: fast                  # the model a request for the family itself gets when no policy
                                   #   decides; a tier, an alias or a variant name (default: the
                                   #   first tier, else the alias 'default', else the oldest variant)
    tiers:                         # names a request's `model` may use, cheapest first
      small: stories@fast          #   each an alias (`fast`, `stories@fast`), a variant name
      large: base                  #   (`base`, `stories/base`) or a variant id (`v-…`), or an
      remote:                      #   OpenAI-compatible upstream (vLLM, another gateway) that
        url: http://127.0.0.1:9001/v1   # requests of this tier are forwarded to
        model: stories@base        #   the upstream's own name for the model
        api_key_env: UPSTREAM_KEY  #   optional: the environment variable holding its bearer key
        timeout_s: 30              #   optional: seconds per forwarded request (default: limits.timeout_s)
    policy:                        # who answers a request for the family itself (`model: stories`)
      kind: static                 #   static | fallback | a user class `package.module:Class`
      weights: {small: 3, large: 1}
      seed: 0
    batching: {window_ms: 3, max_batch: 16}
    limits: {max_body_bytes: 1048576, max_tokens: 512, default_max_tokens: 16, timeout_s: 60,
             max_concurrency: 64, retry_after_s: 1}
    preload: [large]               # tiers loaded at start beside the default (others on first use)
    refresh_s: 1                   # how often alias moves in the registry are picked up
    unload_idle_s: 10              # a variant nothing points at any more is unloaded once idle this long
    admin: {enabled: true}         # /admin/state, /admin/policy, /admin/refresh (bearer token:
                                   #   SECATEUR_ADMIN_TOKEN or admin.token; loopback only by default)
    access_log: serve-access.jsonl # one JSON line per request (default: standard error)

An unknown key is a one-line error naming the key, a did-you-mean and the valid keys, as recipes
have. Policy options other than ``kind`` are the policy class's own keyword arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..errors import ConfigError, SecateurError, did_you_mean

MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class Batching:
    """Requests for one variant that arrive within ``window_ms`` of an idle worker start together;
    at most ``max_batch`` sequences (or texts to embed) share a forward pass."""

    window_ms: float = 3.0
    max_batch: int = 16

    def __post_init__(self) -> None:
        _number("batching.window_ms", self.window_ms, 0, 1000)
        _integer("batching.max_batch", self.max_batch, 1, 1024)


@dataclass(frozen=True)
class Limits:
    """Bounds on a request: body bytes (413), tokens a completion may ask for (400 above
    ``max_tokens``; ``default_max_tokens`` when it asks for none), seconds before a 504, requests in
    flight before a 429 (with ``Retry-After: retry_after_s``), and texts in one embeddings call."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 512
    default_max_tokens: int = 16
    timeout_s: float = 60.0
    max_concurrency: int = 64
    retry_after_s: int = 1
    max_inputs: int = 256
    max_embedding_length: int = 256

    def __post_init__(self) -> None:
        _integer("limits.max_body_bytes", self.max_body_bytes, 64, 1 << 30)
        _integer("limits.max_tokens", self.max_tokens, 1, 1 << 20)
        _integer("limits.default_max_tokens", self.default_max_tokens, 1, self.max_tokens)
        _number("limits.timeout_s", self.timeout_s, 0.001, 86400)
        _integer("limits.max_concurrency", self.max_concurrency, 1, 1 << 20)
        _integer("limits.retry_after_s", self.retry_after_s, 0, 3600)
        _integer("limits.max_inputs", self.max_inputs, 1, 1 << 16)
        _integer("limits.max_embedding_length", self.max_embedding_length, 2, 1 << 16)


@dataclass(frozen=True)
class Upstream:
    """A tier served by another OpenAI-compatible server: ``url`` is its base (``…/v1``), ``model``
    the name it knows the model by; its bearer key (if any) is read from ``api_key_env``."""

    url: str
    model: str
    api_key_env: Optional[str] = None
    timeout_s: Optional[float] = None
    where: str = field(default="upstream", compare=False, repr=False)

    def __post_init__(self) -> None:
        from urllib.parse import urlsplit

        if not isinstance(self.url, str) or not self.url:
            raise ConfigError(f"{self.where}.url", f"expected an http(s) URL such as http://127.0.0.1:9001/v1, "
                                                   f"got {self.url!r}")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{self.where}.url", f"expected an http:// or https:// URL with a host, got {self.url!r}")
        if parts.query or parts.fragment:
            raise ConfigError(f"{self.where}.url", "the base URL takes no query or fragment")
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"{self.where}.model", f"expected the upstream's model name, got {self.model!r}")
        if self.api_key_env is not None and (not isinstance(self.api_key_env, str) or not self.api_key_env):
            raise ConfigError(f"{self.where}.api_key_env", f"expected an environment variable name, got "
                                                           f"{self.api_key_env!r}")
        if self.timeout_s is not None:
            _number(f"{self.where}.timeout_s", self.timeout_s, 0.001, 86400)

    @property
    def id(self) -> str:
        """The tier's variant id in headers, logs and metrics."""
        return f"upstream:{self.url.rstrip('/')}#{self.model}"

    def key(self) -> Optional[str]:
        if self.api_key_env is None:
            return None
        value = os.environ.get(self.api_key_env)
        if not value:
            raise SecateurError(f"upstream {self.url}: the environment variable {self.api_key_env} (api_key_env) "
                                "is not set")
        return value


UPSTREAM_PREFIX = "upstream:"
ADMIN_TOKEN_ENV = "SECATEUR_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Admin:
    """The admin API (``/admin/...``): off unless ``enabled``; every call needs ``Authorization:
    Bearer <token>``, the token read from the environment variable ``token_env`` or given as
    ``token``; calls from another host than the loopback get 403 unless ``allow_remote``."""

    enabled: bool = False
    token: Optional[str] = None
    token_env: str = ADMIN_TOKEN_ENV
    allow_remote: bool = False

    def __post_init__(self) -> None:
        for key in ("enabled", "allow_remote"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"admin.{key}", f"expected true or false, got {getattr(self, key)!r}")
        if self.token is not None and not isinstance(self.token, str):
            raise ConfigError("admin.token", "expected a string")
        if not isinstance(self.token_env, str) or not self.token_env:
            raise ConfigError("admin.token_env", f"expected the name of an environment variable, got {self.token_env!r}")

    def secret(self) -> str:
        """The bearer token; a one-line error when the admin API is on without a usable one."""
        token = self.token if self.token is not None else os.environ.get(self.token_env)
        if not token:
            raise SecateurError(f"the admin API (admin.enabled) needs a bearer token: set {self.token_env} or "
                                "admin.token in serve.yaml (or turn admin.enabled off)")
        if len(token) < MIN_TOKEN_CHARS:
            raise SecateurError(f"the admin token is {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)")
        return token


@dataclass(frozen=True)
class ServeConfig:
    default: Optional[str] = None
    tiers: Mapping[str, Union[str, Upstream]] = field(default_factory=dict)
    policy: Mapping[str, Any] = field(default_factory=lambda: {"kind": "static"})
    batching: Batching = field(default_factory=Batching)
    limits: Limits = field(default_factory=Limits)
    preload: tuple[str, ...] = ()
    refresh_s: float = 1.0
    unload_idle_s: float = 10.0
    admin: Admin = field(default_factory=Admin)
    access_log: Optional[str] = None

    def __post_init__(self) -> None:
        if self.default is not None and (not isinstance(self.default, str) or not self.default):
            raise ConfigError("default", f"expected a tier, alias or variant name, got {self.default!r}")
        if not isinstance(self.tiers, Mapping):
            raise ConfigError("tiers", f"expected a mapping of tier name to alias or variant, got {self.tiers!r}")
        for name, ref in self.tiers.items():
            if not isinstance(name, str) or not name or "@" in name or "/" in name:
                raise ConfigError(f"tiers.{name}", "a tier name is a plain word (no '@' or '/')")
            if not isinstance(ref, Upstream) and (not isinstance(ref, str) or not ref):
                raise ConfigError(f"tiers.{name}", f"expected an alias, variant name or id, or an upstream "
                                                   f"{{url: ..., model: ...}}, got {ref!r}")
        if not isinstance(self.policy, Mapping) or not isinstance(self.policy.get("kind", "static"), str):
            raise ConfigError("policy", f"expected a mapping with a 'kind' (static, fallback or "
                                        f"package.module:Class), got {self.policy!r}")
        for name in self.preload:
            if name not in self.tiers:
                raise ConfigError("preload", f"unknown tier '{name}'{did_you_mean(str(name), self.tiers)}; "
                                             f"tiers: {', '.join(self.tiers) or 'none'}")
        _number("refresh_s", self.refresh_s, 0.0, 86400)
        _number("unload_idle_s", self.unload_idle_s, 0.0, 86400 * 365)

    @classmethod
    def from_dict(cls, raw: Any) -> "ServeConfig":
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ConfigError("", f"a serve config is a mapping of keys, got {type(raw).__name__}")
        _reject_unknown(raw, [f.name for f in fields(cls)], "")
        kwargs = dict(raw)
        for key, kind in (("batching", Batching), ("limits", Limits), ("admin", Admin)):
            if key in kwargs:
                value = kwargs[key] if kwargs[key] is not None else {}
                if not isinstance(value, Mapping):
                    raise ConfigError(key, f"expected a mapping, got {value!r}")
                _reject_unknown(value, [f.name for f in fields(kind)], key)
                kwargs[key] = kind(**value)
        if "tiers" in kwargs:
            tiers = kwargs["tiers"] or {}
            if isinstance(tiers, Mapping):
                tiers = dict(tiers)
                for name, ref in tiers.items():
                    if isinstance(ref, Mapping):
                        where = f"tiers.{name}"
                        _reject_unknown(ref, ["url", "model", "api_key_env", "timeout_s"], where)
                        missing = [k for k in ("url", "model") if k not in ref]
                        if missing:
                            raise ConfigError(f"{where}.{missing[0]}", "an upstream tier needs url and model")
                        tiers[name] = Upstream(**ref, where=where)
            kwargs["tiers"] = tiers
        if "policy" in kwargs:
            policy = kwargs["policy"]
            kwargs["policy"] = {"kind": policy} if isinstance(policy, str) else (policy or {"kind": "static"})
        if "preload" in kwargs:
            preload = kwargs["preload"] or []
            if isinstance(preload, str):
                preload = [preload]
            if not isinstance(preload, list):
                raise ConfigError("preload", f"expected a list of tier names, got {preload!r}")
            kwargs["preload"] = tuple(preload)
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ServeConfig":
        """Read a ``.yaml``/``.yml``/``.json`` serve config; every problem is one line naming the file."""
        import yaml

        p = Path(path).expanduser()
        if not p.is_file():
            raise SecateurError(f"serve config '{path}' does not exist or is not a file")
        if p.suffix.lower() not in (".yaml", ".yml", ".json"):
            raise SecateurError(f"serve config '{path}' has suffix '{p.suffix}'; expected .yaml, .yml or .json")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise SecateurError(f"serve config '{path}' is over {MAX_CONFIG_BYTES} bytes")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            raise SecateurError(f"serve config '{path}' is not valid YAML{line}: "
                                f"{getattr(exc, 'problem', None) or exc}") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(exc.path, f"{str(exc).split(': ', 1)[-1]} (in {path})") from None
        except TypeError as exc:  # a dataclass given a value of the wrong shape
            raise SecateurError(f"serve config '{path}': {exc}") from None


def _reject_unknown(data: Mapping[str, Any], valid: list[str], path: str) -> None:
    for key in data:
        if key not in valid:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(where, f"unknown key{did_you_mean(str(key), valid)}; valid keys: {', '.join(valid)}")


def _number(path: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(path, f"expected a number in [{low}, {high}], got {value!r}")


def _integer(path: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(path, f"expected an integer in [{low}, {high}], got {value!r}")
