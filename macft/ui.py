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


def quiet() -> bool:
    return bool(os.environ.get("MACFT_QUIET"))


def info(msg: str) -> None:
    if not quiet():
        console.print(msg)


def warn(msg: str) -> None:
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
