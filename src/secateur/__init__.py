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
    "load": "secateur.artifacts",
    "Loaded": "secateur.artifacts",
    "save": "secateur.artifacts",
    "Recipe": "secateur.recipe",
    "StepConfig": "secateur.config",
    "SecateurError": "secateur.errors",
    "MagnitudeConfig": "secateur.prune.magnitude",
    "WandaConfig": "secateur.prune.wanda",
    "SparseGPTConfig": "secateur.prune.sparsegpt",
    "StructuredConfig": "secateur.prune.structured",
    "RTNConfig": "secateur.quant.rtn",
    "GPTQConfig": "secateur.quant.gptq",
    "AWQConfig": "secateur.quant.awq",
    "SmoothQuantConfig": "secateur.quant.smoothquant",
    "FP8Config": "secateur.quant.fp8",
    "MixedPrecisionConfig": "secateur.quant.mixed",
    "DistillConfig": "secateur.distill.distill",
    "QATConfig": "secateur.distill.qat",
    "GradualConfig": "secateur.distill.gradual",
    "fuse_encoder": "secateur.runtime.fused_encoder",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("testing",):
        return importlib.import_module(f"secateur.{name}")
    raise AttributeError(f"module 'secateur' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
