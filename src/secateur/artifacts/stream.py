"""Out-of-core (streamed) compression, first part: the block loader and writer the calibration
loop calls through ``Options.block_hooks``.

Before block ``i`` runs, :meth:`BlockStream.load` materialises its weights from the input's
safetensors shards (``safe_open`` memory-maps; every tensor is copied into a fresh tensor, so the
page cache is not the process's memory). After the block is compressed, :meth:`BlockStream.done`
writes it to its own output shard at once (temporary name, fsync, rename) and moves it back to the
meta device, so at most the current block is resident. :func:`skeleton` builds the model on the
meta device and materialises only the non-block parts; :meth:`BlockStream.finish` writes those and
the safetensors index. A run resumes at the first block whose shard is missing (:meth:`done_blocks`).

Not done yet (issue 26 item 1): gathering only the embedding rows the calibration tokens need and
copying embeddings / head in row chunks, the card written from per-block records, the CLI flag /
recipe option and automatic choice, the planner's streamed prediction, the 8B benchmark.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

INDEX = "model.safetensors.index.json"


def _files(path: Path) -> dict[str, Path]:
    """Tensor name → the shard that holds it."""
    index = path / INDEX
    if index.exists():
        return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: no {INDEX} or model.safetensors to stream from")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


def _set(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def _atomic_save(tensors: dict[str, torch.Tensor], target: Path) -> None:
    from safetensors.torch import save_file

    tmp = target.with_name(target.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


class BlockStream:
    """Loads each block from ``source`` before it runs and writes it to ``out`` when it is done."""

    def __init__(self, source: str | os.PathLike, out: str | os.PathLike):
        self.source, self.out = Path(source), Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.where = _files(self.source)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safe_open(str(file), "pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k).clone()  # our own copy, not a view of the mapping
        return out

    def materialise(self, module: nn.Module, prefix: str) -> None:
        names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()
                                                             if f"{prefix}.{n}" in self.where]
        tensors = self.read([f"{prefix}.{n}" for n in names])
        for n in names:
            _set(module, n, tensors[f"{prefix}.{n}"])

    def shard(self, index: int) -> Path:
        return self.out / f"block-{index:05d}.safetensors"

    def done_blocks(self) -> int:
        """How many leading blocks already have a complete output shard (the resume point)."""
        i = 0
        while self.shard(i).exists():
            i += 1
        return i

    # the loop's hooks
    def load(self, index: int, prefix: str, block: nn.Module) -> None:
        self.materialise(block, prefix)

    def done(self, index: int, prefix: str, block: nn.Module) -> None:
        state = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
        _atomic_save(state, self.shard(index))
        block.to("meta")

    def finish(self, model: nn.Module, block_prefix: str) -> None:
        """Writes the non-block tensors and the index over every shard."""
        rest = {k: v for k, v in model.state_dict().items()
                if not k.startswith(block_prefix + ".") and v.device.type != "meta"}
        seen: set[int] = set()
        for k in list(rest):  # a tied head shares the embedding's storage: written once, as transformers does
            if rest[k].data_ptr() in seen:
                del rest[k]
            else:
                seen.add(rest[k].data_ptr())
        _atomic_save(rest, self.out / "rest.safetensors")
        weight_map: dict[str, str] = {}
        from safetensors import safe_open

        for file in sorted(self.out.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                weight_map.update({k: file.name for k in f.keys()})
        import shutil

        for extra in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "tokenizer.model"):
            if (self.source / extra).exists():
                shutil.copyfile(self.source / extra, self.out / extra)
        (self.out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def skeleton(source: str | os.PathLike, stream: BlockStream, block_prefix: str) -> nn.Module:
    """The model from ``source``'s config on the meta device, with every non-block tensor real."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(source))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    small = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(source), num_hidden_layers=0))
    model.load_state_dict(small.state_dict(), strict=False, assign=True)  # rotary buffers etc. real
    for name, buf in small.named_buffers():
        _set(model, name, buf)
    names = [k for k in model.state_dict() if not k.startswith(block_prefix + ".") and k in stream.where]
    tensors = stream.read(names)
    model.load_state_dict(tensors, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


# Methods whose whole work happens inside the calibration loop, block by block (tested streamed).
STREAMS = ("gptq", "sparsegpt", "wanda")


def check_streamable(steps: list[Any]) -> None:
    """A one-line error for the first step that cannot run streamed."""
    from ..errors import SecateurError

    for i, step in enumerate(steps):
        method = getattr(step, "method", type(step).__name__)
        if method not in STREAMS:
            raise SecateurError(f"steps[{i}]: method '{method}' cannot run streamed (block by block from disk); "
                                f"streamed methods: {', '.join(STREAMS)}")
