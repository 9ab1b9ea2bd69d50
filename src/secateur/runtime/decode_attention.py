"""Decode attention for the compiled runtime: one query token against the static KV cache.

:class:`~secateur.runtime.compiled.CompiledLM` preallocates the KV cache, so every decode step's
attention spans the whole cache and masks the positions not yet written. torch's flash kernel
reads all of them and pays a fixed cost per call that is large for a single query row; at batch 1
it was about a fifth of a compiled W8A8 decode step on the timing model (torch.profiler).

``secateur::decode_attention`` (``runtime/csrc/attention.cpp``) reads only the positions the mask
allows. It is registered as the Hugging Face attention implementation ``"secateur_decode"``
(``AttentionInterface``, with the sdpa mask builder), and :func:`decode_attention_forward`
falls back to transformers' sdpa function for everything it does not cover: more than one query
token (prefill), dropout, float masks, other dtypes or devices, head sizes that are not a
multiple of 16, and extras such as sinks, soft-capping or position biases. The result equals sdpa's
up to float rounding (tested against a float64 softmax).
"""

from __future__ import annotations

import math
from typing import Any

NAME = "secateur_decode"
_EXTRAS = ("softcap", "position_bias", "s_aux", "sinks", "sliding_window", "cache")


def decode_attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                             dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                             **kwargs: Any) -> tuple[Any, None]:
    """The ``AttentionInterface`` signature: ``query [B, H, q, D]``, ``key``/``value``
    ``[B, KVH, L, D]``; returns ``([B, q, H, D], None)`` like transformers' sdpa function."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    fits = (query.shape[2] == 1 and query.dtype == torch.float32 and key.dtype == torch.float32
            and value.dtype == torch.float32 and query.device.type == "cpu" and (not dropout or not module.training)
            and query.shape[-1] % 16 == 0 and key.shape[-1] == query.shape[-1] == value.shape[-1]
            and query.shape[1] % key.shape[1] == 0
            and (attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.dim() == 4))
            and not any(kwargs.get(name) is not None for name in _EXTRAS) and not kwargs.get("output_attentions"))
    if not fits:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    return torch.ops.secateur.decode_attention(query, key, value, attention_mask, float(scale)), None


def register() -> bool:
    """Register ``"secateur_decode"`` with transformers (idempotent); False without the native
    kernels (no compiler or no AVX-512), in which case nothing is registered."""
    from . import native

    if not native.available():
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, decode_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return True


def _bench(heads: int, kv_heads: int, head_dim: int, length: int) -> Any:
    """The dispatcher's ``make`` for one-token attention over a cache of ``length`` positions, half
    of them allowed: the native kernel against torch's sdpa (what the model would run otherwise)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, 1, head_dim, generator=g)
    k, v = (torch.randn(1, kv_heads, length, head_dim, generator=g) for _ in range(2))
    mask = torch.zeros(1, 1, 1, length, dtype=torch.bool)
    mask[..., : max(1, length // 2)] = True
    scale = 1.0 / math.sqrt(head_dim)

    def make(rows: int) -> dict[str, Any]:
        return {"native": lambda: torch.ops.secateur.decode_attention(q, k, v, mask, scale),
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                               enable_gqa=heads != kv_heads)}
    return make


def use_decode_attention(model: Any, max_len: int | None = None) -> bool:
    """Switch a model that runs transformers' sdpa attention to ``"secateur_decode"``; returns
    whether it did (other implementations, and machines without the kernels, are left alone).
    With ``max_len`` (the static cache's length) the switch happens only where the native kernel
    is measured faster than sdpa for the model's heads on that cache
    (:func:`secateur.runtime.dispatch.choose`, op ``decode_attention``)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or not register():
        return False
    if max_len is not None:
        from . import dispatch

        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        shape = (heads, kv_heads, head_dim, int(max_len))
        if head_dim % 16 == 0 and heads % kv_heads == 0 and \
                dispatch.choose("decode_attention", 1, shape, _bench(*shape)) != "native":
            return False
    model.set_attn_implementation(NAME)
    return True


__all__ = ["NAME", "decode_attention_forward", "register", "use_decode_attention"]
