"""Training's side of the run directory (:mod:`macft.run` owns its layout and names): the
directory made or refused, the lock against a second trainer, the leftovers of a killed
process removed, and the callbacks that write metrics.jsonl and loss.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import MacftError, os_error_message
from ..run import (
    CHECKPOINT_GLOB,
    CHECKPOINTS,
    CONFIG,
    LOCK_FILE,
    LOCK_PID,
    LOSS_PLOT,
    LOSS_PLOT_TMP,
    METRICS,
    MOVED_ASIDE,
    TEMPORARIES,
    latest_checkpoint,
    read_metrics,
    replace_dir,
    write_text_atomic,
)
from .events import EvalReport, StepReport, TrainEnd, TrainingCallback

__all__ = ["LOCK_FILE", "METRICS", "TEMPORARIES", "LossPlot", "MetricsWriter", "RunLock",
           "default_run_name", "make_run_dir", "plot_losses", "prepare_run_dir", "read_metrics",
           "remove_failed_run", "remove_temporaries", "replace_dir", "truncate_metrics",
           "write_text_atomic"]


def default_run_name(model: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name) or "run"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(output: str | None, model: str) -> Path:
    """The run directory path; refuses to overwrite an earlier run."""
    path = Path(output) if output else Path("runs") / default_run_name(model)
    if path.exists() and not path.is_dir():
        raise MacftError(f"--output {path} is an existing file, not a directory.",
                         "Choose a new (or empty) directory for --output.")
    if path.exists() and any(p.name not in (LOCK_FILE, LOCK_PID) for p in path.iterdir()):
        if (path / CONFIG).exists():
            if latest_checkpoint(path) is None:
                raise MacftError(
                    f"{path} already holds a run, which stopped before its first checkpoint.",
                    f"Start it again with its saved settings: `macft train --resume {path}`; "
                    "or choose another --output.")
            raise MacftError(
                f"{path} already holds a run.",
                f"Continue it with `macft train --resume {path}`, or choose another --output.")
        raise MacftError(f"{path} exists and is not empty.", "Choose another --output.")
    return path


def make_run_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg, hint = os_error_message(e, f"creating the run directory {path}")
        raise MacftError(msg, hint) from None


# Held locks, referenced until released: filelock releases a lock whose object is garbage
# collected, and a RunLock holds until release() or the end of the process.
_HELD: set[RunLock] = set()


class RunLock:
    """An exclusive lock on a run directory (:data:`LOCK_FILE`, through ``filelock``: ``flock``
    on Unix, so the kernel releases it when the process dies, even by SIGKILL; a stale lock
    file locks nothing), so two processes never train the same run. The holder writes its
    PID beside it (:data:`LOCK_PID`) for the message refusing the second one."""

    def __init__(self, run_dir: Path):
        from filelock import FileLock

        self.path = run_dir / LOCK_FILE
        self.pid_path = run_dir / LOCK_PID
        self._lock = FileLock(str(self.path))

    def acquire(self) -> RunLock:
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            pid = _read_pid(self.pid_path)
            who = f"process {pid}" if pid else "another process"
            raise MacftError(
                f"{self.path.parent} is being trained by {who} (macft train) right now.",
                f"Wait for it to finish, or stop it (Ctrl-C in its terminal{f', or kill {pid}' if pid else ''}); "
                "then run this command again.") from None
        _HELD.add(self)
        try:
            write_text_atomic(self.pid_path, f"{os.getpid()}\n")
        except OSError:
            pass  # only the message to a second process loses the PID
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self.pid_path.unlink(missing_ok=True)
            self._lock.release()
        _HELD.discard(self)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Remove what an interrupted or killed process left half-written in ``run_dir`` (call it
    while holding the :class:`RunLock`). Returns the paths removed."""
    removed = []
    for old in [p for pattern in MOVED_ASIDE for p in run_dir.glob(pattern)]:
        dest = old.with_name(old.name[1:-len(".old")])
        if not dest.exists():
            old.rename(dest)  # died between moving the old version aside and the new one in
        else:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    for pattern in TEMPORARIES:
        for p in run_dir.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume: drop rows written after the checkpoint so the curve continues."""
    p = run_dir / METRICS
    if not p.exists():
        return
    keep = [ln for ln in p.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    write_text_atomic(p, "".join(ln + "\n" for ln in keep))


class MetricsWriter(TrainingCallback):
    def __init__(self, run_dir: Path):
        self.path = run_dir / METRICS

    def _write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def on_step(self, ev: StepReport) -> None:
        self._write({"type": "train", **asdict(ev)})

    def on_eval(self, ev: EvalReport) -> None:
        self._write({"type": "eval", **asdict(ev)})


class LossPlot(TrainingCallback):
    """loss.png from metrics.jsonl at the end (so resumed runs plot the whole curve)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_end(self, ev: TrainEnd) -> None:
        plot_losses(self.run_dir)


def plot_losses(run_dir: Path) -> Path | None:
    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if r["type"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r["type"] == "eval"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train", color="#1f77b4")
    if val:
        ax.plot(*zip(*val), label="validation", color="#d62728", marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per trained token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / LOSS_PLOT
    tmp = run_dir / LOSS_PLOT_TMP
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def remove_failed_run(path: Path) -> None:
    """A run that failed before its first checkpoint leaves nothing behind."""
    if path.exists() and not any((path / CHECKPOINTS).glob(CHECKPOINT_GLOB)):
        shutil.rmtree(path, ignore_errors=True)
