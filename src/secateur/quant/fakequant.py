"""Quantization-aware training (QAT): train a model through the rounding it will be deployed with.

Post-training quantizers (RTN, GPTQ, AWQ) fix the integers once; QAT (Jacob et al. 2018) keeps a
float "shadow" weight and, in every forward, quantizes and dequantizes it (*fake quantization*), so
the loss sees the integer model while the optimizer still takes small float steps. Rounding has a
zero gradient almost everywhere; the straight-through estimator (STE) passes the gradient of
``round`` as the identity instead. LSQ (Esser et al. 2020) also learns the scales: through the STE,
``∂ŵ/∂s = round(w/s) - w/s`` inside the integer range and ``q_min - z`` / ``q_max - z`` where ``w``
is clipped (LSQ's extra gradient scaling ``1/√(N·q_max)`` is left out: Adam normalises step sizes).

Lifecycle::

    fq = prepare_qat(model, WeightQuantConfig(bits=4, group_size=32))   # Linears -> FakeQuantLinear
    ... train model (any optimizer; scales are parameters with learn_scales=True) ...
    layers = convert_qat(model)                                          # -> QuantLinear (integers)

:class:`FakeQuantLinear` computes ``F.linear(x, ŵ, b)`` with ``ŵ = (clamp(round(w/s) + z) - z) · s``
(:func:`~secateur.quant.primitives.fake_quantize`, float32, the library's signed convention), the
very weight :meth:`FakeQuantLinear.to_quant_linear` stores as integers, so the converted
:class:`~secateur.runtime.linear.QuantLinear`'s reference path reproduces the trained module exactly.
Zero points stay fixed (integers); scales are clamped to at least ``MIN_SCALE`` in every use, so
an optimizer step that pushes one to zero or below cannot divide by zero or flip signs. With
``activation="int8"`` (W8A8) the input is fake-quantized too: symmetric int8 per token (each row's
scale is its own ``max|x| / 127``, so a token never depends on the rest of the batch), STE gradient.
A model already holding QuantLinears (a GPTQ artifact) starts from their integers and scales.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, SecateurError
from ..targets import _matches, compile_pattern, protected_modules, select_modules
from ..models.layers import weight_matrix
from .common import WeightQuantConfig, check_linear, replace, scheme_for, to_quant_linear
from ..runtime.linear import ACTIVATIONS, QuantLinear
from .primitives import Scheme, fake_quantize, quantize, resolve_group, round_ste, weight_params

log = logging.getLogger(__name__)

MIN_SCALE = 1e-8  # every scale is clamped to at least this in the forward and at conversion


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 quantize-dequantize of each row of the last dimension (scale ``max|row| /
    127``, detached; round half to even), identity gradient. The same values as
    :func:`secateur.runtime.kernels.quantize_per_token` followed by ``q · scale`` (no clamp is needed:
    ``|x / scale| <= 127``)."""
    xf = x.float()
    scale = (xf.detach().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    return (round_ste(xf / scale) * scale).to(x.dtype)


class FakeQuantLinear(nn.Module):
    """A trainable Linear whose forward uses its fake-quantized weight (see the module docstring).

    ``weight`` float ``[out, in]`` and ``bias`` are parameters; ``scale`` (float32, ``[1, 1]`` per
    tensor, ``[out, 1]`` per channel, ``[out, in / group_size]`` per group) is a parameter when
    scales are learned and a buffer otherwise; ``zero_point`` is an int8 buffer of the same shape.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
                 zero_point: torch.Tensor, scheme: Scheme, *, learn_scales: bool = True,
                 activation: Optional[str] = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise SecateurError(f"activation must be None (weight-only) or 'int8' (W8A8), got {activation!r}")
        if activation == "int8" and scheme.strategy == "group":
            raise SecateurError("int8 activations (W8A8) need per-channel or per-tensor weight scales, got "
                                f"strategy 'group' (group_size {scheme.group_size})")
        self.out_features, self.in_features = weight.shape
        self.scheme, self.activation = scheme, activation
        self.weight = nn.Parameter(weight.detach().clone(memory_format=torch.contiguous_format))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        scale = scale.detach().float().clone().to(weight.device)
        if learn_scales:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point.detach().to(device=weight.device, dtype=torch.int8).clone())

    @classmethod
    def from_linear(cls, linear: nn.Module, scheme: Scheme, *, learn_scales: bool = True,
                    activation: Optional[str] = None) -> "FakeQuantLinear":
        """From an ``nn.Linear`` (or GPT-2's ``Conv1D``, transposed to ``[out, in]``): copies of its
        weight and bias, initial scales and zero points from the scheme's observer (min-max or MSE)."""
        check_linear("from_linear", linear)
        weight = weight_matrix(linear).detach()
        scheme = resolve_group(weight.shape[1], scheme, where=type(linear).__name__)
        scale, zero = weight_params(weight.float(), scheme)
        return cls(weight, linear.bias, scale, zero, scheme, learn_scales=learn_scales, activation=activation)

    @classmethod
    def from_quant_linear(cls, qlinear: QuantLinear, *, learn_scales: bool = True) -> "FakeQuantLinear":
        """From integers already chosen (a GPTQ / RTN artifact): the weight is their dequantized
        float32 value, scales and zero points are copied, bits, group size and activation kept. A
        per-tensor scale was stored repeated per row, so it continues as per-channel."""
        if not isinstance(qlinear, QuantLinear):
            raise SecateurError(f"from_quant_linear takes a QuantLinear, got {type(qlinear).__name__}")
        group = qlinear.group_size
        symmetric = not bool(qlinear.weight_zero_point.any())
        scheme = Scheme(qlinear.bits, symmetric, "group" if group else "channel", group or 128)
        return cls(qlinear.dequantized_weight(torch.float32), qlinear.bias, qlinear.weight_scale,
                   qlinear.weight_zero_point, scheme, learn_scales=learn_scales, activation=qlinear.activation)

    @property
    def learn_scales(self) -> bool:
        return isinstance(self.scale, nn.Parameter)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight ``ŵ`` (float32, differentiable in ``weight`` and ``scale``)."""
        return fake_quantize(self.weight.float(), self.scale.clamp_min(MIN_SCALE), self.zero_point, self.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "int8":
            x = fake_quantize_per_token(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.quantized_weight().to(x.dtype), bias)

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """The QuantLinear of the current weight and scales: ``q = clamp(round(w / s) + z)`` (the
        integers the forward rounds to), so its reference path computes what this module does."""
        scale = self.scale.detach().clamp_min(MIN_SCALE).clone()
        q = quantize(self.weight.detach().float(), scale, self.zero_point, self.scheme)
        return to_quant_linear(self, q, scale, self.zero_point.clone(), self.scheme, self.activation)

    def extra_repr(self) -> str:
        s = self.scheme
        granularity = f"group_size={s.group_size}" if s.strategy == "group" else f"strategy={s.strategy}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, {granularity}, "
                f"symmetric={s.symmetric}, activation={self.activation}, learn_scales={self.learn_scales}, "
                f"bias={self.bias is not None}")


# --- whole models ---------------------------------------------------------------------------------
def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """Every FakeQuantLinear of ``model``, by name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def _select(model: nn.Module, config: WeightQuantConfig) -> dict[str, nn.Module]:
    """The modules :func:`prepare_qat` converts: :func:`~secateur.targets.select_modules`'s choice,
    plus the QuantLinears (which have no float ``weight``, so it never selects them) that a targets
    pattern names (``Linear`` covers them) and no ignore pattern matches. A pattern that selects
    only QuantLinears is not an error."""
    protected = protected_modules(model)
    ignore = [compile_pattern(p, f"ignore[{i}]") for i, p in enumerate(config.ignore)]
    quantized: dict[int, set[str]] = {}
    for i, pattern in enumerate(config.targets):
        c = compile_pattern(pattern, f"targets[{i}]")
        quantized[i] = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)
                        and (c == "Linear" or _matches(c, n, m)) and (n not in protected or n == pattern)
                        and not any(_matches(g, n, m) for g in ignore)}
    remaining = list(range(len(config.targets)))
    while remaining:  # a pattern that only names QuantLinears would fail select_modules: leave it out
        try:
            dense = select_modules(model, [config.targets[i] for i in remaining], config.ignore)
            break
        except ConfigError as exc:
            hit = re.fullmatch(r"targets\[(\d+)\]", exc.path)
            if hit is None:
                raise
            index = remaining.pop(int(hit[1]))
            if not quantized[index]:
                raise ConfigError(f"targets[{index}]", str(exc)[len(exc.path) + 2:]) from None
    else:
        dense = {}
    chosen = set(dense).union(*quantized.values())
    return {n: m for n, m in model.named_modules() if n in chosen}


def prepare_qat(model: nn.Module, config: WeightQuantConfig, *,
                learn_scales: bool = True) -> dict[str, FakeQuantLinear]:
    """Replace every targeted Linear (or Conv1D) by a :class:`FakeQuantLinear` with the config's
    scheme (``overrides`` and ``fallback`` as in RTN) and activations, and every targeted QuantLinear
    by one starting from its integers. Every module is built (and checked) before the first replacement."""
    targets = _select(model, config)
    new: dict[str, FakeQuantLinear] = {}
    for name, module in targets.items():
        if isinstance(module, FakeQuantLinear):
            raise SecateurError(f"{name} is already a FakeQuantLinear (prepare_qat ran twice?); "
                                "convert_qat it first or narrow targets")
        if isinstance(module, QuantLinear):
            new[name] = FakeQuantLinear.from_quant_linear(module, learn_scales=learn_scales)
        else:
            check_linear(name, module)
            new[name] = FakeQuantLinear.from_linear(module, scheme_for(config, name, module),
                                                    learn_scales=learn_scales, activation=config.activations)
    for name, module in new.items():
        replace(model, name, module)
    log.info("QAT: %d modules fake-quantized (%d from QuantLinears)", len(new),
             sum(isinstance(m, QuantLinear) for m in targets.values()))
    return new


@torch.no_grad()
def convert_qat(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Replace every FakeQuantLinear by its :meth:`~FakeQuantLinear.to_quant_linear`; per layer, its
    bits, strategy and ``relative_weight_error`` ``‖w - ŵ‖² / ‖w‖²`` of the trained float weight."""
    layers: dict[str, dict[str, Any]] = {}
    for name, module in fake_quant_modules(model).items():
        new = module.to_quant_linear()
        w = module.weight.detach().float()
        err = float(((new.dequantized_weight() - w) ** 2).sum() / (w ** 2).sum().clamp_min(1e-30))
        replace(model, name, new)
        layers[name] = {"bits": module.scheme.bits, "strategy": module.scheme.strategy,
                        "relative_weight_error": round(err, 8)}
    log.info("QAT: %d modules converted to integers", len(layers))
    return layers


__all__ = ["MIN_SCALE", "FakeQuantLinear", "fake_quantize_per_token", "prepare_qat", "convert_qat",
           "fake_quant_modules"]
