"""Progress bars with ETA for every long loop (rich), hidden when ``SECATEUR_PROGRESS=0``.

Bars go to stderr so that ``--json`` output on stdout stays machine-readable.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from .settings import show_progress

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` while showing a bar with count, elapsed time and ETA."""
    if not show_progress():
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
