"""Pipelines: a family of variants from one file, validated strictly, built from their parents,
cached by key, resumed after a kill, evaluated and admitted by measured gates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from secateur.errors import ConfigError
from secateur.pipeline import Gate, Pipeline, plan_pipeline, run_pipeline

EVAL = [{"task": "perplexity", "data": "tinystories", "options": {"max_windows": 12}}]


def family(base, **variants):
    return {"name": "fam", "base": str(base), "data": {"source": "tinystories", "samples": 8, "seq_len": 64},
            "eval": EVAL, "variants": variants}


# --- the file ---------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, path, message", [
    (lambda d: d.update(colour="red"), "colour", "unknown key"),
    (lambda d: d["variants"]["a"].update(parent="nope"), "variants.a.parent", "unknown parent 'nope'"),
    (lambda d: d["variants"].update(b={"parent": "c", "steps": [{"method": "magnitude"}]},
                                    c={"parent": "b", "steps": [{"method": "magnitude"}]}),
     "variants.b.parent", "cycle: b -> c -> b"),
    (lambda d: d["variants"]["a"].update(steps=[{"method": "magnitud"}]), "variants.a.steps[0].method", "magnitude"),
    (lambda d: d.update(gates=[{"quality": "sts", "max_drop": 1}]), "gates[0].quality", "not evaluated"),
    (lambda d: d.update(gates=[{"max_bytes": "2 parsecs"}]), "gates[0].max_bytes", "expected a positive size"),
    (lambda d: d.update(gates=[{"speed": "decode", "min_speedup": 2, "max_bytes": 5}]), "gates[0]", "exactly one"),
    (lambda d: d.update(gates=[{"speed": "decode", "min_speedup": 2, "runtime": "onnx"}]), "gates[0].runtime",
     "expected one of"),
    (lambda d: d["variants"]["a"].update(aliases=["x"]) or d["variants"].update(
        b={"steps": [{"method": "magnitude"}], "aliases": ["x"]}), "variants.b.aliases", "already given"),
])
def test_a_bad_pipeline_is_one_line_naming_its_path(edit, path, message):
    data = family("m", a={"steps": [{"method": "magnitude"}]})
    edit(data)
    with pytest.raises(ConfigError) as info:
        Pipeline.from_dict(data)
    assert info.value.path == path and message in str(info.value) and "\n" not in str(info.value)


def test_gates_parse_sizes_and_describe_themselves():
    assert Gate.from_dict({"max_bytes": "1.5MB"}, "g").max_bytes == 1_500_000
    assert Gate.from_dict({"max_peak_rss": "2GiB"}, "g").max_peak_rss == 2 * 2**30
    gate = Gate.from_dict({"quality": "perplexity", "max_drop_pct": 5, "against": "parent"}, "g")
    assert gate.describe() == "perplexity drop <= 5.0% vs parent" and gate.to_dict()["against"] == "parent"


def test_order_is_parents_first():
    p = Pipeline.from_dict(family("m", c={"parent": "b", "steps": [{"method": "rtn"}]},
                                  b={"parent": "a", "steps": [{"method": "magnitude"}]},
                                  a={"steps": [{"method": "magnitude"}]}))
    assert p.order() == ["a", "b", "c"] and p.chain("c") == ["a", "b", "c"]


# --- running ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(stories_dir, data_dir, tmp_path_factory):
    """A two-stage family on stories260K: prune, then quantize the pruned model; a third variant
    that fails its gate."""
    spec = family(stories_dir,
                  mag={"steps": [{"method": "magnitude", "sparsity": 0.3}], "gates": [{"max_bytes": "2MB"}]},
                  mag_w8={"parent": "mag", "steps": [{"method": "rtn", "bits": 8, "strategy": "channel"}],
                          "aliases": ["small"],
                          "gates": [{"quality": "perplexity", "max_drop_pct": 5, "against": "parent"},
                                    {"speed": "decode", "min_speedup": 0.2}]},
                  wanda={"steps": [{"method": "wanda", "sparsity": 0.5}],
                         "gates": [{"quality": "perplexity", "max_drop": 0.01}]})
    spec["gates"] = [{"quality": "perplexity", "max_drop_pct": 60}]
    pipeline = Pipeline.from_dict(spec)
    work = tmp_path_factory.mktemp("work")
    plan = plan_pipeline(pipeline, work)
    start = time.perf_counter()
    result = run_pipeline(pipeline, work, keep_going=True)
    return pipeline, work, plan, result, time.perf_counter() - start


def test_a_family_is_built_evaluated_and_gated(built, stories_dir):
    import secateur

    pipeline, work, plan, result, _ = built
    assert [r["state"] for r in plan] == ["runs", "runs (after its parent)", "runs"]
    mag, mag_w8, wanda = (result.stages[n] for n in ("mag", "mag_w8", "wanda"))
    assert (mag.status, mag_w8.status, wanda.status) == ("admitted", "admitted", "rejected")
    # the quantized child really was made from the pruned parent: its card's base is the parent artifact
    card = secateur.artifacts.verify(mag_w8.artifact)
    assert card["base_model"]["weights_sha256"] == mag.weights_sha256
    assert [h["step"]["method"] for h in card["history"]] == ["rtn"] and card["extra"]["parent"] == "mag"
    # the verdicts carry their numbers: a quality drop against the base's own evaluation
    base_ppl = result.base_evaluations[0]["value"]
    quality = mag.verdicts[0]
    assert quality["kind"] == "quality" and quality["reference"]["value"] == base_ppl
    assert quality["value"] == pytest.approx(100 * (mag.evaluations[0]["value"] - base_ppl) / base_ppl, abs=1e-5)
    speed = next(v for v in mag_w8.verdicts if v["kind"] == "speed")
    assert speed["value"] > 0 and len(speed["evidence"]["variant_rounds"]) == 3
    assert speed["evidence"]["settings"]["threads"] >= 1
    assert mag.verdicts[1]["value"] == sum(e["bytes"] for n, e in secateur.artifacts.verify(mag.artifact)["files"].items()
                                           if n.endswith(".safetensors"))
    assert result.failures == [f"variant 'wanda' failed gate 'perplexity drop <= 60.0% vs base': "
                               f"{wanda.verdicts[0]['value']:+.4g}% worse, limit 60%",
                               f"variant 'wanda' failed gate 'perplexity drop <= 0.01 vs base': "
                               f"{wanda.verdicts[1]['value']:+.4g} worse, limit 0.01"]
    saved = json.loads((Path(result.workdir) / "result.json").read_text())
    assert saved["stages"]["wanda"]["status"] == "rejected" and saved["failures"] == result.failures


def test_a_finished_pipeline_reruns_from_its_caches(built, monkeypatch):
    import secateur.api
    import secateur.evaluate
    import secateur.pipeline.run as run_module

    pipeline, work, _, first, _ = built

    def must_not_run(what):
        def refuse(*args, **kwargs):
            raise AssertionError(f"a cached rerun {what}")
        return refuse

    # a rerun compresses nothing, evaluates nothing and times nothing: everything comes from the caches
    monkeypatch.setattr(secateur.api, "compress_", must_not_run("compressed a model"))
    monkeypatch.setattr(secateur.evaluate, "evaluate", must_not_run("evaluated a model"))
    monkeypatch.setattr(run_module, "measure_speed", must_not_run("measured speed"))
    monkeypatch.setattr(run_module, "peak_rss", must_not_run("measured memory"))
    again = run_pipeline(pipeline, work, keep_going=True)
    assert all(s.cached for s in again.stages.values())
    assert {n: s.weights_sha256 for n, s in again.stages.items()} == {n: s.weights_sha256 for n, s in first.stages.items()}
    assert [s.verdicts for s in again.stages.values()] == [s.verdicts for s in first.stages.values()]
    assert [r["state"] for r in plan_pipeline(pipeline, work)] == ["cached"] * 3


def test_without_keep_going_the_run_stops_at_the_first_failed_gate(stories_dir, data_dir, tmp_path):
    pipeline = Pipeline.from_dict(family(stories_dir,
                                         bad={"steps": [{"method": "magnitude", "sparsity": 0.6}],
                                              "gates": [{"quality": "perplexity", "max_drop_pct": 1}]},
                                         after={"steps": [{"method": "magnitude", "sparsity": 0.1}]}))
    result = run_pipeline(pipeline, tmp_path)
    assert result.stages["bad"].status == "rejected" and result.stages["after"].status == "skipped"


def test_the_cli_runs_a_pipeline_and_exits_1_naming_the_failed_gate(stories_dir, data_dir, tmp_path):
    import yaml

    path = tmp_path / "fam.yaml"
    path.write_text(yaml.safe_dump(family(stories_dir, bad={"steps": [{"method": "magnitude", "sparsity": 0.6}],
                                                           "gates": [{"quality": "perplexity", "max_drop_pct": 1}]})))
    env = {**os.environ, "SECATEUR_PROGRESS": "0", "SECATEUR_HOME": str(tmp_path / "home")}
    cli = [sys.executable, "-m", "secateur.cli", "run", str(path), "--workdir", str(tmp_path / "w")]
    dry = subprocess.run(cli + ["--dry-run"], capture_output=True, text=True, env=env)
    assert dry.returncode == 0 and "runs" in dry.stdout and "bad" in dry.stdout
    proc = subprocess.run(cli, capture_output=True, text=True, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "variant 'bad' failed gate 'perplexity drop <= 1.0% vs base'" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "secateur.cli", "run", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_a_stage_killed_halfway_resumes_and_ends_identical(stories_dir, data_dir, tmp_path):
    """SIGKILL a run while its calibrated stage is inside the loop; the re-run resumes that stage from
    its checkpoints and ends with the weights of an uninterrupted run."""
    spec = family(stories_dir, sg={"steps": [{"method": "sparsegpt", "sparsity": 0.5}]})
    spec["data"]["samples"] = 32
    clean = run_pipeline(Pipeline.from_dict(spec), tmp_path / "clean").stages["sg"]
    path = tmp_path / "fam.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "SECATEUR_PROGRESS": "0", "SECATEUR_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "secateur.cli", "run", str(path), "--workdir", str(tmp_path / "w")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    resume = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "w").glob("fam/stages/sg-*/resume/**/block*"))
        if found:
            resume = found[0]
            break
        time.sleep(0.05)
    if resume is None:
        proc.kill()
        pytest.skip("the stage finished before it could be killed (machine too fast for this probe)")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "w").glob("fam/stages/sg-*/artifact"))  # never a half-written artifact
    resumed = run_pipeline(Pipeline.from_dict(spec), tmp_path / "w").stages["sg"]
    assert resumed.weights_sha256 == clean.weights_sha256 and not resumed.cached


def test_a_run_is_recorded_in_the_registry_with_lineage_verdicts_and_aliases(built, tmp_path):
    from secateur.pipeline import register
    from secateur.registry import Registry

    pipeline, work, _, result, _ = built
    with Registry(tmp_path / "home") as registry:
        ids = register(result, pipeline, registry)
        variants = {v.name: v for v in registry.list("fam")}
        assert set(variants) == {"base", "mag", "mag_w8", "wanda"}
        assert variants["wanda"].status == "rejected" and variants["mag_w8"].status == "admitted"
        assert registry.resolve("fam@small").id == ids["mag_w8"]            # the admitted variant's alias
        chain = registry.lineage("fam@small")
        assert "mag" in repr(chain) and "base" in repr(chain)                # base -> mag -> mag_w8
        tasks = {e.task for e in registry.evaluations(ids["mag"])}
        assert tasks == {"perplexity", "speed"}                              # P1 and the family's P4 timing
        run = registry.run(result.run_id)
        assert run.status == "failed" and any(v["variant"] == "wanda" and not v["passed"] for v in run.verdicts)
        # the report draws the family from the registry: one mark per model in each trade-off plot
        from secateur.report import collect, render

        family_data = collect(registry, "fam")
        assert {v["name"]: v["status"] for v in family_data["variants"]} == \
            {"mag": "admitted", "mag_w8": "admitted", "wanda": "rejected"}
        assert family_data["variants"][1]["parent"] == "mag" and family_data["base"]["speed"]["decode_tokens_per_s"] > 0
        page = render(family_data)
        assert page.count('class="mark variant rejected"') >= 2 and "http://" not in page
