"""The registry room: families of variants, their lineage, evaluations, pipeline runs and movable
aliases, in SQLite (WAL) beside an artifact store keyed by content.

    from secateur.registry import Registry
    reg = Registry()                                  # SECATEUR_HOME (default ~/.local/share/secateur)
    v = reg.add("out/llama-50", family="stories")     # any artifact or HF / llm-compressor checkpoint
    reg.set_alias("stories", "fast", v.id)
    model, tokenizer, arch = secateur.load("stories@fast")

- ``db.py``: the database, its schema and migrations, transactions that retry on ``SQLITE_BUSY``;
- ``store.py``: ``objects/<key>``, written beside, verified, renamed into place;
- ``rows.py``: the typed rows (``Variant``, ``Evaluation``, ``Alias``, ``AliasMove``, ``Run``, …);
- ``registry.py``: :class:`Registry`, the Python API;
- ``commands.py``: the ``secateur registry`` commands;
- :func:`load` here: ``secateur.load``, which accepts a ref wherever a path is accepted.

Imports the ground floor, ``artifacts/`` and ``evaluate``'s result type; never the pipeline or
the CLI (they stand above it). ``import secateur.registry`` imports neither torch nor transformers.
See docs/registry.md for the schema and its guarantees.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from .db import RegistryBusy, RegistryError
from .registry import Registry, looks_like_ref, parse_ref
from .rows import Alias, AliasMove, Compared, Evaluation, GcReport, LineageNode, Run, Variant


def resolve_variant(name_or_path: Union[str, os.PathLike], home: Union[str, Path, None] = None) -> Optional[Variant]:
    """The variant a model argument names, or None when it is not a ref: an existing path, a hub
    id, or ``org/model`` where ``org`` is no registered family. Opens the registry only for a ref
    and never creates one."""
    if isinstance(name_or_path, os.PathLike) or Path(str(name_or_path)).expanduser().exists():
        return None
    text = str(name_or_path)
    try:
        kind = parse_ref(text)[0]
    except RegistryError:
        return None
    registry = Registry.existing(home)
    if registry is None:
        if kind == "name":  # family/name is also the shape of a hub id
            return None
        from ..settings import home as default_home

        raise RegistryError(f"'{text}' names a registry variant, but there is no registry in "
                            f"{home or default_home()} and no local path of that name (set SECATEUR_HOME, or add "
                            "variants with `secateur registry add DIR --family NAME`)")
    with registry:
        if kind == "name" and text.split("/")[0] not in registry.families():
            return None  # a hub id such as org/model
        return registry.resolve(text)


def resolve_model(name_or_path: Union[str, os.PathLike], home: Union[str, Path, None] = None) -> Union[str, os.PathLike]:
    """The path a model argument means: a registry ref as its stored artifact, anything else as it is."""
    variant = resolve_variant(name_or_path, home)
    return name_or_path if variant is None else variant.path


def load(name_or_path: Union[str, os.PathLike], *, home: Union[str, Path, None] = None, **kwargs: Any) -> Any:
    """``secateur.load``: :func:`secateur.artifacts.load` (a local directory, an artifact verified
    against its card, or a cached hub id) that also takes a registry ref (``stories@fast``, a
    variant id, ``stories/pruned-50``). A model loaded by ref has the variant in
    ``loaded.info["registry"]`` and its lineage base named by ``family/name``."""
    import dataclasses

    from .. import artifacts, lineage

    variant = resolve_variant(name_or_path, home)
    if variant is None:
        return artifacts.load(name_or_path, **kwargs)
    loaded = artifacts.load(variant.path, **kwargs)
    loaded.info["registry"] = {"ref": str(name_or_path), "variant": variant.id, "family": variant.family,
                               "name": variant.name, "path": str(variant.path)}
    record = lineage.of(loaded.model)
    if record.base is not None:
        record.base = dataclasses.replace(record.base, name=variant.ref)
    return loaded


__all__ = ["Registry", "RegistryError", "RegistryBusy", "Variant", "Evaluation", "Alias", "AliasMove", "Run",
           "LineageNode", "Compared", "GcReport", "load", "resolve_model", "resolve_variant", "parse_ref", "looks_like_ref"]
