"""`--auto` inside `macft train` (and `macft tune`): plan the search for a prepared run, run it,
and hand the run its chosen settings and the winner's checkpoint to continue from."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig, read_yaml, validate
from ..errors import MacftError
from .plan import Budget, SearchPlan, plan_search
from .search import Search, SearchOutcome, remove_candidates

AUTO_DIR = "auto"
RECOMMENDED = "recommended.yaml"


@dataclass
class AutoRequest:
    """What `--auto` was asked: its budget, whether to stop after the search, and the settings
    the user gave explicitly (``"section.name"``), which are kept."""

    budget: Budget = field(default_factory=Budget)
    dry_run: bool = False
    explicit: set[str] = field(default_factory=set)


@dataclass
class AutoResult:
    cfg: RunConfig
    steps: int
    settings: Any  # LoopSettings of the run
    outcome: SearchOutcome


def explicit_keys(values: dict[str, Any], config_file: str | Path | None = None,
                  base: RunConfig | None = None) -> set[str]:
    """The settings a user chose: command-line flags (``values``), every key of the YAML
    config, and (Python API) every field of a whole RunConfig that differs from the defaults.
    A preset's values are defaults, not choices."""
    keys = set(values)
    if config_file:
        for sec, body in read_yaml(config_file).items():
            if isinstance(body, dict):
                keys |= {f"{sec}.{k}" for k in body}
    if base is not None:
        default = RunConfig().to_dict()
        for sec, body in base.to_dict().items():
            keys |= {f"{sec}.{k}" for k, v in body.items() if default[sec][k] != v}
    return keys


def check_auto(p: Any) -> None:
    if not p.valid:
        raise MacftError("--auto compares candidates on the validation loss, and this run has no "
                         "validation data.",
                         "Give --valid FILE, or hold out part of the data with --valid-fraction 0.1.")


def make_plan(p: Any, request: AutoRequest, seconds_per_step: float | None = None) -> SearchPlan:
    cfg = p.cfg
    per_epoch = max(1, math.ceil(p.plan.batches_per_epoch() / cfg.train.grad_accum))
    return plan_search(
        base_lr=cfg.train.learning_rate, base_rank=cfg.lora.rank, base_alpha=cfg.lora.alpha,
        epochs=cfg.train.epochs, iters=cfg.train.iters, eval_every=cfg.train.eval_every,
        early_stop=cfg.train.early_stop, warmup_ratio=cfg.train.warmup_ratio, steps_per_epoch=per_epoch,
        valid_batches=len(p.valid), fixed=request.explicit, budget=request.budget,
        seconds_per_step=seconds_per_step)


def seconds_per_step(p: Any, work: Path, steps: int = 5) -> float:
    """A duration budget in steps: a few timed steps of the run in ``work`` (deleted after); the
    first step, which compiles and warms up, is not counted."""
    import shutil

    from ..backends import TrainJob
    from ..training.events import Recorder
    from ..training.loop import LoopSettings
    from ..training.schedule import make_schedule
    from ..ui import status

    cfg = p.cfg
    settings = LoopSettings(total_steps=steps, grad_accum=cfg.train.grad_accum,
                            schedule=make_schedule("constant", cfg.train.learning_rate, steps, 0.0),
                            max_grad_norm=cfg.train.max_grad_norm, eval_every=0, save_every=0, log_every=1)
    rec = Recorder()
    work.mkdir(parents=True, exist_ok=True)
    try:
        with status(f"Timing {steps} training steps to turn the --auto-budget duration into steps ..."):
            p.backend.train(TrainJob(cfg, p.model_path, p.model_info, p.tokenizer, p.data, p.plan, [], settings,
                                     work), rec)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(rec.steps) < 2:
        raise MacftError("The timing steps for --auto-budget did not run.", "Give the budget as a fraction, "
                         "e.g. --auto-budget 0.25.")
    first, last = rec.steps[0], rec.steps[-1]
    return (last.elapsed_sec - first.elapsed_sec) / (last.step - first.step)


def show_plan(plan: SearchPlan, request: AutoRequest, sec_per_step: float | None = None) -> None:
    from ..ui import console, warn

    console.rule("Automatic hyperparameters (--auto)")
    console.print(f"Searching {plan.describe()}.")
    cost = f"about {plan.planned_cost:.0f} step-equivalents beyond the run's own steps"
    if sec_per_step:
        cost += f" (~{plan.planned_cost * sec_per_step / 60:.1f} min at {sec_per_step:.2f} s/step)"
    console.print(f"Budget {request.budget.describe()}: {cost}, of {plan.budget_steps:.0f} allowed.")
    if plan.fixed:
        kept = [k for k in plan.fixed if k in ("train.learning_rate", "lora.rank", "lora.alpha", "train.epochs",
                                              "train.iters", "train.eval_every", "train.early_stop",
                                              "train.warmup_ratio")]
        if kept:
            console.print(f"Kept as given: {', '.join(kept)}.")
    for n in plan.notes:
        warn(f"--auto: {n}.")


def final_config(p: Any, search: Search, outcome: SearchOutcome) -> RunConfig:
    if outcome.winner is not None:
        cfg = search.config_for(outcome.winner.candidate)
        cfg.train.learning_rate = outcome.chosen["learning_rate"]
    else:
        plan = outcome.plan
        cfg = copy.deepcopy(p.cfg)
        cfg.train.eval_every, cfg.train.early_stop = plan.eval_every, plan.early_stop
        if cfg.train.iters <= 0:
            cfg.train.epochs = plan.epochs
    validate(cfg)
    return cfg


def run_auto(p: Any, request: AutoRequest, run_dir: Path) -> AutoResult:
    """Plan and run the search in ``run_dir/auto``; the run's config, steps and loop settings
    with the chosen values (the run starts from step 0)."""
    from ..training.loop import LoopSettings

    check_auto(p)
    sps = seconds_per_step(p, run_dir / AUTO_DIR / "timing") if request.budget.seconds is not None else None
    plan = make_plan(p, request, sps)
    show_plan(plan, request, sps)
    search = Search(p, plan, run_dir / AUTO_DIR)
    outcome = search.run()
    cfg = final_config(p, search, outcome)
    cfg.train.output = str(run_dir)
    steps = plan.run_steps
    settings = LoopSettings.from_config(cfg.train, steps)
    remove_candidates(run_dir / AUTO_DIR, outcome.runs)
    return AutoResult(cfg, steps, settings, outcome)


def check_run_answers(p: Any, auto: AutoResult, run_dir: Path) -> None:
    """The finished run's greedy answers to the held-out prompts the search used: recorded in
    the summary, and a warning when they do not stop at the end of the turn or repeat."""
    from ..run import ADAPTER
    from ..ui import status, warn
    from .behaviour import check, held_out_prompts

    prompts = held_out_prompts(p.data.valid_samples, p.tokenizer)
    if not prompts:
        return
    with status(f"Checking the run's answers to {len(prompts)} held-out prompts ..."):
        answers = check(p.backend, p.model_path, run_dir / ADAPTER, p.renderer, prompts)
    auto.outcome.answers = [a.to_dict() for a in answers]
    bad = [a for a in answers if not a.ok]
    if bad:
        what = "did not stop at the end of the turn" if any(not a.stopped for a in bad) else "repeated itself"
        warn(f"{len(bad)} of {len(answers)} greedy answers to held-out prompts {what} (they are in "
             "summary.json, auto.answers). More data, or more epochs (--epochs) with a lower "
             "--learning-rate, usually helps; `macft eval --run RUN` measures the stop rate on more prompts.")


def summary_rows(outcome: SearchOutcome) -> list[tuple[str, str]]:
    c = outcome.chosen
    rows = [("auto: learning rate", f"{c['learning_rate']:.2e} ({outcome.reasons.get('learning_rate', 'base')}"
                                    + (f"; {outcome.reasons['horizon']}" if "horizon" in outcome.reasons else "")
                                    + ")"),
            ("auto: rank", f"{c['rank']} (alpha {c['alpha']:g}; {outcome.reasons.get('rank', 'base')})"),
            ("auto: epochs", f"{outcome.reasons.get('epochs', '')}")]
    if "final" in outcome.reasons:
        rows.append(("auto: final rung", outcome.reasons["final"]))
    if outcome.answers is not None:
        ok = sum(1 for a in outcome.answers if a["stopped"] and not a["repetitive"])
        rows.append(("auto: answers", f"{ok}/{len(outcome.answers)} held-out prompts answered, stopping at the "
                                      "end of the turn without repeating"))
    cost = outcome.cost
    rows.append(("auto: search cost", f"{cost['candidates']} candidates, {cost['search_trained_tokens']:,} trained "
                                      f"tokens beside the run's, {cost['seconds']:.0f} s"))
    return rows
