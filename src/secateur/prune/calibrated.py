"""What every calibrated pruning method shares: per-module sparsity (overrides, OWL) and the run
through the one calibration loop. A method supplies only its observer and its rewrite of a weight.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn as nn

from ..calibrate import BlockMethod, ColumnNorms, calibration_ids, options_for, sequential
from ..errors import ConfigError
from ..targets import select_modules
from ..models.layers import sparsity_of, weight_matrix
from .masks import apply_mask, nm_mask, outlier_ratio, owl_sparsities, parse_pattern, row_mask

log = logging.getLogger(__name__)


def block_of(name: str, block_prefix: str) -> int:
    return int(name[len(block_prefix) + 1:].split(".", 1)[0])


class _OutlierCounter:
    """A dense observation pass measuring each block's outlier density (OWL): the share of its
    Wanda scores |W|·||x|| above ``threshold`` × the block's mean score, pooled over its projections."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.ratios: dict[int, float] = {}
        self.sizes: dict[int, int] = {}
        self._block, self._scores = -1, []  # type: ignore[var-annotated]

    def observer(self, name: str, module: nn.Module) -> ColumnNorms:
        return ColumnNorms(weight_matrix(module).shape[1])

    def compress(self, name: str, module: nn.Module, stat: ColumnNorms, block: int) -> dict[str, Any]:
        if block != self._block:
            self.finish()
            self._block = block
        w = weight_matrix(module)
        self._scores.append(w.detach().abs().float() * stat.sq.sqrt().float())
        return {}

    def finish(self) -> None:
        if self._scores:
            self.ratios[self._block] = outlier_ratio(self._scores, self.threshold)
            self.sizes[self._block] = sum(s.numel() for s in self._scores)
        self._scores = []


def module_sparsities(model: nn.Module, targets: dict[str, nn.Module], config: Any, ids: torch.Tensor,
                      ctx: Any) -> dict[str, float]:
    """The sparsity of each targeted module: the target, OWL's per-block values, then overrides."""
    from ..models.arch import arch_of

    sparsity = {name: config.sparsity for name in targets}
    prefix = arch_of(model).arch.block_prefix(model)
    if config.owl and config.pattern is None:
        counter = _OutlierCounter(config.owl_threshold)
        sequential(model, ids, targets, counter, options_for(config, ctx, propagate="dense"),
                   description="OWL outlier pass")
        counter.finish()
        blocks = sorted(counter.ratios)
        ratios = [counter.ratios[b] for b in blocks]
        sizes = [counter.sizes[b] for b in blocks]
        per_block = dict(zip(blocks, owl_sparsities(ratios, config.sparsity, config.owl_lambda, weights=sizes)))
        log.info("OWL per-block sparsity: %s", {b: round(s, 4) for b, s in per_block.items()})
        for name in targets:
            sparsity[name] = per_block.get(block_of(name, prefix), config.sparsity)
    for i, (pattern, value) in enumerate(config.overrides.items()):
        try:
            matched = select_modules(model, [pattern], config.ignore)
        except ConfigError as exc:
            raise ConfigError(f"overrides.{pattern}", str(exc).split(": ", 1)[-1]) from None
        for name in matched:
            if name in sparsity:
                sparsity[name] = value
    return sparsity


@torch.no_grad()
def _outside_blocks(model: nn.Module, targets: dict[str, nn.Module], sparsities: dict[str, float],
                    config: Any) -> dict[str, Any]:
    """Targets outside the transformer blocks (BERT's pooler) are never seen by the calibration
    loop, which walks the blocks: they are pruned by magnitude |W| to their sparsity (or N:M
    pattern), so that the step's sparsity holds for every module it selected."""
    from ..models.arch import arch_of

    prefix = arch_of(model).arch.block_prefix(model) + "."
    done: dict[str, Any] = {}
    for name, module in targets.items():
        if name.startswith(prefix):
            continue
        scores = weight_matrix(module).detach().abs().float()
        keep = nm_mask(scores, *parse_pattern(config.pattern)) if config.pattern else row_mask(scores, sparsities[name])
        apply_mask(module, keep)
        done[name] = {"sparsity": round(sparsity_of(weight_matrix(module)), 6), "calibrated": False}
        log.info("%s is outside the transformer blocks: pruned by magnitude (no calibration)", name)
    return done


def run(model: nn.Module, config: Any, ctx: Any, make: Callable[[dict[str, float]], BlockMethod]) -> dict[str, Any]:
    """Select targets, resolve sparsities, run the loop with the method ``make(sparsities)``."""
    ids = calibration_ids(ctx, config.method)
    targets = select_modules(model, config.targets, config.ignore)
    sparsities = module_sparsities(model, targets, config, ids, ctx)
    result = sequential(model, ids, targets, make(sparsities), options_for(config, ctx),
                        description=config.method)
    layers = dict(result.layers)
    layers.update(_outside_blocks(model, targets, sparsities, config))
    total = sum(m.weight.numel() for m in targets.values())
    zeros = sum(round(layers[n]["sparsity"] * m.weight.numel()) if m.weight.is_meta  # streamed: written already
                else int((m.weight == 0).sum()) for n, m in targets.items())
    return {"modules": len(targets), "sparsity": round(zeros / max(total, 1), 6), "layers": layers,
            "calibration": result.settings, "peak_rss_mib": round(result.peak_rss_mib, 1),
            "resumed_from_block": result.resumed_from, "loop_seconds": round(result.seconds, 3)}
