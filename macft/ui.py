"""Console output shared by every command (rich)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# stderr carries progress and messages; stdout is kept for results scripts read
console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


_silenced = 0  # depth of nested silenced() blocks


def quiet() -> bool:
    """No progress bars or informational lines: MACFT_QUIET is set, or inside :func:`silenced`."""
    return bool(os.environ.get("MACFT_QUIET")) or _silenced > 0


@contextmanager
def silenced(enabled: bool = True) -> Iterator[None]:
    """Print nothing within the block (the Python API's default: a library does not write to
    the terminal). Warnings go to Python's :mod:`warnings` instead, where a caller can see,
    filter or raise them. ``enabled=False``: an ordinary block (``verbose=True``)."""
    global _silenced
    if not enabled:
        yield
        return
    saved = console.quiet, out.quiet
    console.quiet = out.quiet = True
    _silenced += 1
    try:
        yield
    finally:
        _silenced -= 1
        console.quiet, out.quiet = saved


def info(msg: str) -> None:
    if not quiet():
        console.print(msg)


def warn(msg: str) -> None:
    if _silenced:
        import warnings

        from rich.markup import MarkupError, render

        try:
            text = render(msg).plain
        except MarkupError:
            text = msg
        warnings.warn(text, UserWarning, stacklevel=2)
        return
    console.print(f"[yellow]warning:[/] {msg}")


def task_progress(transient: bool = True) -> Progress:
    """A progress bar for a job with a known number of units."""
    return Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, transient=transient, disable=quiet())


@contextmanager
def status(msg: str) -> Iterator[None]:
    """A spinner for a job of unknown length."""
    if quiet() or not sys.stderr.isatty():
        console.print(f"{msg}")
        yield
        return
    with console.status(msg):
        yield


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
