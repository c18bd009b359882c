"""Early stopping on the validation loss, in the loop both backends share.

A fake engine does no math: its validation loss follows a script by optimizer step, and the
adapters it writes hold the step they were written at, so a test can tell which one a run ships.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from macft.config import build_config, validate
from macft.data.batching import Batch, BatchPlan, eval_batches
from macft.data.dataset import Example
from macft.errors import ConfigError, Location, MacftError
from macft.run import ADAPTER, BEST_ADAPTER, TRAINER_STATE, latest_checkpoint
from macft.training.events import Recorder
from macft.training.loop import LoopSettings, Position, read_position, train
from macft.training.schedule import make_schedule

# validation loss after each optimizer step: better until step 3, then worse for good
IMPROVES_THEN_WORSENS = {0: 5.0, 1: 4.0, 2: 3.0, 3: 2.0}
STEP_FILE = "step.json"


def _scripted(losses: dict[int, float]):
    return lambda step: losses.get(step, 2.5 + 0.1 * step)


class FakeEngine:
    name = "fake"
    device = "cpu"
    rank = 0
    world_size = 1

    def __init__(self, val_loss=_scripted(IMPROVES_THEN_WORSENS)):
        self.val_loss = val_loss
        self.step = 0
        self.loaded_from: Path | None = None

    def train_micro(self, batch: Batch) -> tuple[float, int]:
        return 1.0 * batch.n_trained, batch.n_trained

    def optimizer_step(self, lr: float, n_tokens: int, max_grad_norm: float) -> float:
        self.step += 1
        return 1.0

    def discard_gradients(self) -> None:
        pass

    def eval_batch(self, batch: Batch) -> tuple[float, int]:
        return self.val_loss(self.step) * batch.n_trained, batch.n_trained

    def all_sum(self, values: list[float]) -> list[float]:
        return values

    def save_adapter(self, path: Path) -> None:
        (path / STEP_FILE).write_text(json.dumps({"step": self.step}))

    def save_state(self, path: Path) -> None:
        pass

    def load_state(self, path: Path) -> None:
        self.loaded_from = path
        self.step = json.loads((path / STEP_FILE).read_text())["step"]

    def peak_memory_gb(self) -> float:
        return 0.0

    def param_counts(self) -> tuple[int, int]:
        return 10, 100


def _examples(n: int) -> list[Example]:
    return [Example(np.arange(1, 9, dtype=np.int32), np.ones(8, np.uint8), Location("fake", i + 1))
            for i in range(n)]


def _train(run_dir: Path, early_stop: int, steps: int = 20, engine: FakeEngine | None = None,
           resume: bool = False):
    engine = engine or FakeEngine()
    settings = LoopSettings(total_steps=steps, grad_accum=1,
                            schedule=make_schedule("constant", 1e-3, steps, 0.0), max_grad_norm=1.0,
                            eval_every=1, save_every=0, log_every=1, early_stop=early_stop)
    plan = BatchPlan(_examples(8), 2, seed=0, pad_id=0)
    rec = Recorder()
    result = train(engine, plan, eval_batches(_examples(2), 2, 0), settings, run_dir, rec,
                   resume_from=latest_checkpoint(run_dir) if resume else None)
    return result, rec, engine


def _step_of(adapter: Path) -> int:
    return json.loads((adapter / STEP_FILE).read_text())["step"]


def test_stops_after_n_validations_without_a_new_best_and_ships_the_best_adapter(tmp_path):
    result, rec, _ = _train(tmp_path, early_stop=3)
    # best at step 3; steps 4, 5 and 6 bring nothing better
    assert result.stopped_early and not result.interrupted
    assert result.step == 6
    assert result.best_step == 3 and result.best_val_loss == pytest.approx(2.0)
    assert result.final_val_loss == result.best_val_loss
    assert _step_of(tmp_path / ADAPTER) == 3 == _step_of(tmp_path / BEST_ADAPTER)
    assert not (tmp_path / f"{ADAPTER}.tmp").exists()
    # no final validation after the stop: the last is the cadence one at step 6
    assert [e.step for e in rec.evals] == [0, 1, 2, 3, 4, 5, 6]
    assert rec.end is not None and rec.end.step == 6
    assert rec.end.extra == {"stopped_early": True, "best_step": 3, "evals_since_best": 3}
    # the final checkpoint holds the last step's weights and says the run stopped early
    assert [c.reason for c in rec.checkpoints] == ["final"]
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and _step_of(ckpt) == 6
    pos = read_position(ckpt)
    assert pos.step == 6 and pos.stopped_early and pos.evals_since_best == 3


def test_a_new_best_starts_the_count_again(tmp_path):
    losses = {0: 5.0, 1: 4.0, 2: 4.5, 3: 4.6, 4: 3.0, 5: 3.5, 6: 3.6}
    result, _, _ = _train(tmp_path, early_stop=3, engine=FakeEngine(_scripted(losses)))
    assert result.stopped_early and result.step == 7 and result.best_step == 4
    assert _step_of(tmp_path / ADAPTER) == 4


def test_off_by_default_runs_every_step(tmp_path):
    result, rec, _ = _train(tmp_path, early_stop=0, steps=12)
    assert not result.stopped_early and result.step == 12
    assert result.best_step == 3
    assert result.final_val_loss == pytest.approx(2.5 + 1.2)  # the final validation, not the best
    assert _step_of(tmp_path / ADAPTER) == 12 and _step_of(tmp_path / BEST_ADAPTER) == 3
    assert rec.end is not None and rec.end.extra == {}
    pos = read_position(latest_checkpoint(tmp_path))  # type: ignore[arg-type]
    assert not pos.stopped_early and pos.evals_since_best == 9


def test_resuming_a_run_that_stopped_early_is_refused(tmp_path):
    _train(tmp_path, early_stop=3)
    engine = FakeEngine()
    with pytest.raises(MacftError) as e:
        _train(tmp_path, early_stop=3, engine=engine, resume=True)
    assert f"{tmp_path} stopped early at step 6" in e.value.message
    assert "not improved for 3 evaluations (best 2.0000 at step 3)" in e.value.message
    assert "finished" in e.value.hint and "--early-stop 0" in e.value.hint
    assert engine.loaded_from is None  # refused before any weight is loaded
    assert _step_of(tmp_path / ADAPTER) == 3  # the shipped adapter is untouched


def test_resuming_with_early_stopping_off_continues(tmp_path):
    _train(tmp_path, early_stop=3)
    result, rec, engine = _train(tmp_path, early_stop=0, steps=12, resume=True)
    assert engine.loaded_from is not None
    assert not result.stopped_early and result.step == 12
    assert [e.step for e in rec.evals] == [7, 8, 9, 10, 11, 12]
    assert _step_of(tmp_path / ADAPTER) == 12 and _step_of(tmp_path / BEST_ADAPTER) == 3
    assert not read_position(latest_checkpoint(tmp_path)).stopped_early  # type: ignore[arg-type]


def test_resuming_with_more_patience_continues_until_it_runs_out(tmp_path):
    _train(tmp_path, early_stop=3)
    result, _, _ = _train(tmp_path, early_stop=5, resume=True)
    assert result.stopped_early and result.step == 8 and result.best_step == 3
    assert _step_of(tmp_path / ADAPTER) == 3


def test_old_trainer_state_without_early_stop_fields_loads(tmp_path):
    (tmp_path / TRAINER_STATE).write_text(json.dumps(
        {"step": 4, "epoch": 0, "index": 4, "trained_tokens": 56, "best_val_loss": 2.0, "best_step": 3,
         "train_seconds": 0.5, "window_loss": 0.0, "window_tokens": 0, "window_seconds": 0.0}))
    pos = read_position(tmp_path)
    assert pos == Position(step=4, index=4, trained_tokens=56, best_val_loss=2.0, best_step=3,
                           train_seconds=0.5)
    assert pos.evals_since_best == 0 and not pos.stopped_early


def test_negative_early_stop_is_refused(run_cli):
    with pytest.raises(ConfigError) as e:
        validate(build_config(None, {"train.early_stop": "-1"}))
    assert "train.early_stop must be 0 or positive, got -1" in str(e.value)
    rc, _, err = run_cli("train", "--model", "m", "--data", "d.jsonl", "--early-stop", "-1")
    assert rc != 0 and "train.early_stop must be 0 or positive, got -1" in err
