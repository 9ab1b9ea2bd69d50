"""SmoothQuant — W8A8 by migrating activation outliers into the weights.

Xiao, Lin, Seznec, Wu, Demouth and Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models" (ICML 2023), arXiv:2211.10438.

The idea: activations are hard to quantize to int8 because a few channels are huge; weights are
easy. Dividing input channel ``j`` by ``s_j = max|X_j|^α / max|W_j|^(1-α)`` and multiplying the
weight columns that read it by ``s_j`` leaves the layer's function unchanged (the division is
folded into the previous op: a pre-norm's weight, or the rows of the projection producing the
channel) and balances the difficulty between the two, α setting how much moves. Then weights are
rounded to int8 per output channel, and activations are quantized to int8 dynamically per token at
run time (each token its own scale: an output never depends on its batch mates), so the layer runs
as an int8 × int8 GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from ..api import register
from ..calibrate import all_reduce_
from ..config import CalibratedConfig, param
from ..models.layers import weight_matrix
from .common import WeightQuantConfig, fold_scales, run_calibrated, scheme_for, smooth_groups, stash
from .primitives import quantize_weight


@dataclass(frozen=True)
class SmoothQuantConfig(WeightQuantConfig, CalibratedConfig):
    """Smooth activation outliers into the weights, then int8 weights and per-token int8 activations."""

    bits: int = param(8, "bits per weight", range=(2, 8))
    strategy: Literal["group", "channel", "tensor"] = param("channel", "scales per output channel (W8A8 kernels)")
    activations: Optional[Literal["int8"]] = param("int8", "int8: dynamic per-token activations (W8A8)")
    alpha: float = param(0.5, "migration strength α in s = max|X|^α / max|W|^(1-α)", range=(0.0, 1.0))


def smoothing_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max_k max_i |W_k[i, j]|^(1-α)`` for the projections ``W_k`` reading X."""
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    s = act_max.float().clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


class _AbsMax:
    def __init__(self, columns: int):
        self.max = torch.zeros(columns)

    def update(self, x: torch.Tensor) -> None:
        self.max = torch.maximum(self.max, x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float().cpu())

    def reduce(self) -> None:  # a maximum is exact in any order
        all_reduce_(self.max, "max")


class _SmoothQuant:
    def __init__(self, model: torch.nn.Module, targets: dict[str, torch.nn.Module], config: SmoothQuantConfig):
        self.model, self.targets, self.config = model, targets, config
        self.stats: dict[str, _AbsMax] = {}
        self.block, self.records = -1, {}  # type: ignore[var-annotated]

    def observer(self, name: str, module: torch.nn.Module) -> _AbsMax:
        self.stats[name] = _AbsMax(weight_matrix(module).shape[1])
        return self.stats[name]

    def compress(self, name: str, module: torch.nn.Module, stat: _AbsMax, block: int) -> dict[str, Any]:
        if block != self.block:  # every scale of the block folded before any weight is rounded
            self.block = block
            for prev, names in smooth_groups(self.model, block, self.targets):
                leader = next(n for n in names if n in self.stats)
                modules = [self.targets[n] for n in names]
                s = smoothing_scales(self.stats[leader].max, [weight_matrix(m) for m in modules], self.config.alpha)
                fold_scales(prev, modules, s)
                for n in names:
                    self.records[n] = {"smoothed": True, "max_scale": round(float(s.max()), 4)}
        scheme = scheme_for(self.config, name, module)
        q, scale, zero = quantize_weight(weight_matrix(module).detach().float(), scheme)
        stash(module, q, scale, zero, scheme)
        return dict(self.records.get(name, {"smoothed": False}), bits=scheme.bits, strategy=scheme.strategy)


@register("smoothquant", SmoothQuantConfig, kind="quantize", needs_data=True, paper="Xiao et al. 2023, arXiv:2211.10438")
def apply(model: torch.nn.Module, config: SmoothQuantConfig, ctx: Any) -> dict[str, Any]:
    return {**run_calibrated(model, config, ctx, lambda targets: _SmoothQuant(model, targets, config)),
            "alpha": config.alpha}
