"""Physical removal (models/structure.py) on every family, against obviously-correct references.

- Heads and MLP channels whose contribution is exactly zero are removed → outputs unchanged.
- Removing a block equals skipping it (a forward hook returning the block's input).
- Hidden width: the pruned model equals one built from scratch with a smaller config whose every
  parameter is copied by explicit per-name rules written here, independently of the library.
- Save → stock ``from_pretrained`` → identical outputs; shapes a config cannot describe are
  recorded in the card, refused by stock transformers and rebuilt by ``secateur.load``.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import transformers

from secateur import lineage
from secateur import StructuredConfig, compress_, load, save
from secateur.errors import SecateurError
from secateur.models.arch import arch_of
from secateur.models import structure
from secateur.testing import FAMILIES, tiny_model

D = 8  # head_dim of every tiny model (hidden 32, 4 heads)


def run(model, ids):
    with torch.no_grad():
        if arch_of(model).kind == "encoder":
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return model(input_ids=ids).logits


def ids_for(seed=0):
    return torch.randint(7, 128, (3, 20), generator=torch.Generator().manual_seed(seed))


def weight_oi(module):
    """The weight as [out, in] (GPT-2 Conv1D stores [in, out])."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


@torch.no_grad()
def zero_o_columns(model, layer, heads):
    arch = arch_of(model).arch
    o = arch.get_blocks(model)[layer].get_submodule(arch.attn["o"])
    for h in heads:
        weight_oi(o)[:, h * D:(h + 1) * D] = 0


@pytest.mark.parametrize("family", FAMILIES)
def test_dead_query_heads_removed_without_change(family):
    model = tiny_model(family)
    shape = structure.block_shape(arch_of(model).arch.get_blocks(model)[0], arch_of(model).arch, D)
    dead = [1] if shape.groups == 1 else [1, 3]  # GQA (groups of 2): one query head per group
    zero_o_columns(model, 0, dead)
    ids = ids_for()
    expected = run(model, ids)
    keep = [h for h in range(4) if h not in dead]
    structure.remove_heads(model, 0, keep, keep if shape.groups == 1 else list(range(shape.kv_heads)))
    structure.sync_config(model)
    assert torch.allclose(run(model, ids), expected, atol=1e-6)
    assert structure.shapes(model)["heads"] == [4 - len(dead), 4]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_dead_kv_group_removed_without_change(family):
    """A whole KV group (KV head 1 and its query heads 2, 3) whose output is zero."""
    model = tiny_model(family)
    zero_o_columns(model, 1, [2, 3])
    ids = ids_for()
    expected = run(model, ids)
    structure.remove_heads(model, 1, [0, 1])
    s = structure.sync_config(model)
    assert (s["heads"], s["kv_heads"]) == ([4, 2], [2, 1])
    assert torch.allclose(run(model, ids), expected, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_dead_mlp_channels_removed_without_change(family):
    model = tiny_model(family)
    arch = arch_of(model).arch
    dead = [0, 7, 33, 63]
    with torch.no_grad():
        weight_oi(arch.get_blocks(model)[1].get_submodule(arch.mlp["down"]))[:, dead] = 0
    ids = ids_for(1)
    expected = run(model, ids)
    structure.remove_channels(model, 1, [j for j in range(64) if j not in dead])
    structure.sync_config(model)
    assert torch.allclose(run(model, ids), expected, atol=1e-6)
    assert structure.shapes(model)["intermediate"] == [64, 60]


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_a_block_equals_skipping_it(family):
    model = tiny_model(family)
    arch = arch_of(model).arch
    ids = ids_for(2)

    def skip(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x

    handle = arch.get_blocks(model)[0].register_forward_hook(skip, with_kwargs=True)
    expected = run(model, ids)
    handle.remove()
    kept = structure.remove_blocks(model, [0])
    assert kept == [1]
    assert torch.equal(run(model, ids), expected)
    assert getattr(model.config, arch.fields["layers"]) == 1
    for module in arch.get_blocks(model)[0].modules():  # renumbered for the KV cache
        if isinstance(getattr(module, "layer_idx", None), int):
            assert module.layer_idx == 0


def test_block_removal_cuts_per_layer_config_lists_and_cache_decoding_still_matches():
    model = tiny_model("qwen2")
    model.config.layer_types = ["full_attention", "sliding_attention"]
    structure.remove_blocks(model, [0])
    assert model.config.layer_types == ["sliding_attention"]
    model = tiny_model("llama")
    structure.remove_blocks(model, [0])
    from secateur.evaluate.speed import greedy_decode

    prompt = ids_for(3)[:1, :8]
    tokens, _, _ = greedy_decode(model, prompt, 6)
    seq = prompt
    for _ in range(7):  # the same tokens without any cache
        nxt = run(model, seq)[:, -1:].argmax(-1)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(tokens, seq[:, 8:])


# --- hidden width against a from-scratch reference ----------------------------------------------
# which axis of each parameter is the residual stream, by name — written for this test only
HIDDEN_AXES = {
    "llama": [(r"embed_tokens\.weight$", 1), (r"(q|k|v|gate|up)_proj\.weight$", 1), (r"lm_head\.weight$", 1),
              (r"(o|down)_proj\.weight$", 0), (r"norm\.weight$", 0)],
    "bert": [(r"embeddings\.\w+_embeddings\.weight$", 1), (r"LayerNorm\.(weight|bias)$", 0),
             (r"attention\.self\.(query|key|value)\.weight$", 1), (r"intermediate\.dense\.weight$", 1),
             (r"(attention\.output|\d\.output)\.dense\.(weight|bias)$", 0), (r"pooler\.dense\.weight$", (0, 1)),
             (r"pooler\.dense\.bias$", 0)],
    "gpt2": [(r"w[tp]e\.weight$", 1), (r"ln_\w+\.(weight|bias)$", 0), (r"(c_attn|c_fc)\.weight$", 0),
             (r"c_proj\.weight$", 1), (r"c_proj\.bias$", 0), (r"lm_head\.weight$", 1)],
}


def reference_hidden(model, keep):
    """The dense model's parameters with the stream axes indexed by ``keep``, by explicit rules."""
    family = model.config.model_type
    out = {}
    for name, p in model.state_dict().items():
        t = p.clone()
        for pattern, axes in HIDDEN_AXES[family]:
            if re.search(pattern, name):
                for axis in (axes if isinstance(axes, tuple) else (axes,)):
                    t = t.index_select(axis, torch.tensor(keep))
                break
        out[name] = t
    return out


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_hidden_width_matches_reference(family):
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    keep = [c for c in range(32) if c % 4 != 1]
    structure.remove_hidden(model, keep)
    structure.sync_config(model)
    expected = reference_hidden(dense, keep)
    got = model.state_dict()
    assert set(got) == set(expected)
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name
    ids = ids_for(4)
    assert torch.isfinite(run(model, ids)).all()
    if family == "llama":  # explicit head_dim: an ordinary config describes it
        assert model.config.hidden_size == 24 and structure.layout(model) is None


# --- checkpoints ----------------------------------------------------------------------------------
def stock_class(family):
    return transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_mlp_and_depth_give_a_stock_checkpoint(family, tmp_path):
    model = tiny_model(family)
    compress_(model, StructuredConfig(mlp=0.5, blocks=(1,), importance="magnitude"))
    ids = ids_for(5)
    expected = run(model, ids)
    path = save(model, tmp_path / "a")
    stock = stock_class(family).from_pretrained(path).eval()
    assert torch.equal(run(stock, ids), expected)
    assert lineage.of(model).history()[-1]["result"]["standard_checkpoint"] is True


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gqa_heads_and_hidden_give_a_stock_checkpoint(family, tmp_path):
    model = tiny_model(family)
    compress_(model, StructuredConfig(heads=0.5, mlp=0.25, hidden=0.25, importance="magnitude"))
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.hidden_size) == (2, 1, 24)
    ids = ids_for(6)
    expected = run(model, ids)
    path = save(model, tmp_path / "a")
    stock = stock_class(family).from_pretrained(path).eval()
    assert torch.equal(run(stock, ids), expected)


@pytest.mark.parametrize("family,config", [
    ("bert", dict(heads=0.25, mlp=0.0)),            # head_dim derived from hidden / heads
    ("gpt2", dict(hidden=0.25, mlp=0.0)),
    ("opt", dict(heads=0.5, hidden=0.25, mlp=0.0)),
    ("llama", dict(mlp=0.3, uniform=False)),        # per-block shapes, asked for
])
def test_recorded_layout_is_refused_by_stock_and_rebuilt_by_secateur(family, config, tmp_path):
    model = tiny_model(family)
    compress_(model, StructuredConfig(importance="magnitude", **config))
    ids = ids_for(7)
    expected = run(model, ids)
    path = save(model, tmp_path / "a")
    card = load(path).info["card"]
    assert card["layout"]["shapes"]
    assert lineage.of(model).history()[-1]["result"]["standard_checkpoint"] is False
    with pytest.raises(Exception):
        stock_class(family).from_pretrained(path)
    assert torch.equal(run(load(path).model, ids), expected)


def test_heads_a_transformers_config_refuses_are_kept_in_the_layout(tmp_path):
    """transformers 5 validates hidden_size % num_attention_heads == 0 for Llama even with an
    explicit head_dim: 6 heads over hidden 32 is recorded as a layout, not written to config."""
    model = tiny_model("llama")
    model.config.num_attention_heads, model.config.num_key_value_heads = 4, 4
    for block in model.model.layers:
        block.self_attn.num_key_value_groups = 1
        for name in ("k_proj", "v_proj"):  # make it MHA with 4 KV heads
            lin = getattr(block.self_attn, name)
            lin.weight = torch.nn.Parameter(torch.cat([lin.weight, lin.weight]))
            lin.out_features = 32
    ids = ids_for(8)
    structure.remove_heads(model, 0, [0, 1, 2], [0, 1, 2])
    structure.remove_heads(model, 1, [0, 1, 2], [0, 1, 2])
    s = structure.sync_config(model)
    assert "config_note" in s and "not a multiple" in s["config_note"]
    assert model.config.num_attention_heads == 4 and structure.layout(model) is not None
    expected = run(model, ids)
    path = save(model, tmp_path / "a")
    assert torch.equal(run(load(path).model, ids), expected)


def test_gqa_validity_errors():
    shape = structure.BlockShape(heads=4, kv_heads=2, intermediate=8)
    structure.check_heads(shape, [0, 1], [0])
    structure.check_heads(shape, [0, 2], [0, 1])
    with pytest.raises(SecateurError, match="same number of query heads"):
        structure.check_heads(shape, [0, 1, 2], [0, 1])
    with pytest.raises(SecateurError, match="same number of query heads"):
        structure.check_heads(shape, [0, 1], [0, 1])  # KV head 1 kept without query heads
    with pytest.raises(SecateurError, match="every attention head"):
        structure.check_heads(shape, [], [])
    with pytest.raises(SecateurError, match="out of range"):
        structure.remove_blocks(tiny_model("llama"), [5])
    with pytest.raises(SecateurError, match="all 2 blocks"):
        structure.remove_blocks(tiny_model("llama"), [0, 1])
