"""Handlers of ``macft export`` and ``macft setup llama-cpp`` (their argument definitions live in
``macft/commands/__init__.py``, which stays light)."""

from __future__ import annotations

import argparse


def setup(args: argparse.Namespace) -> int:
    from macft.ui import console, out

    from .llama_cpp import locate

    tools = locate(None)
    console.print(f"llama.cpp ready: {tools.description}")
    out.print(str(tools.bin_dir))  # the last line of stdout, for scripts
    return 0


def export(args: argparse.Namespace) -> int:
    from macft.cli import cli_values
    from macft.errors import MacftError

    from .job import ExportOptions, resolve_job
    from .pipeline import run_export

    for flag in ("verify_prompts", "max_new_tokens", "eval_tokens"):
        if getattr(args, flag) < 1:
            raise MacftError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}.")
    options = ExportOptions(prompts_file=args.prompts, n_prompts=args.verify_prompts,
                            max_new_tokens=args.max_new_tokens, eval_tokens=args.eval_tokens,
                            threads=args.threads, verify=not args.no_verify,
                            force=getattr(args, "force", False))
    job = resolve_job(run=args.run, adapter=args.adapter, model=args.model, output=args.output,
                      name=args.name, best=args.best, export_values=cli_values(args, ("export",)),
                      options=options)
    run_export(job)
    from macft.ui import out

    out.print(str(job.output))  # the last line of stdout, for scripts
    return 0
