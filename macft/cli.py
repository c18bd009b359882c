"""The ``macft`` command line: a table of commands, each one a module.

Light by design: this module imports neither torch nor mlx (nor transformers), nor any
command module until its command is named, so ``macft --help`` and every
``macft <command> --help`` answer at once on any machine. A command module owns its
arguments and its ``run``; its heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from ._version import __version__

# name -> (one-line help, module). The module owns the command: ``HELP`` (its description),
# ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only when its command is
# named. The help lines stay here so that ``macft --help`` imports no command module
# (importing them all made it four times slower: numpy, the data readers, rich tables).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("Fine-tune a model with LoRA / QLoRA (MLX or PyTorch backend).", "macft.commands.train"),
    "tune": ("Search the learning rate, LoRA rank and epochs for your data and model (what "
             "`macft train --auto` does before its run) and print the settings to train with.",
             "macft.commands.tune"),
    "demo": ("Run the whole product offline in minutes: tiny Gemma-3, LoRA on the bundled data, "
             "q4_k_m GGUF, before/after answers through llama.cpp.", "macft.commands.demo"),
    "estimate": ("Predict peak memory (and, with --data, time per epoch) before training; "
                 "suggest settings that fit.", "macft.commands.estimate"),
    "models": ("List the presets and the model architectures each backend supports.", "macft.commands.models"),
    "chat": ("Talk to a fine-tune in the terminal (streaming; /reset, /system, /base, /tuned), "
             "or in the browser with --web.", "macft.commands.chat"),
    "generate": ("Answer prompts non-interactively, printing only the answers (for scripts).",
                 "macft.commands.generate"),
    "eval": ("Judge a run: loss, perplexity, base vs fine-tuned answers, stop rate, retention, GGUF.",
             "macft.commands.eval"),
    "doctor": ("Check this machine: torch build vs GPU, bitsandbytes, MLX, tokenizer extras, llama.cpp, "
               "memory, disk; with the fix for each problem.", "macft.commands.doctor"),
    "setup": ("Set up external tools: `macft setup llama-cpp` builds the pinned llama.cpp.",
              "macft.commands.setup"),
    "export": ("Merge a LoRA run into its base and export verified GGUF files "
               "(llama.cpp, Ollama, LM Studio).", "export.command"),
}
DATA_COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("Show the detected format, token counts, masks and truncation of a data set.",
                "macft.commands.data_inspect"),
}


def _named(argv: Sequence[str] | None) -> list[str] | None:
    """The command words in ``argv`` (``["train"]``, ``["data", "inspect"]``): the commands
    whose arguments the parser needs. None (every command) when ``argv`` is None."""
    if argv is None:
        return None
    return [w for w in argv if not w.startswith("-")][:2]


def _add_commands(sub: Any, table: dict[str, tuple[str, str]], wanted: str | None, every: bool) -> None:
    for name, (help_text, module) in table.items():
        mod: ModuleType | None = importlib.import_module(module) if every or name == wanted else None
        description = getattr(mod, "HELP", help_text)
        p = sub.add_parser(name, help=help_text, description=description)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if mod is not None:
            mod.add_arguments(p)
        p.set_defaults(_command=module)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``macft`` parser. Only the command named in ``argv`` gets its arguments (its module
    is imported for them); without ``argv``, every command does."""
    words = _named(argv)
    every = words is None
    parser = argparse.ArgumentParser(
        prog="macft",
        description="Fine-tune small open LLMs on your own chat data, on your own machine, "
                    "and take home a verified quantized GGUF.")
    parser.add_argument("--version", action="version", version=f"macft {__version__}")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks for errors.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    first = words[0] if words else None
    _add_commands(sub, COMMANDS, first, every)
    data = sub.add_parser("data", help="Work with data sets (inspect).", description="Work with data sets.")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    second = words[1] if words and first == "data" and len(words) > 1 else None
    _add_commands(dsub, DATA_COMMANDS, second, every)
    data.set_defaults(_parser=data)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser(words)
    except Exception as e:  # noqa: BLE001 - a command module that does not import: a bug
        if "--debug" in words:
            raise
        _print_unexpected(e, argv)
        return 1
    args = parser.parse_args(words)
    module = getattr(args, "_command", None)
    if module is None:
        (getattr(args, "_parser", None) or parser).print_help()
        return 0 if args.command is None and not argv else 2
    from .errors import MacftError

    try:
        rc = importlib.import_module(module).run(args)
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
