"""Run a pipeline: every variant built from its parent, cached, resumable, evaluated and gated.

    result = run_pipeline(Pipeline.load("family.yaml"), workdir="runs")

Each stage lives under ``workdir/<pipeline>/stages/<variant>-<key>/``; the key is a digest of the
variant's resolved steps and data, its parent's weights hash, the calibration data's fingerprint
and the secateur version. A stage whose ``artifact/`` verifies is reused without compressing
again; a stage killed halfway resumes from its own ``resume/`` checkpoints (the calibration loop's
blocks, the training loop's steps), and the artifact appears under its final name only once it
is complete (``secateur.save`` is atomic). Evaluations and gate evidence are cached beside the
artifact, keyed by what they depend on (the machine too, for speed), so a finished pipeline
re-runs in seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from .._version import __version__
from ..errors import SecateurError
from .gates import (bytes_verdict, failure_line, measure_speed, peak_rss, quality_verdict, rss_verdict,
                    speed_verdict)
from .spec import BASE, Gate, Pipeline

log = logging.getLogger(__name__)


@dataclass
class Stage:
    """One variant's outcome."""

    name: str
    parent: str
    key: Optional[str] = None
    artifact: Optional[str] = None
    weights_sha256: Optional[str] = None
    cached: bool = False
    seconds: float = 0.0
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    status: str = "pending"          # pending | built | admitted | rejected | skipped | failed
    aliases: tuple[str, ...] = ()
    error: Optional[str] = None
    predicted: Optional[dict[str, Any]] = None   # the planner's seconds and peak RSS, when it ran first

    @property
    def admitted(self) -> bool:
        return self.status == "admitted"


@dataclass
class PipelineResult:
    name: str
    family: str
    base: str
    base_weights_sha256: str
    base_evaluations: list[dict[str, Any]]
    stages: dict[str, Stage]
    workdir: str
    seconds: float = 0.0
    base_speed: Optional[dict[str, Any]] = None
    speed: dict[str, dict[str, Any]] = field(default_factory=dict)   # variant -> P4 medians, timed beside the base
    registered: dict[str, str] = field(default_factory=dict)        # variant -> registry id
    run_id: Optional[str] = None

    @property
    def failures(self) -> list[str]:
        lines = []
        for name, stage in self.stages.items():
            lines += [failure_line(name, v) for v in stage.verdicts if not v["passed"]]
            if stage.status == "failed":
                lines.append(f"variant '{name}' failed: {stage.error}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["failures"] = self.failures
        return out


# --- keys and caches ------------------------------------------------------------------------------
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stage_key(pipeline: Pipeline, name: str, parent_sha: str, data_fingerprint: Any) -> str:
    recipe = pipeline.variants[name].recipe
    return _digest({"steps": [s.to_dict() for s in recipe.steps], "data": recipe.data.to_dict() if recipe.data else None,
                    "parent": parent_sha, "data_fingerprint": data_fingerprint, "secateur": __version__})[:16]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a temporary sibling, fsynced, renamed over."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class _Cache:
    """A JSON file of results keyed by a digest of what they depend on."""

    def __init__(self, path: Path):
        self.path = path
        self.data = _read_json(path)

    def get(self, key_obj: Any) -> Any:
        return self.data.get(_digest(key_obj))

    def put(self, key_obj: Any, value: Any) -> Any:
        """Under a lock, merged with what other processes wrote since (trials of a search share it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path.with_name(self.path.name + ".lock")):
            self.data = {**self.data, **_read_json(self.path), _digest(key_obj): value}
            _write_json(self.path, self.data)
        return value


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` held across processes (flock: released if the holder dies)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _machine_key() -> str:
    from ..runtime import machine

    return machine.key()


# --- the run --------------------------------------------------------------------------------------
class _Runner:
    def __init__(self, pipeline: Pipeline, workdir: Path, keep_going: bool):
        from ..artifacts import weights_hash
        from ..models import resolve
        from ..registry import resolve_model

        self.p, self.keep_going = pipeline, keep_going
        self.root = Path(workdir).expanduser().resolve() / pipeline.name
        self.base_path = resolve(str(resolve_model(pipeline.base)))  # a path, hub id or registry ref
        self.base_sha = weights_hash(self.base_path)
        self.stages = {n: Stage(n, v.parent, aliases=v.aliases) for n, v in pipeline.variants.items()}
        self.evals = _Cache(self.root / "evaluations.json")
        self._tokenizer: Any = None
        self._models: dict[str, Any] = {}

    # paths and hashes of a variant or the base
    def path_of(self, name: str) -> Path:
        return self.base_path if name == BASE else Path(self.stages[name].artifact)

    def sha_of(self, name: str) -> Optional[str]:
        return self.base_sha if name == BASE else self.stages[name].weights_sha256

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        return self._tokenizer

    def data_for(self, name: str) -> Any:
        from .recipe_run import calibration_data

        recipe = self.p.variants[name].recipe
        return calibration_data(recipe, self.tokenizer()) if recipe.data is not None else None

    def stage_dir(self, name: str, key: str) -> Path:
        return self.root / "stages" / f"{name}-{key}"

    def key_of(self, name: str) -> Optional[str]:
        parent_sha = self.sha_of(self.p.variants[name].parent)
        if parent_sha is None:
            return None
        data = self.data_for(name)
        return stage_key(self.p, name, parent_sha, getattr(data, "fingerprint", None))

    # building
    def build(self, name: str) -> None:
        stage, variant = self.stages[name], self.p.variants[name]
        start = time.perf_counter()
        data = self.data_for(name)
        stage.key = stage_key(self.p, name, self.sha_of(variant.parent), getattr(data, "fingerprint", None))
        folder = self.stage_dir(name, stage.key)
        # one builder per stage across processes: a second (a search trial sharing this prefix) waits,
        # then finds it cached
        with _locked(folder.parent / f".{folder.name}.lock"):
            self._build_locked(name, stage, variant, data, folder, start)

    def _build_locked(self, name: str, stage: Stage, variant: Any, data: Any, folder: Path, start: float) -> None:
        from ..api import compress_
        from ..artifacts import load, save, verify

        artifact = folder / "artifact"
        if (artifact / "compression.json").is_file():
            try:
                card = verify(artifact)
                stage.cached, stage.artifact, stage.weights_sha256 = True, str(artifact), card["weights_sha256"]
                stage.status = "built"
                log.info("%s: cached (%s)", name, artifact)
                return
            except SecateurError as exc:  # a damaged cache entry is rebuilt, never trusted
                log.warning("%s: cached artifact does not verify (%s); building it again", name, exc)
                shutil.rmtree(artifact, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        loaded = load(self.path_of(variant.parent))
        model = loaded.model
        compress_(model, variant.recipe, data=data, checkpoint_dir=folder / "resume", tokenizer=loaded.tokenizer)
        recipe = {**variant.recipe.to_dict(), "model": f"{self.p.name}/{variant.parent}", "name": name}
        save(model, artifact, tokenizer=loaded.tokenizer, recipe=recipe,
             extra={"pipeline": self.p.name, "family": self.p.family, "variant": name, "parent": variant.parent})
        shutil.rmtree(folder / "resume", ignore_errors=True)
        card = verify(artifact)
        stage.artifact, stage.weights_sha256, stage.status = str(artifact), card["weights_sha256"], "built"
        stage.seconds = round(time.perf_counter() - start, 3)

    # evaluating
    def model(self, name: str) -> Any:
        if name not in self._models:
            from ..artifacts import load

            self._models[name] = load(self.path_of(name)).model
        return self._models[name]

    def evaluate(self, name: str) -> list[dict[str, Any]]:
        from ..evaluate import evaluate
        from ..runtime import optimize_

        results = []
        for spec in self.p.eval:
            key = {"weights": self.sha_of(name), "eval": spec.to_dict(), "secateur": __version__,
                   "machine": _machine_key()}
            cached = self.evals.get(key)
            if cached is None:
                model = optimize_(self.model(name))
                tokenizer = self.tokenizer()
                result = evaluate(model, tokenizer, spec.task, spec.data, **dict(spec.options)).to_dict()
                cached = self.evals.put(key, {"spec": spec.to_dict(), **result})
            results.append(cached)
        return results

    def gate(self, name: str, gate: Gate, base_evals: list[dict[str, Any]]) -> dict[str, Any]:
        from ..artifacts import verify

        stage = self.stages[name]
        against = BASE if gate.against == "base" else self.p.variants[name].parent
        if gate.kind == "quality":
            ref_evals = base_evals if against == BASE else self.stages[against].evaluations
            return quality_verdict(gate, _pick(stage.evaluations, gate), _pick(ref_evals, gate))
        if gate.kind == "max_bytes":
            return bytes_verdict(gate, verify(stage.artifact))
        if gate.kind == "max_peak_rss":
            key = {"rss": stage.weights_sha256, "machine": _machine_key(), "runtime": "eager"}
            measured = self.evals.get(key) or self.evals.put(key, peak_rss(stage.artifact))
            return rss_verdict(gate, measured)
        key = {"speed": [self.sha_of(against), stage.weights_sha256], "runtime": gate.runtime,
               "machine": _machine_key(), "secateur": __version__}
        pair = self.evals.get(key)
        if pair is None:  # fresh copies: the evaluations' models run fused, an eager gate times them as loaded
            from ..artifacts import load
            from ..runtime import optimize_

            models = [load(self.path_of(against)).model, load(self.path_of(name)).model]
            if gate.runtime == "fused":
                models = [optimize_(m) for m in models]
            pair = self.evals.put(key, measure_speed(models, compile=gate.runtime == "compiled"))
        return speed_verdict(gate, pair[1], pair[0])

    def run(self) -> PipelineResult:
        from ..progress import track

        start = time.perf_counter()
        self.root.mkdir(parents=True, exist_ok=True)
        base_evals = self.evaluate(BASE)
        order = self.p.order()
        for name in track(order, f"pipeline {self.p.name}", total=len(order)):
            stage, variant = self.stages[name], self.p.variants[name]
            parent = self.stages.get(variant.parent)
            if parent is not None and parent.status in ("failed", "skipped", "pending"):
                stage.status, stage.error = "skipped", f"its parent '{variant.parent}' was not built"
                continue
            try:
                log.info("stage %s (from %s)", name, variant.parent)
                self.build(name)
                stage.evaluations = self.evaluate(name)
                stage.verdicts = [self.gate(name, g, base_evals) for g in self.p.gates_of(name)]
            except SecateurError as exc:
                if not self.keep_going:
                    raise
                stage.status, stage.error = "failed", str(exc)
                continue
            stage.status = "admitted" if all(v["passed"] for v in stage.verdicts) else "rejected"
            if stage.status == "rejected":
                for verdict in stage.verdicts:
                    if not verdict["passed"]:
                        log.warning(failure_line(name, verdict))
                if not self.keep_going:
                    break
            self._models = {k: m for k, m in self._models.items() if k == BASE}  # the base stays: most gates' reference
        for name in order:
            if self.stages[name].status == "pending":
                self.stages[name].status, self.stages[name].error = "skipped", "the run stopped at a failed gate"
        result = PipelineResult(self.p.name, self.p.family, self.p.base, self.base_sha, base_evals, self.stages,
                                str(self.root))
        if self.p.speed:
            result.base_speed, result.speed = self.family_speed()
        result.seconds = round(time.perf_counter() - start, 3)
        _write_json(self.root / "result.json", result.to_dict())
        return result

    def family_speed(self) -> tuple[Optional[dict[str, Any]], dict[str, dict[str, Any]]]:
        """P4 speed of the base and every built variant in the runtime's fastest eager form, measured
        together (alternating round by round), cached by the set of weights and the machine."""
        from ..artifacts import load
        from ..runtime import optimize_

        built = [n for n, s in self.stages.items() if s.weights_sha256 is not None]
        key = {"family_speed": [self.base_sha] + [self.stages[n].weights_sha256 for n in built],
               "machine": _machine_key(), "secateur": __version__}
        timed = self.evals.get(key)
        if timed is None:
            models = [optimize_(load(self.path_of(n)).model) for n in [BASE] + built]
            timed = self.evals.put(key, measure_speed(models))
        return timed[0], dict(zip(built, timed[1:]))

    def resources(self, costs: Any = None, available: Any = None, rows: Any = None) -> Any:
        """The resource plan (:mod:`secateur.planner`): each stage's predicted wall time and peak RSS on
        this machine, a stage already cached costing nothing; and whether the run fits in memory."""
        from ..planner import Data, StageSpec, plan_stages

        rows = {r["variant"]: r for r in (rows or self.plan())}
        specs = {}
        for name in self.p.order():
            variant = self.p.variants[name]
            ids = getattr(self.data_for(name), "input_ids", None)  # the set as built: a source may hold fewer windows
            data = Data(int(ids.shape[0]), int(ids.shape[1])) if ids is not None else Data()
            self._training_texts(variant.recipe.steps, data)
            cached = rows[name]["state"] == "cached"
            specs[name] = StageSpec(variant.parent, list(variant.recipe.steps), data,
                                    self.stages[name].artifact if cached else None)
        return plan_stages(str(self.base_path), specs, costs, available)

    def _training_texts(self, steps: Any, data: Any) -> None:
        """For an encoder's training step, the planner needs the length its batches pad to (the
        longest of each batch's texts, not ``seq_len``) and what tokenizing the texts costs: both are
        measured here by reading and tokenizing them (:func:`secateur.planner.training_texts`)."""
        from ..models.arch import arch_for
        from ..planner import training_texts

        config = json.loads((Path(self.base_path) / "config.json").read_text(encoding="utf-8"))
        if arch_for(config.get("model_type", "")).kind != "causal":
            training_texts(steps, self.tokenizer(), data)

    def plan(self) -> list[dict[str, Any]]:
        """What a run would do, without loading any model: each stage's key and whether it is cached."""
        rows = []
        for name in self.p.order():
            variant = self.p.variants[name]
            key = self.key_of(name)
            cached = False
            if key is not None:
                artifact = self.stage_dir(name, key) / "artifact"
                cached = (artifact / "compression.json").is_file()
                if cached:
                    card = _read_json(artifact / "compression.json")
                    self.stages[name].artifact, self.stages[name].weights_sha256 = str(artifact), card.get("weights_sha256")
            resume = key is not None and (self.stage_dir(name, key) / "resume").is_dir()
            rows.append({"variant": name, "parent": variant.parent, "key": key,
                         "steps": [s.method for s in variant.recipe.steps],
                         "state": "cached" if cached else "resumes" if resume else
                                  "runs" if key is not None else "runs (after its parent)",
                         "gates": [g.describe() for g in self.p.gates_of(name)], "aliases": list(variant.aliases)})
        return rows


def _pick(evaluations: list[dict[str, Any]], gate: Gate) -> dict[str, Any]:
    """The evaluation a quality gate reads: its task, and its data when the gate names one."""
    for e in evaluations:
        spec = e.get("spec") or {}
        if spec.get("task") == gate.quality and (gate.data is None or spec.get("data") == gate.data):
            return e
    raise SecateurError(f"gate '{gate.describe()}': no {gate.quality} evaluation to read")


def run_pipeline(pipeline: Pipeline, workdir: str | os.PathLike = "secateur-runs", keep_going: bool = False,
                 registry: Any = None, check_plan: bool = True) -> PipelineResult:
    """Build, evaluate and gate every variant of ``pipeline``; see the module docstring. With a
    :class:`~secateur.registry.Registry`, the base and every built variant are recorded there
    (admitted or rejected, with their evaluations, speed and gate verdicts) and the admitted ones
    get their aliases. With ``check_plan`` (the default) the resource plan is made first and a run
    predicted to exceed the memory available is refused before it starts (:mod:`secateur.planner`)."""
    runner = _Runner(pipeline, Path(workdir), keep_going)
    rows = runner.plan()
    if check_plan and any(r["state"] != "cached" for r in rows):  # a fully cached run builds nothing to plan
        plan = runner.resources(rows=rows)
        if not plan.fits:
            raise SecateurError(f"pipeline '{pipeline.name}': {plan.refusal()} (secateur plan shows the plan; "
                                "--no-plan runs anyway)")
        for sp in plan.stages:
            if sp.runs:
                runner.stages[sp.variant].predicted = {"seconds": sp.seconds, "peak_rss_bytes": round(sp.peak_bytes)}
    result = runner.run()
    if registry is not None:
        register(result, pipeline, registry)
        _write_json(Path(result.workdir) / "result.json", result.to_dict())
    return result


def _speed_evaluation(speed: dict[str, Any]) -> dict[str, Any]:
    """The family speed table's entry for one model, as an evaluation row (task speed, P4)."""
    settings = dict(speed.get("settings") or {})
    metric = "decode_tokens_per_s" if "decode_tokens_per_s" in speed else "latency_ms_median"
    extra = {k: v for k, v in speed.items() if k != "settings"}
    return {"task": "speed", "metric": metric, "protocol": settings.get("protocol"), "value": speed[metric],
            "extra": extra, "settings": settings}


def register(result: PipelineResult, pipeline: Pipeline, registry: Any) -> dict[str, str]:
    """Record ``result`` in ``registry``: one run; the base; each built variant with its parent edge,
    its status, its evaluations (and its speed), its gate verdicts as evidence; aliases for the
    admitted. Each variant is written in its own transactions, complete or not at all."""
    finished = {n: s for n, s in result.stages.items() if s.status in ("admitted", "rejected")}
    run = registry.start_run(pipeline.name, info={"family": pipeline.family, "base": pipeline.base,
                                                  "workdir": result.workdir, "source": pipeline.source})
    ids: dict[str, Any] = {}
    try:
        base = registry.add(_base_dir(pipeline), pipeline.family, name="base", run=run.id)
        ids[BASE] = base
        evaluations = list(result.base_evaluations)
        if result.base_speed:
            evaluations.append(_speed_evaluation(result.base_speed))
        registry.record_evaluations(base, evaluations, run=run.id)
        for name in pipeline.order():
            stage = finished.get(name)
            if stage is None:
                continue
            evidence = {"verdicts": stage.verdicts, "key": stage.key}
            variant = registry.add(stage.artifact, pipeline.family, name=name, parent=ids.get(stage.parent),
                                   status=stage.status, run=run.id, evidence=evidence)
            if variant.status != stage.status or variant.info.get("evidence") != evidence:  # the same bytes, re-gated
                variant = registry.set_status(variant, stage.status, evidence)
            ids[name] = variant
            evaluations = list(stage.evaluations)
            if name in result.speed:
                evaluations.append(_speed_evaluation(result.speed[name]))
            registry.record_evaluations(variant, evaluations, run=run.id)
            if stage.status == "admitted":
                for alias in stage.aliases:
                    registry.set_alias(pipeline.family, alias, variant)
    except BaseException:
        registry.finish_run(run, status="failed", timings={"seconds": result.seconds})
        raise
    registry.finish_run(run, status="failed" if result.failures else "succeeded",
                        timings={"seconds": result.seconds, **{n: s.seconds for n, s in result.stages.items()}},
                        verdicts=[{"variant": n, **v} for n, s in result.stages.items() for v in s.verdicts])
    result.registered = {n: v.id for n, v in ids.items()}
    result.run_id = run.id
    return result.registered


def _base_dir(pipeline: Pipeline) -> Path:
    from ..models import resolve
    from ..registry import resolve_model

    return resolve(str(resolve_model(pipeline.base)))


def plan_pipeline(pipeline: Pipeline, workdir: str | os.PathLike = "secateur-runs") -> list[dict[str, Any]]:
    """The DAG with each stage's cache key and state (cached, resumes, runs), loading no model."""
    return _Runner(pipeline, Path(workdir), False).plan()


def plan_resources(pipeline: Pipeline, workdir: str | os.PathLike = "secateur-runs", costs: Any = None,
                   available: Any = None) -> Any:
    """The resource plan of ``pipeline`` (:class:`secateur.planner.Plan`), loading no model."""
    return _Runner(pipeline, Path(workdir), False).resources(costs, available)


__all__ = ["run_pipeline", "plan_pipeline", "plan_resources", "register", "PipelineResult", "Stage", "stage_key"]
