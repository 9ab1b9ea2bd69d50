"""The result of an evaluation: one number, the protocol behind it, and every setting that made it.

A result whose settings deviate from its protocol (fewer windows, another window length, another
dtype) carries ``protocol=None`` and lists the deviations in ``settings["deviations"]``: a number
is only labelled P1/P2/P3 when it can be put next to the reference figure.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable


@dataclass
class EvalResult:
    task: str                          # "perplexity" | "sts" | "speed"
    protocol: str | None               # "P1" | "P2" | "P3" | "P4" | None (no protocol, or deviating from it)
    metric: str                        # name of ``value``: "perplexity", "spearman", "decode_tokens_per_s", …
    value: float
    extra: dict[str, Any] = field(default_factory=dict)      # further metrics (per-layer dicts allowed)
    settings: dict[str, Any] = field(default_factory=dict)   # protocol, data, fingerprint, threads, versions, …

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_jsonable, allow_nan=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalResult":
        return cls(**{k: data[k] for k in ("task", "protocol", "metric", "value")},
                   extra=dict(data.get("extra", {})), settings=dict(data.get("settings", {})))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def environment(model: Any) -> dict[str, Any]:
    """Threads, the CPU, the kernels the model's quantized operations ran and the runtime form the
    caller gave the model, dtype, device, the model's identity and the versions that produced a
    number."""
    import torch
    import transformers

    from .._version import __version__
    from ..runtime import describe, dispatch, machine

    param = next(model.parameters(), None)
    config = getattr(model, "config", None)
    from .. import lineage

    base = lineage.read(model).base
    source = base.to_dict() if base is not None else {}
    return {
        "model": {"name": source.get("name"), "path": source.get("path"),
                  "weights_sha256": source.get("weights_sha256"),
                  "model_type": getattr(config, "model_type", None), "class": type(model).__name__},
        "threads": torch.get_num_threads(),
        "machine": {k: v for k, v in machine.describe().items() if k in ("cpu", "vendor", "flags", "amx",
                                                                           "onednn_max_isa")},
        "kernels": dispatch.summary(model),  # what each quantized operation ran, by token bucket
        "runtime": describe(model),  # eager, or eager with fused encoder blocks (never chosen by evaluation)
        "dtype": str(param.dtype).replace("torch.", "") if param is not None else None,
        "device": str(param.device) if param is not None else "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "secateur": __version__},
    }


def format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _details(result: EvalResult, limit: int = 6) -> str:
    parts = [f"{k} {format_value(v)}" for k, v in result.extra.items() if not isinstance(v, (dict, list))]
    return " · ".join(parts[:limit])


def _setup(result: EvalResult) -> str:
    s = result.settings
    keys = (("seq_len", "seq"), ("windows", "windows"), ("pairs", "pairs"), ("batch", "batch"),
            ("prompt_len", "prompt"), ("new_tokens", "new"), ("threads", "threads"), ("dtype", ""), ("device", ""))
    parts = [f"{label} {s[k]}".strip() for k, label in keys if s.get(k) is not None]
    if s.get("deviations"):
        parts.append("deviates: " + ", ".join(s["deviations"]))
    return " · ".join(parts)


def results_table(results: EvalResult | Iterable[EvalResult], title: str | None = None,
                  labels: Iterable[str] | None = None) -> Any:
    """A rich Table with one row per result: task, protocol, metric, value, data, setup, details;
    with ``labels`` (e.g. "before", "after"), a first column naming each row."""
    from rich.table import Table

    if isinstance(results, EvalResult):
        results = [results]
    results = list(results)
    names = list(labels) if labels is not None else None
    table = Table(title=title, show_lines=False)
    if names is not None:
        table.add_column("", style="bold")
    for name, style in (("task", "bold"), ("protocol", ""), ("metric", ""), ("value", "bold cyan"), ("data", ""),
                        ("fingerprint", "dim"), ("setup", "dim"), ("details", "")):
        table.add_column(name, style=style or None, justify="right" if name == "value" else "left",
                         overflow="fold")  # a narrow terminal wraps a value, never cuts it
    for i, r in enumerate(results):
        data = r.settings.get("data") or {}
        name = str(data.get("name", "")).replace("\\", "/").rsplit("/", 1)[-1]  # a file: its base name
        where = f"{name}:{data.get('split', '')}" if data else "-"
        cells = [r.task, r.protocol or "-", r.metric, format_value(r.value), where,
                 str(r.settings.get("fingerprint") or "-"), _setup(r), _details(r)]
        table.add_row(*([names[i]] if names is not None else []), *cells)
    return table
