"""Masks shared by every pruning method: which weights to remove, given importance scores.

Conventions: a *keep* mask is a bool tensor, True where the weight stays. Scores are laid out like
``nn.Linear.weight`` — ``[out_features, in_features]``, one row per output — and a "row" is one
output's weights. Ties are broken deterministically (the earlier index is removed first), so
the number of removed weights is exactly the requested one.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from ..errors import SecateurError


def n_pruned(count: int, sparsity: float) -> int:
    """How many of ``count`` weights a ``sparsity`` removes (floor, robust to float noise)."""
    return int(round(count * sparsity, 6))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``[out, in]`` (a view: GPT-2's Conv1D stores ``[in, out]``)."""
    weight = module.weight
    return weight.t() if type(module).__name__ == "Conv1D" else weight


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
    """N:M semi-structured: in every group of ``m`` consecutive inputs of a row, keep the ``n`` highest."""
    rows, cols = scores.shape
    if cols % m:
        raise SecateurError(f"an {n}:{m} pattern needs the input dimension to be divisible by {m}; got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    return _lowest(groups, m - n).reshape(rows, cols)


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N of every M."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match or not (0 < int(match[1]) < int(match[2])):
        raise SecateurError(f"pattern '{pattern}' is not N:M with 0 < N < M (for example '2:4' or '4:8')")
    return int(match[1]), int(match[2])


@torch.no_grad()
def apply_mask(module: nn.Module, keep: torch.Tensor) -> None:
    """Zero the removed weights in place."""
    weight = weight_matrix(module)
    weight.mul_(keep.to(weight.dtype))


def sparsity_of(tensor: torch.Tensor) -> float:
    return float((tensor == 0).sum()) / max(tensor.numel(), 1)
