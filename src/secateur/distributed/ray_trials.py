"""The Ray backends of :func:`secateur.distributed.run_trials`: one Ray core task per trial
(``"ray"``), or the trials of one Ray Tune experiment (``"tune"``, :func:`run_tune_trials`: a grid
over the items of a function trainable with its CPUs declared; ``secateur search --backend ray``).

At most ``workers`` tasks are in flight; ``ray.wait`` streams them back as they finish, so the
caller's ``on_result`` sees each record in completion order. A task is
``ray.remote(num_cpus=cpus_per_trial, max_retries=0)`` over :func:`~secateur.distributed.trials.run_one`,
the same wrapper the local backends run: it imports ``fn`` by its qualified name in the worker
(adding the driver's directory for that module to ``sys.path`` when the worker lacks it, which
serves one machine or a shared filesystem), sets ``torch.set_num_threads(cpus_per_trial)``, and takes
and returns JSON text. A trial is not retried: one that crashes its worker (out of memory) is a
failed record, and the caller's journal decides whether to run it again.

Ray is imported here only, and only when this backend runs: ``import secateur`` never imports it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import SecateurError
from .trials import deliver, import_root, not_after, one_line, past, run_one

log = logging.getLogger(__name__)


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise SecateurError("backend='ray' needs Ray: pip install 'secateur[ray]'") from exc
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Connect to Ray for the duration of the block and yield the ``ray`` module.

    Already connected: use that connection and leave it open. ``address`` given: connect to that
    cluster. Otherwise start a new local instance (never someone else's, even one started on this
    machine by ``ray start`` or named by ``RAY_ADDRESS``) with ``num_cpus`` CPUs (default: this
    machine's count), quietly: no dashboard, workers' output kept in Ray's log files rather than
    copied to this terminal. What this call connected or started, it shuts down at the end, and the
    SIGTERM handler that ``ray.init`` replaces is put back. Several ``run_trials(backend="ray")``
    calls inside one session share it (starting Ray takes seconds).
    """
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    if address is not None:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if main and sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


def run_ray_trials(target: str, payloads: list[tuple[str, str]], *, workers: int, cpus_per_trial: int,
                   deadline: float | None, on_result: Callable[[dict], None] | None,
                   address: str | None) -> list[dict]:
    """Run each ``(id, item JSON)`` as a Ray task; the records of the finished ones, in completion order."""
    if target.startswith("__main__:"):
        raise SecateurError(f"fn {target} is defined in the script being run; Ray workers cannot import a "
                            f"script's __main__: move fn into a module")
    results: list[dict] = []
    if not payloads or past(deadline):
        return results
    root = import_root(target)
    with ray_session(address, num_cpus=max(os.cpu_count() or 1, cpus_per_trial)) as ray:
        task = ray.remote(num_cpus=cpus_per_trial, max_retries=0)(run_one)
        pending = list(reversed(payloads))
        running: dict[Any, str] = {}
        try:
            while pending or running:
                while pending and len(running) < workers and not past(deadline):
                    trial_id, item_json = pending.pop()
                    ref = task.remote(target, item_json, cpus_per_trial, not_after(deadline), root)
                    running[ref] = trial_id
                if not running:
                    break
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    trial_id = running.pop(ref)
                    try:
                        record_json = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - the task's worker died (killed, out of memory)
                        record_json = _lost(trial_id, exc)
                    deliver(record_json, results, on_result)
        except BaseException:
            for ref in running:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
    return results


def _lost(trial_id: str, exc: BaseException) -> str:
    # Ray's error text holds the remote traceback; its first line says what happened
    first = (str(exc).strip().splitlines() or [""])[0]
    message = f"{type(exc).__name__}: {' '.join(first.split())}" if first else one_line(exc)
    return json.dumps({"id": trial_id, "ok": False, "result": None, "error": message, "seconds": 0.0, "worker": "lost"})


# --- Ray Tune: the same trials as a Tune experiment -------------------------------------------------------

def _mark(folder: str, item_json: str) -> str:
    import hashlib

    return os.path.join(folder, hashlib.sha256(json.loads(item_json)["id"].encode()).hexdigest()[:32])


def _tune_trainable(config: dict) -> None:
    """A Tune function trainable: one trial through :func:`run_one`, its record reported once. A
    trial Tune started before the deadline (the driver marked it, in the experiment's folder) runs
    even if its actor came up after it; any other is skipped once the deadline has passed."""
    from ray import tune

    started_in_time = os.path.exists(_mark(config["marks"], config["item"]))
    record = run_one(config["target"], config["item"], config["threads"],
                     None if started_in_time else config["not_after"], config["root"])
    tune.report({"record": record})


def run_tune_trials(target: str, payloads: list[tuple[str, str]], *, workers: int, cpus_per_trial: int,
                    deadline: float | None, on_result: Callable[[dict], None] | None,
                    address: str | None) -> list[dict]:
    """Run each ``(id, item JSON)`` as a trial of a Ray Tune experiment: a grid over the items of a
    function trainable with ``{"cpu": cpus_per_trial}`` declared (``tune.with_resources``), at most
    ``workers`` at once (``max_concurrent_trials``), no retry. Each record reaches ``on_result`` from a
    Tune callback as its trial reports, in completion order. Tune's experiment folder is a temporary
    one: resuming is the caller's journal's job (a restored Tune experiment would be unpickled)."""
    import tempfile

    if target.startswith("__main__:"):
        raise SecateurError(f"fn {target} is defined in the script being run; Ray workers cannot import a "
                            f"script's __main__: move fn into a module")
    results: list[dict] = []
    if not payloads or past(deadline):
        return results
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    try:
        from ray import tune
    except ImportError as exc:
        raise SecateurError("backend='tune' needs Ray Tune: pip install 'secateur[ray]'") from exc
    root = import_root(target)
    delivered: set[str] = set()

    class Deliver(tune.Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if not past(deadline):
                with open(_mark(marks, trial.config["item"]), "w"):
                    pass

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            record = result.get("record")
            if isinstance(record, str) and record:
                delivered.add(json.loads(record)["id"])
                deliver(record, results, on_result)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            trial_id = json.loads(trial.config["item"])["id"]
            if trial_id not in delivered:
                delivered.add(trial_id)
                deliver(_lost(trial_id, RuntimeError(f"the Tune trial {trial.trial_id} failed")), results, on_result)

    with ray_session(address, num_cpus=max(os.cpu_count() or 1, cpus_per_trial)), \
            tempfile.TemporaryDirectory(prefix="secateur-tune-") as storage:
        marks = os.path.join(storage, "started-in-time")
        os.makedirs(marks)
        trainable = tune.with_resources(_tune_trainable, {"cpu": cpus_per_trial})
        space = {"target": target, "threads": cpus_per_trial, "not_after": not_after(deadline), "root": root,
                 "marks": marks, "item": tune.grid_search([item_json for _, item_json in payloads])}
        tuner = tune.Tuner(trainable, param_space=space,
                           tune_config=tune.TuneConfig(max_concurrent_trials=workers, reuse_actors=False),
                           run_config=tune.RunConfig(name="trials", storage_path=os.path.join(storage, "tune"),
                                                     verbose=0, callbacks=[Deliver()],
                                                     failure_config=tune.FailureConfig(max_failures=0)))
        tuner.fit()
    return results
