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


class Bar:
    """A bar for a loop that reports running values (``bar.update(step, loss=0.41)``), with ETA::

        with Bar(total_steps, "training", completed=resumed_step) as bar:
            ...
            bar.update(step, loss=value)
    """

    def __init__(self, total: int, description: str, completed: int = 0):
        self.total, self.description, self.completed = total, description, completed
        self._progress = self._task = None

    def __enter__(self) -> "Bar":
        if show_progress():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[values]}"))
            self._progress = Progress(*columns, console=Console(stderr=True), transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, completed=self.completed,
                                                 values="")
        return self

    def update(self, completed: int, **values: float) -> None:
        if self._progress is not None:
            text = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
            self._progress.update(self._task, completed=completed, values=text)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
