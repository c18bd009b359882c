"""The training loop, shared by both backends. A backend supplies only the math.

``train(engine, plan, valid, settings, run, callback)``:

- one optimizer step = ``grad_accum`` micro-batches (times the number of
  data-parallel processes). The loss is the mean cross-entropy over every trained
  token of the step: the engine accumulates *summed* losses and gradients, and
  :meth:`Engine.optimizer_step` divides by the step's token count, so long and
  short examples weigh per token, whatever the batching.
- the learning rate comes from :mod:`macft.training.schedule`.
- validation every ``eval_every`` steps and at the end; the adapter with the best
  validation loss is kept in ``best_adapter/`` beside the last one in ``adapter/``.
- early stopping (``early_stop`` N > 0): after an ``eval_every`` validation, when the
  last N validations brought no new best, the run stops; it is then finished, and its
  ``adapter/`` is a copy of ``best_adapter/`` (no final validation: the best one is known).
- a checkpoint every ``save_every`` steps, on Ctrl-C and at the end: adapter,
  optimizer state, RNG state, step, data position and the loss report in progress.
  ``resume`` writes the same metrics rows as an uninterrupted run. A Ctrl-C mid-step
  discards that step's gradients and checkpoints the step before it.
- directories are written under a temporary name and renamed; a failed write (a full
  disk) removes its temporary and leaves the previous checkpoint in place.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from ..data.batching import Batch, BatchPlan
from ..errors import Diverged, MacftError, is_disk_full, os_error_message
from ..run import (
    ADAPTER,
    BEST_ADAPTER,
    CHECKPOINT_GLOB,
    CHECKPOINTS,
    TRAINER_STATE,
    checkpoint_name,
    latest_checkpoint,
    replace_dir,
)
from .events import (
    CheckpointSaved,
    EvalReport,
    StepReport,
    TrainEnd,
    TrainingCallback,
    TrainStart,
)
from .schedule import Schedule, make_schedule

KEEP_CHECKPOINTS = 2


class Engine(Protocol):
    """What a backend implements for the shared loop (the math only)."""

    name: str
    device: str
    rank: int
    world_size: int

    def train_micro(self, batch: Batch) -> tuple[float, int]:
        """Forward + backward on one micro-batch. Gradients of the *summed* token
        loss accumulate until :meth:`optimizer_step`. Returns (loss sum, trained tokens)."""

    def optimizer_step(self, lr: float, n_tokens: int, max_grad_norm: float) -> float:
        """Scale the accumulated gradients by 1/n_tokens (n_tokens over all processes),
        clip, apply AdamW at ``lr``, zero the gradients. Returns the gradient norm."""

    def discard_gradients(self) -> None:
        """Drop gradients accumulated since the last optimizer step."""

    def eval_batch(self, batch: Batch) -> tuple[float, int]:
        """Loss sum and trained tokens, no gradients."""

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum values over data-parallel processes (identity for one process)."""

    def save_adapter(self, path: Path) -> None:
        """Write the PEFT-format adapter (and any native format) into ``path``."""

    def save_state(self, path: Path) -> None:
        """Write what resuming needs beyond the adapter: optimizer, RNG."""

    def load_state(self, path: Path) -> None:
        """Restore adapter weights, optimizer and RNG from a checkpoint directory."""

    def peak_memory_gb(self) -> float: ...

    def param_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters."""


@dataclass
class LoopSettings:
    total_steps: int
    grad_accum: int
    schedule: Schedule
    max_grad_norm: float
    eval_every: int
    save_every: int
    log_every: int
    early_stop: int = 0  # stop after this many validations in a row without a new best (0: never)

    @classmethod
    def from_config(cls, train: Any, total_steps: int, *, schedule_steps: int | None = None,
                    **override: Any) -> LoopSettings:
        """The settings of a ``TrainConfig`` for ``total_steps`` steps, the learning-rate schedule
        spanning ``schedule_steps`` (default: the same steps); ``override`` replaces fields."""
        values: dict[str, Any] = dict(
            total_steps=total_steps, grad_accum=train.grad_accum,
            schedule=make_schedule(train.schedule, train.learning_rate, schedule_steps or total_steps,
                                   train.warmup_ratio),
            max_grad_norm=train.max_grad_norm, eval_every=train.eval_every, save_every=train.save_every,
            log_every=train.log_every, early_stop=train.early_stop)
        values.update(override)
        return cls(**values)


@dataclass
class LoopResult:
    step: int
    interrupted: bool
    best_val_loss: float | None
    best_step: int | None
    final_val_loss: float | None
    final_train_loss: float | None
    trained_tokens: int
    seconds: float
    peak_memory_gb: float
    stopped_early: bool = False  # then adapter/ is best_adapter/ and final_val_loss the best one


@dataclass
class Position:
    """Where training stands after ``step`` optimizer steps; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    index: int = 0
    trained_tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    train_seconds: float = 0.0
    # the training-loss report in progress (steps since the last one), so that a resumed run
    # reports the same numbers as an uninterrupted one (defaults: older checkpoints)
    window_loss: float = 0.0
    window_tokens: int = 0
    window_seconds: float = 0.0
    # validations since the best one (0: the last was the best), and whether early stopping
    # ended the run (defaults: older checkpoints)
    evals_since_best: int = 0
    stopped_early: bool = False


def read_position(ckpt: Path) -> Position:
    raw = json.loads((ckpt / TRAINER_STATE).read_text())
    known = {f.name for f in fields(Position)}
    return Position(**{k: v for k, v in raw.items() if k in known})


def _rank_stream(plan: BatchPlan, pos: Position, rank: int, world: int) -> Iterator[tuple[int, int, Batch]]:
    """Micro-batches for this process: every ``world``-th one of the global stream."""
    for k, item in enumerate(plan.iterate(pos.epoch, pos.index)):
        if k % world == rank:
            yield item


def evaluate(engine: Engine, batches: list[Batch]) -> tuple[float, int]:
    total, n = 0.0, 0
    for i, b in enumerate(batches):
        if i % engine.world_size != engine.rank:
            continue
        s, k = engine.eval_batch(b)
        total += s
        n += k
    total, n = engine.all_sum([total, float(n)])
    return (total / n if n else float("nan")), int(n)


def train(
    engine: Engine,
    plan: BatchPlan,
    valid: list[Batch],
    settings: LoopSettings,
    run_dir: Path,
    callback: TrainingCallback,
    resume_from: Path | None = None,
) -> LoopResult:
    pos = Position()
    if resume_from is not None:
        pos = read_position(resume_from)
        check_not_stopped_early(pos, settings, resume_from)
        engine.load_state(resume_from)
    per_epoch = plan.batches_per_epoch()
    callback.on_start(_start_event(engine, plan, settings, pos, per_epoch))

    stream = _rank_stream(plan, pos, engine.rank, engine.world_size)
    validation = _Validation(engine, valid, run_dir, callback)
    last_train_loss: float | None = None
    t_start = time.perf_counter()
    interrupted = False
    step_start = Position(**vars(pos))
    try:
        if pos.step == 0 and valid:
            validation.run(pos, 0)
        while pos.step < settings.total_steps:
            step = pos.step + 1
            step_start = Position(**vars(pos))
            lr, gnorm = _optimizer_step(engine, plan, stream, settings, pos, step, callback)
            if step % settings.log_every == 0 or step == settings.total_steps:
                report = _close_window(engine, pos, step, lr, gnorm, per_epoch, t_start)
                last_train_loss = report.loss
                # the window closed before the callbacks: a Ctrl-C inside them keeps this step
                callback.on_step(report)
            if settings.eval_every and step % settings.eval_every == 0 and step != settings.total_steps:
                validation.run(pos, step)
                if settings.early_stop and pos.evals_since_best >= settings.early_stop:
                    pos.stopped_early = True
                    break
            if settings.save_every and step % settings.save_every == 0 and step != settings.total_steps:
                _checkpoint(engine, run_dir, pos, callback, "cadence")
    except KeyboardInterrupt:
        interrupted = True
        _drop_step_in_progress(engine, pos, step_start)
        _checkpoint(engine, run_dir, pos, callback, "interrupt")
    if not interrupted:
        if pos.stopped_early:
            # the run ships its best adapter, whose validation loss is known
            if engine.rank == 0:
                _save_adapter_atomic(engine, run_dir / ADAPTER, copy_of=run_dir / BEST_ADAPTER)
        else:
            validation.run(pos, pos.step)
            if engine.rank == 0:
                _save_adapter_atomic(engine, run_dir / ADAPTER)
        _checkpoint(engine, run_dir, pos, callback, "final")
    seconds = time.perf_counter() - t_start
    final_val_loss = pos.best_val_loss if pos.stopped_early else validation.last_loss
    result = LoopResult(pos.step, interrupted, pos.best_val_loss, pos.best_step, final_val_loss,
                        last_train_loss, pos.trained_tokens, seconds, engine.peak_memory_gb(),
                        pos.stopped_early)
    extra = ({"stopped_early": True, "best_step": pos.best_step, "evals_since_best": pos.evals_since_best}
             if pos.stopped_early else {})
    callback.on_end(TrainEnd(pos.step, last_train_loss, pos.best_val_loss, pos.best_step,
                             interrupted, seconds, pos.trained_tokens, result.peak_memory_gb, extra))
    return result


def check_not_stopped_early(pos: Position, settings: LoopSettings, ckpt: Path) -> None:
    """A run that stopped early is finished. It goes on only when early stopping is now off, or
    allows more validations without a new best than it has had; the stop is then forgotten.
    (``macft train --resume`` may call it before loading any weight.)"""
    if not pos.stopped_early:
        return
    if settings.early_stop and pos.evals_since_best >= settings.early_stop:
        run_dir = ckpt.parent.parent
        best = f"{pos.best_val_loss:.4f}" if pos.best_val_loss is not None else "-"
        raise MacftError(
            f"{run_dir} stopped early at step {pos.step}: its validation loss had not improved for "
            f"{pos.evals_since_best} evaluations (best {best} at step {pos.best_step}).",
            f"It is finished: its adapter/ is the best one (step {pos.best_step}). To train further, "
            "start a new run, or resume with --early-stop 0 (off) or a larger --early-stop.")
    pos.stopped_early = False


def _start_event(engine: Engine, plan: BatchPlan, settings: LoopSettings, pos: Position,
                 per_epoch: int) -> TrainStart:
    trainable, total_params = engine.param_counts()
    return TrainStart(
        total_steps=settings.total_steps, start_step=pos.step,
        steps_per_epoch=max(1, math.ceil(per_epoch / (settings.grad_accum * engine.world_size))),
        examples=plan.n_task, backend=engine.name, device=engine.device,
        trainable_params=trainable, total_params=total_params)


def _optimizer_step(engine: Engine, plan: BatchPlan, stream: Iterator[tuple[int, int, Batch]],
                    settings: LoopSettings, pos: Position, step: int, callback: TrainingCallback,
                    ) -> tuple[float, float]:
    """Optimizer step ``step``: its micro-batches, loss and token counts summed over the processes,
    AdamW at the schedule's rate. ``pos`` moves past the step, whose loss, tokens and time
    join the report window. Returns (learning rate, gradient norm)."""
    t0 = time.perf_counter()
    loss_sum, n_tok = _micro_batches(engine, plan, stream, settings.grad_accum, pos, step, callback)
    loss_sum, n_all = engine.all_sum([loss_sum, float(n_tok)])
    n_all = int(n_all)
    if n_all == 0:
        engine.discard_gradients()
        raise MacftError("An optimizer step had no trained token.",
                         "Check the data: every example needs a trained token.")
    lr = settings.schedule.lr(step)
    gnorm = engine.optimizer_step(lr, n_all, settings.max_grad_norm)
    step_loss = loss_sum / n_all
    if not math.isfinite(step_loss) or not math.isfinite(gnorm):
        raise Diverged(
            f"The loss became {step_loss} at step {step} (gradient norm {gnorm}).",
            "Lower --learning-rate; avoid fp16 (use bf16 or fp32: --precision fp32).")
    dt = time.perf_counter() - t0
    pos.step = step
    pos.trained_tokens += n_all
    pos.train_seconds += dt
    pos.window_loss += loss_sum
    pos.window_tokens += n_all
    pos.window_seconds += dt
    return lr, gnorm


def _micro_batches(engine: Engine, plan: BatchPlan, stream: Iterator[tuple[int, int, Batch]],
                   grad_accum: int, pos: Position, step: int, callback: TrainingCallback) -> tuple[float, int]:
    """Forward and backward on this process's ``grad_accum`` micro-batches of the step, ``pos``
    following the data after each. Returns this process's (loss sum, trained tokens)."""
    loss_sum, n_tok = 0.0, 0
    for micro in range(grad_accum):
        epoch, index, batch = next(stream)
        s, k = engine.train_micro(batch)
        loss_sum += s
        n_tok += k
        # position of the next global micro-batch after this process's one
        pos.epoch, pos.index = _advance(plan, epoch, index, engine.world_size - engine.rank)
        callback.on_micro(step, micro)
    return loss_sum, n_tok


def _close_window(engine: Engine, pos: Position, step: int, lr: float, gnorm: float, per_epoch: int,
                  t_start: float) -> StepReport:
    """The training-loss report over the steps since the last one; the window starts again."""
    last_train_loss = pos.window_loss / pos.window_tokens
    report = StepReport(
        step=step, epoch=_epoch_float(pos, per_epoch), loss=last_train_loss,
        learning_rate=lr, grad_norm=gnorm,
        tokens_per_sec=pos.window_tokens / pos.window_seconds if pos.window_seconds > 0 else 0.0,
        trained_tokens=pos.trained_tokens, peak_memory_gb=engine.peak_memory_gb(),
        elapsed_sec=time.perf_counter() - t_start)
    pos.window_loss, pos.window_tokens, pos.window_seconds = 0.0, 0, 0.0
    return report


class _Validation:
    """Validation runs: the last loss, and the best adapter so far kept in ``best_adapter/``."""

    def __init__(self, engine: Engine, valid: list[Batch], run_dir: Path, callback: TrainingCallback):
        self.engine, self.valid, self.run_dir, self.callback = engine, valid, run_dir, callback
        self.last_loss: float | None = None

    def run(self, pos: Position, step: int) -> None:
        if not self.valid:
            return
        t0 = time.perf_counter()
        loss, n = evaluate(self.engine, self.valid)
        self.last_loss = loss
        best = pos.best_val_loss is None or loss < pos.best_val_loss
        if best:
            pos.best_val_loss, pos.best_step, pos.evals_since_best = loss, step, 0
            if self.engine.rank == 0:
                _save_adapter_atomic(self.engine, self.run_dir / BEST_ADAPTER)
        else:
            pos.evals_since_best += 1
        self.callback.on_eval(EvalReport(step, loss, n, best, time.perf_counter() - t0))


def _drop_step_in_progress(engine: Engine, pos: Position, step_start: Position) -> None:
    """After a Ctrl-C: the gradients of the step in progress go, and when that step never
    reached the optimizer, ``pos`` goes back to its first micro-batch, where a resume starts."""
    engine.discard_gradients()
    if pos.step == step_start.step:
        pos.epoch, pos.index = step_start.epoch, step_start.index


def _advance(plan: BatchPlan, epoch: int, index: int, k: int) -> tuple[int, int]:
    for _ in range(k):
        index += 1
        if index >= len(plan.rows_for_epoch(epoch)):
            epoch, index = epoch + 1, 0
    return epoch, index


def _epoch_float(pos: Position, per_epoch: int) -> float:
    return pos.epoch + pos.index / max(per_epoch, 1)


def _save_adapter_atomic(engine: Engine, dest: Path, copy_of: Path | None = None) -> None:
    """Write the engine's adapter into ``dest`` or, with ``copy_of``, a copy of that adapter directory."""
    tmp = dest.with_name(dest.name + ".tmp")

    def write(d: Path) -> None:
        if copy_of is None:
            engine.save_adapter(d)
        else:
            shutil.copytree(copy_of, d, dirs_exist_ok=True)

    doing = f"writing the adapter {dest.name}/" + (f" (a copy of {copy_of.name}/)" if copy_of else "")
    _write_dir(tmp, write, doing, engine, previous=latest_checkpoint(dest.parent), run_dir=dest.parent)
    replace_dir(tmp, dest)


def _checkpoint(engine: Engine, run_dir: Path, pos: Position, callback: TrainingCallback,
                reason: str) -> None:
    if engine.rank != 0:
        return
    root = run_dir / CHECKPOINTS
    dest = root / checkpoint_name(pos.step)
    tmp = root / f".{dest.name}.tmp"

    def write(d: Path) -> None:
        engine.save_adapter(d)
        engine.save_state(d)
        (d / TRAINER_STATE).write_text(json.dumps(vars(pos), indent=1))

    _write_dir(tmp, write, f"writing the checkpoint of step {pos.step}", engine,
               previous=latest_checkpoint(run_dir), run_dir=run_dir)
    replace_dir(tmp, dest)
    for old in sorted(root.glob(CHECKPOINT_GLOB))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    callback.on_checkpoint(CheckpointSaved(pos.step, dest, reason))


def _write_dir(tmp: Path, write: Callable[[Path], None], doing: str, engine: Engine,
               previous: Path | None = None, run_dir: Path | None = None) -> None:
    """Fill the fresh directory ``tmp`` with ``write``; on any failure remove it. A full disk
    (or another OS error) becomes a :class:`MacftError` saying how much room it needs."""
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
    except BaseException as e:
        written = _dir_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e, tmp.parent):
            raise _disk_full_error(tmp, doing, engine, written, previous, run_dir) from e
        if isinstance(e, OSError):
            msg, hint = os_error_message(e, doing)
            raise MacftError(msg, hint) from e
        raise


def _disk_full_error(tmp: Path, doing: str, engine: Engine, written: int, previous: Path | None,
                     run_dir: Path | None) -> MacftError:
    from ..ui import human_bytes

    # about: the last checkpoint's size, or the fp32 adapter plus two AdamW moments
    need = max(written, _dir_bytes(previous) if previous else 0, 12 * engine.param_counts()[0])
    where = tmp.parent
    try:
        free = f"{human_bytes(shutil.disk_usage(where).free)} is free there"
    except OSError:
        free = "the free space there is unknown"
    msg = f"The disk is full: {doing} into {tmp} needs about {human_bytes(need)}, and {free}."
    if previous is not None and run_dir is not None:
        hint = (f"Free some space on that disk; {previous.name} is intact, and "
                f"`macft train --resume {run_dir}` continues from it.")
    else:
        hint = "Free some space on that disk (or use --output on a bigger one), then run the command again."
    return MacftError(msg, hint)


def _dir_bytes(path: Path | None) -> int:
    if path is None or not path.is_dir():
        return 0
    total = 0
    for f in path.rglob("*"):
        try:
            if f.is_file():
                total += f.stat().st_size
        except OSError:
            pass
    return total
