"""The search: proxies first, measurement last, the measured Pareto front kept as a family.

1. Every candidate of the space gets its proxies (:mod:`secateur.search.proxy`): a predicted loss
   increase, latency and bytes. The proxies and the dense timing are kept in the search folder, so
   a resumed search does not measure them again.
2. The candidates the proxies predict to meet the constraints are ordered by predicted Pareto layer
   (the non-dominated first; inside a layer, fastest first) and the first ``space.trials`` are
   measured as trials (:func:`secateur.search.trial.run_trial`) on the chosen backend, until the
   time budget: after it no trial starts, the one in flight finishes.
3. Each finished trial is appended to ``trials.jsonl`` (one fsynced line), the record a resumed
   search reads: a finished trial is never run again.
4. The front: the measured trials that meet every constraint and that no other such trial beats on
   quality, speed and bytes at once (latencies within ``SPEED_TOLERANCE`` of each other are ties:
   a worse variant is not kept for timing a few percent faster by chance). With ``confirm`` (the default) the trials that meet the quality
   and size constraints are first timed again, together with the dense model in one alternating run,
   and their speed is taken from that run. With a registry, every built stage is recorded (front
   members admitted; the rest rejected with the reason), every candidate is kept as a search point
   with its proxies and measurements, and the aliases (``best``, ``fastest``, ``smallest`` and the
   user's) move to front members.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import SecateurError
from .space import Candidate, Constraint, SearchSpace, _digest

log = logging.getLogger(__name__)

BUILTIN_ALIASES = ("best", "fastest", "smallest")
CONFIRM_AT_MOST = 24          # trials re-timed together at the end (the fastest first)
SPEED_TOLERANCE = 0.05        # measured latencies closer than this (or than twice the standard error of
                              # their difference, from the rounds) are ties on the front: a killed and
                              # resumed search otherwise kept a worse variant that timed 5% faster by chance


@dataclass
class SearchResult:
    name: str
    family: str
    base: str
    folder: str
    candidates: int
    points: list[dict[str, Any]]                 # every candidate: choices, label, proxies, measured (or None)
    front: list[str]                             # candidate ids on the measured front
    aliases: dict[str, str] = field(default_factory=dict)   # alias -> candidate id
    correlation: dict[str, Optional[float]] = field(default_factory=dict)
    coverage: dict[str, Any] = field(default_factory=dict)
    confirmed: dict[str, Any] = field(default_factory=dict)
    registered: dict[str, str] = field(default_factory=dict)  # candidate id -> variant id
    run_id: Optional[str] = None
    seconds: float = 0.0

    def point(self, cid: str) -> dict[str, Any]:
        return next(p for p in self.points if p["id"] == cid)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("name", "family", "base", "folder", "candidates", "points", "front",
                                              "aliases", "correlation", "coverage", "confirmed", "registered",
                                              "run_id", "seconds")}


# --- small pieces ----------------------------------------------------------------------------------
def parse_budget(text: Any) -> float:
    """``90s``, ``30m``, ``1.5h`` or a number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        raw = str(text).strip().lower()
        units = {"s": 1, "m": 60, "h": 3600}
        try:
            seconds = float(raw[:-1]) * units[raw[-1]] if raw and raw[-1] in units else float(raw)
        except ValueError:
            raise SecateurError(f"budget {text!r}: expected a time such as 90s, 30m or 1.5h") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise SecateurError(f"budget {text!r}: expected a positive time such as 30m")
    return seconds


def parse_alias(text: str) -> tuple[str, list[Constraint]]:
    """``fast=latency<=0.4x`` (several constraints joined by ``,``): the alias goes to the best
    front member meeting them."""
    from .space import NAME

    name, sep, rule = text.partition("=")
    name = name.strip()
    if not sep or not NAME.match(name) or not rule.strip():
        raise SecateurError(f"--alias {text!r}: expected NAME=CONSTRAINTS such as fast='latency<=0.4x'")
    if name in BUILTIN_ALIASES:
        raise SecateurError(f"--alias {name}: '{name}' is set by the search itself ({', '.join(BUILTIN_ALIASES)})")
    return name, [Constraint.parse(part, f"--alias {name}") for part in rule.split(",")]


def dominates(a: dict[str, float], b: dict[str, float], tolerance: float = 0.0) -> bool:
    """``a`` at least as good as ``b`` on every objective (quality drop, latency, bytes: lower is
    better) and strictly better on one. A measured latency is only known to the noise of its rounds:
    two latencies closer than ``tolerance`` (a fraction of ``b``'s) or than twice the standard error
    of their difference (``latency_se``, when the points carry it) count as equal."""
    margin = max(tolerance * b["latency"], 2.0 * math.hypot(a.get("latency_se") or 0.0, b.get("latency_se") or 0.0))
    no_worse = (a["quality_drop"] <= b["quality_drop"] and a["bytes"] <= b["bytes"]
                and a["latency"] <= b["latency"] + margin)
    better = (a["quality_drop"] < b["quality_drop"] or a["bytes"] < b["bytes"]
              or a["latency"] < b["latency"] - margin)
    return no_worse and better


def pareto_front(points: dict[str, dict[str, float]], tolerance: float = 0.0) -> list[str]:
    return [k for k, p in points.items()
            if not any(dominates(q, p, tolerance) for j, q in points.items() if j != k)]


def pareto_layers(points: dict[str, dict[str, float]], tolerance: float = 0.0) -> list[list[str]]:
    left, layers = dict(points), []
    while left:
        layer = pareto_front(left, tolerance)
        layers.append(layer)
        for k in layer:
            left.pop(k)
    return layers


def spearman(xs: list[float], ys: list[float]) -> Optional[float]:
    """Spearman's rank correlation (average ranks for ties); None under 3 points or without spread."""
    if len(xs) < 3:
        return None

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2.0
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return None if sx == 0 or sy == 0 else sxy / (sx * sy)


class Journal:
    """``trials.jsonl``: one complete JSON line per finished trial, appended and fsynced; a torn
    last line (a kill mid-write) is ignored on reading."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                out[record["id"]] = record
        return out

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, default=str)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _meets(constraints: tuple[Constraint, ...] | list[Constraint], values: dict[str, Any], slack: float = 0.0) -> list[str]:
    """The constraints ``values`` breaks (empty: it meets them all); ``slack`` widens each limit by
    that fraction (proxies are estimates)."""
    broken = []
    for c in constraints:
        value = c.value_of(values)
        if value is None:
            continue
        limit = c.value * (1 + slack) if c.op in ("<=", "<") else c.value * (1 - slack)
        if not Constraint(c.metric, c.op, limit, c.unit, c.text).holds(value):
            broken.append(c.text)
    return broken


# --- the search ----------------------------------------------------------------------------------
def search(model: str, space: Optional[SearchSpace] = None, *, budget: Any = "30m", backend: str = "local",
           workers: int = 1, workdir: str | os.PathLike = "secateur-runs", registry: Any = None,
           aliases: Optional[dict[str, list[Constraint]]] = None, family: Optional[str] = None,
           confirm: bool = True, plan: bool = True,
           on_trial: Optional[Callable[[dict[str, Any]], None]] = None) -> SearchResult:
    """Search ``space`` (default: the model kind's) on ``model``; see the module docstring."""
    from ..artifacts import load, weights_hash
    from ..distributed import run_trials
    from ..models import resolve
    from ..pipeline.run import _write_json
    from ..registry import resolve_model
    from .proxy import measure_sensitivity, predict
    from .space import kind_of
    from .trial import measure_pair, speed_value

    started = time.perf_counter()
    deadline = time.monotonic() + parse_budget(budget)
    if backend not in ("local", "ray"):
        raise SecateurError(f"backend {backend!r} is not known; valid: 'local', 'ray'")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SecateurError(f"workers {workers!r}: expected a whole number >= 1")
    base_path = str(resolve(str(resolve_model(model))))
    kind = kind_of(base_path)
    space = space or SearchSpace.default(kind, name=f"{Path(base_path).name}-search")
    if space.kind != kind:
        raise SecateurError(f"the search space is for {space.kind} models but {model} is a {kind} model")
    family = family or space.name
    base_sha = weights_hash(base_path)
    workdir = Path(workdir).expanduser().resolve()
    folder = workdir / space.name / f"search-{_digest([space.fingerprint(), base_sha])[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "space.json", {"space": space.to_dict(), "base": base_path, "base_sha256": base_sha})
    candidates = space.candidates()
    by_id = {c.id: c for c in candidates}

    # 1. proxies (kept: a resumed search reads them)
    proxies_file = folder / "proxies.json"
    saved = _read(proxies_file)
    if saved.get("candidates") and set(saved["candidates"]) >= set(by_id):
        proxies, dense_seconds, sensitivity = saved["candidates"], saved["dense_seconds"], saved["sensitivity"]
    else:
        loaded = load(base_path)
        from ..pipeline.gates import measure_speed
        from ..runtime import optimize_
        from .trial import speed_options

        dense_timed = measure_speed([optimize_(loaded.model)], rounds=1, options=speed_options(space))[0]
        dense_seconds = speed_value(space, dense_timed)
        table = measure_sensitivity(loaded.model, loaded.tokenizer, space, candidates)
        proxies = predict(space, candidates, table, base_path, dense_seconds)
        sensitivity = table.to_dict()
        _write_json(proxies_file, {"candidates": proxies, "dense_seconds": dense_seconds, "sensitivity": sensitivity})
        del loaded

    # 2. order: predicted to meet the latency/bytes constraints (with slack), by predicted Pareto layer
    structural = [c for c in space.constraints if c.metric != "quality_drop"]
    eligible = {cid: p for cid, p in proxies.items() if cid in by_id and not _meets(structural, p, slack=0.15)}
    objectives = {cid: {"quality_drop": p["loss_delta"], "latency": p["latency"], "bytes": p["bytes"]}
                  for cid, p in eligible.items()}
    order: list[str] = []
    for layer in pareto_layers(objectives):
        order += sorted(layer, key=lambda cid: (objectives[cid]["latency"], objectives[cid]["quality_drop"]))
    chosen = order[: space.trials]

    # 3. trials (the journal first: finished trials are not run again)
    journal = Journal(folder / "trials.jsonl")
    done = journal.read()
    base_bytes = sum(f.stat().st_size for f in Path(base_path).glob("*.safetensors")) or 1
    raw_space = {**space.raw, "name": space.name}
    items = [{"id": cid, "choices": by_id[cid].choices(), "space": raw_space, "kind": kind, "base": base_path,
              "base_path": base_path, "base_bytes": base_bytes, "workdir": str(workdir), "plan": plan,
              "threads": None if backend == "local" and workers == 1 else max(1, (os.cpu_count() or 1) // workers)}
             for cid in chosen if cid not in done or not done[cid].get("ok")]
    resumed = sum(1 for cid in chosen if cid in done and done[cid].get("ok"))
    if resumed:
        log.info("search %s: %d finished trial(s) read from %s", space.name, resumed, journal.path)

    def finished(record: dict[str, Any]) -> None:
        journal.append(record)
        done[record["id"]] = record
        if record.get("ok"):
            r = record["result"]
            log.info("trial %s %s: quality %.4g (drop %+.3g), %.2fx faster, %.2fx bytes, %.0f s", record["id"],
                     r["label"], r["quality"], r["quality_drop"], r["speedup"], r["bytes"], record["seconds"])
        else:
            log.warning("trial %s (%s) failed: %s", record["id"], by_id[record["id"]].label(), record["error"])
        if on_trial is not None:
            on_trial(record)

    if items and time.monotonic() < deadline:
        # --backend ray runs the trials as a Ray Tune experiment (resources declared per trial); the
        # journal, not Tune's experiment state, is what a resumed search reads
        run_trials(_trial_fn(), items, backend="tune" if backend == "ray" else "local", workers=workers,
                   cpus_per_trial=items[0]["threads"] or 1, deadline=deadline, on_result=finished)
    measured = {cid: r["result"] for cid, r in done.items() if r.get("ok") and cid in by_id}
    failed = {cid: r["error"] for cid, r in done.items() if not r.get("ok") and cid in by_id and cid not in measured}

    # 4. the front: with confirm, every measured trial that meets the quality and size constraints is
    # timed again with the dense model in one alternating run, and the front is drawn from those ratios
    # (trials timed one by one, minutes apart, are noisier than variants timed side by side)
    confirmed: dict[str, Any] = {}
    quality_and_size = [c for c in space.constraints if c.metric in ("quality_drop", "bytes")]
    if confirm and measured:
        worth = [cid for cid, r in measured.items() if not _meets(quality_and_size, r)]
        worth = sorted(worth, key=lambda cid: measured[cid]["latency"])[:CONFIRM_AT_MOST]
        if worth:
            confirmed = _confirm(space, base_path, {cid: measured[cid]["artifact"] for cid in worth})
    final = {cid: {**r, **confirmed.get(cid, {})} for cid, r in measured.items()}
    meeting = {cid: r for cid, r in final.items() if not _meets(space.constraints, r)}
    front = pareto_front({cid: {k: r.get(k) for k in ("quality_drop", "latency", "bytes", "latency_se")}
                          for cid, r in meeting.items()}, SPEED_TOLERANCE)
    front.sort(key=lambda cid: final[cid]["latency"])
    alias_map = _choose_aliases(front, final, confirmed, aliases or {})

    points = []
    for c in candidates:
        m = measured.get(c.id)
        points.append({"id": c.id, "label": c.label(), "choices": c.choices(), "proxies": proxies.get(c.id),
                       "eligible": c.id in eligible, "rank": order.index(c.id) if c.id in order else None,
                       "measured": None if m is None else {k: m.get(k) for k in (
                           "quality", "quality_reference", "quality_drop", "quality_drop_pct", "latency", "latency_se", "speedup",
                           "bytes", "variant_bytes", "metric", "protocol", "seconds")},
                       "confirmed": confirmed.get(c.id), "error": failed.get(c.id),
                       "broken": _meets(space.constraints, final[c.id]) if m else None, "front": c.id in front})
    both = [p for p in points if p["measured"] and p["proxies"] and math.isfinite(p["proxies"]["loss_delta"])]
    correlation = {
        "quality": spearman([p["proxies"]["loss_delta"] for p in both], [p["measured"]["quality_drop"] for p in both]),
        "latency": spearman([p["proxies"]["latency"] for p in both], [p["measured"]["latency"] for p in both]),
        "bytes": spearman([p["proxies"]["bytes"] for p in both], [p["measured"]["bytes"] for p in both]),
        "points": len(both)}
    coverage = {"candidates": len(candidates), "eligible": len(eligible), "chosen": len(chosen),
                "measured": len(measured), "failed": len(failed), "resumed": resumed,
                "not_reached": len([cid for cid in chosen if cid not in done]),
                "budget_s": parse_budget(budget), "stopped_by_budget": time.monotonic() >= deadline and
                any(cid not in done for cid in chosen)}
    result = SearchResult(space.name, family, base_path, str(folder), len(candidates), points, front, alias_map,
                          correlation, coverage, confirmed)
    if registry is not None and front:
        register_search(result, space, done, registry)
    result.seconds = round(time.perf_counter() - started, 3)
    _write_json(folder / "result.json", result.to_dict())
    return result


def _trial_fn() -> Callable[[dict[str, Any]], dict[str, Any]]:
    from .trial import run_trial

    return run_trial


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _confirm(space: SearchSpace, base_path: str, artifacts: dict[str, str], rounds: int = 7) -> dict[str, Any]:
    """The front and the dense model timed together, alternating round by round (one run, ratios)."""
    from ..artifacts import load
    from ..pipeline.gates import measure_speed
    from ..runtime import optimize_
    from .trial import ratio_stats, speed_options, speed_value

    names = list(artifacts)
    models = [optimize_(load(base_path).model)] + [optimize_(load(artifacts[n]).model) for n in names]
    timed = measure_speed(models, rounds=rounds, options=speed_options(space))
    out = {}
    for n, t in zip(names, timed[1:]):
        latency, se = ratio_stats(t["rounds"], timed[0]["rounds"], space)
        out[n] = {"speedup": 1.0 / latency, "latency": latency, "latency_se": se, "rounds": rounds,
                  "round_latencies": [round(speed_value(space, r) / speed_value(space, d), 4)
                                      for r, d in zip(t["rounds"], timed[0]["rounds"])],
                  "settings": t.get("settings")}
    return out


def _choose_aliases(front: list[str], measured: dict[str, dict[str, Any]], confirmed: dict[str, Any],
                    user: dict[str, list[Constraint]]) -> dict[str, str]:
    if not front:
        return {}

    def speed(cid: str) -> float:
        return (confirmed.get(cid) or measured[cid])["speedup"]

    out = {"best": min(front, key=lambda c: (measured[c]["quality_drop"], -speed(c))),
           "fastest": max(front, key=lambda c: (speed(c), -measured[c]["quality_drop"])),
           "smallest": min(front, key=lambda c: (measured[c]["bytes"], measured[c]["quality_drop"]))}
    for name, rules in user.items():
        fits = [c for c in front if not _meets(rules, {**measured[c], **(confirmed.get(c) or {})})]
        if fits:
            out[name] = min(fits, key=lambda c: (measured[c]["quality_drop"], -speed(c)))
        else:
            log.warning("alias %s: no front member meets %s; not set", name, ", ".join(r.text for r in rules))
    return out


def register_search(result: SearchResult, space: SearchSpace, done: dict[str, dict[str, Any]], registry: Any) -> None:
    """Record the search in ``registry``: one run; the base; every stage the measured trials built
    (front members admitted, the rest rejected with the reason), their evaluations; the aliases;
    every candidate as a search point with its proxies and measurements."""
    from ..pipeline.run import _base_dir, _speed_evaluation  # noqa: F401  (the evaluation row format)

    run = registry.start_run(f"search:{space.name}", info={"kind": "search", "family": result.family,
                                                          "base": result.base, "folder": result.folder,
                                                          "space": space.to_dict(), "coverage": result.coverage,
                                                          "correlation": result.correlation})
    ids: dict[str, Any] = {}
    try:
        base = registry.add(result.base, result.family, name="base", run=run.id)
        names: dict[str, str] = {}
        labels = [p["label"] for p in result.points]
        for point in result.points:
            record = done.get(point["id"])
            if not point["measured"] or record is None or not record.get("ok"):
                continue
            trial = record["result"]
            parent = base
            for i, stage in enumerate(trial["stages"]):
                last = i == len(trial["stages"]) - 1
                on_front = last and point["front"]
                if last:
                    reason = None if on_front else ("breaks " + ", ".join(point["broken"]) if point["broken"]
                                                     else "dominated on the measured Pareto front")
                    name = point["label"].replace("+", "_")
                    name = name if labels.count(point["label"]) == 1 else f"{name}-{point['id'][:6]}"
                else:
                    reason, name = "an intermediate stage of the search", names.get(stage["name"], stage["name"])
                evidence = {"search": run.id, "candidate": point["id"], "reason": reason}
                # the same bytes added again return the variant already there (a shared prefix, or a
                # stage that is also a candidate of its own): its status is only ever raised here
                variant = registry.add(stage["artifact"], result.family, name=name, parent=parent, run=run.id,
                                       status="admitted" if on_front else "rejected", evidence=evidence)
                if last:
                    if on_front and variant.status != "admitted":
                        variant = registry.set_status(variant, "admitted", evidence)
                    ids[point["id"]] = variant
                    names.setdefault(stage["name"], variant.name)
                    evaluations = [trial["evaluation"],
                                   {"task": "speed", "metric": "speedup_vs_dense", "protocol": "P4",
                                    "value": (point["confirmed"] or trial)["speedup"],
                                    "extra": {"latency_ratio": (point["confirmed"] or trial)["latency"],
                                              "bytes_ratio": trial["bytes"], "confirmed": bool(point["confirmed"])},
                                    "settings": {"workload": space.speed, **(trial["speed"].get("settings") or {})}}]
                    registry.record_evaluations(variant, evaluations, run=run.id)
                else:
                    names.setdefault(stage["name"], variant.name)
                parent = variant
        for alias, cid in result.aliases.items():
            if cid in ids:
                registry.set_alias(result.family, alias, ids[cid])
        registry.record_search_points(run.id, result.family, [
            {**p, "variant_id": ids[p["id"]].id if p["id"] in ids else None} for p in result.points])
    except BaseException:
        registry.finish_run(run, status="failed")
        raise
    registry.finish_run(run, status="succeeded", timings={"seconds": result.seconds})
    result.registered = {cid: v.id for cid, v in ids.items()}
    result.run_id = run.id


__all__ = ["search", "SearchResult", "parse_budget", "parse_alias", "pareto_front", "pareto_layers", "spearman",
           "dominates", "Journal", "register_search"]
