"""The run directory and the callbacks that write into it.

::

    runs/<name>/
      config.yaml          resolved configuration (+ 'resolved:' facts: backend, model path,
                           chat template, end tokens, data statistics)
      metrics.jsonl        one JSON object per report: {"type": "train"|"eval", "step": ...}
      loss.png             train and validation loss curves
      adapter/             PEFT adapter of the last step (adapter_config.json,
                           adapter_model.safetensors)
      best_adapter/        PEFT adapter with the lowest validation loss
      mlx_adapter/         mlx-lm native adapter (MLX backend; `mlx_lm.generate --adapter-path`)
      checkpoints/step-N/  resumable state (adapter, optimizer, RNG, data position)
      summary.json         final numbers
      .macft.lock          held (flock) by the process training this run

Every file is written to a temporary name and renamed; a process killed mid-write leaves
only temporaries, which the next ``macft train`` on the run removes.
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
from .events import EvalReport, StepReport, TrainEnd, TrainingCallback

METRICS = "metrics.jsonl"
LOCK_FILE = ".macft.lock"
# what a killed process leaves behind: directories being written, the previous version of a
# directory being replaced, files being written (write_text_atomic, plot_losses)
TEMPORARIES = ("checkpoints/.step-*.tmp", "adapter.tmp", "best_adapter.tmp", ".*.tmp", ".loss.tmp.png")


def default_run_name(model: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name) or "run"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(output: str | None, model: str) -> Path:
    """The run directory path; refuses to overwrite an earlier run."""
    path = Path(output) if output else Path("runs") / default_run_name(model)
    if path.exists() and not path.is_dir():
        raise MacftError(f"--output {path} is an existing file, not a directory.",
                         "Choose a new (or empty) directory for --output.")
    if path.exists() and any(p.name != LOCK_FILE for p in path.iterdir()):
        if (path / "config.yaml").exists():
            from .loop import latest_checkpoint

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


class RunLock:
    """An exclusive lock on a run directory (``flock`` on :data:`LOCK_FILE`), so two
    processes never train the same run. The kernel releases it when the process dies, even
    by SIGKILL: a stale lock file locks nothing."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # (Windows: no flock; macft does not train there)
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            pid = _read_pid(self.path)
            who = f"process {pid}" if pid else "another process"
            raise MacftError(
                f"{self.path.parent} is being trained by {who} (macft train) right now.",
                f"Wait for it to finish, or stop it (Ctrl-C in its terminal{f', or kill {pid}' if pid else ''}); "
                "then run this command again.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def replace_dir(tmp: Path, dest: Path) -> None:
    """Put the complete directory ``tmp`` in place of ``dest``. The old ``dest`` is moved
    aside, not deleted, until the new one is in place; :func:`remove_temporaries` puts it
    back if the process dies in between."""
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Remove what an interrupted or killed process left half-written in ``run_dir`` (call it
    while holding the :class:`RunLock`). Returns the paths removed."""
    removed = []
    for old in [*run_dir.glob(".*.old"), *run_dir.glob("checkpoints/.step-*.old")]:
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


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume: drop rows written after the checkpoint so the curve continues."""
    p = run_dir / METRICS
    if not p.exists():
        return
    keep = [ln for ln in p.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    write_text_atomic(p, "".join(ln + "\n" for ln in keep))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / METRICS
    if not p.exists():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


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
    out = run_dir / "loss.png"
    tmp = run_dir / ".loss.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def remove_failed_run(path: Path) -> None:
    """A run that failed before its first checkpoint leaves nothing behind."""
    if path.exists() and not any((path / "checkpoints").glob("step-*")):
        shutil.rmtree(path, ignore_errors=True)
