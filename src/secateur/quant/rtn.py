"""RTN — round-to-nearest weight quantization, the data-free baseline.

Every targeted weight is mapped to ``b``-bit integers with the scale (and zero point) of its
tensor, output channel or group of input columns, each ``q = clamp(round(w / s) + z)``. Nothing
is learned and no data is read; the range is the group's min/max or, with ``observer: mse``, the
clipping ratio with the smallest error. Every other weight quantizer is measured against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..api import register
from ..targets import select_modules
from ..models.layers import weight_matrix
from .common import WeightQuantConfig, check_linear, replace, scheme_for, summary, to_quant_linear
from .primitives import dequantize, quantize_weight


@dataclass(frozen=True)
class RTNConfig(WeightQuantConfig):
    """Round every targeted weight to the nearest point of its integer grid."""


@register("rtn", RTNConfig, kind="quantize", needs_data=False, paper="round-to-nearest baseline (e.g. Dettmers et al. 2022)")
@torch.no_grad()
def apply(model: torch.nn.Module, config: RTNConfig, ctx: Any = None) -> dict[str, Any]:
    modules = select_modules(model, config.targets, config.ignore)
    layers = {}
    for name, module in modules.items():
        check_linear(name, module)
        scheme = scheme_for(config, name, module)
        w = weight_matrix(module).detach().float()
        q, scale, zero = quantize_weight(w, scheme)
        err = float(((dequantize(q, scale, zero, scheme) - w) ** 2).sum() / (w ** 2).sum().clamp_min(1e-30))
        replace(model, name, to_quant_linear(module, q, scale, zero, scheme, config.activations))
        layers[name] = {"bits": scheme.bits, "strategy": scheme.strategy, "relative_weight_error": round(err, 8)}
    return summary(layers, config)
