"""The models room: the architecture table (``arch.py``), how a layer holds its weight
(``layers.py``), structured surgery from the table (``structure.py``), the llama2.c import, and
finding a model directory by path or hub id (:func:`resolve`). Loading weights, compressed or not,
is the artifacts room's: ``secateur.load`` (:func:`secateur.artifacts.load`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SecateurError
from .arch import ARCHS, ArchFacts, arch_of


def resolve(name_or_path: str) -> Path:
    """A local directory, or the snapshot of a hub id in the local Hugging Face cache."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SecateurError(f"model path '{name_or_path}' is a file; expected a model directory with config.json")
        if not (path / "config.json").exists():
            raise SecateurError(f"'{name_or_path}' has no config.json; expected a Hugging Face model directory "
                                "or a secateur artifact")
        return path
    looks_like_hub_id = name_or_path.count("/") <= 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise SecateurError(f"model path '{name_or_path}' does not exist")
    try:
        from huggingface_hub import snapshot_download

        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        snapshot = snapshot_download(name_or_path, local_files_only=offline,
                                     allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as exc:  # the hub raises many kinds; the user needs one line
        raise SecateurError(f"model '{name_or_path}' is neither a local directory nor available from the Hugging Face "
                            f"hub or its local cache ({type(exc).__name__})") from None
    return Path(snapshot)


__all__ = ["resolve", "arch_of", "ARCHS", "ArchFacts"]
