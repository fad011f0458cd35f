"""A progress bar for long jobs: samples done, throughput and ETA (or nothing, for the API)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _Rate(ProgressColumn):
    """Samples per second over rich's moving window."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- samples/s" if speed is None else f"{speed:,.0f} samples/s", style="progress.data.speed")


class _Null:
    def advance(self, n: int) -> None:
        pass


class _Bar:
    def __init__(self, progress: Progress, task: Any) -> None:
        self.progress, self.task = progress, task

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)


@contextlib.contextmanager
def job_progress(enabled: bool, total: int | None, description: str = "inference",
                 console: Console | None = None, done: int = 0) -> Iterator[Any]:
    """Yield an object with ``advance(n)``; draws a bar on stderr when ``enabled``.

    ``done`` samples count as finished from the start (a resumed job), so the ETA is right.

    Example:
        >>> with job_progress(False, 10) as bar:
        ...     bar.advance(10)
    """
    if not enabled:
        yield _Null()
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("elapsed"), TimeElapsedColumn()]
    console = console or Console(stderr=True)
    # piped into a log, a bar is only drawn once at the end, where it would sit beside an error line
    with Progress(*columns, console=console, transient=not console.is_terminal, speed_estimate_period=10) as p:
        yield _Bar(p, p.add_task(description, total=total, completed=done))
