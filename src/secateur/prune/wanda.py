"""Wanda — pruning by weights and activations.

Sun, Liu, Bair and Kolter, "A Simple and Effective Pruning Approach for Large Language Models"
(2023), arXiv:2306.11695.

The idea: a weight matters in proportion to what it contributes to the output, so the score of
``W_ij`` is ``|W_ij| · ||X_j||₂`` — its magnitude times the norm of input feature ``j`` over the
calibration tokens. Large language models have a few input features with huge activations;
magnitude pruning ignores them, Wanda keeps the weights that read them. The lowest scores are
removed per output row (the comparison group the paper found best), or in an N:M pattern. No
weight update, no second-order information: one pass to accumulate ``Σ_tokens x_j²`` per input
feature, then a sort.

With ``owl`` the sparsity differs per block as in OWL (Yin et al. 2023, arXiv:2310.05175): blocks
with a larger share of outlier scores are pruned less, the mean sparsity staying the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import calibrated
from ..api import register
from ..calibrate import ColumnNorms
from ..models.layers import weight_matrix
from .masks import CalibratedPruneConfig, apply_mask, nm_mask, parse_pattern, row_mask


@dataclass(frozen=True)
class WandaConfig(CalibratedPruneConfig):
    """Remove the weights of lowest |W|·||x|| in every output row.

    Fields (shared with SparseGPT through :class:`~secateur.prune.masks.CalibratedPruneConfig`):
    ``sparsity``, ``pattern``, ``overrides``, ``owl``, ``owl_lambda``, ``owl_threshold``, plus
    ``targets`` and ``ignore``.
    """


def wanda_scores(weight: torch.Tensor, col_sq: torch.Tensor) -> torch.Tensor:
    """``|W| · sqrt(col_sq)`` for an ``[out, in]`` weight; ``col_sq[j] = Σ_tokens x_j²``.

    Computed in float32 (float64 when the weight is float64).
    """
    w = weight.detach()
    if w.dtype != torch.float64:
        w = w.float()
    norms = col_sq.detach().to(device=w.device, dtype=w.dtype).clamp_min(0).sqrt()
    if norms.shape != (w.shape[1],):
        raise ValueError(f"col_sq has shape {tuple(col_sq.shape)}; expected ({w.shape[1]},) for a weight of "
                         f"shape {tuple(w.shape)}")
    return w.abs() * norms.unsqueeze(0)


def wanda_masks(weight: torch.Tensor, col_sq: torch.Tensor, sparsity: float,
                pattern: Optional[str] = None) -> torch.Tensor:
    """Keep mask ``[out, in]``: the lowest Wanda scores removed per output row, or N:M with ``pattern``
    (``sparsity`` is then ignored). Sparsity 0 keeps everything."""
    scores = wanda_scores(weight, col_sq)
    if pattern:
        n, m = parse_pattern(pattern)
        return nm_mask(scores, n, m)
    return row_mask(scores, sparsity)


class _Wanda:
    """The calibration loop's view of Wanda: column norms in, masked weights out."""

    independent_layers = True  # each module's compression reads its own statistic and weight only

    def __init__(self, config: WandaConfig, sparsities: dict[str, float]):
        self.config, self.sparsities = config, sparsities

    def observer(self, name: str, module: torch.nn.Module) -> ColumnNorms:
        return ColumnNorms(weight_matrix(module).shape[1])

    def compress(self, name: str, module: torch.nn.Module, stat: ColumnNorms, block: int) -> dict:
        weight = weight_matrix(module)
        keep = wanda_masks(weight.detach().float(), stat.sq, self.sparsities[name], self.config.pattern)
        apply_mask(module, keep)
        return {}


@register("wanda", WandaConfig, kind="prune", needs_data=True, paper="Sun et al. 2023, arXiv:2306.11695")
def apply(model: torch.nn.Module, config: WandaConfig, ctx: Any) -> dict[str, Any]:
    return calibrated.run(model, config, ctx, lambda sparsities: _Wanda(config, sparsities))
