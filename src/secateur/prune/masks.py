"""Masks shared by every pruning method: which weights to remove, given importance scores.

Conventions: a *keep* mask is a bool tensor, True where the weight stays. Scores are laid out like
``nn.Linear.weight`` — ``[out_features, in_features]``, one row per output — and a "row" is one
output's weights. Ties are broken deterministically (the earlier index is removed first), so
the number of removed weights is exactly the requested one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from ..config import CalibratedConfig, ConfigError, param
from ..errors import SecateurError
from ..models.layers import weight_matrix


def n_pruned(count: int, sparsity: float) -> int:
    """How many of ``count`` weights a ``sparsity`` removes (floor, robust to float noise)."""
    return int(round(count * sparsity, 6))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask of a 1-D or 2-D (row-wise) score tensor with the ``k`` lowest of each row removed."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    order = torch.argsort(scores, dim=-1, stable=True)[..., :k]
    return keep.scatter_(-1, order, False)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the lowest ``sparsity`` fraction in every row."""
    return _lowest(scores, n_pruned(scores.shape[-1], sparsity))


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the lowest ``sparsity`` fraction of the whole matrix."""
    return _lowest(scores.reshape(-1), n_pruned(scores.numel(), sparsity)).view_as(scores)


def global_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Remove the lowest ``sparsity`` fraction over all matrices together (one threshold)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    keep = _lowest(flat, n_pruned(flat.numel(), sparsity))
    return [m.view_as(s) for m, s in zip(keep.split([s.numel() for s in scores]), scores)]


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M semi-structured: in every group of ``m`` consecutive inputs of a row, keep the ``n`` highest.

    When the row length is not a multiple of ``m`` (stories260K's down_proj reads 172 inputs), the
    trailing group of ``r < m`` inputs keeps ceil(n·r/m) of them: the same density, rounded toward
    keeping; such a layer is not in the hardware's N:M format and the result says so.
    """
    rows, cols = scores.shape
    main = cols - cols % m
    keep = _lowest(scores[:, :main].reshape(rows, main // m, m), m - n).reshape(rows, main)
    if main == cols:
        return keep
    tail = cols - main
    return torch.cat([keep, _lowest(scores[:, main:], tail - math.ceil(n * tail / m))], dim=1)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N of every M."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match or not (0 < int(match[1]) < int(match[2])):
        raise SecateurError(f"pattern '{pattern}' is not N:M with 0 < N < M (for example '2:4' or '4:8')")
    return int(match[1]), int(match[2])


def check_pattern(pattern: str | None) -> None:
    """Config validation of an optional N:M ``pattern`` field: a ConfigError naming ``pattern``."""
    if pattern is not None:
        try:
            parse_pattern(pattern)
        except SecateurError as exc:
            raise ConfigError("pattern", str(exc)) from None


@torch.no_grad()
def apply_mask(module: nn.Module, keep: torch.Tensor) -> None:
    """Zero the removed weights in place."""
    weight = weight_matrix(module)
    weight.masked_fill_(~keep, 0.0)  # +0.0, not the -0.0 a multiplication leaves on negative weights


# --- shared by the calibrated pruning methods (Wanda, SparseGPT, …) ---------------------------
def remove_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask with exactly the ``k`` lowest scores of every row (last dim) removed."""
    return _lowest(scores, k)


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, H: Any) -> float:
    """Relative output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` of a rewritten ``[out, in]`` weight.

    With ``H = 2/n · XᵀX`` (rows of X the calibration inputs) this is ``||WX − ŴX||² / ||WX||²``
    over the calibration tokens, whatever the scale of H. The products run in float64 for a
    float64 weight and in float32 otherwise (H is accumulated in float32 anyway; each slice's sum is
    taken in float64: relative accuracy about 1e-6, tested, at half the cost of float64 products,
    which on a 14336-wide layer were as slow as SparseGPT itself). Over slices of H's columns, so
    that H is never copied whole; ``H`` may also be a function ``rows(start, stop)`` giving rows of
    a symmetric H (one kept on disk: :meth:`secateur.calibrate.Hessian.rows`).
    """
    weight, new_weight = weight.detach(), new_weight.detach().to(weight.device)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    rows, cols = weight.shape
    num = den = 0.0
    step = max(1, (64 << 20) // (dtype.itemsize * cols))   # slices of 64 MiB: H's columns, the weights' rows
    for j in range(0, cols, step):
        part = H[:, j:j + step] if isinstance(H, torch.Tensor) else H(j, j + step).t()
        h = part.detach().to(device=weight.device, dtype=dtype)
        for i in range(0, rows, step):
            w = weight[i:i + step].to(dtype)
            delta = w - new_weight[i:i + step].to(dtype)
            num += float(((delta @ h) * delta[:, j:j + step]).sum(dtype=torch.float64))
            den += float(((w @ h) * w[:, j:j + step]).sum(dtype=torch.float64))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def outlier_ratio(scores: torch.Tensor | list[torch.Tensor], threshold: float) -> float:
    """OWL's layerwise outlier density: the fraction of scores above ``threshold`` × their mean.

    ``scores`` is one tensor or a list (for example the Wanda scores |W|·||x|| of every
    projection of one block), taken together.
    """
    if isinstance(scores, torch.Tensor):
        flat = scores.detach().reshape(-1).double()
    else:
        flat = torch.cat([s.detach().reshape(-1).double() for s in scores])
    if flat.numel() == 0:
        return 0.0
    return float((flat > threshold * flat.mean()).sum()) / flat.numel()


def owl_sparsities(outlier_ratios: list[float], target: float, lam: float,
                   weights: list[float] | None = None) -> list[float]:
    """OWL non-uniform layer sparsities (Yin et al. 2023, arXiv:2310.05175).

    Layers with more outliers keep more weights: the ratios are mapped linearly and inverted
    onto ``[target − lam, target + lam]`` (most outliers → ``target − lam``), then shifted so that
    the mean — weighted by ``weights`` (for example parameter counts) when given — is exactly
    ``target``. Values are clamped to [0, 1]; what a clamp removes is spread over the layers that
    are not clamped, so the (weighted) mean stays ``target`` whenever that is possible.
    """
    count = len(outlier_ratios)
    if count == 0:
        return []
    w = [1.0] * count if weights is None else [float(x) for x in weights]
    if len(w) != count or any(x < 0 for x in w) or sum(w) <= 0:
        raise SecateurError(f"owl_sparsities: weights must be {count} non-negative numbers with a positive sum; "
                            f"got {weights!r}")
    total = sum(w)
    lo, hi = min(outlier_ratios), max(outlier_ratios)
    if hi > lo and lam > 0:
        values = [target + lam - 2 * lam * (r - lo) / (hi - lo) for r in outlier_ratios]
    else:
        values = [float(target)] * count
    shift = target - sum(wi * v for wi, v in zip(w, values)) / total
    values = [v + shift for v in values]
    for _ in range(count + 1):
        values = [min(1.0, max(0.0, v)) for v in values]
        deficit = target * total - sum(wi * v for wi, v in zip(w, values))
        if abs(deficit) <= 1e-12 * total:
            break
        free = [i for i, v in enumerate(values) if w[i] > 0 and (v < 1.0 if deficit > 0 else v > 0.0)]
        free_weight = sum(w[i] for i in free)
        if free_weight <= 0:
            break
        for i in free:
            values[i] += deficit / free_weight
    return values


@dataclass(frozen=True)
class CalibratedPruneConfig(CalibratedConfig):
    """Fields shared by the calibrated pruning methods (Wanda, SparseGPT), on top of the calibration
    loop's own (:class:`~secateur.config.CalibratedConfig`)."""

    sparsity: float = param(0.5, "fraction of each row's weights removed (ignored with an N:M pattern)",
                            range=(0.0, 1.0))
    pattern: Optional[str] = param(None, "N:M semi-structured pattern such as '2:4' (keep N of every M inputs)")
    overrides: dict[str, float] = param({}, "per-module sparsity: key a module pattern (exact name, class "
                                            "name or 're:<regex>'), value a sparsity in [0, 1]; applied in order "
                                            "(a later key overrides an earlier one) and over OWL's values")
    owl: bool = param(False, "OWL non-uniform layer sparsity: blocks with more outliers are pruned less "
                             "(Yin et al. 2023, arXiv:2310.05175); unstructured only")
    owl_lambda: float = param(0.08, "OWL: largest deviation of a block's sparsity from the target",
                              range=(0.0, 0.5))
    owl_threshold: float = param(5.0, "OWL's M: a weight is an outlier when its score |W|·||x|| exceeds M "
                                      "times the mean score")

    def validate(self) -> None:
        from ..targets import compile_pattern

        check_pattern(self.pattern)
        for key, value in self.overrides.items():
            compile_pattern(key, f"overrides.{key}")
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"overrides.{key}", f"got {value!r}, expected a sparsity in [0.0, 1.0]")
        if not self.owl_threshold > 0:
            raise ConfigError("owl_threshold", f"got {self.owl_threshold!r}, expected a number > 0")
        if self.owl and self.pattern is not None:
            raise ConfigError("owl", f"OWL sets a sparsity per block and cannot be combined with the N:M pattern "
                                     f"{self.pattern!r}; set owl: false or remove pattern")
