"""The compression card (``compression.json``): what was done to a model, on which data, with
which code, and what it cost and won — built from the model's lineage record
(:mod:`secateur.lineage`), sealed by a digest over its own canonical content, summarised for
tables. :mod:`.checkpoint` writes it beside the weights and checks it on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from typing import Any

from .. import lineage
from .._version import __version__
from ..errors import ArtifactError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CARD_NAME = "compression.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack")


def _jsonable(value: Any, where: str = "card") -> Any:
    """A strict-JSON copy of ``value``: tuples become lists, tensors and numpy scalars plain numbers,
    non-finite floats null (strict JSON has no NaN/Infinity)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return _jsonable(value.to_dict(), where)
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value), where)
    if hasattr(value, "tolist") and callable(value.tolist):  # torch tensors, numpy arrays and scalars
        return _jsonable(value.tolist(), where)
    log.warning("%s: %s is not JSON-serialisable; storing its str()", where, type(value).__name__)
    return str(value)


def _resolve_recipe(recipe: Any, history: list[dict[str, Any]]) -> dict[str, Any]:
    if recipe is None:
        return {"steps": [entry.get("step") for entry in history]}
    if isinstance(recipe, dict):
        return recipe
    if getattr(recipe, "method", None) and hasattr(recipe, "to_dict"):  # a single step config
        return {"steps": [recipe.to_dict()]}
    if hasattr(recipe, "to_dict"):
        return recipe.to_dict()
    if isinstance(recipe, (list, tuple)):
        return {"steps": [s.to_dict() if hasattr(s, "to_dict") else s for s in recipe]}
    raise ArtifactError(f"recipe: expected a Recipe, a step config, a list of steps or a dict, "
                        f"got {type(recipe).__name__}")


def _data_fingerprints(history: list[dict[str, Any]]) -> list[Any]:
    seen: dict[str, Any] = {}
    for entry in history:
        fingerprint = entry.get("data_fingerprint")
        if fingerprint is not None:
            seen.setdefault(json.dumps(_jsonable(fingerprint), sort_keys=True), fingerprint)
    return list(seen.values())


def _environment() -> dict[str, Any]:
    import safetensors
    import torch
    import transformers

    try:
        import tokenizers
        tokenizers_version = tokenizers.__version__
    except ImportError:  # pragma: no cover - transformers depends on it
        tokenizers_version = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "tokenizers": tokenizers_version, "cuda": torch.version.cuda, "platform": platform.platform(),
            "machine": platform.machine(), "torch_threads": torch.get_num_threads()}


def sparsity_summary(model: Any) -> dict[str, Any]:
    """Zeros over the 2-D weights of Linear and Conv1D modules (shared weights counted once),
    overall and inside the transformer blocks only, and the unique parameter count."""
    from ..models.layers import is_projection

    prefix = None
    try:
        from ..models.arch import arch_of

        facts = arch_of(model, strict=False)
        if facts is not None:
            prefix = facts.arch.block_prefix(model) + "."
    except Exception as exc:  # the summary must never stop a save
        log.debug("no block prefix for the sparsity summary: %s", exc)
    seen: set[int] = set()
    zeros = total = block_zeros = block_total = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not is_projection(module):
            continue
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        n, z = weight.numel(), int((weight.detach() == 0).sum().item())
        zeros, total = zeros + z, total + n
        if prefix is not None and name.startswith(prefix):
            block_zeros, block_total = block_zeros + z, block_total + n
    from ..models.arch import count_parameters

    parameters = count_parameters(model)
    return {"fraction": round(zeros / total, 6) if total else 0.0, "zeros": zeros, "weights": total,
            "block_fraction": round(block_zeros / block_total, 6) if block_total else None,
            "parameters": parameters}


def _layout(model: Any) -> dict[str, Any] | None:
    """Per-module shapes the config cannot describe (structured pruning with ``uniform: false``, or
    heads/width removed from a family whose config derives head_dim); None for ordinary models."""
    from ..models.arch import arch_of

    if arch_of(model, strict=False) is None:
        return None
    from ..models.structure import layout
    from .compressed_tensors import dense_view, has_quantized

    if has_quantized(model):  # QuantLinear holds integers, not a weight: shapes from an nn.Linear stand-in
        with dense_view(model):
            return layout(model)
    return layout(model)


def build_card(model: Any, *, recipe: Any = None, metrics: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None, sparsity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card for ``model`` without its ``files`` and ``weights_sha256`` (filled in by :func:`save`);
    ``sparsity`` replaces the summary read from the weights (a streamed run counts it block by block)."""
    record = lineage.read(model)
    history = record.history()
    config = getattr(model, "config", None)
    dtype = getattr(model, "dtype", None)
    card = {
        "format_version": FORMAT_VERSION,
        "secateur_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "base_model": record.base.to_dict() if record.base is not None else None,
        "model": {"model_type": getattr(config, "model_type", None), "class": type(model).__name__,
                  "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None},
        "recipe": _resolve_recipe(recipe, history),
        "history": history,
        "data_fingerprints": _data_fingerprints(history),
        "metrics": metrics or {},
        "sparsity": sparsity if sparsity is not None else sparsity_summary(model),
        "layout": _layout(model),
        "environment": _environment(),
        "extra": extra or {},
    }
    return _jsonable(card)


def _storage_name(card: dict[str, Any]) -> str:
    """How the weights are stored, in words: ``dense``, ``bitmask-v1``, or the compressed-tensors
    format with its bits and group sizes (``compressed-tensors pack-quantized, 4-bit, group 128``)."""
    storage = (card.get("storage") or {}).get("format", "dense")
    quant = card.get("quantization") or {}
    if not quant.get("layers"):
        return storage
    layers = quant["layers"].values()
    bits = sorted({int(layer.get("bits", 0)) for layer in layers})
    groups = sorted({f"group {layer['group_size']}" if layer.get("group_size") else "per channel" for layer in layers})
    activations = sorted({str(layer["activations"]) for layer in layers if layer.get("activations")})
    parts = [f"{quant.get('format', 'compressed-tensors')} {quant.get('compression_format') or ''}".strip(),
             "/".join(f"{b}-bit" for b in bits), ", ".join(groups)]
    if activations:
        parts.append(f"{'/'.join(activations)} activations")
    return ", ".join(parts) + ("" if storage == "dense" else f" + {storage}")


def card_summary(card: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a card, flat, for tables."""
    files = card.get("files") or {}
    sparsity = card.get("sparsity") or {}
    history = card.get("history") or []
    steps = [(entry.get("step") or {}).get("method") for entry in history]
    if not steps:
        steps = [(step or {}).get("method") for step in (card.get("recipe") or {}).get("steps") or []]
    base = card.get("base_model") or {}
    return {
        "base_model": base.get("name"),
        "model_type": (card.get("model") or {}).get("model_type") or base.get("model_type"),
        "steps": steps,
        "parameters": sparsity.get("parameters"),
        "sparsity": sparsity.get("fraction"),
        "block_sparsity": sparsity.get("block_fraction"),
        "weights_bytes": sum(int(e.get("bytes", 0)) for n, e in files.items() if n.endswith(".safetensors")),
        "total_bytes": sum(int(e.get("bytes", 0)) for e in files.values()),
        "storage": _storage_name(card),
        "storage_ratio": (card.get("storage") or {}).get("ratio", 1.0),
        "seconds": round(sum(float(entry.get("seconds") or 0.0) for entry in history), 3),
        "created": card.get("created"),
        "secateur_version": card.get("secateur_version"),
    }


SEAL = "card_sha256"  # a digest over the rest of the card, so that an edited card is noticed


def seal(card: dict[str, Any]) -> str:
    """sha256 of the card's canonical JSON (sorted keys, no spaces), the seal itself left out."""
    body = {k: v for k, v in card.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False,
                                     ensure_ascii=False).encode("utf-8")).hexdigest()


__all__ = ["FORMAT_VERSION", "CARD_NAME", "SEAL", "build_card", "card_summary", "sparsity_summary", "seal"]
