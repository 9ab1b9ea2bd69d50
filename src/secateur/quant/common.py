"""What every weight-quantization step shares: its config fields, the scheme of each module, and
swapping an ``nn.Linear`` for the :class:`~secateur.runtime.linear.QuantLinear` that holds the
integers (and runs them on real low-precision kernels)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn as nn

from ..config import TargetedConfig, param
from ..errors import ConfigError, SecateurError
from ..models.layers import is_projection, weight_matrix
from .primitives import Scheme, resolve_group

log = logging.getLogger(__name__)


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
    fallback: bool = param(True, "per-channel scales for layers whose width the group size does not divide "
                                 "(false: an error); the card records each layer's strategy")
    activations: Optional[Literal["int8"]] = param(
        None, "activation quantization: None (weight-only, e.g. W4A16) or int8 (dynamic per-token, W8A8)")
    overrides: dict[str, int] = param({}, "bits for some modules: pattern (class, name or re:regex) -> bits "
                                          "(mixed precision)")

    def validate(self) -> None:
        for pattern, bits in self.overrides.items():
            if not 2 <= bits <= 8:
                raise ConfigError(f"overrides.{pattern}", f"got {bits} bits, expected 2..8")
        if self.activations == "int8" and (self.bits != 8 or self.strategy == "group" or
                                           any(b != 8 for b in self.overrides.values())):
            raise ConfigError("activations", "int8 activations (W8A8) need bits: 8 and strategy: channel or tensor")

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.bits, self.symmetric, self.strategy, self.group_size, self.observer)


def scheme_for(config: WeightQuantConfig, name: str, module: nn.Module) -> Scheme:
    """The module's scheme: the config's, with its bits overridden by the last matching pattern."""
    import dataclasses

    from ..targets import matches

    scheme = config.scheme
    for pattern, bits in config.overrides.items():  # the targets' matcher: `Linear` covers GPT-2's Conv1D too
        if matches(pattern, name, module):
            scheme = dataclasses.replace(scheme, bits=bits)
    return resolve_group(weight_matrix(module).shape[1], scheme, config.fallback, where=name)


def check_linear(name: str, module: nn.Module) -> None:
    if not is_projection(module):
        raise SecateurError(f"{name}: quantization supports Linear (and GPT-2 Conv1D) modules, got "
                            f"{type(module).__name__}; narrow targets or ignore it")


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def to_quant_linear(module: nn.Linear, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme,
                    activations: str | None) -> nn.Module:
    from ..runtime.linear import QuantLinear

    if scheme.strategy == "tensor":  # kernels take per-row scales: a tensor scale repeated per row
        scale, zero = scale.expand(q.shape[0], 1).contiguous(), zero.expand(q.shape[0], 1).contiguous()
    bias = None if module.bias is None else module.bias.detach().clone()
    group = scheme.group_size if scheme.strategy == "group" else None
    new = QuantLinear.from_quantized(q, scale, zero, scheme.bits, group, bias, activations)
    return new.to(module.weight.device)


__all__ = ["WeightQuantConfig", "scheme_for", "check_linear", "replace", "to_quant_linear", "summary",
           "stash", "swap_all", "run_calibrated", "smooth_groups", "fold_scales"]


# --- calibrated methods: the dequantized weight stays in the Linear while the loop needs it -------
def stash(module: nn.Module, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> None:
    """Write the dequantized weight into ``module`` and attach its scales as buffers, so the
    calibration loop re-runs the quantized block and a block checkpoint carries the scales."""
    from .primitives import dequantize

    with torch.no_grad():
        weight_matrix(module).copy_(dequantize(q, scale, zero, scheme).to(module.weight.dtype))
    module.register_buffer("quant_scale", scale)
    module.register_buffer("quant_zero_point", zero)


def swap_all(model: nn.Module, targets: dict[str, nn.Module], config: WeightQuantConfig) -> None:
    """After the loop: every stashed Linear becomes a QuantLinear (integers recovered exactly, as the
    weight lies on its grid)."""
    from .primitives import quantize

    from .primitives import quantize_weight

    for name, module in targets.items():
        scheme = scheme_for(config, name, module)
        if not hasattr(module, "quant_scale"):  # outside the blocks (BERT's pooler): the loop never saw it
            log.info("%s is outside the transformer blocks: rounded to nearest (no calibration)", name)
            q, scale, zero = quantize_weight(weight_matrix(module).detach().float(), scheme)
            replace(model, name, to_quant_linear(module, q, scale, zero, scheme, config.activations))
            continue
        scale, zero = module.quant_scale, module.quant_zero_point
        del module.quant_scale, module.quant_zero_point
        q = quantize(weight_matrix(module).detach().float(), scale, zero, scheme)
        replace(model, name, to_quant_linear(module, q, scale, zero, scheme, config.activations))


class _SwapThenWrite:
    """Streaming hooks that swap a finished block's stashed Linears before the writer sees it."""

    def __init__(self, inner: Any, model: nn.Module, targets: dict[str, nn.Module], config: Any):
        self.inner, self.model, self.targets, self.config = inner, model, targets, config

    def __getattr__(self, name: str) -> Any:  # everything else the stream offers (done_blocks, dense_weight)
        return getattr(self.inner, name)

    def load(self, index: int, prefix: str, block: nn.Module) -> None:
        self.inner.load(index, prefix, block)

    def done(self, index: int, prefix: str, block: nn.Module) -> None:
        mine = {n: m for n, m in self.targets.items() if n.startswith(prefix + ".")}
        swap_all(self.model, mine, self.config)
        self.inner.done(index, prefix, block)
        for module in mine.values():  # the swapped-out Linears: their dense weights go too
            module.to("meta")


def run_calibrated(model: nn.Module, config: Any, ctx: Any, make: Callable[[dict[str, nn.Module]], Any]) -> dict[str, Any]:
    """What every calibrated quantizer's ``apply`` does: select and check the targets (a group size
    that does not divide fails before any work), run the one calibration loop with the method
    ``make(targets)``, swap the stashed Linears for QuantLinears, report."""
    from ..calibrate import sequential
    from ..calibrate import calibration_ids, options_for
    from ..targets import select_modules

    ids = calibration_ids(ctx, config.method)
    targets = select_modules(model, config.targets, config.ignore)
    for name, module in targets.items():
        check_linear(name, module)
        scheme_for(config, name, module)
    options = options_for(config, ctx)
    if options.block_hooks is not None:  # streamed: each block's Linears become QuantLinears before it is written
        options = dataclasses.replace(options, block_hooks=_SwapThenWrite(options.block_hooks, model, targets, config))
    result = sequential(model, ids, targets, make(targets), options, description=config.method)
    if options.block_hooks is not None:
        from ..models.arch import arch_of

        prefix = arch_of(model).arch.block_prefix(model) + "."
        targets = {n: m for n, m in targets.items() if not n.startswith(prefix)}
    swap_all(model, targets, config)
    out = summary(result.layers, config)
    out.update(calibration=result.settings, resumed_from_block=result.resumed_from,
               loop_seconds=round(result.seconds, 3), peak_rss_mib=round(result.peak_rss_mib, 1))
    return out


# --- activation-aware scaling (AWQ, SmoothQuant) ----------------------------------------------------
def smooth_groups(model: nn.Module, block: int, targets: dict[str, nn.Module]) -> list[tuple[nn.Module, list[str]]]:
    """``(previous op, [targeted projection names])`` of block ``block`` from the table's ``smooth``
    rows, for groups whose projections are all targeted and whose shapes allow folding."""
    from ..models.arch import arch_of

    arch = arch_of(model).arch
    blocks = arch.get_blocks(model)
    prefix = arch.block_prefix(model)
    roles = arch.projections()
    out = []
    for prev_path, members in arch.smooth:
        prev = blocks[block].get_submodule(prev_path)
        if prev.weight.dim() == 1 and getattr(model.config, "do_layer_norm_before", True) is False:
            continue  # OPT-350m is post-norm: its norms feed the residual too
        names = [f"{prefix}.{block}.{roles[r]}" for r in members if r in roles]
        if not names or any(n not in targets for n in names):
            continue
        width = weight_matrix(targets[names[0]]).shape[1]
        prev_out = prev.weight.shape[0] if prev.weight.dim() == 1 else weight_matrix(prev).shape[0]
        if prev_out != width:  # e.g. v -> o under grouped-query attention: not foldable
            continue
        out.append((prev, names))
    return out


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """``prev``'s output channel j divided by s_j, every linear's input column j multiplied by s_j:
    the function computed is unchanged (up to float rounding)."""
    s = s.to(prev.weight.dtype)
    if prev.weight.dim() == 1:  # a norm
        prev.weight.div_(s)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s)
    else:
        weight_matrix(prev).div_(s.unsqueeze(1))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s)
    for m in linears:
        weight_matrix(m).mul_(s.unsqueeze(0))


def summary(layers: dict[str, dict[str, Any]], config: WeightQuantConfig) -> dict[str, Any]:
    return {"modules": len(layers), "bits": config.bits, "strategy": config.strategy,
            "group_size": config.group_size if config.strategy == "group" else None,
            "symmetric": config.symmetric, "activations": config.activations, "layers": layers}
