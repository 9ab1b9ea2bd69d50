"""run_trials on its three backends: in process, a spawned process pool, and a real local Ray
instance (2 CPUs, started once for the module). Each backend runs the same trial functions
(trial_fns.py, imported by name in the workers) and is checked against calling them directly."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray  # the dev extra installs it (secateur[ray]): these tests run Ray for real
import trial_fns

from secateur.distributed import ray_session, run_trials
from secateur.errors import SecateurError

ITEMS = [{"id": f"t{i}", "x": i} for i in range(4)]
BACKENDS = {"sequential": ("local", 1), "pool": ("local", 2), "ray": ("ray", 2), "tune": ("tune", 2)}


def pid_of(record: dict) -> int:
    return int(record["worker"].rsplit(":", 1)[1])


def test_ray_started_by_run_trials_is_stopped_after_it():
    """The default Ray path: no connection yet, so run_trials starts a local instance, uses it and
    shuts it down, leaving this process's SIGTERM handler as it was. (First in the file: the
    module's shared instance below is not running yet.)"""
    assert not ray.is_initialized()
    before = signal.getsignal(signal.SIGTERM)
    records = run_trials(trial_fns.square, ITEMS[:2], backend="ray", workers=2)
    assert {r["id"]: r["result"] for r in records} == {i["id"]: trial_fns.square(i) for i in ITEMS[:2]}
    assert not ray.is_initialized()
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.fixture(scope="module")
def ray_cluster():
    with ray_session(num_cpus=2):
        yield


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> dict:
    name, workers = BACKENDS[request.param]
    if name in ("ray", "tune"):
        request.getfixturevalue("ray_cluster")
    return {"backend": name, "workers": workers}


def test_each_backend_returns_what_calling_fn_directly_returns(backend):
    seen = []
    records = run_trials(trial_fns.square, ITEMS, on_result=lambda r: seen.append((r, os.getpid(), threading.current_thread())),
                         **backend)
    assert {r["id"]: r["result"] for r in records} == {i["id"]: trial_fns.square(i) for i in ITEMS}
    assert all(r["ok"] and r["error"] is None and r["seconds"] >= 0 for r in records)
    assert set(records[0]) == {"id", "ok", "result", "error", "seconds", "worker"}
    # on_result: once per finished trial, in completion order (the order returned), in this very process and thread
    assert [r for r, _, _ in seen] == records
    assert {(pid, t) for _, pid, t in seen} == {(os.getpid(), threading.main_thread())}
    pids = {pid_of(r) for r in records}
    if backend["workers"] == 1:
        assert pids == {os.getpid()} and [r["id"] for r in records] == [i["id"] for i in ITEMS]
    else:  # a pool or Ray reuses its 2 workers; Tune starts one actor per trial
        assert os.getpid() not in pids and 1 <= len(pids) <= (len(ITEMS) if backend["backend"] == "tune" else 2)


def test_a_failing_trial_is_a_one_line_record_and_the_others_still_run(backend):
    records = {r["id"]: r for r in run_trials(trial_fns.fail_on_odd, ITEMS, **backend)}
    assert set(records) == {i["id"] for i in ITEMS}
    for item in ITEMS:
        r = records[item["id"]]
        if item["x"] % 2:
            assert not r["ok"] and r["result"] is None
            assert r["error"] == f"ValueError: odd x={item['x']} second line of the message"
        else:
            assert r["ok"] and r["result"] == trial_fns.fail_on_odd(item) and r["error"] is None


def test_a_deadline_already_passed_starts_nothing(backend):
    called = []
    assert run_trials(trial_fns.square, ITEMS, deadline=time.monotonic() - 0.01, on_result=called.append, **backend) == []
    assert called == []


def test_a_short_deadline_lets_the_trials_in_flight_finish_and_starts_no_more(backend):
    """Trials of 2.5 s, deadline in 1.5 s: the first `workers` trials start at once and finish
    after the deadline; the rest are never started and not returned. (Ray's workers and Tune's
    experiment take seconds to start on a loaded machine; a
    CI run with 1.5 s saw Ray's first workers start after the deadline, so they rightly ran nothing, and
    a run sharing the cores with a 30 GB benchmark saw Tune's start take more than 6 s: 14 s trials and
    a deadline in 12 s there.)"""
    nap, within = (14.0, 12.0) if backend["backend"] in ("tune", "ray") else (2.5, 1.5)
    items = [{"id": f"n{i}", "s": nap} for i in range(4)]
    records = run_trials(trial_fns.nap, items, deadline=time.monotonic() + within, **backend)
    assert sorted(r["id"] for r in records) == [i["id"] for i in items[: backend["workers"]]]
    assert all(r["ok"] and r["result"] == {"slept": nap} and r["seconds"] >= nap for r in records)


def test_workers_get_cpus_per_trial_torch_threads():
    for name, workers in (BACKENDS["pool"], BACKENDS["ray"]):
        if name == "ray":
            assert ray.is_initialized()  # the module's instance, started by an earlier test
        for cpus in (1, 2):
            [record] = run_trials(trial_fns.threads, [{"id": "a"}], backend=name, workers=workers, cpus_per_trial=cpus)
            assert record["result"] == {"threads": cpus}, (name, cpus, record)


def test_a_result_that_is_not_a_dict_is_that_trials_error():
    [record] = run_trials(trial_fns.not_a_dict, [{"id": "a"}])
    assert not record["ok"] and record["error"] == "TypeError: trial returned list, expected a dict"


@pytest.mark.parametrize("name", ["pool", "ray"])
def test_an_interrupted_driver_stops_the_trials_in_flight_and_re_raises(name, tmp_path, request):
    """A KeyboardInterrupt in the driver (raised here from on_result, after the fast trial) cancels
    the slow trial still running: the pool's worker is terminated, Ray's task is cancelled and its
    CPU freed."""
    backend, workers = BACKENDS[name]
    if backend == "ray":
        request.getfixturevalue("ray_cluster")
    pid_file = tmp_path / "slow.pid"
    items = [{"id": "slow", "s": 60, "pid_file": str(pid_file)}, {"id": "fast", "s": 0}]

    def interrupt(record):
        while not pid_file.exists():  # the slow trial is surely running
            time.sleep(0.05)
        raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_trials(trial_fns.nap, items, backend=backend, workers=workers, on_result=interrupt)
    assert time.monotonic() - start < 30
    slow = int(pid_file.read_text())
    for _ in range(100):
        if not _alive(slow):
            break
        time.sleep(0.1)
    assert not _alive(slow), "the slow trial's worker still runs"
    if backend == "ray":
        for _ in range(100):
            if ray.available_resources().get("CPU") == 2:
                break
            time.sleep(0.1)
        assert ray.available_resources().get("CPU") == 2


DRIVER = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal gives it (a test runner may ignore it)
sys.path.insert(0, sys.argv[3])
import trial_fns
from secateur.distributed import run_trials
items = [{"id": f"s{i}", "s": 60, "pid_file": f"{sys.argv[2]}/{i}.pid"} for i in range(2)]
run_trials(trial_fns.nap, items, backend=sys.argv[1], workers=2)
"""


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_ctrl_c_in_a_driver_process_ends_its_trials(backend, tmp_path):
    """A real SIGINT to a driver (its own pool, or its own Ray instance) while two 60 s trials run:
    KeyboardInterrupt ends the driver, and the processes that ran the trials are gone."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, backend, str(tmp_path), str(Path(trial_fns.__file__).parent)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_files = [tmp_path / "0.pid", tmp_path / "1.pid"]
    deadline = time.monotonic() + 60
    while not all(f.exists() and f.read_text() for f in pid_files) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert driver.poll() is None, driver.communicate()[1][-2000:]
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=30)
    assert driver.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
    pids = [int(f.read_text()) for f in pid_files]
    for _ in range(100):
        if not any(_alive(pid) for pid in pids):
            break
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), "a trial's worker outlived the interrupted driver"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def not_module_level():
    def inner(item):
        return item

    return inner


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_lambda_or_a_closure_is_refused_in_one_line(backend):
    with pytest.raises(SecateurError, match=r"lambda or a nested function.*top level of a module") as err:
        run_trials(lambda item: item, ITEMS, backend=backend)
    assert "\n" not in str(err.value)
    with pytest.raises(SecateurError, match="lambda or a nested function"):
        run_trials(not_module_level(), ITEMS, backend=backend)


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "rya"}, "did you mean 'ray'"),
    ({"workers": 0}, "workers must be an integer >= 1"),
    ({"cpus_per_trial": 1.5}, "cpus_per_trial must be an integer >= 1"),
    ({"address": "ray://x:1"}, "needs backend='ray'"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(SecateurError, match=message):
        run_trials(trial_fns.square, ITEMS, **kwargs)


@pytest.mark.parametrize("items, message", [
    ([{"x": 1}], r"items\[0\] must be a dict with a string 'id'"),
    ([{"id": "a"}, {"id": "a"}], "appears twice"),
    ([{"id": "a", "x": object()}], "not JSON-able"),
])
def test_bad_items_are_one_line_errors(items, message):
    with pytest.raises(SecateurError, match=message):
        run_trials(trial_fns.square, items)


def test_without_ray_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(SecateurError, match=r"pip install 'secateur\[ray\]'"):
        run_trials(trial_fns.square, ITEMS, backend="ray")


def test_import_secateur_never_imports_ray_and_only_its_ray_backends_name_it():
    code = ("import sys, secateur, secateur.distributed, secateur.serve; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    src = Path(__file__).resolve().parents[2] / "src" / "secateur"
    importers = set()
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == "ray" or n.startswith("ray.") for n in names):
                importers.add(str(path.relative_to(src)))
    # Ray is imported by the trial runner and by the gateway's Ray Serve backend, nowhere else
    assert importers == {"distributed/ray_trials.py", "serve/ray_backend.py"}
