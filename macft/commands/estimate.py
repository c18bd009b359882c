"""`macft estimate`: peak memory part by part, whether it fits, settings that fit, and the
time per epoch from a short calibration run (see :mod:`macft.sizing`).

``run(args)`` turns the command line into a config; :func:`assess` and :func:`calibrate` do the
work and return data (``macft.estimate`` in Python calls them too); the rest prints.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import RunConfig, build_config, validate
from ..errors import BackendUnavailable, MacftError
from ..presets import get_preset
from ._args import add_config_flags, cli_values

# The memory model (numpy), the backends and rich are imported where they are used, so that
# `macft estimate --help` stays quick.
if TYPE_CHECKING:
    from ..sizing import Estimate

HELP = ("Predict peak memory (and, with --data, time per epoch) before training; "
        "suggest settings that fit.")
SECTIONS = ("model", "lora", "data", "train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config; command-line flags override it.")
    p.add_argument("--preset", metavar="NAME", help="Start from a preset (see `macft models`).")
    p.add_argument("--calibrate-steps", type=int, default=4, metavar="N",
                   help="Training steps to time for the time per epoch (needs --data and the weights; "
                        "0: memory only, nothing loaded). Default 4.")
    p.add_argument("--json", action="store_true", help="Print the estimate as JSON on stdout.")
    p.add_argument("--auto", action="store_true", help="Also show what `macft train --auto` would search "
                   "and what the search costs (needs --data).")
    p.add_argument("--auto-budget", metavar="F|DURATION", default=None,
                   help="The search's budget, as for `macft train --auto` (default 0.25 of the run).")
    add_config_flags(p, SECTIONS)


def run(args: argparse.Namespace) -> int:
    from .train import auto_request

    values = cli_values(args, SECTIONS)
    cfg = resolve(values, config_file=args.config, preset=args.preset)
    report = estimate_and_show(cfg, preset=args.preset, calibrate_steps=args.calibrate_steps,
                               auto=auto_request(args, values))
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    return 0 if report.fits else 1


# --------------------------------------------------------------------------- the data


@dataclass
class Suggestion:
    flags: str  # the flags to add, e.g. "--batch-size 2 --grad-accum 4"
    total_bytes: int  # the peak with them


@dataclass
class Calibration:
    """A few real training steps, timed (the first, which compiles and warms up, excluded)."""

    tokens_per_sec: float  # trained tokens per second
    epoch_seconds: float
    run_seconds: float  # the whole run as configured
    epoch_trained_tokens: int
    measured_peak_gb: float
    logged_steps: int  # steps the calibration run logged
    run_steps: int  # optimizer steps of the whole run

    def to_dict(self) -> dict[str, Any]:
        return {"tokens_per_sec": self.tokens_per_sec, "epoch_seconds": self.epoch_seconds,
                "run_seconds": self.run_seconds, "epoch_trained_tokens": self.epoch_trained_tokens,
                "measured_peak_gb": self.measured_peak_gb}


@dataclass
class EstimateReport:
    """The estimate, part by part (``macft estimate --json`` prints :meth:`to_dict`)."""

    model: str
    backend: str  # "mlx" or "cuda"
    device: str
    params: int  # parameters of the base model
    batch_rows: int  # the largest micro-batch: rows ...
    batch_tokens: int  # ... of this many tokens
    parts_bytes: dict[str, int]  # weights, LoRA, optimizer, activations, logits, ... (bytes)
    total_bytes: int  # the predicted peak
    budget_bytes: int
    budget: str  # what the budget is, e.g. "GPU memory"
    fits: bool
    suggestions: list[Suggestion] = field(default_factory=list)  # settings that fit, when it does not
    calibration: Calibration | None = None  # with data and calibration steps, when it fits
    auto: dict[str, Any] | None = None  # with --auto and data: the search plan and its cost

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model, "backend": self.backend, "device": self.device, "params": self.params,
            "largest_batch": {"rows": self.batch_rows, "tokens": self.batch_tokens},
            "parts_bytes": dict(self.parts_bytes), "total_bytes": self.total_bytes,
            "budget_bytes": self.budget_bytes, "budget": self.budget, "fits": self.fits,
            "suggestions": [{"flags": s.flags, "total_bytes": s.total_bytes} for s in self.suggestions]}
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        if self.auto is not None:
            out["auto"] = self.auto
        return out


@dataclass
class Assessment:
    """The memory estimate with what it was made from (what printing and calibration need)."""

    cfg: RunConfig
    backend: str
    shape: Any
    target: Any
    estimate: Estimate
    fixes: list[tuple[str, Estimate]]
    prepared: Any | None  # macft.commands.train.Prepared, when the config names data
    preset: str | None = None

    def report(self, calibration: Calibration | None = None) -> EstimateReport:
        s, t = self.estimate.setting, self.target
        return EstimateReport(
            model=str(self.cfg.model.name), backend=self.backend, device=t.device, params=self.shape.params,
            batch_rows=s.batch, batch_tokens=s.seq_len, parts_bytes=dict(self.estimate.parts),
            total_bytes=self.estimate.total, budget_bytes=t.budget, budget=t.budget_label,
            fits=self.estimate.fits, suggestions=[Suggestion(w, e.total) for w, e in self.fixes],
            calibration=calibration)


# --------------------------------------------------------------------------- the work


def resolve(values: dict[str, Any], *, config_file: str | Path | None = None, preset: str | None = None,
            base: RunConfig | None = None) -> RunConfig:
    """defaults < ``preset`` (or a whole config, ``base``) < YAML < ``values``; only the model is
    required."""
    if preset and base is not None:
        raise MacftError("A preset and a whole RunConfig are alternatives: the config already holds "
                         "every setting.", "Pass the preset (with overrides), or the config alone.")
    layer = get_preset(preset).config if preset else base.to_dict() if base is not None else None
    cfg = build_config(config_file, values, base=layer)
    validate(cfg, require=("model.name",))
    return cfg


def assess(cfg: RunConfig, *, preset: str | None = None, load_weights: bool = False) -> Assessment:
    """Predict the peak: from the data's real batches when the config names data (tokenized
    here; ``load_weights``: download the weights too, for :func:`calibrate`), else from
    batch-size x max-seq-len. Only config files and the tokenizer are read otherwise."""
    from ..backends import choose_auto, get_backend
    from ..model_info import read_model_info
    from ..models import resolve_model_path
    from ..sizing import estimate, setting_for, shape_from_config, suggestions
    from ..ui import warn

    name, auto_warning = (choose_auto() if cfg.train.backend == "auto" else (cfg.train.backend, None))
    backend = get_backend(name)
    if auto_warning:
        warn(auto_warning)
    problems = backend.check(cfg, None)
    if problems:
        raise BackendUnavailable(name, problems)
    plan = prepared = None
    if cfg.data.train:
        from .train import prepare

        cfg.train.backend = name
        prepared = prepare(cfg, preset=preset, main_process=True, tokenizer_only=not load_weights)
        model_path, model_info, plan = prepared.model_path, prepared.model_info, prepared.plan
    else:
        model_path = resolve_model_path(cfg.model.name, revision=cfg.model.revision,  # type: ignore[arg-type]
                                        tokenizer_only=True)
        model_info = read_model_info(model_path)
        problems = backend.check(cfg, model_info)
        if problems:
            raise BackendUnavailable(name, problems)
    shape = shape_from_config(model_info, model_path)
    target = backend.memory_target(cfg, model_info)
    setting = setting_for(cfg, plan)
    est = estimate(shape, target, setting)
    fixes = [] if est.fits else suggestions(shape, target, setting)
    return Assessment(cfg, name, shape, target, est, fixes, prepared, preset)


def estimate_and_show(cfg: RunConfig, *, preset: str | None = None, calibrate_steps: int = 4,
                      auto: Any = None) -> EstimateReport:
    """:func:`assess`, print it, :func:`calibrate` when it fits, print that: what ``macft estimate``
    does (``macft.estimate`` in Python too, printing only with ``verbose``)."""
    from ..ui import console

    m = assess(cfg, preset=preset, load_weights=calibrate_steps > 0)
    show_memory(m.cfg, m.shape, m.estimate, m.fixes, m.prepared is not None)
    cal = calibrate_if_fits(m, calibrate_steps)
    if cal is not None:
        show_calibration(cal)
    elif calibrate_steps > 0 and m.prepared is None:
        console.print("[dim]Give --data to also time a few training steps (time per epoch).[/]")
    report = m.report(cal)
    if auto is not None:
        report.auto = show_auto(m, auto, cal)
    return report


def show_auto(m: Assessment, request: Any, cal: Calibration | None) -> dict[str, Any] | None:
    """What `--auto` would search on this data and what it costs (in steps; in time with a
    calibration)."""
    from ..auto.driver import check_auto, make_plan, show_plan
    from ..ui import console, warn

    if m.prepared is None:
        warn("--auto: give --data to see what the search would try and cost.")
        return None
    p = m.prepared
    check_auto(p)
    per_epoch = max(1, -(-p.plan.batches_per_epoch() // p.cfg.train.grad_accum))
    sps = cal.epoch_seconds / per_epoch if cal is not None else None
    if request.budget.seconds is not None and sps is None:
        warn("--auto: a duration budget needs the calibration steps (--calibrate-steps > 0).")
        return None
    plan = make_plan(p, request, sps)
    show_plan(plan, request, sps)
    out: dict[str, Any] = {"plan": plan.to_dict(), "search_steps": plan.planned_cost,
                           "run_steps": plan.run_steps}
    if sps is not None:
        out["search_seconds"] = plan.planned_cost * sps
        out["run_seconds"] = plan.run_steps * sps
        console.print(f"With --auto: the search about [bold]{_hms(out['search_seconds'])}[/], then the run up to "
                      f"{plan.run_steps} steps, about [bold]{_hms(out['run_seconds'])}[/] (less when it stops "
                      "early).")
    return out


def calibrate_if_fits(m: Assessment, steps: int) -> Calibration | None:
    """:func:`calibrate` when there is data, ``steps`` > 0 and the estimate fits (else None)."""
    from ..ui import warn

    if steps <= 0 or m.prepared is None:
        return None
    if not m.estimate.fits:
        warn("Skipping the calibration run: the configuration does not fit (see above).")
        return None
    return calibrate(m.prepared, steps, preset=m.preset)


def calibrate(p: Any, steps: int, *, preset: str | None = None) -> Calibration:
    """Train ``steps`` (at least 2) steps of the prepared run (:func:`macft.commands.train.prepare`)
    in a throw-away run directory and time them."""
    from ..training.rundir import read_metrics
    from ..ui import console
    from .train import TrainOptions, train

    steps = max(2, steps)
    console.rule(f"Calibration: {steps} training steps")
    with tempfile.TemporaryDirectory(prefix="macft-calibrate-") as tmp:
        out = Path(tmp) / "run"
        cfg = copy.deepcopy(p.cfg)
        cfg.train.iters = steps  # iters decide (not epochs)
        cfg.train.output = str(out)
        cfg.train.eval_every = cfg.train.save_every = 0
        cfg.train.log_every = 1
        done = train(cfg, None, TrainOptions(preset=preset, force=True, calibration=True))
        if done.exit_code != 0:
            raise MacftError("The calibration run stopped early.", "Run it again, or pass --calibrate-steps 0.")
        rows = [r for r in read_metrics(out) if "loss" in r and "step" in r]
    if len(rows) < 2:
        raise MacftError("The calibration run logged fewer than two steps.", "Raise --calibrate-steps.")
    first, last = rows[0], rows[-1]
    secs = last["elapsed_sec"] - first["elapsed_sec"]
    toks = last["trained_tokens"] - first["trained_tokens"]
    tps = toks / secs if secs > 0 else float("nan")
    plan, cfg = p.plan, p.cfg
    epoch_tokens = sum(plan.batch(0, i).n_trained for i in range(plan.batches_per_epoch()))
    micro = p.steps * cfg.train.grad_accum
    run_tokens = epoch_tokens * micro / plan.batches_per_epoch()
    return Calibration(tokens_per_sec=tps, epoch_seconds=epoch_tokens / tps, run_seconds=run_tokens / tps,
                       epoch_trained_tokens=epoch_tokens, measured_peak_gb=last["peak_memory_gb"],
                       logged_steps=len(rows), run_steps=p.steps)


# --------------------------------------------------------------------------- printing


def show_memory(cfg: Any, shape: Any, est: Estimate, fixes: list[tuple[str, Estimate]], from_data: bool) -> None:
    from rich.table import Table

    from ..ui import console, human_bytes

    t, s = est.target, est.setting
    table = Table(title=f"Peak memory: {cfg.model.name} on {t.backend} ({t.device})", title_justify="left")
    table.add_column("part")
    table.add_column("size", justify="right")
    for k, v in est.parts.items():
        table.add_row(k, human_bytes(v))
    table.add_row("[bold]total[/]", f"[bold]{human_bytes(est.total)}[/]")
    table.add_row(t.budget_label, human_bytes(t.budget))
    console.print(table)
    where = "the data's largest batch" if from_data else "batch-size x max-seq-len (give --data for the real batches)"
    console.print(f"{shape.params / 1e9:.2f}B parameters, base {s.quantize}, "
                  f"{'fp32' if t.dtype_bytes == 4 else 'bf16'} compute, LoRA rank {s.rank}; "
                  f"{s.batch} x {s.seq_len} tokens ({where}); gradient checkpointing "
                  f"{'on' if s.grad_checkpoint else 'off'}.")
    if est.fits:
        console.print(f"[green]Fits[/]: {est.total / t.budget:.0%} of {t.budget_label}.")
        return
    console.print(f"[red]Does not fit[/]: {est.total / t.budget:.0%} of {t.budget_label}.")
    if not fixes:
        console.print("Nothing fits here even with a 4-bit base, batch 1, gradient checkpointing and "
                      "128-token sequences: use a smaller model or a machine with more memory.")
        return
    console.print("Settings that fit:")
    for words, e in fixes:
        console.print(f"  [bold]{words}[/]  (about {human_bytes(e.total)})")


def show_calibration(c: Calibration) -> None:
    from ..ui import console

    console.print(f"Calibration: {c.tokens_per_sec:,.0f} trained tokens/s (steps 2-{c.logged_steps}; step 1 "
                  f"compiles and warms up); peak memory measured {c.measured_peak_gb:.2f} GB.")
    console.print(f"Time per epoch: about [bold]{_hms(c.epoch_seconds)}[/] ({c.epoch_trained_tokens:,} trained "
                  f"tokens); the whole run ({c.run_steps} steps): about [bold]{_hms(c.run_seconds)}[/].")


def _hms(s: float) -> str:
    if s != s:  # nan
        return "?"
    s = int(round(s))
    h, r = divmod(s, 3600)
    m, sec = divmod(r, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")

