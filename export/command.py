"""``macft export`` and ``macft setup llama-cpp``: the command line turned into options for
:func:`macft.api.export` (which resolves the job and runs :mod:`export.pipeline`)."""

from __future__ import annotations

import argparse

HELP = ("Merge a LoRA run into its base and export verified GGUF files "
        "(llama.cpp, Ollama, LM Studio).")
SETUP_HELP = "Set up external tools: `macft setup llama-cpp` builds the pinned llama.cpp."


def add_arguments(p: argparse.ArgumentParser) -> None:
    from macft.commands._args import add_config_flags

    src = p.add_argument_group("what to export")
    src.add_argument("--run", metavar="RUN", help="A run directory written by `macft train`.")
    src.add_argument("--adapter", metavar="DIR",
                     help="A PEFT LoRA adapter made elsewhere (with --model), instead of --run.")
    src.add_argument("--model", metavar="BASE",
                     help="Base model of --adapter: a local directory or a Hugging Face hub id.")
    src.add_argument("--best", action="store_true",
                     help="With --run: export best_adapter/ (lowest validation loss) instead of adapter/.")
    src.add_argument("--force", action="store_true",
                     help="Merge even when the base model's weights differ from those the run was "
                          "trained on (recorded in its config.yaml).")
    o = p.add_argument_group("outputs")
    o.add_argument("--output", metavar="DIR", help="Output directory (default RUN/export).")
    o.add_argument("--name", metavar="NAME", help="File and Ollama model name (default: from the run).")
    v = p.add_argument_group("verification")
    v.add_argument("--prompts", metavar="FILE.jsonl",
                   help="Prompts to verify with (chat rows or prompt/completion rows); default: "
                        "the run's validation data.")
    v.add_argument("--verify-prompts", type=int, default=8, metavar="N",
                   help="Greedy generations compared per GGUF (default 8).")
    v.add_argument("--max-new-tokens", type=int, default=48, metavar="N",
                   help="Longest greedy generation compared (default 48).")
    v.add_argument("--eval-tokens", type=int, default=4096, metavar="N",
                   help="Validation tokens scored for perplexity / agreement (default 4096; fewer "
                        "for very large vocabularies).")
    v.add_argument("--threads", type=int, default=0, metavar="N",
                   help="Threads for llama.cpp and the reference model (default: all cores).")
    v.add_argument("--no-verify", action="store_true",
                   help="Skip the comparison with the Hugging Face model (it loads the model in fp32); "
                        "the files are then unchecked.")
    add_config_flags(p, ("export",))
    p.add_argument("--no-imatrix", action="store_true",
                   help="Quantize without an importance matrix (same as --imatrix off); the i-quants "
                        "(iq4_xs, iq3_m) are then refused.")


def add_setup_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["llama-cpp"],
                   help="llama-cpp: download and build the pinned llama.cpp tools export uses "
                        "(idempotent; prints the directory of the built tools last).")


def run(args: argparse.Namespace) -> int:
    return export(args)


def setup(args: argparse.Namespace) -> int:
    from macft.ui import console, out

    from .llama_cpp import locate

    tools = locate(None)
    console.print(f"llama.cpp ready: {tools.description}")
    out.print(str(tools.bin_dir))  # the last line of stdout, for scripts
    return 0


def export(args: argparse.Namespace) -> int:
    from macft.api import export as api_export
    from macft.commands._args import cli_values
    from macft.ui import out

    export_values = cli_values(args, ("export",))
    # the flags named as macft.export() names its options
    options = {spec_key.split(".", 1)[1]: value for spec_key, value in export_values.items()}
    if getattr(args, "no_imatrix", False):
        from macft.errors import MacftError

        if options.get("imatrix") not in (None, "off"):
            raise MacftError(f"--no-imatrix and --imatrix {options['imatrix']} contradict each other.",
                             "Pass one of them.")
        options["imatrix"] = "off"
    result = api_export(args.run, adapter=args.adapter, model=args.model, best=args.best,
                        force=getattr(args, "force", False), output=args.output, name=args.name,
                        prompts=args.prompts, verify_prompts=args.verify_prompts,
                        max_new_tokens=args.max_new_tokens, eval_tokens=args.eval_tokens,
                        threads=args.threads, no_verify=args.no_verify, verbose=True, **options)
    out.print(str(result.output))  # the last line of stdout, for scripts
    return 0
