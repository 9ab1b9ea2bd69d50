"""Loading models: a local directory, a compressed artifact, or a hub id served from the local cache.

    model, tokenizer, arch = secateur.load("path/to/model")

The returned :class:`Loaded` unpacks into those three and also carries ``info`` (where it came
from, the hash of its weight files, and the compression card when it is a secateur artifact).
Nothing is ever unpickled: weights are read from safetensors only.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import SecateurError, one_of
from .arch import ARCHS, ArchFacts, arch_of

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    arch: ArchFacts
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer, self.arch))


def weights_hash(directory: str | os.PathLike) -> str:
    """sha256 over the safetensors files of a model directory, in name order."""
    digest = hashlib.sha256()
    files = sorted(Path(directory).glob("*.safetensors"))
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _resolve(name_or_path: str) -> Path:
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


def load(name_or_path: str | os.PathLike, *, dtype: Any = None) -> Loaded:
    """Load a supported Hugging Face model with its tokenizer and architecture facts."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = _resolve(str(name_or_path))
    card = None
    if (path / "compression.json").exists():
        from ..artifacts import verify

        card = verify(path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in ARCHS:
        raise SecateurError(f"unsupported architecture '{config.model_type}' in '{name_or_path}'; "
                            f"supported model types: {one_of(ARCHS)}")
    kind = ARCHS[config.model_type].kind
    auto = AutoModelForCausalLM if kind == "causal" else AutoModel
    if not list(path.glob("*.safetensors")):
        raise SecateurError(f"'{name_or_path}' has no .safetensors weights; secateur never unpickles .bin files "
                            "(convert them with transformers' save_pretrained(safe_serialization=True))")
    from transformers.utils import logging as hf_logging

    from ..artifacts import load_pretrained  # plain checkpoints and compressed sparse weights
    from ..settings import show_progress

    bars = hf_logging.is_progress_bar_enabled()
    if not show_progress():
        hf_logging.disable_progress_bar()
    try:
        model = load_pretrained(auto, path, dtype=dtype or torch.float32, use_safetensors=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no tokenizer in %s: %s", path, exc)
        tokenizer = None
    info = {"name": str(name_or_path), "path": str(path), "weights_sha256": weights_hash(path),
            "model_type": config.model_type}
    if card is not None:
        info["card"] = card
        info["base_model"] = card.get("base_model")
    model.secateur_source = info
    return Loaded(model, tokenizer, arch_of(model), info)


__all__ = ["Loaded", "load", "weights_hash", "arch_of"]
