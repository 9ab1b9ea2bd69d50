"""Structured pruning — remove whole heads, MLP channels, blocks and hidden width, so the tensors
really shrink and the model is really faster on ordinary hardware.

Three separate pieces: ``importance.py`` scores the units (magnitude, activation, Taylor; block
influence or measured loss for depth), the *policy* here decides how many to remove where, and
``models/structure.py`` removes them physically. By default the same number of heads and channels goes
in every block, so the result is an ordinary checkpoint that stock ``AutoModel*.from_pretrained``
loads; ``uniform: false`` lets the scores decide per block (the artifact then records its layout
and :func:`secateur.load` rebuilds it).

Heads under grouped-query attention: ``gqa: groups`` removes whole KV groups (a KV head with its
query heads — smaller KV cache too); ``gqa: query`` removes the same number of query heads inside
every group and keeps all KV heads.

Models outside the architecture table (CNNs, MLPs) go through Torch-Pruning's dependency graph
(``channels``; the ``torch-pruning`` extra).

Papers: Minitron (Muralidharan et al. 2024, arXiv:2407.14679) for width and activation importance;
ShortGPT (Men et al. 2024, arXiv:2403.03853) for depth; LLM-Pruner (Ma et al. 2023,
arXiv:2305.11627) for first-order Taylor scores of coupled groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from ..api import register
from ..config import StepConfig, param
from ..errors import ConfigError, SecateurError
from ..models import structure
from . import importance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StructuredConfig(StepConfig):
    """Remove attention heads, MLP channels, whole blocks and hidden width."""

    heads: float = param(0.0, "fraction of attention heads removed in every block", range=(0.0, 1.0))
    mlp: float = param(0.5, "fraction of MLP intermediate channels removed in every block", range=(0.0, 1.0))
    drop_layers: int = param(0, "number of blocks removed, chosen by depth_importance", range=(0, 10_000))
    blocks: tuple[int, ...] = param((), "blocks to remove, chosen by hand (instead of drop_layers)")
    hidden: float = param(0.0, "fraction of hidden (residual-stream) channels removed everywhere", range=(0.0, 1.0))
    importance: Literal["auto", "magnitude", "activation", "taylor"] = param(
        "auto", "score of heads and channels: weight magnitude (no data), mean |activation| (Minitron), "
        "first-order Taylor |grad x weight|; auto = activation with calibration data, magnitude without")
    depth_importance: Literal["auto", "influence", "loss", "taylor", "magnitude"] = param(
        "auto", "score of blocks: influence = 1 - cos(block input, output) (ShortGPT), loss = quality drop "
        "when the block is skipped, taylor, magnitude; auto = influence")
    norm: Literal["l2", "l1"] = param("l2", "norm of a group for magnitude importance")
    gqa: Literal["groups", "query"] = param(
        "groups", "heads under grouped-query attention: remove whole KV groups, or query heads evenly within groups")
    uniform: bool = param(True, "same shapes in every block (a standard checkpoint); false lets the scores "
                                "choose per block (the artifact records its layout)")
    round_to: int = param(1, "keep MLP and hidden channel counts a multiple of this (kernels like 8, 64)",
                          range=(1, 4096))
    channels: float = param(0.0, "models outside the architecture table: fraction of output channels of every "
                                 "Conv/Linear removed through Torch-Pruning (heads/mlp/... are then unused)",
                            range=(0.0, 1.0))
    batch_size: int = param(8, "calibration sequences per forward when scoring", range=(1, 65536))
    compute_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = param(
        None, "dtype of the calibration forwards when scoring by activation/influence (None: the model's)")

    def validate(self) -> None:
        for name in ("heads", "mlp", "hidden", "channels"):
            if getattr(self, name) >= 1.0:
                raise ConfigError(name, f"got {getattr(self, name)}, expected a fraction below 1 (removing everything)")
        if self.blocks and self.drop_layers:
            raise ConfigError("blocks", "give either drop_layers (chosen by importance) or blocks (by hand), not both")
        if len(set(self.blocks)) != len(self.blocks):
            raise ConfigError("blocks", f"got {list(self.blocks)}, expected distinct block indices")
        if not (self.heads or self.mlp or self.hidden or self.drop_layers or self.blocks or self.channels):
            raise ConfigError("heads", "nothing to remove: set heads, mlp, hidden, drop_layers, blocks or channels")


# --- policy: how many to remove where -----------------------------------------------------------
def _count(fraction: float, n: int, what: str, field_name: str, multiple: int = 1) -> int:
    """How many of ``n`` units to remove for ``fraction``, keeping a multiple of ``multiple``."""
    if fraction == 0:
        return 0
    keep = max(multiple, int(round(n * (1 - fraction) / multiple)) * multiple)
    remove = n - keep
    if remove <= 0:
        raise ConfigError(field_name, f"{fraction} of {n} {what} rounds to removing none; use a larger fraction "
                                      f"(one is {1 / n:.3g})")
    return remove


def _lowest(scores: torch.Tensor, remove: int) -> list[int]:
    """Indices kept after removing the ``remove`` lowest scores (ties: the later index goes)."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), -i))
    return sorted(order[remove:])


def _global_keep(per_layer: dict[int, torch.Tensor], remove_each: int, minimum: int,
                 multiple: int = 1) -> dict[int, list[int]]:
    """Non-uniform: remove ``remove_each × layers`` units over all blocks by scores normalised to
    each block's mean, keeping at least ``minimum`` (and a multiple of ``multiple``) per block."""
    pool = []
    for layer, s in per_layer.items():
        norm = s / s.mean().clamp_min(1e-30)
        pool += [(float(norm[i]), layer, i) for i in range(len(s))]
    pool.sort()
    budget = remove_each * len(per_layer)
    removed: dict[int, set[int]] = {layer: set() for layer in per_layer}
    for _, layer, i in pool:
        if budget == 0:
            break
        if len(per_layer[layer]) - len(removed[layer]) > minimum:
            removed[layer].add(i)
            budget -= 1
    keep = {}
    for layer, s in per_layer.items():
        kept = [i for i in range(len(s)) if i not in removed[layer]]
        extra = (-len(kept)) % multiple  # round the kept count up, restoring the best removed units
        back = sorted(removed[layer], key=lambda i: -float(s[i]))[:extra]
        keep[layer] = sorted(kept + back)
    return keep


@dataclass
class Plan:
    heads: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)  # block -> (query, KV) kept
    mlp: dict[int, list[int]] = field(default_factory=dict)                          # block -> channels kept
    hidden: list[int] | None = None
    drop: list[int] = field(default_factory=list)


def plan_heads(shapes: dict[int, structure.BlockShape], scores: importance.Scores, config: StructuredConfig) -> dict:
    out = {}
    by_query = config.gqa == "query" and any(s.groups > 1 for s in shapes.values())
    if by_query:  # the same number of query heads in every KV group
        for layer, shape in shapes.items():
            remove = _count(config.heads, shape.groups, "query heads per KV group", "heads")
            s = scores.heads[layer].reshape(shape.kv_heads, shape.groups)
            keep_q = [g * shape.groups + j for g in range(shape.kv_heads) for j in _lowest(s[g], remove)]
            out[layer] = (keep_q, list(range(shape.kv_heads)))
        return out
    kv = {layer: scores.kv_heads[layer] for layer in shapes}
    if config.uniform:
        keep_kv = {layer: _lowest(kv[layer], _count(config.heads, shape.kv_heads, "KV head groups", "heads"))
                   for layer, shape in shapes.items()}
    else:
        n = max(s.kv_heads for s in shapes.values())
        keep_kv = _global_keep(kv, _count(config.heads, n, "KV head groups", "heads"), minimum=1)
    for layer, kept in keep_kv.items():
        g = shapes[layer].groups
        out[layer] = ([k * g + j for k in kept for j in range(g)], kept)
    return out


def plan_mlp(shapes: dict[int, structure.BlockShape], scores: importance.Scores, config: StructuredConfig) -> dict:
    if config.uniform:
        return {layer: _lowest(scores.mlp[layer], _count(config.mlp, s.intermediate, "MLP channels", "mlp",
                                                         config.round_to))
                for layer, s in shapes.items()}
    n = max(s.intermediate for s in shapes.values())
    return _global_keep({layer: scores.mlp[layer] for layer in shapes},
                        _count(config.mlp, n, "MLP channels", "mlp", config.round_to),
                        minimum=config.round_to, multiple=config.round_to)


def describe(model: torch.nn.Module, config: StructuredConfig) -> dict[str, Any]:
    """What a dry run can say without weights (``model`` may live on the meta device): the modules
    touched and the shapes after pruning (which units go depends on the scores, not their number)."""
    from ..models.arch import arch_of
    from ..targets import describe_selection

    facts = arch_of(model)
    arch = facts.arch
    before = structure.shapes(model)
    n = before["layers"]
    if any(i >= n for i in config.blocks) or config.drop_layers >= n:
        raise ConfigError("blocks" if config.blocks else "drop_layers",
                          f"the model has {n} blocks (0..{n - 1}); at least one must stay")
    prefix = arch.block_prefix(model)
    touched = {}
    for i, block in enumerate(arch.get_blocks(model)):
        roles = (list(arch.attn.values()) if config.heads or config.hidden else []) + \
                (list(arch.mlp.values()) if config.mlp or config.hidden else [])
        if i in config.blocks or config.drop_layers:  # a block that is, or may be, removed whole
            touched[f"{prefix}.{i}"] = block
        for path in roles:
            touched[f"{prefix}.{i}.{path}"] = block.get_submodule(path)
    after = dict(before)
    shape = structure.block_shape(arch.get_blocks(model)[0], arch, before["head_dim"])
    if config.heads:
        if config.gqa == "query" and shape.groups > 1:
            g = shape.groups - _count(config.heads, shape.groups, "query heads per KV group", "heads")
            after["heads"], after["kv_heads"] = [g * shape.kv_heads] * n, [shape.kv_heads] * n
        else:
            kv = shape.kv_heads - _count(config.heads, shape.kv_heads, "KV head groups", "heads")
            after["heads"], after["kv_heads"] = [kv * shape.groups] * n, [kv] * n
    if config.mlp:
        after["intermediate"] = [shape.intermediate - _count(config.mlp, shape.intermediate, "MLP channels", "mlp",
                                                             config.round_to)] * n
    if config.hidden:
        after["hidden"] = before["hidden"] - _count(config.hidden, before["hidden"], "hidden channels", "hidden",
                                                    config.round_to)
    dropped = len(config.blocks) or config.drop_layers
    for key in ("heads", "kv_heads", "intermediate"):
        after[key] = after[key][:n - dropped]
    after["layers"] = n - dropped
    after.pop("parameters")
    return {"modules": describe_selection(touched), "shapes": {"before": before, "after": after}}


# --- apply ---------------------------------------------------------------------------------------
def _ids(ctx: Any, what: str) -> torch.Tensor:
    from ..calibrate import calibration_ids

    try:
        return calibration_ids(ctx, "structured")
    except SecateurError:
        raise SecateurError(f"structured pruning with {what} needs calibration data (--data / data: in the recipe, "
                            "or data= in Python); importance 'magnitude' needs none") from None


def _generic(model: torch.nn.Module, config: StructuredConfig, ctx: Any) -> dict[str, Any]:
    """A model outside the architecture table: Torch-Pruning's dependency graph."""
    from .channels import prune_channels

    for name in ("heads", "hidden", "drop_layers", "blocks"):
        if getattr(config, name):
            raise ConfigError(name, f"applies to transformer models in the architecture table; this "
                                    f"{type(model).__name__} is not one — use channels (Torch-Pruning)")
    if not config.channels:
        raise ConfigError("channels", f"{type(model).__name__} is not in the architecture table; set channels "
                                      "(fraction of output channels removed through Torch-Pruning)")
    data = getattr(ctx, "data", None)
    if isinstance(data, dict):
        example, batches, loss_fn = data.get("example_inputs"), data.get("batches"), data.get("loss_fn")
    else:
        example, batches, loss_fn = data, None, None
    if example is None:
        raise SecateurError("channel pruning needs example inputs to trace the model: data=example_batch, or "
                            "data={'example_inputs': x, 'batches': [...], 'loss_fn': fn} for taylor")
    method = {"auto": "taylor" if batches is not None else "magnitude"}.get(config.importance, config.importance)
    if method == "activation":
        raise ConfigError("importance", "models outside the architecture table support 'magnitude' and 'taylor'")
    return prune_channels(model, example, config.channels, method, batches=batches, loss_fn=loss_fn,
                          round_to=config.round_to, norm=config.norm)


@register("structured", StructuredConfig, kind="prune",
          uses="calibration windows for activation, Taylor or depth scores (magnitude needs none)",
          needs_data=False, paper="Minitron arXiv:2407.14679; ShortGPT arXiv:2403.03853")
def apply(model: torch.nn.Module, config: StructuredConfig, ctx: Any) -> dict[str, Any]:
    from ..models.arch import arch_of

    facts = arch_of(model, strict=False)
    if facts is None:
        return _generic(model, config, ctx)
    if config.channels:
        raise ConfigError("channels", "is for models outside the architecture table; use heads, mlp, hidden, "
                                      "drop_layers")
    arch = facts.arch
    before = structure.shapes(model)
    n_blocks = before["layers"]
    d = before["head_dim"]
    shapes = {i: structure.block_shape(b, arch, d) for i, b in enumerate(arch.get_blocks(model))}
    if any(i >= n_blocks for i in config.blocks) or config.drop_layers >= n_blocks:
        raise ConfigError("blocks" if config.blocks else "drop_layers",
                          f"the model has {n_blocks} blocks (0..{n_blocks - 1}); at least one must stay")
    report: dict[str, Any] = {"before": before}

    plan = Plan(drop=sorted(config.blocks))
    if config.heads or config.mlp or config.hidden:
        method = config.importance
        if method == "auto":
            method = "activation" if getattr(ctx, "data", None) is not None else "magnitude"
            log.info("structured: importance auto -> %s", method)
        ids = _ids(ctx, f"importance '{method}'") if method != "magnitude" else None
        scores = importance.width_scores(model, method, ids, norm=config.norm,
                                         batch_size=config.batch_size, compute_dtype=config.compute_dtype)
        report["importance"] = scores.method
        if config.heads:
            plan.heads = plan_heads(shapes, scores, config)
        if config.mlp:
            plan.mlp = plan_mlp(shapes, scores, config)
        if config.hidden:
            remove = _count(config.hidden, before["hidden"], "hidden channels", "hidden", config.round_to)
            plan.hidden = _lowest(scores.hidden, remove)
    if config.drop_layers:
        method = "influence" if config.depth_importance == "auto" else config.depth_importance
        ids = _ids(ctx, f"depth importance '{method}'") if method != "magnitude" else None
        depth = importance.depth_scores(model, method, ids, batch_size=config.batch_size,
                                        compute_dtype=config.compute_dtype)
        plan.drop = sorted(_lowest(-depth, n_blocks - config.drop_layers))  # the lowest scores go
        report["depth_importance"] = method
        report["block_scores"] = [round(float(s), 6) for s in depth]

    with torch.no_grad():
        for layer, (keep_q, keep_kv) in plan.heads.items():
            structure.remove_heads(model, layer, keep_q, keep_kv)
        for layer, keep in plan.mlp.items():
            structure.remove_channels(model, layer, keep)
        if plan.hidden is not None:
            structure.remove_hidden(model, plan.hidden)
        if plan.drop:
            structure.remove_blocks(model, plan.drop)
    after = structure.sync_config(model)
    recorded = structure.layout(model)
    report.update({
        "after": after,
        "removed_heads": {str(layer): [h for h in range(shapes[layer].heads) if h not in q]
                          for layer, (q, _) in plan.heads.items()},
        "removed_blocks": plan.drop,
        "kept_blocks": [i for i in range(n_blocks) if i not in plan.drop],
        "parameters_ratio": round(after["parameters"] / before["parameters"], 6),
        "standard_checkpoint": recorded is None,
    })
    if recorded is not None:
        report["layout"] = "per-module shapes recorded in the card; secateur.load rebuilds the model"
    log.info("structured: %s -> %s parameters", before["parameters"], after["parameters"])
    return report
