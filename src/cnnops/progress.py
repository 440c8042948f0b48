"""Progress bars on a terminal (an epoch's steps, prepare's images); nothing otherwise: the stages
log a line per epoch or per split, which is what a CI log or `dvc repro` output should hold."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    """Items per second, e.g. `812 img/s` (rich's own speed columns are for bytes)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:.0f} {self.unit}/s")


@contextmanager
def progress_bar(
    description: str, total: int, enabled: bool = True, unit: str | None = None
) -> Iterator[Callable[[], None]]:
    """Yield an `advance()` callable; a rich bar when stderr is a TTY and `enabled`, else a no-op.
    With `unit`, the bar also shows the rate (`img/s`)."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    if unit is not None:
        columns.append(_RateColumn(unit))
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
