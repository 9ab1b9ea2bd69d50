"""Which modules a step touches.

A step's ``targets`` and ``ignore`` are lists of patterns. Each pattern is one of:

``Linear``, ``Conv1D``
    A **class name**: matches a module whose class, or any of its base classes, has that name
    (``Linear`` therefore also matches subclasses of ``nn.Linear``). ``Linear`` also matches
    transformers' ``Conv1D`` (GPT-2's linear layer, weight stored transposed), so that the
    default ``targets: [Linear]`` means "the projections" in every family; write ``Conv1D`` to
    target only those.
``model.layers.0.mlp.down_proj``, ``model.layers.0``
    A **module name** as listed by ``model.named_modules()``: matches that module and every
    module inside it (so ``model.layers.0`` means "everything in block 0").
``re:<regex>``
    A **regular expression** searched (``re.search``) in the full module name, so
    ``re:mlp\\.`` matches every module whose name contains ``mlp.``; anchor it with ``^``/``$``
    (``re:^model\\.layers\\.0\\.``, ``re:(q|k|v)_proj$``) to match whole names.

Selection rules, in order:

1. Candidates are modules with a 2-D ``weight`` tensor (``nn.Linear``, GPT-2's ``Conv1D``, …);
   norms, biases-only modules and containers are never selected.
2. Embeddings (every ``nn.Embedding`` and the architecture's embedding modules), the output head
   and any module sharing its weight with one of them (tied ``lm_head``) are **protected**: they
   are selected only when a ``targets`` pattern names them exactly (``lm_head``), never through
   a class name, a regex or a parent module name.
3. A module matched by any ``ignore`` pattern is never selected, however it was targeted.
4. Every ``targets`` pattern must select at least one module; otherwise a :class:`ConfigError`
   names the pattern (``targets[1]``), says why, and lists what is present. ``ignore`` patterns
   that match nothing are fine (the default ``ignore: [lm_head]`` on an encoder).

The result is ordered like ``model.named_modules()``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, did_you_mean

if TYPE_CHECKING:  # torch stays out of this module's import so that recipes validate quickly
    import torch.nn as nn

log = logging.getLogger(__name__)

REGEX_PREFIX = "re:"
_EXAMPLES = 4


# --- patterns ---------------------------------------------------------------------------------
def compile_pattern(pattern: Any, path: str = "") -> re.Pattern[str] | str:
    """Check one pattern; return the compiled regex for ``re:`` patterns and the string otherwise."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ConfigError(path, f"got {pattern!r}, expected a class name (Linear), a module name "
                                f"(model.layers.0.mlp.down_proj) or 're:<regex>'")
    if pattern.startswith(REGEX_PREFIX):
        body = pattern[len(REGEX_PREFIX):]
        if not body:
            raise ConfigError(path, f"empty regex in {pattern!r}; expected 're:<regex>' such as 're:mlp\\.'")
        try:
            return re.compile(body)
        except re.error as exc:
            raise ConfigError(path, f"invalid regex in {pattern!r}: {exc}") from None
    return pattern


def check_patterns(patterns: Iterable[Any], path: str = "targets") -> None:
    """Validate a list of patterns without a model (for recipe loading): errors name ``path[i]``."""
    for i, pattern in enumerate(patterns):
        compile_pattern(pattern, f"{path}[{i}]")


def _class_names(module: Any) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _matches(compiled: re.Pattern[str] | str, name: str, module: Any) -> bool:
    """Whether a pattern matches a module by regex, by class name, or as (a child of) a module name."""
    if isinstance(compiled, re.Pattern):
        return compiled.search(name) is not None
    if name == compiled or name.startswith(compiled + "."):
        return True
    from .models.layers import CLASS_ALIASES  # what plays the same role, from the architecture table

    classes = _class_names(module)
    return compiled in classes or any(alias in classes for alias in CLASS_ALIASES.get(compiled, ()))


def matches(pattern: str, name: str, module: Any) -> bool:
    """Whether one pattern (a class name with its aliases, a module name, or ``re:<regex>``) matches
    the module ``name``: the package's one matcher (targets, ignore, quantization overrides)."""
    return _matches(compile_pattern(pattern), name, module)


# --- the model side ---------------------------------------------------------------------------
def _has_2d_weight(module: Any) -> bool:
    import torch

    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2


def _resolve_arch(model: Any, arch: Any) -> Any:
    """An :class:`~secateur.models.arch.Arch` row from an Arch, ArchFacts, or the model (None if unknown)."""
    if arch is None:
        from .models.arch import arch_of

        arch = arch_of(model, strict=False)
    return getattr(arch, "arch", arch)


def protected_modules(model: "nn.Module", arch: Any = None) -> dict[str, str]:
    """Module name -> why it is protected (``embedding``, ``head``, ``tied to <name>``)."""
    import torch.nn as nn

    row = _resolve_arch(model, arch)
    by_id = {id(m): n for n, m in model.named_modules()}
    reasons: dict[str, str] = {}

    def add(module: Any, why: str) -> None:
        if module is not None and id(module) in by_id:
            reasons.setdefault(by_id[id(module)], why)

    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            reasons.setdefault(name, "embedding")
    if row is not None:
        for path in row.embeddings:
            try:
                add(row.base(model).get_submodule(path), "embedding")
            except AttributeError:
                pass
        try:
            add(row.get_head(model), "head")
        except AttributeError:
            pass
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            add(get_out(), "head")
        except (AttributeError, NotImplementedError):
            pass
    # modules whose weight is the very tensor of a protected module (tied lm_head)
    protected_weights = {}
    for name in list(reasons):
        weight = getattr(model.get_submodule(name), "weight", None)
        if weight is not None:
            protected_weights[id(weight)] = name
    for name, module in model.named_modules():
        owner = protected_weights.get(id(getattr(module, "weight", None)))
        if owner is not None and owner != name:
            reasons.setdefault(name, f"tied to {owner}")
    return reasons


def select_modules(model: "nn.Module", targets: Sequence[str], ignore: Sequence[str] = (),
                   arch: Any = None) -> dict[str, "nn.Module"]:
    """The modules a step touches, by name, in model order. See the module docstring for the rules.

    ``arch`` is an ``Arch`` or ``ArchFacts``; by default it is looked up from the model (models
    outside the table still work: every ``nn.Embedding`` and ``get_output_embeddings()`` are
    protected). Raises :class:`ConfigError` (path ``targets[i]`` / ``ignore[i]``) for an invalid
    or empty pattern and for a target that selects nothing.
    """
    if isinstance(targets, str) or isinstance(ignore, str):
        raise ConfigError("targets" if isinstance(targets, str) else "ignore",
                          "expected a list of patterns, got a single string; write [\"...\"]")
    if not targets:
        raise ConfigError("targets", "no patterns given; expected at least one, e.g. ['Linear']")
    compiled_targets = [compile_pattern(p, f"targets[{i}]") for i, p in enumerate(targets)]
    compiled_ignore = [compile_pattern(p, f"ignore[{i}]") for i, p in enumerate(ignore)]
    protected = protected_modules(model, arch)
    modules = [(n, m) for n, m in model.named_modules() if n]

    selected: set[str] = set()
    for i, (pattern, compiled) in enumerate(zip(targets, compiled_targets)):
        matched = [(n, m) for n, m in modules if _matches(compiled, n, m)]
        if not matched:
            raise ConfigError(f"targets[{i}]", _no_match_message(pattern, modules, protected))
        with_weight = [(n, m) for n, m in matched if _has_2d_weight(m)]
        if not with_weight:
            raise ConfigError(f"targets[{i}]", f"pattern {pattern!r} matches {_count(matched)} ({_examples(matched)}) "
                                               f"but none has a 2-D weight; {_present(modules, protected)}")
        allowed = [(n, m) for n, m in with_weight if n not in protected or n == pattern]
        if not allowed:
            raise ConfigError(f"targets[{i}]", f"pattern {pattern!r} matches only protected modules "
                                               f"({_reasons(with_weight, protected)}), which are selected only "
                                               f"when a target names them exactly, e.g. {with_weight[0][0]!r}")
        kept = [n for n, m in allowed if not any(_matches(c, n, m) for c in compiled_ignore)]
        if not kept:
            raise ConfigError(f"targets[{i}]", f"every module that pattern {pattern!r} matches ({_examples(allowed)}) "
                                               f"is excluded by ignore {list(ignore)!r}; remove it from ignore")
        for name in kept:
            if name in protected and name not in selected:
                log.warning("selecting protected module %s (%s) because a target names it exactly",
                            name, protected[name])
        selected.update(kept)

    for i, (pattern, compiled) in enumerate(zip(ignore, compiled_ignore)):
        if not any(_matches(compiled, n, m) for n, m in modules):
            log.debug("ignore[%d] %r matches no module", i, pattern)
    result = {n: m for n, m in modules if n in selected}
    log.debug("selected %d modules for targets=%r ignore=%r", len(result), list(targets), list(ignore))
    return result


def describe_selection(selected: dict[str, "nn.Module"]) -> list[dict[str, Any]]:
    """Rows for a dry-run listing: name, class, weight shape (as stored) and parameter count."""
    rows = []
    for name, module in selected.items():
        weight = getattr(module, "weight", None)
        shape = list(weight.shape) if weight is not None else None
        rows.append({"name": name, "class": type(module).__name__, "shape": shape,
                     "params": int(weight.numel()) if weight is not None else 0})
    return rows


# --- messages ---------------------------------------------------------------------------------
def _count(items: Sequence[Any]) -> str:
    return f"{len(items)} module{'s' if len(items) != 1 else ''}"


def _examples(items: Sequence[tuple[str, Any]]) -> str:
    names = [repr(n) for n, _ in items[:_EXAMPLES]]
    more = f", … {len(items) - _EXAMPLES} more" if len(items) > _EXAMPLES else ""
    return ", ".join(names) + more


def _reasons(items: Sequence[tuple[str, Any]], protected: dict[str, str]) -> str:
    return ", ".join(f"{n!r}: {protected[n]}" for n, _ in items[:_EXAMPLES])


def _present(modules: Sequence[tuple[str, Any]], protected: Mapping[str, str]) -> str:
    """What a user could target instead: classes with a 2-D weight and a few module names."""
    weighted = [(n, m) for n, m in modules if _has_2d_weight(m) and n not in protected]
    classes = sorted({type(m).__name__ for _, m in weighted})
    return (f"classes with a 2-D weight here: {', '.join(classes) or 'none'}; "
            f"example module names: {_examples(weighted or modules)}")


def _no_match_message(pattern: str, modules: Sequence[tuple[str, Any]], protected: Mapping[str, str]) -> str:
    hint = ""
    if not pattern.startswith(REGEX_PREFIX):
        classes = {c for _, m in modules for c in _class_names(m)}
        hint = did_you_mean(pattern, classes) or did_you_mean(pattern, [n for n, _ in modules])
    return f"pattern {pattern!r} matches no module{hint}; {_present(modules, protected)}"
