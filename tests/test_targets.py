"""Target selection on the tiny models of every family: class names, module names, regexes, ignore,
protected embeddings and heads, and the errors a user sees."""

from __future__ import annotations

import logging

import pytest
import torch.nn as nn

from secateur.errors import ConfigError, SecateurError
from secateur.models.arch import arch_of
from secateur.targets import check_patterns, describe_selection, protected_modules, select_modules

FAMILIES = ("llama", "opt", "gpt2", "bert")


@pytest.fixture(scope="module")
def models():
    from secateur.testing import tiny_model

    return {family: tiny_model(family) for family in FAMILIES}


def projections(model) -> list[str]:
    """Every block projection of the arch table, by full module name."""
    facts = arch_of(model)
    prefix = facts.arch.block_prefix(model)
    blocks = len(facts.arch.get_blocks(model))
    return [f"{prefix}.{i}.{p}" for i in range(blocks) for p in facts.arch.projections().values()]


# --- default selection ------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_linear_selects_the_projections_in_model_order(models, family):
    model = models[family]
    selected = select_modules(model, ["Linear"], ["lm_head"])
    expected = set(projections(model)) | ({"pooler.dense"} if family == "bert" else set())
    assert set(selected) == expected
    order = [n for n, _ in model.named_modules() if n in selected]
    assert list(selected) == order
    assert all(selected[n] is model.get_submodule(n) for n in selected)


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_and_head_are_never_selected_by_class_or_regex(models, family):
    model = models[family]
    facts = arch_of(model)
    embeddings = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    assert embeddings  # every family has at least a token embedding
    for targets in (["Linear"], ["re:.*"], ["Module"]):
        selected = select_modules(model, targets, [])
        assert not embeddings & set(selected)
        assert "lm_head" not in selected
        assert set(selected) >= set(projections(model))
    protected = protected_modules(model, facts)
    assert embeddings <= set(protected)
    if facts.arch.head:
        assert protected["lm_head"] == "head"


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_head_is_selected_when_named_exactly(models, family, caplog):
    model = models[family]
    with caplog.at_level(logging.WARNING, logger="secateur.targets"):
        assert list(select_modules(model, ["lm_head"], [])) == ["lm_head"]
    assert "lm_head" in caplog.text


def test_embedding_is_selected_when_named_exactly(models):
    assert list(select_modules(models["llama"], ["model.embed_tokens"])) == ["model.embed_tokens"]


def test_protected_only_error(models):
    with pytest.raises(ConfigError) as err:
        select_modules(models["llama"], ["Embedding"])
    assert err.value.path == "targets[0]"
    assert str(err.value) == ("targets[0]: pattern 'Embedding' matches only protected modules ('model.embed_tokens': "
                              "embedding), which are selected only when a target names them exactly, "
                              "e.g. 'model.embed_tokens'")


def test_tied_head_is_protected_without_arch():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.body = nn.Linear(4, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

    model = Tiny()
    assert protected_modules(model) == {"embed": "embedding", "out": "tied to embed"}
    assert list(select_modules(model, ["Linear"])) == ["body"]


# --- pattern kinds ----------------------------------------------------------------------------
def test_class_name_matches_bases_and_gpt2_conv1d(models):
    gpt2 = models["gpt2"]
    conv = select_modules(gpt2, ["Conv1D"])
    assert list(conv) == projections(gpt2)
    assert select_modules(gpt2, ["Linear"]) == conv  # Linear covers Conv1D; lm_head stays protected

    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    assert list(select_modules(model, ["Linear"])) == ["0", "1"]
    assert list(select_modules(model, ["MyLinear"])) == ["0"]


def test_exact_name_and_parent_name(models):
    llama = models["llama"]
    assert list(select_modules(llama, ["model.layers.0.mlp.down_proj"])) == ["model.layers.0.mlp.down_proj"]
    block1 = select_modules(llama, ["model.layers.1"])
    assert list(block1) == [n for n in projections(llama) if n.startswith("model.layers.1.")]
    # a name is not a prefix match on text: layers.1 does not pull in layers.10+
    assert all(n.startswith("model.layers.1.") for n in block1)


def test_regex_uses_search_semantics(models):
    llama = models["llama"]
    mlp = select_modules(llama, ["re:mlp\\."])
    assert list(mlp) == [n for n in projections(llama) if ".mlp." in n]
    assert list(select_modules(llama, ["re:(q|k)_proj$"])) == [
        n for n in projections(llama) if n.endswith(("q_proj", "k_proj"))]
    with pytest.raises(ConfigError, match=r"^targets\[0\]: pattern 're:\^mlp' matches no module"):
        select_modules(llama, ["re:^mlp"])  # anchored: names start with 'model.'


def test_bert_and_opt_names(models):
    bert = select_modules(models["bert"], ["re:attention\\.self\\.(query|key|value)$"])
    assert len(bert) == 6
    opt = select_modules(models["opt"], ["re:fc[12]$"], ["model.decoder.layers.0"])
    assert list(opt) == ["model.decoder.layers.1.fc1", "model.decoder.layers.1.fc2"]


def test_several_targets_union_without_duplicates(models):
    llama = models["llama"]
    both = select_modules(llama, ["re:q_proj$", "model.layers.0.self_attn.q_proj", "re:down_proj$"])
    assert list(both) == [n for n in projections(llama) if n.endswith(("q_proj", "down_proj"))]


# --- ignore -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_ignore_by_class_name_and_regex(models, family):
    model = models[family]
    everything = select_modules(model, ["Linear"])
    first = next(iter(everything))
    assert first not in select_modules(model, ["Linear"], [first])
    regex = select_modules(model, ["Linear"], ["re:\\.0\\."])
    assert regex and not any(".0." in n for n in regex)
    # an ignore pattern that matches nothing is fine (the default ignore: [lm_head] on an encoder)
    assert select_modules(model, ["Linear"], ["lm_head", "re:nothing_here", "Conv2d"]) == everything


def test_everything_ignored_is_an_error(models):
    with pytest.raises(ConfigError) as err:
        select_modules(models["llama"], ["lm_head"], ["lm_head"])
    assert str(err.value) == ("targets[0]: every module that pattern 'lm_head' matches ('lm_head') is excluded by "
                              "ignore ['lm_head']; remove it from ignore")


# --- errors -----------------------------------------------------------------------------------
def test_no_match_names_the_pattern_with_suggestion_and_examples(models):
    with pytest.raises(SecateurError) as err:
        select_modules(models["llama"], ["Linear", "Linaer"])
    message = str(err.value)
    assert err.value.path == "targets[1]"
    assert message.startswith("targets[1]: pattern 'Linaer' matches no module (did you mean 'Linear'?); "
                              "classes with a 2-D weight here: Linear; example module names: "
                              "'model.layers.0.self_attn.q_proj'")
    assert "model.embed_tokens" not in message

    with pytest.raises(ConfigError, match=r"did you mean 'model\.layers\.0\.mlp\.down_proj'\?"):
        select_modules(models["llama"], ["model.layers.0.mlp.down_prj"])
    with pytest.raises(ConfigError, match=r"classes with a 2-D weight here: Conv1D;"):
        select_modules(models["gpt2"], ["q_proj"])


def test_match_without_weight_is_an_error(models):
    with pytest.raises(ConfigError) as err:
        select_modules(models["llama"], ["LlamaRMSNorm"])
    assert "pattern 'LlamaRMSNorm' matches 5 modules ('model.layers.0.input_layernorm'" in str(err.value)
    assert "but none has a 2-D weight; classes with a 2-D weight here: Linear;" in str(err.value)


def test_invalid_patterns(models):
    with pytest.raises(ConfigError) as err:
        select_modules(models["llama"], ["re:("])
    assert str(err.value).startswith("targets[0]: invalid regex in 're:(': missing ), unterminated subpattern")
    with pytest.raises(ConfigError, match=r"^ignore\[1\]: invalid regex in 're:\[a'"):
        select_modules(models["llama"], ["Linear"], ["lm_head", "re:[a"])
    with pytest.raises(ConfigError, match=r"^targets\[0\]: empty regex in 're:'"):
        select_modules(models["llama"], ["re:"])
    with pytest.raises(ConfigError, match=r"^targets: no patterns given"):
        select_modules(models["llama"], [])
    with pytest.raises(ConfigError, match=r"^targets: expected a list of patterns, got a single string"):
        select_modules(models["llama"], "Linear")
    with pytest.raises(ConfigError, match=r"^steps\[0\]\.targets\[1\]: got '', expected a class name"):
        check_patterns(["Linear", ""], "steps[0].targets")
    check_patterns(["Linear", "re:mlp", "lm_head"])


def test_describe_selection(models):
    gpt2 = select_modules(models["gpt2"], ["transformer.h.0.attn.c_attn"])
    assert describe_selection(gpt2) == [
        {"name": "transformer.h.0.attn.c_attn", "class": "Conv1D", "shape": [32, 96], "params": 32 * 96}]
    rows = describe_selection(select_modules(models["llama"], ["Linear"]))
    assert rows[0] == {"name": "model.layers.0.self_attn.q_proj", "class": "Linear", "shape": [32, 32], "params": 1024}
    assert len(rows) == 14
