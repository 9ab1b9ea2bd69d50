"""Students that are not cut from the teacher: a fresh, smaller model of the same family.

A student made of the teacher's own layers comes from the ``structured`` step (``drop_layers`` by
block influence, or ``blocks`` by hand); a pruned or quantized artifact is loaded as it is. This
file builds the third kind: the teacher's config with some fields changed (fewer layers, a
narrower width), randomly initialised with a seed, sharing the teacher's tokenizer and vocabulary.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from ..errors import SecateurError, did_you_mean


def fresh(teacher: nn.Module, seed: int = 0, **overrides: Any) -> nn.Module:
    """A randomly initialised model of the teacher's class with ``overrides`` applied to its config,
    e.g. ``fresh(teacher, num_hidden_layers=2, hidden_size=256, intermediate_size=1024)``."""
    config = copy.deepcopy(teacher.config)
    known = set(config.to_dict())
    for key, value in overrides.items():
        if key not in known:
            raise SecateurError(f"student config: unknown field '{key}'{did_you_mean(key, known)} for "
                                f"{config.model_type}")
        setattr(config, key, value)
    if getattr(config, "head_dim", None) and "hidden_size" in overrides and "head_dim" not in overrides:
        config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(seed)
    try:
        student = type(teacher)(config)
    except (ValueError, TypeError, AssertionError) as exc:
        raise SecateurError(f"student config {overrides} is not a valid {config.model_type} config: {exc}") from None
    return student.to(next(teacher.parameters()).dtype).eval()


def parse_overrides(text: str) -> dict[str, Any]:
    """``num_hidden_layers=2,hidden_size=256`` -> ``{"num_hidden_layers": 2, "hidden_size": 256}``."""
    import yaml

    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SecateurError(f"student config: got {item!r}, expected KEY=VALUE such as num_hidden_layers=2")
        out[key.strip()] = yaml.safe_load(raw)
    if not out:
        raise SecateurError("student config: expected KEY=VALUE pairs such as num_hidden_layers=2,hidden_size=256")
    return out
