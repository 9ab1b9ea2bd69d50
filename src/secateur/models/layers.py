"""How a layer holds its weight: decided here, once, for the whole package.

A *projection* is a module with a 2-D weight that maps ``in`` features to ``out`` features:
``nn.Linear`` stores it as ``[out, in]``; GPT-2's ``transformers.pytorch_utils.Conv1D`` stores
it transposed, ``[in, out]``. Which classes are projections, and which of them are transposed,
comes from the architecture table (``Arch.layer_class`` and ``Arch.transposed``), not from class
names scattered through the methods. Every method, the targets matcher, the training loop, the
structured-pruning surgery and the checkpoint formats ask here.

    weight_matrix(m)          # [out, in] view of the weight, whatever the class
    stored(m, t)              # an [out, in] tensor back in the module's stored layout
    in_features(m), out_features(m), is_projection(m), is_transposed(m)
"""

from __future__ import annotations

from typing import Any

from .arch import ARCHS

# the class names of projection layers: nn.Linear, plus every layer class the table names
PROJECTION_CLASSES: tuple[str, ...] = tuple(dict.fromkeys(["Linear", *(a.layer_class for a in ARCHS.values())]))
# the ones whose weight is stored [in, out]
TRANSPOSED_CLASSES: frozenset[str] = frozenset(a.layer_class for a in ARCHS.values() if a.transposed)
# what a pattern naming a class also matches: ``Linear`` means "the projections" in every family
CLASS_ALIASES: dict[str, tuple[str, ...]] = {"Linear": tuple(c for c in PROJECTION_CLASSES if c != "Linear")}


def _class_names(module: Any) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


def is_transposed(module: Any) -> bool:
    """Whether ``module`` stores its weight as ``[in, out]`` (GPT-2's Conv1D)."""
    return type(module).__name__ in TRANSPOSED_CLASSES


def is_projection(module: Any) -> bool:
    """Whether ``module`` is a dense projection layer (``nn.Linear`` or a table-named layer class
    such as GPT-2's Conv1D) with a 2-D weight."""
    weight = getattr(module, "weight", None)
    return (bool(_class_names(module) & set(PROJECTION_CLASSES)) and weight is not None
            and getattr(weight, "dim", lambda: 0)() == 2)


def weight_matrix(module: Any) -> Any:
    """The module's weight as ``[out, in]`` (a view for transposed layers)."""
    weight = module.weight
    return weight.t() if is_transposed(module) else weight


def sparsity_of(tensor: Any) -> float:
    """The fraction of exact zeros in a weight."""
    return float((tensor == 0).sum()) / max(tensor.numel(), 1)


def stored(module: Any, tensor: Any) -> Any:
    """An ``[out, in]`` tensor in ``module``'s stored layout (the inverse of :func:`weight_matrix`)."""
    return tensor.t() if is_transposed(module) else tensor


def out_features(module: Any) -> int:
    return int(weight_matrix(module).shape[0])


def in_features(module: Any) -> int:
    return int(weight_matrix(module).shape[1])


def out_axis(module: Any) -> int:
    """The axis of the stored weight that indexes output features."""
    return 1 if is_transposed(module) else 0


def set_features(module: Any, out: int | None = None, in_: int | None = None) -> None:
    """Update the size attributes a projection class keeps beside its weight after its weight was
    sliced or resized (``nn.Linear``: ``out_features`` / ``in_features``; Conv1D: ``nf`` / ``nx``)."""
    names = ("nf", "nx") if is_transposed(module) else ("out_features", "in_features")
    for name, value in zip(names, (out, in_)):
        if value is not None and hasattr(module, name):
            setattr(module, name, int(value))


def projection_like(model: Any, in_features: int, out_features: int, bias: bool) -> Any:
    """An empty projection of the class ``model``'s family uses (nn.Linear, or GPT-2's Conv1D with
    its weight ``[in, out]``), on the meta device: a stand-in for code that reads shapes as the
    family's config builds them."""
    import torch
    import torch.nn as nn

    from .arch import arch_of

    facts = arch_of(model, strict=False)
    with torch.device("meta"):
        if facts is not None and facts.arch.transposed and facts.arch.layer_class == "Conv1D":
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(out_features, in_features)
            if not bias:
                layer.bias = None
            return layer
        return nn.Linear(in_features, out_features, bias=bias)


__all__ = ["PROJECTION_CLASSES", "TRANSPOSED_CLASSES", "CLASS_ALIASES", "is_transposed", "is_projection",
           "weight_matrix", "stored", "out_features", "in_features", "out_axis", "set_features", "projection_like",
           "sparsity_of"]
