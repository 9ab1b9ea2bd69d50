"""Compiled greedy decoding: a static KV cache and one ``torch.compile``'d forward.

Eager decoding of a small model on a CPU spends a fixed ~3 ms per token outside the Linear layers
(KV-cache concatenation, attention, norms, rotary embeddings, Python dispatch of ~25 ops a block);
that floor caps every Linear kernel's speed-up. Here the cache is preallocated
(``transformers.StaticCache``, written in place at ``cache_position``) so every decode step has the
same shapes, and the whole step is compiled once by Inductor: the elementwise work fuses into a few
C++ loops and the per-op dispatch disappears.

Settings, chosen for this use (evaluation of a frozen model):

* ``mode="max-autotune-no-cudagraphs"``: Inductor benchmarks its own GEMM templates against the
  library kernels per shape (on CPU this includes its int8 / int4 weight-only GEMV templates);
* ``freezing``: weights become constants of the compiled graph, which lets Inductor lower
  prepacked oneDNN int8 weights (W8A8) and fold constant work. The model must not change after the
  first call; a :class:`CompiledLM` is built for one measurement and thrown away;
* ``dynamic=False``: one graph for the prompt shape, one for the single-token step.

:class:`~secateur.quant.linear.QuantLinear` modules are packed eagerly before tracing (packing
reads tensor values, which a trace cannot). The tokens match eager greedy decoding up to float
rounding (tested).
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import SecateurError

MODE = "max-autotune-no-cudagraphs"
RECOMPILE_LIMIT = 256


class CompiledLM:
    """A causal LM with a static KV cache of ``max_len`` positions and a compiled forward."""

    def __init__(self, model: Any, max_len: int, *, mode: str | None = MODE, freezing: bool = True):
        import torch
        from transformers import StaticCache

        from ..quant.linear import QuantLinear

        if getattr(model.config, "is_encoder_decoder", False) or not hasattr(model, "generate"):
            raise SecateurError(f"compiled decoding needs a causal LM, got {type(model).__name__}")
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.kernel  # noqa: B018 - packs the low-precision weights now, outside the trace
        self.model, self.max_len, self.freezing = model.eval(), max_len, freezing
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self._forward = torch.compile(self._logits, dynamic=False, mode=mode)

    def _logits(self, ids: Any, position: Any) -> Any:
        out = self.model(input_ids=ids, past_key_values=self.cache, cache_position=position, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]

    def __call__(self, ids: Any, start: int) -> Any:
        """Logits of the last position after feeding ``ids`` at positions ``start, start + 1, ...``."""
        import torch
        import torch._dynamo.config as dynamo
        import torch._inductor.config as inductor

        if start + ids.shape[1] > self.max_len:
            raise SecateurError(f"{start + ids.shape[1]} positions exceed the static cache of {self.max_len}")
        position = torch.arange(start, start + ids.shape[1], device=ids.device)
        # every CompiledLM compiles the same method, and dynamo keeps its graphs per code object
        # (two per model: prompt and step); the default limit of 8 would send a fifth model to eager
        with inductor.patch(freezing=self.freezing), dynamo.patch(recompile_limit=RECOMPILE_LIMIT), \
                torch.inference_mode():
            return self._forward(ids, position)

    def reset(self) -> None:
        import torch

        with torch.inference_mode():
            self.cache.reset()

    def greedy(self, prompt: Any, new_tokens: int) -> tuple[Any, float, list[float]]:
        """As :func:`secateur.evaluate.speed.greedy_decode`: (ids ``[b, new_tokens + 1]``, prefill
        seconds, seconds of each decode step)."""
        import torch

        from .speed import _sync

        device, length = prompt.device, prompt.shape[1]
        self.reset()
        start = time.perf_counter()
        token = self(prompt, 0).argmax(-1, keepdim=True)
        _sync(device)
        prefill, tokens, steps = time.perf_counter() - start, [token], []
        for i in range(new_tokens):
            start = time.perf_counter()
            token = self(token, length + i).argmax(-1, keepdim=True)
            _sync(device)
            steps.append(time.perf_counter() - start)
            tokens.append(token)
        return torch.cat(tokens, dim=1), prefill, steps


__all__ = ["CompiledLM", "MODE"]
