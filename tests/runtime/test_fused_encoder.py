"""Fused W8A8 encoder blocks (secateur.runtime.fused_encoder) and their two native row passes.

The passes are checked against float64 references written out step by step; the fused block
against the module-by-module W8A8 model (the same integers up to a step at rounding boundaries)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import secateur
from secateur.runtime.fused_encoder import fuse_encoder, unfuse_encoder
from secateur.runtime import kernels, native
from secateur.runtime.linear import reference_only
from secateur.quant.rtn import RTNConfig
from secateur.testing import tiny_model

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built on this machine")

W8A8 = RTNConfig(bits=8, strategy="channel", activations="int8")


# --- the row passes against float64 ---------------------------------------------------------------

def gelu64(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return torch.tensor([0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))) for x in v.flatten().tolist()],
                        dtype=torch.float64).view(v.shape)


def assert_quantized_close(q: torch.Tensor, scale: torch.Tensor, exact: torch.Tensor, atol: float = 1e-7) -> None:
    """Per-token symmetric int8 of ``exact`` (float64): the scale is max|row| / 127 and every
    integer lies within half a step (plus float slack) of the exact value."""
    expected_scale = exact.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(scale.double(), expected_scale, rtol=1e-5, atol=1e-12)
    error = (q.double() * scale.double() - exact).abs()
    assert bool((error <= scale.double() * (0.5 + 1e-4) + atol).all()), float((error / scale.double()).max())


@pytest.mark.parametrize("n", [64, 100, 1536])
@pytest.mark.parametrize("bias", [True, False])
def test_gelu_quantize_matches_float64(n, bias):
    torch.manual_seed(n)
    rows = 9
    y = torch.randn(rows, n) * 3
    xs = torch.rand(rows, 1) + 0.5
    b = torch.randn(n) if bias else None
    q, scale = native.w8a8_gelu_quantize(y, xs, b)
    assert q.dtype == torch.int8 and q.shape == (rows, n) and scale.shape == (rows, 1)
    pre = y.double() * xs.double() + (b.double() if bias else 0.0)
    assert_quantized_close(q, scale, gelu64(pre))
    # and the same integers as the eager ops in float32 but for a few rounding-boundary cases
    eager_q, eager_scale = kernels.quantize_per_token(F.gelu(torch.addcmul(b, y, xs) if bias else y * xs))
    assert (q.int() - eager_q.int()).abs().max() <= 1
    assert (q != eager_q).float().mean() < 0.01


def test_gelu_is_accurate_over_its_whole_range():
    # one value per row: the row's scale is then |gelu(x)| / 127 and its integer +-127 (or 0)
    x = torch.linspace(-12, 12, 4801).view(-1, 1)
    q, scale = native.w8a8_gelu_quantize(x, torch.ones(x.shape[0], 1), None)
    exact = gelu64(x)
    error = (127 * scale.double() - exact.abs()).abs()
    # erf to 3e-7 absolute (A&S 7.1.28), halved by x/2, plus a few float32 roundings of the result
    assert bool((error <= 4e-7 * x.double().abs().clamp_min(1.0)).all()), float(error.max())
    big = exact.abs().squeeze(1) > 1e-6
    assert torch.equal(q.squeeze(1)[big].int(), 127 * exact.squeeze(1)[big].sign().int())


@pytest.mark.parametrize("n", [32, 384, 100])
@pytest.mark.parametrize("quantize", [True, False])
def test_residual_layernorm_matches_float64(n, quantize):
    torch.manual_seed(n)
    rows = 7
    y, residual = torch.randn(rows, n) * 2, torch.randn(rows, n)
    xs, b = torch.rand(rows, 1) + 0.5, torch.randn(n)
    norm = torch.nn.LayerNorm(n, eps=1e-12)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    h, q, scale = native.w8a8_residual_layernorm(y, xs, b, residual, norm, quantize)
    v = y.double() * xs.double() + b.double() + residual.double()
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    exact = (v - mean) / torch.sqrt(var + 1e-12) * norm.weight.double() + norm.bias.double()
    assert torch.allclose(h.double(), exact, atol=2e-5, rtol=1e-5)
    if quantize:
        assert_quantized_close(q, scale, exact, atol=4e-5)
        # exactly the quantization of the floats it returns
        ref_q, ref_scale = kernels.quantize_per_token(h)
        assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
    else:
        assert q.numel() == 0 and scale.numel() == 0


def attention64(y, xs, bias, mask, batch, heads, scale):
    """Self-attention written out in float64, one sequence, head and query at a time."""
    p = y.double() * xs.double() + (bias.double() if bias is not None else 0.0)
    rows, three_w = p.shape
    length, width = rows // batch, three_w // 3
    d = width // heads
    out = torch.zeros(rows, width, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                q = p[b * length + i, h * d:(h + 1) * d] * scale
                scores = []
                for j in range(length):
                    allowed = True if mask is None else bool(mask.expand(batch, heads, length, length)[b, h, i, j])
                    k = p[b * length + j, width + h * d:width + (h + 1) * d]
                    scores.append(float(q @ k) if allowed else -math.inf)
                top = max(scores)
                if top == -math.inf:
                    continue  # nothing to attend to: zeros
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for j, wgt in enumerate(weights):
                    out[b * length + i, h * d:(h + 1) * d] += wgt / total * p[b * length + j, 2 * width + h * d:
                                                                                2 * width + (h + 1) * d]
    return out


@pytest.mark.parametrize("mask_kind", ["none", "padding", "key-broadcast", "random", "per-head", "empty-row"])
@pytest.mark.parametrize("head_dim", [16, 32])
def test_encoder_attention_matches_float64(mask_kind, head_dim):
    torch.manual_seed(head_dim)
    batch, length, heads = 3, 21, 2
    width = heads * head_dim
    y, xs, bias = torch.randn(batch * length, 3 * width), torch.rand(batch * length, 1) + 0.5, torch.randn(3 * width)
    lengths = torch.tensor([21, 9, 17])
    keys = torch.arange(length)[None, :] < lengths[:, None]
    mask = {"none": None,
            "padding": keys[:, None, None, :].expand(batch, 1, length, length).contiguous(),
            "key-broadcast": keys[:, None, None, :],
            "random": torch.rand(batch, 1, length, length) > 0.3,
            "per-head": torch.rand(batch, heads, length, length) > 0.5,
            "empty-row": keys[:, None, None, :].expand(batch, 1, length, length).clone()}[mask_kind]
    if mask_kind == "empty-row":
        mask[1, 0, 4] = False
    scale = head_dim ** -0.5
    out = native.w8a8_encoder_attention(y, xs, bias, mask, batch, heads, scale)
    assert out.shape == (batch * length, width)
    expected = attention64(y, xs, bias, mask, batch, heads, scale)
    assert torch.allclose(out.double(), expected, atol=2e-5, rtol=1e-4), float((out.double() - expected).abs().max())
    if mask_kind == "empty-row":
        assert torch.equal(out[length + 4], torch.zeros(width))


def test_encoder_attention_rejects_bad_input():
    y, xs = torch.randn(6, 96), torch.ones(6, 1)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        native.w8a8_encoder_attention(y, xs, None, None, 2, 4, 1.0)  # head_dim 8
    with pytest.raises(RuntimeError, match="batch \\* length"):
        native.w8a8_encoder_attention(y, xs, None, None, 4, 2, 1.0)
    with pytest.raises(RuntimeError, match="4-D bool"):
        native.w8a8_encoder_attention(y, xs, None, torch.ones(2, 3, 3), 2, 2, 1.0)


def test_row_passes_reject_bad_input():
    y, xs = torch.randn(3, 16), torch.ones(3, 1)
    with pytest.raises(RuntimeError, match="xs must hold one float per row"):
        native.w8a8_gelu_quantize(y, torch.ones(2, 1), None)
    with pytest.raises(RuntimeError, match="2-D float32"):
        native.w8a8_gelu_quantize(y.double(), xs, None)
    with pytest.raises(RuntimeError, match="bias"):
        native.w8a8_gelu_quantize(y, xs, torch.ones(5))
    with pytest.raises(RuntimeError, match="residual"):
        native.w8a8_residual_layernorm(y, xs, None, torch.randn(3, 8), torch.nn.LayerNorm(16), True)
    with pytest.raises(RuntimeError, match="gamma and beta"):
        native.w8a8_residual_layernorm(y, xs, None, torch.randn(3, 16), torch.nn.LayerNorm(8), True)


# --- fused blocks -------------------------------------------------------------------------------

def w8a8_bert(layers: int = 3, head_dim: int = 8) -> torch.nn.Module:
    """The tiny BERT (head_dim 8: attention through sdpa) or one with 2 heads of 16 (the native kernel)."""
    model = tiny_model("bert")
    if layers != model.config.num_hidden_layers or head_dim != 8:
        import transformers as tf

        config = copy.deepcopy(model.config)
        config.num_hidden_layers = layers
        if head_dim != 8:
            config.num_attention_heads = 32 // head_dim
        torch.manual_seed(0)
        model = tf.BertModel(config).eval()
    secateur.compress_(model, W8A8)
    return model


def inputs(batch: int = 3, length: int = 11) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(7, 128, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 6:] = 0  # padding
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch, **kwargs).last_hidden_state


@pytest.mark.parametrize("head_dim", [8, 16])
def test_fused_blocks_match_the_module_by_module_model(head_dim, monkeypatch):
    model = w8a8_bert(head_dim=head_dim)
    calls = {"attention": 0}
    kernel = native.w8a8_encoder_attention

    def counted(*args):
        calls["attention"] += 1
        return kernel(*args)

    monkeypatch.setattr(native, "w8a8_encoder_attention", counted)
    fused = copy.deepcopy(model)
    assert fuse_encoder(fused) == 3
    assert all(type(layer).__name__ == "FusedBertLayer" for layer in fused.encoder.layer)
    batch = inputs()
    real = batch["attention_mask"].bool()
    a, b = hidden(model, batch)[real], hidden(fused, batch)[real]
    # the same computation but for int8 steps at rounding boundaries: far below the quantization error
    with reference_only():
        exact = hidden(model, batch)[real]
    assert F.cosine_similarity(a, b, dim=-1).min() > 0.999
    assert (a - b).abs().max() < 0.5 * (a - exact).abs().max() + 1e-3
    assert F.cosine_similarity(b, exact, dim=-1).min() > 0.99
    assert calls["attention"] == (3 if head_dim == 16 else 0)  # head_dim 8: sdpa


def test_joint_qkv_gemm_gives_each_projections_floats():
    model = w8a8_bert(1)
    layer = model.encoder.layer[0]
    from secateur.runtime.fused_encoder import _Plan, _Handover

    fuse_encoder(model)
    plan = layer._secateur_fused
    assert isinstance(plan, _Plan) and isinstance(plan.handover, _Handover)
    mods = plan.modules(layer)
    joint, bias = plan.joint_qkv(mods)
    x = torch.randn(5, 32)
    xq, xs = kernels.quantize_per_token(x)
    out = torch.addcmul(bias, joint(xq), xs)
    for i, role in enumerate(("attn.q", "attn.k", "attn.v")):
        with torch.inference_mode():
            own = mods[role](x)
        assert torch.equal(out[:, 32 * i:32 * (i + 1)], own)


def test_blocks_hand_their_quantized_output_to_the_next(monkeypatch):
    model = w8a8_bert(3)
    fuse_encoder(model)
    calls = {"quantize": 0}
    real = native.quantize_per_token

    def counted(x):
        calls["quantize"] += 1
        return real(x)

    monkeypatch.setattr(native, "quantize_per_token", counted)
    hidden(model, inputs())
    # the first block's input and each block's attention output; nothing else is requantized
    assert calls["quantize"] == 1 + 3


@pytest.mark.parametrize("case", ["train", "reference_only", "output_attentions", "grad"])
def test_calls_outside_the_fused_path_run_the_blocks_own_forward(case):
    model = w8a8_bert(2)
    fused = copy.deepcopy(model)
    fuse_encoder(fused)
    batch = inputs()
    if case == "train":
        model.train(), fused.train()
        torch.manual_seed(0)
        a = hidden(model, batch)
        torch.manual_seed(0)
        b = hidden(fused, batch)
    elif case == "reference_only":
        with reference_only():
            a, b = hidden(model, batch), hidden(fused, batch)
    elif case == "output_attentions":
        a, b = hidden(model, batch, output_attentions=True), hidden(fused, batch, output_attentions=True)
    else:
        embeds = model.embeddings(input_ids=batch["input_ids"]).detach().requires_grad_(True)
        a = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
        b = fused(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
        assert b.requires_grad
    assert torch.equal(a, b)


def test_unfuse_restores_the_blocks_and_their_floats():
    model = w8a8_bert(2)
    before = hidden(model, inputs())
    assert fuse_encoder(model) == 2
    hidden(model, inputs())  # packs the joint q/k/v weights
    packed = model.encoder.layer[0]._secateur_fused.qkv
    assert packed is not None
    assert fuse_encoder(model) == 2  # idempotent: the packed weights are kept
    assert model.encoder.layer[0]._secateur_fused.qkv is packed
    assert unfuse_encoder(model) == 2
    assert all(type(layer).__name__ == "BertLayer" for layer in model.encoder.layer)
    assert not hasattr(model.encoder.layer[0], "_secateur_fused")
    assert torch.equal(hidden(model, inputs()), before)


def test_a_copy_of_a_fused_model_is_independent():
    model = w8a8_bert(2)
    fuse_encoder(model)
    batch = inputs()
    first = hidden(model, batch)
    twin = copy.deepcopy(model)
    assert twin.encoder.layer[0]._secateur_fused.handover is twin.encoder.layer[1]._secateur_fused.handover
    assert twin.encoder.layer[0]._secateur_fused.handover is not model.encoder.layer[0]._secateur_fused.handover
    assert torch.equal(hidden(twin, batch), first)


def test_changed_weights_are_repacked():
    model = w8a8_bert(1)
    fused = copy.deepcopy(model)
    fuse_encoder(fused)
    batch = inputs()
    hidden(fused, batch)
    for m in (model, fused):  # edit a q/k/v member in place
        query = m.encoder.layer[0].attention.self.query
        with torch.no_grad():
            query.weight_q.neg_()
        query.reset_kernel()
    real = batch["attention_mask"].bool()
    a, b = hidden(model, batch)[real], hidden(fused, batch)[real]
    assert F.cosine_similarity(a, b, dim=-1).min() > 0.999


@pytest.mark.parametrize("head_dim", [8, 16])
def test_an_embedding_does_not_depend_on_its_batch_mates(head_dim):
    model = w8a8_bert(2, head_dim)
    fuse_encoder(model)
    batch = inputs()
    together = hidden(model, batch)
    alone = hidden(model, {k: v[1:2, :6] for k, v in batch.items()})
    if head_dim == 16:  # the native attention never reads the padding keys: the very same floats
        assert torch.equal(together[1, :6], alone[0])
    else:  # per-token quantization; only sdpa's float order may change with the padding
        assert F.cosine_similarity(together[1, :6], alone[0], dim=-1).min() > 0.9999


def test_other_models_are_left_alone():
    assert fuse_encoder(tiny_model("bert")) == 0  # not quantized
    llama = tiny_model("llama")
    secateur.compress_(llama, W8A8)
    assert fuse_encoder(llama) == 0  # not an encoder
    weight_only = tiny_model("bert")
    secateur.compress_(weight_only, RTNConfig(bits=8, strategy="channel"))
    assert fuse_encoder(weight_only) == 0  # W8A16
    tanh = tiny_model("bert")
    tanh.config.hidden_act = "gelu_new"
    secateur.compress_(tanh, W8A8)
    assert fuse_encoder(tanh) == 0  # not the erf GELU the pass computes


def test_evaluation_never_fuses_the_model_it_measures_and_says_how_it_ran(tmp_path):
    from secateur.evaluate import evaluate
    from secateur.runtime import describe, optimize_

    from secateur.testing import tiny_tokenizer

    model, tokenizer = w8a8_bert(2), tiny_tokenizer("bert")
    classes = [type(m) for m in model.modules()]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tscore\n" + "".join(f"a cat sat {i}\ta dog ran {i}\t{i % 5}\n" for i in range(8)))
    similarity = evaluate(model, tokenizer, "sts", str(pairs))
    timing = evaluate(model, tokenizer, "speed", prompt_len=8, runs=2, warmup=1)
    assert [type(m) for m in model.modules()] == classes  # evaluation swapped nothing
    assert similarity.settings["runtime"] == timing.settings["runtime"] == "eager"
    assert optimize_(model) is model and describe(model) == "eager, 2 fused encoder blocks"
    assert evaluate(model, tokenizer, "sts", str(pairs)).settings["runtime"] == describe(model)
