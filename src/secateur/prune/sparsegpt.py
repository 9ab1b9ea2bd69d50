"""SparseGPT — one-shot pruning with second-order weight reconstruction.

Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(2023), arXiv:2301.00774.

The idea: prune a linear layer so that its outputs on the calibration inputs X change as little
as possible, ``min ||WX − ŴX||²``, and let the weights that stay absorb the error. For one row
the loss is quadratic with Hessian ``H = 2/n · XᵀX``, and Optimal Brain Surgeon says that removing
weight ``w_i`` costs ``w_i² / [H⁻¹]_ii`` and is best compensated by
``δ = −w_i / [H⁻¹]_ii · H⁻¹_{:,i}``. SparseGPT makes that affordable for every row at once:

* columns are processed left to right and each column, once visited, is frozen (kept or
  removed). The inverse Hessian of the columns still free, ``(H_{≥i})⁻¹``, is then read off
  one upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``): ``[(H_{≥i})⁻¹]_ii = U_ii²`` and
  the update of the later columns is ``−(w_i/U_ii) · U_{i,>i}`` — one shared factor for all rows;
* the mask is chosen adaptively, block by block of ``block_size`` columns, from the current
  (already compensated) weights with the score ``w²/U_ii²``: per row, the block's share of the
  row's sparsity (N:M: at every group of M columns, keep the N of highest score);
* within a block the updates are applied column by column; the rest of the matrix receives the
  block's accumulated update in one matrix product afterwards ("lazy batch" updates).

Inputs that never fire (``H_ii = 0``) get ``H_ii = 1`` and their weights are zeroed; a small
dampening ``λ = dampening · mean(diag H)`` on the diagonal keeps H invertible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import calibrated
from ..api import register
from ..calibrate import Hessian
from ..config import ConfigError, param
from ..errors import SecateurError
from .masks import (CalibratedPruneConfig, n_pruned, nm_mask, parse_pattern, reconstruction_error, remove_lowest,
                    weight_matrix)


@dataclass(frozen=True)
class SparseGPTConfig(CalibratedPruneConfig):
    """Prune with OBS reconstruction of the remaining weights, block by block.

    Fields shared with Wanda (see :class:`~secateur.prune.masks.CalibratedPruneConfig`):
    ``sparsity``, ``pattern``, ``overrides``, ``owl``, ``owl_lambda``, ``owl_threshold``, plus
    ``targets`` and ``ignore``.
    """

    block_size: int = param(128, "columns per block: the mask is chosen per block and updates outside "
                                 "the block are batched (rounded up to a multiple of M with an N:M pattern)")
    dampening: float = param(0.01, "fraction of the mean diagonal of H added to its diagonal", range=(0.0, 1.0))

    def validate(self) -> None:
        super().validate()
        if self.block_size < 1:
            raise ConfigError("block_size", f"got {self.block_size!r}, expected an integer >= 1")


def inverse_hessian_factor(H: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``) for a positive definite ``H``.
    Each intermediate is freed as soon as the next exists: with the caller's ``H`` passed as its
    last reference, at most two ``[in, in]`` matrices are alive at once."""
    L, info = torch.linalg.cholesky_ex(H)
    del H
    if int(info) == 0:
        inverse = torch.cholesky_inverse(L)
        del L
        U, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info) != 0:
        raise SecateurError("SparseGPT: the calibration Hessian is not positive definite even after dampening; "
                            "raise 'dampening' (for example to 0.1) or use more calibration samples")
    return U


def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: float, pattern: Optional[str] = None,
                    block_size: int = 128, dampening: float = 0.01,
                    consume: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune an ``[out, in]`` weight given ``H = 2/n · XᵀX`` (``[in, in]``); returns ``(Ŵ, keep)``.

    ``Ŵ`` is float32 (float64 when the weight is float64), on the weight's device; the caller
    casts it back. Every row loses exactly ``n_pruned(in, sparsity)`` weights (N:M with
    ``pattern``, ``sparsity`` then ignored); dead inputs count among them first. Sparsity 0
    without a pattern returns the weight unchanged.
    """
    box = [H]  # passed on in a list that the work empties: with ``consume``, H's memory goes when it is factored
    del H
    return _sparsegpt_prune(weight, box, sparsity, pattern, block_size, dampening, consume)


@torch.no_grad()
def _sparsegpt_prune(weight: torch.Tensor, box: list[torch.Tensor], sparsity: float, pattern: Optional[str],
                     block_size: int, dampening: float, consume: bool) -> tuple[torch.Tensor, torch.Tensor]:
    H = box.pop()
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    rows, cols = W.shape
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    nm = parse_pattern(pattern) if pattern else None
    if nm is None and n_pruned(cols, sparsity) == 0:
        return W, keep
    if nm is not None:  # whole groups per block; a trailing short group follows masks.nm_mask's rule
        block_size = math.ceil(block_size / nm[1]) * nm[1]
    if H.shape != (cols, cols):
        raise ValueError(f"H has shape {tuple(H.shape)}; expected ({cols}, {cols}) for a weight of shape "
                         f"{(rows, cols)}")

    H = H.detach().to(device=W.device, dtype=dtype)
    if not consume:  # ``consume``: H is the caller's scratch copy, dampened and factored in place
        H = H.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    torch.diagonal(H).add_(dampening * torch.diagonal(H).mean())
    scratch = [H]
    del H
    U = inverse_hessian_factor(scratch.pop())  # its last reference: freed inside once factored

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        err1 = torch.zeros_like(W1)
        if nm is None:  # the block's share of every row's count, so rows total exactly n_pruned(cols)
            k = n_pruned(i2, sparsity) - n_pruned(i1, sparsity)
            keep1 = remove_lowest(W1 ** 2 / d ** 2, k)
        else:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        for j in range(i2 - i1):
            if nm is not None and j % nm[1] == 0:
                group = slice(j, j + nm[1])
                keep1[:, group] = nm_mask(W1[:, group] ** 2 / d[group] ** 2, *nm)
            w = W1[:, j]
            q = torch.where(keep1[:, j], w, torch.zeros_like(w))
            err = (w - q) / d[j]
            W1[:, j] = q
            W1[:, j + 1:] -= err.unsqueeze(1) * U1[j, j + 1:].unsqueeze(0)
            err1[:, j] = err
        W[:, i1:i2] = W1
        keep[:, i1:i2] = keep1
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
    return W, keep


class _SparseGPT:
    """The calibration loop's view of SparseGPT: one Hessian per input group, OBS-updated weights out."""

    independent_layers = True  # each module's compression reads its own statistic and weight only

    def __init__(self, config: SparseGPTConfig, sparsities: dict[str, float]):
        self.config, self.sparsities = config, sparsities

    def observer(self, name: str, module: torch.nn.Module) -> Hessian:
        return Hessian(weight_matrix(module).shape[1])

    def compress(self, name: str, module: torch.nn.Module, stat: Hessian, block: int) -> dict:
        weight = weight_matrix(module)
        scratch = [stat.H]
        stat.spill()  # a streamed run: XᵀX waits on disk while H is factored (read back below in slices)
        new, _ = sparsegpt_prune(weight.detach(), scratch.pop(), self.sparsities[name], self.config.pattern,
                                 self.config.block_size, self.config.dampening, consume=True)
        # exact, over every calibration token; the ratio does not depend on H's scale, so XᵀX itself
        error = reconstruction_error(weight.detach(), new, stat.xtx if stat.xtx is not None else stat.rows)
        with torch.no_grad():
            weight.copy_(new.to(weight.dtype))
        return {"relative_error": error, "error_tokens": stat.tokens}


@register("sparsegpt", SparseGPTConfig, kind="prune", needs_data=True, paper="Frantar & Alistarh 2023, arXiv:2301.00774")
def apply(model: torch.nn.Module, config: SparseGPTConfig, ctx: Any) -> dict[str, Any]:
    return calibrated.run(model, config, ctx, lambda sparsities: _SparseGPT(config, sparsities))
