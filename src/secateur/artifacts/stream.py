"""Out-of-core (streamed) compression: a model larger than memory, compressed block by block.

The calibration loop calls a :class:`BlockStream` through ``Options.block_hooks``. Before block
``i`` runs, :meth:`BlockStream.load` materialises its weights from the input's safetensors shards
(with plain file reads into fresh tensors: nothing is memory-mapped, so no file page counts as
resident memory).
After the block is compressed, :meth:`BlockStream.done` writes it, in the artifact's own layout
(compressed-tensors tensors for quantized layers, bitmask storage for pruned ones when asked),
to its own shard (temporary name, fsync, rename) with a small JSON record beside it, and moves it
back to the meta device: at most the current block is resident.

:func:`skeleton` builds the model on the meta device with only the small non-block tensors real.
The input embedding keeps only the rows the calibration tokens use (:func:`compact_ids` renumbers
the tokens to match), and the output head stays on meta: calibration stops before it. At the end
:meth:`BlockStream.finish` copies the embedding and the head (and every other non-block tensor,
which streamed methods never change) from the input to the output in row chunks, writes
``config.json`` (with the compressed-tensors ``quantization_config`` when layers were quantized),
the tokenizer files, the shard index and the card (its sparsity and quantization entries summed
from the per-block records), and renames the folder into place as an ordinary artifact.

A killed run resumes: the calibration loop's checkpoint keeps the next block's inputs (not the
weights: the written shards are those), and the run continues at the first block not written.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

INDEX = "model.safetensors.index.json"
REST = "rest.safetensors"
CHUNK_BYTES = 64 << 20       # row chunks of the embedding and head copied to the output
EXTRA_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "vocab.txt", "merges.txt", "vocab.json", "chat_template.jinja")


def _files(path: Path) -> dict[str, Path]:
    """Tensor name → the shard that holds it."""
    index = path / INDEX
    if index.exists():
        return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.exists():
        from ..errors import SecateurError

        raise SecateurError(f"{path}: no {INDEX} or model.safetensors to stream from (streaming reads a "
                            "safetensors checkpoint directory)")
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


def _atomic_save(tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = target.with_name(target.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt", **(metadata or {})})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _atomic_json(data: Any, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)


# --- a safetensors file written tensor by tensor, chunk by chunk ----------------------------------
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_chunked(target: Path, entries: list[tuple[str, torch.dtype, list[int], Any]]) -> None:
    """Write a safetensors file whose tensors arrive in pieces: ``entries`` are ``(name, dtype,
    shape, chunks)`` with ``chunks`` an iterable of tensors that concatenate (along dim 0) to the
    tensor. Only one chunk is in memory at a time; the file is written under a temporary name,
    fsync'd and renamed, and any reader of the format (safetensors, transformers) opens it."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, _ in entries:
        nbytes = _nbytes(dtype, shape)
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for name, dtype, shape, chunks in entries:
            written = 0
            for chunk in chunks:
                if chunk.dtype != dtype:
                    raise ValueError(f"{name}: a chunk of {chunk.dtype}, expected {dtype}")
                data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
                fh.write(memoryview(data))
                written += data.nbytes
            end, start = header[name]["data_offsets"][1], header[name]["data_offsets"][0]
            if written != end - start:
                raise ValueError(f"{name}: {written} bytes written, {end - start} expected")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)


_FROM_NAME = {v: k for k, v in _DTYPES.items()}


def _nbytes(dtype: torch.dtype, dims: list[int]) -> int:
    """Bytes of a tensor of ``dtype`` with these dimensions (a row's: pass ``shape[1:]``)."""
    size = torch.empty(0, dtype=dtype).element_size()
    for n in dims:
        size *= n
    return size


def _header(file: Path) -> tuple[int, dict[str, Any]]:
    """(where the data starts, the header) of a safetensors file."""
    with open(file, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return 8 + size, json.loads(fh.read(size))


def _read_rows(file: Path, start: int, entry: dict[str, Any], first: int, last: int) -> torch.Tensor:
    """Rows ``first:last`` of one tensor, read with plain file reads into a fresh tensor: nothing
    is memory-mapped, so no file page is ever counted in this process's resident memory."""
    dtype, shape = _FROM_NAME[entry["dtype"]], list(entry["shape"])
    row = _nbytes(dtype, shape[1:])
    out = torch.empty([last - first] + shape[1:] if shape else [], dtype=dtype)
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    with open(file, "rb", buffering=0) as fh:
        fh.seek(start + entry["data_offsets"][0] + first * row)
        done = 0
        while done < len(view):
            got = fh.readinto(view[done:])
            if not got:
                raise OSError(f"{file}: ended inside tensor data")
            done += got
    return out


def _row_chunks(file: Path, name: str) -> tuple[torch.dtype, list[int], Iterator[torch.Tensor]]:
    """(dtype, shape, chunks of rows) of tensor ``name`` in ``file``, read ``CHUNK_BYTES`` at a time."""
    start, header = _header(file)
    entry = header[name]
    shape, dtype = list(entry["shape"]), _FROM_NAME[entry["dtype"]]

    def chunks() -> Iterator[torch.Tensor]:
        if len(shape) == 0:
            yield _read_rows(file, start, entry, 0, 1)
            return
        step = max(1, CHUNK_BYTES // max(_nbytes(dtype, shape[1:]), 1))
        for first in range(0, shape[0], step):
            yield _read_rows(file, start, entry, first, min(first + step, shape[0]))

    return dtype, shape, chunks()


def _trim() -> None:
    """Hand the allocator's freed memory back to the system (glibc ``malloc_trim``). A block's
    tensors under glibc's mmap threshold are freed into its heap, which otherwise keeps the pages:
    without this, a streamed run's resident memory grows by about a block's small tensors per
    block, though no tensor outlives its block (measured on a 16-block model: +12 MiB a block)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once (finding libc may run ``ldconfig``); None elsewhere."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


# --- the loop's hooks -------------------------------------------------------------------------------
class BlockStream:
    """Loads each block from ``source`` before it runs and writes it to ``out`` when it is done.

    ``sparse`` is the artifact storage mode (``"none"``, ``"auto"``, ``"bitmask"``, as in
    :func:`secateur.save`): pruned projection weights are written as bitmask + values when asked."""

    def __init__(self, source: str | os.PathLike, out: str | os.PathLike, sparse: str = "none"):
        from .bitmask import MODES

        if sparse not in MODES:
            raise ValueError(f"sparse={sparse!r}; expected one of {', '.join(MODES)}")
        self.source, self.out, self.sparse = Path(source), Path(out), sparse
        self.out.mkdir(parents=True, exist_ok=True)
        self.where = _files(self.source)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            start, header = _header(file)
            for k in keys:  # plain reads into our own tensors: no mapping counted as resident memory
                entry = header[k]
                out[k] = _read_rows(file, start, entry, 0, entry["shape"][0] if entry["shape"] else 1)
        return out

    def materialise(self, module: nn.Module, prefix: str) -> None:
        names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()
                                                             if f"{prefix}.{n}" in self.where]
        tensors = self.read([f"{prefix}.{n}" for n in names])
        for n in names:
            _set(module, n, tensors[f"{prefix}.{n}"])

    @property
    def scratch_dir(self) -> Path:
        """Where the calibration loop may keep a statistic on disk for a moment (a spilled XᵀX)."""
        return self.out / ".scratch"

    def shard(self, index: int) -> Path:
        return self.out / f"block-{index:05d}.safetensors"

    def record(self, index: int) -> Path:
        return self.out / f".block-{index:05d}.json"

    def done_blocks(self) -> int:
        """How many leading blocks already have a complete output shard (the resume point)."""
        i = 0
        while self.shard(i).exists() and self.record(i).exists():
            i += 1
        return i

    def load(self, index: int, prefix: str, block: nn.Module) -> None:
        self.materialise(block, prefix)

    def dense_weight(self, name: str, module: nn.Module) -> torch.Tensor:
        """The module's weight as the input holds it (the calibration loop's error reference; the
        streamed methods change no weight before they compress it), read when needed."""
        from ..models.layers import is_transposed

        weight = self.read([f"{name}.weight"])[f"{name}.weight"]
        return weight.t() if is_transposed(module) else weight

    def done(self, index: int, prefix: str, block: nn.Module, result: dict[str, Any] | None = None) -> None:
        """Write the finished block (the artifact's layout) and its record (with ``result``, what a
        data-free method reported for this block), then free it."""
        from ..models.layers import is_projection
        from . import bitmask
        from .compressed_tensors import describe, is_quantized, module_tensors, scheme_of

        quantized = {n: m for n, m in block.named_modules() if n and is_quantized(m)}
        prefixes = tuple(f"{n}." for n in quantized)
        tensors = {f"{prefix}.{k}": v for k, v in block.state_dict().items() if not k.startswith(prefixes)}
        for name, module in quantized.items():
            tensors.update({f"{prefix}.{name}.{k}": v for k, v in module_tensors(module, scheme_of(module)).items()})
        zeros = weights = 0
        projections = {f"{prefix}.{n}.weight" for n, m in block.named_modules() if is_projection(m)}
        for key in projections & set(tensors):
            zeros += int((tensors[key] == 0).sum())
            weights += tensors[key].numel()
        dense_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        moved = 0
        if self.sparse != "none":
            for key in sorted(projections & set(tensors)):
                weight = tensors[key]
                if weight.dim() == 2 and weight.is_floating_point() and (
                        self.sparse == "bitmask" or bitmask.zero_fraction(weight) >= bitmask.MIN_ZEROS):
                    tensors.update({f"{key}.{part}": v for part, v in bitmask.encode(weight).items()})
                    tensors[key] = torch.empty(0, dtype=weight.dtype)
                    moved += 1
        record = {"zeros": zeros, "weights": weights, "dense_bytes": dense_bytes, "sparse_modules": moved,
                  "result": result,
                  "quantization": {f"{prefix}.{k}": v for k, v in describe(block)["layers"].items()} if quantized else {}}
        _atomic_json(record, self.record(index))
        _atomic_save(tensors, self.shard(index), {bitmask.METADATA_KEY: bitmask.FORMAT} if moved else None)
        block.to("meta")
        del tensors
        _trim()

    # --- the end of a run: the rest of the model, the config, the card, the rename ---------------
    def records(self, blocks: int) -> list[dict[str, Any]]:
        return [json.loads(self.record(i).read_text()) for i in range(blocks)]

    def _write_rest(self, block_prefix: str) -> None:
        names = sorted(n for n in self.where if not n.startswith(block_prefix + "."))
        entries = []
        for name in names:
            dtype, shape, chunks = _row_chunks(self.where[name], name)
            entries.append((name, dtype, shape, chunks))
        write_chunked(self.out / REST, entries)

    def _write_index(self) -> None:
        from safetensors import safe_open

        weight_map: dict[str, str] = {}
        for file in sorted(self.out.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                weight_map.update({k: file.name for k in f.keys()})
        total = sum(p.stat().st_size for p in self.out.glob("*.safetensors"))
        _atomic_json({"metadata": {"total_size": total}, "weight_map": weight_map}, self.out / INDEX)

    def finish(self, model: nn.Module, block_prefix: str, target: str | os.PathLike | None = None, *,
               recipe: Any = None, metrics: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> Path:
        """Write the non-block tensors, ``config.json``, the tokenizer files and the index; with
        ``target``, also the card, and rename the folder into place as the artifact ``target``."""
        blocks = len(model.get_submodule(block_prefix))
        if self.done_blocks() < blocks:
            from ..errors import SecateurError

            raise SecateurError(f"{self.out}: {self.done_blocks()} of {blocks} blocks are written; the run is "
                                "not finished")
        self._write_rest(block_prefix)
        config = json.loads((self.source / "config.json").read_text())
        config.pop("quantization_config", None)
        from .compressed_tensors import has_quantized, quantization_config

        if has_quantized(model):
            schemes = {k: v for r in self.records(blocks) for k, v in r["quantization"].items()}
            config["quantization_config"] = quantization_config(model, schemes)
        _atomic_json(config, self.out / "config.json")
        for extra_file in EXTRA_FILES:
            if (self.source / extra_file).exists():
                shutil.copyfile(self.source / extra_file, self.out / extra_file)
        self._write_index()
        if target is None:
            return self.out
        return self._install(model, block_prefix, Path(target).expanduser().absolute(), blocks,
                             recipe=recipe, metrics=metrics, extra=extra)

    def _install(self, model: nn.Module, block_prefix: str, target: Path, blocks: int, **card_args: Any) -> Path:
        from .card import build_card
        from .checkpoint import _check_target, install
        from .bitmask import storage_entry

        embedding = model.get_input_embeddings()
        full = self.source_shape(f"{_name_of(model, embedding)}.weight")
        embedding.weight = nn.Parameter(torch.empty(full, device="meta"), requires_grad=False)  # the card's shapes
        if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
            model.tie_weights()
        records = self.records(blocks)
        rest = self._rest_counts(model, block_prefix)
        zeros = sum(r["zeros"] for r in records) + rest["zeros"]
        weights = sum(r["weights"] for r in records) + rest["weights"]
        block_zeros, block_weights = sum(r["zeros"] for r in records), sum(r["weights"] for r in records)
        from ..models.arch import count_parameters

        sparsity = {"fraction": round(zeros / weights, 6) if weights else 0.0, "zeros": zeros, "weights": weights,
                    "block_fraction": round(block_zeros / block_weights, 6) if block_weights else None,
                    "parameters": count_parameters(model)}
        card = build_card(model, sparsity=sparsity, **card_args)
        files = sorted(self.out.glob("*.safetensors"))
        stored = sum(p.stat().st_size for p in files)
        moved = sum(r["sparse_modules"] for r in records)
        dense = sum(r["dense_bytes"] for r in records) + (self.out / REST).stat().st_size
        card["storage"] = storage_entry("bitmask-v1" if moved else "dense", moved, dense if moved else stored, stored,
                                        min_zeros=0.3 if self.sparse == "auto" else None)
        layers = {k: v for r in records for k, v in r["quantization"].items()}
        if layers:
            from .compressed_tensors import layer_totals

            card["quantization"] = {**layer_totals(layers), "weights_bytes": stored, "stock_transformers": True}
        card["streamed"] = {"blocks": blocks, "source": str(self.source)}
        for stale in self.out.glob(".block-*.json"):
            stale.unlink()
        shutil.rmtree(self.scratch_dir, ignore_errors=True)
        _check_target(target)
        install(self.out, target, card)
        return target

    def source_shape(self, name: str) -> list[int]:
        return list(_header(self.where[name])[1][name]["shape"])

    def _rest_counts(self, model: nn.Module, block_prefix: str) -> dict[str, int]:
        """Zeros and entries of the projection weights outside the blocks (the head), read in chunks."""
        from ..models.layers import is_projection

        zeros = weights = 0
        head = model.get_output_embeddings()
        for name, module in model.named_modules():
            key = f"{name}.weight"
            if module is head and key not in self.where:  # a tied head: its weight is the embedding's
                key = f"{_name_of(model, model.get_input_embeddings())}.weight"
            if not name or name.startswith(block_prefix + ".") or not is_projection(module) or key not in self.where:
                continue
            for chunk in _row_chunks(self.where[key], key)[2]:
                zeros += int((chunk == 0).sum())
                weights += chunk.numel()
        return {"zeros": zeros, "weights": weights}


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


# --- the model on the meta device ---------------------------------------------------------------
def compact_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, renumbered)``: the sorted distinct token ids, and ``ids`` as indices into them."""
    rows = torch.unique(ids)
    return rows, torch.searchsorted(rows, ids)


def skeleton(source: str | os.PathLike, stream: BlockStream, block_prefix: str | None = None,
             rows: torch.Tensor | None = None) -> nn.Module:
    """The model from ``source``'s config on the meta device, with the small non-block tensors
    real. With ``rows`` (from :func:`compact_ids`), the input embedding holds only those rows and
    the output head stays on meta; without, both are read whole (small models, tests)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(source))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # rotary frequencies and other non-persistent buffers, from a copy with no blocks and one token
    small = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(source), num_hidden_layers=0,
                                                                        vocab_size=1))
    for name, buf in small.named_buffers():
        _set(model, name, buf)
    del small
    if block_prefix is None:
        from ..models.arch import arch_of

        block_prefix = arch_of(model).arch.block_prefix(model)
    skip: set[str] = set()
    if rows is not None:
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        emb_name = f"{_name_of(model, embedding)}.weight"
        skip.add(emb_name)
        if head is not None:
            skip.add(f"{_name_of(model, head)}.weight")
        file = stream.where[emb_name]
        start, header = _header(file)
        picked = torch.cat([_read_rows(file, start, header[emb_name], r, r + 1) for r in rows.tolist()])
        embedding.weight = nn.Parameter(picked, requires_grad=False)
    names = [k for k in model.state_dict() if not k.startswith(block_prefix + ".") and k in stream.where
             and k not in skip]
    model.load_state_dict(stream.read(names), strict=False, assign=True)
    if rows is None and getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


# Methods whose whole work happens inside the calibration loop, block by block (tested streamed).
STREAMS = ("gptq", "sparsegpt", "wanda")
# Data-free methods whose modules are independent: applied to one block's modules at a time.
PER_BLOCK = ("rtn", "magnitude")


def check_streamable(steps: list[Any]) -> None:
    """A one-line error for the first step that cannot run streamed."""
    from ..errors import SecateurError

    for i, step in enumerate(steps):
        method = getattr(step, "method", type(step).__name__)
        if method not in STREAMS + PER_BLOCK:
            raise SecateurError(f"steps[{i}]: method '{method}' cannot run streamed (block by block from disk); "
                                f"streamed methods: {', '.join(STREAMS + PER_BLOCK)}")
        if getattr(step, "scope", None) == "global":
            raise SecateurError(f"steps[{i}]: scope 'global' ranks every weight of the model at once, which a "
                                "streamed run never holds; use scope 'row' or 'matrix'")
