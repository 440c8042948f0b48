"""A per-epoch progress bar on a terminal; nothing (the stage logs a line per epoch) otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def epoch_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """Yield an `advance()` callable; a rich bar when stderr is a TTY and `enabled`, else a no-op."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
