"""Magnitude pruning — remove the weights with the smallest absolute value.

Han et al., "Learning both Weights and Connections for Efficient Neural Networks" (2015). The
simplest baseline every calibrated method is compared against: the score of a weight is |W_ij|;
the lowest scores are removed per output row, per matrix, or with one threshold over all
targeted matrices ("global"), or in an N:M pattern. No data needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

from ..api import register
from ..config import TargetedConfig, param
from ..targets import select_modules
from ..models.layers import sparsity_of, weight_matrix
from .masks import apply_mask, check_pattern, global_masks, matrix_mask, nm_mask, parse_pattern, row_mask


@dataclass(frozen=True)
class MagnitudeConfig(TargetedConfig):
    """Zero the weights of smallest magnitude."""

    sparsity: float = param(0.5, "fraction of each targeted weight set removed (ignored with an N:M pattern)",
                            range=(0.0, 1.0))
    scope: Literal["row", "matrix", "global"] = param(
        "row", "where the threshold applies: per output row, per matrix, or one over all targeted matrices")
    pattern: Optional[str] = param(None, "N:M semi-structured pattern such as '2:4' (keep N of every M inputs)")

    def validate(self) -> None:
        check_pattern(self.pattern)


def magnitude_masks(weights: list[torch.Tensor], config: MagnitudeConfig) -> list[torch.Tensor]:
    """Keep masks for ``[out, in]`` weights: the math, tensor in, tensor out."""
    scores = [w.detach().abs() for w in weights]
    if config.pattern:
        n, m = parse_pattern(config.pattern)
        return [nm_mask(s, n, m) for s in scores]
    if config.scope == "global":
        return global_masks(scores, config.sparsity)
    mask_fn = row_mask if config.scope == "row" else matrix_mask
    return [mask_fn(s, config.sparsity) for s in scores]


@register("magnitude", MagnitudeConfig, kind="prune", needs_data=False, paper="Han et al. 2015, arXiv:1506.02626")
@torch.no_grad()
def apply(model: torch.nn.Module, config: MagnitudeConfig, ctx: Any = None) -> dict[str, Any]:
    modules = select_modules(model, config.targets, config.ignore)
    masks = magnitude_masks([weight_matrix(m) for m in modules.values()], config)
    layers = {}
    for (name, module), keep in zip(modules.items(), masks):
        apply_mask(module, keep)
        layers[name] = round(sparsity_of(module.weight), 6)
    total = sum(m.weight.numel() for m in modules.values())
    zeros = sum(int((m.weight == 0).sum()) for m in modules.values())
    return {"modules": len(modules), "sparsity": round(zeros / max(total, 1), 6), "layers": layers}
