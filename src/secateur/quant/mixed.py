"""Mixed precision — more bits where they matter, fewer where they do not, within a budget.

Sensitivity (HAWQ-style, measured rather than estimated from curvature; Dong et al. 2019,
arXiv:1905.03696 for the idea of per-layer sensitivity-driven bit allocation): for every targeted
layer and every candidate bit width, quantize *only that layer* with round-to-nearest and measure
the calibration loss (causal LMs: the language-model loss; encoders: 1 − mean cosine between the
final hidden states and the dense ones). Allocation: start every layer at the widest candidate
and repeatedly narrow the layer whose next step down costs the least loss per bit saved, until the
average bits per weight (or the bytes of the quantized weights) meet the budget. Then the chosen
quantizer (GPTQ by default) runs once with the per-layer bits. The table of sensitivities and bits
goes into the compression card.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional

import torch

from ..api import get_method, register
from ..calibrate import calibration_ids, calibration_loss
from ..config import CalibratedConfig, param
from ..errors import ConfigError
from ..progress import track
from ..targets import select_modules
from ..models.layers import weight_matrix
from .common import WeightQuantConfig, check_linear
from .primitives import dequantize, quantize_weight, resolve_group


@dataclass(frozen=True)
class MixedPrecisionConfig(WeightQuantConfig, CalibratedConfig):
    """Per-layer bits from measured sensitivity under an average-bits or bytes budget."""

    choices: tuple[int, ...] = param((3, 4), "candidate bit widths")
    avg_bits: Optional[float] = param(3.5, "budget: average bits per targeted weight (scales not counted)")
    budget_bytes: Optional[int] = param(None, "budget: bytes of the quantized targeted weights (instead of avg_bits)")
    quantizer: Literal["gptq", "rtn", "awq"] = param("gptq", "the method that quantizes with the chosen bits")
    samples: int = param(16, "calibration sequences used to measure sensitivity", range=(1, 1 << 20))

    def validate(self) -> None:
        super().validate()
        if not self.choices or any(not 2 <= b <= 8 for b in self.choices):
            raise ConfigError("choices", f"got {list(self.choices)}, expected bit widths in 2..8")
        if (self.avg_bits is None) == (self.budget_bytes is None):
            raise ConfigError("avg_bits", "give exactly one budget: avg_bits or budget_bytes")
        if self.avg_bits is not None and not min(self.choices) <= self.avg_bits <= max(self.choices):
            raise ConfigError("avg_bits", f"got {self.avg_bits}, expected a value between the choices "
                                          f"{min(self.choices)} and {max(self.choices)}")


def allocate(sizes: dict[str, int], loss: dict[str, dict[int, float]], choices: tuple[int, ...],
             budget_bits: float) -> dict[str, int]:
    """Greedy allocation: every layer at the widest choice, then narrow the layer with the smallest
    loss increase per bit saved until Σ bits · size <= ``budget_bits``; then widen again, by the
    largest loss decrease per bit, whatever still fits the budget."""
    ladder = sorted(set(choices), reverse=True)
    bits = {name: ladder[0] for name in sizes}
    used = sum(ladder[0] * n for n in sizes.values())
    while used > budget_bits:
        best, best_cost = None, float("inf")
        for name, b in bits.items():
            i = ladder.index(b)
            if i + 1 == len(ladder):
                continue
            nb = ladder[i + 1]
            cost = (loss[name][nb] - loss[name][b]) / ((b - nb) * sizes[name])
            if cost < best_cost:
                best, best_cost = name, cost
        if best is None:
            break  # everything at the narrowest choice
        nb = ladder[ladder.index(bits[best]) + 1]
        used -= (bits[best] - nb) * sizes[best]
        bits[best] = nb
    while True:  # fill back: spend what the last step freed on the widenings that gain the most per bit
        best, best_gain = None, 0.0
        for name, b in bits.items():
            i = ladder.index(b)
            if i == 0 or used + (ladder[i - 1] - b) * sizes[name] > budget_bits:
                continue
            gain = (loss[name][b] - loss[name][ladder[i - 1]]) / ((ladder[i - 1] - b) * sizes[name])
            if gain > best_gain:
                best, best_gain = name, gain
        if best is None:
            return bits
        wider = ladder[ladder.index(bits[best]) - 1]
        used += (wider - bits[best]) * sizes[best]
        bits[best] = wider


@torch.no_grad()
def sensitivities(model: torch.nn.Module, targets: dict[str, torch.nn.Module], config: MixedPrecisionConfig,
                  ids: torch.Tensor) -> dict[str, dict[int, float]]:
    """Calibration loss with only one layer quantized (RTN) at each candidate width."""
    from ..models.arch import arch_of

    kind = arch_of(model).kind
    batches = [ids[i:i + config.batch_size] for i in range(0, ids.shape[0], config.batch_size)]
    dense, reference = calibration_loss(model, batches, kind)
    out: dict[str, dict[int, float]] = {}
    for name, module in track(list(targets.items()), "mixed precision: sensitivity (layer)"):
        w = weight_matrix(module)
        original = w.detach().clone()
        out[name] = {}
        for bits in sorted(set(config.choices)):
            scheme = resolve_group(w.shape[1], dataclasses.replace(config.scheme, bits=bits), config.fallback, name)
            q, scale, zero = quantize_weight(original.float(), scheme)
            w.copy_(dequantize(q, scale, zero, scheme).to(w.dtype))
            value = calibration_loss(model, batches, kind, reference)[0]
            out[name][bits] = value - dense if kind == "causal" else value
        w.copy_(original)
    return out


def _fields(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config)}


@register("mixed", MixedPrecisionConfig, kind="quantize", needs_data=True, paper="sensitivity-driven bit allocation (HAWQ, arXiv:1905.03696)")
def apply(model: torch.nn.Module, config: MixedPrecisionConfig, ctx: Any) -> dict[str, Any]:
    ids = calibration_ids(ctx, "mixed")
    targets = select_modules(model, config.targets, config.ignore)
    for name, module in targets.items():
        check_linear(name, module)
    sizes = {name: weight_matrix(m).numel() for name, m in targets.items()}
    total = sum(sizes.values())
    budget = config.avg_bits * total if config.avg_bits is not None else config.budget_bytes * 8
    loss = sensitivities(model, targets, config, ids[: config.samples])
    bits = allocate(sizes, loss, config.choices, budget)
    quantizer = get_method(config.quantizer)
    own = {f.name for f in fields(quantizer.config)}
    step = quantizer.config(**{k: v for k, v in _fields(config).items() if k in own and k != "overrides"},
                            overrides={name: b for name, b in bits.items() if b != config.bits})
    result = quantizer.apply(model, step, ctx) or {}
    avg = sum(bits[n] * sizes[n] for n in sizes) / total
    table = {name: {"bits": bits[name], "weights": sizes[name],
                    "sensitivity": {str(b): round(v, 6) for b, v in loss[name].items()}} for name in targets}
    return {"quantizer": config.quantizer, "avg_bits": round(avg, 4), "budget_bits": budget,
            "weight_bytes": int(sum(bits[n] * sizes[n] for n in sizes) // 8), "allocation": table,
            "quantizer_result": {k: v for k, v in result.items() if k != "layers"}, "layers": result.get("layers", {})}
