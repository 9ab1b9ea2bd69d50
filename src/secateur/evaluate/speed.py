"""Speed and memory by protocol P4.

Prefill (or, for an encoder, the forward pass): ``warmup`` unmeasured runs, then ``runs`` measured
ones on seeded random token ids ``[batch, prompt_len]``; median, p95 and p99 latency.

For a causal LM the prefill is the forward over the prompt that yields the first new token: as in
``generate``, only the last position's logits are computed (``logits_to_keep=1`` where the model
accepts it), so the head over the whole vocabulary runs once, not once per prompt token.

Decode (causal LMs): a manual greedy loop with the KV cache (transformers' ``cache``), batch 1. The
prefill, which yields the first new token, is timed apart; then ``new_tokens`` single-token steps
are timed, each producing one more token, and tokens/s = ``new_tokens`` / their total time
(median over ``DECODE_RUNS`` measured runs after one warm-up run). The loop produces the same
tokens as ``model.generate(do_sample=False)``.

Early exit (a causal LM with exit heads, batch 1, not compiled): the decode is also timed in the
exit runtime (:class:`~secateur.runtime.early_exit_lm.ExitLM`), without exits and at each threshold
of ``exit_thresholds`` (default: the grid the ``early_exit`` step prices), in ``DECODE_RUNS``
alternating rounds of greedy continuations of the same prompt; ``exit_curve`` records, per
threshold, the median tokens/s, its ratio to the loop without exits and the mean blocks per
generated token (of that continuation: the text differs from the step's held-out split).

Memory and size: peak resident set size of the process so far (``VmHWM``), peak device memory
on a GPU, parameter count, bytes of safetensors on disk (when the model came from a directory),
and the fraction of exact zeros in Linear weights, per layer and in total.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .. import lineage
from ..data import fingerprint
from ..errors import SecateurError
from ..models.arch import arch_of
from ..runtime import cache_argument, output_cache, sync
from .perplexity import context_length
from .results import EvalResult, environment

log = logging.getLogger(__name__)

P4_RUNS, P4_WARMUP, DECODE_RUNS = 10, 2, 3


def _percentiles(seconds: list[float], prefix: str) -> dict[str, float]:
    import numpy as np

    ms = np.asarray(seconds) * 1000.0
    return {f"{prefix}_ms_median": float(np.median(ms)), f"{prefix}_ms_p95": float(np.percentile(ms, 95)),
            f"{prefix}_ms_p99": float(np.percentile(ms, 99))}


def greedy_decode(model: Any, prompt: Any, new_tokens: int) -> tuple[Any, float, list[float]]:
    """Greedy generation with the KV cache: (generated ids ``[b, new_tokens + 1]``, prefill
    seconds, seconds of each of the ``new_tokens`` decode steps)."""
    import torch

    device = prompt.device
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, **_last_logits(model))
        token = out.logits[:, -1:].argmax(dim=-1)
        sync(device)
        prefill = time.perf_counter() - start
        name = cache_argument(model)
        past, tokens, steps = output_cache(out), [token], []
        for _ in range(new_tokens):
            start = time.perf_counter()
            out = model(input_ids=token, use_cache=True, **{name: past})
            token = out.logits[:, -1:].argmax(dim=-1)
            sync(device)
            steps.append(time.perf_counter() - start)
            past = output_cache(out)
            tokens.append(token)
    return torch.cat(tokens, dim=1), prefill, steps


def _last_logits(model: Any) -> dict[str, Any]:
    """``logits_to_keep=1`` for models whose forward takes it (what ``generate`` passes)."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def sparsity(model: Any) -> tuple[float, float, dict[str, float]]:
    """Fraction of exact zeros in Linear (and GPT-2 Conv1D) weights: (inside the blocks, over all
    of them, per layer)."""
    from ..models.layers import is_projection

    facts = arch_of(model, strict=False)
    prefix = facts.arch.block_prefix(model) + "." if facts is not None else ""
    per_layer: dict[str, float] = {}
    zeros = total = block_zeros = block_total = 0
    for name, module in model.named_modules():
        if not is_projection(module):
            continue
        weight = module.weight
        z, t = int((weight == 0).sum()), weight.numel()
        per_layer[name] = z / t
        zeros, total = zeros + z, total + t
        if name.startswith(prefix):
            block_zeros, block_total = block_zeros + z, block_total + t
    return (block_zeros / block_total if block_total else 0.0), (zeros / total if total else 0.0), per_layer


def disk_bytes(path: str | Path | None) -> int | None:
    """Bytes of the safetensors files in a model directory (None without a directory)."""
    if not path:
        return None
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    files = list(folder.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def peak_rss_mib() -> float:
    """The process's peak resident set (:func:`secateur.runtime.machine.peak_rss_bytes`), MiB."""
    from ..progress import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def exit_speed(model: Any, prompt: list[int], new_tokens: int, thresholds: tuple[float, ...] = (),
               rounds: int = DECODE_RUNS) -> dict[str, Any]:
    """Decode speed at batch 1 in the exit runtime, without exits and at each threshold (see the
    module docstring); ``{}`` for a model without exit heads or one the exit runtime cannot run."""
    import statistics

    from ..runtime.early_exit import heads_of
    from ..runtime.early_exit_lm import CURVE_THRESHOLDS, ExitLM

    if heads_of(model) is None:
        return {}
    try:
        lms = [(None, ExitLM(model, None, max_len=len(prompt) + new_tokens))]
    except SecateurError:
        return {}
    lms += [(t, ExitLM(model, t, max_len=len(prompt) + new_tokens))
            for t in sorted(float(x) for x in (thresholds or CURVE_THRESHOLDS))]
    rates: dict[Any, list[float]] = {t: [] for t, _ in lms}
    blocks: dict[Any, float] = {}
    for _, lm in lms:  # warm-up
        lm.greedy(prompt, min(new_tokens, 8))
    for _ in range(rounds):
        for t, lm in lms:
            out = lm.greedy(prompt, new_tokens)
            rates[t].append(max(1, len(out.tokens) - 1) / out.seconds)
            blocks[t] = out.mean_blocks
    plain = statistics.median(rates[None])
    return {"exit_no_exits_tokens_per_s": plain,
            "exit_curve": [{"threshold": t, "tokens_per_s": statistics.median(rates[t]),
                            "speedup": statistics.median(rates[t]) / plain, "mean_blocks": blocks[t]}
                           for t, _ in lms[1:]]}


def speed(model: Any, tokenizer: Any = None, *, batch: int = 1, prompt_len: int = 128, new_tokens: int = 64,
          runs: int = P4_RUNS, warmup: int = P4_WARMUP, path: str | None = None, seed: int = 0,
          compile: Any = False, exit_thresholds: tuple[float, ...] = ()) -> EvalResult:
    """Latency, decode throughput, memory, size and sparsity of ``model`` (P4).

    The tokenizer is not needed (inputs are seeded random ids). ``path`` is the model directory
    whose safetensors are counted (default: where ``secateur.load`` found the model).
    ``compile``: causal LMs, batch 1 — prefill and decode through
    :class:`~secateur.runtime.compiled.CompiledLM` (static KV cache, Inductor-compiled forward;
    compiling takes about a minute, in the warm-up, untimed). A :class:`CompiledLM` of ``model``
    may be passed instead of True, to time it again without recompiling.
    """
    import torch

    if min(batch, prompt_len, runs) < 1 or new_tokens < 0 or warmup < 0:
        raise SecateurError(f"speed needs batch, prompt_len, runs >= 1 and new_tokens, warmup >= 0 "
                            f"(got batch={batch}, prompt_len={prompt_len}, new_tokens={new_tokens}, "
                            f"runs={runs}, warmup={warmup})")
    facts = arch_of(model, strict=False)
    causal = facts.kind == "causal" if facts is not None else hasattr(model, "generate")
    context = context_length(model)
    needed = prompt_len + (new_tokens if causal else 0)
    if context is not None and needed > context:
        raise SecateurError(f"prompt_len {prompt_len}" + (f" + new_tokens {new_tokens}" if causal else "") +
                            f" = {needed} exceeds the model's context of {context}; pass smaller values")
    if compile and not causal:
        raise SecateurError("--compile times compiled decoding and needs a causal LM; "
                            f"{type(model).__name__} is not one")
    if compile and warmup < 1:
        raise SecateurError("--compile needs at least one warm-up run (compilation happens there)")
    if compile and batch != 1:
        raise SecateurError(f"--compile measures batch 1 (one static KV cache), got batch {batch}")
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=generator).to(device)
    call = {"use_cache": True, **_last_logits(model)} if causal else {"attention_mask": torch.ones_like(ids)}

    was_training = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if compile:
            from ..runtime.compiled import CompiledLM

            compiled = compile if isinstance(compile, CompiledLM) else CompiledLM(model, prompt_len + new_tokens)
            if compiled.model is not model or compiled.max_len < prompt_len + new_tokens:
                raise SecateurError(f"the CompiledLM passed is not of this model or holds fewer than "
                                    f"{prompt_len + new_tokens} positions")
            decode = compiled.greedy

            def forward() -> None:
                compiled.reset()
                compiled(ids, 0)
        else:
            def decode(prompt: Any, n: int) -> tuple[Any, float, list[float]]:
                return greedy_decode(model, prompt, n)

            def forward() -> None:
                model(input_ids=ids, **call)
        times = []
        with torch.inference_mode():
            for i in range(warmup + runs):
                start = time.perf_counter()
                forward()
                sync(device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        extra: dict[str, Any] = _percentiles(times, "prefill" if causal else "latency")
        if causal and new_tokens > 0:
            prompt = ids[:1]
            decode(prompt, min(new_tokens, 8))  # warm-up
            rates, steps = [], []
            for _ in range(DECODE_RUNS):
                _, _, step_times = decode(prompt, new_tokens)
                rates.append(new_tokens / sum(step_times))
                steps.extend(step_times)
            rates.sort()
            extra["decode_tokens_per_s"] = rates[len(rates) // 2]
            extra.update(_percentiles(steps, "decode_step"))
            if batch == 1 and not compile and new_tokens > 1:
                with torch.inference_mode():
                    extra.update(exit_speed(model, prompt[0].tolist(), new_tokens, tuple(exit_thresholds)))
    finally:
        model.train(was_training)

    block_sparsity, all_sparsity, per_layer = sparsity(model)
    base = lineage.read(model).base
    source_path = path or (base.path if base is not None else None)
    extra.update(peak_rss_mib=peak_rss_mib(), parameters=sum(p.numel() for p in model.parameters()),
                 disk_bytes=disk_bytes(source_path), sparsity=block_sparsity, sparsity_all_linear=all_sparsity)
    if device.type == "cuda":
        extra["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    extra["sparsity_per_layer"] = per_layer

    deviations = []
    if runs < P4_RUNS:
        deviations.append(f"runs {runs} (P4: >= {P4_RUNS})")
    if warmup < P4_WARMUP:
        deviations.append(f"warmup {warmup} (P4: >= {P4_WARMUP})")
    protocol = None if deviations else "P4"
    metric = "decode_tokens_per_s" if "decode_tokens_per_s" in extra else (
        "prefill_ms_median" if causal else "latency_ms_median")
    settings = {
        "protocol": protocol, "convention": "P4", "data": None, "fingerprint": fingerprint(ids),
        "input": f"random token ids, seed {seed}", "batch": batch, "prompt_len": prompt_len,
        "new_tokens": new_tokens if causal else None, "warmup": warmup, "runs": runs,
        "prefill_logits": ("last position only (logits_to_keep=1)" if causal and _last_logits(model) else
                           "every position" if causal else None),
        "decode": (f"manual greedy loop with the KV cache, batch 1, {DECODE_RUNS} runs after 1 warm-up; "
                   "tokens/s = new_tokens / time of the new_tokens single-token steps, prefill excluded")
        if causal and new_tokens > 0 else None,
        "disk_path": str(source_path) if source_path else None,
        **({"exit_decode": f"exit runtime (ExitLM), greedy continuation of the same prompt, {DECODE_RUNS} rounds "
                           "alternating the loop without exits and each threshold; medians; speedup = exits / no "
                           "exits in the same loop"} if "exit_curve" in extra else {}),
        **environment(model), "deviations": deviations,
        **({"runtime": "torch.compile (Inductor, max-autotune, freezing), static KV cache"} if compile else {}),
    }
    return EvalResult("speed", protocol, metric, float(extra[metric]), extra, settings)
