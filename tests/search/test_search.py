"""A real search on stories260K: a tiny space (3 candidates), trials built as pipelines and measured
by perplexity on the first 40 P1 windows and the P4 speed protocol (3 runs a round here), the front registered; resumed without
re-running a finished trial, after a SIGKILL too; the budget; the Ray backend (a Ray Tune experiment) on a local instance."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from secateur.search import SearchSpace, search
from secateur.search.run import SPEED_TOLERANCE, _meets, dominates, parse_alias

SPACE = {"name": "tiny", "data": {"source": "tinystories", "samples": 16, "seq_len": 128}, "proxy_samples": 4,
         "eval": {"task": "perplexity", "data": "tinystories", "options": {"max_windows": 40}},  # quick, not P1
         "speed": {"runs": 3},
         "axes": {"sparsity": ["none", {"method": "magnitude", "sparsity": 0.4}],
                  "quant": ["none", {"method": "rtn", "bits": 8, "strategy": "channel"}]},
         "constraints": ["quality_drop <= 50%"], "trials": 3}


@pytest.fixture(scope="module")
def searched(stories_dir, data_dir, tmp_path_factory):
    from secateur.registry import Registry

    work, home = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("home")
    registry = Registry(home)
    result = search(str(stories_dir), SearchSpace.from_dict(SPACE, "causal"), budget="20m", workdir=work,
                    registry=registry, aliases=dict([parse_alias("small=bytes<=0.5x")]))
    yield result, work, registry
    registry.close()


def test_a_search_measures_its_candidates_and_registers_the_front(searched):
    from secateur.artifacts import load
    from secateur.evaluate import evaluate

    result, _, registry = searched
    assert result.coverage["measured"] == 3 == result.candidates and not result.coverage["stopped_by_budget"]
    measured = {p["id"]: p for p in result.points if p["measured"]}
    # the front: meets the constraints and no other measured point beats it (speeds from the confirming run)
    final = {cid: {**p["measured"], **(p["confirmed"] or {})} for cid, p in measured.items()}
    ok = {cid for cid, v in final.items() if not _meets(result_space().constraints, v)}
    expected = {c for c in ok if not any(dominates(final[d], final[c], SPEED_TOLERANCE) for d in ok if d != c)}
    assert set(result.front) == expected and expected
    # every point meeting the quality and size constraints was re-timed beside the dense model
    assert {cid for cid, p in measured.items() if p["confirmed"]} == {
        cid for cid, p in measured.items() if not _meets(result_space().constraints, p["measured"])}
    assert set(result.aliases) == {"best", "fastest", "smallest", "small"} and set(result.aliases.values()) <= set(result.front)
    assert min(final[c]["quality_drop"] for c in result.front) == final[result.aliases["best"]]["quality_drop"]
    # the recorded quality is what evaluating the registered artifact gives (the slow reference)
    best = registry.resolve(f"{result.family}@best")
    loaded = load(registry.path(best))
    again = evaluate(loaded.model, loaded.tokenizer, "perplexity", "tinystories", max_windows=40)
    assert again.value == pytest.approx(measured[result.aliases["best"]]["measured"]["quality"], rel=1e-6)
    # statuses, lineage, evaluations and every candidate as a search point
    variants = {v.name: v for v in registry.list(result.family)}
    for cid, p in measured.items():
        v = registry.resolve(result.registered[cid])
        assert v.status == ("admitted" if cid in result.front else "rejected")
        assert {e.task for e in registry.evaluations(v)} == {"perplexity", "speed"}
    both = next(p for p in result.points if p["choices"]["sparsity"] and p["choices"]["quant"])
    child = registry.resolve(result.registered[both["id"]])
    sparse_only = next(p for p in result.points if p["choices"]["sparsity"] and not p["choices"]["quant"])
    assert child.parent_id == result.registered[sparse_only["id"]]  # its first stage is that candidate, built once
    points = registry.search_points(result.family)
    assert len(points) == 3 and all(p["proxies"]["latency"] > 0 for p in points)
    assert {p["id"] for p in points if p["front"]} == set(result.front) and "base" in variants
    # the bytes proxy is close to the artifact's bytes; the correlation is reported
    for p in measured.values():
        assert p["proxies"]["bytes"] == pytest.approx(p["measured"]["bytes"], rel=0.15)
    assert result.correlation["points"] == 3
    saved = json.loads((Path(result.folder) / "result.json").read_text())
    assert saved["front"] == result.front
    # the report, read from the registry, draws the three points predicted and measured
    from secateur.report import collect, render

    html = render(collect(registry, result.family))
    section = html[html.index('<section id="search">'):]
    assert section[:section.index("</section>")].count('class="search-point') == 6


def result_space() -> SearchSpace:
    return SearchSpace.from_dict(SPACE, "causal")


def test_a_rerun_runs_no_finished_trial(searched, stories_dir, monkeypatch):
    import secateur.search.trial

    result, work, _ = searched

    def refuse(item):
        raise AssertionError("a finished trial ran again")

    monkeypatch.setattr(secateur.search.trial, "run_trial", refuse)
    again = search(str(stories_dir), result_space(), budget="5m", workdir=work, confirm=False)
    assert again.coverage["resumed"] == 3 and again.coverage["measured"] == 3
    first = {p["id"]: p["measured"]["quality"] for p in result.points}
    assert {p["id"]: p["measured"]["quality"] for p in again.points} == first


def test_a_spent_budget_starts_no_trial(stories_dir, data_dir, tmp_path):
    result = search(str(stories_dir), result_space(), budget="0.01s", workdir=tmp_path)
    assert result.coverage["measured"] == 0 and result.coverage["not_reached"] == 3
    assert result.coverage["stopped_by_budget"] and result.front == []


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_killed_search_resumes_without_re_running_a_finished_trial(stories_dir, data_dir, tmp_path, backend):
    if backend == "ray":
        pytest.importorskip("ray.tune")  # the dev extra installs it; Ray Tune runs for real
    space = tmp_path / "space.yaml"
    space.write_text(json.dumps({**SPACE, "name": "killed", "constraints": []}))
    cmd = [sys.executable, "-m", "secateur.cli", "search", str(stories_dir), "--space", str(space), "--budget", "20m",
           "-w", str(tmp_path / "work"), "--no-register", "--no-confirm", "--backend", backend]
    env = {**os.environ, "SECATEUR_PROGRESS": "0"}
    ray_dir = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env["RAY_TMPDIR"] = ray_dir  # the killed driver's Ray processes are found by it and stopped afterwards
    try:
        _kill_and_resume(cmd, env, tmp_path)
    finally:
        _kill_matching(ray_dir)
        shutil.rmtree(ray_dir, ignore_errors=True)


def _kill_matching(text: str) -> None:
    """SIGKILL every process whose command line mentions ``text`` (what a SIGKILLed Ray driver left)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def _kill_and_resume(cmd: list[str], env: dict, tmp_path: Path) -> None:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    journal = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "work" / "killed").glob("search-*/trials.jsonl"))
        if found and found[0].read_text().count("\n") >= 1:
            journal = found[0]
            break
        time.sleep(0.2)
    assert journal is not None, "no trial finished before the search ended"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [json.loads(line)["id"] for line in journal.read_text().splitlines()]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    ids = [json.loads(line)["id"] for line in journal.read_text().splitlines()]
    assert ids[: len(before)] == before and len(ids) == len(set(ids)) == 3  # nothing finished ran twice


def test_the_ray_backend_runs_trials_as_a_ray_tune_experiment(stories_dir, data_dir, tmp_path):
    pytest.importorskip("ray")  # the dev extra installs it; the test runs Ray for real
    seen = []
    space = SearchSpace.from_dict({**SPACE, "name": "on-ray", "trials": 2}, "causal")
    result = search(str(stories_dir), space, budget="20m", workdir=tmp_path, backend="ray", workers=2,
                    confirm=False, on_trial=seen.append)
    assert result.coverage["measured"] == 2 and len(seen) == 2
    assert all(r["ok"] and not r["worker"].endswith(f":{os.getpid()}") for r in seen)
