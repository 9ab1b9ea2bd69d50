"""AWQ — activation-aware weight quantization.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan and Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration" (MLSys 2024), arXiv:2306.00978.

The idea: a few input channels carry large activations, and the weights that read them matter
most. Scaling those weight columns up by ``s_j`` before rounding (and the channel's activation
down by ``s_j``, folded into the op that produces it, so the layer computes the same function)
shrinks their relative rounding error. Per group of projections reading one input, the scales are
``s = mean|x|^α`` (normalised), with α picked from a grid by the smallest output error
``Σ ||Q(W·diag(s))·diag(s)⁻¹·X − W·X||²`` on calibration tokens. Then each weight's range is
clipped: per output row (or group), the shrink ratio of the range with the smallest output error.
Groups whose previous op cannot absorb a scale (the architecture table's ``smooth`` rows say which
can) are only clipped. Runs on the one calibration loop: observe a block's inputs, scale, clip,
quantize, re-run the quantized block for the next block's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..api import register
from ..calibrate import all_reduce_, gather_batches, reduce_count
from ..config import CalibratedConfig, param
from ..models.layers import weight_matrix
from .common import WeightQuantConfig, fold_scales, run_calibrated, scheme_for, smooth_groups, stash
from .primitives import Scheme, _grouped, dequantize, minmax_params, params_from_range, qrange, quantize


@dataclass(frozen=True)
class AWQConfig(WeightQuantConfig, CalibratedConfig):
    """Scale salient input channels before rounding, then clip each weight's range."""

    grid: int = param(20, "values of the exponent α tried in [0, 1)", range=(1, 1000))
    clip: bool = param(True, "search a clipping ratio per output row / group after scaling")
    clip_grid: int = param(20, "clipping ratios tried", range=(1, 1000))
    max_shrink: float = param(0.5, "smallest range kept by clipping is 1 - max_shrink", range=(0.0, 1.0))
    tokens: int = param(1024, "calibration tokens kept per input for the searches", range=(16, 1 << 20))


def fake_quant(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    scale, zero = minmax_params(w, scheme)
    return dequantize(quantize(w, scale, zero, scheme), scale, zero, scheme)


def search_scales(weights: list[torch.Tensor], x: torch.Tensor, x_mean: torch.Tensor, scheme: Scheme,
                  grid: int) -> tuple[torch.Tensor, float, list[float]]:
    """The per-input-channel scale ``mean|x|^α`` (α on the grid) with the smallest output error of
    the group; returns (scale, α, error per α)."""
    refs = [x @ w.t() for w in weights]
    errors, best, best_s, best_alpha = [], float("inf"), torch.ones_like(x_mean), 0.0
    for k in range(grid):
        alpha = k / grid
        s = x_mean.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = sum(float(((x @ (fake_quant(w * s, scheme) / s).t() - y) ** 2).sum()) for w, y in zip(weights, refs))
        errors.append(err)
        if err < best:
            best, best_s, best_alpha = err, s, alpha
    return best_s, best_alpha, errors


def search_clip(w: torch.Tensor, x: torch.Tensor, scheme: Scheme, grid: int, max_shrink: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row / group, the range shrink ratio with the smallest error of that row-group's
    contribution to the output; returns (scale, zero_point) of the clipped ranges."""
    g = _grouped(w, scheme)                               # [rows, groups, cols per group]
    xg = x.reshape(x.shape[0], g.shape[1], g.shape[2])    # [tokens, groups, cols per group]
    lo, hi = g.amin(-1), g.amax(-1)
    ref = torch.einsum("rgc,tgc->rgt", g, xg)
    best = torch.full(lo.shape, float("inf"))
    scale, zero = params_from_range(lo, hi, scheme.bits, scheme.symmetric)
    qmin, qmax = qrange(scheme.bits)
    for k in range(int(max_shrink * grid) + 1):
        r = 1 - k / grid
        s, z = params_from_range(r * lo, r * hi, scheme.bits, scheme.symmetric)
        deq = (torch.clamp(torch.round(g / s.unsqueeze(-1)) + z.unsqueeze(-1), qmin, qmax) - z.unsqueeze(-1)) * s.unsqueeze(-1)
        err = ((torch.einsum("rgc,tgc->rgt", deq, xg) - ref) ** 2).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


class _Inputs:
    """Mean |x| per input channel over all tokens, and the first ``tokens`` rows of x."""

    def __init__(self, columns: int, tokens: int):
        self.abs_sum = torch.zeros(columns, dtype=torch.float64)
        self.n, self.limit, self.rows = 0, tokens, []

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(0).double()
        self.n += x.shape[0]
        kept = sum(r.shape[0] for r in self.rows)
        if kept < self.limit:
            self.rows.append(x[: self.limit - kept].clone())

    def reduce(self) -> None:
        """Over several processes: the sums added, and the kept rows those one process would keep
        (the first ``tokens`` rows in global batch order)."""
        all_reduce_(self.abs_sum)
        self.n = reduce_count(self.n)
        rows, kept = [], 0
        for part in gather_batches(self.rows):
            if kept >= self.limit:
                break
            rows.append(part[: self.limit - kept])
            kept += rows[-1].shape[0]
        self.rows = rows

    @property
    def mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()

    @property
    def x(self) -> torch.Tensor:
        return torch.cat(self.rows)


class _AWQ:
    def __init__(self, model: torch.nn.Module, targets: dict[str, torch.nn.Module], config: AWQConfig):
        self.model, self.targets, self.config = model, targets, config
        self.stats: dict[str, _Inputs] = {}
        self.scaled_block = -1
        self.records: dict[str, dict[str, Any]] = {}
        self.inputs: dict[str, torch.Tensor] = {}

    def observer(self, name: str, module: torch.nn.Module) -> _Inputs:
        self.stats[name] = _Inputs(weight_matrix(module).shape[1], self.config.tokens)
        return self.stats[name]

    def _block_prefix(self, block: int | str) -> str:
        from ..models.arch import arch_of

        return f"{arch_of(self.model).arch.block_prefix(self.model)}.{block}"

    def _stat(self, name: str) -> _Inputs:
        """The statistic of ``name``'s input (shared with its input group's leader)."""
        if name in self.stats:
            return self.stats[name]
        from ..calibrate import input_groups
        from ..models.arch import arch_of

        prefix = arch_of(self.model).arch.block_prefix(self.model)
        block_prefix = self._block_prefix(name[len(prefix) + 1:].split(".", 1)[0])
        names = [n for n in self.targets if n.startswith(block_prefix + ".")]
        groups = input_groups(arch_of(self.model).arch, block_prefix, names)
        return self.stats[next(lead for lead, members in groups.items() if name in members)]

    def _scale_block(self, block: int) -> None:
        """All of the block's scales from its dense inputs, folded before any weight is rounded."""
        for name in self.targets:
            if name.startswith(self._block_prefix(block) + "."):
                self.inputs[name] = self._stat(name).x
        for prev, names in smooth_groups(self.model, block, self.targets):
            modules = [self.targets[n] for n in names]
            schemes = {scheme_for(self.config, n, m) for n, m in zip(names, modules)}
            scheme = next(iter(schemes))
            stat = self._stat(names[0])
            weights = [weight_matrix(m).detach().float() for m in modules]
            s, alpha, _ = search_scales(weights, stat.x, stat.mean, scheme, self.config.grid)
            fold_scales(prev, modules, s)
            for n in names:
                self.inputs[n] = self.inputs[n] / s
                self.records[n] = {"alpha": alpha}

    def compress(self, name: str, module: torch.nn.Module, stat: _Inputs, block: int) -> dict[str, Any]:
        if block != self.scaled_block:
            self._scale_block(block)
            self.scaled_block = block
        scheme = scheme_for(self.config, name, module)
        w = weight_matrix(module).detach().float()
        if self.config.clip:
            scale, zero = search_clip(w, self.inputs.pop(name), scheme, self.config.clip_grid, self.config.max_shrink)
        else:
            scale, zero = minmax_params(w, scheme)
            self.inputs.pop(name, None)
        stash(module, quantize(w, scale, zero, scheme), scale, zero, scheme)
        return dict(self.records.get(name, {}), bits=scheme.bits, strategy=scheme.strategy)


@register("awq", AWQConfig, kind="quantize", needs_data=True, paper="Lin et al. 2024, arXiv:2306.00978")
def apply(model: torch.nn.Module, config: AWQConfig, ctx: Any) -> dict[str, Any]:
    return run_calibrated(model, config, ctx, lambda targets: _AWQ(model, targets, config))
