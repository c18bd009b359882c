"""The run directory: every file name in it, how its files are written, and a typed view of
a finished (or unfinished) run. No other module spells these names.

::

    runs/<name>/
      config.yaml              resolved configuration (+ 'resolved:' facts, :class:`Resolved`)
      metrics.jsonl            one JSON object per report: {"type": "train"|"eval", "step": ...}
      loss.png                 train and validation loss curves
      adapter/                 PEFT adapter of the last step (adapter_config.json,
                               adapter_model.safetensors: the format is :mod:`macft.adapter`'s)
      best_adapter/            PEFT adapter with the lowest validation loss
      mlx_adapter/             mlx-lm native adapter (MLX backend; `mlx_lm.generate --adapter-path`)
      base_quantization.json   how training quantized the base (QLoRA runs only; :mod:`export.dequant`)
      checkpoints/step-N/      resumable state (adapter, optimizer, RNG, trainer_state.json)
      summary.json             final numbers
      export/                  ``macft export --run`` output (the default --output)
      .macft.lock              held (flock) by the process training this run
      .macft.lock.pid          that process's id, for the message refusing a second one

Every file is written to a temporary name and renamed (:func:`write_text_atomic`,
:func:`write_json_atomic`, :func:`replace_dir`); a process killed mid-write leaves only
temporaries (:data:`TEMPORARIES`), which the next ``macft train`` on the run removes.

``open_run(path)`` reads a run once, for every command that uses one: chat, generate, eval
and export resolve the adapter and the base model through it, by the same rules.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MacftError

if TYPE_CHECKING:
    from .config import RunConfig
    from .fingerprint import Comparison

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
SUMMARY = "summary.json"
ADAPTER = "adapter"
BEST_ADAPTER = "best_adapter"
MLX_ADAPTER = "mlx_adapter"
QUANTIZATION = "base_quantization.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step-"  # checkpoints/step-000040/
CHECKPOINT_GLOB = CHECKPOINT_PREFIX + "*"
TRAINER_STATE = "trainer_state.json"  # in each checkpoint: step, data position, best loss
LOCK_FILE = ".macft.lock"
LOCK_PID = LOCK_FILE + ".pid"
EXPORT = "export"

# what a killed process leaves behind: directories being written, the previous version of a
# directory being replaced, files being written (write_text_atomic, the loss plot)
LOSS_PLOT_TMP = ".loss.tmp.png"
TEMPORARIES = (f"{CHECKPOINTS}/.{CHECKPOINT_GLOB}.tmp", f"{ADAPTER}.tmp", f"{BEST_ADAPTER}.tmp", ".*.tmp",
               LOSS_PLOT_TMP)
# directories moved aside by replace_dir until their new version is in place
MOVED_ASIDE = (".*.old", f"{CHECKPOINTS}/.{CHECKPOINT_GLOB}.old")


# --------------------------------------------------------------------------- writing


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any, *, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent))


def replace_dir(tmp: Path, dest: Path) -> None:
    """Put the complete directory ``tmp`` in place of ``dest``. The old ``dest`` is moved
    aside, not deleted, until the new one is in place; :func:`macft.training.rundir.remove_temporaries`
    puts it back if the process dies in between."""
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def write_quantization(run_dir: Path, record: dict[str, Any]) -> None:
    """Record how training quantized the base (``base_quantization.json``; export's merge
    repeats it, :mod:`export.dequant`)."""
    write_json_atomic(Path(run_dir) / QUANTIZATION, record, indent=1)


def read_quantization(run_dir: Path | None) -> dict[str, Any] | None:
    """The run's base quantization record as written, or None (not a quantized run)."""
    if run_dir is None:
        return None
    p = Path(run_dir) / QUANTIZATION
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise MacftError(f"{p} is not valid JSON: {e}", "Restore the file written by `macft train`.") from None
    if not isinstance(data, dict):
        raise MacftError(f"{p} is not a JSON object.", "Restore the file written by `macft train`.")
    return data


# --------------------------------------------------------------------------- checkpoints


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def checkpoint_dirs(run_dir: Path, holding: str = TRAINER_STATE) -> list[Path]:
    """The run's checkpoints that hold the file ``holding``, oldest first (the default: those
    complete enough to resume from)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(CHECKPOINT_GLOB) if (p / holding).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    ck = checkpoint_dirs(run_dir)
    return ck[-1] if ck else None


# --------------------------------------------------------------------------- resolved facts


@dataclass
class Resolved:
    """What ``macft train`` resolved, saved under ``resolved:`` in ``config.yaml`` and read
    back by chat, eval and export, which never ask again. Runs written by older versions lack
    some fields: they read as None (``end_tokens``: empty); unknown keys are kept in ``extra``."""

    macft_version: str | None = None
    created: str | None = None  # "YYYY-MM-DD HH:MM:SS", local time
    host: str | None = None
    backend: str | None = None  # "mlx" or "cuda"
    device: str | None = None
    model_path: str | None = None  # the local directory the base was loaded from
    model_type: str | None = None
    architectures: list[str] | None = None
    chat_template: str | None = None  # "model", a named template, a file, or "fallback"
    # the template used when it is not the tokenizer's own: chat, eval and export use it
    chat_template_text: str | None = None
    fallback_template: str | None = None
    end_tokens: list[str] = field(default_factory=list)  # every token that ends a turn
    data_format: str | None = None
    valid_from: str | None = None
    train_stats: dict[str, Any] | None = None
    valid_stats: dict[str, Any] | None = None
    total_steps: int | None = None
    # which weights the adapter belongs to (macft.fingerprint): export, chat and eval compare it
    base_fingerprint: dict[str, Any] | None = None
    preset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Resolved:
        data = dict(data) if isinstance(data, dict) else {}
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        values["end_tokens"] = [str(t) for t in values.get("end_tokens") or []]
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The mapping saved in config.yaml (fields in order, then ``extra``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    def training_template(self) -> str | None:
        """The chat template the run trained with when it is not the tokenizer's own (a named
        template, a user's file, or the fallback), else None."""
        if self.chat_template_text:
            return str(self.chat_template_text)
        if self.chat_template == "fallback":
            from .data.render import FALLBACK_TEMPLATE

            return str(self.fallback_template or FALLBACK_TEMPLATE)
        return None


# --------------------------------------------------------------------------- a run


def missing_adapter(run: Path, best: bool, base: str | None = None) -> MacftError | None:
    """None when the run has the adapter asked for; else the error saying what state the run is
    in (still training or killed before its first checkpoint, interrupted with checkpoints,
    finished without a best adapter) and what to do."""
    from .adapter import WEIGHTS_NAME

    name = BEST_ADAPTER if best else ADAPTER
    if (run / name / WEIGHTS_NAME).is_file():
        return None
    ckpts = checkpoint_dirs(run, holding=WEIGHTS_NAME)
    if best and (run / ADAPTER / WEIGHTS_NAME).is_file():
        return MacftError(f"{run} has no {BEST_ADAPTER}/: the run finished, but it kept no best adapter "
                          "(no validation loss was measured, e.g. --eval-every 0).",
                          f"Use its final {ADAPTER}/ (drop --best).")
    best_so_far = (not best and (run / BEST_ADAPTER / WEIGHTS_NAME).is_file())
    also = " Or use its best adapter so far: add --best." if best_so_far else ""
    if ckpts:
        last = ckpts[-1]
        step = last.name[len(CHECKPOINT_PREFIX):].lstrip("0") or "0"
        return MacftError(f"{run} has no {name}/ yet: the run stopped (or is still training) after its "
                          f"checkpoint at step {step} ({last}); {name}/ is written when training ends.",
                          f"Finish it with `macft train --resume {run}`, or use that checkpoint's adapter "
                          f"now: --adapter {last} --model {base or 'BASE'}.{also}")
    return MacftError(f"{run} has no {name}/ and no checkpoint: the run stopped (or is still training) "
                      "before its first checkpoint, so there is nothing to use yet.",
                      "Wait for it to finish, or start the training again (`macft train ...`; "
                      f"checkpoints are written every --save-every steps).{also}")


@dataclass
class Run:
    """A run directory as ``macft train`` wrote it (see the module docstring)."""

    path: Path
    config: RunConfig
    resolved: Resolved

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER

    @property
    def best_adapter_dir(self) -> Path:
        return self.path / BEST_ADAPTER

    @property
    def mlx_adapter_dir(self) -> Path:
        return self.path / MLX_ADAPTER

    @property
    def export_dir(self) -> Path:
        """Where ``macft export --run`` writes unless given --output."""
        return self.path / EXPORT

    @property
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (resumable), oldest first."""
        return checkpoint_dirs(self.path)

    @property
    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    @property
    def backend(self) -> str:
        """The backend that trained the run (runs older than the record: "cuda")."""
        return self.resolved.backend or "cuda"

    @property
    def base_model(self) -> str | None:
        """The base model to load the adapter on: the directory training loaded, unless it is
        gone (then the name given to training: a hub id, downloaded again). The one rule of
        chat, generate, eval and export."""
        recorded = self.resolved.model_path
        if recorded and Path(str(recorded)).exists():
            return str(recorded)
        return self.config.model.name or None

    @property
    def quantization(self) -> dict[str, Any] | None:
        """The ``base_quantization.json`` record, or None (the base was not quantized)."""
        return read_quantization(self.path)

    def adapter(self, best: bool = False) -> Path:
        """``adapter/`` (``best_adapter/`` with ``best``); refused, saying what state the run
        is in and what to do, when it is not there (yet)."""
        problem = missing_adapter(self.path, best, self.base_model)
        if problem is not None:
            raise problem
        return self.best_adapter_dir if best else self.adapter_dir

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def summary(self) -> dict[str, Any] | None:
        """``summary.json`` (None while the run has not ended)."""
        p = self.path / SUMMARY
        if not p.is_file():
            return None
        return json.loads(p.read_text(encoding="utf-8"))

    def check_base(self, model_dir: str | Path, *, force: bool = False,
                   other_base_hint: str = "") -> Comparison | None:
        """Refuse a base whose weights differ from those the run trained on (``force``: warn
        and go ahead); :func:`macft.fingerprint.check_base`."""
        from .fingerprint import check_base

        return check_base(self.resolved.to_dict(), self.path, model_dir, force=force,
                          other_base_hint=other_base_hint)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / METRICS
    if not p.exists():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def read_config(run_dir: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """Read a run directory's ``config.yaml``: the config and its ``resolved`` facts."""
    from .config import build_config, read_yaml

    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise MacftError(
            f"{run_dir} is not a macft run directory: {path.name} is missing.",
            f"Pass the directory that `macft train` wrote (it holds {CONFIG}, {ADAPTER}/, {METRICS}).")
    data = read_yaml(path)
    cfg = build_config(base=data)
    return cfg, dict(data.get("resolved") or {})


def open_run(path: str | Path) -> Run:
    """The run in ``path``; refused when it is not a run directory."""
    run = Path(path)
    if not run.is_dir():
        raise MacftError(f"Run directory {run} does not exist.", "Pass the directory `macft train` wrote.")
    cfg, resolved = read_config(run)
    return Run(run, cfg, Resolved.from_dict(resolved))
