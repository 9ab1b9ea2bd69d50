"""FP8Linear: a Linear whose weight is stored in 8-bit floats (E4M3/E5M2) with float32 scales.

Made by the ``fp8`` method (:mod:`secateur.quant.fp8`) and by loading a compressed-tensors
``float-quantized`` checkpoint. Its forward casts activations to FP8 per token and runs
``torch._scaled_mm``; inside ``with secateur.runtime.linear.reference_only():`` it runs the
reference path instead (compressed-tensors' CPU operations, step by step).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .linear import reference_only_active


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
        return (self.weight_fp8.float() * self.weight_scale).to(dtype)

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
        if reference_only_active():
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


__all__ = ["FP8Linear"]
