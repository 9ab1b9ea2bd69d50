"""The artifacts room: the only place that reads and writes checkpoints.

An artifact is a directory: safetensors weights that stock ``transformers`` loads, plus
``compression.json`` — the compression card (what was done, on which data, with which code,
what it cost and won; sealed by a digest over its own content and listing every weight file with
its sha256).

- ``checkpoint.py``: :func:`save` (atomic: staged, fsynced, verified, then moved into place),
  :func:`verify`, :func:`load` (``secateur.load``: verify, then read dense, bitmask or
  compressed-tensors weights), :func:`export_dense`;
- ``card.py``: the card — built from the model's lineage record, sealed, summarised;
- ``bitmask.py``: secateur's ``bitmask-v1`` sparse storage;
- ``compressed_tensors.py``: quantized checkpoints in the compressed-tensors format.

Nothing is ever unpickled. This room imports ``models/``, ``runtime/`` and the ground floor,
never a method.
"""

from __future__ import annotations

from .checkpoint import (CARD_NAME, FORMAT_VERSION, Loaded, build_card, card_summary, export_dense, load,
                         load_pretrained, materialize_dense, save, sparsity_summary, verify, weights_hash)

__all__ = ["save", "load", "Loaded", "verify", "export_dense", "materialize_dense", "load_pretrained",
           "build_card", "card_summary", "sparsity_summary", "weights_hash", "CARD_NAME", "FORMAT_VERSION"]
