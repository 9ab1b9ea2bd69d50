"""FP8 — 8-bit floating-point weights and activations (W8A8-FP8).

Micikevicius et al., "FP8 Formats for Deep Learning" (2022), arXiv:2209.05433.

The idea: an 8-bit float (E4M3: 4 exponent and 3 mantissa bits, largest 448; E5M2: more range,
less precision) keeps relative precision over a wide range, so a single scale per tensor (or per
output channel) mapping the largest magnitude onto the format's largest value is usually enough —
no calibration data, no search. Activations are cast to FP8 dynamically per token at run time and
the product runs as an FP8 GEMM (``torch._scaled_mm``) with the two scales applied to its
float32 accumulator.

:func:`secateur.save` writes FP8Linear modules in the compressed-tensors ``float-quantized``
layout (:mod:`secateur.quant.formats`), which stock transformers and vLLM load. Inside
``with secateur.quant.linear.reference_only():`` an FP8Linear runs its reference path instead of
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
from .common import check_linear, replace, weight_matrix
from .primitives import dequantize_fp8, fp8_dtype, quantize_fp8


@register("fp8", kind="quantize", needs_data=False, paper="Micikevicius et al. 2022, arXiv:2209.05433")
@dataclass(frozen=True)
class FP8Config(TargetedConfig):
    """Cast weights (and, dynamically per token, activations) to 8-bit floats with scales."""

    format: Literal["e4m3", "e5m2"] = param("e4m3", "FP8 format of the weights and activations")
    strategy: Literal["tensor", "channel"] = param("channel", "one weight scale per tensor or per output channel")
    activations: Optional[Literal["fp8"]] = param("fp8", "fp8: dynamic per-token FP8 activations; None: weight-only")


class FP8Linear(nn.Module):
    """A Linear whose weight is stored in FP8 with float32 scales (``weight_fp8``, ``weight_scale``).

    ``weight_scale`` is ``[out, 1]`` (a per-tensor scale repeated on every row); ``strategy``
    (``"tensor"``, ``"channel"`` or None: unknown) says which, for the checkpoint's config."""

    def __init__(self, weight_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 activations: str | None, strategy: str | None = None):
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", scale.reshape(-1, 1).float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.activations = activations
        self.strategy = strategy

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight_fp8, self.weight_scale).to(dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` per token (FP8 activations), then ``F.linear`` with the dequantized
        weight: compressed-tensors' CPU forward, step by step, in ``x``'s dtype (scale ``amax /
        fmax``, ``x / scale`` clamped and cast to FP8 and back, times the scale).

        Like compressed-tensors (0.20), "per token" means per index of the first two dimensions
        (``[batch, seq, features]``): a 2-D input (OPT flattens its MLP input to ``[tokens,
        features]``) gets one scale for the whole tensor there, so it does here too. ``forward``
        (the FP8 GEMM) always scales each row on its own."""
        if self.activations == "fp8":
            fmax = torch.finfo(self.weight_fp8.dtype).max
            dims = tuple(range(2, x.dim()))
            amax = x.abs().amax(dims, keepdim=True) if dims else x.abs().amax()
            scale = amax / torch.tensor(fmax, dtype=x.dtype)
            scale = torch.where(scale == 0, torch.tensor(torch.finfo(x.dtype).eps, dtype=x.dtype), scale)
            x = (x / scale).clamp(-fmax, fmax).to(self.weight_fp8.dtype).to(x.dtype) * scale
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _reference_only():
            return self.reference_forward(x)
        if self.activations != "fp8":
            return nn.functional.linear(x, self.dequantized_weight(x.dtype), self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        fmax = torch.finfo(self.weight_fp8.dtype).max
        x_scale = (x2.abs().amax(-1, keepdim=True) / fmax).clamp_min(1e-12)   # one scale per token
        x8 = (x2 / x_scale).clamp(-fmax, fmax).to(self.weight_fp8.dtype)
        one = torch.ones((), dtype=torch.float32)
        y = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        y = y * x_scale * self.weight_scale.reshape(1, -1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.weight_fp8.dtype}, strategy={self.strategy}, activations={self.activations}")


def _reference_only() -> bool:
    from .linear import reference_only_active

    return reference_only_active()


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
