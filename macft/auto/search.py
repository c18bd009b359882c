"""Run the search planned by :mod:`macft.auto.plan` on a prepared run.

Every candidate is a short run of the real training (the shared loop, the backend's engine)
in ``auto/<name>/``; a candidate that goes on to the next rung resumes from its checkpoint.
The records land in ``auto/search.jsonl`` (one row per candidate: settings, steps, loss
curves, cost, answers) and ``auto/search.png``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Diverged, MacftError
from ..run import ADAPTER, write_text_atomic
from ..training.events import EvalReport, StepReport, TrainingCallback, TrainStart
from .behaviour import Answer, check, held_out_prompts
from .plan import SURVIVORS, Candidate, Score, SearchPlan, rank_scores

SEARCH_JSONL = "search.jsonl"
SEARCH_PNG = "search.png"


@dataclass
class CandidateRun:
    candidate: Candidate
    dir: Path
    steps: int = 0
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    trained_tokens: int = 0
    eval_tokens: int = 0
    seconds: float = 0.0
    diverged: str | None = None
    answers: list[Answer] | None = None
    outcome: str = ""

    @property
    def val_loss(self) -> float:
        if self.diverged or not self.val_curve:
            return math.nan
        return self.val_curve[-1][1]

    def behaviour_ok(self) -> int | None:
        return None if self.answers is None else sum(a.ok for a in self.answers)

    def score(self) -> Score:
        return Score(self.candidate, self.val_loss, self.behaviour_ok())

    def to_dict(self) -> dict[str, Any]:
        c = self.candidate
        return {"name": c.name, "stage": c.stage, "learning_rate": c.learning_rate, "rank": c.rank,
                "alpha": c.alpha, "steps": self.steps,
                "val_loss": None if math.isnan(self.val_loss) else self.val_loss,
                "val_curve": [[s, v] for s, v in self.val_curve],
                "train_curve": [[s, v] for s, v in self.train_curve],
                "trained_tokens": self.trained_tokens, "eval_tokens": self.eval_tokens,
                "seconds": round(self.seconds, 2), "diverged": self.diverged,
                "answers": None if self.answers is None else [a.to_dict() for a in self.answers],
                "outcome": self.outcome}


@dataclass
class SearchOutcome:
    plan: SearchPlan
    runs: list[CandidateRun]
    winner: CandidateRun | None  # None: nothing was searched (the run starts from step 0)
    chosen: dict[str, Any]
    reasons: dict[str, str]
    cost: dict[str, Any]
    answers: list[dict[str, Any]] | None = None  # the finished run's answers to the held-out prompts

    def summary(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "reasons": self.reasons, "cost": self.cost, "answers": self.answers,
                "plan": {k: v for k, v in self.plan.to_dict().items() if k not in ("notes",)},
                "notes": self.plan.notes, "candidates": len(self.runs)}


class _Collect(TrainingCallback):
    """A candidate's curves, and its line in the search's progress display."""

    def __init__(self, run: CandidateRun, progress: Any, task: Any):
        self.run, self.progress, self.task = run, progress, task

    def on_start(self, ev: TrainStart) -> None:
        self.progress.update(self.task, completed=ev.start_step)

    def on_micro(self, step: int, micro: int) -> None:
        self.progress.update(self.task, completed=step)

    def on_step(self, ev: StepReport) -> None:
        self.run.train_curve.append((ev.step, ev.loss))
        self.run.trained_tokens = ev.trained_tokens

    def on_eval(self, ev: EvalReport) -> None:
        if self.run.val_curve and self.run.val_curve[-1][0] == ev.step:
            return  # the rung-end evaluation of a resumed candidate repeats its last one
        self.run.val_curve.append((ev.step, ev.val_loss))
        self.run.eval_tokens += ev.val_tokens
        self.progress.update(self.task, val=f"val {ev.val_loss:.3f}")


class Search:
    def __init__(self, p: Any, plan: SearchPlan, auto_dir: Path):
        self.p, self.plan, self.dir = p, plan, auto_dir
        self.runs: list[CandidateRun] = []
        self.prompts = held_out_prompts(p.data.valid_samples, p.tokenizer)

    # -- one candidate, up to a step --------------------------------------------------
    def config_for(self, c: Candidate) -> Any:
        cfg = copy.deepcopy(self.p.cfg)
        cfg.train.learning_rate = c.learning_rate
        cfg.lora.rank = c.rank
        cfg.lora.alpha = c.alpha
        cfg.train.warmup_ratio = self.plan.warmup_ratio
        cfg.train.eval_every = self.plan.eval_every
        cfg.train.early_stop = self.plan.early_stop
        if cfg.train.iters <= 0:
            cfg.train.epochs = self.plan.epochs
        return cfg

    def settings_for(self, cfg: Any, total_steps: int, early_stop: int) -> Any:
        from ..training.loop import LoopSettings

        return LoopSettings.from_config(cfg.train, total_steps, schedule_steps=self.plan.run_steps,
                                        save_every=0, early_stop=early_stop)

    def train_to(self, run: CandidateRun, steps: int, progress: Any) -> None:
        from ..backends import TrainJob
        from ..run import latest_checkpoint
        from ..training.events import CallbackList
        from ..training.rundir import MetricsWriter

        if run.diverged or run.steps >= steps:
            return
        p = self.p
        cfg = self.config_for(run.candidate)
        # early stopping belongs to the run; a candidate trains its rung whatever its curve
        settings = self.settings_for(cfg, steps, early_stop=0)
        run.dir.mkdir(parents=True, exist_ok=True)
        resume = latest_checkpoint(run.dir) if run.steps else None
        job = TrainJob(cfg, p.model_path, p.model_info, p.tokenizer, p.data, p.plan, p.valid, settings,
                       run.dir, resume)
        task = progress.add_task(f"{run.candidate.name}: {run.candidate.label()}", total=steps,
                                 completed=run.steps, val="")
        t0 = time.perf_counter()
        try:
            result = p.backend.train(job, CallbackList([_Collect(run, progress, task),
                                                        MetricsWriter(run.dir)]))
        except Diverged as e:
            run.diverged = e.message
            progress.update(task, val="diverged")
            return
        finally:
            run.seconds += time.perf_counter() - t0
        if result.interrupted:
            raise KeyboardInterrupt
        run.steps = result.step

    # -- the whole search ------------------------------------------------------------
    def run(self) -> SearchOutcome:
        from ..ui import console, task_progress

        plan = self.plan
        self.dir.mkdir(parents=True, exist_ok=True)
        if not plan.searches_anything:
            return self._outcome(None, {})
        reasons: dict[str, str] = {}
        progress = task_progress(transient=False)
        progress.columns = (*progress.columns, _field_column())
        with progress:
            first = [self._new(c) for c in plan.first_rung()]
            for r in first:
                self.train_to(r, plan.rung1, progress)
                self._write()
            best = self._best(first)
            if len(first) > 1:
                while (edge := plan.edge_candidate(best.candidate.learning_rate,
                                                   [r.candidate.learning_rate for r in first])) is not None:
                    extra = self._new(edge)
                    self.train_to(extra, plan.rung1, progress)
                    first.append(extra)
                    self._write()
                    best = self._best(first)
                reasons["learning_rate"] = _compare(first, plan.rung1, "learning rate",
                                                    lambda c: f"{c.learning_rate:.1e}")
            ranked = [best]
            if plan.ranks:
                ranked += [self._new(c) for c in plan.rank_candidates(best.candidate.learning_rate)]
                for r in ranked[1:]:
                    self.train_to(r, plan.rung1, progress)
                    self._write()
                reasons["rank"] = _compare(ranked, plan.rung1, "rank", lambda c: str(c.rank))
            pool = first + ranked[1:]
            order = [s.candidate.name for s in rank_scores([r.score() for r in pool])]
            alive = [r for r in sorted(pool, key=lambda r: order.index(r.candidate.name)) if not r.diverged]
            if not alive:
                raise MacftError("Every candidate of the search diverged (the loss became NaN or infinite).",
                                 "Give a lower --learning-rate explicitly, or check the data and --precision.")
            survivors = alive[:SURVIVORS]
            for r in pool:
                r.outcome = "rung 1" if r not in survivors else "rung 2"
            for r in survivors:
                self.train_to(r, plan.rung2, progress)
                self._write()
        for r in survivors:
            if not r.diverged and self.prompts:
                with _status(f"Checking {r.candidate.name}'s answers to {len(self.prompts)} held-out prompts ..."):
                    r.answers = check(self.p.backend, self.p.model_path, r.dir / ADAPTER, self.p.renderer,
                                      self.prompts)
        if all(r.diverged for r in survivors):
            raise MacftError("Both candidates left at the last comparison diverged (the loss became NaN or "
                             "infinite).", "Give a lower --learning-rate explicitly, or check the data and "
                             "--precision.")
        final = rank_scores([r.score() for r in survivors])
        winner = next(r for r in survivors if r.candidate.name == final[0].candidate.name)
        winner.outcome = "chosen"
        reasons["final"] = _final_reason(survivors, winner, plan.rung2)
        self._write()
        self._plot(winner)
        outcome = self._outcome(winner, reasons)
        console.print(f"Auto: {winner.candidate.label()} won ({reasons['final']}); the run: learning rate "
                      f"{outcome.chosen['learning_rate']:.2e}, rank {outcome.chosen['rank']}.")
        return outcome

    # -- helpers -------------------------------------------------------------------
    def _new(self, c: Candidate) -> CandidateRun:
        r = CandidateRun(c, self.dir / c.name)
        self.runs.append(r)
        return r

    @staticmethod
    def _best(runs: list[CandidateRun]) -> CandidateRun:
        top = rank_scores([r.score() for r in runs])[0].candidate
        return next(r for r in runs if r.candidate == top)

    def _write(self) -> None:
        text = "".join(json.dumps(r.to_dict()) + "\n" for r in self.runs)
        write_text_atomic(self.dir / SEARCH_JSONL, text)

    def _plot(self, winner: CandidateRun | None) -> None:
        plot_search(self.dir, self.runs, winner)

    def _outcome(self, winner: CandidateRun | None, reasons: dict[str, str]) -> SearchOutcome:
        plan = self.plan
        c = winner.candidate if winner else None
        lr = plan.base_lr
        if c is not None:
            lr = c.learning_rate
            if "train.learning_rate" not in plan.fixed and plan.horizon_factor < 1:
                lr = float(f"{c.learning_rate * plan.horizon_factor:.3g}")
                reasons["horizon"] = (
                    f"{c.learning_rate:.1e} learned best over the first {plan.rung2} of {plan.run_steps} steps; "
                    f"rates compared that early favour fast early learning, so the run takes "
                    f"{c.learning_rate:.1e} x ({plan.rung2}/{plan.run_steps})^(1/3) = {lr:.2e}")
        chosen = {"learning_rate": lr,
                  "rank": c.rank if c else plan.base_rank,
                  "alpha": c.alpha if c else plan.alpha_for(plan.base_rank),
                  "epochs": plan.epochs, "early_stop": plan.early_stop, "eval_every": plan.eval_every,
                  "warmup_ratio": plan.warmup_ratio, "run_steps": plan.run_steps,
                  "rung2_learning_rate": c.learning_rate if c else None}
        for key, label in (("train.learning_rate", "learning_rate"), ("lora.rank", "rank")):
            if key in plan.fixed:
                reasons[label] = "given explicitly: kept"
        if {"train.epochs", "train.iters"} & set(plan.fixed):
            reasons["epochs"] = "given explicitly: kept"
        else:
            reasons["epochs"] = (f"up to {plan.epochs:g} epochs ({plan.run_steps} steps, "
                                 f"{plan.steps_per_epoch} per epoch); validation every {plan.eval_every} "
                                 f"steps and the run stops when it has not improved for "
                                 f"{plan.early_stop} evaluations")
        cost = {"candidates": len(self.runs),
                "search_trained_tokens": sum(r.trained_tokens for r in self.runs),
                "eval_tokens": sum(r.eval_tokens for r in self.runs),
                "search_steps": sum(r.steps for r in self.runs),
                "seconds": round(sum(r.seconds for r in self.runs), 2),
                "budget_steps": round(plan.budget_steps, 1), "planned_cost_steps": round(plan.planned_cost, 1)}
        return SearchOutcome(plan, self.runs, winner, chosen, reasons, cost)


def _field_column() -> Any:
    from rich.progress import TextColumn

    return TextColumn("{task.fields[val]}")


def _status(msg: str) -> Any:
    from ..ui import status

    return status(msg)


def _compare(runs: list[CandidateRun], step: int, what: str, fmt: Any) -> str:
    best = rank_scores([r.score() for r in runs])[0].candidate
    others = ", ".join(f"{fmt(r.candidate)}: " + ("diverged" if r.diverged else f"{r.val_loss:.4f}")
                       for r in sorted(runs, key=lambda r: (r.candidate.learning_rate, r.candidate.rank)))
    return (f"{fmt(best)}: the lowest validation loss at step {step} of {len(runs)} "
            f"{what}s tried ({others})")


def _final_reason(survivors: list[CandidateRun], winner: CandidateRun, step: int) -> str:
    parts = []
    for r in survivors:
        ok = r.behaviour_ok()
        beh = "" if ok is None else f", {ok}/{len(r.answers or [])} answers stopped without repeating"
        parts.append(f"{r.candidate.label()}: validation {r.val_loss:.4f}{beh}")
    return f"at step {step}: " + "; ".join(parts)


def plot_search(auto_dir: Path, runs: list[CandidateRun], winner: CandidateRun | None) -> Path | None:
    """Every candidate's validation curve (and training loss, faint); the winner in bold."""
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(runs):
        color = cmap(i % 10)
        lw = 2.5 if r is winner else 1.2
        if r.train_curve:
            ax.plot(*zip(*r.train_curve), color=color, alpha=0.25, lw=1)
        if r.val_curve:
            ax.plot(*zip(*r.val_curve), color=color, lw=lw, marker="o", markersize=3,
                    label=r.candidate.label() + (" (chosen)" if r is winner else ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (faint: training loss)")
    ax.set_title("macft --auto: candidates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = auto_dir / SEARCH_PNG
    tmp = auto_dir / (".tmp-" + SEARCH_PNG)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out


def remove_candidates(auto_dir: Path, runs: list[CandidateRun]) -> None:
    """The candidates' weights go once the search is recorded (search.jsonl keeps their curves)."""
    for r in runs:
        shutil.rmtree(r.dir, ignore_errors=True)
