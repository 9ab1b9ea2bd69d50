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
* ``dynamic=False``: one graph for the prompt shape, one for the single-token step;
* each instance compiles its own copy of the forward's code object (Dynamo keeps graphs and
  guards per code object), and Dynamo's guards on module attributes are dropped
  (``skip_guard_on_all_nn_modules_unsafe``): re-checking ~100 modules' attributes cost about
  0.5 ms a token, and with a private code object a graph can only ever see its own frozen model;
* Inductor's size and alignment asserts are off: they are checks of the generated code, run from
  Python around every kernel call of every step.

:class:`~secateur.runtime.linear.QuantLinear` modules choose (by measurement) and pack their kernels
eagerly before each new input shape is traced (timing and packing read tensor values, which a
trace cannot), and projections that read the same input are linked
into one GEMV (:func:`~secateur.runtime.siblings.link_siblings`). The tokens match eager greedy
decoding up to float rounding (tested).

A model running transformers' sdpa attention is switched to ``"secateur_decode"``
(:mod:`.decode_attention`): the one-token decode steps then attend only over the cache positions
written so far, in one native call per layer; everything else still goes to sdpa.
"""

from __future__ import annotations

import time
import types
from typing import Any

from ..errors import SecateurError

MODE = "max-autotune-no-cudagraphs"


class CompiledLM:
    """A causal LM with a static KV cache of ``max_len`` positions and a compiled forward."""

    def __init__(self, model: Any, max_len: int, *, mode: str | None = MODE, freezing: bool = True):
        import torch
        from transformers import StaticCache

        from . import cache_argument
        from .linear import QuantLinear
        from .siblings import link_siblings
        from .decode_attention import use_decode_attention

        if getattr(model.config, "is_encoder_decoder", False) or not hasattr(model, "generate"):
            raise SecateurError(f"compiled decoding needs a causal LM, got {type(model).__name__}")
        self._quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
        self._prepared: set[int] = set()
        self._prepare(1)  # kernels chosen (measured) and packed now, outside the trace
        link_siblings(model)  # q/k/v and gate/up as one GEMV call each (quant.siblings)
        use_decode_attention(model, max_len)  # decode steps read only the filled part of the static cache
        self.model, self.max_len, self.freezing = model.eval(), max_len, freezing
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self._cache_name = cache_argument(model)
        # a private code object per instance: its graphs never serve another model, so the module
        # guards can go (tensor shapes, dtypes, the cache's structure and global state stay guarded)
        function = CompiledLM._logits
        code = function.__code__.replace()
        assert code is not function.__code__
        forward = types.MethodType(types.FunctionType(code, function.__globals__, function.__name__), self)
        options = {**(torch._inductor.list_mode_options(mode) if mode else {}),
                   "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                   # the generated code's own shape checks: a few Python calls per kernel, every step
                   "size_asserts": False, "alignment_asserts": False}
        self._forward = torch.compile(forward, dynamic=False, options=options)

    def _prepare(self, tokens: int) -> None:
        """Choose and pack every quantized layer's kernel for ``tokens`` rows before tracing them:
        a trace can neither time candidates nor read weights to pack them."""
        if tokens not in self._prepared:
            for module in self._quantized:
                module.prepare(tokens)
            self._prepared.add(tokens)

    def _logits(self, ids: Any, position: Any) -> Any:
        out = self.model(input_ids=ids, cache_position=position, use_cache=True, logits_to_keep=1,
                         **{self._cache_name: self.cache})
        return out.logits[:, -1]

    def __call__(self, ids: Any, start: int) -> Any:
        """Logits of the last position after feeding ``ids`` at positions ``start, start + 1, ...``."""
        import torch
        import torch._inductor.config as inductor

        if start + ids.shape[1] > self.max_len:
            raise SecateurError(f"{start + ids.shape[1]} positions exceed the static cache of {self.max_len}")
        self._prepare(ids.numel())
        position = torch.arange(start, start + ids.shape[1], device=ids.device)
        with inductor.patch(freezing=self.freezing), torch.inference_mode():
            return self._forward(ids, position)

    def reset(self) -> None:
        import torch

        with torch.inference_mode():
            self.cache.reset()

    def greedy(self, prompt: Any, new_tokens: int) -> tuple[Any, float, list[float]]:
        """As :func:`secateur.evaluate.speed.greedy_decode`: (ids ``[b, new_tokens + 1]``, prefill
        seconds, seconds of each decode step)."""
        import torch

        from . import sync

        device, length = prompt.device, prompt.shape[1]
        self.reset()
        start = time.perf_counter()
        token = self(prompt, 0).argmax(-1, keepdim=True)
        sync(device)
        prefill, tokens, steps = time.perf_counter() - start, [token], []
        for i in range(new_tokens):
            start = time.perf_counter()
            token = self(token, length + i).argmax(-1, keepdim=True)
            sync(device)
            steps.append(time.perf_counter() - start)
            tokens.append(token)
        return torch.cat(tokens, dim=1), prefill, steps


__all__ = ["CompiledLM", "MODE"]
