"""Independent trials on one interface: in process, in a pool of spawned processes, or on Ray.

A *trial* is a module-level function ``fn(item: dict) -> dict`` called on a JSON-able dict that
carries a string ``"id"``. :func:`run_trials` runs a list of them and hands back one record per
finished trial, in completion order::

    {"id": "a", "ok": True, "result": {...}, "error": None, "seconds": 0.41, "worker": "host:1234"}

An exception in ``fn`` is that trial's record (``ok=False``, ``error`` one line: type and message),
never the end of the run. ``on_result(record)`` is called in the calling process as each trial
finishes, so the caller can append it to its own journal; that journal is the record of the run
(nothing is persisted here). After ``deadline`` (a ``time.monotonic()`` value) no trial starts;
those in flight finish, and the unstarted items are simply not returned.

Backends:

- ``local``, ``workers=1``: in this process, one at a time.
- ``local``, ``workers>1``: a ``ProcessPoolExecutor`` with the *spawn* context (fork and torch do not
  mix). What crosses processes is plain JSON text: the item in, the record out.
- ``ray``: Ray core tasks (``secateur.distributed.ray_trials``), at most ``workers`` in flight.

Every backend reaches ``fn`` the same way: by its qualified name ``module:qualname``, imported in
the worker. So a lambda or a closure is refused everywhere, and what runs in process runs on Ray.
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from ..errors import SecateurError, did_you_mean, one_of

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray", "tune")


# --- the trial itself: the same wrapper runs in process, in a spawned worker and in a Ray task ---------


def one_line(exc: BaseException) -> str:
    """``ValueError: bad width`` on one line, whatever the exception's message holds."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def worker_name() -> str:
    """Where a trial ran: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def qualified_name(fn: Callable[..., Any]) -> str:
    """``package.module:function`` for a module-level function; a :class:`SecateurError` otherwise."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not callable(fn) or not module or not qualname:
        raise SecateurError(f"fn must be a module-level function, got {fn!r}")
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise SecateurError(f"fn {module}.{qualname} is a lambda or a nested function; trials import fn by "
                            f"name in the worker, so define it at the top level of a module")
    try:
        found = _resolve(f"{module}:{qualname}")
    except Exception as exc:  # noqa: BLE001 - whatever stops the import is the user's answer
        raise SecateurError(f"fn {module}:{qualname} cannot be imported by name ({one_line(exc)})") from exc
    if found is not fn and getattr(found, "__wrapped__", None) is not fn:
        raise SecateurError(f"fn {module}:{qualname} is not what that name imports; pass the module-level function")
    return f"{module}:{qualname}"


def _resolve(target: str) -> Callable[..., Any]:
    module, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def import_root(target: str) -> str | None:
    """The ``sys.path`` entry that ``target``'s module was imported from (None for ``__main__`` or a
    module without a file): a Ray worker on this machine (or a shared filesystem) adds it to find the module."""
    module_name = target.partition(":")[0]
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if module is None or not path or module_name == "__main__":
        return None
    up = module_name.count(".") + (1 if Path(path).name == "__init__.py" else 0)
    return str(Path(os.path.abspath(path)).parents[up])


def run_one(target: str, item_json: str, threads: int | None = None, not_after: float | None = None,
            root: str | None = None) -> str:
    """Run ``target`` on one item; JSON text in, one record as JSON text out (``""`` when the item
    was not started because ``not_after``, a ``time.time()`` value, had passed)."""
    if not_after is not None and time.time() > not_after:
        return ""
    item = json.loads(item_json)
    start = time.perf_counter()
    ok, result, error = False, None, None
    try:
        if threads is not None:
            _set_threads(threads)
        if root and root not in sys.path:
            sys.path.append(root)
        out = _resolve(target)(item)
        if not isinstance(out, dict):
            raise TypeError(f"trial returned {type(out).__name__}, expected a dict")
        json.dumps(out)  # a result that is not JSON is this trial's error, not the caller's crash later
        ok, result = True, out
    except Exception as exc:  # noqa: BLE001 - a failing trial is a record, never the end of the run
        error = one_line(exc)
    return json.dumps({"id": item["id"], "ok": ok, "result": result, "error": error,
                       "seconds": round(time.perf_counter() - start, 6), "worker": worker_name()})


def _set_threads(threads: int) -> None:
    """``threads`` CPU threads for this worker's trials: ``torch.set_num_threads`` if torch is loaded,
    else ``OMP_NUM_THREADS``, which torch (and BLAS) read when the trial first imports them; a trial
    that needs no torch then costs no torch import."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


# --- the driver -----------------------------------------------------------------------------------------


def run_trials(fn: Callable[[dict], dict], items: Sequence[dict], *, backend: str = "local", workers: int = 1,
               cpus_per_trial: int = 1, deadline: float | None = None,
               on_result: Callable[[dict], None] | None = None, address: str | None = None) -> list[dict]:
    """Run ``fn`` on each item; return the finished trials' records in completion order.

    ``backend`` is ``"local"`` (in process when ``workers == 1``, else a spawned process pool),
    ``"ray"`` (Ray core tasks) or ``"tune"`` (the trials of a Ray Tune experiment); for both Ray
    backends ``address`` names a cluster, and by default a local Ray instance is started and
    stopped, or the one this process is already connected to is used. ``cpus_per_trial`` is each trial's
    CPU share (Ray's ``num_cpus``, and ``torch.set_num_threads`` in a worker). ``deadline`` is a
    ``time.monotonic()`` value after which no trial starts. ``on_result`` gets each record as it
    arrives, in this process. A KeyboardInterrupt cancels what is outstanding and is re-raised.
    """
    if backend not in BACKENDS:
        raise SecateurError(f"backend {backend!r} is not one of {one_of(BACKENDS)}{did_you_mean(str(backend), BACKENDS)}")
    for name, value in (("workers", workers), ("cpus_per_trial", cpus_per_trial)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SecateurError(f"{name} must be an integer >= 1, got {value!r}")
    if address is not None and backend not in ("ray", "tune"):
        raise SecateurError(f"address={address!r} names a Ray cluster; it needs backend='ray' or 'tune'")
    target = qualified_name(fn)
    payloads = _payloads(items)
    if backend == "tune":
        from .ray_trials import run_tune_trials

        return run_tune_trials(target, payloads, workers=workers, cpus_per_trial=cpus_per_trial,
                               deadline=deadline, on_result=on_result, address=address)
    if backend == "ray":
        from .ray_trials import run_ray_trials

        return run_ray_trials(target, payloads, workers=workers, cpus_per_trial=cpus_per_trial,
                              deadline=deadline, on_result=on_result, address=address)
    if workers == 1:
        return _run_in_process(target, payloads, deadline, on_result)
    return _run_in_pool(target, payloads, workers, cpus_per_trial, deadline, on_result)


def _payloads(items: Sequence[dict]) -> list[tuple[str, str]]:
    """``[(id, item as JSON text)]``; every item a dict with a unique string id and JSON-able."""
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Sequence):
        raise SecateurError(f"items must be a list of dicts, got {type(items).__name__}")
    seen: set[str] = set()
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise SecateurError(f"items[{i}] must be a dict with a string 'id', got {item!r:.80}")
        if item["id"] in seen:
            raise SecateurError(f"items[{i}]: id {item['id']!r} appears twice; trial ids must be unique")
        seen.add(item["id"])
        try:
            out.append((item["id"], json.dumps(item)))
        except (TypeError, ValueError) as exc:
            raise SecateurError(f"item {item['id']!r} is not JSON-able ({one_line(exc)})") from exc
    return out


def not_after(deadline: float | None) -> float | None:
    """A ``time.monotonic()`` deadline as a ``time.time()`` instant, comparable in another process or node."""
    return None if deadline is None else time.time() + (deadline - time.monotonic())


def past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def deliver(record_json: str, results: list[dict], on_result: Callable[[dict], None] | None) -> None:
    """Append one finished trial's record and hand it to ``on_result`` (a not-started one is dropped)."""
    if not record_json:
        return
    record = json.loads(record_json)
    results.append(record)
    if on_result is not None:
        on_result(record)


def _run_in_process(target, payloads, deadline, on_result) -> list[dict]:
    results: list[dict] = []
    for _, item_json in payloads:
        if past(deadline):
            break
        deliver(run_one(target, item_json), results, on_result)
    return results


def _run_in_pool(target, payloads, workers, cpus_per_trial, deadline, on_result) -> list[dict]:
    """At most ``workers`` trials in flight, so a trial is submitted only when it can start at once
    (the deadline is checked at submission and again in the worker)."""
    results: list[dict] = []
    if not payloads or past(deadline):
        return results
    pending = list(reversed(payloads))
    running: dict[Future, str] = {}
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(payloads)), mp_context=context)
    try:
        while pending or running:
            while pending and len(running) < workers and not past(deadline):
                trial_id, item_json = pending.pop()
                try:
                    future = pool.submit(run_one, target, item_json, cpus_per_trial, not_after(deadline))
                except BrokenProcessPool:  # a worker died (killed, out of memory): carry on in a fresh pool
                    pending.append((trial_id, item_json))
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = ProcessPoolExecutor(max_workers=min(workers, len(payloads)), mp_context=context)
                    continue
                running[future] = trial_id
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                trial_id = running.pop(future)
                try:
                    record_json = future.result()
                except Exception as exc:  # noqa: BLE001 - the worker process itself died under this trial
                    record_json = json.dumps({"id": trial_id, "ok": False, "result": None, "error": one_line(exc),
                                              "seconds": 0.0, "worker": "lost"})
                deliver(record_json, results, on_result)
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)
    return results


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the workers still running a trial."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public handle before 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
