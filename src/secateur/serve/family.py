"""The family being served: which names a request's ``model`` may use, what they resolve to, and the
loaded variants.

A name resolves, in this order, to: the family itself (or ``auto``) — routed by the policy; a tier
of serve.yaml; an alias (``fast`` or ``stories@fast``); a variant name (``base`` or
``stories/base``); a variant id of this family (``v-…``). Aliases and tiers are re-read from the
registry every ``refresh_s`` seconds, so an alias moved with ``secateur registry alias`` or
``rollback`` reaches new requests without a restart (requests already running finish on the
variant they started on).

Variants are loaded from their artifact in the registry's store (:func:`secateur.artifacts.load`)
and given the runtime's fastest eager form (:func:`secateur.runtime.optimize_`); one
:class:`~secateur.serve.engine.Engine` per variant id, however many names point at it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import SecateurError, did_you_mean, one_of
from ..registry import Registry, RegistryError
from .config import ServeConfig
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


class Family:
    """The served family's names and its loaded engines (see the module text)."""

    def __init__(self, name: str, config: ServeConfig, home: Union[str, Path, None] = None,
                 observe: Any = None):
        self.name, self.config, self.home, self.observe = name, config, home, observe
        self.engines: dict[str, Engine] = {}
        self.failed: dict[str, str] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.refreshed = 0.0
        self.refresh()

    # --- names -------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read variants and aliases from the registry and re-resolve the tiers."""
        with open_registry(self.home) as registry:
            families = registry.families()
            if self.name not in families:
                raise SecateurError(f"unknown family '{self.name}'{did_you_mean(self.name, families)}; "
                                    f"families in {registry.home}: {one_of(families) if families else 'none'}")
            variants = registry.list(self.name)
            aliases = {a.name: a.variant_id for a in registry.aliases(self.name)} if variants else {}
            if not variants:
                raise SecateurError(f"family '{self.name}' has no variants to serve")
            tiers = {}
            for tier, ref in self.config.tiers.items():
                try:
                    tiers[tier] = self._lookup(ref, variants, aliases)
                except SecateurError as exc:
                    raise SecateurError(f"serve config: tier '{tier}': {exc}") from None
        self.variants = {v.id: v for v in variants}
        self.by_name = {v.name: v.id for v in variants}
        self.aliases, self.tiers = aliases, tiers
        self.default = self._default()
        self.default_variant = self.resolve(self.default)[1]
        self.refreshed = time.monotonic()

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

    def _default(self) -> str:
        if self.config.default:
            if self.config.default not in self.names():
                raise SecateurError(f"serve config: default '{self.config.default}' is no tier, alias or variant "
                                    f"of '{self.name}'{did_you_mean(self.config.default, self.names())}; "
                                    f"valid: {one_of(self.names())}")
            return self.config.default
        if self.tiers:
            return next(iter(self.tiers))
        if "default" in self.aliases:
            return "default"
        return next(iter(self.variants.values())).name

    def names(self) -> list[str]:
        """Every name a request's ``model`` may use (besides the family itself and ``auto``)."""
        out = list(self.tiers)
        out += [a for a in self.aliases if a not in out]
        out += [f"{self.name}@{a}" for a in self.aliases]
        out += [n for n in self.by_name if n not in out]
        return out

    def resolve(self, model: str) -> tuple[str, str]:
        """(tier or name, variant id) for a pinned name; ``(ROUTED, "")`` when the policy decides.
        Raises :class:`KeyError` with the valid names for an unknown one."""
        if model in (self.name, ROUTED):
            return ROUTED, ""
        if model in self.tiers:
            return model, self.tiers[model]
        family, sep, alias = model.partition("@")
        if sep and family == self.name and alias in self.aliases:
            return alias, self.aliases[alias]
        if model in self.aliases:
            return model, self.aliases[model]
        name = model.split("/", 1)[1] if model.startswith(f"{self.name}/") else model
        if name in self.by_name:
            return name, self.by_name[name]
        if model in self.variants:
            return model, model
        raise KeyError(model)

    def view(self) -> FamilyView:
        return FamilyView(self.name, self.tiers, self.aliases, self.default, self.default_variant)

    # --- engines ---------------------------------------------------------------------------
    def engine(self, variant_id: str) -> Optional[Engine]:
        return self.engines.get(variant_id)

    def load(self, variant_id: str) -> Engine:
        """The engine of ``variant_id``, loading it first if needed (blocking; one load at a time
        per variant, concurrent callers wait for it)."""
        if variant_id in self.engines:
            return self.engines[variant_id]
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
        from .. import artifacts
        from ..runtime import describe, optimize_

        start = time.perf_counter()
        loaded = artifacts.load(variant.path)
        if loaded.tokenizer is None:
            raise SecateurError(f"variant {variant.ref} ({variant.id}) has no tokenizer; serving needs one "
                                "(save the artifact with its tokenizer)")
        model = optimize_(loaded.model.eval())
        kind = loaded.arch.kind if loaded.arch is not None else None
        batching = self.config.batching
        common = {"window_ms": batching.window_ms, "max_batch": batching.max_batch, "observe": self.observe}
        if kind == "encoder":
            engine: Engine = EncoderEngine(variant.id, model, loaded.tokenizer,
                                           max_length=self.config.limits.max_embedding_length, **common)
        elif kind == "causal" or hasattr(model, "generate"):
            engine = LMEngine(variant.id, model, loaded.tokenizer, **common)
        else:
            raise SecateurError(f"variant {variant.ref} is a {type(model).__name__}; the gateway serves causal LMs "
                                "(completions, chat) and encoders (embeddings)")
        log.info("loaded %s (%s) as a %s engine in %.2f s (%s)", variant.ref, variant.id, engine.kind,
                 time.perf_counter() - start, describe(model))
        return engine

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


__all__ = ["Family", "ROUTED", "open_registry"]
