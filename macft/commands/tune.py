"""`macft tune DATA --model M`: the search of `macft train --auto`, without the run.

It prints the recommended settings and writes them as a config (``auto/recommended.yaml``)
that `macft train --config` takes as it is."""

from __future__ import annotations

import argparse

from ._args import add_config_flags, cli_values
from .train import SECTIONS, TrainOptions, add_auto_arguments, auto_request, resolve, train

HELP = ("Search the learning rate, LoRA rank and epochs for your data and model (what "
        "`macft train --auto` does before its run) and print the settings to train with.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_path", nargs="?", metavar="DATA",
                   help="Training data (same as --data): a file, a directory or a Hugging Face dataset id.")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config; command-line flags override it.")
    p.add_argument("--preset", metavar="NAME", help="Start from a preset (see `macft models`).")
    p.add_argument("--force", action="store_true", help="Search even when the memory estimate says the "
                   "run will not fit.")
    add_auto_arguments(p, tune=True)
    add_config_flags(p, SECTIONS)


def run(args: argparse.Namespace) -> int:
    values = cli_values(args, SECTIONS)
    if args.data_path:
        values["data.train"] = args.data_path
    cfg, _ = resolve(values, config_file=args.config, preset=args.preset)
    options = TrainOptions(preset=args.preset, force=args.force,
                           auto=auto_request(args, values, force_auto=True))
    return train(cfg, None, options).exit_code
