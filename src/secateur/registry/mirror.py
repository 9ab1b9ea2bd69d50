"""The MLflow mirror (optional extra ``mlflow``): the registry as MLflow sees it.

    mirror = MlflowMirror("sqlite:///mlflow.db")        # or SECATEUR_MLFLOW_URI for every Registry
    mirror.sync(Registry())                              # idempotent: logs what MLflow lacks

For each family an experiment ``secateur/<family>`` and a registered model ``<family>``; for each
variant a run named ``family/name`` with

- **params**: the resolved recipe, one per step field (``step0.method = magnitude``,
  ``step0.sparsity = 0.5``), or the checkpoint's config facts when it has no card;
- **metrics**: every evaluation as ``<task>.<metric>[.<protocol>]`` (step = the evaluation's id in
  the registry, so that re-syncing never logs one twice), plus ``bytes``, ``parameters`` and
  ``sparsity``;
- **artifacts**: the card (``secateur/compression.json``, or ``secateur/info.json`` for a
  checkpoint without one); the weights too with ``weights=True`` (``model/``);
- **tags**: ``secateur.variant_id``, ``secateur.status``, ``secateur.weights_sha256``, and the
  lineage: ``secateur.parent_id``, ``secateur.parent_ref``, ``secateur.lineage`` (the refs from
  the root, ``stories/base > stories/p50``), ``secateur.steps`` (the steps from the parent).

An admitted variant is also a version of the registered model (its source the run's artifacts,
tagged with the variant id), and the family's aliases are set on those versions, an alias the
registry no longer has deleted. The registry is the source of truth; with ``SECATEUR_MLFLOW_URI``
set, every :class:`~secateur.registry.Registry` write is mirrored as it happens (a mirror failure
is a warning, and ``secateur registry mirror`` catches up).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Optional

from .db import RegistryError

log = logging.getLogger(__name__)

TAG = "secateur.variant_id"


def _client(tracking_uri: str) -> Any:
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise RegistryError("the MLflow mirror needs mlflow: pip install 'secateur[mlflow]' (or unset "
                            "SECATEUR_MLFLOW_URI)") from None
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _params(variant: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    if variant.card is not None:
        steps = (variant.card.get("recipe") or {}).get("steps") or []
        for i, step in enumerate(steps):
            for key, value in (step or {}).items():
                out[f"step{i}.{key}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        base = variant.card.get("base_model") or {}
        if base.get("name"):
            out["base_model"] = str(base["name"])
    else:
        config = variant.info.get("config") or {}
        out.update({f"config.{k}": json.dumps(v) if not isinstance(v, str) else v for k, v in
                    (("model_type", config.get("model_type")), ("architectures", config.get("architectures")),
                     *(("quantization." + q, w) for q, w in (config.get("quantization") or {}).items()))
                    if v is not None})
    out["model_type"] = str(variant.model_type)
    return {k: v[:6000] for k, v in out.items()}


def _metric_key(e: Any) -> str:
    key = f"{e.task}.{e.metric}" if e.metric != e.task else e.task
    return key + (f".{e.protocol}" if e.protocol else "")


class MlflowMirror:
    """Mirror a registry into the MLflow tracking and model registry at ``tracking_uri``."""

    def __init__(self, tracking_uri: str, *, weights: bool = False):
        self.uri = tracking_uri
        self.weights = weights
        self.client = _client(tracking_uri)

    # --- lookups ------------------------------------------------------------------------------

    def experiment(self, family: str) -> str:
        name = f"secateur/{family}"
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else self.client.create_experiment(name)

    def run_of(self, variant_id: str, family: str) -> Optional[Any]:
        runs = self.client.search_runs([self.experiment(family)], filter_string=f"tags.`{TAG}` = '{variant_id}'",
                                       max_results=1)
        return runs[0] if runs else None

    def version_of(self, family: str, variant_id: str) -> Optional[Any]:
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name = '{family}'")
        except MlflowException:
            return None
        found = [v for v in versions if (v.tags or {}).get(TAG) == variant_id]
        return found[0] if found else None

    # --- mirroring ----------------------------------------------------------------------------

    def variant(self, registry: Any, variant: Any) -> str:
        """Log ``variant`` (its run, params, headline metrics, card, lineage tags; a model version
        when admitted) unless MLflow has it; return the run id."""
        run = self.run_of(variant.id, variant.family)
        run_id = self._new_run(registry, variant) if run is None else run.info.run_id
        if variant.status == "admitted" and self.version_of(variant.family, variant.id) is None:
            self._register(variant, run_id)
        return run_id

    def _new_run(self, registry: Any, variant: Any) -> str:
        chain = []
        node: Any = variant
        seen = set()
        while node is not None and node.id not in seen:
            seen.add(node.id)
            chain.append(node.ref)
            node = registry.resolve(node.parent_id) if node.parent_id else None
        edge_steps = [((s.get("step") or {}).get("method")) for s in (variant.card or {}).get("history") or []]
        parent = registry.resolve(variant.parent_id) if variant.parent_id else None
        tags = {TAG: variant.id, "secateur.family": variant.family, "secateur.name": variant.name,
                "secateur.status": variant.status, "secateur.weights_sha256": variant.weights_sha256,
                "secateur.store_key": variant.store_key, "secateur.lineage": " > ".join(reversed(chain)),
                "secateur.steps": " > ".join(str(s) for s in edge_steps) or "-",
                "secateur.parent_id": variant.parent_id or "-", "secateur.parent_ref": parent.ref if parent else "-"}
        run = self.client.create_run(self.experiment(variant.family), run_name=variant.ref, tags=tags)
        run_id = run.info.run_id
        from mlflow.entities import Metric, Param

        params = [Param(k, v) for k, v in _params(variant).items()]
        head = variant.headline()
        metrics = [Metric(k, float(head[k]), 0, 0) for k in ("bytes", "parameters", "sparsity")
                   if isinstance(head.get(k), (int, float))]
        self.client.log_batch(run_id, metrics=metrics, params=params)
        with tempfile.TemporaryDirectory() as tmp:
            name = "compression.json" if variant.card is not None else "info.json"
            (Path(tmp) / name).write_text(json.dumps(variant.card if variant.card is not None else variant.info,
                                                     indent=2, sort_keys=True))
            self.client.log_artifact(run_id, str(Path(tmp) / name), "secateur")
        if self.weights:
            self.client.log_artifacts(run_id, str(variant.path), "model")
        self.client.set_terminated(run_id, "FINISHED" if variant.status == "admitted" else "FAILED")
        return run_id

    def _register(self, variant: Any, run_id: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(variant.family)
        except MlflowException:
            self.client.create_registered_model(variant.family, description=f"secateur family {variant.family}")
        source = f"runs:/{run_id}/" + ("model" if self.weights else "secateur")
        return self.client.create_model_version(variant.family, source, run_id=run_id,
                                                tags={TAG: variant.id, "secateur.ref": variant.ref},
                                                description=variant.ref)

    def evaluations(self, registry: Any, variant: Any, run_id: Optional[str] = None) -> int:
        """Log the variant's evaluations MLflow lacks (each once: step = its registry id)."""
        from mlflow.entities import Metric

        run_id = run_id or self.variant(registry, variant)
        have: dict[str, set[int]] = {}
        todo = []
        for e in registry.evaluations(variant.id):
            if e.value is None:
                continue
            key = _metric_key(e)
            if key not in have:
                have[key] = {m.step for m in self.client.get_metric_history(run_id, key)}
            if e.id not in have[key]:
                todo.append(Metric(key, float(e.value), _millis(e.at), e.id))
        for start in range(0, len(todo), 500):
            self.client.log_batch(run_id, metrics=todo[start:start + 500])
        return len(todo)

    def aliases(self, registry: Any, family: str) -> None:
        """Set MLflow's aliases of the family's registered model to the registry's, dropping the others."""
        from mlflow.exceptions import MlflowException

        wanted = {a.name: a.variant_id for a in registry.aliases(family)}
        try:
            model = self.client.get_registered_model(family)
            current = dict(model.aliases or {})
        except MlflowException:
            if not wanted:
                return
            current = {}
        for alias, vid in wanted.items():
            version = self.version_of(family, vid)
            if version is None:  # not mirrored yet: log it (an alias target is admitted, so registered)
                self.variant(registry, registry.resolve(vid))
                version = self.version_of(family, vid)
            if str(current.get(alias)) != str(version.version):
                self.client.set_registered_model_alias(family, alias, version.version)
        for alias in set(current) - set(wanted):
            self.client.delete_registered_model_alias(family, alias)

    def removed(self, variant: Any) -> None:
        """A variant left the registry: tag its run, delete its model version."""
        run = self.run_of(variant.id, variant.family)
        if run is not None:
            self.client.set_tag(run.info.run_id, "secateur.removed", "true")
        version = self.version_of(variant.family, variant.id)
        if version is not None:
            self.client.delete_model_version(variant.family, version.version)

    def sync(self, registry: Any, family: Optional[str] = None) -> dict[str, int]:
        """Mirror every variant (of ``family``) and the aliases; returns how many runs exist and how
        many evaluations were logged."""
        runs = logged = 0
        families = [family] if family else registry.families()
        for fam in families:
            for variant in registry.list(fam):
                run_id = self.variant(registry, variant)
                runs += 1
                logged += self.evaluations(registry, variant, run_id)
            self.aliases(registry, fam)
        return {"families": len(families), "runs": runs, "evaluations_logged": logged}


def _millis(at: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp() * 1000)


__all__ = ["MlflowMirror"]
