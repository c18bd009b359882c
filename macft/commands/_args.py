"""Flags that several commands share: one per config field, and the model and sampling
flags of ``chat`` and ``generate``. A leaf: it imports no command."""

from __future__ import annotations

import argparse
import typing
from typing import Any

from ..config import FieldSpec, field_specs


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
        # argparse formats help with %: a literal one (e.g. "5% higher") must be doubled
        help_text = f"{spec.help} [{spec.key}; default: {default}]".replace("%", "%%")
        if spec.type is bool:
            g.add_argument(spec.flag, dest=spec.dest, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_text)
        else:
            g.add_argument(spec.flag, dest=spec.dest, default=argparse.SUPPRESS,
                           metavar=_metavar(spec), help=help_text)


def cli_values(args: argparse.Namespace, sections: tuple[str, ...]) -> dict[str, Any]:
    return {s.key: getattr(args, s.dest) for s in field_specs(sections) if hasattr(args, s.dest)}


def add_model_source_args(p: argparse.ArgumentParser) -> None:
    """The model to talk to (``--run``, ``--model [--adapter]``, ``--gguf``) and how to sample
    (:func:`macft.chat_session.load_from_args`, :func:`macft.chat_session.sampling_from_args`)."""
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
