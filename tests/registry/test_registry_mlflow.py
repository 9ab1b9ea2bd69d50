"""The MLflow mirror against a real local MLflow store (SQLite): runs with the recipe as params,
evaluations as metrics, the card as an artifact, lineage as tags, model versions and aliases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secateur.registry import Registry

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed (pip install 'secateur[mlflow]')")


def test_every_registry_write_is_mirrored_into_mlflow(made: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow keeps a SQLite store's artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = Registry(tmp_path / "home", mlflow_uri=uri)
    base = reg.add(made["base"], "stories", "base")
    pruned = reg.add(made["pruned"], "stories", "p50")
    reg.record_evaluation(pruned.id, {"task": "perplexity", "protocol": "P1", "metric": "perplexity", "value": 12.5})
    reg.set_alias("stories", "fast", pruned.id)
    reg.set_alias("stories", "fast", base.id)
    reg.rollback("stories", "fast")
    reg.set_alias("stories", "champion", base.id)

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("secateur/stories")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"stories/base", "stories/p50"}
    run = runs["stories/p50"]
    assert run.data.tags["secateur.variant_id"] == pruned.id and run.data.tags["secateur.parent_id"] == base.id
    assert run.data.tags["secateur.lineage"] == "stories/base > stories/p50"
    assert run.data.tags["secateur.steps"] == "magnitude" and run.data.tags["secateur.parent_ref"] == "stories/base"
    assert run.data.params["step0.method"] == "magnitude" and run.data.params["step0.sparsity"] == "0.5"
    assert run.data.metrics["perplexity.P1"] == 12.5 and run.data.metrics["bytes"] == pruned.bytes
    card = Path(client.download_artifacts(run.info.run_id, "secateur/compression.json", str(tmp_path)))
    assert json.loads(card.read_text()) == pruned.card

    versions = {v.tags["secateur.variant_id"]: v for v in client.search_model_versions("name = 'stories'")}
    assert set(versions) == {base.id, pruned.id}
    model = client.get_registered_model("stories")
    assert model.aliases == {"fast": versions[pruned.id].version, "champion": versions[base.id].version}

    reg.remove(pruned.id, force=True)  # leaves: its alias dropped, its version deleted, its run tagged
    model = client.get_registered_model("stories")
    assert model.aliases == {"champion": versions[base.id].version}
    assert [v.tags["secateur.variant_id"] for v in client.search_model_versions("name = 'stories'")] == [base.id]
    assert client.get_run(run.info.run_id).data.tags["secateur.removed"] == "true"

    from secateur.registry.mirror import MlflowMirror

    reg.record_evaluation(base.id, {"task": "sts", "metric": "spearman", "value": 0.75})
    assert MlflowMirror(uri).sync(reg) == {"families": 1, "runs": 1, "evaluations_logged": 0}  # all there already
    assert client.get_run(runs["stories/base"].info.run_id).data.metrics["sts.spearman"] == 0.75
    reg.close()


def test_the_mirror_catches_up_and_its_command(made: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from mlflow import MlflowClient

    from secateur.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SECATEUR_MLFLOW_URI", raising=False)
    home = tmp_path / "home"
    with Registry(home) as reg:  # no mirror while these were written
        v = reg.add(made["base"], "stories", "base")
        reg.record_evaluation(v.id, {"task": "sts", "metric": "spearman", "value": 0.5})
        reg.set_alias("stories", "fast", v.id)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["registry", "--home", str(home), "mirror", "--uri", uri, "--json"])
        raise SystemExit(0)
    assert info.value.code == 0
    assert json.loads(capsys.readouterr().out) == {"families": 1, "runs": 1, "evaluations_logged": 1}
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert {k: str(v) for k, v in client.get_registered_model("stories").aliases.items()} == {"fast": "1"}
    with pytest.raises(SystemExit) as info:
        main(["registry", "--home", str(home), "mirror"])
        raise SystemExit(0)
    assert info.value.code == 2 and "no MLflow tracking URI" in capsys.readouterr().err
