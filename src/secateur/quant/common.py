"""What every weight-quantization step shares: its config fields, the scheme of each module, and
swapping an ``nn.Linear`` for the :class:`~secateur.quant.linear.QuantLinear` that holds the
integers (and runs them on real low-precision kernels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn as nn

from ..config import TargetedConfig, param
from ..errors import ConfigError, SecateurError
from ..prune.masks import weight_matrix
from .primitives import Scheme, resolve_group


@dataclass(frozen=True)
class WeightQuantConfig(TargetedConfig):
    """Fields of every weight quantizer (targets/ignore as in pruning; lm_head ignored by default)."""

    bits: int = param(4, "bits per weight", range=(2, 8))
    strategy: Literal["group", "channel", "tensor"] = param(
        "group", "one scale per group of input columns, per output channel, or per tensor")
    group_size: int = param(128, "input columns per scale (strategy group)", range=(1, 1 << 20))
    symmetric: bool = param(True, "zero point 0 (symmetric) or an integer zero point per scale (asymmetric)")
    observer: Literal["minmax", "mse"] = param("minmax", "range of a scale: min/max, or the clipping ratio with "
                                                        "the smallest error (MSE search)")
    fallback: bool = param(False, "per-channel scales for layers whose width the group size does not divide "
                                  "(instead of an error)")
    activations: Optional[Literal["int8"]] = param(
        None, "activation quantization: None (weight-only, e.g. W4A16) or int8 (dynamic per-token, W8A8)")

    def validate(self) -> None:
        if self.activations == "int8" and (self.bits != 8 or self.strategy == "group"):
            raise ConfigError("activations", "int8 activations (W8A8) need bits: 8 and strategy: channel or tensor")

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.bits, self.symmetric, self.strategy, self.group_size, self.observer)


def scheme_for(config: WeightQuantConfig, name: str, module: nn.Module) -> Scheme:
    return resolve_group(weight_matrix(module).shape[1], config.scheme, config.fallback, where=name)


def check_linear(name: str, module: nn.Module) -> None:
    if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
        raise SecateurError(f"{name}: quantization supports Linear (and GPT-2 Conv1D) modules, got "
                            f"{type(module).__name__}; narrow targets or ignore it")


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def to_quant_linear(module: nn.Linear, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme,
                    activations: str | None) -> nn.Module:
    from .linear import QuantLinear

    if scheme.strategy == "tensor":  # kernels take per-row scales: a tensor scale repeated per row
        scale, zero = scale.expand(q.shape[0], 1).contiguous(), zero.expand(q.shape[0], 1).contiguous()
    bias = None if module.bias is None else module.bias.detach().clone()
    group = scheme.group_size if scheme.strategy == "group" else None
    new = QuantLinear.from_quantized(q, scale, zero, scheme.bits, group, bias, activations)
    return new.to(module.weight.device)


__all__ = ["WeightQuantConfig", "scheme_for", "check_linear", "replace", "to_quant_linear", "summary", "weight_matrix"]


def summary(layers: dict[str, dict[str, Any]], config: WeightQuantConfig) -> dict[str, Any]:
    return {"modules": len(layers), "bits": config.bits, "strategy": config.strategy,
            "group_size": config.group_size if config.strategy == "group" else None,
            "symmetric": config.symmetric, "activations": config.activations, "layers": layers}
