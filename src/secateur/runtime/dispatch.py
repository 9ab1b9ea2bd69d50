"""Kernels chosen by measurement: for each operation, shape and token bucket, the fastest candidate.

An operation the runtime can run more than one way (a W8A8 Linear, a W4A16 Linear, the int8 GEMM
of the fused encoder, one-token decode attention) lists its candidates in :data:`OPS`. The first
time a shape is met in a token bucket (1, 2, 4, ..., 256, then 512 for anything larger),
:func:`choose` times every candidate that can run on this machine on synthetic tensors of that
shape, and the fastest wins. ``fp32`` (the dequantized weight through ``F.linear``) is always among
them, so a quantized kernel measured slower than float32 on a shape is never chosen for it. No
CPU is trusted by its name: on an AMD EPYC without AMX, oneDNN runs ``qlinear_pointwise`` with its
reference implementation (about 0.1 GOP/s), and it simply loses.

The measurement, per bucket:

1. *screen*: every candidate runs once on one row; one slower than ``SCREEN_FACTOR`` x fp32 on
   that row plus ``SCREEN_SLACK_S`` is dropped without ever running the full shape (the
   pathology above would otherwise cost seconds per call);
2. *time*: the others run alternately on the bucket's row count (a warm-up, then at least
   ``MIN_ROUNDS`` and at most ``MAX_ROUNDS`` rounds, until ``BUDGET_S`` is spent); the lowest time
   wins (the fastest run of each, least disturbed by other work). One far slower than the best
   after its first timed call is dropped early.

Choices are kept in memory and in ``$SECATEUR_CACHE_DIR/kernels/choices-<machine key>.json``
(default ``~/.cache/secateur``), a JSON file written atomically and merged with what other
processes wrote; the key (:func:`secateur.runtime.machine.key`) covers the CPU model, its flags,
the thread count and the torch and secateur versions. ``SECATEUR_KERNELS`` forces choices, e.g.
``SECATEUR_KERNELS="w8a8=int_mm,w4a16=gemv"``, or per bucket ``w8a8@1=gemv`` (a forced kernel
that cannot take a weight falls back to the measured choice); :func:`forced` does the same for a
block of code. ``SECATEUR_KERNEL_MEASURE=0`` skips measuring and takes each operation's first
available candidate in :data:`OPS` order (the previous fixed order).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from ..errors import SecateurError, did_you_mean, one_of
from . import machine

log = logging.getLogger(__name__)

# operation -> its candidates, in the order used when measuring is off (SECATEUR_KERNEL_MEASURE=0)
OPS: dict[str, tuple[str, ...]] = {
    "w8a8": ("gemv", "onednn", "int_mm", "fp32"),  # per-token int8 activations x int8 weights
    "w4a16": ("gemv", "int4pack", "dequant_bf16", "fp32"),  # int4 weights, bf16/fp32 activations
    "w8a16": ("int8pack", "dequant_bf16", "fp32"),  # int8 weights, bf16 activations
    "w8a8_gemm": ("onednn", "int_mm", "fp32"),  # the fused encoder's int8 GEMMs (int8 in, float32 out)
    "decode_attention": ("native", "sdpa"),  # one query token against the KV cache
}
REFERENCE = "fp32"  # the candidate every quantized kernel is measured against, where an op has it
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SCREEN_FACTOR, SCREEN_SLACK_S = 20.0, 2e-4
MIN_ROUNDS, MAX_ROUNDS, BUDGET_S = 3, 15, 0.3
DROP_FACTOR = 8.0

Runner = Callable[[], Any]
Maker = Callable[[int], Mapping[str, Runner]]  # rows -> {candidate: a call on synthetic tensors}

_lock = threading.RLock()
_memory: dict[str, dict[str, dict[str, Any]]] = {}  # machine key -> choice key -> record
_forced_stack: list[dict[str, str]] = []
_generation = 0  # bumped whenever forcing changes, so that modules drop the choices they cached


def bucket(tokens: int) -> int:
    """The token bucket measured for ``tokens`` rows: the next power of two, at most 512."""
    if tokens <= 1:
        return 1
    return min(1 << (tokens - 1).bit_length(), BUCKETS[-1])


def bucket_label(b: int) -> str:
    return f"{b}+" if b == BUCKETS[-1] else str(b)


def generation() -> int:
    """Changes whenever :func:`forced` starts or ends: a cached choice older than it is stale."""
    return _generation


def parse_forced(text: str) -> dict[str, str]:
    """``"w8a8=int_mm,w4a16@1=gemv"`` -> ``{"w8a8": "int_mm", "w4a16@1": "gemv"}``; errors name
    the offending item and the valid operations or candidates."""
    out: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        target, sep, name = (s.strip() for s in item.partition("="))
        op, _, where = target.partition("@")
        if not sep or not name:
            raise SecateurError(f"SECATEUR_KERNELS item {item!r} must look like op=kernel or op@tokens=kernel")
        if op not in OPS:
            raise SecateurError(f"SECATEUR_KERNELS: unknown operation {op!r}{did_you_mean(op, OPS)}; "
                                f"valid: {one_of(OPS)}")
        if name not in OPS[op]:
            raise SecateurError(f"SECATEUR_KERNELS: unknown kernel {name!r} for {op}{did_you_mean(name, OPS[op])}; "
                                f"valid: {one_of(OPS[op])}")
        if where:
            if not where.isdigit() or int(where) < 1:
                raise SecateurError(f"SECATEUR_KERNELS item {item!r}: the bucket after @ must be a token count >= 1")
            target = f"{op}@{bucket(int(where))}"
        out[target] = name
    return out


def parse_forced_env() -> dict[str, str]:
    """What ``SECATEUR_KERNELS`` forces (an error names a bad item)."""
    return parse_forced(os.environ.get("SECATEUR_KERNELS", ""))


def _forcing() -> dict[str, str]:
    merged = parse_forced_env()
    for layer in _forced_stack:
        merged.update(layer)
    return merged


@contextlib.contextmanager
def forced(choices: Mapping[str, str] | str) -> Iterator[None]:
    """Force kernels inside the block (``{"w8a8": "int_mm"}`` or the ``SECATEUR_KERNELS`` syntax).
    Process-wide while it lasts (for tests and debugging, not for one request of a server);
    modules re-choose on their next call, so it takes effect on models already in use."""
    global _generation
    layer = parse_forced(choices if isinstance(choices, str) else ",".join(f"{k}={v}" for k, v in choices.items()))
    with _lock:
        _forced_stack.append(layer)
        _generation += 1
    try:
        yield
    finally:
        with _lock:
            _forced_stack.remove(layer)
            _generation += 1


def forced_choice(op: str, tokens: int) -> Optional[str]:
    """The kernel ``SECATEUR_KERNELS`` / :func:`forced` names for ``op`` at ``tokens``, if any."""
    forcing = _forcing()
    return forcing.get(f"{op}@{bucket(tokens)}") or forcing.get(op)


def measuring() -> bool:
    return os.environ.get("SECATEUR_KERNEL_MEASURE", "1") not in ("0", "false", "no")


# --- the cache on disk ---------------------------------------------------------------------------

def cache_path() -> Path:
    root = os.environ.get("SECATEUR_CACHE_DIR") or Path.home() / ".cache" / "secateur"
    return Path(root) / "kernels" / f"choices-{machine.key()}.json"


def _read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, dict):
        return {}
    return {k: v for k, v in choices.items() if isinstance(v, dict) and isinstance(v.get("kernel"), str)}


def _write(path: Path, choices: dict[str, dict[str, Any]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read(path), **choices}  # keep what other processes measured meanwhile
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"machine": machine.describe(), "choices": merged}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: the choices still hold for this process
        log.info("kernel choices not saved to %s (%s)", path, exc)


def _table() -> dict[str, dict[str, Any]]:
    key = machine.key()
    table = _memory.get(key)
    if table is None:
        table = _memory[key] = _read(cache_path())
    return table


def _key(op: str, tokens: int, shape: tuple[Any, ...]) -> str:
    return f"{op}|{'x'.join(str(s) for s in shape)}|m{bucket(tokens)}"


def record_of(op: str, tokens: int, shape: tuple[Any, ...]) -> dict[str, Any]:
    """The measurement behind the choice for ``op`` on ``shape`` at ``tokens`` ({} if none yet)."""
    with _lock:
        return dict(_table().get(_key(op, tokens, shape), {}))


def recorded() -> dict[str, dict[str, Any]]:
    """Every choice known on this machine (this process's and the cache file's), by choice key."""
    with _lock:
        return {k: dict(v) for k, v in _table().items()}


def clear() -> None:
    """Forget every measured choice of this machine, in memory and on disk (measured again on use)."""
    with _lock:
        _memory.pop(machine.key(), None)
        with contextlib.suppress(OSError):
            cache_path().unlink()


# --- measuring -----------------------------------------------------------------------------------

def _time_once(run: Runner) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(make: Maker, rows: int) -> dict[str, Any]:
    """Time the candidates ``make`` builds (see the module docstring); returns the record
    ``{"kernel": fastest, "us": {candidate: fastest run in microseconds}, "screened": [...], "rows": rows}``."""
    import torch

    with torch.inference_mode():
        full = dict(make(rows))
        one = {name: run for name, run in (dict(make(1)) if rows > 1 else full).items() if name in full}
        if not one:
            raise SecateurError("no kernel candidate can run this operation here")
        for run in one.values():  # first calls pay one-time set-up (oneDNN primitives, JIT)
            run()
        single = {name: min(_time_once(run), _time_once(run)) for name, run in one.items()}
        base = single.get(REFERENCE, min(single.values()))
        screened = sorted(n for n, t in single.items() if t > SCREEN_FACTOR * base + SCREEN_SLACK_S)
        full = {name: run for name, run in full.items() if name not in screened}
        for run in full.values():
            run()
        times: dict[str, list[float]] = {name: [] for name in full}
        start, rounds = time.perf_counter(), 0
        while rounds < MAX_ROUNDS and (rounds < MIN_ROUNDS or time.perf_counter() - start < BUDGET_S):
            for name in list(full):
                times[name].append(_time_once(full[name]))
                best = min(min(t) for t in times.values() if t)
                if rounds == 0 and times[name][0] > DROP_FACTOR * best and len(full) > 1:
                    del full[name]  # far slower than the best already seen: not worth more calls
            rounds += 1
    # the fastest run of each: what the kernel can do, least disturbed by whatever else the machine
    # was doing (a median would let one busy moment decide a choice that is then cached)
    fastest_runs = {name: min(ts) for name, ts in times.items() if ts}
    fastest = min((n for n in fastest_runs if n in full), key=fastest_runs.__getitem__)
    return {"kernel": fastest, "us": {n: round(t * 1e6, 2) for n, t in sorted(fastest_runs.items())},
            "screened": screened, "rows": rows}


def choose(op: str, tokens: int, shape: tuple[Any, ...], make: Maker,
           available: Optional[tuple[str, ...]] = None) -> str:
    """The kernel for ``op`` on ``shape`` (e.g. ``(in, out)`` or ``(in, out, group)``) at ``tokens``
    rows: forced, else cached, else measured now with ``make`` (candidates ``make`` leaves out
    cannot run here). ``available``, when given, is what the caller's own weight can take: a
    forced kernel outside it falls back to the measured choice, a measured one outside it to the
    fastest measured candidate inside it."""
    if op not in OPS:
        raise SecateurError(f"unknown kernel operation {op!r}; valid: {one_of(OPS)}")
    name = forced_choice(op, tokens)
    if name is not None and (available is None or name in available):
        return name
    if name is not None:
        log.warning("SECATEUR_KERNELS forces %s=%s, which cannot take this %s weight; measuring instead",
                    op, name, shape)
    b = bucket(tokens)
    key = _key(op, tokens, shape)
    with _lock:
        record = _table().get(key)
        if record is None and not measuring():
            candidates = [n for n in OPS[op] if available is None or n in available]
            runs = make(1)
            return next((n for n in candidates if n in runs), candidates[-1])
        if record is None:
            record = measure(make, b)
            record["op"], record["shape"], record["bucket"] = op, list(shape), b
            _table()[key] = record
            _write(cache_path(), {key: record})
            log.info("kernel for %s %s at %s rows: %s (%s)", op, shape, bucket_label(b), record["kernel"],
                     ", ".join(f"{n} {t:.0f} us" for n, t in record["us"].items()))
    kernel = record["kernel"]
    if available is not None and kernel not in available:
        timed = {n: t for n, t in record.get("us", {}).items() if n in available}
        kernel = min(timed, key=timed.__getitem__) if timed else next(n for n in OPS[op] if n in available)
    return kernel


def summary(model: Any) -> dict[str, dict[str, str]]:
    """The kernels a model's modules ran, by operation and token bucket (``{"w8a8": {"1": "gemv",
    "128": "int_mm"}}``); modules that ran different kernels in one bucket join them with ``+``.
    Read from every module that has a ``secateur_kernels()`` method (QuantLinear, fused blocks)."""
    merged: dict[str, dict[str, set[str]]] = {}
    for module in model.modules() if hasattr(model, "modules") else ():
        report = getattr(module, "secateur_kernels", None)
        if not callable(report):
            continue
        for op, by_bucket in report().items():
            for b, name in by_bucket.items():
                merged.setdefault(op, {}).setdefault(bucket_label(b), set()).add(name)
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl == "secateur_decode":
        merged.setdefault("decode_attention", {}).setdefault("1", set()).add("native")
    order = {label: i for i, label in enumerate(bucket_label(b) for b in BUCKETS)}
    return {op: {label: "+".join(sorted(names)) for label, names in sorted(by.items(), key=lambda kv: order[kv[0]])}
            for op, by in sorted(merged.items())}


__all__ = ["OPS", "REFERENCE", "BUCKETS", "bucket", "bucket_label", "generation", "parse_forced", "forced",
           "parse_forced_env", "forced_choice", "measuring", "cache_path", "record_of", "recorded", "clear", "measure",
           "choose", "summary"]
