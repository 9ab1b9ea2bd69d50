"""The artifact store: every registered directory is kept once, under its content hash.

    objects/<key>/            a complete copy of an artifact directory, files read-only
    objects/.tmp-<pid>-<hex>/ a copy being written (never under a final name)

**The key** is the sha256 of the directory's manifest: one line ``<sha256> <bytes> <path>\\n`` per
file, in path order (POSIX relative paths), the way ``sha256sum`` lists a tree. Two directories
with the same files and the same bytes have the same key whatever their names or times; any
changed byte, added or removed file changes it. For a secateur artifact the card is one of those
files, so the key covers the card (its ``weights_sha256``, its seal) and every weight file.

**Writing** (:func:`stage`) copies the directory into a hidden temporary sibling, hashing each
file as it is written and fsyncing it, compares the source's size and hash after the copy (a
directory modified while it was read is refused), runs :func:`secateur.artifacts.verify` on the
copy when it has a card, and returns it. :func:`install` then renames it to ``objects/<key>`` (a
rename is atomic: an object is complete under its final name or absent) and fsyncs ``objects/``;
when the key is already there the copy is dropped and the stored object reused. The registry
calls :func:`install` inside its write transaction, so that :func:`collect` (the garbage
collector, also inside one) never removes an object a commit is about to reference.

A process killed while copying leaves only ``.tmp-<pid>-…``; :func:`collect` removes those whose
process is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..artifacts.checkpoint import _fsync_dir
from .db import RegistryError

log = logging.getLogger(__name__)

OBJECTS = "objects"
CARD_NAME = "compression.json"  # the same name secateur.artifacts writes (checked by a test)
_CHUNK = 1 << 20
SKIP = {".git", ".cache", "__pycache__"}  # never part of a model: version control, hub download locks


@dataclass
class Staged:
    """A complete, fsynced copy of a directory in a temporary folder, with what the copy measured."""

    tmp: Path
    key: str
    files: dict[str, dict[str, Any]]  # relative path -> {"sha256", "bytes"}
    weights_sha256: str  # over the top-level safetensors files, as secateur.artifacts.weights_hash
    card: dict[str, Any] | None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(int(e["bytes"]) for e in self.files.values())


def _sources(root: Path) -> list[tuple[str, Path]]:
    """Every regular file under ``root`` (symbolic links followed, as in a hub snapshot), by path."""
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP)
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file():
                out.append((path.relative_to(root).as_posix(), path))
    return sorted(out)


def _copy_file(src: Path, dst: Path) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` (fsynced), returning the sha256 and size of the bytes written."""
    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(_CHUNK), b""):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest(), size


def manifest_key(files: dict[str, dict[str, Any]]) -> str:
    """The store key of a tree: sha256 of its ``<sha256> <bytes> <path>`` lines, in path order."""
    lines = "".join(f"{files[p]['sha256']} {files[p]['bytes']} {p}\n" for p in sorted(files))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def weights_sha256(files: dict[str, dict[str, Any]], root: Path) -> str:
    """sha256 over the top-level safetensors files in name order (names, then bytes): the hash
    :func:`secateur.artifacts.weights_hash` computes and a card records."""
    digest = hashlib.sha256()
    for rel in sorted(p for p in files if "/" not in p and p.endswith(".safetensors")):
        digest.update(rel.encode())
        with open(root / rel, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def tmp_name() -> str:
    return f".tmp-{os.getpid()}-{secrets.token_hex(6)}"


def stage(source: Path, objects: Path) -> Staged:
    """Copy ``source`` into a new temporary folder under ``objects`` and check the copy; the caller
    installs it (:func:`install`) or drops it (:func:`discard`)."""
    from .. import artifacts

    if not source.is_dir():
        raise RegistryError(f"cannot add {source}: it is not a directory (expected an artifact or a model "
                            "directory with config.json)")
    entries = _sources(source)
    names = {rel for rel, _ in entries}
    if "config.json" not in names:
        raise RegistryError(f"cannot add {source}: it has no config.json (expected a secateur artifact or a "
                            "Hugging Face / llm-compressor checkpoint)")
    if not any(rel.endswith(".safetensors") and "/" not in rel for rel in names):
        found = sorted(rel for rel in names if rel.endswith((".bin", ".pt", ".pth")))
        hint = f" (it holds {', '.join(found[:3])}: convert with save_pretrained(safe_serialization=True))" \
            if found else ""
        raise RegistryError(f"cannot add {source}: it has no .safetensors weights{hint}")
    objects.mkdir(parents=True, exist_ok=True)
    tmp = objects / tmp_name()
    tmp.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        for rel, src in entries:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            before = src.stat().st_size
            sha, size = _copy_file(src, dst)
            if size != before or src.stat().st_size != size:
                raise RegistryError(f"cannot add {source}: {rel} changed while it was copied; add it again "
                                    "when nothing writes to it")
            files[rel] = {"sha256": sha, "bytes": size}
        for sub in sorted({(tmp / rel).parent for rel in files}, reverse=True):
            _fsync_dir(sub)
        card = None
        if CARD_NAME in files:
            card = artifacts.verify(tmp)  # the copy, not the source: what is stored is what was checked
        config = _read_json(tmp / "config.json", source)
        staged = Staged(tmp, manifest_key(files), files, weights_sha256(files, tmp), card, config)
        if card is not None and card.get("weights_sha256") not in (None, staged.weights_sha256):
            raise RegistryError(f"cannot add {source}: its card records weights_sha256 "
                                f"{str(card.get('weights_sha256'))[:12]}… but its weights hash to "
                                f"{staged.weights_sha256[:12]}…; re-create the artifact")
        for rel in files:  # stored objects are read-only: nothing edits a registered variant in place
            os.chmod(tmp / rel, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        return staged
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_json(path: Path, source: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"cannot add {source}: {path.name} is not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise RegistryError(f"cannot add {source}: {path.name} holds a {type(value).__name__}, expected an object")
    return value


def install(staged: Staged, objects: Path) -> bool:
    """Rename the staged copy to ``objects/<key>``; True when it was installed, False when the key
    was already stored (the copy is dropped and the stored object reused)."""
    final = objects / staged.key
    if final.exists():
        discard(staged)
        return False
    try:
        os.rename(staged.tmp, final)
    except OSError:
        if final.exists():  # another process installed the same content first
            discard(staged)
            return False
        raise
    _fsync_dir(objects)
    return True


def discard(staged: Staged) -> None:
    _rmtree(staged.tmp)


def _rmtree(path: Path) -> None:
    def writable(func: Any, p: str, _exc: Any) -> None:  # read-only files in a read-only-less dir
        os.chmod(p, stat.S_IWUSR | stat.S_IRUSR)
        func(p)

    if path.exists():
        shutil.rmtree(path, onerror=writable)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(objects: Path) -> list[Path]:
    """Temporary copies and trash whose process is gone (killed midway through a copy or a gc)."""
    if not objects.is_dir():
        return []
    out = []
    for path in sorted(objects.glob(".tmp-*")) + sorted(objects.glob(".trash-*")):
        try:
            pid = int(path.name.split("-")[1])
        except (IndexError, ValueError):
            pid = -1
        if pid < 0 or (pid != os.getpid() and not _pid_alive(pid)):
            out.append(path)
    return out


def stored_keys(objects: Path) -> list[str]:
    if not objects.is_dir():
        return []
    return sorted(p.name for p in objects.iterdir() if p.is_dir() and not p.name.startswith("."))


def trash(objects: Path, keys: Iterable[str]) -> list[Path]:
    """Rename the objects ``keys`` out of their final names (instant, inside the caller's
    transaction); the caller deletes the returned folders once it has committed."""
    out = []
    for key in keys:
        target = objects / f".trash-{os.getpid()}-{secrets.token_hex(4)}-{key[:12]}"
        os.rename(objects / key, target)
        out.append(target)
    if out:
        _fsync_dir(objects)
    return out


def delete(paths: Iterable[Path]) -> int:
    """Delete the folders and return the bytes freed."""
    freed = 0
    for path in paths:
        freed += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        _rmtree(path)
    return freed


def safetensors_parameters(root: Path, files: Iterable[str]) -> int | None:
    """The element count of every tensor in the top-level safetensors files, read from their headers
    (for a checkpoint without a card; packed quantized tensors count their stored elements)."""
    total = 0
    for rel in files:
        if "/" in rel or not rel.endswith(".safetensors"):
            continue
        try:
            with open(root / rel, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(min(length, 100 * 2**20)).decode("utf-8"))
        except (OSError, struct.error, ValueError):
            return None
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict):
                count = 1
                for dim in entry.get("shape") or []:
                    count *= int(dim)
                total += count
    return total


__all__ = ["Staged", "stage", "install", "discard", "manifest_key", "stale_temporaries", "stored_keys", "trash",
           "delete", "safetensors_parameters", "OBJECTS"]
