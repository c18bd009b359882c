"""The ``macft`` command line.

Light by design: this module imports neither torch nor mlx (nor transformers),
so ``macft --help`` and every ``macft <command> --help`` answer at once on any
machine. Each command's implementation is imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import typing
from collections.abc import Callable
from typing import Any

from . import __version__
from .config import FieldSpec, field_specs

Handler = str  # "module:function", imported lazily


def _metavar(spec: FieldSpec) -> str:
    tp = spec.type
    if typing.get_origin(tp) is typing.Literal:
        return "{" + ",".join(typing.get_args(tp)) + "}"
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if typing.get_origin(tp) in (typing.Union,) and args else tp
    if typing.get_origin(base) is list:
        return "A,B,..."
    return {int: "N", float: "X", str: "TEXT"}.get(base, "VALUE")


def add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...],
                     skip: tuple[str, ...] = ()) -> None:
    """One flag per config field; values stay raw strings, resolved by macft.config."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in field_specs(sections):
        if not spec.cli or spec.key in skip:
            continue
        g = groups.get(spec.section)
        if g is None:
            g = groups[spec.section] = parser.add_argument_group(f"{spec.section} (config section '{spec.section}:')")
        default = ",".join(spec.default) if isinstance(spec.default, list) else spec.default
        help_text = f"{spec.help} [{spec.key}; default: {default}]"
        if spec.type is bool:
            g.add_argument(spec.flag, dest=spec.dest, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_text)
        else:
            g.add_argument(spec.flag, dest=spec.dest, default=argparse.SUPPRESS,
                           metavar=_metavar(spec), help=help_text)


def cli_values(args: argparse.Namespace, sections: tuple[str, ...]) -> dict[str, Any]:
    return {s.key: getattr(args, s.dest) for s in field_specs(sections) if hasattr(args, s.dest)}


# --------------------------------------------------------------------------- commands


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config; command-line flags override it.")
    p.add_argument("--preset", metavar="NAME", help="Start from a preset (gemma3-1b, gemma3-4b; see "
                   "`macft models`): defaults < preset < YAML < flags.")
    p.add_argument("--resume", metavar="RUN", help="Continue an interrupted run from its last checkpoint.")
    p.add_argument("--force", action="store_true",
                   help="Train even when the memory estimate says the run will not fit, or resume "
                        "on a base model whose weights differ from those the run started on.")
    add_config_flags(p, ("model", "lora", "data", "train"))


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", metavar="DIR", default="macft-demo", help="Where everything goes (default ./macft-demo).")
    p.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    p.add_argument("--backend", choices=["auto", "mlx", "cuda"], default="auto",
                   help="Training backend (default auto: MLX on Apple silicon, else PyTorch).")
    p.add_argument("--iters", type=int, default=150, metavar="N", help="LoRA training steps (default 150).")
    p.add_argument("--base-steps", type=int, default=150, metavar="N",
                   help="Steps of the full fine-tune that gives the random base its general knowledge.")


def _estimate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config; command-line flags override it.")
    p.add_argument("--preset", metavar="NAME", help="Start from a preset (see `macft models`).")
    p.add_argument("--calibrate-steps", type=int, default=4, metavar="N",
                   help="Training steps to time for the time per epoch (needs --data and the weights; "
                        "0: memory only, nothing loaded). Default 4.")
    p.add_argument("--json", action="store_true", help="Print the estimate as JSON on stdout.")
    add_config_flags(p, ("model", "lora", "data", "train"))


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="A data file, a directory with train/valid files, or a HF dataset id.")
    p.add_argument("--model", required=False, help="Model whose tokenizer and chat template render the data.")
    p.add_argument("--config", metavar="FILE.yaml", help="Take model and data settings from a YAML config.")
    p.add_argument("--json", action="store_true", help="Print one JSON object (for scripts) instead of tables.")
    p.add_argument("--examples", type=int, default=2, metavar="N", help="Rendered examples to show (default 2).")
    add_config_flags(p, ("data",), skip=("data.train",))


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of tables.")


def _doctor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "mlx", "cuda"],
                   help="Backend whose readiness decides the exit code (default auto).")
    p.add_argument("--json", action="store_true", help="Print one JSON object (for scripts).")


def _model_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (one of --run, --model [--adapter], --gguf)")
    g.add_argument("--run", metavar="RUN", help="A run directory: its base model + adapter, by the backend that trained it.")
    g.add_argument("--best", action="store_true", help="With --run: the best_adapter/ (lowest validation loss).")
    g.add_argument("--model", metavar="BASE", help="A base model (hub id or directory), optionally with --adapter.")
    g.add_argument("--adapter", metavar="DIR", help="A PEFT LoRA adapter for --model.")
    g.add_argument("--gguf", metavar="FILE", help="A GGUF file, run with the pinned llama.cpp (with --run or "
                   "--model, their tokenizer renders the chat; else the GGUF's own template).")
    g.add_argument("--lora-gguf", metavar="FILE", help="A GGUF LoRA to apply on --gguf.")
    g.add_argument("--backend", choices=["auto", "mlx", "cuda"], help="Override the backend (default: the run's).")
    g.add_argument("--llama-cpp", metavar="DIR", help="Your own llama.cpp checkout (built) for --gguf.")
    g.add_argument("--force", action="store_true", help="Use the adapter even when the base model's "
                   "weights differ from those it was trained on.")
    s = p.add_argument_group("sampling")
    s.add_argument("--system", metavar="TEXT", help="System prompt.")
    s.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="Longest answer (default 256).")
    s.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default).")
    s.add_argument("--top-p", type=float, default=1.0, metavar="P", help="Nucleus sampling (default 1.0).")
    s.add_argument("--seed", type=int, default=0, metavar="N", help="Sampling seed (default 0).")


def _chat_args(p: argparse.ArgumentParser) -> None:
    _model_source_args(p)
    w = p.add_argument_group("web page")
    w.add_argument("--web", action="store_true", help="Serve a chat page in the browser instead "
                   "(streaming, system prompt, sampling, compare with the base; needs "
                   "`pip install 'macft[web]'`).")
    w.add_argument("--host", metavar="ADDR", help="Interface the page listens on (default 127.0.0.1, "
                   "this machine only; anything else opens it to the network, with a warning).")
    w.add_argument("--port", type=int, metavar="N", help="Port for the page (default 7860).")


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", metavar="TEXT", help="One user message; the answer alone goes to stdout.")
    p.add_argument("--prompts", metavar="FILE.jsonl", help="One prompt per line (a string, {\"prompt\": ...} or "
                   "{\"messages\": [...]}); one JSON line {\"answer\", \"stopped\"} per prompt to stdout.")
    p.add_argument("--encoding", default="auto", metavar="NAME",
                   help="Text encoding of --prompts: auto (UTF-8, others detected with a note) or a codec "
                        "such as cp932, euc-jp, utf-16 (default auto).")
    p.add_argument("--base", action="store_true", help="Answer with the adapter switched off (the base model).")
    _model_source_args(p)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", metavar="RUN", required=True, help="The run directory to judge.")
    p.add_argument("--best", action="store_true", help="Judge best_adapter/ instead of adapter/.")
    p.add_argument("--gguf", metavar="FILE", help="Also run the same prompts through this GGUF (llama.cpp).")
    p.add_argument("--general", metavar="DATA", help="General held-out data (any supported format) for the "
                   "retention numbers: KL to the base and perplexity before vs after.")
    p.add_argument("--prompts", type=int, default=16, metavar="N", help="Held-out prompts to generate from (default 16).")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="Longest answer (default 64).")
    p.add_argument("--backend", choices=["auto", "mlx", "cuda"], help="Override the run's backend.")
    p.add_argument("--llama-cpp", metavar="DIR", help="Your own llama.cpp checkout for --gguf.")
    p.add_argument("--output", metavar="DIR", help="Where eval-report.json / .md go (default: the run).")
    p.add_argument("--force", action="store_true", help="Judge the adapter even when the base model's "
                   "weights differ from those it was trained on.")


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {
    "train": ("Fine-tune a model with LoRA / QLoRA (MLX or PyTorch backend).", _train_args,
              "macft.commands.train:run"),
    "demo": ("Run the whole product offline in minutes: tiny Gemma-3, LoRA on the bundled data, "
             "q4_k_m GGUF, before/after answers through llama.cpp.", _demo_args, "macft.commands.demo:run"),
    "estimate": ("Predict peak memory (and, with --data, time per epoch) before training; "
                 "suggest settings that fit.", _estimate_args, "macft.commands.estimate:run"),
    "models": ("List the presets and the model architectures each backend supports.", _models_args,
               "macft.commands.models:run"),
    "chat": ("Talk to a fine-tune in the terminal (streaming; /reset, /system, /base, /tuned), "
             "or in the browser with --web.", _chat_args, "macft.commands.chat:run_chat"),
    "generate": ("Answer prompts non-interactively, printing only the answers (for scripts).",
                 _generate_args, "macft.commands.chat:run_generate"),
    "eval": ("Judge a run: loss, perplexity, base vs fine-tuned answers, stop rate, retention, GGUF.",
             _eval_args, "macft.commands.eval:run"),
    "doctor": ("Check this machine: torch build vs GPU, bitsandbytes, MLX, tokenizer extras, llama.cpp, "
               "memory, disk; with the fix for each problem.", _doctor_args, "macft.commands.doctor:run"),
}
DATA_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {
    "inspect": ("Show the detected format, token counts, masks and truncation of a data set.",
                _inspect_args, "macft.commands.data_inspect:run"),
}


def register(name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None],
             handler: Handler) -> None:
    COMMANDS[name] = (help, add_args, handler)


def _load_extra_commands() -> None:
    # Commands defined in other light modules register themselves here.
    from . import commands  # noqa: F401  (macft/commands/__init__.py registers them)


def build_parser() -> argparse.ArgumentParser:
    _load_extra_commands()
    parser = argparse.ArgumentParser(
        prog="macft",
        description="Fine-tune small open LLMs on your own chat data, on your own machine, "
                    "and take home a verified quantized GGUF.")
    parser.add_argument("--version", action="version", version=f"macft {__version__}")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks for errors.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        add_args(p)
        p.set_defaults(_handler=handler)
    data = sub.add_parser("data", help="Work with data sets (inspect).", description="Work with data sets.")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    for name, (help_text, add_args, handler) in DATA_COMMANDS.items():
        p = dsub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        add_args(p)
        p.set_defaults(_handler=handler)
    data.set_defaults(_parser=data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "_handler", None)
    if handler is None:
        (getattr(args, "_parser", None) or parser).print_help()
        return 0 if args.command is None and not argv else 2
    from .errors import MacftError

    try:
        module, func = handler.split(":")
        rc = getattr(importlib.import_module(module), func)(args)
        return int(rc or 0)
    except MacftError as e:
        if args.debug:
            raise
        _print_error(e)
        return e.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        from .ui import console

        console.print("[yellow]Interrupted.[/]")
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every other error is caught
        if args.debug:
            raise
        _print_unexpected(e, argv)
        return 1


def _print_error(e: Exception) -> None:
    from .ui import console

    msg = getattr(e, "message", str(e))
    hint = getattr(e, "hint", None)
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False)
    if hint:
        console.print(f"[bold]fix:[/] {escape(hint)}")
    console.print("[dim](run with --debug for the traceback)[/]")


def _print_unexpected(e: BaseException, argv: list[str] | None) -> None:
    """An error macft did not foresee: one short paragraph, the traceback saved to a log file."""
    import os
    import tempfile
    import time
    import traceback

    from rich.markup import escape

    from .ui import console

    if isinstance(e, OSError) and e.errno is not None:
        # the operating system's own words name the file: a disk, permission or network problem
        from .errors import os_error_message

        msg, hint = os_error_message(e)
        console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False)
        console.print(f"[bold]fix:[/] {escape(hint)}")
        console.print("[dim](run with --debug for the traceback)[/]")
        return
    log = None
    try:
        fd, log = tempfile.mkstemp(prefix=f"macft-error-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("macft " + __version__ + "\ncommand: macft " + " ".join(argv if argv is not None else sys.argv[1:]) + "\n\n")
            f.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    except OSError:
        log = None
    first = (str(e).strip().splitlines() or [""])[0][:300]
    console.print(f"[bold red]error:[/] macft stopped on an unexpected {type(e).__name__}"
                  + (f": {escape(first)}" if first else "."), highlight=False)
    where = f"The full traceback is in {log}. " if log else ""
    console.print(f"{where}Run the same command with --debug to see it here. This is a bug in macft "
                  "(or a case it does not handle yet): please report it to the macft issue tracker "
                  "with that file.", highlight=False)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
