"""GPTQ — accurate post-training weight quantization from second-order information.

Frantar, Ashkboos, Hoefler and Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (ICLR 2023), arXiv:2210.17323.

The idea (Optimal Brain Quantization made fast): quantize a weight matrix one input column at a
time, and after each column spread its rounding error over the columns not yet quantized so that
the layer output ``WX`` on calibration data moves as little as possible. With ``H = 2XXᵀ/n`` (the
layer's input Hessian, shared by projections that read the same input) and ``U`` the upper
Cholesky factor of ``H⁻¹``, column ``j``'s error ``e = (w_j - q_j) / U_jj`` updates every later
column ``k`` by ``-e · U_jk``. Lazy batching applies the updates to columns outside the current
block of ``block_size`` columns once per block. Dampening adds ``damp · mean(diag H)`` to the
diagonal; ``act_order`` quantizes columns in order of decreasing ``H_jj``. Group scales are
computed during the sweep from the already-updated weights of the group (GPTQ's way); with
``act_order`` or ``static_groups`` they are fixed up front from the original weights so that the
groups stay contiguous columns (what packed formats and kernels expect). Zeros already in the
weight (a pruned model) stay zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from ..api import register
from ..calibrate import Hessian
from ..config import CalibratedConfig, param
from ..models.layers import weight_matrix
from .common import WeightQuantConfig, run_calibrated, scheme_for, stash
from .primitives import Scheme, qrange, weight_params


@dataclass(frozen=True)
class GPTQConfig(WeightQuantConfig, CalibratedConfig):
    """Quantize weights column by column, compensating each column's error in the rest."""

    damp: float = param(0.01, "dampening: fraction of mean(diag H) added to the Hessian diagonal", range=(0.0, 1.0))
    block_size: int = param(128, "columns per lazy-update block", range=(1, 1 << 20))
    act_order: bool = param(False, "quantize columns in order of decreasing Hessian diagonal")
    static_groups: bool = param(False, "group scales from the original weights, before the sweep")


class Factor(NamedTuple):
    """What GPTQ needs from a Hessian alone, so projections sharing one compute it once."""
    perm: torch.Tensor  # column order of the sweep
    U: torch.Tensor  # upper Cholesky factor of the inverse of the dampened, permuted Hessian
    dead: torch.Tensor  # bool [in]: columns no calibration token ever activated


def hessian_factor(H: torch.Tensor, *, damp: float = 0.01, act_order: bool = False, consume: bool = False) -> Factor:
    """The factor of ``H`` (left unchanged unless ``consume``: then it is overwritten, and at most two
    ``[in, in]`` matrices are alive at once, which is what bounds a streamed 8B model's peak)."""
    H = H.detach().float()
    if not consume:
        H = H.clone()
    cols = H.shape[0]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        H = H[perm][:, perm]
    else:
        perm = torch.arange(cols)
    torch.diagonal(H).add_(damp * torch.mean(torch.diagonal(H)))
    L = torch.linalg.cholesky(H)
    del H
    inverse = torch.cholesky_inverse(L)
    del L
    U = torch.linalg.cholesky(inverse, upper=True)
    return Factor(perm, U, dead)


def gptq_quantize(w: torch.Tensor, H: Optional[torch.Tensor], scheme: Scheme, *, damp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, static_groups: bool = False,
                  factor: Optional[Factor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of ``w [out, in]`` with Hessian ``H [in, in]``: ``(q int8, scale, zero_point)``.
    ``factor``: :func:`hessian_factor` of the same ``H``, ``damp`` and ``act_order``, if computed
    (``H`` may then be None)."""
    perm, U, dead = factor or hessian_factor(H, damp=damp, act_order=act_order)
    W = w.detach().float().clone()
    rows, cols = W.shape
    keep_zero = W == 0
    W[:, dead] = 0
    g = scheme.group
    qmin, qmax = qrange(scheme.bits)
    n_groups = 1 if not g else cols // g
    scale = torch.empty(rows if g != 0 else 1, n_groups)
    zero = torch.empty(rows if g != 0 else 1, n_groups, dtype=torch.int8)
    fixed = not g or act_order or static_groups  # scales known before the sweep
    if g is None or g == 0:
        scale, zero = weight_params(W, scheme)
    elif fixed:
        scale, zero = weight_params(W, scheme)  # per group of the original columns

    W, keep_zero = W[:, perm], keep_zero[:, perm]
    Q = torch.zeros_like(W, dtype=torch.int8)
    if g:
        block_size = max(g, block_size // g * g)  # a group never straddles two blocks
    order, pruned = perm.tolist(), bool(keep_zero.any())
    params: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # group -> (scale, float zero point)
    kept = keep_zero.t().contiguous() if pruned else None
    for i1 in range(0, cols, block_size):  # the block's columns are rows here: contiguous vectors
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].t().contiguous(), U[i1:i2, i1:i2]
        E1, Q1 = torch.zeros_like(W1), torch.zeros_like(W1)
        diag = torch.diagonal(U1).tolist()
        for i in range(i2 - i1):
            col = order[i1 + i]
            group = 0 if not g else col // g
            if not fixed and col % g == 0:  # GPTQ: the group's scale from its current (updated) weights
                s, z = weight_params(W1[i:i + g].t(), Scheme(scheme.bits, scheme.symmetric, "channel",
                                                             observer=scheme.observer))
                scale[:, group], zero[:, group] = s[:, 0], z[:, 0]
                params.pop(group, None)
            if group not in params:
                params[group] = (scale[:, group].contiguous(), zero[:, group].float().contiguous())
            s, z = params[group]
            x = W1[i]
            q = torch.div(x, s).round_().add_(z).clamp_(qmin, qmax)
            if kept is not None:
                q = torch.where(kept[i1 + i], z, q)  # pruned weights stay exactly zero
            Q1[i] = q
            err = E1[i]
            torch.mul(q.sub_(z), s, out=err)
            err.sub_(x).div_(-diag[i])  # (x - dequantized) / U_ii
            W1[i:].addr_(U1[i, i:], err, alpha=-1)
        Q[:, i1:i2] = Q1.t().to(torch.int8)
        W[:, i2:] -= E1.t() @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)], scale, zero


class _GPTQ:
    """The calibration loop's view of GPTQ: a Hessian in, the dequantized weight out. The scales ride
    on the Linear as buffers (so a block checkpoint carries them); the swap to QuantLinear happens
    once the loop is done."""

    independent_layers = True  # each module's compression reads its own statistic and weight only

    def __init__(self, config: GPTQConfig):
        self.config = config

    def observer(self, name: str, module: torch.nn.Module) -> Hessian:
        return Hessian(weight_matrix(module).shape[1])

    def compress(self, name: str, module: torch.nn.Module, stat: Hessian, block: int) -> dict[str, Any]:
        c = self.config
        scheme = scheme_for(c, name, module)
        if getattr(stat, "gptq_factor", None) is None:  # q/k/v (gate/up) share one Hessian: factor it once
            scratch = [stat.H]
            stat.release()  # the factor is all the group needs from here: XᵀX goes before the factoring
            stat.gptq_factor = hessian_factor(scratch.pop(), damp=c.damp, act_order=c.act_order, consume=True)
        q, scale, zero = gptq_quantize(weight_matrix(module), None, scheme, damp=c.damp, block_size=c.block_size,
                                       act_order=c.act_order, static_groups=c.static_groups, factor=stat.gptq_factor)
        stash(module, q, scale, zero, scheme)
        return {"bits": scheme.bits, "strategy": scheme.strategy}


@register("gptq", GPTQConfig, kind="quantize", needs_data=True, paper="Frantar et al. 2023, arXiv:2210.17323")
def apply(model: torch.nn.Module, config: GPTQConfig, ctx: Any) -> dict[str, Any]:
    return run_calibrated(model, config, ctx, lambda targets: _GPTQ(config))
