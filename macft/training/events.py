"""One event stream for both backends.

The shared loop emits these; the progress display, ``metrics.jsonl`` and the
loss plot are callbacks hanging off it. Numbers mean the same in both backends:

- ``loss``: mean cross-entropy per trained token over the steps since the last report
- ``tokens_per_sec``: trained (loss-mask) tokens per second of training time
- ``trained_tokens``: trained tokens so far
- ``peak_memory_gb``: the backend's peak allocation (MLX: ``mx.get_peak_memory``;
  torch: ``torch.cuda.max_memory_allocated``, or the process peak RSS on CPU)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainStart:
    total_steps: int
    start_step: int
    steps_per_epoch: int
    examples: int
    backend: str
    device: str
    trainable_params: int
    total_params: int
    notes: list[str] = field(default_factory=list)


@dataclass
class StepReport:
    step: int
    epoch: float
    loss: float
    learning_rate: float
    grad_norm: float
    tokens_per_sec: float
    trained_tokens: int
    peak_memory_gb: float
    elapsed_sec: float


@dataclass
class EvalReport:
    step: int
    val_loss: float
    val_tokens: int
    best: bool
    seconds: float


@dataclass
class CheckpointSaved:
    step: int
    path: Path
    reason: str  # "cadence", "interrupt", "final"


@dataclass
class TrainEnd:
    step: int
    final_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    interrupted: bool
    seconds: float
    trained_tokens: int
    peak_memory_gb: float
    extra: dict[str, Any] = field(default_factory=dict)


class TrainingCallback:
    """Hooks do nothing by default; override the ones you need."""

    def on_start(self, ev: TrainStart) -> None: ...
    def on_step(self, ev: StepReport) -> None: ...
    def on_micro(self, step: int, micro: int) -> None: ...
    def on_eval(self, ev: EvalReport) -> None: ...
    def on_checkpoint(self, ev: CheckpointSaved) -> None: ...
    def on_end(self, ev: TrainEnd) -> None: ...


class CallbackList(TrainingCallback):
    def __init__(self, callbacks: list[TrainingCallback]):
        self.callbacks = callbacks

    def on_start(self, ev: TrainStart) -> None:
        for c in self.callbacks:
            c.on_start(ev)

    def on_step(self, ev: StepReport) -> None:
        for c in self.callbacks:
            c.on_step(ev)

    def on_micro(self, step: int, micro: int) -> None:
        for c in self.callbacks:
            c.on_micro(step, micro)

    def on_eval(self, ev: EvalReport) -> None:
        for c in self.callbacks:
            c.on_eval(ev)

    def on_checkpoint(self, ev: CheckpointSaved) -> None:
        for c in self.callbacks:
            c.on_checkpoint(ev)

    def on_end(self, ev: TrainEnd) -> None:
        for c in self.callbacks:
            c.on_end(ev)


class Recorder(TrainingCallback):
    """Keeps every event in memory (tests, benchmarks, summaries)."""

    def __init__(self) -> None:
        self.start: TrainStart | None = None
        self.steps: list[StepReport] = []
        self.evals: list[EvalReport] = []
        self.checkpoints: list[CheckpointSaved] = []
        self.end: TrainEnd | None = None

    def on_start(self, ev: TrainStart) -> None:
        self.start = ev

    def on_step(self, ev: StepReport) -> None:
        self.steps.append(ev)

    def on_eval(self, ev: EvalReport) -> None:
        self.evals.append(ev)

    def on_checkpoint(self, ev: CheckpointSaved) -> None:
        self.checkpoints.append(ev)

    def on_end(self, ev: TrainEnd) -> None:
        self.end = ev
