"""Structured channel pruning for arbitrary PyTorch models (CNNs, MLPs) through Torch-Pruning.

secateur prunes Hugging Face transformers through its own architecture table. Everything outside that
table (any ``nn.Module``) goes through here: whole output channels of every Conv/Linear layer are removed,
so the layers really get smaller (no masks). Removing channel ``c`` of a layer also means removing the
matching BatchNorm entries, the next layer's input channel ``c``, and every layer tied to it by a residual
add or a concat. Finding those couplings is what Torch-Pruning's DependencyGraph does, by tracing the
model once on ``example_inputs``:

    Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023 (arXiv:2301.12900).
    https://github.com/VainF/Torch-Pruning

Torch-Pruning is an optional extra (``pip install 'secateur[torch-pruning]'``) and is imported only
when :func:`prune_channels` runs. What we use of it, written against torch-pruning 1.6:

* ``tp.pruner.BasePruner`` with local pruning (``global_pruning=False``, one step): every coupled group
  loses the same fraction of its channels, ranked only against each other. A group of ``n`` channels
  keeps ``int(n * (1 - fraction))`` of them, rounded down to a multiple of ``round_to``.
* ``tp.importance.GroupMagnitudeImportance(p)``: the score of channel ``c`` is the mean, over the
  group's members, of ``sum |w|^p`` over that member's slice for ``c`` -- the output row of each Conv /
  Linear, the input column of each consumer, and the BatchNorm scale (biases are not counted) --
  then divided by the mean over channels (which does not change a layer's ranking).
* ``tp.importance.GroupTaylorImportance()``: the same with ``sum |w * dL/dw|`` (first-order Taylor,
  Molchanov et al., CVPR 2019). Gradients are summed over ``batches`` with ``loss_fn`` first.

The model's final output layer (the last ``nn.Linear`` or convolution in module registration order)
is never pruned on its output side, so the output shape stays the same; its input side shrinks with
the layer before it. Names in ``ignore`` keep their output channels too (a container keeps all of
its submodules). A group containing any such layer -- e.g. everything tied to it by a residual add --
is left whole. The model is edited in place; parameters are replaced, so build optimizers afterwards.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import SecateurError, did_you_mean, one_of

log = logging.getLogger(__name__)

IMPORTANCES = ("magnitude", "taylor")
NORMS = {"l1": 1, "l2": 2}
_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def _forward(model: nn.Module, inputs: Any) -> Any:
    """How ``example_inputs`` reach the model: a dict as keywords, a tuple/list as arguments, else one argument."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _out_shapes(out: Any) -> list:
    if isinstance(out, torch.Tensor):
        return [tuple(out.shape)]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else []
    return [s for item in items for s in _out_shapes(item)]


def _dims(model: nn.Module) -> dict[str, list[int]]:
    return {name: [m.out_features, m.in_features] if isinstance(m, nn.Linear) else [m.out_channels, m.in_channels]
            for name, m in model.named_modules() if isinstance(m, _LAYERS)}


def prune_channels(model: nn.Module, example_inputs: Any, fraction: float, importance: str = "magnitude", *,
                   batches: Sequence[Any] | None = None, loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                   ignore: Sequence[str] = (), round_to: int = 1, norm: str = "l2") -> dict[str, Any]:
    """Remove ``fraction`` of the output channels of every prunable Conv/Linear layer, in place.

    ``example_inputs`` is what the model is traced (and checked) on: a tensor, a tuple of arguments or a
    dict of keyword arguments. ``importance`` is "magnitude" (group L2 or L1 per ``norm``) or "taylor"
    (needs ``batches`` and ``loss_fn(model, batch) -> scalar loss``; gradients are taken in eval mode
    and cleared afterwards). ``ignore`` names modules (as in ``named_modules()``) whose output channels
    are kept; the final output layer is always kept. Returns a JSON-able report.
    """
    try:
        import torch_pruning as tp
    except ImportError:
        raise SecateurError("channel pruning of models outside the architecture table needs Torch-Pruning: "
                            "pip install 'secateur[torch-pruning]'") from None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise SecateurError(f"fraction must be a number in [0, 1) (the share of channels removed), got {fraction!r}")
    if importance not in IMPORTANCES:
        raise SecateurError(f"unknown importance '{importance}'{did_you_mean(str(importance), IMPORTANCES)}; "
                            f"valid values: {one_of(IMPORTANCES)}")
    if norm not in NORMS:
        raise SecateurError(f"unknown norm '{norm}'; valid values: {one_of(NORMS)}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise SecateurError(f"round_to must be an integer >= 1, got {round_to!r}")
    if importance == "taylor" and (batches is None or loss_fn is None or len(batches) == 0):
        raise SecateurError("importance 'taylor' needs gradients: pass batches=[...] (a few calibration batches) "
                            "and loss_fn=lambda model, batch: <scalar loss tensor>")
    modules = dict(model.named_modules())
    layers = [name for name, m in modules.items() if isinstance(m, _LAYERS)]
    if not layers:
        raise SecateurError("the model has no nn.Linear or convolution layer to prune")
    for name in ignore:
        if name not in modules:
            raise SecateurError(f"ignore: no module named '{name}'{did_you_mean(name, modules)}; "
                                f"valid names include {one_of(layers[:8])}")
    kept = [*dict.fromkeys([*ignore, layers[-1]])]  # the output layer is always kept
    try:
        version = importlib.metadata.version("torch-pruning")
    except importlib.metadata.PackageNotFoundError:
        version = getattr(tp, "__version__", "unknown")
    before, params_before = _dims(model), sum(p.numel() for p in model.parameters())
    report = {"backend": "torch-pruning", "torch_pruning_version": version, "importance": importance,
              "fraction": fraction, "ignored": kept, "parameters_before": params_before}
    if fraction == 0:
        return {**report, "parameters_after": params_before, "layers": {}, "note": "fraction 0: model unchanged"}

    modes = {m: m.training for m in model.modules()}  # tracing switches to eval; restore afterwards
    try:
        with torch.enable_grad():
            with torch.no_grad():
                shapes = _out_shapes(_forward(model.eval(), example_inputs))
            scorer = (tp.importance.GroupMagnitudeImportance(p=NORMS[norm]) if importance == "magnitude"
                      else tp.importance.GroupTaylorImportance())
            pruner = tp.pruner.BasePruner(model, example_inputs, importance=scorer, pruning_ratio=fraction,
                                          global_pruning=False, iterative_steps=1, round_to=round_to,
                                          ignored_layers=[modules[n] for n in kept], root_module_types=list(_LAYERS),
                                          forward_fn=_forward)
            for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=_LAYERS):
                n = pruner.DG.get_out_channels(group[0].dep.target.module)
                keep = int(n * (1 - fraction)) // round_to * round_to
                if n > 1 and keep < 1:
                    name = pruner.DG._module2name[group[0].dep.target.module]
                    raise SecateurError(f"fraction {fraction} would remove all {n} output channels of '{name}' "
                                        f"(round_to={round_to}); use a smaller fraction or ignore that layer")
            if importance == "taylor":
                model.zero_grad(set_to_none=True)
                for batch in batches:
                    loss_fn(model, batch).backward()
                for p in model.parameters():  # frozen/unused weights: zero gradient, so Torch-Pruning can score them
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            pruner.step()
            if importance == "taylor":
                model.zero_grad(set_to_none=True)
            with torch.no_grad():
                try:
                    after_shapes = _out_shapes(_forward(model, example_inputs))
                except Exception as e:
                    raise SecateurError(f"the pruned model no longer runs on example_inputs ({e}); it has an operation "
                                        "Torch-Pruning cannot follow (e.g. a hard-coded reshape): add the layers "
                                        "around it to ignore") from e
            if after_shapes != shapes:
                raise SecateurError(f"pruning changed the model's output shapes {shapes} -> {after_shapes}; "
                                    "add the layers that produce them to ignore")
    finally:
        for m, training in modes.items():
            m.training = training

    after = _dims(model)
    report["parameters_after"] = sum(p.numel() for p in model.parameters())
    report["layers"] = {name: {"before": before[name], "after": after[name]}
                        for name in before if after.get(name) != before[name]}
    log.info("pruned %.0f%% of the channels of %d layers with Torch-Pruning (%s): %d -> %d parameters",
             100 * fraction, len(report["layers"]), importance, params_before, report["parameters_after"])
    return report
