"""secateur: make neural networks smaller and measurably faster.

The public surface. Names are imported lazily so that ``import secateur`` stays light: it imports
neither transformers nor any optional dependency, and logs nothing.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from ._version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

_EXPORTS = {
    "compress_": "secateur.api",
    "register": "secateur.api",
    "methods": "secateur.api",
    "Context": "secateur.api",
    "load": "secateur.registry",  # artifacts.load, plus registry refs (stories@fast)
    "Registry": "secateur.registry",
    "Loaded": "secateur.artifacts",
    "save": "secateur.artifacts",
    "Recipe": "secateur.recipe",
    "StepConfig": "secateur.config",
    "SecateurError": "secateur.errors",
    "fuse_encoder": "secateur.runtime.fused_encoder",
    "optimize_": "secateur.runtime",
}


def _configs() -> dict[str, Any]:
    """Every method's config class by name (MagnitudeConfig, GPTQConfig, …), from the one method table."""
    from .api import methods

    return {spec.config.__name__: spec.config for spec in methods().values()}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "__all__":
        return ["__version__", *_EXPORTS, *_configs()]
    if name.endswith("Config") and name != "StepConfig":
        configs = _configs()
        if name in configs:
            return configs[name]
    if name in ("testing",):
        return importlib.import_module(f"secateur.{name}")
    raise AttributeError(f"module 'secateur' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(["__version__", *_EXPORTS, *_configs()])
