"""Small helpers shared by the benchmark scripts: where the shared folder is, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SECATEUR_SHARED_DIR", REPO.parent / "shared"))
RESULTS = REPO / "benchmarks" / "results"


def setup_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("SECATEUR_DATA_DIR", str(SHARED / "data"))
    if not (SHARED / "models").is_dir():
        sys.exit(f"error: shared models not found at {SHARED} (set SECATEUR_SHARED_DIR)")


def environment() -> dict[str, Any]:
    import torch
    import transformers

    from secateur.runtime import machine

    facts = machine.describe()  # the CPU model, its kernel-relevant flags (AMX or not), oneDNN's ISA cap
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "cpu": facts["cpu"], "cpu_flags": facts["flags"], "amx": facts["amx"],
            "onednn_max_isa": facts["onednn_max_isa"], "machine_key": machine.key()}


def cpu_line() -> str:
    """``"AMD EPYC, no AMX, 2 threads"``: what every printed table says it was measured on."""
    import torch

    from secateur.runtime import machine

    return f"{machine.cpu_model()}, {'AMX' if machine.has_amx() else 'no AMX'}, {torch.get_num_threads()} threads"


def write_json(name: str, data: dict[str, Any], path: str | None = None) -> Path:
    out = Path(path) if path else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    return out


def add_p4_arguments(parser: Any, name: str) -> None:
    """The options every P4 speed script takes: alternating rounds, threads, prompt and decode lengths."""
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the variants")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    parser.add_argument("--new", type=int, default=64, help="greedy tokens decoded with the KV cache")
    parser.add_argument("--runs", type=int, default=10, help="measured prefill runs per round")
    parser.add_argument("--out", default=None, help=f"JSON path (default benchmarks/results/{name}.json)")


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title}\n(measured on {cpu_line()})")  # every table names its CPU
    for col in columns:
        table.add_column(col, justify="right" if col not in (columns[0], columns[1]) else "left")
    for row in rows:
        table.add_row(*[("—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)) for v in row])
    Console(width=160).print(table)
