"""Progress with ETA for every long loop, hidden when ``SECATEUR_PROGRESS=0``; and the peak memory a
long job reports (:func:`peak_rss_bytes`).

On a terminal, rich bars; elsewhere (a log file, CI), one plain line to stderr every
``SECATEUR_PROGRESS_EVERY`` seconds (default 30) with the stage, the percent done and the ETA, and a
last line when a loop that printed finishes, so that long work is never silent. Everything goes to
stderr so that ``--json`` output on stdout stays machine-readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from .settings import progress_every, progress_mode, show_progress

T = TypeVar("T")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Lines:
    """Plain progress lines for a stderr that is not a terminal (see the module docstring)."""

    def __init__(self, description: str, total: int | None, completed: int = 0, every: float | None = None):
        self.description, self.total, self.start_count = description, total, completed
        self.every = progress_every() if every is None else every
        self.start = self.last = time.monotonic()
        self.printed = False

    def line(self, completed: int, values: str = "") -> str:
        elapsed = time.monotonic() - self.start
        parts = [f"{self.description}:"]
        if self.total:
            done = completed - self.start_count
            eta = elapsed / done * (self.total - completed) if done > 0 else None
            parts.append(f"{100.0 * completed / self.total:.0f}% ({completed}/{self.total})")
            parts.append(f"elapsed {_clock(elapsed)}" + (f", ETA {_clock(eta)}" if eta is not None else ""))
        else:
            parts.append(f"{completed} done, elapsed {_clock(elapsed)}")
        return " ".join(parts) + (f"  {values}" if values else "")

    def update(self, completed: int, values: str = "") -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            print(self.line(completed, values), file=sys.stderr, flush=True)
            self.last, self.printed = now, True

    def close(self, completed: int) -> None:
        if self.printed:  # a loop long enough to have reported says that it finished
            print(self.line(completed) + " — done", file=sys.stderr, flush=True)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` while showing a bar (or, off a terminal, periodic lines) with count,
    elapsed time and ETA."""
    mode = progress_mode()
    if mode == "off":
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if mode == "lines":
        lines, count = Lines(description, total), 0
        for item in items:
            yield item
            count += 1
            lines.update(count)
        lines.close(count)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
        self._lines: Any = None

    def __enter__(self) -> "Bar":
        if progress_mode() == "lines":
            self._lines = Lines(self.description, self.total, self.completed)
        elif show_progress():
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
        self.completed = completed
        text = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, values=text)
        elif self._lines is not None:
            self._lines.update(completed, text)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
        elif self._lines is not None and not exc[0]:
            self._lines.close(self.completed)


def peak_rss_bytes() -> int:
    """This process's peak resident set in bytes: ``VmHWM`` of ``/proc/self/status`` on Linux.

    Not ``getrusage().ru_maxrss``: Linux keeps that across ``execve``, so a fresh child process of a
    large parent reports the parent's resident set as its own peak (a 13 MB child of an 800 MB
    parent reads 813 MB). ``VmHWM`` belongs to the address space, which ``execve`` replaces.
    Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS) is the fallback.
    """
    import resource
    import sys

    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
