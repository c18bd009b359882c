"""Rich progress display for training: bar, loss, lr, tokens/s, ETA, peak memory."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..ui import console, quiet
from .events import CheckpointSaved, EvalReport, StepReport, TrainEnd, TrainingCallback, TrainStart


class RichProgress(TrainingCallback):
    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=console, transient=False, disable=quiet())
        self.task = None
        self.last: StepReport | None = None
        self.best: float | None = None
        self.first_val: float | None = None

    def on_start(self, ev: TrainStart) -> None:
        pct = 100.0 * ev.trainable_params / max(ev.total_params, 1)
        console.print(f"Training with the [bold]{ev.backend}[/] backend on [bold]{ev.device}[/]: "
                      f"{ev.trainable_params:,} trainable parameters ({pct:.2f}% of {ev.total_params:,}), "
                      f"{ev.total_steps} optimizer steps ({ev.steps_per_epoch} per epoch)")
        for n in ev.notes:
            console.print(f"  {n}")
        self.progress.start()
        self.task = self.progress.add_task("train", total=ev.total_steps, completed=ev.start_step,
                                           stats="")

    def on_step(self, ev: StepReport) -> None:
        self.last = ev
        stats = (f"loss {ev.loss:.3f}  lr {ev.learning_rate:.2e}  {ev.tokens_per_sec:,.0f} tok/s  "
                 f"peak {ev.peak_memory_gb:.2f} GB")
        self.progress.update(self.task, completed=ev.step, stats=stats)

    def on_eval(self, ev: EvalReport) -> None:
        if self.first_val is None:
            self.first_val = ev.val_loss
        mark = " [green](best)[/]" if ev.best else ""
        self.progress.console.print(f"  step {ev.step:>5}: validation loss {ev.val_loss:.4f}{mark}")

    def on_checkpoint(self, ev: CheckpointSaved) -> None:
        if ev.reason == "cadence":
            self.progress.console.print(f"  step {ev.step:>5}: checkpoint saved")

    def on_end(self, ev: TrainEnd) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=ev.step)
        self.progress.stop()


def summary_table(rows: list[tuple[str, str]]) -> Table:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    return t
