"""The search space file: strict validation, expansion of lists, the default spaces, candidates."""

from __future__ import annotations

import itertools

import pytest

from secateur.errors import ConfigError
from secateur.search.space import AXES, Candidate, Constraint, SearchSpace


def space(**raw):
    return SearchSpace.from_dict(raw, "causal", "t")


def test_lists_inside_a_choice_expand_to_every_combination():
    s = space(axes={"sparsity": ["none", {"method": ["wanda", "sparsegpt"], "sparsity": [0.3, 0.5]}],
                    "quant": [None, {"method": "gptq", "bits": [4, 8], "group_size": 32}]})
    assert s.axes["sparsity"][0] is None and len(s.axes["sparsity"]) == 5
    assert {(c["method"], c["sparsity"]) for c in s.axes["sparsity"][1:]} == set(
        itertools.product(["wanda", "sparsegpt"], [0.3, 0.5]))
    assert [c["bits"] for c in s.axes["quant"][1:]] == [4, 8]
    # every combination but the dense model, by brute force
    expected = {(p, q) for p in range(5) for q in range(3)} - {(0, 0)}
    assert len(s.candidates()) == len(expected) == 14


def test_recovery_is_kept_only_after_pruning_and_stages_follow_the_axis_order():
    s = space(axes={"structured": ["none", {"drop_layers": 1, "mlp": 0.0}], "recovery": [0, 50],
                    "quant": ["none", {"method": "rtn", "bits": 8, "strategy": "channel"}]})
    labels = sorted(c.label() for c in s.candidates())
    assert labels == sorted(["rtn-w8channel", "drop1", "drop1+rtn-w8channel", "drop1+d50", "drop1+d50+rtn-w8channel"])
    c = next(c for c in s.candidates() if c.label() == "drop1+d50+rtn-w8channel")
    assert [axis for axis, _ in c.prefixes()] == ["structured", "recovery", "quant"]
    assert list(AXES) == ["structured", "sparsity", "recovery", "quant"]
    steps = s.steps_for("recovery", 50, "/base")
    assert steps[0]["method"] == "distill" and steps[0]["teacher"] == "/base" and steps[0]["steps"] == 50


def test_candidate_ids_depend_on_the_choices_only():
    a = Candidate(None, {"method": "wanda", "sparsity": 0.5}, 0, None)
    b = Candidate(None, {"sparsity": 0.5, "method": "wanda"}, 0, None)
    assert a.id == b.id and a.id != Candidate(None, {"method": "wanda", "sparsity": 0.3}, 0, None).id


@pytest.mark.parametrize("raw, where", [
    ({"axes": {"sparsityy": ["none"]}}, "axes.sparsityy"),
    ({"axes": {"quant": [{"method": "gptqq", "bits": 4}]}}, "axes.quant[0].method"),
    ({"axes": {"quant": [{"method": "wanda"}]}}, "axes.quant[0].method"),
    ({"axes": {"quant": [{"method": "gptq", "bitz": 4}]}}, "axes.quant[0].bitz"),
    ({"axes": {"quant": [{"method": "gptq", "bits": 11}]}}, "axes.quant[0].bits"),
    ({"axes": {"structured": [{"drop_layers": -1}]}}, "axes.structured[0].drop_layers"),
    ({"axes": {"recovery": [-5]}}, "axes.recovery[0]"),
    ({"axes": {"quant": "gptq"}}, "axes.quant"),
    ({"axes": {"quant": ["none"], "sparsity": ["none"], "structured": ["none"]}}, "axes"),
    ({"constraints": ["latency <= half"]}, "constraints[0]"),
    ({"constraints": ["speed <= 0.5x"]}, "constraints[0]"),
    ({"constraints": ["bytes <= 30%"]}, "constraints[0]"),
    ({"trials": 0}, "trials"),
    ({"speed": {"metric": "latency"}}, "speed.metric"),
    ({"bogus": 1}, "bogus"),
    ({"name": "a b"}, "name"),
])
def test_a_bad_space_is_one_line_naming_its_path(raw, where):
    with pytest.raises(ConfigError) as exc:
        space(**raw)
    assert exc.value.path == where and "\n" not in str(exc.value)


def test_the_default_spaces_need_no_file():
    causal, encoder = SearchSpace.default("causal"), SearchSpace.default("encoder")
    assert causal.eval == {"task": "perplexity", "data": "tinystories"} and causal.speed["metric"] == "decode"
    assert encoder.eval == {"task": "sts", "data": "stsb"} and encoder.speed["metric"] == "latency"
    assert len(causal.candidates()) > 20 and len(encoder.candidates()) >= 8
    assert {c.quant["method"] for c in encoder.candidates() if c.quant} == {"smoothquant"}
    with pytest.raises(ConfigError, match="cannot search a model of kind"):
        SearchSpace.default("vision")


def test_constraints_read_ratios_percent_and_units():
    c = Constraint.parse("latency <= 0.5x", "c")
    assert (c.metric, c.op, c.value, c.unit) == ("latency", "<=", 0.5, "x")
    assert c.holds(0.5) and not c.holds(0.51)
    drop = Constraint.parse("quality_drop<=1%", "c")
    assert drop.value_of({"quality_drop": 0.3, "quality_drop_pct": 2.0}) == 2.0
    assert Constraint.parse("quality_drop <= 0.5", "c").value_of({"quality_drop": 0.3, "quality_drop_pct": 2.0}) == 0.3
    assert Constraint.parse("speedup >= 3x", "c").holds(3.2)


def test_a_space_file_is_read_like_a_recipe(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("name: s\naxes:\n  quant: [none, {method: rtn, bits: [4, 8]}]\nconstraints: ['bytes <= 0.5x']\n")
    s = SearchSpace.load(path, "causal")
    assert s.name == "s" and len(s.candidates()) == 2 and s.constraints[0].text == "bytes <= 0.5x"
