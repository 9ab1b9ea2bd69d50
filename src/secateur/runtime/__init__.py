"""The runtime room: how a compressed model executes.

``QuantLinear`` (``linear.py``) holds quantized weights and runs them through the kernel that
measured fastest on this machine (``dispatch.py``, ``kernels.py``, the native C++ build in
``native.py`` + ``csrc/``); linked sibling GEMVs (``siblings.py``), the compiled decoder
(``compiled.py``), decode attention (``decode_attention.py``) and the fused encoder blocks
(``fused_encoder.py``) make a whole model fast. Evaluation, serving and export use these; none of
them swaps modules on its own. A caller that wants the fastest eager form of a model asks for it::

    from secateur.runtime import optimize_, describe
    optimize_(model)          # W8A8 post-norm encoders get fused blocks; other models are unchanged
    describe(model)           # 'eager, 6 fused encoder blocks' — evaluation records this string

This room imports only ``models/`` and the ground floor (errors, settings).
"""

from __future__ import annotations

from typing import Any


def optimize_(model: Any) -> Any:
    """Give ``model`` the runtime's fastest eager form, in place, and return it: today, fused
    blocks for a W8A8 post-norm encoder (same integers, fewer passes; outputs match the
    module-by-module model to quantization noise). Idempotent; other models are left as they are."""
    from .fused_encoder import fuse_encoder

    fuse_encoder(model)
    return model


def describe(model: Any) -> str:
    """How ``model`` runs, in a few words, for evaluation settings: ``eager`` or
    ``eager, N fused encoder blocks``."""
    fused = sum(1 for m in model.modules() if hasattr(m, "_secateur_fused"))
    return f"eager, {fused} fused encoder blocks" if fused else "eager"


def sync(device: Any) -> None:
    """Wait for ``device``'s queued work (CUDA); CPU work is already done when a call returns."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_argument(model: Any) -> str:
    """The name under which ``model``'s forward takes its KV cache: ``cache`` since transformers
    5.x (``past_key_values`` is deprecated there and removed in 5.40), ``past_key_values`` before."""
    import inspect

    forward = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


__all__ = ["optimize_", "describe", "sync", "cache_argument", "output_cache"]
