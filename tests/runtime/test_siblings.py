"""Linked sibling GEMVs (secateur.runtime.siblings): the same floats as each projection's own GEMV,
one kernel call per group, no extra memory, and unlinking when a member's weights change."""

from __future__ import annotations

import pytest
import torch

import secateur
from secateur.runtime import dispatch, native
from secateur.runtime.linear import QuantLinear
from secateur.quant.rtn import RTNConfig
from secateur.runtime.siblings import link_siblings
from secateur.testing import tiny_model

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built on this machine")

SCHEMES = {"W4A16": RTNConfig(bits=4, strategy="group", group_size=32),
           "W8A8": RTNConfig(bits=8, strategy="channel", activations="int8")}


@pytest.fixture(autouse=True)
def one_token_gemv():
    """Linking is for projections whose one-token kernel is secateur's GEMV; on these tiny shapes the
    measurement may pick float32 instead, so the GEMV is forced for one token."""
    with dispatch.forced("w8a8@1=gemv,w4a16@1=gemv"):
        yield


def quantized(scheme: str, bias: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    if bias:  # Llama with attention biases (Qwen2-like): the joint call adds them per member
        for layer in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                old = getattr(layer.self_attn, name)
                new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
                new.weight.data.copy_(old.weight.data)
                new.bias.data.normal_()
                setattr(layer.self_attn, name, new)
    secateur.compress_(model, SCHEMES[scheme])
    return model


class CountCalls:
    def __init__(self, monkeypatch):
        self.n = 0
        for name in ("w4_gemv", "w8a8_gemv"):
            real = getattr(native, name)

            def counted(*args, _real=real, **kwargs):
                self.n += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(native, name, counted)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("bias", [False, True])
def test_linked_model_gives_the_same_floats_with_fewer_calls(scheme, bias, monkeypatch):
    model = quantized(scheme, bias)
    ids = torch.randint(0, model.config.vocab_size, (1, 1))
    with torch.inference_mode():
        before = model(ids).logits
    counter = CountCalls(monkeypatch)
    with torch.inference_mode():
        model(ids)
    unlinked_calls, counter.n = counter.n, 0
    layers = model.config.num_hidden_layers
    assert link_siblings(model) == 2 * layers  # q/k/v and gate/up in every block
    with torch.inference_mode():
        after = model(ids).logits
    assert torch.equal(before, after)
    assert unlinked_calls - counter.n == 3 * layers  # 7 GEMVs a block become 4


def test_members_weights_are_views_of_the_joint_weight():
    model = quantized("W4A16")
    link_siblings(model)
    attn = model.model.layers[0].self_attn
    group = attn.q_proj._sibling[0]
    joint = group.packed.w
    start = 0
    for member in (attn.q_proj, attn.k_proj, attn.v_proj):
        own = member.packed("gemv").w
        assert own.untyped_storage().data_ptr() == joint.untyped_storage().data_ptr()
        assert torch.equal(own, joint[start:start + own.shape[0]])
        assert member._sibling[1] == start * native.LANES
        start += own.shape[0]
    assert start == joint.shape[0]


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_changing_a_member_unlinks_its_group(scheme):
    model = quantized(scheme)
    link_siblings(model)
    attn = model.model.layers[0].self_attn
    k = attn.k_proj
    with torch.no_grad():
        k.weight_q.copy_(k.weight_q.flip(0))
    k.reset_kernel()
    assert k._sibling is None and attn.q_proj._sibling[0].valid is False
    x = torch.randn(1, k.in_features)
    with torch.inference_mode():
        for member in (attn.q_proj, k, attn.v_proj):
            ref = torch.nn.functional.linear(x, member.dequantized_weight())
            got = member(x)
            assert (got - ref).abs().max() < 0.05 * ref.abs().max() + 1e-6


def test_eager_calls_share_one_joint_output_for_the_same_input(monkeypatch):
    model = quantized("W4A16")
    link_siblings(model)
    attn = model.model.layers[0].self_attn
    counter = CountCalls(monkeypatch)
    x = torch.randn(1, attn.q_proj.in_features)
    with torch.inference_mode():
        q, k = attn.q_proj(x), attn.k_proj(x)
        assert counter.n == 1
        x.mul_(2)  # the same tensor, edited in place (no version counter in inference mode): again
        k2 = attn.k_proj(x)
        assert counter.n == 2 and not torch.equal(k, k2)
        attn.v_proj(x.clone())  # another tensor with the same values: served
        assert counter.n == 2
        attn.v_proj(x)  # served once per member: computed again
        assert counter.n == 3
        attn.q_proj(x.new_zeros(x.shape))
        assert counter.n == 4


def test_unknown_architectures_and_unquantized_models_are_left_alone():
    assert link_siblings(torch.nn.Sequential(QuantLinear(32, 32, bits=4, group_size=32))) == 0
    assert link_siblings(tiny_model("llama")) == 0
