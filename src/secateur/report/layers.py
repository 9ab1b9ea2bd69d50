"""Per-layer sparsity and bit width of an artifact, read from its files (never unpickled).

:func:`layer_stats` opens every ``*.safetensors`` file of an artifact directory with
``safetensors.safe_open`` and reads one tensor at a time. A *layer* is a 2-D weight matrix, named by
its module (``model.layers.0.self_attn.q_proj``: the tensor name without ``.weight``); embedding
tables (names with ``embed``, GPT-2's ``wte``/``wpe``) and 1-D tensors (norms, biases) are not
layers. Each storage layout secateur writes or reads is understood:

dense            ``<m>.weight`` float: sparsity = zero entries / entries; bits = the dtype's width
bitmask-v1       ``<m>.weight.bitmask|values|shape``: sparsity = 1 − stored values / (out × in),
                 read from the shapes alone; bits = the values' dtype width
pack-quantized   ``<m>.weight_packed|weight_shape|weight_scale[|weight_zero_point]``: the integers
                 are unpacked (compressed-tensors' own ``unpack_from_int32``); an entry counts as
                 zero when its dequantized value ``(q − zero_point) × scale`` is exactly zero
int-quantized    ``<m>.weight`` int8 + ``<m>.weight_scale``: the same rule on the int8 integers
float-quantized  ``<m>.weight`` float8 + ``<m>.weight_scale``: zero where the FP8 value or its scale is

The bits of a quantized layer come from the card's ``quantization.layers`` (``compression.json``),
else from ``config.json``'s ``quantization_config`` (a compressed-tensors config group that
targets the module), else from the stored integer type (int8: 8, FP8: 8). When a packed layer's
integers cannot be unpacked (compressed-tensors not installed) its sparsity is ``None``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from ..errors import SecateurError

EMBEDDING = re.compile(r"(^|\.)(embed[^.]*|[a-z_]*embeddings|wte|wpe)(\.|$)")
_BITMASK_PARTS = (".bitmask", ".values", ".shape")


def _natural(name: str) -> list[Any]:
    """``layers.10`` after ``layers.2``: digits compare as numbers."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def split_layer(layer: str) -> tuple[Optional[int], str]:
    """``model.layers.3.self_attn.q_proj`` -> ``(3, "self_attn.q_proj")``; ``lm_head`` -> ``(None, "lm_head")``."""
    m = re.search(r"(?:^|\.)(\d+)\.(.+)$", layer)
    return (int(m.group(1)), m.group(2)) if m else (None, layer)


def layer_order(name: str) -> tuple[bool, list[Any]]:
    """The blocks' layers first, block by block (natural order), then the others (``lm_head``)."""
    return split_layer(name)[0] is None, _natural(name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _config_bits(config: dict[str, Any]) -> list[tuple[list[str], int]]:
    """``[(targets, bits)]`` of the compressed-tensors config groups in a ``config.json``."""
    qconfig = config.get("quantization_config") or {}
    out = []
    for group in (qconfig.get("config_groups") or {}).values():
        weights = (group or {}).get("weights") or {}
        if isinstance(weights.get("num_bits"), int):
            out.append(([str(t) for t in group.get("targets") or []], int(weights["num_bits"])))
    return out


def _targets(name: str, targets: list[str]) -> bool:
    for target in targets:
        if target.startswith("re:"):
            if re.match(target[3:], name):
                return True
        elif target == name or target in ("Linear", "QuantLinear"):
            return True
    return False


def _zero_fraction(q: Any, scale: Any, zero_point: Any) -> float:
    """Fraction of ``(q - zero_point) * scale`` that is exactly zero; ``q`` ``[out, in]``, ``scale``
    and ``zero_point`` ``[out, G]`` (or broadcastable ``[out, 1]``/``[1]``); None zero point: 0."""
    import torch

    out, cols = q.shape
    scale = scale.float().reshape(out, -1) if scale.numel() != 1 else scale.float().reshape(1, 1).expand(out, 1)
    groups = scale.shape[1]
    if cols % groups:
        raise SecateurError(f"{cols} input columns do not split into {groups} scale groups")
    qg = q.to(torch.int32).reshape(out, groups, cols // groups)
    if zero_point is None:
        zp = torch.zeros(out, groups, dtype=torch.int32)
    else:
        zp = zero_point.to(torch.int32).reshape(out, -1).expand(out, groups) if zero_point.numel() != 1 \
            else zero_point.to(torch.int32).reshape(1, 1).expand(out, groups)
    zero = (qg == zp.unsqueeze(-1)) | (scale == 0).unsqueeze(-1)
    return float(zero.sum()) / max(q.numel(), 1)


def layer_stats(artifact_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{"sparsity": {layer: fraction of zeros}, "bits": {layer: bits per stored weight}}`` of the
    artifact in ``artifact_dir`` (see the module docstring), layers in natural order. Raises
    :class:`~secateur.errors.SecateurError` when the directory holds no safetensors file."""
    import torch
    from safetensors import safe_open

    directory = Path(artifact_dir)
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        raise SecateurError(f"'{directory}' holds no safetensors weights: layer statistics read an artifact directory")
    card = _read_json(directory / "compression.json")
    quantized = (card.get("quantization") or {}).get("layers") or {}
    card_bits = {name: entry.get("bits") for name, entry in quantized.items() if isinstance(entry, dict)}
    groups = _config_bits(_read_json(directory / "config.json"))

    def quant_bits(module: str, fallback: Optional[int]) -> Optional[int]:
        if isinstance(card_bits.get(module), int):
            return card_bits[module]
        for targets, bits in groups:
            if _targets(module, targets):
                return bits
        return fallback

    try:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    except ImportError:  # the quant extra is not installed: packed layers get bits, not sparsity
        unpack_from_int32 = None

    sparsity: dict[str, Optional[float]] = {}
    bits: dict[str, Optional[int]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())

            def get(key: str) -> Any:
                return f.get_tensor(key)

            for key in sorted(keys):
                if key.endswith(".bitmask") and all(key[:-8] + part in keys for part in _BITMASK_PARTS):
                    weight = key[:-8]
                    module = weight.removesuffix(".weight")
                    if EMBEDDING.search(module):
                        continue
                    shape = [int(n) for n in get(weight + ".shape").tolist()]
                    values = f.get_slice(weight + ".values")
                    total = shape[0] * shape[1] if len(shape) == 2 else 0
                    kept = int(values.get_shape()[0]) if values.get_shape() else 0
                    sparsity[module] = 1.0 - kept / total if total else None
                    bits[module] = _safetensors_bits(values.get_dtype())
                elif key.endswith(".weight_packed"):
                    module = key[: -len(".weight_packed")]
                    bits[module] = quant_bits(module, None)
                    sparsity[module] = None
                    shape_key, scale_key = module + ".weight_shape", module + ".weight_scale"
                    if unpack_from_int32 is None or bits[module] is None or shape_key not in keys \
                            or scale_key not in keys:
                        continue
                    shape = torch.Size(int(n) for n in get(shape_key).tolist())
                    q = unpack_from_int32(get(key), bits[module], shape)
                    scale = get(scale_key)
                    zp = None
                    if module + ".weight_zero_point" in keys:
                        zp_packed = get(module + ".weight_zero_point")
                        groups_ = scale.reshape(shape[0], -1).shape[1] if scale.numel() != 1 else 1
                        zp = unpack_from_int32(zp_packed, bits[module], torch.Size([shape[0], groups_]), packed_dim=0) \
                            if zp_packed.dtype == torch.int32 else zp_packed
                    sparsity[module] = _zero_fraction(q, scale, zp)
                elif key.endswith(".weight"):
                    module = key[: -len(".weight")]
                    if EMBEDDING.search(module) or key + ".bitmask" in keys:
                        continue
                    info = f.get_slice(key)
                    shape = info.get_shape()
                    if len(shape) != 2 or not shape[0] or not shape[1]:
                        continue
                    tensor = get(key)
                    scale_key = module + ".weight_scale"
                    if scale_key in keys and not tensor.is_floating_point():  # int-quantized (W8A8)
                        zp = get(module + ".weight_zero_point") if module + ".weight_zero_point" in keys else None
                        sparsity[module] = _zero_fraction(tensor, get(scale_key), zp)
                        bits[module] = quant_bits(module, tensor.element_size() * 8)
                    elif scale_key in keys and tensor.element_size() == 1:  # float-quantized (FP8)
                        scale = get(scale_key).float().reshape(-1)
                        zero = tensor.float() == 0
                        if scale.numel() in (1, shape[0]):
                            zero = zero | (scale.reshape(-1, 1).expand(shape[0], 1) == 0)
                        sparsity[module] = float(zero.sum()) / tensor.numel()
                        bits[module] = quant_bits(module, 8)
                    elif tensor.is_floating_point():
                        sparsity[module] = float((tensor == 0).sum()) / tensor.numel()
                        bits[module] = tensor.element_size() * 8
    order = sorted(set(sparsity) | set(bits), key=layer_order)
    return {"sparsity": {m: (round(sparsity[m], 6) if sparsity.get(m) is not None else None) for m in order},
            "bits": {m: bits.get(m) for m in order}}


_SAFETENSORS_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "I64": 64, "I32": 32,
                     "I16": 16, "I8": 8, "U8": 8, "BOOL": 8}


def _safetensors_bits(dtype: str) -> Optional[int]:
    return _SAFETENSORS_BITS.get(str(dtype).upper())


__all__ = ["layer_stats"]
