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

from ..errors import MacftError
from .events import EvalReport, StepReport, TrainEnd, TrainingCallback

METRICS = "metrics.jsonl"


def default_run_name(model: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name) or "run"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(output: str | None, model: str) -> Path:
    """The run directory path; refuses to overwrite an earlier run."""
    path = Path(output) if output else Path("runs") / default_run_name(model)
    if path.exists() and any(path.iterdir()):
        if (path / "config.yaml").exists():
            raise MacftError(
                f"{path} already holds a run.",
                f"Continue it with `macft train --resume {path}`, or choose another --output.")
        raise MacftError(f"{path} exists and is not empty.", "Choose another --output.")
    return path


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
