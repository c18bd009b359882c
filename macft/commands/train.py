"""`macft train`: resolve the config, prepare data, pick a backend, train, report.

``run(args)`` turns the command line into a :class:`RunConfig` and :class:`TrainOptions`;
:func:`resolve` and :func:`train` do the work (``macft.train`` in Python calls them too).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..config import RunConfig, build_config, dump_yaml, validate
from ..errors import BackendUnavailable, MacftError
from ..presets import get_preset
from ..run import (
    CONFIG,
    SUMMARY,
    Resolved,
    latest_checkpoint,
    open_run,
    read_config,
    write_json_atomic,
    write_text_atomic,
)
from ._args import add_config_flags, cli_values

# The rest (numpy, the data readers, the backends, rich) is imported where it is used, so that
# `macft train --help` stays quick.
if TYPE_CHECKING:
    from ..backends import TrainJob
    from ..data.batching import BatchPlan
    from ..data.render import Renderer
    from ..model_info import ModelInfo
    from ..training.events import TrainingCallback
    from ..training.loop import LoopResult, LoopSettings
    from ..training.rundir import RunLock

HELP = "Fine-tune a model with LoRA / QLoRA (MLX or PyTorch backend)."
SECTIONS = ("model", "lora", "data", "train")
RESUME_OVERRIDABLE = {"train.iters", "train.epochs", "train.eval_every", "train.save_every",
                      "train.log_every", "train.early_stop"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config; command-line flags override it.")
    p.add_argument("--preset", metavar="NAME", help="Start from a preset (gemma3-1b, gemma3-4b; see "
                   "`macft models`): defaults < preset < YAML < flags.")
    p.add_argument("--resume", metavar="RUN", help="Continue an interrupted run from its last checkpoint.")
    p.add_argument("--force", action="store_true",
                   help="Train even when the memory estimate says the run will not fit, or resume "
                        "on a base model whose weights differ from those the run started on.")
    add_auto_arguments(p)
    add_config_flags(p, SECTIONS)


def add_auto_arguments(p: argparse.ArgumentParser, tune: bool = False) -> None:
    g = p.add_argument_group("automatic hyperparameters")
    if not tune:
        g.add_argument("--auto", action="store_true",
                       help="Before the run, search the learning rate, LoRA rank and the number of epochs "
                            "on your data (README 'Automatic hyperparameters'); flags you give are kept.")
        g.add_argument("--dry-run", action="store_true",
                       help="With --auto: run the search only, print the recommended settings (as YAML).")
    g.add_argument("--auto-budget", metavar="F|DURATION", default=None,
                   help="What the search may cost: a fraction of the run's time (default 0.25) or a "
                        "duration (20m, 1h).")


def run(args: argparse.Namespace) -> int:
    cfg, ckpt = resolve(cli_values(args, SECTIONS), config_file=args.config, preset=args.preset,
                        resume=args.resume)
    options = TrainOptions(preset=args.preset, resume=Path(args.resume) if args.resume else None,
                           force=args.force, auto=auto_request(args, cfg_values=cli_values(args, SECTIONS)))
    return train(cfg, ckpt, options).exit_code


def auto_request(args: argparse.Namespace, cfg_values: dict[str, Any], force_auto: bool = False) -> Any:
    """The :class:`macft.auto.driver.AutoRequest` of `--auto` (None without it)."""
    if not (force_auto or getattr(args, "auto", False)):
        if getattr(args, "dry_run", False) or getattr(args, "auto_budget", None) is not None:
            raise MacftError("--dry-run and --auto-budget belong to --auto.",
                             "Add --auto (or use `macft tune`).")
        return None
    from ..auto.driver import AutoRequest, explicit_keys
    from ..auto.plan import Budget

    return AutoRequest(Budget.parse(args.auto_budget), dry_run=force_auto or bool(getattr(args, "dry_run", False)),
                       explicit=explicit_keys(cfg_values, getattr(args, "config", None)))


@dataclass
class TrainOptions:
    """What a training takes besides its config."""

    preset: str | None = None  # recorded in the run; its end tokens are checked against the tokenizer
    resume: Path | None = None  # the run directory to continue (its config comes from resolve())
    force: bool = False  # train despite the memory estimate, or resume on other base weights
    calibration: bool = False  # `macft estimate`'s timing run: no summary, no final report
    callbacks: list[TrainingCallback] = field(default_factory=list)  # after the built-in ones
    auto: Any = None  # a macft.auto.driver.AutoRequest: search the hyperparameters first (--auto)


@dataclass
class TrainResult:
    run_dir: Path
    result: LoopResult | None  # None: `--auto --dry-run` (the search only)

    @property
    def exit_code(self) -> int:
        return 130 if self.result is not None and self.result.interrupted else 0


def resolve(values: dict[str, Any], *, config_file: str | Path | None = None, preset: str | None = None,
            resume: str | Path | None = None, base: RunConfig | None = None) -> tuple[RunConfig, Path | None]:
    """The run's config and, to resume, the checkpoint (None when the run stopped before writing
    one: it then starts again from step 0).

    defaults < ``preset`` (or a whole config, ``base``) < the YAML ``config_file`` < ``values``
    (``"section.name"`` keys: command-line strings or Python values). ``resume``: the saved
    config of that run, of which only :data:`RESUME_OVERRIDABLE` may change."""
    if resume:
        run_dir = Path(resume)
        if run_dir.exists() and not run_dir.is_dir():
            raise MacftError(f"--resume {run_dir} is a file, not a run directory.",
                             "Pass the directory that `macft train` wrote (it holds config.yaml).")
        saved, _ = read_config(run_dir)
        ckpt = latest_checkpoint(run_dir)
        bad = sorted(set(values) - RESUME_OVERRIDABLE)
        if bad or config_file or base is not None:
            raise MacftError(
                "A resumed run keeps its own settings; only these may change: "
                + ", ".join(sorted(RESUME_OVERRIDABLE)) + (f" (got {', '.join(bad)})" if bad else ""),
                "Drop the other flags (and --config), or start a new run.")
        cfg = build_config(base=saved.to_dict(), cli_values=values)
        cfg.train.output = str(run_dir)
        return cfg, ckpt
    if preset and base is not None:
        raise MacftError("A preset and a whole RunConfig are alternatives: the config already holds "
                         "every setting.", "Pass the preset (with overrides), or the config alone.")
    layer = get_preset(preset).config if preset else base.to_dict() if base is not None else None
    cfg = build_config(config_file, values, base=layer)
    validate(cfg, require=("model.name", "data.train"))
    # Later commands (export, eval) run from anywhere: keep local paths absolute.
    for key in ("train", "valid", "rehearsal_data"):
        v = getattr(cfg.data, key)
        if v and Path(v).expanduser().exists():
            setattr(cfg.data, key, str(Path(v).expanduser().resolve()))
    if cfg.model.name and Path(cfg.model.name).expanduser().exists():
        cfg.model.name = str(Path(cfg.model.name).expanduser().resolve())
    return cfg, None


def launcher_rank() -> int:
    """This process's rank when `accelerate launch` / torchrun start one `macft train` per
    process (they set RANK); 0 otherwise. Only rank 0 writes the run directory."""
    return int(os.environ.get("RANK", "0") or 0)


@dataclass
class Prepared:
    """A run resolved up to its batches: what `train` and `estimate` share."""

    cfg: RunConfig
    backend_name: str
    backend: Any
    model_path: Path
    model_info: ModelInfo
    tokenizer: Any
    renderer: Renderer
    data: Any
    plan: BatchPlan
    valid: list
    steps: int
    settings: LoopSettings


def prepare(cfg: RunConfig, *, preset: str | None = None, main_process: bool = True,
            tokenizer_only: bool = False) -> Prepared:
    """Backend, model files, tokenizer and batches of a resolved config (``tokenizer_only``:
    download no weights, for an estimate)."""
    from ..backends import choose_auto, get_backend
    from ..data.batching import BatchPlan, eval_batches
    from ..data.dataset import build_data
    from ..data.templates import renderer_for
    from ..data.tokenizer import load_tokenizer
    from ..model_info import read_model_info
    from ..models import resolve_model_path
    from ..training.loop import LoopSettings
    from ..training.schedule import total_steps
    from ..ui import task_progress, warn

    # -- backend ---------------------------------------------------------------
    name, auto_warning = (choose_auto() if cfg.train.backend == "auto" else (cfg.train.backend, None))
    backend = get_backend(name)
    if auto_warning:
        warn(auto_warning)
    problems = backend.check(cfg, None)  # packages and hardware, before any download
    if problems:
        raise BackendUnavailable(name, problems)
    model_path = resolve_model_path(cfg.model.name, revision=cfg.model.revision,  # type: ignore[arg-type]
                                    tokenizer_only=tokenizer_only)
    model_info = read_model_info(model_path)
    problems = backend.check(cfg, model_info)
    if problems:
        raise BackendUnavailable(name, problems)
    if cfg.lora.layers > model_info.num_layers:
        raise MacftError(
            f"--lora-layers {cfg.lora.layers} asks for more transformer blocks than {cfg.model.name} "
            f"has: it has {model_info.num_layers}.",
            f"Use --lora-layers {model_info.num_layers} or fewer, or -1 to adapt all of them.")

    # -- data --------------------------------------------------------------------
    tok = load_tokenizer(str(model_path))
    renderer = renderer_for(tok, cfg.data.loss_on, cfg.data.chat_template)
    if preset:
        the_preset = get_preset(preset)
        if renderer.end_tokens()[:1] != list(the_preset.end_tokens[:1]):
            warn(f"The preset {the_preset.name} expects the turn to end with {the_preset.end_tokens[0]}, but "
                 f"this tokenizer's chat template ends turns with {renderer.end_tokens()[:1]}: is --model the "
                 f"right model ({the_preset.hub_id})?")
    with task_progress() as prog:
        t = prog.add_task("tokenizing", total=None)
        data = build_data(cfg.data.train, cfg.data.valid, renderer, fmt=cfg.data.format,  # type: ignore[arg-type]
                          max_seq_len=cfg.data.max_seq_len, valid_fraction=cfg.data.valid_fraction,
                          seed=cfg.train.seed, split=cfg.data.split, encoding=cfg.data.encoding,
                          progress=lambda n: prog.advance(t, n))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    rehearsal = load_rehearsal(cfg, renderer)
    plan = BatchPlan(data.train, cfg.train.batch_size, seed=cfg.train.seed, pad_id=pad_id,
                     packing=cfg.data.packing, max_seq_len=cfg.data.max_seq_len,
                     rehearsal=rehearsal, rehearsal_ratio=cfg.data.rehearsal_ratio,
                     group_by_length=cfg.data.group_by_length)
    valid = eval_batches(data.valid, cfg.train.batch_size, pad_id)
    steps = total_steps(cfg.train.iters, cfg.train.epochs, plan.batches_per_epoch(), cfg.train.grad_accum)
    settings = LoopSettings.from_config(cfg.train, steps)
    if main_process:
        _print_data_summary(data, plan, renderer, str(cfg.model.name), model_info.text_model_type)
    return Prepared(cfg, name, backend, model_path, model_info, tok, renderer, data, plan, valid, steps,
                    settings)


def check_memory(p: Prepared, force: bool) -> None:
    """The estimate before any weight is loaded: refuse a run that cannot fit (unless --force)."""
    from ..sizing import check_fits, setting_for, shape_from_config
    from ..ui import console, warn

    shape = shape_from_config(p.model_info, p.model_path)
    target = p.backend.memory_target(p.cfg, p.model_info)
    try:
        est = check_fits(shape, target, setting_for(p.cfg, p.plan))
    except MacftError as e:
        if not force:
            raise
        warn(f"{e.message} Going ahead (--force).")
        return
    from ..ui import human_bytes

    console.print(f"Memory: about {human_bytes(est.total)} expected at the peak, of "
                  f"{human_bytes(target.budget)} ({target.budget_label}).")


def train(cfg: RunConfig, ckpt: Path | None = None, options: TrainOptions | None = None) -> TrainResult:
    """Train a resolved config (:func:`resolve`) into its run directory (``cfg.train.output``,
    or a new one under runs/); with ``options.resume``, continue that run from ``ckpt``."""
    from ..training.rundir import RunLock, prepare_run_dir

    options = options or TrainOptions()
    validate(cfg)
    main_process = launcher_rank() == 0
    if options.auto is not None and options.resume:
        raise MacftError("--auto searches before a new run; a resumed run keeps the settings it chose.",
                         "Drop --auto to resume (its config.yaml holds the chosen values).")
    if options.auto is not None and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise MacftError("--auto runs in one process; this is one of several (accelerate / torchrun).",
                         "Run `macft tune` (or `macft train --auto --dry-run`) alone first, then launch the "
                         "recommended config on all GPUs.")
    lock: RunLock | None = None
    if options.resume and main_process:
        # before the data is read: a second process on the same run is refused at once
        lock = RunLock(Path(options.resume)).acquire()
    elif main_process:
        # an --output that cannot be used is refused before the data is read too
        cfg.train.output = str(prepare_run_dir(cfg.train.output, cfg.model.name))  # type: ignore[arg-type]
    try:
        return _train_locked(options, cfg, ckpt, main_process, lock)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(options: TrainOptions, cfg: RunConfig, ckpt: Path | None, main_process: bool,
                  lock: RunLock | None) -> TrainResult:
    from ..backends import TrainJob
    from ..training.events import CallbackList
    from ..training.loop import check_not_stopped_early, read_position
    from ..training.progress import RichProgress
    from ..training.rundir import (
        LossPlot,
        MetricsWriter,
        RunLock,
        make_run_dir,
        prepare_run_dir,
        remove_failed_run,
        remove_temporaries,
        truncate_metrics,
    )
    from ..ui import console

    p = prepare(cfg, preset=options.preset, main_process=main_process)
    if ckpt is not None:
        check = getattr(p.backend, "check_checkpoint", None)
        if check is not None:
            check(ckpt)  # before any weight is loaded
    if options.resume:
        _check_same_base(Path(options.resume), p.model_path, options.force)
    if main_process:
        check_memory(p, options.force)
    name, backend, model_path, model_info = p.backend_name, p.backend, p.model_path, p.model_info
    renderer, data, plan, valid, steps, settings = p.renderer, p.data, p.plan, p.valid, p.steps, p.settings

    # -- run directory -------------------------------------------------------------
    created = False
    if not options.resume and not main_process:
        # other data-parallel processes write nothing; rank 0 creates the directory
        run_dir = Path(cfg.train.output or Path("runs") / "rank-nonzero-unused")
    elif not options.resume:
        run_dir = prepare_run_dir(cfg.train.output, cfg.model.name)  # type: ignore[arg-type]
        make_run_dir(run_dir)
        created = True
        lock = RunLock(run_dir).acquire()
    else:
        run_dir = Path(cfg.train.output)  # type: ignore[arg-type]
        if main_process:
            removed = remove_temporaries(run_dir)
            if removed:
                console.print(f"Removed {len(removed)} half-written file(s) left by an interrupted run "
                              f"({', '.join(str(r.relative_to(run_dir)) for r in removed[:3])}"
                              f"{' ...' if len(removed) > 3 else ''}).")
        if ckpt is None:
            if main_process:
                truncate_metrics(run_dir, -1)
                console.print(f"[yellow]{run_dir} has no complete checkpoint (it stopped before writing "
                              "its first one): training it again from step 0 with its saved settings.[/]")
        else:
            pos = read_position(ckpt)
            check_not_stopped_early(pos, settings, ckpt)
            if pos.step >= steps:
                raise MacftError(f"{run_dir} already finished {pos.step} of {steps} steps.",
                                 "Raise --iters (or --epochs) to train further.")
            if main_process:
                truncate_metrics(run_dir, pos.step)
                console.print(f"Resuming {run_dir} from step {pos.step} ({ckpt.name}).")
    auto = None
    if options.auto is not None:
        from ..auto.driver import run_auto

        try:
            auto = run_auto(p, options.auto, run_dir)
        except BaseException:
            if created:
                import shutil

                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        cfg, steps, settings = auto.cfg, auto.steps, auto.settings
        if options.auto.dry_run:
            _finish_tune(run_dir, auto)
            if lock is not None and created:
                lock.release()
            return TrainResult(run_dir, None)
    try:
        resolved = _resolved(cfg, name, backend.device(), model_path, model_info, renderer, data, steps)
        resolved.preset = options.preset
        if main_process:
            write_text_atomic(run_dir / CONFIG, dump_yaml(cfg, resolved.to_dict()))

        job = TrainJob(cfg, model_path, model_info, p.tokenizer, data, plan, valid, settings, run_dir, ckpt)
        callbacks: list[TrainingCallback] = (
            [RichProgress(), MetricsWriter(run_dir), LossPlot(run_dir)] if main_process else [])
        callbacks.extend(options.callbacks)
        try:
            result = backend.train(job, CallbackList(callbacks))
        except BaseException:
            if created:
                remove_failed_run(run_dir)
            raise
        if auto is not None and main_process and not result.interrupted:
            from ..auto.driver import check_run_answers

            check_run_answers(p, auto, run_dir)
        if main_process and not options.calibration:
            _finish(run_dir, cfg, result, job, resolved, auto)
        return TrainResult(run_dir, result)
    finally:
        if created and lock is not None:
            lock.release()


def _check_same_base(run_dir: Path, model_path: Path, force: bool) -> None:
    """A resumed run must train on the weights it started on (a hub model may have changed)."""
    from ..fingerprint import compare
    from ..ui import warn

    cmp = compare(open_run(run_dir).resolved.base_fingerprint, model_path)
    if cmp is None or (cmp.same and not cmp.config_differs):
        return
    msg = f"The base model {model_path} is not the one {run_dir} started training on: {cmp.describe()}."
    if force:
        warn(msg + " Going ahead (--force).")
        return
    raise MacftError(msg, "Resume with the base the run started on (model.name and model.revision in its "
                          "config.yaml), or pass --force to go on anyway.")


def load_rehearsal(cfg: RunConfig, renderer: Renderer) -> list | None:
    """General examples to mix in (``--rehearsal-data``), tokenized like the task data."""
    from ..ui import console
    if not cfg.data.rehearsal_data or cfg.data.rehearsal_ratio <= 0:
        return None
    from ..data.dataset import load_samples, tokenize_samples
    from ..data.readers import resolve_sources

    src, _ = resolve_sources(cfg.data.rehearsal_data, None)
    _, samples = load_samples(src, "auto", cfg.data.split, cfg.data.encoding)
    examples, stats = tokenize_samples(samples, renderer, cfg.data.max_seq_len, src)
    if not examples:
        raise MacftError(f"No usable example in the rehearsal data {src}.",
                         "Check --rehearsal-data (every example needs a trained token).")
    console.print(f"Rehearsal: {len(examples)} general examples from {src}; "
                  f"{cfg.data.rehearsal_ratio:.0%} of every epoch is drawn from them.")
    return examples


def _print_data_summary(data: Any, plan: BatchPlan, renderer: Renderer, model_name: str = "",
                        model_type: str = "") -> None:
    from ..data.batching import padding_share
    from ..data.templates import suggest
    from ..ui import console, warn

    s = data.train_stats
    v = data.valid_stats
    pad = padding_share([plan.batch(0, i) for i in range(min(plan.batches_per_epoch(), 200))])
    line = (f"Data: {data.format} format, {s.examples} train examples "
            f"({s.trained_tokens:,} of {s.total_tokens:,} tokens trained)")
    if v:
        line += f", {v.examples} validation examples ({data.valid_from})"
    line += f"; {plan.batches_per_epoch()} batches per epoch, {pad:.0%} padding"
    console.print(line)
    dropped = s.dropped + (v.dropped if v else 0)
    truncated = s.truncated + (v.truncated if v else 0)
    if truncated or dropped:
        warn(f"{truncated} example(s) truncated to --max-seq-len, {dropped} dropped for having no "
             "trained token left.")
    if renderer.uses_fallback_template:
        hint = suggest(model_name, model_type, renderer.tok)
        warn("The tokenizer has no chat template: using macft's fallback '### User / ### Assistant' "
             "template (README 'Chat templates'). Export writes it into the GGUF."
             + (f" This model was most likely trained with the '{hint}' format: --chat-template {hint} "
                "keeps what it already knows." if hint else ""))


def _resolved(cfg: RunConfig, backend: str, device: str, model_path: Path, model_info: ModelInfo,
              renderer: Renderer, data: Any, steps: int) -> Resolved:
    from ..data.render import FALLBACK_TEMPLATE
    from ..fingerprint import base_fingerprint

    return Resolved(
        macft_version=__version__,
        created=time.strftime("%Y-%m-%d %H:%M:%S"),
        host=platform.node(),
        backend=backend,
        device=device,
        model_path=str(model_path),
        model_type=model_info.model_type,
        architectures=model_info.architectures,
        chat_template=renderer.template_name,
        chat_template_text=renderer.template,
        fallback_template=FALLBACK_TEMPLATE if renderer.uses_fallback_template else None,
        end_tokens=renderer.end_tokens(),
        data_format=data.format,
        valid_from=data.valid_from,
        train_stats=data.train_stats.summary(),
        valid_stats=data.valid_stats.summary() if data.valid_stats else None,
        total_steps=steps,
        base_fingerprint=base_fingerprint(model_path),
    )


def _finish_tune(run_dir: Path, auto: Any) -> None:
    """`--auto --dry-run` / `macft tune`: the recommendation, as YAML to train with."""
    from ..auto.driver import AUTO_DIR, RECOMMENDED, summary_rows
    from ..training.progress import summary_table
    from ..ui import console

    cfg = auto.cfg
    cfg.train.output = None
    text = dump_yaml(cfg)
    dest = run_dir / AUTO_DIR / RECOMMENDED
    write_text_atomic(dest, text)
    write_json_atomic(run_dir / AUTO_DIR / SUMMARY, auto.outcome.summary())
    console.print(summary_table(summary_rows(auto.outcome)))
    console.print(text)
    console.print(f"The search is in [bold]{run_dir / AUTO_DIR}[/] (search.jsonl, search.png); the settings "
                  f"above are in [bold]{dest}[/].")
    console.print(f"Next: [bold]macft train --config {dest}[/]")
    if os.environ.get("MACFT_PRINT_RUN_DIR"):
        print(run_dir)


def _finish(run_dir: Path, cfg: RunConfig, result: LoopResult, job: TrainJob,
            resolved: Resolved, auto: Any = None) -> None:
    from ..training.progress import summary_table
    from ..ui import console

    summary = {
        "steps": result.step,
        "interrupted": result.interrupted,
        "final_train_loss": result.final_train_loss,
        "final_val_loss": result.final_val_loss,
        "best_val_loss": result.best_val_loss,
        "best_step": result.best_step,
        "trained_tokens": result.trained_tokens,
        "seconds": round(result.seconds, 2),
        "tokens_per_sec": result.trained_tokens / result.seconds if result.seconds else None,
        "peak_memory_gb": result.peak_memory_gb,
        "backend": resolved.backend,
        "device": resolved.device,
        "notes": job.notes,
    }
    stopped = bool(getattr(result, "stopped_early", False))
    if cfg.train.early_stop:
        summary["stopped_early"] = stopped
    if auto is not None:
        summary["auto"] = auto.outcome.summary()
        per_epoch = max(auto.outcome.plan.steps_per_epoch, 1)
        if result.best_step is not None:
            summary["auto"]["chosen"]["best_epoch"] = round(result.best_step / per_epoch, 2)
    write_json_atomic(run_dir / SUMMARY, summary)
    if result.interrupted:
        console.print(f"[yellow]Stopped at step {result.step}; a checkpoint is saved.[/]\n"
                      f"Resume with: [bold]macft train --resume {run_dir}[/]")
        return
    rows = [
        ("steps", str(result.step)),
        ("train loss", f"{result.final_train_loss:.4f}" if result.final_train_loss is not None else "-"),
        ("validation loss", f"{result.final_val_loss:.4f}" if result.final_val_loss is not None else "-"),
        ("best validation", f"{result.best_val_loss:.4f} (step {result.best_step})"
         if result.best_val_loss is not None else "-"),
        ("trained tokens", f"{result.trained_tokens:,} ({summary['tokens_per_sec'] or 0:,.0f} tok/s)"),
        ("time", f"{result.seconds:.1f} s"),
        ("peak memory", f"{result.peak_memory_gb:.2f} GB"),
    ]
    if stopped:
        rows.append(("stopped early", f"at step {result.step}: validation had not improved for "
                                      f"{cfg.train.early_stop} evaluations; adapter/ is the step-{result.best_step} one"))
    if auto is not None:
        from ..auto.driver import summary_rows

        rows += summary_rows(auto.outcome)
    for n in job.notes:
        rows.append(("note", n))
    console.print(summary_table(rows))
    console.print(f"Outputs in [bold]{run_dir}[/]: adapter/ (PEFT), best_adapter/, metrics.jsonl, loss.png, "
                  "config.yaml")
    console.print(f"Next: [bold]macft export --run {run_dir}[/]")
    if os.environ.get("MACFT_PRINT_RUN_DIR"):
        print(run_dir)
