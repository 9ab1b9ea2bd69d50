"""The family being served: which names a request's ``model`` may use, what they resolve to, and the
loaded variants.

A name resolves, in this order, to: the family itself (or ``auto``) — routed by the policy; a tier
of serve.yaml; an alias (``fast`` or ``stories@fast``); a variant name (``base`` or
``stories/base``); a variant id of this family (``v-…``). Aliases and tiers are re-read from the
registry every ``refresh_s`` seconds, so an alias moved with ``secateur registry alias`` or
``rollback`` reaches new requests without a restart (requests already running finish on the
variant they started on). The poll is cheap: SQLite's ``data_version`` says whether anyone wrote
to the registry since the last reading, and only then are the names read again, as one
:class:`Names` snapshot swapped whole.

A request *holds* the variant it runs on (:meth:`Family.hold` / :meth:`Family.let_go`); a loaded
variant that no tier, alias or default points at any more, that nobody holds and that has been
idle ``unload_idle_s`` seconds is unloaded (:meth:`Family.sweep`).

Variants are loaded from their artifact in the registry's store (:func:`secateur.artifacts.load`)
and given the runtime's fastest eager form (:func:`secateur.runtime.optimize_`); one
:class:`~secateur.serve.engine.Engine` per variant id, however many names point at it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import SecateurError, did_you_mean, one_of
from ..registry import Registry, RegistryError
from .config import ServeConfig, Upstream
from .engine import EncoderEngine, Engine, LMEngine
from .policy import FamilyView

log = logging.getLogger(__name__)

ROUTED = "auto"


def open_registry(home: Union[str, Path, None]) -> Registry:
    registry = Registry.existing(home)
    if registry is None:
        from ..settings import home as default_home

        raise SecateurError(f"no registry in {home or default_home()}; register variants first with "
                            "`secateur registry add DIR --family NAME` (or set SECATEUR_HOME)")
    return registry


@dataclass(frozen=True)
class Names:
    """One consistent reading of the registry: the family's variants, aliases and the resolved
    tiers and default. Swapped whole, so a request never sees half of a refresh."""

    variants: dict[str, Any]
    by_name: dict[str, str]
    aliases: dict[str, str]
    tiers: dict[str, str]
    default: str
    default_variant: str


class Family:
    """The served family's names and its loaded engines (see the module text)."""

    def __init__(self, name: str, config: ServeConfig, home: Union[str, Path, None] = None,
                 observe: Any = None, build: Any = None):
        self.name, self.config, self.home, self.observe = name, config, home, observe
        self.build = build  # variant -> Engine, instead of loading it here (the Ray backend's remote engines)
        self.engines: dict[str, Engine] = {}
        self.failed: dict[str, str] = {}
        self.active: dict[str, int] = {}       # variant id -> requests holding it
        self.idle_since: dict[str, float] = {}  # variant id -> when its last holder let go
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._registry = open_registry(home)
        self.upstreams: dict[str, Upstream] = {ref.id: ref for ref in config.tiers.values() if isinstance(ref, Upstream)}
        self._seen: Optional[int] = None
        self.refreshed = 0.0
        self.version = 0  # how many times the names changed since start
        self.refresh(force=True)

    # the current names (one snapshot; see Names)
    variants = property(lambda self: self._names.variants)
    by_name = property(lambda self: self._names.by_name)
    aliases = property(lambda self: self._names.aliases)
    tiers = property(lambda self: self._names.tiers)
    default = property(lambda self: self._names.default)
    default_variant = property(lambda self: self._names.default_variant)

    # --- names -------------------------------------------------------------------------------
    def _data_version(self) -> int:
        """SQLite's ``data_version`` of our own connection: it changes when another connection
        (``secateur registry alias`` in another process) commits, so an unchanged value means
        there is nothing to re-read."""
        return int(self._registry.db.read(lambda c: c.execute("PRAGMA data_version").fetchone()[0]))

    def refresh(self, force: bool = False) -> bool:
        """Re-read variants and aliases from the registry and re-resolve the tiers when the registry
        changed since the last reading (or ``force``). True when the names changed."""
        seen = self._data_version()
        if not force and seen == self._seen:
            self.refreshed = time.monotonic()
            return False
        registry = self._registry
        families = registry.families()
        if self.name not in families:
            raise SecateurError(f"unknown family '{self.name}'{did_you_mean(self.name, families)}; "
                                f"families in {registry.home}: {one_of(families) if families else 'none'}")
        variants = registry.list(self.name)
        if not variants:
            raise SecateurError(f"family '{self.name}' has no variants to serve")
        aliases = {a.name: a.variant_id for a in registry.aliases(self.name)}
        tiers = {}
        for tier, ref in self.config.tiers.items():
            if isinstance(ref, Upstream):  # served elsewhere: never looked up, loaded or unloaded here
                tiers[tier] = ref.id
                continue
            try:
                tiers[tier] = self._lookup(ref, variants, aliases)
            except SecateurError as exc:
                raise SecateurError(f"serve config: tier '{tier}': {exc}") from None
        by_id = {v.id: v for v in variants}
        by_name = {v.name: v.id for v in variants}
        default = self._default(tiers, aliases, by_id, by_name)
        probe = Names(by_id, by_name, aliases, tiers, default, "")
        default_variant = self._resolve(probe, default)[1]
        names = Names(by_id, by_name, aliases, tiers, default, default_variant)
        old = getattr(self, "_names", None)
        changed = old is None or (old.aliases, old.tiers, old.default_variant, list(old.variants)) != \
            (aliases, tiers, default_variant, list(by_id))
        if old is not None and changed:
            for kind, before, after in (("alias", old.aliases, aliases), ("tier", old.tiers, tiers)):
                for key in sorted(set(before) | set(after)):
                    if before.get(key) != after.get(key):
                        log.info("%s %s: %s -> %s (new requests)", kind, key, before.get(key), after.get(key))
        self._names = names
        self._seen = seen
        if changed:
            self.version += 1
        self.refreshed = time.monotonic()
        return changed

    def _lookup(self, ref: str, variants: list[Any], aliases: dict[str, str]) -> str:
        family, sep, alias = ref.partition("@")
        if sep and family == self.name and alias in aliases:
            return aliases[alias]
        if ref in aliases:
            return aliases[ref]
        name = ref.split("/", 1)[1] if ref.startswith(f"{self.name}/") else ref
        for v in variants:
            if v.name == name or v.id == ref:
                return v.id
        valid = list(aliases) + [v.name for v in variants]
        raise SecateurError(f"'{ref}' is no alias, variant name or id of family '{self.name}'"
                            f"{did_you_mean(ref, valid)}; valid: {one_of(valid)}")

    def _default(self, tiers: dict[str, str], aliases: dict[str, str], variants: dict[str, Any],
                 by_name: dict[str, str]) -> str:
        if self.config.default:
            valid = self._all_names(tiers, aliases, by_name)
            if self.config.default not in valid:
                raise SecateurError(f"serve config: default '{self.config.default}' is no tier, alias or variant "
                                    f"of '{self.name}'{did_you_mean(self.config.default, valid)}; "
                                    f"valid: {one_of(valid)}")
            return self.config.default
        if tiers:
            return next(iter(tiers))
        if "default" in aliases:
            return "default"
        return next(iter(variants.values())).name

    def names(self) -> list[str]:
        """Every name a request's ``model`` may use (besides the family itself and ``auto``)."""
        return self._all_names(self.tiers, self.aliases, self.by_name)

    def _all_names(self, tiers: dict[str, str], aliases: dict[str, str], by_name: dict[str, str]) -> list[str]:
        out = list(tiers)
        out += [a for a in aliases if a not in out]
        out += [f"{self.name}@{a}" for a in aliases]
        out += [n for n in by_name if n not in out]
        return out

    def resolve(self, model: str) -> tuple[str, str]:
        """(tier or name, variant id) for a pinned name; ``(ROUTED, "")`` when the policy decides.
        Raises :class:`KeyError` with the valid names for an unknown one."""
        return self._resolve(self._names, model)

    def _resolve(self, names: Names, model: str) -> tuple[str, str]:
        if model in (self.name, ROUTED):
            return ROUTED, ""
        if model in names.tiers:
            return model, names.tiers[model]
        family, sep, alias = model.partition("@")
        if sep and family == self.name and alias in names.aliases:
            return alias, names.aliases[alias]
        if model in names.aliases:
            return model, names.aliases[model]
        name = model.split("/", 1)[1] if model.startswith(f"{self.name}/") else model
        if name in names.by_name:
            return name, names.by_name[name]
        if model in names.variants:
            return model, model
        raise KeyError(model)

    def view(self) -> FamilyView:
        names = self._names
        return FamilyView(self.name, names.tiers, names.aliases, names.default, names.default_variant)

    def referenced(self) -> set[str]:
        """Variant ids some tier, alias or the default points at now."""
        names = self._names
        return set(names.tiers.values()) | set(names.aliases.values()) | {names.default_variant}

    # --- holding and unloading -----------------------------------------------------------------
    def hold(self, variant_id: str) -> None:
        """A request is about to use ``variant_id``: it is not unloaded until :meth:`let_go`.
        (Called on the event loop, as :meth:`let_go` and :meth:`sweep` are.)"""
        self.active[variant_id] = self.active.get(variant_id, 0) + 1

    def let_go(self, variant_id: str) -> None:
        left = self.active.get(variant_id, 0) - 1
        if left > 0:
            self.active[variant_id] = left
        else:
            self.active.pop(variant_id, None)
            self.idle_since[variant_id] = time.monotonic()

    def sweep(self, idle_s: float) -> list[str]:
        """Unload every engine no tier, alias or default points at any more, that no request holds and
        that has been idle ``idle_s`` seconds; its worker stops and its memory goes with the last
        reference. Returns the variant ids unloaded."""
        keep, now, gone = self.referenced(), time.monotonic(), []
        for vid in list(self.engines):
            if vid in keep or self.active.get(vid, 0) > 0 or now - self.idle_since.get(vid, 0.0) < idle_s:
                continue
            engine = self.engines.pop(vid)
            engine.close()
            gone.append(vid)
            log.info("unloaded variant %s (no tier or alias points at it, no request holds it)", vid)
        return gone

    # --- engines ---------------------------------------------------------------------------
    def engine(self, variant_id: str) -> Optional[Engine]:
        return self.engines.get(variant_id)

    def upstream(self, variant_id: str) -> Optional[Upstream]:
        """The upstream a tier's variant id names, if it is one."""
        return self.upstreams.get(variant_id)

    def load(self, variant_id: str) -> Engine:
        """The engine of ``variant_id``, loading it first if needed (blocking; one load at a time
        per variant, concurrent callers wait for it)."""
        if variant_id in self.engines:
            return self.engines[variant_id]
        if variant_id in self.upstreams:
            raise SecateurError(f"{variant_id} is an upstream tier: it is served over HTTP, not loaded")
        with self._lock:
            lock = self._loading.setdefault(variant_id, threading.Lock())
        with lock:
            if variant_id in self.engines:
                return self.engines[variant_id]
            variant = self.variants.get(variant_id)
            if variant is None:
                with open_registry(self.home) as registry:
                    try:
                        variant = registry.resolve(variant_id)
                    except RegistryError as exc:
                        raise SecateurError(str(exc)) from None
            engine = self._build(variant)
            self.engines[variant_id] = engine
            self.failed.pop(variant_id, None)
            return engine

    async def aload(self, variant_id: str) -> Engine:
        engine = self.engines.get(variant_id)
        return engine if engine is not None else await asyncio.to_thread(self.load, variant_id)

    def _build(self, variant: Any) -> Engine:
        from ..runtime import describe

        if self.build is not None:
            return self.build(variant)
        start = time.perf_counter()
        model, tokenizer, kind = load_model(variant)
        batching = self.config.batching
        common = {"window_ms": batching.window_ms, "max_batch": batching.max_batch, "observe": self.observe}
        if kind == "encoder":
            engine: Engine = EncoderEngine(variant.id, model, tokenizer,
                                           max_length=self.config.limits.max_embedding_length, **common)
        else:
            engine = LMEngine(variant.id, model, tokenizer, **common)
        log.info("loaded %s (%s) as a %s engine in %.2f s (%s)", variant.ref, variant.id, engine.kind,
                 time.perf_counter() - start, describe(model))
        return engine

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self._registry.close()


def load_model(variant: Any) -> tuple[Any, Any, str]:
    """(model, tokenizer, kind) of a registered variant: loaded from its artifact and given the
    runtime's fastest eager form; ``kind`` is ``causal`` or ``encoder`` (anything else is refused)."""
    from .. import artifacts
    from ..runtime import optimize_

    loaded = artifacts.load(variant.path)
    if loaded.tokenizer is None:
        raise SecateurError(f"variant {variant.ref} ({variant.id}) has no tokenizer; serving needs one "
                            "(save the artifact with its tokenizer)")
    model = optimize_(loaded.model.eval())
    kind = loaded.arch.kind if loaded.arch is not None else None
    if kind == "encoder":
        return model, loaded.tokenizer, "encoder"
    if kind == "causal" or hasattr(model, "generate"):
        return model, loaded.tokenizer, "causal"
    raise SecateurError(f"variant {variant.ref} is a {type(model).__name__}; the gateway serves causal LMs "
                        "(completions, chat) and encoders (embeddings)")


__all__ = ["Family", "Names", "ROUTED", "open_registry", "load_model"]
