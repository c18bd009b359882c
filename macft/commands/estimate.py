"""`macft estimate`: peak memory part by part, whether it fits, settings that fit, and the
time per epoch from a short calibration run (see :mod:`macft.estimate`)."""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path
from typing import Any

from rich.table import Table

from ..backends import choose_auto, get_backend
from ..cli import cli_values
from ..config import build_config, validate
from ..errors import BackendUnavailable, MacftError
from ..estimate import Estimate, estimate, setting_for, shape_from_config, suggestions
from ..model_info import read_model_info
from ..models import resolve_model_path
from ..presets import get_preset
from ..ui import console, human_bytes, warn

SECTIONS = ("model", "lora", "data", "train")


def run(args: argparse.Namespace) -> int:
    base = get_preset(args.preset).config if args.preset else None
    cfg = build_config(args.config, cli_values(args, SECTIONS), base=base)
    validate(cfg, require=("model.name",))
    name, auto_warning = (choose_auto() if cfg.train.backend == "auto" else (cfg.train.backend, None))
    backend = get_backend(name)
    if auto_warning:
        warn(auto_warning)
    problems = backend.check(cfg, None)
    if problems:
        raise BackendUnavailable(name, problems)
    calibrate = args.calibrate_steps > 0 and bool(cfg.data.train)
    plan = prepared = None
    if cfg.data.train:
        from .train import prepare

        cfg.train.backend = name
        prepared = prepare(cfg, args, main_process=True, tokenizer_only=not calibrate)
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
    report: dict[str, Any] = {
        "model": cfg.model.name, "backend": name, "device": target.device,
        "params": shape.params, "largest_batch": {"rows": setting.batch, "tokens": setting.seq_len},
        "parts_bytes": est.parts, "total_bytes": est.total, "budget_bytes": target.budget,
        "budget": target.budget_label, "fits": est.fits,
        "suggestions": [{"flags": w, "total_bytes": e.total} for w, e in fixes]}
    show_memory(cfg, shape, est, fixes, plan is not None)
    if calibrate and prepared is not None:
        if not est.fits:
            warn("Skipping the calibration run: the configuration does not fit (see above).")
        else:
            report["calibration"] = calibration(args, prepared)
    elif args.calibrate_steps > 0:
        console.print("[dim]Give --data to also time a few training steps (time per epoch).[/]")
    if args.json:
        print(json.dumps(report, indent=1))
    return 0 if est.fits else 1


def show_memory(cfg: Any, shape: Any, est: Estimate, fixes: list[tuple[str, Estimate]], from_data: bool) -> None:
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


def calibration(args: argparse.Namespace, p: Any) -> dict[str, Any]:
    """Train a few steps in a throw-away run directory and time them."""
    from ..training.rundir import read_metrics
    from .train import run as train_run

    steps = max(2, args.calibrate_steps)
    console.rule(f"Calibration: {steps} training steps")
    with tempfile.TemporaryDirectory(prefix="macft-calibrate-") as tmp:
        ns = copy.copy(args)
        out = Path(tmp) / "run"
        ns.force, ns.resume, ns.calibration = True, None, True
        _set_flag(ns, "train.iters", steps)
        _set_flag(ns, "train.epochs", None)  # iters decide
        _set_flag(ns, "train.output", str(out))
        _set_flag(ns, "train.eval_every", 0)
        _set_flag(ns, "train.save_every", 0)
        _set_flag(ns, "train.log_every", 1)
        rc = train_run(ns)
        if rc != 0:
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
    epoch_s, run_s = epoch_tokens / tps, run_tokens / tps
    console.print(f"Calibration: {tps:,.0f} trained tokens/s (steps 2-{len(rows)}; step 1 compiles and "
                  f"warms up); peak memory measured {last['peak_memory_gb']:.2f} GB.")
    console.print(f"Time per epoch: about [bold]{_hms(epoch_s)}[/] ({epoch_tokens:,} trained tokens); "
                  f"the whole run ({p.steps} steps): about [bold]{_hms(run_s)}[/].")
    return {"tokens_per_sec": tps, "epoch_seconds": epoch_s, "run_seconds": run_s,
            "epoch_trained_tokens": epoch_tokens, "measured_peak_gb": last["peak_memory_gb"]}


def _set_flag(ns: argparse.Namespace, key: str, value: Any) -> None:
    """Set a config flag's value in the namespace (its dest, whatever the section)."""
    from ..config import field_specs

    for spec in field_specs(SECTIONS):
        if spec.key == key and value is None:
            if hasattr(ns, spec.dest):
                delattr(ns, spec.dest)
        elif spec.key == key:
            setattr(ns, spec.dest, value)


def _hms(s: float) -> str:
    if s != s:  # nan
        return "?"
    s = int(round(s))
    h, r = divmod(s, 3600)
    m, sec = divmod(r, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")

