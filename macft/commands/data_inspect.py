"""`macft data inspect`: format, counts, length histogram, trained share, rendered masks."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..config import build_config, validate
from ..data.dataset import build_data
from ..data.render import Renderer
from ..data.templates import renderer_for, suggest
from ..data.tokenizer import load_tokenizer
from ..errors import MacftError
from ..ui import console, out
from ._args import add_config_flags, cli_values

HELP = "Show the detected format, token counts, masks and truncation of a data set."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="A data file, a directory with train/valid files, or a HF dataset id.")
    p.add_argument("--model", required=False, help="Model whose tokenizer and chat template render the data.")
    p.add_argument("--config", metavar="FILE.yaml", help="Take model and data settings from a YAML config.")
    p.add_argument("--json", action="store_true", help="Print one JSON object (for scripts) instead of tables.")
    p.add_argument("--examples", type=int, default=2, metavar="N", help="Rendered examples to show (default 2).")
    add_config_flags(p, ("data",), skip=("data.train",))


def run(args: argparse.Namespace) -> int:
    values = cli_values(args, ("data",))
    values["data.train"] = args.data
    if args.model:
        values["model.name"] = args.model
    cfg = build_config(args.config, values)
    validate(cfg)
    if not cfg.model.name:
        raise MacftError("data inspect needs a model: its tokenizer and chat template decide the tokens.",
                         "Add --model (a hub id or a local model directory).")
    tok = load_tokenizer(cfg.model.name, cfg.model.revision)
    renderer = renderer_for(tok, cfg.data.loss_on, cfg.data.chat_template)
    data = build_data(cfg.data.train, cfg.data.valid, renderer, fmt=cfg.data.format,  # type: ignore[arg-type]
                      max_seq_len=cfg.data.max_seq_len, valid_fraction=cfg.data.valid_fraction,
                      seed=cfg.train.seed, split=cfg.data.split, encoding=cfg.data.encoding)
    report = make_report(data, renderer)
    report["suggested_chat_template"] = suggest(cfg.model.name, _model_type(cfg.model.name), tok)
    if args.json:
        out.print_json(json.dumps(report, ensure_ascii=False))
        return 0
    show(report, data, tok, args.examples)
    return 0


def histogram(lengths: list[int], bins: int = 8) -> list[dict[str, int]]:
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min((n - lo) // width, bins - 1)] += 1
    return [{"from": lo + i * width, "to": lo + (i + 1) * width - 1, "count": c}
            for i, c in enumerate(counts) if c or i < bins]


THINKING_NOTE = ("the chat template has a thinking mode (Qwen3): replies are trained as non-thinking "
                 "turns (enable_thinking=False: the empty <think></think> block is part of the prompt, "
                 "never trained); a row with several replies becomes one example per reply, each "
                 "rendered as that turn is at inference. The exported template defaults to this mode.")


def make_report(data: Any, renderer: Renderer) -> dict[str, Any]:
    s, v = data.train_stats, data.valid_stats
    splits = [s] + ([v] if v else [])
    total = sum(x.total_tokens for x in splits)
    trained = sum(x.trained_tokens for x in splits)
    return {
        "format": data.format,
        "examples": sum(x.examples for x in splits),
        "rows": sum(x.rows for x in splits),
        "total_tokens": total,
        "trained_tokens": trained,
        "trained_share": trained / total if total else 0.0,
        "truncated": sum(x.truncated for x in splits),
        "dropped": sum(x.dropped for x in splits),
        "train": s.summary(),
        "valid": v.summary() if v else None,
        "valid_from": data.valid_from,
        "length_histogram": histogram(s.lengths),
        "chat_template": renderer.template_name,
        "thinking_template": THINKING_NOTE if renderer.thinking else None,
        "end_tokens": renderer.end_tokens(),
    }


def masked_text(tok: Any, ids: list[int], mask: list[int]) -> Text:
    """The rendered example; trained tokens highlighted (green on dark), others dim."""
    t = Text()
    for i, m in zip(ids, mask):
        piece = tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if m:
            t.append(piece, style="bold black on green3")
        else:
            t.append(piece, style="dim")
    return t


def show(report: dict[str, Any], data: Any, tok: Any, n_examples: int) -> None:
    t = Table(title="Data", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("format", report["format"])
    t.add_row("examples", f"{report['train']['examples']} train, "
              f"{report['valid']['examples'] if report['valid'] else 0} validation ({report['valid_from']})")
    t.add_row("tokens", f"{report['total_tokens']:,} total, {report['trained_tokens']:,} trained "
              f"({report['trained_share']:.1%})")
    t.add_row("truncated / dropped", f"{report['truncated']} / {report['dropped']}")
    t.add_row("longest", f"{report['train']['max_len']} tokens")
    hint = report.get("suggested_chat_template")
    t.add_row("chat template", report["chat_template"] + (
        f"  (this model ships none; it was most likely trained with '{hint}': --chat-template {hint})"
        if hint and report["chat_template"] == "fallback" else ""))
    if report.get("thinking_template"):
        t.add_row("thinking mode", report["thinking_template"])
    t.add_row("end tokens", ", ".join(report["end_tokens"]))
    console.print(t)
    h = Table(title="Token lengths (train)")
    h.add_column("tokens", justify="right")
    h.add_column("examples", justify="right")
    h.add_column("")
    top = max((b["count"] for b in report["length_histogram"]), default=1) or 1
    for b in report["length_histogram"]:
        h.add_row(f"{b['from']}-{b['to']}", str(b["count"]), "█" * round(30 * b["count"] / top))
    console.print(h)
    for ex in data.train[:n_examples]:
        console.print(Panel(masked_text(tok, ex.ids.tolist(), ex.mask.tolist()),
                            title=f"{ex.where}  ({int(ex.mask.sum())} of {len(ex)} tokens trained)",
                            title_align="left"))
    console.print("[bold black on green3] trained [/] tokens count in the loss; [dim]dim[/] ones are context.")


def _model_type(model: str) -> str:
    """The model's architecture family for the template suggestion ('' when unknown)."""
    try:
        from ..model_info import read_model_info
        from ..models import resolve_model_path

        return read_model_info(resolve_model_path(model, tokenizer_only=True)).text_model_type
    except MacftError:
        return ""
