"""Artifacts: a directory of safetensors weights that stock ``transformers`` loads, plus a card.

    path = secateur.save(model, "out/llama-50", tokenizer=tokenizer, metrics=metrics)
    card = secateur.artifacts.verify("out/llama-50")       # raises ArtifactError when damaged
    model, tokenizer, arch = secateur.load("out/llama-50")  # calls verify() itself

The card, ``compression.json``, says what was done (the resolved recipe and per-step history),
on which data (fingerprints), from which base model, with which code (versions, platform), what
it cost and won (``metrics``), and lists every other file with its size and sha256 so that a
truncated or modified file is caught before it is loaded.

Saving is atomic. Everything is written into a hidden sibling ``.{name}.tmp-<random>``, each file
is fsync'd, the card is written last, and the directory is renamed into place. An existing
artifact at the target is swapped out (renamed to a trash sibling, the new one renamed in, the old
one deleted); anything else at the target is refused, never deleted. A crash leaves no directory
at the target path, and an exception cleans its temporary directory up.

Nothing is pickled: weights go through safetensors, everything else is JSON.

Sparse weights can be stored compressed: with ``save(..., sparse="auto")`` every 2-D
Linear/Conv1D weight with at least 30% zeros is written in secateur's ``bitmask-v1`` layout (a
packed bitmask plus the kept values, see :mod:`secateur.artifacts.bitmask`): a 50%-pruned float32
matrix takes 53% of its dense bytes (stories260K at 50%: 60% overall, its embedding stays dense),
and :func:`secateur.load` rebuilds the dense tensors exactly (a ``-0.0`` comes back as ``+0.0``).
Stock ``transformers`` cannot read that layout (it fails on a size mismatch rather than loading
wrong weights), so the default stays ``sparse="none"``: plain safetensors;
``export_dense(artifact, out)`` turns a compressed artifact back into one. The card's ``storage``
entry says which format was used and what it saved.

Quantized models (:class:`~secateur.runtime.linear.QuantLinear` modules) are written in the
compressed-tensors format (packed integers, scales and a ``quantization_config`` in
``config.json``, see :mod:`secateur.artifacts.compressed_tensors`), which stock ``transformers`` (with
``compressed-tensors`` installed) and vLLM load and :func:`secateur.load` reads back into
QuantLinear modules with the same integers; the card's ``quantization`` entry gives each layer's
scheme and stored bytes, and the bytes of the weight files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Iterator

from .. import lineage
from .card import (CARD_NAME, FORMAT_VERSION, SEAL, WEIGHT_SUFFIXES, build_card, card_summary, seal,
                   sparsity_summary)
from .._version import __version__
from ..errors import ArtifactError, SecateurError, one_of

if TYPE_CHECKING:
    from ..models.arch import ArchFacts

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


# --- writing ----------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_and_sync(root: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """sha256 and size of every file under ``root`` (each fsync'd), and the combined weights hash
    computed exactly as :func:`secateur.models.weights_hash` does (top-level safetensors, name order)."""
    files: dict[str, dict[str, Any]] = {}
    combined = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        top_level_weights = path.parent == root and path.suffix == ".safetensors"
        if top_level_weights:
            combined.update(path.name.encode())
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(chunk)
                if top_level_weights:
                    combined.update(chunk)
            os.fsync(fh.fileno())
            size = os.fstat(fh.fileno()).st_size
        files[rel] = {"sha256": digest.hexdigest(), "bytes": size}
    for sub in sorted({p.parent for p in root.rglob("*") if p.is_file()}, reverse=True):
        _fsync_dir(sub)
    return files, combined.hexdigest()


def _check_target(target: Path) -> str:
    """``"absent"``, ``"empty"`` or ``"artifact"``; anything else is refused."""
    if target.is_symlink():
        raise ArtifactError(f"refusing to write artifact to {target}: it is a symbolic link; pass the real directory")
    if not target.exists():
        return "absent"
    if not target.is_dir():
        raise ArtifactError(f"refusing to write artifact to {target}: it is a file; choose a directory path")
    if (target / CARD_NAME).is_file():
        return "artifact"
    if not any(target.iterdir()):
        return "empty"
    raise ArtifactError(f"refusing to overwrite {target}: it is a non-empty directory that is not a secateur "
                        f"artifact (no {CARD_NAME}); choose another directory or empty it first")


def _check_saveable(model: Any) -> None:
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise ArtifactError(f"cannot save a {type(model).__name__}: expected a Hugging Face PreTrainedModel "
                            "(for example from secateur.load)")
    for name, module in model.named_modules():
        wrapped = any(n.endswith("_orig") for n, _ in module.named_parameters(recurse=False))
        if wrapped or hasattr(module, "parametrizations"):
            raise ArtifactError(f"module '{name}' still carries a pruning/parametrization wrapper; make it permanent "
                                "(torch.nn.utils.prune.remove or parametrize.remove_parametrizations) before saving")


@contextmanager
def _save_settings(model: Any) -> Iterator[None]:
    """Quiet transformers' progress bar when secateur's are off, and write ``tie_word_embeddings``
    truthfully: a compression step that replaced the head or the embedding of a tied model has
    untied them, and a config still saying "tied" would make loaders tie them back."""
    from transformers.utils import logging as hf_logging

    from ..settings import show_progress

    bar_was_on = hf_logging.is_progress_bar_enabled()
    if not show_progress():
        hf_logging.disable_progress_bar()
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    restore_tie = None
    if getattr(text_config, "tie_word_embeddings", False):
        try:
            inp, out = model.get_input_embeddings(), model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            inp = out = None
        if inp is not None and out is not None and out.weight is not inp.weight:
            log.info("the output head no longer shares the input embedding; saving with tie_word_embeddings=false")
            restore_tie = text_config
            text_config.tie_word_embeddings = False
    try:
        yield
    finally:
        if restore_tie is not None:
            restore_tie.tie_word_embeddings = True
        if bar_was_on and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()


def _install(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``, swapping out an existing artifact safely."""
    state = _check_target(target)  # again: the target may have changed while we were writing
    trash = None
    if state == "empty":
        target.rmdir()
    elif state == "artifact":
        trash = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
        os.rename(target, trash)
    try:
        os.rename(tmp, target)
    except BaseException:
        if trash is not None:
            os.rename(trash, target)  # put the previous artifact back
        raise
    try:
        _fsync_dir(target.parent)
    except OSError as exc:  # the rename is done; durability of the parent entry is best effort
        log.warning("could not fsync %s: %s", target.parent, exc)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
        if trash.exists():
            log.warning("could not delete the previous artifact moved to %s; delete it by hand", trash)


def _sparse_candidates(model: Any) -> set[str]:
    """State-dict names of the 2-D Linear and Conv1D weights: the ones compressed storage may take."""
    from ..models.layers import is_projection

    return {f"{name}.weight" for name, module in model.named_modules() if is_projection(module)}




def _write_card(tmp: Path, card: dict[str, Any]) -> None:
    card[SEAL] = seal(card)
    with open(tmp / CARD_NAME, "w", encoding="utf-8") as fh:
        json.dump(card, fh, indent=2, allow_nan=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def _user_modes(root: Path) -> None:
    """Give every file the mode any other file of the user's gets (0666 less the umask): some
    writers (transformers' safetensors) create theirs 0600, unreadable to a serving account."""
    mode = 0o666 & ~_umask()
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def install(staging: Path, target: Path, card: dict[str, Any]) -> None:
    """Finish a fully written ``staging`` folder as the artifact ``target``: hash and fsync every
    file, write the sealed card last, and rename it into place (an existing artifact swapped out)."""
    _user_modes(staging)
    card["files"], card["weights_sha256"] = _hash_and_sync(staging)
    _write_card(staging, card)
    _install(staging, target)


@contextmanager
def _staging(target: Path, card: dict[str, Any]) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to write into; on success hash every file, write the
    card last and rename the folder into place; on any failure remove it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()
    installed = False
    try:
        yield tmp
        install(tmp, target, card)
        installed = True
    except OSError as exc:
        raise ArtifactError(f"could not write artifact {target}: {exc.strerror or exc}") from exc
    finally:
        if not installed:
            shutil.rmtree(tmp, ignore_errors=True)


def save(model: Any, directory: str | os.PathLike, *, tokenizer: Any = None, recipe: Any = None,
         metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None, sparse: str = "none") -> Path:
    """Write ``model`` (and ``tokenizer``) as an artifact at ``directory``; return its path.

    ``recipe`` is a Recipe (anything with ``to_dict``), a step config, a list of steps or a dict;
    without it the recipe is rebuilt from the model's lineage (:mod:`secateur.lineage`). ``metrics`` is free-form
    (conventionally ``{"before": {...}, "after": {...}}``) and ``extra`` is stored as is.
    ``sparse`` chooses how sparse weights are stored: ``"none"`` (the default) writes plain
    safetensors that stock transformers loads; ``"auto"`` compresses the 2-D Linear/Conv1D weights
    with at least ``bitmask.MIN_ZEROS`` (30%) zeros, ``"bitmask"`` all of them, which only
    :func:`secateur.load` reads (:func:`export_dense` converts back).
    """
    from . import bitmask
    from . import compressed_tensors

    if sparse not in bitmask.MODES:
        raise ArtifactError(f"sparse={sparse!r} is not a storage mode; valid modes: {one_of(bitmask.MODES)}")
    target = Path(directory).expanduser().absolute()
    _check_saveable(model)
    _check_target(target)
    card = build_card(model, recipe=recipe, metrics=metrics, extra=extra)  # fails before any write
    quantized = compressed_tensors.has_quantized(model)
    if quantized:
        compressed_tensors.check(model)  # fails (compressed-tensors missing, an unsupported scheme) before any write
    with _staging(target, card) as tmp:
        with _save_settings(model):
            if quantized:  # QuantLinear modules: the compressed-tensors layout stock transformers and vLLM load
                compressed_tensors.write(model, tmp, safe_serialization=True)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if (tmp / CARD_NAME).exists():
            raise ArtifactError(f"the model or tokenizer wrote its own {CARD_NAME}; secateur reserves that name")
        stray = sorted(p.name for p in tmp.glob("*.bin")) + sorted(p.name for p in tmp.glob("*.pt"))
        if stray or not list(tmp.glob("*.safetensors")):
            found = ", ".join(stray) if stray else "no weights"
            raise ArtifactError(f"save_pretrained did not write safetensors weights only (got {found}); "
                                "secateur artifacts never contain pickles")
        card["storage"] = bitmask.compress_files(tmp, _sparse_candidates(model), sparse)
        if quantized:
            card["quantization"] = compressed_tensors.describe(model, tmp)
    log.info("saved artifact %s (%d files, %d bytes of weights)", target, len(card["files"]),
             card_summary(card)["weights_bytes"])
    return target


# --- reading ----------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(directory: str | os.PathLike) -> dict[str, Any]:
    """Read the card of the artifact at ``directory`` and check every file it lists (size, sha256).

    Returns the card; raises :class:`ArtifactError` with one line naming the first problem.
    Files that are present but not listed are allowed.
    """
    root = Path(directory)
    damaged = f"artifact {directory} is damaged:"
    if not root.is_dir():
        raise ArtifactError(f"artifact {directory} does not exist or is not a directory")
    card_path = root / CARD_NAME
    if not card_path.is_file():
        raise ArtifactError(f"{directory} is not a secateur artifact: {CARD_NAME} is missing")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{damaged} {CARD_NAME} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                            "re-create it") from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{damaged} {CARD_NAME} is not UTF-8 text; re-create it") from None
    if not isinstance(card, dict):
        raise ArtifactError(f"{damaged} {CARD_NAME} holds a {type(card).__name__}, expected an object; "
                            "re-create it")
    version = card.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise ArtifactError(f"artifact {directory} has format_version {version}, newer than this secateur "
                                f"{__version__} reads ({FORMAT_VERSION}); upgrade secateur")
        raise ArtifactError(f"artifact {directory} has unknown format_version {version!r}; expected {FORMAT_VERSION}")
    files = card.get("files")
    if not isinstance(files, dict) or not any(str(n).endswith(".safetensors") for n in files):
        raise ArtifactError(f"{damaged} {CARD_NAME} lists no safetensors weights under 'files'; re-create it")
    for name, entry in files.items():
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or name == CARD_NAME or not isinstance(entry, dict) \
                or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int):
            raise ArtifactError(f"{damaged} {CARD_NAME} has an invalid entry for file {name!r}; re-create it")
        path = root / rel
        if not path.is_file():
            raise ArtifactError(f"{damaged} {name} is missing; re-create it")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"{damaged} {name} has {size} bytes, expected {entry['bytes']} "
                                "(truncated or modified); re-create it")
        got = _sha256(path)
        if got != entry["sha256"]:
            raise ArtifactError(f"{damaged} {name} sha256 mismatch (expected {entry['sha256'][:12]}…, "
                                f"got {got[:12]}…); re-create it")
    recorded = card.get(SEAL)
    if recorded is None:
        log.warning("artifact %s has an unsealed card (written before cards were sealed); its content is "
                    "not checked", directory)
    elif recorded != seal(card):
        raise ArtifactError(f"{damaged} {CARD_NAME} was edited after it was written (its {SEAL} does not match "
                            "its content); re-create it")
    unlisted = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES
                      and p.name not in files)
    if unlisted:
        raise ArtifactError(f"artifact {directory} holds weight files its card does not list: {', '.join(unlisted)}; "
                            "remove them (they are not part of the artifact and would be loaded with it)")
    for name in files:
        if name.endswith(".safetensors"):
            _check_safetensors_header(root / name, damaged)
    return card


def _check_safetensors_header(path: Path, damaged: str) -> None:
    """The 8-byte header length and the JSON header of a safetensors file, read and checked, so
    that a malformed file is an artifact error naming it, not a library's bare exception."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if length < 2 or 8 + length > size or length > 100 * 2**20:
            raise ArtifactError(f"{damaged} {path.name} is not a safetensors file (its header length is wrong)")
        try:
            header = json.loads(fh.read(length).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ArtifactError(f"{damaged} {path.name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{damaged} {path.name} is not a safetensors file (its header is not an object)")


def materialize_dense(directory: str | os.PathLike) -> dict[str, Any]:
    """The dense state dict of the model directory or artifact at ``directory`` (compressed
    weights decoded exactly, negative zeros as ``+0.0``; plain checkpoints read as they are).
    Does not verify hashes."""
    from . import bitmask

    try:
        return bitmask.read_dense(directory)
    except ValueError as exc:
        raise ArtifactError(f"artifact {directory} is damaged: {exc}; re-create it") from None


def _attach_exits(model: Any, path: Path) -> None:
    """Early-exit heads saved with the model (``secateur_exits.heads.<block>.*`` and, with exit
    classifiers, ``secateur_exits.classifiers.<block>.*``: tensors transformers does not know and
    skips) are rebuilt and put back on it."""
    from safetensors import safe_open

    from ..runtime.early_exit import ATTRIBUTE, ExitHeads, attach

    prefix = f"{ATTRIBUTE}."
    tensors: dict[str, Any] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                if key.startswith(prefix):
                    tensors[key[len(prefix):]] = fh.get_tensor(key)
    if not tensors:
        return
    heads = ExitHeads.from_state(tensors)
    heads.requires_grad_(False)
    attach(model, heads)


def load_pretrained(auto: Any, directory: str | os.PathLike, **kwargs: Any) -> Any:
    """``auto.from_pretrained(directory, **kwargs)`` that also reads compressed sparse weights.

    ``auto`` is a transformers Auto class (or a model class). A directory in the plain format goes
    straight to transformers; one with compressed weights is decoded to a dense state dict first
    and handed to the model class with the directory's config and generation config. A
    compressed-tensors checkpoint (``quantization_config.quant_method == "compressed-tensors"``)
    is built with :class:`~secateur.runtime.linear.QuantLinear` modules holding its integers
    (:func:`secateur.artifacts.compressed_tensors.read`).
    """
    from . import bitmask
    from . import compressed_tensors

    path = Path(directory)
    try:
        compressed = bitmask.is_sparse(path)
    except ValueError as exc:
        raise ArtifactError(str(exc)) from None
    card_file = path / CARD_NAME
    recorded = json.loads(card_file.read_text(encoding="utf-8")).get("layout") if card_file.is_file() else None
    quantized = compressed_tensors.quantization_config_of(path) is not None
    if not compressed and not recorded and not quantized:
        return auto.from_pretrained(path, **kwargs)
    from transformers import AutoConfig, GenerationConfig

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    kwargs.pop("use_safetensors", None)
    mapping = getattr(auto, "_model_mapping", None)  # Auto classes map a config type to a model class
    model_class = mapping[type(config)] if mapping is not None else auto
    if quantized:  # compressed-tensors integers: QuantLinear modules, without transformers' quantizer
        model = compressed_tensors.read(model_class, path, config, kwargs.get("dtype"), state=materialize_dense(path),
                             layout=recorded)
    elif recorded:  # per-module shapes the config cannot describe: rebuild them, then load the weights
        from ..models.structure import rebuild

        model = rebuild(model_class, config, recorded, materialize_dense(path), kwargs.get("dtype"))
        model.name_or_path = str(path)
    else:
        model = model_class.from_pretrained(None, config=config, state_dict=materialize_dense(path), **kwargs)
    model.config.name_or_path = model.name_or_path = str(path)
    if (path / "generation_config.json").is_file() and model.can_generate():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def export_dense(artifact_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy the artifact at ``artifact_dir`` to ``out_dir`` with every weight stored dense, so that
    stock ``transformers.AutoModel*.from_pretrained(out_dir)`` loads it; return the new path.

    The source is verified first; the copy is an artifact too (same card, with its ``files``,
    ``weights_sha256`` and ``storage`` rewritten, and ``storage.exported_from`` naming the source),
    written atomically like :func:`save`. A dense source is copied as it is.
    """
    from . import bitmask

    card = verify(artifact_dir)
    source = Path(artifact_dir).expanduser().absolute()
    target = Path(out_dir).expanduser().absolute()
    if target == source:
        raise ArtifactError(f"export_dense: the output {target} is the artifact itself; choose another directory")
    _check_target(target)
    with _staging(target, card) as tmp:
        for name in card["files"]:
            src, dst = source / name, tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.parent == source and src.suffix == ".safetensors":
                try:
                    bitmask.write_dense_copy(src, dst)
                except ValueError as exc:
                    raise ArtifactError(f"artifact {artifact_dir} is damaged: {exc}; re-create it") from None
            elif name == bitmask.INDEX_NAME:
                index = bitmask.dense_index(json.loads(src.read_text(encoding="utf-8")))
                dst.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            else:
                shutil.copyfile(src, dst)
        weights = sum(p.stat().st_size for p in bitmask.weight_files(tmp))
        old_storage = card.get("storage") or {}
        card["storage"] = bitmask.storage_entry("dense", 0, weights, weights, exported_from={
            "path": str(source), "format": old_storage.get("format", "dense"),
            "weights_sha256": card.get("weights_sha256")})
    log.info("exported %s with dense weights to %s", source, target)
    return target





# --- loading ------------------------------------------------------------------------------------
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


def load(name_or_path: str | os.PathLike, *, dtype: Any = None) -> Loaded:
    """Load a supported Hugging Face model with its tokenizer and architecture facts: a local
    directory, a secateur artifact (verified against its card first: hashes, seal, stray weight
    files) or a hub id served from the local cache. Nothing is ever unpickled."""
    import torch

    from ..models import resolve
    from ..models.arch import ARCHS, arch_of
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve(str(name_or_path))
    card = None
    if (path / "compression.json").exists():
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
    _attach_exits(model, path)
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
    lineage.set_(model, lineage.Lineage(
        lineage.Base(info["name"], info["path"], info["weights_sha256"], config.model_type, artifact=card is not None,
                     origin=card.get("base_model") if card is not None else None),
        parent=lineage.Lineage.from_card(card) if card is not None else None))
    return Loaded(model, tokenizer, arch_of(model), info)


__all__ = ["FORMAT_VERSION", "save", "verify", "card_summary", "build_card", "sparsity_summary",
           "materialize_dense", "load_pretrained", "export_dense", "Loaded", "load", "weights_hash"]
