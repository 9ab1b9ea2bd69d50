"""Fused W8A8 encoder layers: a post-norm block (BERT) as four int8 GEMMs, attention and four row passes.

A W8A8 encoder layer run module by module quantizes every Linear's input on its own, writes each
GEMM's float output, then rescales it, adds the bias, and only then applies GELU, the residual add
and LayerNorm, each a full pass over a ``[tokens, width]`` tensor: on MiniLM this elementwise work
costs about as much as the int8 GEMMs. :func:`fuse_encoder` gives each eligible block a forward
that instead runs

1. q/k/v as one int8 GEMM on one quantization of the block input (the three weights concatenated);
2. attention read straight from that GEMM's output, rescaled as it is read
   (``secateur::w8a8_encoder_attention``, for head sizes that are multiples of 16 and bool
   masks; otherwise one rescale pass and the model's own attention function);
3. the output projection's GEMM, then *rescale + bias + residual + LayerNorm + quantize* in one
   pass (``secateur::w8a8_residual_layernorm``): the float result feeds the second residual, the
   int8 one the up-projection;
4. the up-projection's GEMM, then *rescale + bias + GELU + quantize* in one pass
   (``secateur::w8a8_gelu_quantize``): the intermediate activation is never written in float;
5. the down-projection's GEMM, then *rescale + bias + residual + LayerNorm* (+ the quantization
   the next fused block reads, handed over with the output).

The integers entering each GEMM are those the module-by-module path would compute from the same
floats (per-token symmetric int8, :func:`secateur.runtime.kernels.quantize_per_token`; the GELU
pass multiplies by the reciprocal of the scale instead of dividing). But GELU (erf to 3e-7),
LayerNorm and attention are computed in a different float order than torch's, so a value sitting
on an int8 rounding boundary can move one step: the outputs match the unfused W8A8 model to
quantization noise, not bit for bit (tests/runtime/test_fused_encoder.py).

Which blocks qualify is read from the architecture table: post-norm rows (norms ``attn_out`` and
``mlp_out``) whose six projections are per-channel symmetric W8A8 :class:`QuantLinear` s with kernels
on, exact GELU, absolute positions. Anything else a call needs (training, gradients, other dtypes
or devices, cross-attention, a cache, attention outputs, feed-forward chunking, torch.compile,
no native kernels, :func:`~secateur.runtime.linear.reference_only`) runs the block's own forward.
Fusing swaps the block's class for a subclass (so ``copy.deepcopy`` and ``isinstance`` keep
working); :func:`unfuse_encoder` swaps it back. Nothing is added to the state dict.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Optional

import torch
import torch.nn as nn

from ..models.arch import arch_of
from . import kernels, linear, native
from .linear import QuantLinear

_ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down")
_FUSED: dict[type, type] = {}


def _version(t: torch.Tensor) -> int:
    """The in-place version counter (inference tensors have none: -1)."""
    return -1 if t.is_inference() else t._version


class _Handover:
    """The last fused block's output and its int8 form, for the next block (shared by a model's
    fused blocks; a copy of the model gets a fresh, empty one). It is taken only by the very tensor
    object handed over, unmodified since (hooks editing a block's output in place). One tuple,
    replaced whole, so that threads running the model at once never mix two entries."""

    def __init__(self) -> None:
        self.entry: Optional[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = None

    def take(self, x: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        entry = self.entry
        if entry is not None and entry[0] is x and _version(x) == entry[1]:
            return entry[2], entry[3]
        return None

    def give(self, out: Optional[torch.Tensor], q: Optional[torch.Tensor], scale: Optional[torch.Tensor]) -> None:
        self.entry = None if out is None else (out, _version(out), q, scale)

    def __deepcopy__(self, memo: dict) -> "_Handover":
        return _Handover()


class _Plan:
    """What a fused block needs besides its modules: paths, the packed joint q/k/v weight (made on
    first use, remade when a member's tensors change) and the handover."""

    def __init__(self, paths: dict[str, str], norms: tuple[str, str], handover: _Handover, last: bool):
        self.paths, self.norms, self.handover, self.last = paths, norms, handover, last
        self.key: Any = None
        self.qkv: Any = None  # (W8A8Weight, bias or None)

    def __deepcopy__(self, memo: dict) -> "_Plan":
        return _Plan(dict(self.paths), self.norms, copy.deepcopy(self.handover, memo), self.last)

    def modules(self, block: nn.Module) -> dict[str, QuantLinear]:
        return {role: block.get_submodule(path) for role, path in self.paths.items()}

    def joint_qkv(self, mods: dict[str, QuantLinear]) -> Any:
        members = [mods[r] for r in ("attn.q", "attn.k", "attn.v")]
        key = tuple((id(t), t._version) for m in members
                    for t in (m.weight_q, m.weight_scale, m.weight_zero_point, m.bias) if t is not None)
        if key != self.key:
            gemm = kernels.W8A8Gemm(torch.cat([m.weight_q for m in members]),
                                    torch.cat([m.weight_scale for m in members]),
                                    torch.cat([m.weight_zero_point for m in members]))
            biased = [m.bias is not None for m in members]
            if not gemm.foldable or any(biased) != all(biased):
                self.qkv = None  # 8-bit zero points, or biases on some members only
            else:
                self.qkv = (gemm, torch.cat([m.bias.detach().float() for m in members]) if all(biased) else None)
            self.key = key
        return self.qkv


def _own_pack(m: QuantLinear) -> Any:
    """The module's weight as a :class:`~secateur.runtime.kernels.W8A8Gemm` (its kernel chosen per
    token bucket by measurement, its packs the module's own); None for weights with unfoldable
    zero points."""
    gemm = m.gemm() if m.kernel == "w8a8" else None
    return gemm if gemm is not None and gemm.foldable else None


def _eligible_module(m: nn.Module) -> bool:
    return isinstance(m, QuantLinear) and m.activation == "int8" and m.group_size is None


def _attention_function(attn: nn.Module) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = attn.config._attn_implementation
    if impl in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[impl]
    return getattr(sys.modules[type(attn).__module__], "eager_attention_forward")


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   *args: Any, **kwargs: Any) -> Any:
    plan: _Plan = self._secateur_fused
    base = type(self)._secateur_base
    x = hidden_states
    if (self.training or torch.compiler.is_compiling() or linear.reference_only_active() or x.dim() != 3
            or x.dtype != torch.float32 or x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled())
            or any(a is not None for a in args) or any(v is not None and v is not False for v in kwargs.values())
            or not native.available()):
        plan.handover.give(None, None, None)
        return base.forward(self, hidden_states, attention_mask, *args, **kwargs)
    mods = plan.modules(self)
    packs = {role: _own_pack(mods[role]) for role in ("attn.o", "mlp.up", "mlp.down")}
    qkv = plan.joint_qkv(mods)
    if qkv is None or any(p is None for p in packs.values()) or not all(m.use_kernels for m in mods.values()):
        plan.handover.give(None, None, None)
        return base.forward(self, hidden_states, attention_mask, *args, **kwargs)

    batch, length, width = x.shape
    x2 = x.reshape(batch * length, width).contiguous()
    handed = plan.handover.take(hidden_states)
    xq, xs = handed if handed is not None else native.quantize_per_token(x2)
    joint, joint_bias = qkv
    attn = self.get_submodule(plan.paths["attn.q"].rsplit(".", 1)[0])
    heads, head_dim = attn.num_attention_heads, attn.attention_head_size
    inner = heads * head_dim
    products, ws = joint.products(xq)
    if head_dim % 16 == 0 and attn.config._attn_implementation in ("sdpa", "eager") and (
            attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.dim() == 4)):
        context = native.w8a8_encoder_attention(products, xs, joint_bias, attention_mask, batch, heads,
                                                float(attn.scaling), ws)
    else:  # other head sizes or masks: rescale, then the model's own attention function
        projected = native.w8a8_epilogue(products, xs, joint_bias, ws)
        q, k, v = (projected[:, i * inner:(i + 1) * inner].view(batch, length, heads, head_dim).transpose(1, 2)
                   for i in range(3))
        context, _ = _attention_function(attn)(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling)
    aq, a_scale = native.quantize_per_token(context.reshape(batch * length, inner).contiguous())
    norm_attn, norm_mlp = (self.get_submodule(n) for n in plan.norms)
    o, up, down = mods["attn.o"], mods["mlp.up"], mods["mlp.down"]
    y, ws = packs["attn.o"].products(aq)
    h1, h1q, h1_scale = native.w8a8_residual_layernorm(y, a_scale, o.bias, x2, norm_attn, True, ws)
    y, ws = packs["mlp.up"].products(h1q)
    iq, i_scale = native.w8a8_gelu_quantize(y, h1_scale, up.bias, ws)
    y, ws = packs["mlp.down"].products(iq)
    h2, h2q, h2_scale = native.w8a8_residual_layernorm(y, i_scale, down.bias, h1, norm_mlp, not plan.last, ws)
    out = h2.view(batch, length, width)
    plan.handover.give(None if plan.last else out, h2q, h2_scale)
    return out


def _fused_kernels(self: nn.Module) -> dict[str, dict[int, str]]:
    """The joint q/k/v GEMM's kernels by token bucket (for :func:`secateur.runtime.dispatch.summary`)."""
    qkv = self._secateur_fused.qkv
    return qkv[0].secateur_kernels() if qkv is not None else {}


def _fused_class(base: type) -> type:
    if base not in _FUSED:
        _FUSED[base] = type(f"Fused{base.__name__}", (base,), {"forward": _fused_forward, "_secateur_base": base,
                                                                "secateur_kernels": _fused_kernels,
                                                                "__module__": __name__})
    return _FUSED[base]


def _qualifies(model: nn.Module, block: nn.Module, paths: dict[str, str], norms: tuple[str, str]) -> bool:
    config = model.config
    if getattr(config, "hidden_act", None) != "gelu" or getattr(config, "is_decoder", False) \
            or getattr(config, "add_cross_attention", False) or getattr(block, "chunk_size_feed_forward", 0):
        return False
    try:
        mods = [block.get_submodule(p) for p in paths.values()]
        norm_mods = [block.get_submodule(n) for n in norms]
        attn = block.get_submodule(paths["attn.q"].rsplit(".", 1)[0])
    except AttributeError:
        return False
    return (all(_eligible_module(m) for m in mods) and all(isinstance(n, nn.LayerNorm) for n in norm_mods)
            and all(hasattr(attn, a) for a in ("num_attention_heads", "attention_head_size", "scaling", "config"))
            and getattr(attn, "position_embedding_type", "absolute") == "absolute")


def fuse_encoder(model: nn.Module) -> int:
    """Give every eligible block of a W8A8 post-norm encoder the fused forward (see the module
    docstring); returns how many blocks are fused (0 for other models). Idempotent."""
    facts = arch_of(model, strict=False)
    if facts is None or facts.kind != "encoder" or not {"attn_out", "mlp_out"} <= set(facts.arch.norms):
        return 0
    arch = facts.arch
    projections = arch.projections()
    if not set(_ROLES) <= set(projections):
        return 0
    paths = {role: projections[role] for role in _ROLES}
    norms = (arch.norms["attn_out"], arch.norms["mlp_out"])
    blocks = list(arch.get_blocks(model))
    chosen = [i for i, b in enumerate(blocks) if _qualifies(model, b, paths, norms)]
    handover = _Handover()
    for i in chosen:
        block, last = blocks[i], i + 1 not in chosen
        plan = getattr(block, "_secateur_fused", None)
        if isinstance(plan, _Plan):  # already fused: keep its packed weights
            plan.handover, plan.last = handover, last
            continue
        block.__class__ = _fused_class(type(block))
        block._secateur_fused = _Plan(paths, norms, handover, last)
    return len(chosen)


def unfuse_encoder(model: nn.Module) -> int:
    """Undo :func:`fuse_encoder`; returns how many blocks were restored."""
    restored = 0
    for module in model.modules():
        base = getattr(type(module), "_secateur_base", None)
        if base is not None and type(module) is _FUSED.get(base):
            module.__class__ = base
            del module._secateur_fused
            restored += 1
    return restored


__all__ = ["fuse_encoder", "unfuse_encoder"]
