"""Progress bars for long work, off unless asked for (the CLI asks when stderr is a terminal).  They draw on
stderr, where the CLI looked for a terminal: stdout (a result, often piped) stays the result alone."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(
    enabled: bool, total: int, description: str, *, unit: str = "bytes"
) -> Iterator[Callable[[int], None]]:
    """A transient rich bar; yields ``advance(n)``.  ``unit`` is "bytes" (size and speed) or "items"."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    counts = (DownloadColumn(), TransferSpeedColumn()) if unit == "bytes" else (MofNCompleteColumn(),)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        *counts,
        TimeRemainingColumn(),
        transient=True,
        console=Console(stderr=True),
    ) as p:
        task = p.add_task(description, total=total)
        yield lambda n: p.advance(task, n)


@contextmanager
def hub_progress(enabled: bool) -> Iterator[None]:
    """huggingface_hub's own bars (uploads, downloads), switched off for the duration when not wanted."""
    if enabled:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
