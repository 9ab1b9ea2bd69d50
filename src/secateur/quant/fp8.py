"""FP8 — 8-bit floating-point weights and activations (W8A8-FP8).

Micikevicius et al., "FP8 Formats for Deep Learning" (2022), arXiv:2209.05433.

The idea: an 8-bit float (E4M3: 4 exponent and 3 mantissa bits, largest 448; E5M2: more range,
less precision) keeps relative precision over a wide range, so a single scale per tensor (or per
output channel) mapping the largest magnitude onto the format's largest value is usually enough —
no calibration data, no search. Activations are cast to FP8 dynamically per token at run time and
the product runs as an FP8 GEMM (``torch._scaled_mm``) with the two scales applied to its
float32 accumulator.

:func:`secateur.save` writes FP8Linear modules in the compressed-tensors ``float-quantized``
layout (:mod:`secateur.artifacts.compressed_tensors`), which stock transformers and vLLM load. Inside
``with secateur.runtime.linear.reference_only():`` an FP8Linear runs its reference path instead of
the FP8 GEMM: the input fake-quantized per token (cast to FP8 and back), then ``F.linear`` with
the dequantized weight, the very operations stock transformers (compressed-tensors) runs on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn as nn

from ..api import register
from ..config import TargetedConfig, param
from ..targets import select_modules
from ..models.layers import weight_matrix
from .common import check_linear, replace
from ..runtime.fp8_linear import FP8Linear
from .primitives import dequantize_fp8, fp8_dtype, quantize_fp8


@dataclass(frozen=True)
class FP8Config(TargetedConfig):
    """Cast weights (and, dynamically per token, activations) to 8-bit floats with scales."""

    format: Literal["e4m3", "e5m2"] = param("e4m3", "FP8 format of the weights and activations")
    strategy: Literal["tensor", "channel"] = param("channel", "one weight scale per tensor or per output channel")
    activations: Optional[Literal["fp8"]] = param("fp8", "fp8: dynamic per-token FP8 activations; None: weight-only")


@register("fp8", FP8Config, kind="quantize", needs_data=False, paper="Micikevicius et al. 2022, arXiv:2209.05433")
@torch.no_grad()
def apply(model: nn.Module, config: FP8Config, ctx: Any = None) -> dict[str, Any]:
    fp8_dtype(config.format)
    modules = select_modules(model, config.targets, config.ignore)
    layers = {}
    for name, module in modules.items():
        check_linear(name, module)
        w = weight_matrix(module).detach().float()
        w8, scale = quantize_fp8(w, config.format, config.strategy)
        err = float(((dequantize_fp8(w8, scale) - w) ** 2).sum() / (w ** 2).sum().clamp_min(1e-30))
        bias = getattr(module, "bias", None)
        replace(model, name, FP8Linear(w8, scale.expand(w.shape[0], 1) if config.strategy == "tensor" else scale,
                                       bias, config.activations, config.strategy).to(w8.device))
        layers[name] = {"bits": 8, "format": config.format, "relative_weight_error": round(err, 8)}
    return {"modules": len(layers), "format": config.format, "strategy": config.strategy,
            "activations": config.activations, "layers": layers}
