"""Trial functions for tests/distributed: module-level, so every backend imports them by name."""

from __future__ import annotations

import os
import time
from pathlib import Path


def square(item: dict) -> dict:
    return {"y": item["x"] * item["x"], "label": f"sq-{item['id']}"}


def fail_on_odd(item: dict) -> dict:
    if item["x"] % 2:
        raise ValueError(f"odd x={item['x']}\nsecond line of the message")
    return square(item)


def nap(item: dict) -> dict:
    """Sleeps item["s"] seconds; writes its pid to item["pid_file"] first when given."""
    if item.get("pid_file"):  # written whole, then renamed: a reader never sees it half written
        tmp = Path(item["pid_file"] + ".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(item["pid_file"])
    time.sleep(item["s"])
    return {"slept": item["s"]}


def threads(item: dict) -> dict:
    import torch

    return {"threads": torch.get_num_threads()}


def not_a_dict(item: dict):
    return [item["id"]]
