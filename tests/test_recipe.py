"""Recipes: strict loading with exact error paths and suggestions, round trips, overrides, env
expansion, JSON. Uses throwaway methods registered here so that it does not depend on any real one."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from dataclasses import dataclass
from typing import Literal

import pytest

from secateur import api
from secateur.config import StepConfig, TargetedConfig, param
from secateur.errors import ConfigError, SecateurError
from secateur.recipe import DataSpec, EvalSpec, Recipe


@dataclass(frozen=True)
class ToyPruneConfig(TargetedConfig):
    sparsity: float = param(0.5, "fraction removed", range=(0.0, 1.0))
    scope: Literal["row", "matrix", "global"] = param("row", "where the threshold applies")
    per_layer: dict[str, float] = param({}, "sparsity per module name", range=(0.0, 1.0))


@dataclass(frozen=True)
class ToyQuantConfig(TargetedConfig):
    bits: int = param(4, "bits per weight", choices=(2, 3, 4, 8))
    group_size: int = param(128, "weights per scale")


@dataclass(frozen=True)
class ToyCalibratedConfig(StepConfig):
    sparsity: float = param(0.5, "fraction removed", range=(0.0, 1.0))


@pytest.fixture(autouse=True)
def toy_methods(monkeypatch):
    if importlib.util.find_spec("secateur.prune.magnitude") is None:  # before the first real method lands
        monkeypatch.setattr(api, "_METHOD_MODULES", ())
    def untouched(model, config, ctx):
        return {}

    api.register("toyprune", ToyPruneConfig, kind="prune")(untouched)
    api.register("toyquant", ToyQuantConfig, kind="quantize")(untouched)
    api.register("toycalib", ToyCalibratedConfig, kind="prune", needs_data=True)(untouched)
    yield
    for name in ("toyprune", "toyquant", "toycalib"):
        api.METHODS.pop(name, None)


FULL = """\
name: toy-50
model: some/model
data: {source: tinystories, samples: 16, seq_len: 64, seed: 3, mode: random}
steps:
  - method: toyprune
    sparsity: 0.5
    scope: matrix
    targets: [Linear]
    ignore: [lm_head, "re:\\\\.0\\\\."]
    per_layer: {model.layers.1.mlp.down_proj: 0.25}
  - {method: toyquant, bits: 8, group_size: 64}
eval:
  - {task: perplexity, data: wikitext2}
  - {task: speed, options: {batch: 4, dtypes: [fp32, bf16]}}
"""


def error(text_or_dict) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        if isinstance(text_or_dict, str):
            Recipe.from_yaml(text_or_dict)
        else:
            Recipe.from_dict(text_or_dict)
    return err.value


def toy(**step) -> dict:
    return {"steps": [{"method": "toyprune", **step}]}


# --- loading ----------------------------------------------------------------------------------
def test_full_recipe_loads_typed():
    r = Recipe.from_yaml(FULL)
    assert r.name == "toy-50" and r.model == "some/model"
    assert r.data == DataSpec(source="tinystories", samples=16, seq_len=64, seed=3, mode="random")
    assert r.steps[0] == ToyPruneConfig(sparsity=0.5, scope="matrix", targets=("Linear",),
                                        ignore=("lm_head", "re:\\.0\\."),
                                        per_layer={"model.layers.1.mlp.down_proj": 0.25})
    assert r.steps[1] == ToyQuantConfig(bits=8, group_size=64)
    assert r.eval == (EvalSpec(task="perplexity", data="wikitext2"),
                      EvalSpec(task="speed", options={"batch": 4, "dtypes": ["fp32", "bf16"]}))
    assert not r.needs_data


def test_defaults_and_shorthands():
    r = Recipe.from_yaml("data: c4\nsteps: [{method: toycalib}]\neval: [perplexity, sts]")
    assert r.data == DataSpec(source="c4", split=None, samples=128, seq_len=256, seed=0, mode=None)
    assert r.steps == (ToyCalibratedConfig(),)
    assert [e.task for e in r.eval] == ["perplexity", "sts"]
    assert r.name is None and r.model is None and r.needs_data


def test_exponent_floats_read_as_numbers():
    assert Recipe.from_yaml("steps: [{method: toyprune, sparsity: 5e-1}]").steps[0].sparsity == 0.5


def test_programmatic_construction():
    r = Recipe(steps=[ToyPruneConfig(sparsity=0.3)], data=DataSpec(source="c4"))
    assert r.steps == (ToyPruneConfig(sparsity=0.3),)
    assert Recipe.from_yaml(r.dump()) == r
    with pytest.raises(ConfigError, match=r"^steps: at least one step is required$"):
        Recipe(steps=[])
    with pytest.raises(ConfigError, match=r"^steps\[0\]: expected a step config such as MagnitudeConfig\(\.\.\.\), got dict"):
        Recipe(steps=[{"method": "toyprune"}])
    with pytest.raises(ConfigError, match=r"^samples: got 0, expected an integer >= 1$"):
        DataSpec(source="c4", samples=0)


# --- round trips ------------------------------------------------------------------------------
def test_yaml_round_trip():
    r = Recipe.from_yaml(FULL)
    text = r.dump()
    assert Recipe.from_yaml(text) == r
    assert Recipe.from_dict(r.to_dict()) == r
    assert "targets: [Linear]" in text  # short lists are written inline
    minimal = Recipe.from_yaml("steps: [{method: toyquant}]")
    assert list(minimal.to_dict()) == ["steps"]  # None / empty sections are left out
    assert Recipe.from_yaml(minimal.dump()) == minimal


def test_json_load_and_save(tmp_path):
    r = Recipe.from_yaml(FULL)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(r.to_dict()))
    assert Recipe.load(path) == r
    assert Recipe.load(r.save(tmp_path / "again.json")) == r
    assert Recipe.load(r.save(tmp_path / "again.yml")) == r
    assert Recipe.from_yaml(str(tmp_path / "again.yml")) == r  # from_yaml also takes a path


def test_json_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"steps": [\n  {"method": "toyprune",}\n]}')
    with pytest.raises(ConfigError) as err:
        Recipe.load(path)
    assert str(err.value) == f"invalid JSON at line 2, column 25 of {path}: Expecting property name enclosed in double quotes"
    path.write_text('{"steps": [{"method": "toyprune", "sparsity": 0.1, "sparsity": 0.2}]}')
    with pytest.raises(ConfigError, match="duplicate key 'sparsity'"):
        Recipe.load(path)
    path.write_text('{"steps": [{"method": "toyprune", "sparsty": 0.1}]}')
    with pytest.raises(ConfigError, match=r"^steps\[0\]\.sparsty: unknown key .*\(did you mean 'sparsity'\?\)"):
        Recipe.load(path)


def test_files_missing_or_wrong_kind(tmp_path):
    with pytest.raises(SecateurError) as err:
        Recipe.load(tmp_path / "nope.yaml")
    assert str(err.value) == f"recipe file '{tmp_path / 'nope.yaml'}' does not exist"
    assert not isinstance(err.value, ConfigError)
    with pytest.raises(SecateurError, match="does not exist"):
        Recipe.from_yaml("recipes/missing.yaml")
    (tmp_path / "r.txt").write_text("steps: []")
    with pytest.raises(SecateurError, match=r"has suffix '\.txt'; expected one of '\.json', '\.yaml', '\.yml'"):
        Recipe.load(tmp_path / "r.txt")
    with pytest.raises(SecateurError, match="is not a file"):
        Recipe.load(tmp_path)


# --- env expansion ----------------------------------------------------------------------------
def test_env_expansion(monkeypatch):
    monkeypatch.setenv("SECATEUR_TEST_MODELS", "/models")
    monkeypatch.delenv("SECATEUR_TEST_UNSET", raising=False)
    r = Recipe.from_yaml("model: ${SECATEUR_TEST_MODELS}/llama\n"
                         "data: {source: '${SECATEUR_TEST_UNSET:-c4}'}\n"
                         "steps: [{method: toyquant}]\n"
                         "eval: [{task: perplexity, data: '${SECATEUR_TEST_MODELS}/ppl.txt'}]")
    assert r.model == "/models/llama"
    assert r.data.source == "c4"
    assert r.eval[0].data == "/models/ppl.txt"
    e = error("model: ${SECATEUR_TEST_UNSET}/x\nsteps: [{method: toyquant}]")
    assert e.path == "model"
    assert str(e) == ("model: environment variable 'SECATEUR_TEST_UNSET' is not set (used as "
                      "'${SECATEUR_TEST_UNSET}'); set it or write '${SECATEUR_TEST_UNSET:-default}'")


# --- strict errors: exact paths and suggestions -----------------------------------------------
def test_unknown_top_level_key():
    e = error("sterps: [{method: toyquant}]")
    assert e.path == "sterps"
    assert str(e) == "sterps: unknown key (did you mean 'steps'?); valid keys: name, model, data, steps, eval"


def test_unknown_step_key():
    e = error({"steps": [{"method": "toyquant"}, {"method": "toyprune", "sparsty": 0.5}]})
    assert e.path == "steps[1].sparsty"
    assert str(e) == ("steps[1].sparsty: unknown key for method 'toyprune' (did you mean 'sparsity'?); "
                      "valid keys: targets, ignore, sparsity, scope, per_layer")


def test_unknown_method():
    e = error({"steps": [{"method": "toyprun"}]})
    assert e.path == "steps[0].method"
    assert str(e).startswith("steps[0].method: unknown method 'toyprun' (did you mean 'toyprune'?); valid methods: ")
    assert "'toyprune'" in str(e) and "'toyquant'" in str(e)
    e = error({"steps": [{"sparsity": 0.5}]})
    assert e.path == "steps[0].method" and str(e).startswith("steps[0].method: missing; valid methods: ")
    e = error({"steps": [{"method": 3}]})
    assert str(e).startswith("steps[0].method: unknown method 3; valid methods: ")


def test_step_values():
    e = error(toy(sparsity=1.5))
    assert (e.path, str(e)) == ("steps[0].sparsity", "steps[0].sparsity: got 1.5, expected a value in [0.0, 1.0]")
    e = error(toy(sparsity="half"))
    assert str(e) == "steps[0].sparsity: got 'half' (str), expected a number"
    e = error(toy(scope="rows"))
    assert str(e) == "steps[0].scope: got 'rows', expected one of 'row', 'matrix', 'global' (did you mean 'row'?)"
    e = error(toy(per_layer={"a": 2.0}))
    assert str(e) == "steps[0].per_layer: got 2.0, expected a value in [0.0, 1.0]"
    e = error({"steps": [{"method": "toyquant", "bits": 5}]})
    assert str(e) == "steps[0].bits: got 5, expected one of 2, 3, 4, 8"
    e = error(toy(targets="Linear"))
    assert str(e) == "steps[0].targets: got 'Linear' (str), expected list of str"
    e = error(toy(targets=["Linear", 3]))
    assert str(e) == "steps[0].targets[1]: got 3 (int), expected str"
    e = error(toy(ignore=["lm_head", "re:("]))
    assert e.path == "steps[0].ignore[1]"
    assert str(e).startswith("steps[0].ignore[1]: invalid regex in 're:(': missing ), unterminated subpattern")


def test_steps_shape():
    assert str(error("name: x")) == "steps: at least one step is required"
    assert str(error("steps: []")) == "steps: at least one step is required"
    assert str(error("steps: toyprune")).startswith("steps: got 'toyprune' (str), expected a list of steps")
    assert str(error("steps: [toyprune]")) == "steps[0]: got 'toyprune' (str), expected a mapping with a 'method' key"


def test_data_errors():
    steps = "\nsteps: [{method: toyquant}]"
    e = error("data: {source: c4, sample: 3}" + steps)
    assert str(e) == ("data.sample: unknown key (did you mean 'samples'?); "
                      "valid keys: source, split, samples, seq_len, seed, mode")
    assert str(error("data: {source: c4, samples: 0}" + steps)) == "data.samples: got 0, expected an integer >= 1"
    assert str(error("data: {source: c4, seq_len: 4}" + steps)) == "data.seq_len: got 4, expected an integer >= 8"
    assert str(error("data: {source: c4, samples: many}" + steps)) == "data.samples: got 'many' (str), expected an integer"
    assert str(error("data: {source: c4, mode: randm}" + steps)) == (
        "data.mode: got 'randm', expected one of 'consecutive', 'random' (did you mean 'random'?)")
    assert str(error("data: {samples: 3}" + steps)) == (
        "data.source: missing; expected a named dataset (tinystories, wikitext2, c4) or a path")
    assert str(error("data: [c4]" + steps)).startswith("data: got ['c4'] (list), expected a mapping with keys: source,")


def test_eval_errors():
    steps = "steps: [{method: toyquant}]\n"
    assert str(error(steps + "eval: [perplexty]")) == (
        "eval[0].task: got 'perplexty', expected one of 'perplexity', 'sts', 'speed' (did you mean 'perplexity'?)")
    assert str(error(steps + "eval: [{task: sts, dat: x}]")) == (
        "eval[0].dat: unknown key (did you mean 'data'?); valid keys: task, data, options")
    assert str(error(steps + "eval: [{data: x}]")) == "eval[0].task: missing; expected the evaluation task"
    assert str(error(steps + "eval: perplexity")).startswith("eval: got 'perplexity' (str), expected a list")
    assert str(error(steps + "eval: [{task: speed, options: [1]}]")) == (
        "eval[0].options: got [1] (list), expected mapping str -> Any")


def test_top_level_errors():
    assert str(error("")) == "the recipe is empty; expected a mapping with a 'steps' list"
    assert str(error("- a")) == "a recipe must be a mapping with a 'steps' list, got list"
    assert str(error("name: 3\nsteps: [{method: toyquant}]")) == "name: got 3 (int), expected str"


def test_yaml_syntax_errors_name_the_line(tmp_path):
    e = error("steps:\n  - {method: toyprune\n  - x")
    assert e.path == ""
    assert str(e) == "invalid YAML at line 3, column 6: expected ',' or '}', but got '<stream end>'"
    path = tmp_path / "r.yaml"
    path.write_text("steps:\n  - method: toyprune\n    sparsity: 0.1\n    sparsity: 0.2\n")
    with pytest.raises(ConfigError) as err:
        Recipe.load(path)
    assert str(err.value) == f"invalid YAML at line 4, column 5 of {path}: duplicate key 'sparsity'"
    assert "\n" not in str(error("a: b: c"))


# --- overrides --------------------------------------------------------------------------------
def test_overrides():
    r = Recipe.from_yaml(FULL)
    o = r.with_overrides(["steps[0].sparsity=0.6", "data.samples=64", "model=other/model", "name=",
                          "steps[1].bits=2", "steps[0].targets=[Linear, 're:mlp']", "eval[1].options.batch=8",
                          "eval[1].options.new=yes", "steps[0].per_layer.x=0.1"])
    assert o.steps[0].sparsity == 0.6 and o.data.samples == 64 and o.model == "other/model" and o.name is None
    assert o.steps[1].bits == 2
    assert o.steps[0].targets == ("Linear", "re:mlp")
    assert o.eval[1].options == {"batch": 8, "dtypes": ["fp32", "bf16"], "new": True}
    assert o.steps[0].per_layer == {"model.layers.1.mlp.down_proj": 0.25, "x": 0.1}
    assert r.steps[0].sparsity == 0.5  # the original is unchanged
    assert r.with_overrides({"steps[0].sparsity": 0.7}).steps[0].sparsity == 0.7
    assert r.with_overrides([]) == r


def test_overrides_create_sections_and_replace_lists():
    r = Recipe.from_yaml("steps: [{method: toyquant}]")
    assert r.with_overrides(["data=c4"]).data == DataSpec(source="c4")
    assert r.with_overrides(["data.source=c4", "data.samples=8"]).data == DataSpec(source="c4", samples=8)
    assert r.with_overrides(["eval=[perplexity]"]).eval == (EvalSpec(task="perplexity"),)
    two = r.with_overrides(["steps=[{method: toyprune}, {method: toyquant, bits: 2}]"])
    assert two.steps == (ToyPruneConfig(), ToyQuantConfig(bits=2))


def test_override_switching_method_keeps_shared_keys():
    r = Recipe.from_yaml("steps: [{method: toyprune, sparsity: 0.3, targets: [re:mlp]}]")
    s = r.with_overrides(["steps[0].method=toyquant"]).steps[0]
    assert s == ToyQuantConfig(targets=("re:mlp",))
    e = pytest.raises(ConfigError, r.with_overrides, ["steps[0].method=toyqant"]).value
    assert e.path == "steps[0].method"
    assert "unknown method 'toyqant' (did you mean 'toyquant'?)" in str(e)


def test_override_errors():
    r = Recipe.from_yaml(FULL)

    def fails(*items) -> ConfigError:
        return pytest.raises(ConfigError, r.with_overrides, list(items)).value

    e = fails("steps[0].sparsty=0.6")
    assert e.path == "steps[0].sparsty"
    assert str(e) == ("steps[0].sparsty: unknown key for method 'toyprune' (did you mean 'sparsity'?); "
                      "valid keys: method, targets, ignore, sparsity, scope, per_layer "
                      "(in override 'steps[0].sparsty=0.6')")
    e = fails("dta.samples=3")
    assert str(e) == ("dta: unknown key (did you mean 'data'?); valid keys: name, model, data, steps, eval "
                      "(in override 'dta.samples=3')")
    e = fails("data.sample=3")
    assert e.path == "data.sample" and "(did you mean 'samples'?)" in str(e)
    e = fails("eval[0].tsk=sts")
    assert e.path == "eval[0].tsk" and "(did you mean 'task'?)" in str(e)
    e = fails("steps[0].sparsity=2")
    assert str(e) == "steps[0].sparsity: got 2.0, expected a value in [0.0, 1.0] (in override 'steps[0].sparsity=2')"
    e = fails("steps[5].bits=2")
    assert str(e) == ("steps[5]: index 5 is out of range: 'steps' has 2 items; replace the whole list with "
                      "steps=[...] (in override 'steps[5].bits=2')")
    e = fails("steps[0].sparsity.x=1")
    assert e.path == "steps[0].sparsity.x" and "'steps[0].sparsity' is a float, not a mapping" in str(e)
    e = fails("data[0]=1")
    assert str(e) == "data[0]: 'data' is not a list; it cannot be indexed (in override 'data[0]=1')"
    e = fails("steps0].bits=1")
    assert str(e) == ("steps0].bits: invalid override path; expected a form like steps[0].sparsity or data.samples "
                      "(in override 'steps0].bits=1')")
    e = fails("sparsity")
    assert str(e) == "sparsity: expected PATH=VALUE, e.g. steps[0].sparsity=0.6"
    e = fails("steps[0].targets=[a")
    assert e.path == "steps[0].targets" and "cannot parse value '[a' as YAML" in str(e)
    e = fails("model=${SECATEUR_TEST_SURELY_UNSET}")
    assert e.path == "model" and "environment variable 'SECATEUR_TEST_SURELY_UNSET' is not set" in str(e)


def test_example_yaml_loads_back():
    from secateur.recipe import example_yaml

    for name in ("toyprune", "toycalib"):
        text = example_yaml(name)
        r = Recipe.from_yaml(text)
        assert r.steps == (api.methods()[name].config(),)
        assert (r.data is not None) == (name == "toycalib")
    assert example_yaml(api.methods()["toyquant"]).startswith("name: toyquant-example\n")
    assert DataSpec.describe()[2] == {"name": "samples", "type": "int", "default": 128, "minimum": 1,
                                      "doc": "number of calibration sequences"}
