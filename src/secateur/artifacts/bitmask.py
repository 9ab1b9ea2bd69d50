"""Compressed storage of sparse weights: secateur's ``bitmask-v1`` safetensors layout.

A pruned matrix is mostly zeros, yet a dense checkpoint spends the full dtype width on every one
of them. In ``bitmask-v1`` a sparse 2-D weight ``W`` ``[out, in]`` named ``<name>`` is stored as

    <name>.bitmask   uint8 [out, ceil(in / 8)]   bit j of row i set where W[i, j] is kept;
                                                 row-major, most significant bit first
                                                 (``numpy.packbits(keep, axis=1)``)
    <name>.values    W's dtype [n_kept]          the kept entries in row-major order
    <name>.shape     int64 [2]                   [out, in]
    <name>           W's dtype [0]               an empty placeholder (see below)

in the same safetensors file, whose metadata then reads
``{"format": "pt", "secateur_sparse": "bitmask-v1"}``. Every other tensor stays dense. "Kept" is
``W != 0`` (NaNs included), so decoding gives back every stored bit, with one exception: a
negative zero comes back as ``+0.0``. The two compare equal and give the same results (a
pruning step that multiplies by a 0/1 mask turns negative weights into ``-0.0``; keeping
their sign would cost a second bitmask for nothing). At 50% sparsity in float32 the matrix takes
1/32 (mask) + 1/2 (values) of its dense bytes.

The empty placeholder is there for loaders that do not know the format. Without it, stock
``transformers.from_pretrained`` would report the weight as missing and initialise it at random
with only a warning; with it, the shapes disagree and it raises. Load such a directory with
:func:`secateur.load`, or convert it once with :func:`secateur.artifacts.export_dense`.

This module is the format only (tensor in, tensors out; file in, file out); choosing which
weights to compress and keeping the compression card right is :mod:`secateur.artifacts`' job.
compressed-tensors' own ``sparse-bitmask`` format was the first choice, but compressed-tensors
0.15 and later (the versions transformers 5 accepts) no longer ship its sparse compressors.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = "bitmask-v1"
METADATA_KEY = "secateur_sparse"
MODES = ("auto", "bitmask", "none")
MIN_ZEROS = 0.3
"""In ``auto`` mode a weight is stored compressed when at least this fraction of it is zero.
Compression pays off from 1/32 zeros in float32 (1/16 in 16-bit); 0.3 keeps the format to weights
that were actually pruned, where it saves at least a quarter of their bytes."""

INDEX_NAME = "model.safetensors.index.json"
_PARTS = ("bitmask", "values", "shape")


# --- the format: tensor in, tensors out --------------------------------------------------------

def keep_mask(weight: torch.Tensor) -> torch.Tensor:
    """True where an entry must be stored: everything but the zeros (of either sign)."""
    return weight != 0


def zero_fraction(weight: torch.Tensor) -> float:
    return float((~keep_mask(weight)).sum()) / max(weight.numel(), 1)


def encode(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"bitmask", "values", "shape"}`` of a 2-D tensor (see the module docstring)."""
    if weight.dim() != 2:
        raise ValueError(f"bitmask storage needs a 2-D weight, got shape {tuple(weight.shape)}")
    weight = weight.detach().cpu()
    keep = keep_mask(weight)
    bitmask = torch.from_numpy(np.packbits(keep.numpy(), axis=1))
    return {"bitmask": bitmask, "values": weight[keep].contiguous(),
            "shape": torch.tensor(list(weight.shape), dtype=torch.int64)}


def decode(bitmask: torch.Tensor, values: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """The dense tensor that :func:`encode` packed; raises ``ValueError`` when the parts disagree."""
    rows, cols = (int(n) for n in shape.tolist())
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, (cols + 7) // 8):
        raise ValueError(f"bitmask of shape {tuple(bitmask.shape)} and dtype {bitmask.dtype} does not fit a "
                         f"[{rows}, {cols}] weight")
    keep = torch.from_numpy(np.unpackbits(bitmask.numpy(), axis=1, count=cols).astype(bool))
    if int(keep.sum()) != values.numel():
        raise ValueError(f"bitmask marks {int(keep.sum())} entries but {values.numel()} values are stored")
    dense = torch.zeros((rows, cols), dtype=values.dtype)
    dense[keep] = values
    return dense


# --- files -------------------------------------------------------------------------------------

def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The top-level safetensors files of a model directory, in name order."""
    return sorted(Path(directory).glob("*.safetensors"))


def file_format(path: str | os.PathLike) -> str | None:
    """``"bitmask-v1"`` when the safetensors file at ``path`` holds compressed weights, else None."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as fh:
        return (fh.metadata() or {}).get(METADATA_KEY)


def is_sparse(directory: str | os.PathLike) -> bool:
    """Whether any weight file of ``directory`` uses compressed storage (reads headers only)."""
    found = [name for name in map(file_format, weight_files(directory)) if name is not None]
    unknown = sorted(set(found) - {FORMAT})
    if unknown:
        raise ValueError(f"{directory} stores weights as {unknown[0]!r}, which this secateur does not read "
                         f"(it reads {FORMAT!r}); upgrade secateur")
    return bool(found)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}, dict(fh.metadata() or {})


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Replace ``path`` by a new file (written beside it, then renamed: the old one may be mapped)."""
    from safetensors.torch import save_file

    part = path.with_name(path.name + ".part")
    save_file(tensors, os.fspath(part), metadata=metadata)
    _sort_metadata(part)
    os.replace(part, path)


def _sort_metadata(path: Path) -> None:
    """Write the header's ``__metadata__`` keys in sorted order, so that equal weights give equal
    bytes (safetensors writes them in hash-map order, which changes from run to run). The header
    keeps its length, so no offset moves."""
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size)
        header = json.loads(raw)
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) != len(raw.rstrip(b" ")):  # not the compact form expected: leave the file alone
            return
        fh.seek(8)
        fh.write(text.ljust(size, b" "))


def densify(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every compressed weight decoded back to its dense tensor."""
    sparse = [key[: -len(".bitmask")] for key in tensors if key.endswith(".bitmask")
              and all(f"{key[: -len('.bitmask')]}.{part}" in tensors for part in _PARTS)]
    out = dict(tensors)
    for name in sparse:
        try:
            out[name] = decode(*(out.pop(f"{name}.{part}") for part in _PARTS))
        except ValueError as exc:
            raise ValueError(f"compressed weight '{name}': {exc}") from None
    return out


def read_dense(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense state dict stored in the top-level safetensors files of ``directory``."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        tensors, metadata = _read(path)
        state.update(densify(tensors) if metadata.get(METADATA_KEY) else tensors)
    return state


def compress_files(directory: str | os.PathLike, eligible: set[str], mode: str = "auto") -> dict[str, Any]:
    """Rewrite the safetensors files of ``directory`` in place, storing the weights named in
    ``eligible`` as bitmasks (``auto``: those with at least :data:`MIN_ZEROS` zeros; ``bitmask``:
    all of them; ``none``: none), and return the card's ``storage`` entry."""
    if mode not in MODES:
        raise ValueError(f"sparse={mode!r} is not a storage mode; expected one of {', '.join(map(repr, MODES))}")
    root = Path(directory)
    files = weight_files(root)
    dense_bytes = sum(p.stat().st_size for p in files)
    moved: dict[str, str] = {}  # compressed weight -> its file
    for path in files if mode != "none" else []:
        tensors, metadata = _read(path)
        chosen = [key for key, t in tensors.items()
                  if key in eligible and t.dim() == 2 and t.is_floating_point()
                  and not any(f"{key}.{part}" in tensors for part in _PARTS)
                  and (mode == "bitmask" or zero_fraction(t) >= MIN_ZEROS)]
        if not chosen:
            continue
        for key in chosen:
            weight = tensors[key]
            tensors.update({f"{key}.{part}": value for part, value in encode(weight).items()})
            tensors[key] = torch.empty(0, dtype=weight.dtype)
            moved[key] = path.name
        _write(path, tensors, {**metadata, "format": "pt", METADATA_KEY: FORMAT})
    if moved and (root / INDEX_NAME).is_file():
        _rewrite_index(root, moved)
    stored = sum(p.stat().st_size for p in files)
    if moved:
        log.info("stored %d sparse weights as %s: %d -> %d weight bytes (%.3f)", len(moved), FORMAT, dense_bytes,
                 stored, stored / max(dense_bytes, 1))
    return storage_entry(FORMAT if moved else "dense", len(moved), dense_bytes, stored,
                         min_zeros=MIN_ZEROS if mode == "auto" else None)


def storage_entry(fmt: str, sparse_modules: int, dense_bytes: int, stored: int, **more: Any) -> dict[str, Any]:
    return {"format": fmt, "sparse_modules": sparse_modules, "dense_bytes": dense_bytes, "bytes": stored,
            "ratio": round(stored / dense_bytes, 6) if dense_bytes else 1.0, **more}


def _rewrite_index(root: Path, moved: dict[str, str]) -> None:
    """Point the shard index at the compressed parts too (the placeholder keeps its own entry)."""
    index = json.loads((root / INDEX_NAME).read_text(encoding="utf-8"))
    weight_map = index.setdefault("weight_map", {})
    for key, file in moved.items():
        weight_map.update({f"{key}.{part}": file for part in _PARTS})
    index["weight_map"] = dict(sorted(weight_map.items()))
    (root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def write_dense_copy(src: Path, dst: Path) -> None:
    """Write the safetensors file ``src`` to ``dst`` with every compressed weight decoded."""
    tensors, metadata = _read(src)
    if metadata.pop(METADATA_KEY, None) is not None:
        tensors = densify(tensors)
    _write(dst, tensors, {**metadata, "format": "pt"})


def dense_index(index: dict[str, Any]) -> dict[str, Any]:
    """A shard index without the entries of compressed parts."""
    weight_map = index.get("weight_map") or {}
    parts = tuple(f".{part}" for part in _PARTS)
    bases = {key[: -len(".bitmask")] for key in weight_map if key.endswith(".bitmask")}
    keep = {k: v for k, v in weight_map.items()
            if not (k.endswith(parts) and k.rsplit(".", 1)[0] in bases)}
    return {**index, "weight_map": keep}


__all__ = ["FORMAT", "METADATA_KEY", "MIN_ZEROS", "MODES", "encode", "decode", "densify", "read_dense",
           "compress_files", "is_sparse", "file_format", "zero_fraction"]
